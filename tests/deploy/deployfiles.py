"""Helpers shared by the deploy tests: where the deploy files are, the PromQL they contain, and the
dashboard variable substitution Grafana would do."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "systemd" / "inspectd@.service"
INSTALL_SH = DEPLOY / "install.sh"
PROM_DIR = DEPLOY / "prometheus"
RULES = PROM_DIR / "inspectd-rules.yml"
RULES_TEST = PROM_DIR / "inspectd-rules.test.yml"
PROM_CONFIG = PROM_DIR / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "inspectd-dashboard.json"

# Metrics the deploy files may use before the daemon exports them: none (inspectd_source_triggered
# is exported since issue 11). Keep it empty: an alert on a metric nobody exports never fires.
PROPOSED_METRICS: frozenset[str] = frozenset()

# The daemon's own metrics and the process metrics its registry exports (process_cpu_seconds_total).
_METRIC_RE = re.compile(r"\b(?:inspectd|process)_[a-z0-9_]+\b")


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(panel title, refId, expr) of every PromQL target of the dashboard."""
    out = []
    for panel in iter_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            if "expr" in target:
                out.append((panel["title"], target.get("refId", "?"), target["expr"]))
    return out


def substitute(expr: str, line: str, rate_interval: str = "30s",
               time_range: str = "1m", box: str = ".*") -> str:
    """What Grafana sends to Prometheus for one selected line (and box: the default is the `box`
    variable's All value `.*`, which also matches series without a box label, the single-box
    case). Longest variable names first, so `$__range` does not eat `$__rate_interval`. Plain ids
    only: Grafana's regex escaping of other characters is not reproduced here."""
    if not re.fullmatch(r"\w+", line):
        raise ValueError(f"test line ids must be plain words, got {line!r}")
    replacements = {
        "$__rate_interval": rate_interval,
        "$__interval": "5s",
        "$__range": time_range,
        "${line}": line,
        "$line": line,
        "${box}": box,
        "$box": box,
    }
    for name in sorted(replacements, key=len, reverse=True):
        expr = expr.replace(name, replacements[name])
    return expr


def load_rules() -> list[dict[str, Any]]:
    """Every rule (alerting or recording) of inspectd-rules.yml."""
    data = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule for group in data["groups"] for rule in group["rules"]]


def alert_names() -> list[str]:
    return [rule["alert"] for rule in load_rules() if "alert" in rule]


def metric_names(expr: str) -> set[str]:
    """inspectd_* and process_* metric names used in a PromQL expression."""
    return set(_METRIC_RE.findall(expr))


def exported_metric_names() -> set[str]:
    """The sample names the real daemon exports (inspectd/daemon/metrics.py), with the suffixes
    Prometheus sees: counters *_total, histograms *_bucket/_sum/_count."""
    from inspectd.daemon.metrics import Metrics

    names: set[str] = set()
    for family in Metrics().registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names
