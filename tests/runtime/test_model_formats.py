"""The demo model served as safetensors, TorchScript and torch.export: every method a
format supports gives the eager model's map; the others are refused with the reason."""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from support.model_formats import FORMAT_DIRS, write_format
from xaiserve.api.errors import InvalidArgument, ModelLoadError
from xaiserve.api.types import ExplainRequest, MethodRequest, RawTensor, ReliabilityRequest
from xaiserve.engine.engine import Engine
from xaiserve.engine.limits import EngineLimits
from xaiserve.engine.plan import MODULE_METHODS, method_reason
from xaiserve.methods.registry import METHODS
from xaiserve.runtime.formats import TORCHSCRIPT_LAYER_REASON
from xaiserve.runtime.model import load_model_dir
from xaiserve.runtime.model_config import read_config

#: Largest |difference| allowed between a format's map and the eager model's; maps are
#: normalised to a maximum of 1. Scripted and exported kernels differ in float32 summation
#: order only. A program exported for a batch of 1 runs a batch image by image, with other
#: convolution kernels than the batched eager model: integrated gradients, which sums 50
#: such gradients, differs by up to 1e-4 there.
TOLERANCE = {
    "class_safetensors": 1e-5,
    "torchscript": 1e-5,
    "export": 1e-5,
    "export_batch1": 3e-4,
    "onnx": 1e-5,
}

CAM = {"grad_cam", "grad_cam_plus_plus", "xgrad_cam", "hires_cam", "layer_cam", "score_cam"}
CALIBRATED = {name for name in METHODS if name.startswith("s_")}


@pytest.fixture(scope="module")
def store(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("formats")
    shutil.copytree(demo_model_dir, root / "demo", ignore=shutil.ignore_patterns("model.onnx*"))
    for kind in FORMAT_DIRS:
        directory = write_format(demo_model_dir, root / kind, kind)
        config = yaml.safe_load((directory / "config.yaml").read_text())
        (directory / "config.yaml").write_text(yaml.safe_dump({**config, "name": kind}))
    return root


@pytest.fixture(scope="module")
def engine(store: Path) -> Engine:
    return Engine.from_model_store(store, EngineLimits())


def explain(engine: Engine, model: str, method: str) -> np.ndarray:
    x = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(3))
    image = RawTensor(tuple(x.shape), x.numpy().tobytes())
    request = ExplainRequest(
        model=model,
        image=image,
        methods=(MethodRequest(method),),
        target=1,
        forward_backend="torch",
    )
    return engine.explain(request).explanations[0].map


def expected_support(kind: str, method: str) -> bool:
    if method == "attention_rollout":  # the demo network has no attention, in any format
        return False
    if kind == "onnx":  # forward passes only, no layer
        return not (METHODS[method].needs_gradients or METHODS[method].needs_layer)
    if method in CALIBRATED or (kind != "class_safetensors" and method in MODULE_METHODS):
        return False
    return not (kind == "torchscript" and method in CAM)


def test_every_format_loads_with_its_format(engine: Engine) -> None:
    assert not engine.failed
    formats = {name: served.format for name, served in engine.models.items()}
    assert formats == {
        "demo": "class",
        "class_safetensors": "class",
        "torchscript": "torchscript",
        "export": "export",
        "export_batch1": "export",
        "onnx": "onnx",
    }
    assert engine.models["export"].cam_layer is not None
    assert engine.models["torchscript"].cam_layer is None


@pytest.mark.parametrize("kind", FORMAT_DIRS)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_supported_methods_match_the_eager_model(engine: Engine, kind: str, method: str) -> None:
    served = engine.models[kind]
    reason = method_reason(METHODS[method](), served)
    assert (reason is None) == expected_support(kind, method), reason
    if reason is not None:
        with pytest.raises(InvalidArgument, match="cannot run on model"):
            explain(engine, kind, method)
        return
    if kind == "torchscript" and method == "auto":  # its default candidates hold grad_cam
        with pytest.raises(InvalidArgument) as err:
            explain(engine, kind, method)
        assert "candidates[3]" in str(err.value)
        assert TORCHSCRIPT_LAYER_REASON in str(err.value)
        return
    got, want = explain(engine, kind, method), explain(engine, "demo", method)
    assert got.shape == want.shape
    assert np.abs(want).max() > 0.5  # a map, not zeros
    assert np.abs(got - want).max() <= TOLERANCE[kind]


def test_refusals_name_the_format_and_what_to_do(engine: Engine) -> None:
    scripted = engine.models["torchscript"]
    assert method_reason(METHODS["grad_cam"](), scripted) == TORCHSCRIPT_LAYER_REASON
    assert "module hooks do not fire" in TORCHSCRIPT_LAYER_REASON
    reason = method_reason(METHODS["fullgrad"](), engine.models["export"])
    assert reason is not None
    assert "a torch.export model runs compiled operators" in reason
    assert "serve the class + weights" in reason
    onnx = next(i for i in engine.list_models() if i.name == "onnx")
    assert set(onnx.methods) >= {"occlusion", "lime", "kernel_shap", "rise"}
    assert not set(onnx.methods) & {"saliency", "grad_cam", "score_cam", "auto"}
    assert (
        "saliency: saliency needs gradients, and ONNX Runtime runs the ONNX model's forward only"
        in onnx.unsupported_methods
    )
    assert any(
        r.startswith("score_cam: the model is an ONNX graph") for r in onnx.unsupported_methods
    )
    x = torch.rand(3, 64, 64)
    request = ExplainRequest(
        model="onnx",
        image=RawTensor(tuple(x.shape), x.numpy().tobytes()),
        methods=(MethodRequest("occlusion", reliability=ReliabilityRequest()),),
    )
    with pytest.raises(InvalidArgument, match="APEM records and the filter need gradients"):
        engine.explain(request)
    info = next(i for i in engine.list_models() if i.name == "torchscript")
    assert f"score_cam: {TORCHSCRIPT_LAYER_REASON}" in info.unsupported_methods
    assert "grad_cam" not in info.methods and "saliency" in info.methods


def test_format_is_inferred_from_the_files(store: Path, tmp_path: Path) -> None:
    assert read_config(store / "torchscript" / "config.yaml").format == "torchscript"
    assert read_config(store / "export" / "config.yaml").weights == "model.pt2"
    config = yaml.safe_load((store / "export" / "config.yaml").read_text())
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ModelLoadError, match=r"no model: give 'model'.*model\.pt2"):
        read_config(tmp_path / "config.yaml")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**config, "format": "keras"}))
    with pytest.raises(
        ModelLoadError,
        match="'format' must be one of class, torchscript, export, onnx, got 'keras'",
    ):
        read_config(tmp_path / "config.yaml")


def test_unreadable_programs_are_refused_with_the_file_and_what_to_save(
    store: Path, tmp_path: Path
) -> None:
    for kind, file, advice in (
        ("torchscript", "model.pt", "torch.jit.save(torch.jit.script(model)"),
        ("export", "model.pt2", "torch.export.save(torch.export.export(model"),
    ):
        directory = tmp_path / kind
        shutil.copytree(store / kind, directory)
        (directory / file).write_bytes(b"not a program")
        with pytest.raises(ModelLoadError) as err:
            load_model_dir(directory)
        assert str(directory / file) in str(err.value)
        assert advice in str(err.value)


def test_a_damaged_safetensors_file_is_refused(store: Path, tmp_path: Path) -> None:
    directory = tmp_path / "st"
    shutil.copytree(store / "class_safetensors", directory)
    (directory / "w.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{bad")
    with pytest.raises(ModelLoadError, match=r"w\.safetensors: unreadable safetensors file"):
        load_model_dir(directory)


class _Marker:
    """Touches ``path`` when unpickled: proof that an archive's object was run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[Path]]:
        return (Path.touch, (self.path,))


@pytest.mark.parametrize(
    ("kind", "file", "refusal"),
    [
        ("export", "model.pt2", "not a torch.export program"),
        ("torchscript", "model.pt", "not a TorchScript file"),
    ],
)
def test_a_pickled_object_saved_as_a_program_is_refused_unrun(
    store: Path, tmp_path: Path, kind: str, file: str, refusal: str
) -> None:
    directory = tmp_path / kind
    shutil.copytree(store / kind, directory)
    ran = tmp_path / "ran"
    torch.save(_Marker(ran), directory / file)
    with pytest.raises(ModelLoadError) as err:
        load_model_dir(directory)
    assert refusal in str(err.value)
    assert not ran.exists()


def test_an_export_archive_with_a_pickled_weight_is_refused_unrun(
    store: Path, tmp_path: Path
) -> None:
    """torch.export.load itself would torch.load(weights_only=False) a weight marked
    use_pickle; here it is refused and the object never runs."""
    directory = tmp_path / "pickled-weight"
    shutil.copytree(store / "export", directory)
    ran = tmp_path / "ran"
    source = zipfile.ZipFile(store / "export" / "model.pt2")
    with zipfile.ZipFile(directory / "model.pt2", "w") as archive:
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith("model_weights_config.json"):
                config = json.loads(data)
                config["config"]["features.0.weight"]["use_pickle"] = True
                data = json.dumps(config).encode()
            elif info.filename.endswith("weights/weight_0"):
                buffer = io.BytesIO()
                torch.save(_Marker(ran), buffer)
                data = buffer.getvalue()
            archive.writestr(info, data)
    with pytest.raises(ModelLoadError, match="holds pickled Python objects, which are not"):
        load_model_dir(directory)
    assert not ran.exists()
    assert torch.load.__module__ == "torch.serialization"  # put back
