"""``xaiserve calibrate``, ``xaiserve gad-train`` and ``evaluate --sections ifa,gad`` on a
copy of the demo model: what they store, that it loads, that it is deterministic, that
archives carry it, and the errors."""

from __future__ import annotations

import csv
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from xaiserve import cli
from xaiserve.runtime.calibration import CALIBRATION_JSON, CALIBRATION_NPZ
from xaiserve.runtime.model import load_model_dir


def _npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as packed:
        return {name: packed[name] for name in packed.files}


@pytest.fixture(scope="module")
def store(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model store with a copy of the demo model, calibrated and with support models."""
    root = tmp_path_factory.mktemp("store")
    shutil.copytree(demo_model_dir, root / "demo")
    common = ["--model", "demo", "--model-store", str(root)]
    assert cli.main(["calibrate", *common, "--n", "48", "--batch-size", "16"]) == 0
    assert (
        cli.main(
            [
                "gad-train",
                *common,
                "--classes",
                "circle,square",
                "--alphas",
                "0,4",
                "--n",
                "32",
                "--epochs",
                "1",
                "--batch-size",
                "16",
            ]
        )
        == 0
    )
    return root


def test_calibrate_stores_a_deterministic_calibration(store: Path, capsys) -> None:
    directory = store / "demo"
    meta = json.loads((directory / CALIBRATION_JSON).read_text())
    assert meta["images"] == 48 and meta["data"] == "demo"
    assert meta["importance_mode"] == "all_classes" and meta["seconds"] > 0
    assert set(meta["cams"]) == {"grad_cam", "xgrad_cam", "grad_cam_plus_plus", "grad_cam_pixel"}
    first = _npz(directory / CALIBRATION_NPZ)
    assert first["grad_cam.importance"].shape == (64, 4)
    assert (
        cli.main(
            [
                "calibrate",
                "--model",
                "demo",
                "--model-store",
                str(store),
                "--n",
                "48",
                "--batch-size",
                "16",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "grad_cam_plus_plus" in out and "48 images" in out
    again = _npz(directory / CALIBRATION_NPZ)
    assert set(first) == set(again)
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])
    served = load_model_dir(directory)
    assert served.calibration is not None
    assert served.calibration.cams["grad_cam"].p90 == meta["cams"]["grad_cam"]["p90"]


def test_gad_train_stores_the_pair(store: Path) -> None:
    index = json.loads((store / "demo" / "gad" / "index.json").read_text())
    (entry,) = index["pairs"]
    assert entry["labels"] == ["circle", "square"] and entry["alphas"] == [0.0, 4.0]
    assert entry["images"] == 32 and entry["settings"]["learning_rate"] == 4e-5
    served = load_model_dir(store / "demo")
    assert served.gad is not None and served.gad.names(served.config.labels) == ("circle,square",)


def test_evaluate_writes_the_seed_tables(store: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "eval"
    status = cli.main(
        [
            "evaluate",
            "--model",
            "demo",
            "--model-store",
            str(store),
            "--n",
            "4",
            "--sections",
            "ifa,gad",
            "--gad-methods",
            "saliency",
            "--principal-fractions",
            "0.05",
            "--out",
            str(out),
        ]
    )
    assert status == 0
    printed = capsys.readouterr().out
    assert "seed 003 table I" in printed and "seed 002 table 2" in printed
    with open(out / "ifa_table1.csv") as f:
        table = list(csv.DictReader(f))
    assert [row["selected"] for row in table] == ["mean over classes", "predicted"]
    assert {"grad_cam", "s_grad_cam", "hires_cam", "s_grad_cam_pixel"} <= set(table[0])
    with open(out / "gad_table1_complexity.csv") as f:
        complexity = list(csv.DictReader(f))
    assert {row["method"] for row in complexity} == {"saliency"}
    for name in (
        "ifa_table2_principal_accuracy.csv",
        "ifa_scatter.png",
        "gad_table2_sensitivity.csv",
        "gad_regions.csv",
    ):
        assert (out / name).is_file(), name


def test_archives_carry_the_calibration_and_support_models(store: Path, tmp_path: Path) -> None:
    pytest.importorskip("model_archiver")
    from xaiserve.model_store.archive import build_archive

    with zipfile.ZipFile(build_archive(store / "demo", tmp_path)) as packed:
        names = set(packed.namelist())
    assert {
        CALIBRATION_JSON,
        CALIBRATION_NPZ,
        "gad/index.json",
        "gad/pair_0_1_alpha_4.pt",
        "config.yaml",
        "weights.pt",
    } <= names


def test_evaluate_sections_need_their_artifacts(
    demo_model_dir: Path, tmp_path: Path, capsys
) -> None:
    shutil.copytree(demo_model_dir, tmp_path / "demo")
    common = [
        "--model",
        "demo",
        "--model-store",
        str(tmp_path),
        "--n",
        "2",
        "--out",
        str(tmp_path / "eval"),
    ]
    assert cli.main(["evaluate", *common, "--sections", "ifa"]) == 2
    assert "run `xaiserve calibrate --model demo`" in capsys.readouterr().err
    assert cli.main(["evaluate", *common, "--sections", "gad"]) == 2
    assert "run `xaiserve gad-train --model demo --classes A,B`" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["calibrate", "--model", "nope"], "model 'nope' not in"),
        (
            ["gad-train", "--model", "demo", "--classes", "circle,dog"],
            "unknown class 'dog'; labels: circle, square, triangle, cross",
        ),
        (["gad-train", "--model", "demo", "--classes", "circle,circle"], "must differ"),
        (
            ["gad-train", "--model", "demo", "--classes", "circle,square", "--alphas", "0"],
            "at least one > 0",
        ),
    ],
)
def test_command_errors(store: Path, capsys, argv: list[str], message: str) -> None:
    assert cli.main([*argv, "--model-store", str(store), "--n", "8"]) == 2
    assert message in capsys.readouterr().err
