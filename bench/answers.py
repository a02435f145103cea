"""Answers against a single-call reference, for the benchmarks that load a server
(``soak.py``, ``concurrency.py``): what differs, field by field."""

from __future__ import annotations

import math

import numpy as np

from xaiserve.api.v1 import explain_pb2 as pb


def _map_difference(a: pb.AttributionMap, b: pb.AttributionMap, tolerance: float) -> str:
    if list(a.shape) != list(b.shape) or len(a.data) != len(b.data):
        return f"shape {list(a.shape)} != {list(b.shape)}"
    x = np.frombuffer(a.data, "<f4").astype(np.float64)
    y = np.frombuffer(b.data, "<f4").astype(np.float64)
    gap = np.abs(x - y)
    if np.all(gap <= tolerance + tolerance * np.abs(y)):
        return ""
    return f"max |diff| {np.nanmax(gap):.3g}"


def _close(a: float, b: float, tolerance: float) -> bool:
    both_nan = math.isnan(a) and math.isnan(b)
    return both_nan or math.isclose(a, b, rel_tol=tolerance, abs_tol=tolerance)


def differences(answer: pb.ExplainResponse, ref: pb.ExplainResponse, tolerance: float) -> list[str]:
    """How ``answer`` differs from ``ref``: class indices exactly; maps, probabilities and
    reliability numbers within ``tolerance`` absolute plus relative."""
    out = []
    if answer.prediction.target.index != ref.prediction.target.index:
        got, want = answer.prediction.target.index, ref.prediction.target.index
        out.append(f"prediction.target {got} != {want}")
    if [s.index for s in answer.prediction.top_k] != [s.index for s in ref.prediction.top_k]:
        out.append("prediction.top_k classes")
    elif not all(
        _close(a.probability, b.probability, tolerance)
        for a, b in zip(answer.prediction.top_k, ref.prediction.top_k, strict=True)
    ):
        out.append("prediction.top_k probabilities")
    if [e.method for e in answer.explanations] != [e.method for e in ref.explanations]:
        return [*out, "explanations (methods)"]
    for i, (a, b) in enumerate(zip(answer.explanations, ref.explanations, strict=True)):
        where = f"explanations[{i}]"
        if gap := _map_difference(a.map, b.map, tolerance):
            out.append(f"{where}.map {gap}")
        if a.HasField("reliability") != b.HasField("reliability"):
            out.append(f"{where}.reliability present in one only")
        elif a.HasField("reliability"):
            for name in ("eps_minus", "eps_plus", "apem", "apem_norm"):
                x, y = getattr(a.reliability, name), getattr(b.reliability, name)
                if not _close(x, y, tolerance):
                    out.append(f"{where}.reliability.{name} {x:.6g} != {y:.6g}")
        if a.HasField("filtered") != b.HasField("filtered"):
            out.append(f"{where}.filtered present in one only")
        elif a.HasField("filtered"):
            if gap := _map_difference(a.filtered.map, b.filtered.map, tolerance):
                out.append(f"{where}.filtered.map {gap}")
            x, y = a.filtered.kept_fraction, b.filtered.kept_fraction
            if not _close(x, y, tolerance):
                out.append(f"{where}.filtered.kept_fraction {x:.6g} != {y:.6g}")
    return out
