"""Settings from flags, XAISERVE_* variables and defaults (xaiserve.gateway.settings)."""

from __future__ import annotations

import logging
from dataclasses import FrozenInstanceError, fields
from pathlib import Path

import pytest
import torch

from support.tiny_models import write_tiny_model_dir
from xaiserve.engine.limits import EngineLimits
from xaiserve.gateway.settings import (
    SettingError,
    Settings,
    build_parser,
    env_var,
    parse_settings,
)


def test_defaults() -> None:
    settings = parse_settings([], environ={})
    assert settings == Settings()
    assert settings.address == "127.0.0.1:50051"
    assert settings.max_message_bytes == 32 * 1024 * 1024
    assert settings.workers == 32 and settings.backend == "local" and not settings.build_demo


def test_environment_then_flags() -> None:
    environ = {
        "XAISERVE_PORT": "6000",
        "XAISERVE_WORKERS": "4",
        "XAISERVE_BUILD_DEMO": "true",
        "XAISERVE_LOG_LEVEL": "debug",
        "XAISERVE_MAX_METHODS": "3",
        "XAISERVE_DEFAULT_DEADLINE_SECONDS": "2.5",
    }
    settings = parse_settings(["--port", "7000", "--no-build-demo", "--host", "::"], environ)
    assert settings.port == 7000  # the flag wins
    assert settings.workers == 4 and settings.max_methods == 3  # the environment fills in
    assert settings.default_deadline_seconds == 2.5 and settings.log_level == "DEBUG"
    assert not settings.build_demo
    assert settings.address == "[::]:7000"
    assert parse_settings(["--build-demo"], {}).build_demo


def test_engine_limits_come_from_settings() -> None:
    settings = parse_settings(
        [
            "--max-image-bytes",
            "10",
            "--max-image-pixels",
            "20",
            "--max-methods",
            "2",
            "--max-forward-passes",
            "30",
        ],
        {},
    )
    assert settings.engine_limits() == EngineLimits(
        max_image_bytes=10, max_image_pixels=20, max_methods=2, max_forward_passes=30
    )


def test_forward_settings_reach_the_forward_config() -> None:
    settings = parse_settings(
        [
            "--forward-backend",
            "torch",
            "--onnx-threads",
            "3",
            "--no-incremental-occlusion",
            "--forward-call-batch",
            "16",
            "--forward-max-batch",
            "32",
        ],
        {"XAISERVE_FORWARD_MEMORY_MB": "64"},
    )
    config = settings.forward_config()
    assert (config.backend, config.onnx_threads, config.memory_mb) == ("torch", 3, 64)
    assert (config.call_batch, config.max_batch) == (16, 32)
    assert parse_settings([], {}).forward_config().max_batch == 256
    assert parse_settings([], {}).forward_config().call_batch == 0
    assert not config.incremental_occlusion
    assert parse_settings([], {}).forward_config().incremental_occlusion
    environ = {"XAISERVE_INCREMENTAL_OCCLUSION": "false"}
    assert not parse_settings([], environ).forward_config().incremental_occlusion
    gpu = parse_settings(
        ["--onnx-providers", "CUDAExecutionProvider"], {"XAISERVE_ONNX_DEVICE_ID": "2"}
    ).forward_config()
    assert (gpu.onnx_providers, gpu.onnx_device_id) == (("CUDAExecutionProvider",), 2)
    assert parse_settings([], {}).forward_config().onnx_providers == (
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    )
    assert parse_settings([], {}).forward_config().onnx_device_id is None  # the model's GPU


def test_device_and_torch_threads_from_flags_and_environment() -> None:
    defaults = parse_settings([], {})
    assert (defaults.device, defaults.torch_threads) == ("auto", 0)
    assert defaults.forward_config().device == "auto"
    settings = parse_settings(["--device", "CUDA:1"], {"XAISERVE_TORCH_THREADS": "4"})
    assert (settings.device, settings.torch_threads) == ("cuda:1", 4)
    assert settings.forward_config().device == "cuda:1"
    assert parse_settings([], {"XAISERVE_DEVICE": "cpu"}).device == "cpu"
    assert parse_settings(["--device", "cuda"], {"XAISERVE_DEVICE": "cpu"}).device == "cuda"


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        (["--device", "cuda:x"], {}, "argument --device: must be auto, cpu, cuda or cuda:N"),
        ([], {"XAISERVE_DEVICE": "gpu"}, "XAISERVE_DEVICE='gpu': must be auto, cpu, cuda or"),
        (["--torch-threads", "-2"], {}, "argument --torch-threads: must be >= 0, got -2"),
        ([], {"XAISERVE_TORCH_THREADS": "all"}, "XAISERVE_TORCH_THREADS='all'"),
    ],
)
def test_a_bad_device_or_thread_count_names_the_setting(
    argv: list[str], environ: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        parse_settings(argv, environ)
    assert caught.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_gpu_torch_does_not_see_stops_the_server_naming_the_setting(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from xaiserve.gateway.server import build_backend, main

    write_tiny_model_dir(tmp_path / "tiny")
    with pytest.raises(SettingError, match=r"^--device \(XAISERVE_DEVICE\): 'cuda': torch sees no"):
        build_backend(Settings(model_store=str(tmp_path), device="cuda"))
    with caplog.at_level(logging.ERROR):
        assert main(["--model-store", str(tmp_path), "--device", "cuda:0"]) == 2
    assert "--device (XAISERVE_DEVICE): 'cuda:0': torch sees no GPU" in caplog.text


@pytest.mark.parametrize(
    ("argv", "environ"),
    [
        (["--workers", "0"], {}),
        (["--port", "70000"], {}),
        (["--backend", "carrier-pigeon"], {}),
        ([], {"XAISERVE_WORKERS": "many"}),
        ([], {"XAISERVE_BUILD_DEMO": "perhaps"}),
        ([], {"XAISERVE_BACKEND": "carrier-pigeon"}),
        (["--onnx-device-id", "-1"], {}),
        (["--max-in-flight", "0"], {}),
        ([], {"XAISERVE_INCREMENTAL_OCCLUSION": "sometimes"}),
        (["--concurrency", "parallel"], {}),
        ([], {"XAISERVE_CONCURRENCY": "parallel"}),
    ],
)
def test_bad_values_are_refused(argv: list[str], environ: dict[str, str]) -> None:
    with pytest.raises(SystemExit) as caught:
        parse_settings(argv, environ)
    assert caught.value.code == 2


def test_concurrency_is_batched_unless_set_to_serial() -> None:
    assert parse_settings([], {}).concurrency == "batched" and not parse_settings([], {}).serial
    assert parse_settings([], {"XAISERVE_CONCURRENCY": "serial"}).serial
    assert parse_settings(["--concurrency", "SERIAL"], {}).serial
    assert not parse_settings(
        ["--concurrency", "batched"], {"XAISERVE_CONCURRENCY": "serial"}
    ).serial


def test_a_bad_concurrency_names_the_setting_and_the_choices(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        parse_settings([], {"XAISERVE_CONCURRENCY": "parallel"})
    assert "XAISERVE_CONCURRENCY='parallel': choose from batched, serial" in capsys.readouterr().err


def test_help_documents_every_setting_with_its_variable_and_default() -> None:
    text = " ".join(build_parser({}).format_help().split())
    for spec in fields(Settings):
        assert "--" + spec.name.replace("_", "-") in text
        assert env_var(spec.name) in text
        assert f"default {getattr(Settings(), spec.name)!r}" in text


def test_settings_are_frozen() -> None:
    with pytest.raises(FrozenInstanceError):
        Settings().port = 1  # type: ignore[misc]


def test_torchserve_backend_and_security_settings_from_flags_and_environment() -> None:
    settings = parse_settings(
        ["--backend", "torchserve", "--torchserve-models", "demo,tiny", "--max-in-flight", "3"],
        {
            "XAISERVE_TORCHSERVE_TARGET": "10.0.0.2:7070",
            "XAISERVE_TLS_CERT_FILE": "/certs/server.pem",
            "XAISERVE_AUTH_TOKEN_FILE": "/secrets/tokens",
        },
    )
    assert settings.backend == "torchserve" and settings.torchserve_models == "demo,tiny"
    assert settings.torchserve_target == "10.0.0.2:7070" and settings.max_in_flight == 3
    assert settings.tls_cert_file == "/certs/server.pem"
    assert settings.auth_token_file == "/secrets/tokens"
