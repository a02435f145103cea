"""Where models run (xaiserve.runtime.device and the loader): device settings resolved
against the GPUs torch sees (none here; a fake GPU host by monkeypatching torch.cuda),
a model directory's own ``device``, torch's threads. A last test runs only where CUDA is."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from support.tiny_models import write_tiny_model_dir
from xaiserve.api.errors import ModelLoadError
from xaiserve.engine.engine import Engine
from xaiserve.engine.limits import EngineLimits
from xaiserve.runtime.cpus import usable_cpus
from xaiserve.runtime.device import (
    configure_torch_threads,
    module_device,
    onnx_device_id,
    resolve_device,
)
from xaiserve.runtime.forward.config import ForwardConfig
from xaiserve.runtime.model import read_config

NO_GPU = not torch.cuda.is_available()
TORCH_ONLY = ForwardConfig(export_on_load=False)


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch believes it sees two GPUs (nothing is put on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")
def test_without_a_gpu_auto_is_the_cpu_and_cuda_a_clear_error() -> None:
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("auto", gpu_id=1) == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    for spec in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(ValueError, match=rf"'{spec}': torch sees no GPU .*use auto or cpu"):
            resolve_device(spec)


@pytest.mark.parametrize("spec", ["cuda:x", "gpu", "cuda:-1", "cuda:", "", "cpu:0"])
def test_other_forms_are_refused_with_the_forms_allowed(spec: str) -> None:
    with pytest.raises(ValueError, match="must be auto, cpu, cuda or cuda:N"):
        resolve_device(spec)
    with pytest.raises(ValueError, match=r"^device must be auto, cpu, cuda or cuda:N"):
        ForwardConfig(device=spec)


def test_on_a_gpu_host_auto_and_cuda_take_the_workers_gpu(two_gpus: None) -> None:
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("auto", gpu_id=1) == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda", gpu_id=1) == torch.device("cuda", 1)
    assert resolve_device("cuda:0", gpu_id=1) == torch.device("cuda", 0)  # as written
    assert resolve_device("cpu", gpu_id=1) == torch.device("cpu")
    with pytest.raises(ValueError, match=r"'cuda:2': torch sees 2 GPUs \(cuda:0 to cuda:1\)"):
        resolve_device("cuda:2")
    with pytest.raises(ValueError, match="not cuda:5"):
        resolve_device("auto", gpu_id=5)


def test_onnx_runtime_takes_the_models_gpu_unless_configured() -> None:
    assert onnx_device_id(None, torch.device("cuda", 2)) == 2
    assert onnx_device_id(None, torch.device("cuda")) == 0
    assert onnx_device_id(None, torch.device("cpu")) == 0
    assert onnx_device_id(1, torch.device("cuda", 2)) == 1
    assert ForwardConfig().onnx_device_id is None
    assert ForwardConfig().session_options["device_id"] == 0


def test_device_settings_are_normalized() -> None:
    assert ForwardConfig(device="CUDA:1").device == "cuda:1"
    assert ForwardConfig().device == "auto"


def test_module_device() -> None:
    assert module_device(nn.Linear(2, 2)) == torch.device("cpu")
    assert module_device(nn.ReLU()) == torch.device("cpu")  # no tensors: the CPU


def test_torch_threads_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """(The conftest gives the test process its thread count back afterwards.)"""
    assert configure_torch_threads(3, {}) == 3 == torch.get_num_threads()
    torch.set_num_threads(1)
    assert configure_torch_threads(0, {"OMP_NUM_THREADS": "1"}) == 1  # left to OpenMP
    assert configure_torch_threads(0, {}) == usable_cpus()


def _with_device(directory: Path, device: str | None) -> Path:
    config = yaml.safe_load((directory / "config.yaml").read_text())
    config["device"] = device
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    return directory


def test_config_yaml_may_name_a_device(tmp_path: Path) -> None:
    directory = write_tiny_model_dir(tmp_path / "tiny")
    assert read_config(directory / "config.yaml").device == ""
    _with_device(directory, "CPU")
    assert read_config(directory / "config.yaml").device == "cpu"
    _with_device(directory, "gpu0")
    with pytest.raises(ModelLoadError, match=r"config\.yaml: 'device' must be auto, cpu, cuda"):
        read_config(directory / "config.yaml")


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")
def test_a_model_on_a_gpu_torch_does_not_see_fails_alone(tmp_path: Path) -> None:
    write_tiny_model_dir(tmp_path / "a")
    _with_device(write_tiny_model_dir(tmp_path / "b"), "cuda:1")
    config = yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())
    config["name"] = "tiny-gpu"
    (tmp_path / "b" / "config.yaml").write_text(yaml.safe_dump(config))

    engine = Engine.from_model_store(tmp_path, EngineLimits(), TORCH_ONLY)

    infos = {info.name: info for info in engine.list_models()}
    assert infos["tiny"].device == "cpu" and engine.models["tiny"].device.type == "cpu"
    assert infos["tiny-gpu"].status == "FAILED" and infos["tiny-gpu"].device == ""
    assert "config.yaml: 'device' 'cuda:1': torch sees no GPU" in infos["tiny-gpu"].status_reason


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")
def test_a_server_default_torch_cannot_provide_stops_the_load(tmp_path: Path) -> None:
    write_tiny_model_dir(tmp_path / "a")
    with pytest.raises(ModelLoadError, match="device 'cuda': torch sees no GPU"):
        Engine.from_model_store(tmp_path, EngineLimits(), ForwardConfig(device="cuda"))


@pytest.mark.skipif(NO_GPU, reason="needs a CUDA GPU")
def test_a_model_on_the_gpu_serves_forward_passes_and_its_onnx_check(tmp_path: Path) -> None:
    from xaiserve.runtime.forward.counted import Budget
    from xaiserve.runtime.model import load_model_dir

    directory = write_tiny_model_dir(tmp_path / "tiny")
    on_cpu = load_model_dir(directory)
    engine = Engine.from_model_store(tmp_path, EngineLimits(), ForwardConfig(device="cuda:0"))
    served = engine.models["tiny"]
    assert served.device == torch.device("cuda", 0)
    assert module_device(served.module) == served.device
    (info,) = engine.list_models()
    assert info.device == "cuda:0" and info.onnx_status == ""
    x = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = on_cpu.module(x)
    for backend in ("torch", "onnxruntime"):
        logits = engine.forward("tiny", Budget(100), backend)(x, "predict")
        assert logits.device == x.device
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
