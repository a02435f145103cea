"""Evaluation of the data-set calibration (seed 003, section III): consistency of the CAMs'
class activation levels with the model's logits (table I, figure 9) and the accuracy of the
model with only the principal features, or only the others, at the CAM layer (table II).

Consistency runs on the engine (the maps a client would get, ``raw`` stage) for every image
and every class as the selected class; accuracies run on the served module with the CAM
layer's features masked.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import numpy as np
import torch
from scipy import stats

from xaiserve.api.types import ExplainRequest, MethodRequest, RawTensor
from xaiserve.engine.engine import Engine
from xaiserve.methods.calibrated.scaled_cam import ScaledCam
from xaiserve.methods.registry import METHODS
from xaiserve.offline.calibrate import scaled_cams
from xaiserve.offline.evaluate import EvalImage
from xaiserve.runtime.calibration import Calibration
from xaiserve.runtime.model import ServedModel

NORMALITY_P = 0.05
"""Both marginals pass D'Agostino-Pearson at this level: Pearson, else Spearman."""


def cam_pairs() -> list[tuple[str, str]]:
    """(original CAM, its S- variant) for every registered S-CAM method (seed table I's
    column pairs; the seed's pixel-wise Grad-CAM is HiResCAM here)."""
    return [(method.cam.name, method.name) for method in scaled_cams().values()]


@dataclass(frozen=True)
class ActivationRow:
    """The class activation level of one map and the logit of its selected class."""

    image: str
    label: int | None
    predicted: int
    target: int
    method: str
    logit: float
    activation: float


def activation_level(attr_map: np.ndarray, common_scale: bool) -> float:
    """The sum of class activation of a map (seed III.B). ``common_scale``: the map is on
    the data set's scale already (S-CAM) and is summed as served; otherwise the classical
    individual scale (x - min) / (max - min) of the map is summed (0 for a constant map)."""
    if common_scale:
        return float(attr_map.sum(dtype=np.float64))
    low, high = float(attr_map.min()), float(attr_map.max())
    if high <= low:
        return 0.0
    return float(((attr_map - low) / (high - low)).sum(dtype=np.float64))


def class_activations(
    engine: Engine,
    model: str,
    images: Iterable[EvalImage],
    methods: Sequence[str],
    progress: Callable[[Iterator[EvalImage]], Iterator[EvalImage]] = lambda it: it,
) -> list[ActivationRow]:
    """One row per image, selected class (every class) and method, from the engine's
    ``raw`` maps. S-CAM methods (``needs_calibration``) are summed on their common scale."""
    served = engine.models[model]
    scaled = {m for m in methods if issubclass(METHODS[m], ScaledCam)}
    requests = tuple(
        MethodRequest(m, stage="raw", field=f"methods[{i}]") for i, m in enumerate(methods)
    )
    rows: list[ActivationRow] = []
    for item in progress(iter(images)):
        raw = RawTensor(tuple(item.image.shape), item.image.astype("<f4").tobytes())
        predicted = None
        for target in range(len(served.config.labels)):
            result = engine.explain(
                ExplainRequest(model=model, image=raw, methods=requests, target=target)
            )
            predicted = result.prediction.top_k[0].index if predicted is None else predicted
            for explanation in result.explanations:
                rows.append(
                    ActivationRow(
                        image=item.name,
                        label=item.label,
                        predicted=predicted,
                        target=target,
                        method=explanation.method,
                        logit=result.prediction.target.logit,
                        activation=activation_level(explanation.map, explanation.method in scaled),
                    )
                )
    return rows


class Correlation(TypedDict):
    """One row of the consistency table: n pairs, both coefficients, the one reported."""

    n: int
    pearson: float
    spearman: float
    test: str
    coefficient: float


def correlation(x: Sequence[float], y: Sequence[float]) -> Correlation:
    """Pearson and Spearman coefficients of finite pairs, and the one the seed would report:
    Pearson when both marginals look normal (D'Agostino-Pearson, p > 0.05, n >= 20; a
    stand-in for a bivariate normality test), Spearman otherwise."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    out: Correlation = {
        "n": len(a),
        "pearson": math.nan,
        "spearman": math.nan,
        "test": "",
        "coefficient": math.nan,
    }
    if len(a) < 3 or a.std() == 0 or b.std() == 0:
        return out
    out["pearson"] = float(stats.pearsonr(a, b).statistic)
    out["spearman"] = float(stats.spearmanr(a, b).statistic)
    normal = len(a) >= 20 and all(stats.normaltest(v).pvalue > NORMALITY_P for v in (a, b))
    out["test"] = "pearson" if normal else "spearman"
    out["coefficient"] = out["pearson"] if normal else out["spearman"]
    return out


def consistency(rows: Sequence[ActivationRow], labels: Sequence[str]) -> list[dict[str, object]]:
    """Correlation of class activation level and logit per method: for each selected class
    over all images, their mean ("mean over classes"), and the predicted class per image."""
    out = []
    for method in sorted({r.method for r in rows}):
        mine = [r for r in rows if r.method == method]
        per_class = []
        for c, label in enumerate(labels):
            group = [r for r in mine if r.target == c]
            stat = correlation([r.activation for r in group], [r.logit for r in group])
            per_class.append(stat)
            out.append({"method": method, "selected": label, **stat})
        out.append(
            {
                "method": method,
                "selected": "mean over classes",
                "n": sum(s["n"] for s in per_class),
                "pearson": float(np.nanmean([s["pearson"] for s in per_class])),
                "spearman": float(np.nanmean([s["spearman"] for s in per_class])),
                "coefficient": float(np.nanmean([s["coefficient"] for s in per_class])),
                "test": "/".join(sorted({s["test"] for s in per_class if s["test"]})),
            }
        )
        group = [r for r in mine if r.target == r.predicted]
        stat = correlation([r.activation for r in group], [r.logit for r in group])
        out.append({"method": method, "selected": "predicted", **stat})
    return out


def table_one(
    consistency_rows: Sequence[dict[str, object]], key: str = "coefficient"
) -> list[dict[str, object]]:
    """Seed table I: one row per selection, a column per CAM and S-CAM, and the average
    increase of the S- variants over their CAMs in percentage points of the coefficient
    (the seed's Ave.Inc.(%): ImageNet's 23.1% is the mean of 0.107, 0.108, 0.603, 0.107)."""
    pairs = cam_pairs()
    by = {(r["method"], r["selected"]): r for r in consistency_rows}
    out = []
    for selected in ("mean over classes", "predicted"):
        row: dict[str, object] = {"selected": selected, "value": key}
        increases = []
        for original, scaled in pairs:
            before = float(by.get((original, selected), {}).get(key, math.nan))  # type: ignore[arg-type]
            after = float(by.get((scaled, selected), {}).get(key, math.nan))  # type: ignore[arg-type]
            row[original], row[scaled] = before, after
            if math.isfinite(before) and math.isfinite(after):
                increases.append((after - before) * 100.0)
        row["ave_inc_percent"] = float(np.mean(increases)) if increases else math.nan
        out.append(row)
    return out


def _masked_logits(served: ServedModel, x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Logits of x (N x C x *spatial) with the CAM layer's features multiplied by each mask
    (M x F): M x N x K. The layers before the CAM layer run once; the batch is expanded
    M-fold after it (the layers after it must treat samples independently)."""
    layer = served.cam_layer
    if layer is None:
        raise ValueError(f"model {served.config.name!r} configures no cam_layer")

    def hook(_module: torch.nn.Module, _inputs: object, out: torch.Tensor) -> torch.Tensor:
        shape = (masks.shape[0], 1, masks.shape[1]) + (1,) * (out.dim() - 2)
        return (out.unsqueeze(0) * masks.view(shape)).reshape(-1, *out.shape[1:])

    handle = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = served.module(x)
    finally:
        handle.remove()
    return logits.view(masks.shape[0], x.shape[0], -1)


def principal_accuracy(
    served: ServedModel,
    images: Iterable[EvalImage],
    calibration: Calibration,
    fractions: Sequence[float],
    batch_size: int = 64,
) -> list[dict[str, object]]:
    """Seed table II: accuracy with all features, with only the principal features and with
    only the others, blocked (zeroed) at the CAM layer during inference.

    The principal features are the union over classes of the top ``fraction`` of each
    importance matrix column (one set, so one inference per image and comparable logits);
    ``features`` says how many that is. Labeled images only. One row per CAM's importance
    matrix and fraction.
    """
    labeled = [item for item in images if item.label is not None]
    if not labeled or not calibration.cams:
        return []
    start = time.perf_counter()
    n_classes = len(served.config.labels)
    configs = []  # (cam, fraction, union mask F)
    for key, cam in calibration.cams.items():
        for fraction in fractions:
            mask = torch.zeros(cam.features)
            for c in range(n_classes):
                mask[torch.from_numpy(cam.principal_features(c, fraction))] = 1.0
            configs.append((key, fraction, mask))
    principal = torch.stack([mask for *_, mask in configs])
    masks = torch.cat([torch.ones(1, principal.shape[1]), principal, 1.0 - principal])
    correct = torch.zeros(masks.shape[0])
    for s in range(0, len(labeled), batch_size):
        part = labeled[s : s + batch_size]
        x = torch.from_numpy(np.stack([item.image for item in part]))
        y = torch.tensor([int(item.label) for item in part])  # type: ignore[arg-type]
        logits = _masked_logits(served, x, masks)  # M x N x K
        correct += (logits.argmax(dim=2) == y).sum(dim=1)
    accuracy = (correct / len(labeled)).tolist()
    seconds = time.perf_counter() - start
    return [
        {
            "cam": key,
            "fraction": fraction,
            "features": int(mask.sum()),
            "of_features": int(mask.numel()),
            "images": len(labeled),
            "acc_all": accuracy[0],
            "acc_principal": accuracy[1 + i],
            "acc_non_principal": accuracy[1 + len(configs) + i],
            "seconds": seconds,
        }
        for i, (key, fraction, mask) in enumerate(configs)
    ]


def scatter_plot(path: Path, rows: Sequence[ActivationRow], labels: Sequence[str]) -> None:
    """Seed figure 9: sum of class activation (vertical) against the logit (horizontal),
    one panel per method, coloured by selected class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for pair in cam_pairs() for m in pair if any(r.method == m for r in rows)]
    if not methods:
        return
    cols = 2
    fig, axes = plt.subplots(
        math.ceil(len(methods) / cols),
        cols,
        figsize=(8, 3 * math.ceil(len(methods) / cols)),
        squeeze=False,
    )
    for ax, method in zip(axes.flat, methods, strict=False):
        for c, label in enumerate(labels):
            group = [r for r in rows if r.method == method and r.target == c]
            ax.scatter([r.logit for r in group], [r.activation for r in group], s=4, label=label)
        ax.set_title(method, fontsize=9)
        ax.tick_params(labelsize=7)
    axes.flat[0].legend(fontsize=7, markerscale=2)
    for ax in list(axes.flat)[len(methods) :]:
        ax.axis("off")
    fig.supxlabel("logit of the selected class")
    fig.supylabel("sum of class activation")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
