"""deploy/grafana/inspectd-dashboard.json: structure Grafana needs, a `line` variable every query
honours, the views the issue asks for, and only metrics the daemon exports. (Whether each query
parses and returns data against a real Prometheus: test_prometheus_live.py.)"""

from __future__ import annotations

import re

from tests.deploy.deployfiles import (PROPOSED_METRICS, dashboard_queries, exported_metric_names,
                                      iter_panels, load_dashboard, metric_names, substitute)

_SELECTOR_RE = re.compile(r"\b((?:inspectd|process)_[a-z0-9_]+)(\{[^}]*\})?")
# Series without a line label (the daemon's, not a line's).
_NO_LINE_LABEL = {"inspectd_up", "inspectd_interpreter_stall_seconds_bucket", "inspectd_usable_cpus",
                  "process_cpu_seconds_total"}


def test_dashboard_structure() -> None:
    d = load_dashboard()
    assert d["uid"] and d["title"] and d["schemaVersion"] >= 36
    panels = list(iter_panels(d["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    boxes = []
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        boxes.append((g["x"], g["y"], g["x"] + g["w"], g["y"] + g["h"], p["title"]))
    for i, a in enumerate(boxes):       # overlapping panels are silently moved by Grafana
        for b in boxes[i + 1:]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a[4], b[4])
    for p in panels:
        if p["type"] != "row":
            assert p["targets"], f"panel {p['title']!r} has no query"
            assert p["datasource"]["uid"] == "${datasource}", p["title"]


def test_line_variable() -> None:
    variables = {v["name"]: v for v in load_dashboard()["templating"]["list"]}
    line = variables["line"]
    assert line["type"] == "query"
    assert line["query"]["query"] == 'label_values(inspectd_frames_total{box=~"$box"}, line)'
    assert line["multi"] and line["includeAll"]
    assert variables["datasource"]["query"] == "prometheus"
    # Fleet: the box the agent labels its samples with (deploy/prometheus/agent.yml). All is `.*`,
    # which also matches series without a box label (one box scraped directly).
    box = variables["box"]
    assert box["type"] == "query" and box["query"]["query"] == "label_values(inspectd_up, box)"
    assert box["multi"] and box["includeAll"] and box["allValue"] == ".*"
    names = [v["name"] for v in load_dashboard()["templating"]["list"]]
    assert names.index("box") < names.index("line")  # the line list follows the box choice


def test_every_metric_is_filtered_by_the_box_and_line_variables() -> None:
    for title, ref, expr in dashboard_queries(load_dashboard()):
        for name, matchers in _SELECTOR_RE.findall(expr):
            assert 'box=~"$box"' in matchers, f"{title} {ref}: {name}{matchers}"
            if name in _NO_LINE_LABEL:
                continue
            assert 'line=~"$line"' in matchers, f"{title} {ref}: {name}{matchers}"


def test_dashboard_covers_the_required_views() -> None:
    queries = dashboard_queries(load_dashboard())
    used = set().union(*(metric_names(expr) for _, _, expr in queries))
    assert used >= {
        "inspectd_frames_total",                  # throughput, OK/NG counts, NG rate, anomaly rate
        "inspectd_end_to_end_seconds_bucket",     # latency p50/p99
        "inspectd_deadline_misses_total",
        "inspectd_dropped_frames_total",
        "inspectd_camera_connected",
        "inspectd_camera_reconnects_total",
        "inspectd_anomaly_score_bucket",          # score distribution
        "inspectd_score_drift",
        "inspectd_engine_info",                   # backend in use
        "inspectd_backend_fallbacks_total",
        "inspectd_latency_budget_seconds",        # latency drawn against the line's own budget ...
        "inspectd_engine_seconds_at_start",       # ... and the engine's time measured at its start
        "inspectd_interpreter_stall_seconds_bucket",  # time no thread of the daemon could run
        "inspectd_line_state",                    # the heartbeat's state over time
    }
    exprs = [expr for _, _, expr in queries]
    assert any("histogram_quantile(0.5," in e for e in exprs) and any("histogram_quantile(0.99," in e for e in exprs)


def test_dashboard_uses_only_exported_metrics() -> None:
    used = set().union(*(metric_names(expr) for _, _, expr in dashboard_queries(load_dashboard())))
    assert used - exported_metric_names() - PROPOSED_METRICS == set()


def test_substitution_leaves_no_variables() -> None:
    for title, ref, expr in dashboard_queries(load_dashboard()):
        assert "$" not in substitute(expr, "line7"), f"{title} {ref}"
