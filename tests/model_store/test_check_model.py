"""``xaiserve check-model``: the report of a TorchScript model and of one that cannot load,
and the exit status of each."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from support.model_formats import write_format
from xaiserve.cli import main
from xaiserve.runtime.formats import TORCHSCRIPT_LAYER_REASON


@pytest.fixture(scope="module")
def scripted(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_format(demo_model_dir, tmp_path_factory.mktemp("check") / "ts", "torchscript")


def test_a_torchscript_model_serves_with_its_methods_and_reasons(
    scripted: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check-model", str(scripted), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "format     TorchScript (model.pt)" in out
    assert "device     cpu" in out
    assert "input      3 x 64 x 64" in out
    assert "labels     circle, square, triangle, cross" in out
    assert "cam layer  features.14 (unavailable)" in out
    assert re.search(r"^onnx       export failed: ", out, re.M)
    assert re.search(r"^forward    torch$", out, re.M)
    assert re.search(r"^  saliency +ok +\d+\.\d{3} s$", out, re.M)
    assert re.search(r"^  occlusion +ok +\d+\.\d{3} s$", out, re.M)
    assert re.search(rf"^  grad_cam +no  {re.escape(TORCHSCRIPT_LAYER_REASON)}$", out, re.M)
    assert re.search(r"^  lrp +no  lrp works on the network's Python layers", out, re.M)
    ok = set(re.findall(r"^  (\w+) +ok ", out, re.M))
    assert ok >= {"saliency", "input_x_gradient", "smoothgrad", "integrated_gradients"}
    assert ok >= {"occlusion", "vargrad", "lime", "kernel_shap", "rise"}
    assert not ok & {"grad_cam", "score_cam", "fullgrad", "deeplift", "auto"}
    assert f"result     {len(ok)} of " in out
    assert out.rstrip().endswith("methods ok; serves")


def test_a_directory_that_cannot_load_exits_1_with_the_reason(
    scripted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = yaml.safe_load((scripted / "config.yaml").read_text())
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**config, "labels": ["a", "b"]}))
    (tmp_path / "model.pt").write_bytes((scripted / "model.pt").read_bytes())
    assert main(["check-model", str(tmp_path), "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "gave (1, 4), not logits (1, 2), one per label of config.yaml" in out
    assert out.rstrip().endswith("result     cannot serve")


def test_an_onnx_model_serves_its_forward_only_methods(
    demo_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = write_format(demo_model_dir, tmp_path / "onnx", "onnx")
    assert main(["check-model", str(directory), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "format     ONNX (model.onnx)" in out
    assert re.search(r"^onnx       the model is an ONNX graph", out, re.M)
    for method in ("occlusion", "lime", "kernel_shap", "rise"):
        assert re.search(rf"^  {method} +ok +\d+\.\d{{3}} s$", out, re.M)
    assert re.search(r"^  saliency +no  saliency needs gradients, and ONNX Runtime", out, re.M)
    assert re.search(r"^  score_cam +no  the model is an ONNX graph run by ONNX Runtime", out, re.M)
