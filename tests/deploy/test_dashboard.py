"""The Grafana dashboard queries only metrics that really exist: the gateway's (from a real
scrape) and TorchServe's documented ones (``service.metrics.TORCHSERVE_METRICS``)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from support.gateway import running_gateway
from xaiserve.api.types import (
    ClassScore,
    ExplainResult,
    Explanation,
    Prediction,
    ReliabilityRecord,
)
from xaiserve.gateway.metrics import PREFIX, TORCHSERVE_METRICS, Metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "xaiserve.json"

# PromQL words that are not metric names (aggregation modifiers, set and binary operators).
_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "and",
    "or",
    "unless",
    "atan2",
    "inf",
    "nan",
}
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.$])[A-Za-z_:][\w:]*")


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (strings, matchers, ranges, label lists and
    function names removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _LABEL_LIST.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation
        if match.group(0).lower() not in _KEYWORDS:
            names.add(match.group(0))
    return names


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (code) (rate(a_total{model=~"$model"}[$__rate_interval]))', {"a_total"}),
        ("histogram_quantile(0.95, sum by (le, m) (rate(h_bucket[5m])))", {"h_bucket"}),
        ('sum(rate(x[1m])) / clamp_min(sum(rate(y{c="OK"}[1m])), 1e-9) / 1e6', {"x", "y"}),
        ("avg by (DeviceId) (GPUUtilization)", {"GPUUtilization"}),
        ("a and on (k) b unless c offset 5m", {"a", "b", "c"}),
    ],
)
def test_metric_names_parser(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and variable queries."""
    exprs = [t["expr"] for p in _panels(dashboard["panels"]) for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = (
            variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        )
        match = re.fullmatch(r"label_values\((.+),\s*\w+\)", query.strip())
        assert match, query
        exprs.append(match.group(1))
    return exprs


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Sample names a real gateway exports (families without samples yet included)."""
    with running_gateway(tmp_path_factory.mktemp("models")) as gateway:
        text = gateway.scrape()
    names = set()
    for family in text_string_to_metric_families(text):
        names.update(s.name for s in family.samples)
        if family.type == "histogram":
            names.update({family.name + "_bucket", family.name + "_count"})
        elif family.type == "counter":
            names.add(family.name + "_total")
        else:
            names.add(family.name)
    return names


def test_every_query_names_an_exported_metric(exported: set[str]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    used = set().union(*(metric_names(e) for e in dashboard_queries(dashboard)))
    unknown = used - exported - set(TORCHSERVE_METRICS)
    assert not unknown, f"dashboard queries metrics nobody exports: {sorted(unknown)}"
    # the parse is not vacuous: the panels the issue asks for are there
    assert {
        "xaiserve_request_duration_seconds_bucket",
        "xaiserve_request_errors_total",
        "xaiserve_requests_in_flight",
        "xaiserve_forward_passes_total",
        "xaiserve_apem_score_bucket",
        "ts_queue_latency_microseconds",
    } <= used


def test_dashboard_shape() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = list(_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] and dashboard["title"]
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        position = panel["gridPos"]
        assert position["x"] + position["w"] <= 24, panel["title"]
    exprs = "\n".join(dashboard_queries(dashboard))
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (le, method)" in exprs
    heatmaps = [p for p in panels if p["type"] == "heatmap"]
    assert any("xaiserve_apem_score_bucket" in t["expr"] for p in heatmaps for t in p["targets"])


_SELECTOR = re.compile(r"\b(" + PREFIX + r"\w+?)(?:_bucket|_count|_sum|_total)?\{([^}]*)\}")
_MATCHER = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")


def _gateway_labels() -> dict[str, set[str]]:
    """Label names of each gateway metric, by metric name (histograms also have ``le``):
    those of the samples one failed and one answered call with a scored map record."""
    score = ClassScore(0, "a", 0.9, 2.0)
    record = ReliabilityRecord(1.0, 3.0, 2.0, 0.01, False, False, 9, apem_norm=0.5)
    one = np.zeros((1, 2, 2), np.float32)
    explanation = Explanation("saliency", "one_channel", one, 1, {"attribute": 0.1}, None, record)
    result = ExplainResult(
        "demo", "1", Prediction((score,), score), (explanation,), {"decode": 0.1}, {"predict": 1}
    )
    metrics = Metrics(CollectorRegistry())
    metrics.observe_explain("demo", ["saliency"], "INTERNAL", 0.2, result, 0.1)
    labels: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            labels.setdefault(family.name, set()).update(sample.labels)
    return labels


def test_every_label_a_query_uses_is_one_the_gateway_sets() -> None:
    """A query on a label the gateway dropped (``method_set``) would draw an empty panel."""
    labels = _gateway_labels()
    assert labels[PREFIX + "request_duration_seconds"] == {"model", "code", "le"}
    dashboard = json.loads(DASHBOARD.read_text())
    checked = 0
    for expr in dashboard_queries(dashboard):
        selected = {m.group(1) for m in _SELECTOR.finditer(expr)}
        for match in _SELECTOR.finditer(expr):
            used = set(_MATCHER.findall(match.group(2)))
            assert used <= labels[match.group(1)], (expr, used - labels[match.group(1)])
            checked += 1
        if len(selected) == 1:  # grouping labels belong to the one metric selected
            (name,) = selected
            for group in re.findall(r"\bby\s*\(([^)]*)\)", expr):
                used = {g.strip() for g in group.split(",") if g.strip()}
                assert used <= labels[name], (expr, used - labels[name])
    assert checked > 10
