"""The ``xaiserve`` command line and the client library's own checks."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from support.service_fakes import FAKE_PNG, Served, fake_map
from xaiserve import cli
from xaiserve.api.v1 import explain_pb2 as pb
from xaiserve.gateway import cli as client_cli
from xaiserve.gateway.client import XaiClient, build_request

ServeFake = Callable[..., Served]


def test_explain_writes_overlays_maps_and_summary(
    serve_fake: ServeFake, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    served = serve_fake()
    image = tmp_path / "cat.png"
    image.write_bytes(b"not really a png")
    out = tmp_path / "out"

    status = cli.main(
        [
            "explain",
            str(image),
            "--model",
            "demo",
            "--methods",
            "saliency,gradcam,ig,saliency",
            "--out",
            str(out),
            "--server",
            served.target,
            "--target",
            "0",
            "--top-k",
            "1",
            "--param",
            "ig.steps=8",
            "--param",
            "ig.baseline=0.5",
            "--reliability",
        ]
    )

    assert status == 0
    ((request, _),) = served.engine.calls
    assert [m.name for m in request.methods] == ["saliency", "grad_cam", "integrated_gradients"]
    assert request.methods[2].params == {"steps": 8, "baseline": 0.5}
    assert request.want_png and request.want_array and request.target == 0
    assert all(m.reliability is not None for m in request.methods)

    for index, method in enumerate(("saliency", "grad_cam", "integrated_gradients")):
        assert (out / f"cat_{method}.png").read_bytes() == FAKE_PNG
        saved = np.load(out / f"cat_{method}.npy")
        np.testing.assert_array_equal(saved, fake_map(index, "one_channel"))
    summary = json.loads((out / "cat.json").read_text())
    assert summary["prediction"]["target"]["label"] == "circle"
    assert [e["method"] for e in summary["explanations"]] == [
        "saliency",
        "grad_cam",
        "integrated_gradients",
    ]
    assert summary["explanations"][0]["shape"] == [1, 4, 4]
    assert summary["explanations"][2]["forward_passes"] == 3
    assert summary["explanations"][0]["timings"] == {"attribute": 0.01}
    assert str(out / "cat_grad_cam.npy") in summary["files"]
    assert all(Path(p).exists() for p in summary["files"])

    printed = capsys.readouterr().out
    assert "cat.png" in printed and "grad_cam" in printed


def test_models_prints_the_served_models(
    serve_fake: ServeFake, capsys: pytest.CaptureFixture[str]
) -> None:
    served = serve_fake()
    assert cli.main(["models", "--server", served.target]) == 0
    printed = capsys.readouterr().out
    assert "demo (version 1)" in printed and "features.3" in printed
    assert "forward    onnxruntime on CUDAExecutionProvider, CPUExecutionProvider" in printed
    assert "forward    torch (no ONNX Runtime: check failed: max |logit difference|" in printed
    assert "not served s_grad_cam: needs a calibration (xaiserve calibrate)" in printed
    assert "device     cuda:1" in printed and "device     -" in printed

    assert cli.main(["models", "--server", served.target, "--json"]) == 0
    models = json.loads(capsys.readouterr().out)
    assert models[0]["methods"] == ["saliency", "grad_cam", "occlusion"]
    assert models[0]["onnx_providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert [m["device"] for m in models] == ["cuda:1", ""]
    assert models[0]["unsupported_methods"] == [
        "s_grad_cam: needs a calibration (xaiserve calibrate)"
    ]


def test_unknown_method_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(["explain", "x.png", "--methods", "saliency,magic"])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "'magic'" in err and "grad_cam" in err and "gradcam" in err


def test_server_errors_are_reported(
    serve_fake: ServeFake, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    served = serve_fake()
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert cli.main(["explain", str(empty), "--server", served.target, "--out", str(tmp_path)]) == 1
    assert "INVALID_ARGUMENT: image.encoded: empty" in capsys.readouterr().err
    assert cli.main(["explain", str(tmp_path / "missing.png"), "--server", served.target]) == 2


def test_unreachable_server(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert cli.main(["models", "--server", f"127.0.0.1:{port}", "--timeout", "5"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_client_checks_names_before_sending() -> None:
    with pytest.raises(ValueError, match="choose from saliency, input_x_gradient"):
        build_request(b"png", methods=("gradcam",))
    with pytest.raises(ValueError, match="takes no parameters"):
        build_request(b"png", methods=("saliency",), params={"saliency": {"x": 1}})
    with pytest.raises(ValueError, match="unknown field 'size'"):
        build_request(b"png", methods=("occlusion",), params={"occlusion": {"size": 1}})
    with pytest.raises(ValueError, match="not among the methods"):
        build_request(b"png", methods=("saliency",), params={"occlusion": {"window": 1}})
    with pytest.raises(ValueError, match="unknown stage"):
        build_request(b"png", stage="two_channel")


def test_client_fills_nested_enum_and_repeated_params() -> None:
    request = build_request(
        b"png",
        methods=("occlusion", "lrp", "auto"),
        params={
            "occlusion": {"adaptive": {"enabled": True, "coarse_window": 8}},
            "lrp": {"rule": "alpha_beta"},
            "auto": {"candidates": ["saliency", "GRAD_CAM"]},
        },
    )
    occlusion, lrp, auto = request.methods
    assert occlusion.occlusion.adaptive.enabled and occlusion.occlusion.adaptive.coarse_window == 8
    assert lrp.lrp.rule == pb.ALPHA_BETA
    assert list(auto.auto.candidates) == [pb.SALIENCY, pb.GRAD_CAM]
    with pytest.raises(ValueError, match=r"params\['lrp'\]\.rule: unknown value 'gamma'"):
        build_request(b"png", methods=("lrp",), params={"lrp": {"rule": "gamma"}})
    with pytest.raises(ValueError, match="occlusion'\\]\\.window"):
        build_request(b"png", methods=("occlusion",), params={"occlusion": {"window": "big"}})


def test_cli_params_nest_and_parse_values(
    serve_fake: ServeFake, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    served = serve_fake()
    image = tmp_path / "dog.png"
    image.write_bytes(b"png")
    status = cli.main(
        [
            "explain",
            str(image),
            "--methods",
            "occlusion,auto",
            "--out",
            str(tmp_path),
            "--server",
            served.target,
            "--param",
            "occlusion.adaptive.enabled=true",
            "--param",
            "occlusion.adaptive.refine_fraction=0.5",
            "--param",
            "occlusion.window=6",
            "--param",
            "auto.candidates=saliency,grad_cam",
            "--filter",
            "exact",
        ]
    )
    assert status == 0, capsys.readouterr().err
    ((request, _),) = served.engine.calls
    assert request.methods[0].params == {
        "window": 6,
        "adaptive": {"enabled": True, "refine_fraction": 0.5},
    }
    assert request.methods[1].params == {"candidates": ["saliency", "grad_cam"]}
    assert all(m.filter is not None and m.filter.mode == "exact" for m in request.methods)


def test_client_sends_arrays_as_tensors(serve_fake: ServeFake) -> None:
    served = serve_fake()
    array = np.random.default_rng(0).random((3, 5, 4))  # float64: sent as float32
    with XaiClient(served.target, timeout=10) as client:
        client.explain(array)
    ((request, _),) = served.engine.calls
    assert request.image.shape == (3, 5, 4)
    np.testing.assert_array_equal(
        np.frombuffer(request.image.data, "<f4").reshape(3, 5, 4), array.astype(np.float32)
    )


def test_a_method_answered_twice_gets_distinct_files(tmp_path: Path) -> None:
    data = np.zeros((1, 2, 2), "<f4").tobytes()
    response = pb.ExplainResponse(
        model_name="demo",
        prediction=pb.Prediction(target=pb.ClassScore(index=0, label="a")),
        explanations=[
            pb.Explanation(method=pb.SALIENCY, map=pb.AttributionMap(shape=[1, 2, 2], data=data))
            for _ in range(2)
        ],
    )
    summary = client_cli.write_outputs(tmp_path / "img.png", response, tmp_path)
    assert [Path(p).name for p in summary["files"]] == [
        "img_saliency.npy",
        "img_saliency_2.npy",
        "img.json",
    ]


@pytest.mark.parametrize(
    ("flag", "value", "field"), [("--top-k", "1000000000000", "top_k"), ("--top-k", "0", "top_k"),
                                 ("--target", "-1", "target")]
)  # fmt: skip
def test_out_of_range_numbers_name_their_field(
    flag: str, value: str, field: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "x.png"
    image.write_bytes(FAKE_PNG)
    assert cli.main(["explain", str(image), flag, value, "--server", "127.0.0.1:1"]) == 2
    assert f"{field} must be in" in capsys.readouterr().err
