"""Writes evaluation tables as CSV and the seed's plots as PNG (matplotlib, Agg backend)."""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np

from xaiserve.offline import stats, tables
from xaiserve.offline.evaluate import MapRow


def read_rows(path: Path) -> list[MapRow]:
    """The per-map rows of a ``maps.csv`` written by ``write_report`` (to merge shards);
    columns an older ``maps.csv`` lacks take MapRow's defaults (NaN)."""
    types = {f.name: f.type for f in fields(MapRow)}

    def parse(name: str, text: str) -> Any:  # the type of MapRow's field ``name``
        kind = str(types[name])
        if text == "" or text == "None":
            return None if "None" in kind else ("" if kind == "str" else math.nan)
        if kind.startswith("bool"):
            return text == "True"
        if kind.startswith("int"):
            return int(text)
        if kind.startswith("float"):
            return float(text)
        return text

    with path.open(newline="") as f:
        return [
            MapRow(**{k: parse(k, v) for k, v in row.items() if k in types})
            for row in csv.DictReader(f)
        ]


def write_csv(path: Path, rows: Sequence[dict[str, object]]) -> None:
    """One CSV with a header from the first row's keys (floats with 6 significant digits)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        if not rows:
            return
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


EPS_UNIT = "L1 size of the perturbation (pixel values in [0, 1])"


def _boxplots(path: Path, rows: Sequence[MapRow], stage: str) -> None:
    """Figure 4.2 / 4.7: eps_minus, eps_plus and APEM per method at one stage, over the
    usable maps, outliers drawn; eps on log axes, APEM on a symmetric-log axis (it spans
    decades and can be negative). Each method's label gives its usable and censored
    counts."""
    plt = _pyplot()
    data: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    censored: dict[str, int] = defaultdict(int)
    for r in rows:
        if r.stage != stage or r.undefined_reason:
            continue
        censored[r.method] += r.censored
        data[r.method]["n"].append(0.0)
        if r.usable:
            for key in ("eps_minus", "eps_plus", "apem"):
                data[r.method][key].append(getattr(r, key))
    methods = sorted(data)
    if not methods:
        return
    labels = [f"{m} (n={len(data[m]['apem'])}, cens. {censored[m]})" for m in methods]
    fig, axes = plt.subplots(3, 1, figsize=(max(6.0, 0.45 * len(methods) + 2.5), 11), sharex=True)
    titles = {
        "eps_minus": "eps_minus (relevance; lower is better), log axis",
        "eps_plus": "eps_plus (irrelevance; higher is better), log axis",
        "apem": "APEM = eps_plus - eps_minus (higher is better), symmetric log axis",
    }
    magnitudes = np.abs([v for m in methods for v in data[m]["apem"] if v != 0])
    linthresh = float(np.percentile(magnitudes, 10)) if magnitudes.size else 1.0
    for ax, key in zip(axes, ("eps_minus", "eps_plus", "apem"), strict=True):
        ax.boxplot(
            [data[m][key] or [np.nan] for m in methods],
            showfliers=True,
            flierprops={"marker": ".", "markersize": 3, "alpha": 0.6},
        )
        if key == "apem":  # spans decades and can be negative
            ax.set_yscale("symlog", linthresh=linthresh)
        elif any(data[m][key] for m in methods):
            ax.set_yscale("log")
        ax.set_ylabel(EPS_UNIT, fontsize=7)
        ax.set_title(titles[key], fontsize=9)
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[-1].set_xticks(range(1, len(methods) + 1), labels, rotation=60, ha="right", fontsize=7)
    fig.suptitle(f"APEM by method, stage {stage} (uncensored maps; whiskers 1.5 IQR)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pairwise_plot(path: Path, pairs: Sequence[tables.Row], stage: str) -> None:
    """Figure 4.4 as a heatmap that stays legible for many methods: cell (row a, column
    b) is the matched-pairs rank-biserial effect of a's APEM over b's (+1: a higher on
    every image), marked * where Holm-adjusted Wilcoxon p < 0.01; the win/tie/loss
    fractions are in the CSV."""
    plt = _pyplot()
    if not pairs:
        return
    methods = sorted({str(p["method"]) for p in pairs} | {str(p["versus"]) for p in pairs})
    index = {m: i for i, m in enumerate(methods)}
    effect = np.full((len(methods), len(methods)), np.nan)
    marks = [["" for _ in methods] for _ in methods]
    for p in pairs:
        i, j = index[str(p["method"])], index[str(p["versus"])]
        effect[i, j] = float(p["effect"])
        significant = float(p["wilcoxon_p_holm"]) < 0.01
        value = f"{effect[i, j]:+.2f}" if len(methods) <= 12 else ""
        marks[i][j] = value + ("*" if significant else "")
    size = max(5.0, 0.38 * len(methods) + 3.0)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(effect, cmap="RdBu", vmin=-1, vmax=1)
    ax.set_xticks(range(len(methods)), methods, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(methods)), methods, fontsize=7)
    font = 7 if len(methods) <= 12 else 6
    for i, row in enumerate(marks):
        for j, text in enumerate(row):
            if text:
                ax.text(j, i, text, ha="center", va="center", fontsize=font)
    fig.colorbar(image, ax=ax, label="rank-biserial effect, row over column")
    ax.set_xlabel("versus")
    ax.set_ylabel("method")
    ax.set_title(
        f"Pairwise APEM, stage {stage}: Wilcoxon signed-rank on shared uncensored images "
        "(* Holm p < 0.01)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    out: Path, rows: Sequence[MapRow], boot: stats.Bootstrap = tables.DEFAULT_BOOTSTRAP
) -> dict[str, Path]:
    """All tables and plots under ``out``; returns name -> path of what was written."""
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    per_map = [asdict(r) for r in rows]
    stages = sorted({r.stage for r in rows}, key=tables.stage_order)
    csvs: dict[str, list[dict[str, object]]] = {
        "maps": per_map,
        "summary": tables.summary(rows, boot),
        "stage_tests": tables.stage_tests(rows),
        "shuffled_apem_norm": tables.shuffled_norm(rows, boot),
        "correct_vs_misclassified": tables.correct_vs_misclassified(rows, boot),
        "loss_correlation": tables.loss_correlation(rows),
    }
    for stage in stages:
        csvs[f"ranking_{stage}"] = tables.ranking(rows, stage, boot)
        csvs[f"pairwise_{stage}"] = tables.pairwise(rows, stage)
    for name, table in csvs.items():
        written[name] = out / f"{name}.csv"
        write_csv(written[name], table)
    for stage in stages:
        written[f"boxplot_{stage}"] = out / f"boxplot_{stage}.png"
        _boxplots(written[f"boxplot_{stage}"], rows, stage)
        written[f"pairwise_plot_{stage}"] = out / f"pairwise_{stage}.png"
        _pairwise_plot(written[f"pairwise_plot_{stage}"], csvs[f"pairwise_{stage}"], stage)
    return written


def format_table(rows: Sequence[dict[str, object]], columns: Sequence[str]) -> str:
    """A plain-text table of ``columns`` for terminal output."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return "nan" if math.isnan(value) else f"{value:.4g}"
        return str(value)

    body = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [
        max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(columns)
    ]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join(lines)
