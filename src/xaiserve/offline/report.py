"""Writes evaluation tables as CSV and the seed's plots as PNG (matplotlib, Agg backend)."""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from xaiserve.offline import tables
from xaiserve.offline.evaluate import MapRow


def read_rows(path: Path) -> list[MapRow]:
    """The per-map rows of a ``maps.csv`` written by ``write_report`` (to merge shards)."""
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
        return [MapRow(**{k: parse(k, v) for k, v in row.items()}) for row in csv.DictReader(f)]


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


def _boxplots(path: Path, rows: Sequence[MapRow], stage: str) -> None:
    """Figure 4.2 / 4.7: eps_minus, eps_plus and APEM per method at one stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.stage == stage and not r.undefined_reason:
            for key in ("eps_minus", "eps_plus", "apem"):
                data[r.method][key].append(getattr(r, key))
    methods = sorted(data)
    if not methods:
        return
    fig, axes = plt.subplots(1, 3, figsize=(4 + 1.2 * len(methods), 4.5))
    for ax, key in zip(axes, ("eps_minus", "eps_plus", "apem"), strict=True):
        ax.boxplot([data[m][key] for m in methods], showfliers=False)
        ax.set_xticks(range(1, len(methods) + 1), methods, rotation=60, ha="right", fontsize=8)
        ax.set_title(key)
    fig.suptitle(f"APEM by method, stage {stage}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pairwise_plot(path: Path, pairs: Sequence[tables.Row], stage: str) -> None:
    """Figure 4.4: win/tie/loss fractions as stacked bars per pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not pairs:
        return
    labels = [f"{p['method']} vs {p['versus']}" for p in pairs]
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(pairs) + 1.5))
    left = [0.0] * len(pairs)
    for key, colour in (("win", "#2a9d8f"), ("tie", "#bbbbbb"), ("loss", "#e76f51")):
        values = [float(p[key]) for p in pairs]
        ax.barh(labels, values, left=left, color=colour, label=key)
        left = [a + b for a, b in zip(left, values, strict=True)]
    ax.set_xlim(0, 1)
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(loc="lower right")
    ax.set_title(f"Pairwise APEM comparison, stage {stage}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, rows: Sequence[MapRow]) -> dict[str, Path]:
    """All tables and plots under ``out``; returns name -> path of what was written."""
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    names = [f.name for f in fields(MapRow)]
    per_map = [{k: v for k, v in asdict(r).items() if k in names} for r in rows]
    stages = sorted({r.stage for r in rows})
    csvs: dict[str, list[dict[str, object]]] = {
        "maps": per_map,
        "summary": tables.summary(rows),
        "shuffled_apem_norm": tables.shuffled_norm(rows),
        "correct_vs_misclassified": tables.correct_vs_misclassified(rows),
        "loss_correlation": tables.loss_correlation(rows),
    }
    for stage in stages:
        csvs[f"ranking_{stage}"] = tables.ranking(rows, stage)
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
