"""``xaiserve evaluate`` (the APEM section) end to end on a copy of the demo model:
``--select`` evaluates the images it says, each method's time is its own, and the tables
carry the censoring counts and the tests' p-values."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import torch

from xaiserve import cli
from xaiserve.offline.cli.common import demo_images
from xaiserve.runtime.model import load_model_dir


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _first_misclassified(model_dir: Path, n: int) -> list[str]:
    """The names of the first ``n`` held-out demo images the model gets wrong."""
    module = load_model_dir(model_dir).module
    found = []
    for item in demo_images(10_000):
        with torch.no_grad():
            predicted = int(module(torch.from_numpy(item.image)[None]).argmax())
        if predicted != item.label:
            found.append(item.name)
            if len(found) == n:
                return found
    raise AssertionError("too few misclassified images")


def test_evaluate_selects_misclassified_images_and_times_each_method(
    demo_model_dir: Path, tmp_path: Path, capsys
) -> None:
    shutil.copytree(demo_model_dir, tmp_path / "demo")
    out = tmp_path / "eval"
    argv = ["evaluate", "--model-store", str(tmp_path), "--out", str(out)]
    argv += ["--n", "2", "--select", "misclassified", "--methods", "saliency,occlusion"]
    argv += ["--stages", "one_channel,times_image", "--shuffles", "0", "--bootstrap", "200"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "2 images (misclassified) of" in printed and "table 5.3" in printed

    maps = _csv(out / "maps.csv")
    assert len(maps) == 2 * 2 * 2  # images x methods x stages
    assert sorted({m["image"] for m in maps}) == sorted(_first_misclassified(demo_model_dir, 2))
    assert all(m["correct"] == "False" and m["label"] != m["predicted"] for m in maps)
    for image in {m["image"] for m in maps}:
        seconds = {m["method"]: float(m["seconds"]) for m in maps if m["image"] == image}
        assert all(s > 0 for s in seconds.values())
        assert seconds["occlusion"] != seconds["saliency"]  # each method timed on its own
    attribute = {"occlusion": 0.0, "saliency": 0.0}
    for m in maps:
        attribute[m["method"]] += float(m["attribute_seconds"])
    # occlusion evaluates one occluded image per window, saliency one gradient pass
    assert attribute["occlusion"] > 2 * attribute["saliency"]

    summary = _csv(out / "summary.csv")
    assert {"censored", "censored_fraction", "apem_ci_low", "apem_ci_high"} <= set(summary[0])
    split = _csv(out / "correct_vs_misclassified.csv")
    assert {s["correct"] for s in split} == {"0"} and {s["misclassified"] for s in split} == {"2"}
    correlation = _csv(out / "loss_correlation.csv")
    assert {"spearman_misclassified", "p_misclassified", "p_correct"} <= set(correlation[0])
    assert correlation[-1]["method"] == "confidence"
    stage_tests = _csv(out / "stage_tests.csv")
    assert {(t["method"], t["stage"], t["versus"]) for t in stage_tests} == {
        ("occlusion", "one_channel", "times_image"),
        ("saliency", "one_channel", "times_image"),
    }
    assert (out / "pairwise_one_channel.png").stat().st_size > 0
