"""Model archives (.mar) built with torch-model-archiver from model directories."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from support.tiny_models import write_tiny_model_dir
from xaiserve.api.errors import ModelLoadError
from xaiserve.engine.limits import EngineLimits
from xaiserve.gateway.torchserve_process import model_names
from xaiserve.model_store import archive

pytest.importorskip("model_archiver")


def _contents(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as packed:
        return {name: packed.read(name) for name in packed.namelist()}


def test_archive_holds_the_model_directory_handler_and_settings(tmp_path: Path) -> None:
    model_dir = write_tiny_model_dir(tmp_path / "tiny")
    (model_dir / "model.onnx").write_bytes(b"onnx graph")
    (model_dir / "notes.txt").write_text("not part of the model")
    settings = archive.ArchiveSettings(
        batch_size=4,
        max_batch_delay_ms=20,
        response_timeout_s=30,
        min_workers=1,
        max_workers=2,
        job_queue_size=10,
        limits=EngineLimits(max_methods=5),
    )

    path = archive.build_archive(model_dir, tmp_path / "store", settings)

    assert path == tmp_path / "store" / "tiny.mar"
    files = _contents(path)
    assert set(files) == {
        "config.yaml",
        "model.py",
        "weights.pt",
        "model.onnx",
        "torchserve_handler.py",
        "model-config.yaml",
        "MAR-INF/MANIFEST.json",
    }
    assert files["weights.pt"] == (model_dir / "weights.pt").read_bytes()
    assert files["torchserve_handler.py"] == archive.handler_file().read_bytes()
    manifest = json.loads(files["MAR-INF/MANIFEST.json"])
    assert manifest["model"]["modelName"] == "tiny" and manifest["model"]["modelVersion"] == "1"
    assert manifest["model"]["handler"] == "torchserve_handler.py"
    config = yaml.safe_load(files["model-config.yaml"])
    assert config["batchSize"] == 4 and config["maxBatchDelay"] == 20
    assert config["responseTimeout"] == 30 and config["jobQueueSize"] == 10
    assert (config["minWorkers"], config["maxWorkers"]) == (1, 2)
    assert config["xaiserve"]["limits"]["max_methods"] == 5
    assert "concurrency" not in config["xaiserve"]  # the worker's XAISERVE_CONCURRENCY decides
    assert model_names(tmp_path / "store") == ["tiny"]


def test_command_line_builds_one_archive_per_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = write_tiny_model_dir(tmp_path / "a")
    second = write_tiny_model_dir(tmp_path / "b")
    config = yaml.safe_load((second / "config.yaml").read_text())
    config.update(name="tiny-two", version="7")
    (second / "config.yaml").write_text(yaml.safe_dump(config))

    code = archive.main(
        [
            "--model-dir",
            str(first),
            "--model-dir",
            str(second),
            "--out",
            str(tmp_path / "s"),
            "--batch-size",
            "2",
            "--max-forward-passes",
            "500",
            "--forward-backend",
            "torch",
            "--no-incremental-occlusion",
            "--concurrency",
            "serial",
            "--device",
            "cpu",
        ]
    )

    assert code == 0
    assert capsys.readouterr().out.split() == [
        str(tmp_path / "s" / "tiny.mar"),
        str(tmp_path / "s" / "tiny-two.mar"),
    ]
    assert model_names(tmp_path / "s") == ["tiny", "tiny-two"]
    settings = yaml.safe_load(_contents(tmp_path / "s" / "tiny-two.mar")["model-config.yaml"])
    assert settings["batchSize"] == 2
    assert settings["xaiserve"]["limits"]["max_forward_passes"] == 500
    assert settings["xaiserve"]["concurrency"] == "serial"
    forward = settings["xaiserve"]["forward"]
    assert forward["backend"] == "torch" and forward["incremental_occlusion"] is False
    assert forward["device"] == "cpu"
    first_config = yaml.safe_load(_contents(tmp_path / "s" / "tiny.mar")["model-config.yaml"])
    assert first_config["xaiserve"]["forward"]["device"] == "cpu"
    assert forward["onnx_providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_missing_weights_are_refused(tmp_path: Path) -> None:
    model_dir = write_tiny_model_dir(tmp_path / "tiny")
    (model_dir / "weights.pt").unlink()
    with pytest.raises(ModelLoadError, match=r"'weights\.pt' is not a file"):
        archive.build_archive(model_dir, tmp_path / "store")


@pytest.mark.parametrize(
    "changes",
    [
        {"batch_size": 0},
        {"max_batch_delay_ms": -1},
        {"max_batch_delay_ms": 0, "batch_size": 4},  # TorchServe would wait 100 ms
        {"min_workers": 2, "max_workers": 1},
        {"concurrency": "parallel"},
    ],
)
def test_bad_settings_are_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        archive.ArchiveSettings(**changes)


def test_no_batch_delay_is_allowed_for_batches_of_one() -> None:
    assert archive.ArchiveSettings(batch_size=1, max_batch_delay_ms=0).max_batch_delay_ms == 0


def test_the_model_files_helper_modules_go_into_the_archive(tmp_path: Path) -> None:
    model_dir = write_tiny_model_dir(tmp_path / "tiny")
    (model_dir / "helpers.py").write_text("WIDTH = 8\n")
    (model_dir / "blocks").mkdir()
    (model_dir / "blocks" / "__init__.py").write_text("")
    (model_dir / "blocks" / "conv.py").write_text("KERNEL = 3\n")
    (model_dir / ".venv").mkdir()
    (model_dir / ".venv" / "site.py").write_text("")
    (model_dir / "model.onnx").write_bytes(b"onnx graph")
    path = archive.build_archive(model_dir, tmp_path / "store")
    with zipfile.ZipFile(path) as packed:
        files = packed.namelist()
    assert {"helpers.py", "blocks/__init__.py", "blocks/conv.py", "model.py"} <= set(files)
    assert ".venv/site.py" not in files and len(files) == len(set(files))
