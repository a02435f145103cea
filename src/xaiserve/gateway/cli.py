"""``xaiserve``: the command-line client.

    xaiserve explain cat.png --model demo --methods saliency,grad_cam,occlusion --out maps/
    xaiserve models

The client's commands (``explain``, ``models``): for each, a function that adds its
arguments and one that runs it; :mod:`xaiserve.cli` puts them under the ``xaiserve`` command.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from xaiserve.api import catalog
from xaiserve.api.catalog import METHODS
from xaiserve.api.v1 import explain_pb2 as pb
from xaiserve.gateway.client import (
    STAGES,
    ClientSetupError,
    add_server_options,
    connect,
    map_to_array,
)

#: Short names the command line accepts besides the registry names.
METHOD_ALIASES: dict[str, str] = {"gradcam": "grad_cam", "ig": "integrated_gradients"}


# ------------------------------------------------------------------------------ parsing


def method_name(text: str) -> str:
    """A registry method name from a command-line spelling (``gradcam``, ``Grad-CAM``, ``ig``)."""
    name = text.strip().lower().replace("-", "_")
    name = METHOD_ALIASES.get(name, name)
    if name not in METHODS:
        valid = ", ".join([*METHODS, *METHOD_ALIASES])
        raise argparse.ArgumentTypeError(f"unknown method {text!r}; choose from {valid}")
    return name


def method_list(text: str) -> list[str]:
    """``"saliency,gradcam"`` -> ``["saliency", "grad_cam"]`` (repeats dropped, order kept)."""
    names = [method_name(part) for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one method")
    return list(dict.fromkeys(names))


ParamValue = int | float | bool | str | list[Any]


def _scalar(text: str) -> int | float | bool | str:
    """``"16"`` -> 16, ``"0.5"`` -> 0.5, ``"true"`` -> True; anything else stays a string
    (enum names such as ``alpha_beta``)."""
    text = text.strip()
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def param_setting(text: str) -> tuple[str, tuple[str, ...], ParamValue]:
    """``"occlusion.adaptive.enabled=true"`` -> ``("occlusion", ("adaptive", "enabled"), True)``.

    A value with commas is a list: ``auto.candidates=saliency,grad_cam``.
    """
    key, sep, value = text.partition("=")
    method, *path = [part.strip() for part in key.split(".")]
    if not (sep and path and all(path)):
        raise argparse.ArgumentTypeError(f"expected METHOD.FIELD=VALUE, got {text!r}")
    parsed: ParamValue = (
        [_scalar(v) for v in value.split(",") if v.strip()] if "," in value else _scalar(value)
    )
    return method_name(method), tuple(path), parsed


# ------------------------------------------------------------------------------ explain


def configure_explain(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="PNG, JPEG or WebP file(s)")
    parser.add_argument("--model", default="demo", help="served model name (demo)")
    parser.add_argument(
        "--methods",
        type=method_list,
        default=["saliency"],
        metavar="M1,M2",
        help=f"comma-separated methods: {', '.join(METHODS)} (aliases: gradcam, ig); "
        "default saliency",
    )
    parser.add_argument("--out", type=Path, default=Path("explanations"), help="output folder")
    parser.add_argument("--target", type=int, help="class index to explain (default: predicted)")
    parser.add_argument("--stage", choices=list(STAGES), default="one_channel", help="map stage")
    parser.add_argument("--top-k", type=int, metavar="K", help="classes in the prediction")
    parser.add_argument(
        "--param",
        type=param_setting,
        action="append",
        default=[],
        metavar="METHOD.FIELD=VALUE",
        help="a method parameter by proto field name, e.g. occlusion.window=16, "
        "occlusion.adaptive.enabled=true, lrp.rule=alpha_beta, "
        "auto.candidates=saliency,grad_cam (repeatable)",
    )
    parser.add_argument("--reliability", action="store_true", help="APEM record of each map")
    parser.add_argument(
        "--filter",
        nargs="?",
        const="fast",
        choices=["fast", "exact"],
        help="also return APEM-filtered maps (mode fast unless given)",
    )
    add_server_options(parser)


def _fields(message: Any) -> dict[str, Any]:
    """Scalar fields of a message as a dict (unset optional fields left out)."""
    return {
        f.name: getattr(message, f.name)
        for f in message.DESCRIPTOR.fields
        if not f.has_presence or message.HasField(f.name)
    }


def _write_map(attribution: pb.AttributionMap, base: Path) -> list[str]:
    """Writes ``base.png`` (overlay) and ``base.npy`` (float32 map) when present."""
    written = []
    if attribution.png_overlay:
        path = base.with_name(base.name + ".png")
        path.write_bytes(attribution.png_overlay)
        written.append(str(path))
    if attribution.data:
        path = base.with_name(base.name + ".npy")
        np.save(path, map_to_array(attribution))
        written.append(str(path))
    return written


def write_outputs(image: Path, response: pb.ExplainResponse, out: Path) -> dict[str, Any]:
    """Writes ``out/<stem>_<method>.{png,npy}`` (and ``_filtered`` ones) and
    ``out/<stem>.json``; returns the JSON summary."""
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "image": str(image),
        "model": response.model_name,
        "version": response.model_version,
        "prediction": {
            "top_k": [_fields(s) for s in response.prediction.top_k],
            "target": _fields(response.prediction.target),
        },
        "timings": {t.stage: t.seconds for t in response.timings},
        "explanations": [],
        "files": [],
    }
    used: set[str] = set()
    for explanation in response.explanations:
        method = catalog.method_name(explanation.method)
        base = f"{image.stem}_{method}"
        for k in range(2, len(response.explanations) + 2):
            if base not in used:
                break
            base = f"{image.stem}_{method}_{k}"  # a method answered twice (AUTO's candidates)
        used.add(base)
        entry: dict[str, Any] = {
            "method": method,
            "stage": pb.MapStage.Name(explanation.stage).lower(),
            "shape": list(explanation.map.shape),
            "forward_passes": explanation.forward_passes,
            "timings": {t.stage: t.seconds for t in explanation.timings},
            "files": _write_map(explanation.map, out / base),
        }
        if explanation.HasField("reliability"):
            entry["reliability"] = _fields(explanation.reliability)
        if explanation.HasField("filtered"):
            filtered = explanation.filtered
            entry["filtered"] = {
                "kept_fraction": filtered.kept_fraction,
                "apem_before": filtered.apem_before,
                "apem_after": filtered.apem_after,
                "forward_passes": filtered.forward_passes,
            }
            entry["files"] += _write_map(filtered.map, out / f"{base}_filtered")
        summary["explanations"].append(entry)
        summary["files"] += entry["files"]
    json_path = out / f"{image.stem}.json"
    summary["files"].append(str(json_path))
    json_path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _print_summary(summary: dict[str, Any]) -> None:
    target = summary["prediction"]["target"]
    top = summary["prediction"]["top_k"][0] if summary["prediction"]["top_k"] else target
    print(
        f"{summary['image']}: {summary['model']} predicts {top['label']!r} "
        f"(p={top['probability']:.3f}); explaining class {target['index']} {target['label']!r}"
    )
    for entry in summary["explanations"]:
        shape = "x".join(str(d) for d in entry["shape"])
        seconds = sum(entry["timings"].values())
        line = (
            f"  {entry['method']:<22} {shape:<12} {entry['forward_passes']:>7} passes "
            f"{seconds:8.3f} s"
        )
        if "reliability" in entry:
            line += f"  APEM {entry['reliability']['apem']:.4g}"
        if "filtered" in entry:
            line += f"  kept {entry['filtered']['kept_fraction']:.1%}"
        print(line)
    print(f"  wrote {len(summary['files'])} files, summary in {summary['files'][-1]}")


def run_explain(args: argparse.Namespace) -> int:
    """Explains each image and writes its maps and summary."""
    params: dict[str, dict[str, Any]] = {}
    for method, path, value in args.param:
        if method not in args.methods:
            print(f"xaiserve: --param {method}: {method} is not in --methods", file=sys.stderr)
            return 2
        node = params.setdefault(method, {})
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    try:
        client = connect(args)
    except ClientSetupError as error:
        print(f"xaiserve: {error}", file=sys.stderr)
        return 2
    with client:
        for image in args.images:
            path = Path(image)
            try:
                data = path.read_bytes()
            except OSError as error:
                print(f"xaiserve: {path}: {error.strerror or error}", file=sys.stderr)
                return 2
            try:
                response = client.explain(
                    data,
                    model=args.model,
                    methods=args.methods,
                    target=args.target,
                    top_k=args.top_k,
                    stage=args.stage,
                    png=True,
                    params=params,
                    reliability=args.reliability,
                    filter={"mode": args.filter} if args.filter else False,
                )
            except (ValueError, TypeError) as error:
                print(f"xaiserve: {error}", file=sys.stderr)
                return 2
            except grpc.RpcError as error:
                return _rpc_failed(args.server, error)
            _print_summary(write_outputs(path, response, args.out))
    return 0


# ------------------------------------------------------------------------------- models


def configure_models(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the models as JSON")
    add_server_options(parser)


def run_models(args: argparse.Namespace) -> int:
    """Prints what the server serves."""
    try:
        client = connect(args)
    except ClientSetupError as error:
        print(f"xaiserve: {error}", file=sys.stderr)
        return 2
    with client:
        try:
            response = client.list_models()
        except grpc.RpcError as error:
            return _rpc_failed(args.server, error)
    models = [
        {
            "name": m.name,
            "version": m.version,
            "input_shape": list(m.input_shape),
            "labels": list(m.labels),
            "methods": [catalog.method_name(v) for v in m.methods],
            "cam_layer": m.cam_layer,
            "forward_backend": m.forward_backend,
            "onnx_providers": list(m.onnx_providers),
            "onnx_status": m.onnx_status,
            "calibrated": m.calibrated,
            "gad_class_pairs": list(m.gad_class_pairs),
            "unsupported_methods": list(m.unsupported_methods),
            "status": "failed" if m.status == pb.MODEL_FAILED else "available",
            "status_reason": m.status_reason,
            "device": m.device,
        }
        for m in response.models
    ]
    if args.json:
        print(json.dumps(models, indent=2))
        return 0
    if not models:
        print(f"{args.server} serves no models")
    for m in models:
        labels = ", ".join(m["labels"][:10]) + (", ..." if len(m["labels"]) > 10 else "")
        print(f"{m['name']} (version {m['version'] or '-'})")
        if m["status"] == "failed":
            print(f"  FAILED to load: {m['status_reason']}")
            continue
        print(f"  input      {'x'.join(str(d) for d in m['input_shape'])}")
        print(f"  labels     {len(m['labels'])}: {labels}")
        print(f"  methods    {', '.join(m['methods'])}")
        print(f"  cam layer  {m['cam_layer'] or '-'}")
        print(f"  device     {m['device'] or '-'}")
        print(f"  forward    {_forward_line(m)}")
        print(f"  calibrated {'yes' if m['calibrated'] else 'no (xaiserve calibrate)'}")
        print(f"  GAD pairs  {'; '.join(m['gad_class_pairs']) or '-'}")
        for reason in m["unsupported_methods"]:
            print(f"  not served {reason}")
    return 0


def _forward_line(model: dict[str, Any]) -> str:
    """How the model's forward-only batches run, for ``xaiserve models``."""
    if model["onnx_providers"] and model["forward_backend"] == "onnxruntime":
        return f"onnxruntime on {', '.join(model['onnx_providers'])}"
    if model["onnx_status"]:
        return f"{model['forward_backend']} (no ONNX Runtime: {model['onnx_status']})"
    return model["forward_backend"]


# --------------------------------------------------------------------------------- main


def _rpc_failed(server: str, error: grpc.RpcError) -> int:
    code = error.code() if isinstance(error, grpc.Call) else None
    details = error.details() if isinstance(error, grpc.Call) else str(error)
    print(f"xaiserve: {server}: {code.name if code else 'error'}: {details}", file=sys.stderr)
    return 1
