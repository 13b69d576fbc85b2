"""The metrics stay bounded and conventional, and the Grafana dashboard in deploy/ uses
only names the code exports (and every campaign_* metric the code exports)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from prometheus_client.metrics import MetricWrapperBase

from campaign import metrics

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana" / "campaign.json"

# PromQL functions and keywords with an underscore (anything else with one is a metric).
PROMQL = {"histogram_quantile", "label_values", "label_replace", "count_values"}


def _metric_objects() -> dict[str, MetricWrapperBase]:
    return {
        name: value for name, value in vars(metrics).items() if isinstance(value, MetricWrapperBase)
    }


def _exprs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [v for k, v in node.items() if k in ("expr", "query") and isinstance(v, str)]
        return found + [e for v in node.values() for e in _exprs(v)]
    if isinstance(node, list):
        return [e for v in node for e in _exprs(v)]
    return []


def _metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: label matchers, ranges and strings removed."""
    bare = re.sub(r'"[^"]*"', "", expr)
    bare = re.sub(r"\{[^}]*\}|\[[^]]*\]", "", bare)
    bare = re.sub(r"\b(by|without)\s*\([^)]*\)", "", bare)
    words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", bare))
    return {w for w in words if "_" in w and w not in PROMQL}


def test_no_metric_has_an_unbounded_label() -> None:
    for name, metric in _metric_objects().items():
        labels = set(metric._labelnames)
        assert "campaign_id" not in labels, name
        assert labels <= {"service", "outcome", "result", "status", "role", "by"}, (name, labels)


def test_reports_and_incoming_messages_are_counted_apart() -> None:
    assert metrics.REPORTS._labelnames == ("result",)
    assert metrics.INCOMING._labelnames == ("result",)
    names = metrics.names()
    assert {"campaign_reports_total", "campaign_incoming_messages_total"} <= names


def test_final_statuses_delay_histogram_and_process_collectors_are_exported() -> None:
    names = metrics.names()
    assert metrics.FINAL_STATUSES._labelnames == ("status",)
    assert "campaign_recipients_final_total" in names
    assert "campaign_report_delay_seconds_bucket" in names
    # The process and platform collectors, registered on our registry.
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes", "python_info"} <= names
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    assert b"python_info{" in body


def test_count_final_adds_by_status() -> None:
    before = metrics.FINAL_STATUSES.labels("delivered")._value.get()
    metrics.count_final({"delivered": 3, "failed": 0})
    assert metrics.FINAL_STATUSES.labels("delivered")._value.get() == before + 3


def test_metric_names_follow_prometheus_conventions() -> None:
    for metric in _metric_objects().values():
        name = metric._name
        assert re.fullmatch(r"campaign_[a-z_]+", name), name
        if metric._type == "counter":
            # prometheus_client adds _total to a counter's samples.
            assert not name.endswith("_total"), name
        if metric._type in ("histogram",) or "duration" in name or "delay" in name:
            assert name.endswith("_seconds"), name


def test_the_grafana_dashboard_uses_only_exported_metrics() -> None:
    dashboard = json.loads(GRAFANA.read_text(encoding="utf-8"))
    exprs = _exprs(dashboard["panels"]) + _exprs(dashboard["templating"])
    assert exprs, "no queries found in the dashboard"
    used = set().union(*(_metric_names(e) for e in exprs))
    exported = metrics.names()
    assert used, exprs
    assert not used - exported, f"not exported by campaign/metrics.py: {sorted(used - exported)}"
    assert not any("campaign_id" in e for e in exprs)
    # Every campaign metric has a panel: a new metric is shown, or the test says so.
    families = {m._name for m in _metric_objects().values()}
    shown = {f for f in families if any(u.startswith(f) for u in used)}
    assert shown == families, f"no panel uses {sorted(families - shown)}"


def test_metric_name_extraction() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (le, service) "
        '(rate(campaign_request_duration_seconds_bucket{service=~"$service"}[5m])))'
    )
    assert _metric_names(expr) == {"campaign_request_duration_seconds_bucket"}
