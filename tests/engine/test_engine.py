"""The engine end to end on a tiny model directory: prediction, maps, and every bad input."""

from __future__ import annotations

import io
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from support.tiny_models import tiny_served, write_tiny_model_dir
from xaiserve.api.errors import InvalidArgument, ModelLoadError, NotFound, ResourceExhausted
from xaiserve.api.types import EncodedImage, ExplainRequest, MethodRequest, RawTensor
from xaiserve.engine.engine import Engine
from xaiserve.engine.limits import EngineLimits
from xaiserve.runtime.model import load_model_dir


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("store")
    write_tiny_model_dir(root / "tiny")
    return root


@pytest.fixture(scope="module")
def engine(store) -> Engine:
    return Engine.from_model_store(store, EngineLimits(max_image_pixels=64 * 64, max_methods=4))


def png_bytes(array: np.ndarray, mode: str = "RGB", fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format=fmt)
    return buffer.getvalue()


def rgb_image(size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def request(image, *methods: MethodRequest, **kw) -> ExplainRequest:
    return ExplainRequest(model="tiny", image=image, methods=methods, **kw)


def method(name: str, i: int = 0, **params) -> MethodRequest:
    return MethodRequest(name=name, params=params, field=f"methods[{i}]", params_field=name)


def test_prediction_matches_model(engine):
    img = rgb_image()
    result = engine.explain(request(EncodedImage(png_bytes(img)), top_k=3))
    x = torch.from_numpy(img.astype(np.float32) / 255.0).permute(2, 0, 1).unsqueeze(0)
    with torch.no_grad():
        probs = torch.softmax(tiny_served().module(x)[0], 0)
    top = [s.index for s in result.prediction.top_k]
    assert top == torch.argsort(probs, descending=True).tolist()
    assert result.prediction.target.index == top[0]
    assert result.prediction.top_k[0].probability == pytest.approx(float(probs.max()), abs=1e-6)
    assert result.explanations == ()


def test_raw_tensor_equals_png_of_same_pixels(engine):
    img = rgb_image(seed=3)
    as_png = engine.explain(request(EncodedImage(png_bytes(img)), method("saliency")))
    tensor = (img.astype(np.float32) / 255.0).transpose(2, 0, 1).copy()
    as_raw = engine.explain(request(RawTensor(tensor.shape, tensor.tobytes()), method("saliency")))
    assert as_png.prediction.target.logit == pytest.approx(as_raw.prediction.target.logit)
    np.testing.assert_allclose(as_png.explanations[0].map, as_raw.explanations[0].map, atol=1e-6)


def test_methods_return_stage_shapes_and_counts(engine):
    img = EncodedImage(png_bytes(rgb_image()))
    methods = (
        MethodRequest("saliency", stage="raw", field="methods[0]"),
        MethodRequest("grad_cam", stage="one_channel", field="methods[1]"),
        MethodRequest(
            "integrated_gradients",
            {"steps": 8},
            "times_image",
            field="methods[2]",
            params_field="integrated_gradients",
        ),
        MethodRequest(
            "occlusion", {"window": 4, "stride": 4}, field="methods[3]", params_field="occlusion"
        ),
    )
    result = engine.explain(request(img, *methods, target=1, want_png=True))
    shapes = [e.map.shape for e in result.explanations]
    assert shapes == [(3, 16, 16), (1, 16, 16), (1, 16, 16), (1, 16, 16)]
    assert [e.forward_passes for e in result.explanations] == [1, 1, 8, 1 + 16]
    assert result.prediction.target.index == 1
    for e in result.explanations[1:]:
        assert e.map.min() >= 0.0 and e.map.max() == pytest.approx(1.0)
    assert all(Image.open(io.BytesIO(e.png)).size == (16, 16) for e in result.explanations)


@pytest.mark.parametrize(
    "image,field,error",
    [
        (EncodedImage(b""), "image.encoded", InvalidArgument),
        (EncodedImage(b"not an image at all"), "image.encoded", InvalidArgument),
        (EncodedImage(png_bytes(rgb_image(), fmt="BMP")), "image.encoded", InvalidArgument),
        (EncodedImage(png_bytes(rgb_image(), fmt="TIFF")), "image.encoded", InvalidArgument),
        (
            EncodedImage(png_bytes(np.zeros((100, 100), np.uint8), "L")),
            "image.encoded",
            ResourceExhausted,
        ),
        (RawTensor((3, 16, 16), b"\0" * 100), "image.tensor.data", InvalidArgument),
        (
            RawTensor((3, 16, 16), np.full((3, 16, 16), np.nan, np.float32).tobytes()),
            "image.tensor.data",
            InvalidArgument,
        ),
        (
            RawTensor((3, 16, 16), np.full((3, 16, 16), np.inf, np.float32).tobytes()),
            "image.tensor.data",
            InvalidArgument,
        ),
        (
            RawTensor((3, 16, 16), np.full((3, 16, 16), 2.0, np.float32).tobytes()),
            "image.tensor.data",
            InvalidArgument,
        ),
        (
            RawTensor((4, 16, 16), np.zeros((4, 16, 16), np.float32).tobytes()),
            "image.tensor.shape",
            InvalidArgument,
        ),
    ],
)
def test_bad_images(engine, image, field, error):
    with pytest.raises(error) as info:
        engine.explain(request(image))
    assert info.value.field == field


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_jpeg_and_webp_decode_close_to_png(engine, fmt):
    smooth = np.kron(rgb_image(size=4, seed=5), np.ones((4, 4, 1), np.uint8))  # lossy-friendly
    reference = engine.explain(request(EncodedImage(png_bytes(smooth))))
    lossy = engine.explain(request(EncodedImage(png_bytes(smooth, fmt=fmt))))
    assert lossy.prediction.target.index == reference.prediction.target.index
    assert lossy.prediction.target.logit == pytest.approx(
        reference.prediction.target.logit, abs=0.1
    )


def test_grayscale_and_rgba_inputs(engine):
    gray = np.random.default_rng(1).integers(0, 256, (16, 16), dtype=np.uint8)
    as_gray = engine.explain(request(EncodedImage(png_bytes(gray, "L"))))
    as_rgb = engine.explain(request(EncodedImage(png_bytes(np.stack([gray] * 3, -1)))))
    assert as_gray.prediction.target.logit == pytest.approx(as_rgb.prediction.target.logit)
    rgba = np.dstack([rgb_image(), np.full((16, 16), 255, np.uint8)])
    opaque = engine.explain(request(EncodedImage(png_bytes(rgba, "RGBA"))))
    plain = engine.explain(request(EncodedImage(png_bytes(rgb_image()))))
    assert opaque.prediction.target.logit == pytest.approx(plain.prediction.target.logit)
    rgba[..., 3] = 0  # fully transparent: composited on white
    clear = engine.explain(request(EncodedImage(png_bytes(rgba, "RGBA"))))
    white = engine.explain(request(EncodedImage(png_bytes(np.full((16, 16, 3), 255, np.uint8)))))
    assert clear.prediction.target.logit == pytest.approx(white.prediction.target.logit)


def test_other_sizes_are_resized(engine):
    result = engine.explain(
        request(EncodedImage(png_bytes(rgb_image(size=40))), method("saliency"))
    )
    assert result.explanations[0].map.shape == (1, 16, 16)


def test_truncated_png(engine):
    data = png_bytes(rgb_image(size=32))
    with pytest.raises(InvalidArgument) as info:
        engine.explain(request(EncodedImage(data[: len(data) // 2])))
    assert info.value.field == "image.encoded"


def test_image_byte_limit(store):
    small = Engine.from_model_store(store, EngineLimits(max_image_bytes=100))
    with pytest.raises(ResourceExhausted, match="limit of 100"):
        small.explain(request(EncodedImage(png_bytes(rgb_image()))))


@pytest.mark.parametrize(
    "kwargs,methods,field,error",
    [
        ({"model": "nope"}, (), "model_name", NotFound),
        ({"version": "9"}, (), "model_version", NotFound),
        ({"target": 3}, (), "target", InvalidArgument),
        ({"target": -1}, (), "target", InvalidArgument),
        ({"top_k": 0}, (), "top_k", InvalidArgument),
        ({}, (method("no_such_method"),), "methods[0].method", InvalidArgument),
        ({}, (method("saliency"), method("nope", 1)), "methods[1].method", InvalidArgument),
        (
            {},
            (method("integrated_gradients", steps=0),),
            "methods[0].integrated_gradients.steps",
            InvalidArgument,
        ),
        ({}, (method("occlusion", window=17),), "methods[0].occlusion.window", InvalidArgument),
        (
            {},
            (method("occlusion", window=4, stride=5),),
            "methods[0].occlusion.stride",
            InvalidArgument,
        ),
        (
            {},
            (method("smoothgrad", noise_level=-1.0),),
            "methods[0].smoothgrad.noise_level",
            InvalidArgument,
        ),
        ({}, (method("saliency", steps=3),), "methods[0].saliency.steps", InvalidArgument),
        ({}, tuple(method("saliency", i) for i in range(5)), "methods", ResourceExhausted),
    ],
)
def test_bad_requests(engine, kwargs, methods, field, error):
    base = {"model": "tiny", "image": EncodedImage(png_bytes(rgb_image())), "methods": methods}
    with pytest.raises(error) as info:
        engine.explain(ExplainRequest(**{**base, **kwargs}))
    assert info.value.field == field
    assert field in str(info.value)


def test_forward_pass_budget(store):
    tight = Engine.from_model_store(store, EngineLimits(max_forward_passes=10))
    with pytest.raises(ResourceExhausted, match="forward passes"):
        tight.explain(
            request(EncodedImage(png_bytes(rgb_image())), method("integrated_gradients", steps=32))
        )


def test_cam_method_refused_without_layer(tmp_path):
    write_tiny_model_dir(tmp_path / "nocam", cam_layer="")
    engine = Engine.from_model_store(tmp_path, EngineLimits())
    assert "grad_cam" not in engine.list_models()[0].methods
    with pytest.raises(InvalidArgument, match=r"grad_cam cannot run on model 'tiny'.*cam_layer"):
        engine.explain(request(EncodedImage(png_bytes(rgb_image())), method("grad_cam")))


def test_list_models(engine):
    (info,) = engine.list_models()
    assert (info.name, info.version, info.input_shape) == ("tiny", "1", (3, 16, 16))
    assert info.labels == ("a", "b", "c")
    assert set(info.methods) >= {"saliency", "grad_cam", "occlusion", "integrated_gradients"}


class _Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_weights_are_not_unpickled(tmp_path, capsys):
    directory = write_tiny_model_dir(tmp_path / "evil")
    with open(directory / "weights.pt", "wb") as f:
        pickle.dump({"x": _Payload()}, f)
    with pytest.raises(ModelLoadError):
        load_model_dir(directory)
    assert "pickled code ran" not in capsys.readouterr().out


def test_config_errors_name_the_key(tmp_path):
    directory = write_tiny_model_dir(tmp_path / "broken")
    cfg = yaml.safe_load((directory / "config.yaml").read_text())
    del cfg["labels"]
    (directory / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ModelLoadError, match="labels"):
        load_model_dir(directory)


def test_reliability_and_filter_records(engine):
    from xaiserve.api.types import FilterRequest, ReliabilityRequest

    item = MethodRequest(
        "saliency",
        field="methods[0]",
        reliability=ReliabilityRequest(shuffles=2),
        filter=FilterRequest(forward_budget=600),
    )
    result = engine.explain(request(EncodedImage(png_bytes(rgb_image(seed=4))), item))
    (explanation,) = result.explanations
    record, filtered = explanation.reliability, explanation.filtered
    assert record.apem == pytest.approx(record.eps_plus - record.eps_minus)
    assert record.forward_passes == result.forward_passes["apem"]
    assert filtered.forward_passes == result.forward_passes["apem_filter"] <= 600
    assert filtered.apem_before == pytest.approx(record.apem, rel=0.05)
    kept = filtered.map > 0
    assert np.array_equal(filtered.map[kept], explanation.map[kept])  # original values kept
    assert filtered.kept_fraction == pytest.approx(kept.mean() / (explanation.map > 0).mean())


@pytest.mark.parametrize(
    "options,field",
    [
        ({"eps_max": 0.0}, "methods[0].reliability.eps_max"),
        ({"resolution": 0.9}, "methods[0].reliability.resolution"),
        ({"shuffles": 100}, "methods[0].reliability.shuffles"),
    ],
)
def test_bad_reliability_options(engine, options, field):
    from xaiserve.api.types import ReliabilityRequest

    item = MethodRequest("saliency", field="methods[0]", reliability=ReliabilityRequest(**options))
    with pytest.raises(InvalidArgument) as info:
        engine.explain(request(EncodedImage(png_bytes(rgb_image())), item))
    assert info.value.field == field


def test_filter_budget_too_small(engine):
    from xaiserve.api.types import FilterRequest

    item = MethodRequest("saliency", field="methods[0]", filter=FilterRequest(forward_budget=5))
    with pytest.raises(InvalidArgument) as info:
        engine.explain(request(EncodedImage(png_bytes(rgb_image())), item))
    assert info.value.field == "methods[0].filter.forward_budget"


def test_all_zero_map_is_undefined_not_an_error(engine):
    """A flat image gives a zero Grad-CAM/occlusion map: the record says why."""
    from xaiserve.api.types import ReliabilityRequest

    flat = EncodedImage(png_bytes(np.full((16, 16, 3), 128, np.uint8)))
    item = MethodRequest(
        "occlusion",
        {"window": 4, "stride": 4, "baseline": 128 / 255},
        field="methods[0]",
        params_field="occlusion",
        reliability=ReliabilityRequest(),
    )
    (explanation,) = engine.explain(request(flat, item)).explanations
    assert not explanation.map.any()
    assert "zero everywhere" in explanation.reliability.undefined_reason


def test_auto_ranks_candidates_by_apem(engine):
    item = MethodRequest(
        "auto",
        {"candidates": ["saliency", "grad_cam", "occlusion"]},
        field="methods[1]",
        params_field="auto",
    )
    result = engine.explain(
        request(EncodedImage(png_bytes(rgb_image(seed=2))), method("input_x_gradient"), item)
    )
    names = [e.method for e in result.explanations]
    assert names[0] == "input_x_gradient" and sorted(names[1:]) == [
        "grad_cam",
        "occlusion",
        "saliency",
    ]
    scores = [e.reliability.apem for e in result.explanations[1:]]
    assert scores == sorted(scores, reverse=True)


def test_auto_rejects_bad_candidates(engine):
    item = MethodRequest(
        "auto", {"candidates": ["saliency", "auto"]}, field="methods[0]", params_field="auto"
    )
    with pytest.raises(InvalidArgument) as info:
        engine.explain(request(EncodedImage(png_bytes(rgb_image())), item))
    assert info.value.field == "methods[0].auto.candidates[1]"


def test_one_method_at_several_stages_runs_once(engine):
    steps = {"steps": 8}
    items = [
        MethodRequest(
            "integrated_gradients",
            steps,
            stage,
            field=f"methods[{i}]",
            params_field="integrated_gradients",
        )
        for i, stage in enumerate(("raw", "three_channel", "one_channel"))
    ]
    items.append(
        MethodRequest(
            "integrated_gradients",
            {"steps": 4},
            "raw",
            field="methods[3]",
            params_field="integrated_gradients",
        )
    )
    result = engine.explain(request(EncodedImage(png_bytes(rgb_image())), *items))
    assert [e.forward_passes for e in result.explanations] == [8, 0, 0, 4]
    raw = result.explanations[0].map
    from xaiserve.engine.postprocess import apply_stage

    for i, stage in ((1, "three_channel"), (2, "one_channel")):
        staged = apply_stage(torch.from_numpy(raw)[None], torch.zeros(1, 3, 16, 16), stage)
        np.testing.assert_allclose(result.explanations[i].map, staged[0].numpy(), atol=1e-6)
    three = result.explanations[1].map  # stage 1 keeps the channels, min-max scaled
    assert three.shape == (3, 16, 16) and three.min() == 0.0 and three.max() == 1.0


def test_maps_of_one_request_share_the_apem_work(engine):
    """Two maps with APEM and filter in one request: the records and filtered maps of
    requests asking for each alone, one gradient between them, and filters that start
    from their map's APEM instead of searching the original again."""
    from xaiserve.api.types import FilterRequest, ReliabilityRequest

    image = EncodedImage(png_bytes(rgb_image(seed=4)))

    def item(name: str, i: int) -> MethodRequest:
        return MethodRequest(
            name, field=f"methods[{i}]", reliability=ReliabilityRequest(), filter=FilterRequest()
        )

    alone = [engine.explain(request(image, item(n, 0))) for n in ("saliency", "grad_cam")]
    both = engine.explain(request(image, item("saliency", 0), item("grad_cam", 1)))
    for single, joint in zip(alone, both.explanations, strict=True):
        (expected,) = single.explanations
        assert np.array_equal(joint.map, expected.map)
        assert replace(joint.reliability, forward_passes=0) == replace(
            expected.reliability, forward_passes=0
        )
        assert np.array_equal(joint.filtered.map, expected.filtered.map)
        assert joint.filtered.apem_before == joint.reliability.apem
        assert joint.filtered.forward_passes == expected.filtered.forward_passes
    first, second = both.explanations
    assert first.reliability.forward_passes == alone[0].explanations[0].reliability.forward_passes
    assert second.reliability.forward_passes == (
        alone[1].explanations[0].reliability.forward_passes - 1
    )  # the gradient, shared
    assert both.forward_passes["apem"] == sum(
        e.reliability.forward_passes for e in both.explanations
    )
    assert both.forward_passes["apem_filter"] == sum(  # the filters' own rounds only
        e.filtered.forward_passes for e in both.explanations
    )
    assert set(first.timings) >= {"attribute", "postprocess", "apem", "filter"}
