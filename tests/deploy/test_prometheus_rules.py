"""deploy/prometheus: the alert rules pass `promtool check rules` and their unit tests
(`promtool test rules`), every alert is tested firing and quiet, the tests can fail, and the
example scrape config is valid and matches the rules' job name."""

from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from tests.deploy.deployfiles import (PROM_CONFIG, PROM_DIR, PROPOSED_METRICS, RULES, RULES_TEST,
                                      alert_names, exported_metric_names, load_rules, metric_names)


def _promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None:
        reason = "promtool not installed (apt-get install prometheus; see .ci/apt-packages)"
        print(reason)
        pytest.skip(reason)
    return tool


def _promtool_run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_rules_pass_promtool_check() -> None:
    result = _promtool_run("check", "rules", str(RULES), cwd=PROM_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(load_rules())} rules found" in result.stdout


def test_rule_unit_tests_pass() -> None:
    result = _promtool_run("test", "rules", RULES_TEST.name, cwd=PROM_DIR)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_quiet() -> None:
    tests = yaml.safe_load(RULES_TEST.read_text(encoding="utf-8"))
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    expected = {"InspectdDown", "InspectdTargetMissing", "InspectdNotReady", "InspectdCameraDown",
                "InspectdNoFrames", "InspectdDeadlineMisses", "InspectdNgRateSpike", "InspectdScoreDrift",
                "InspectdBackendFallback", "InspectdEngineErrors", "InspectdMalformedFrames",
                "InspectdPartsSkippedByCamera", "InspectdQueueFull"}
    assert expected <= set(alert_names())
    assert set(alert_names()) - fires == set(), "alerts never tested firing"
    assert set(alert_names()) - quiet == set(), "alerts never tested staying quiet"


# (old text, weakened text, the one alert whose tests must then fail)
MUTATIONS = [
    ("inspectd_camera_connected == 0\n        for: 30s", "inspectd_camera_connected == 0\n        for: 10m",
     "InspectdCameraDown"),
    ("unless on (job, box, instance, line) (inspectd_source_triggered == 1)", "", "InspectdNoFrames"),
    ("> 0.01", "> 0.10", "InspectdDeadlineMisses"),
    (">= 20", ">= 1", "InspectdNgRateSpike"),
    # Without the absolute branch a line at 100 % NG after an idle hour (0/0 = NaN baseline) or
    # a new line (no offset sample) never alerts.
    (") > 0.5\n", ") > 1.5\n", "InspectdNgRateSpike"),
    # A handful of setup parts must not count as a baseline.
    ("[1h] offset 5m)) >= 20", "[1h] offset 5m)) >= 0", "InspectdNgRateSpike"),
    # A line NG since it came back must not become its own baseline (the alert would resolve).
    (") <= 0.5", ") <= 1", "InspectdNgRateSpike"),
    # The old fallback rule fired for ever on a CPU-only box that never had TensorRT.
    ("""increase(inspectd_backend_fallbacks_total[30m]) > 0
          or
          (inspectd_backend_fallbacks_total > 0 unless inspectd_backend_fallbacks_total offset 30m)""",
     "inspectd_backend_fallbacks_total > 0", "InspectdBackendFallback"),
    # increase() alone misses a fallback at line start (the series is born at 1).
    ("""
          or
          (inspectd_backend_fallbacks_total > 0 unless inspectd_backend_fallbacks_total offset 30m)""", "",
     "InspectdBackendFallback"),
    ("(increase(inspectd_engine_errors_total[5m])) > 0", "(increase(inspectd_engine_errors_total[5m])) > 5",
     "InspectdEngineErrors"),
    ('reason="malformed"', 'reason=~"malformed|queue_full"', "InspectdMalformedFrames"),
    # Parts failed safe by a full queue count no deadline miss: any of them is worth an alert.
    ('reason="queue_full"}[5m])) > 0', 'reason="queue_full"}[5m])) > 200', "InspectdQueueFull"),
    # Waking late by more than 50 ms instead of 10: the stalls of a blocking GenTL wait go unseen.
    ('inspectd_interpreter_stall_seconds_bucket{le="0.01"}', 'inspectd_interpreter_stall_seconds_bucket{le="0.05"}',
     "InspectdInterpreterStalls"),
    # Against all of the box's CPUs instead of half: a line at 1.2 of 2 CPUs goes unseen (§29).
    ("(0.5 * inspectd_usable_cpus)", "(1.0 * inspectd_usable_cpus)", "InspectdCpuHeadroomLow"),
    ('reason="camera_skipped"}[5m])) > 0\n            and on (job, box, instance, line) (inspectd_source_triggered == 1)',
     'reason="camera_skipped"}[5m])) > 0', "InspectdPartsSkippedByCamera"),
]


@pytest.fixture(scope="module")
def mutated_runs(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[int, str]]:
    """promtool's result on the rules with each mutation applied, in MUTATIONS' order: (exit code,
    output). Each run evaluates every rule test (seconds of one core), so they run side by side,
    one per usable CPU, instead of one after the other."""
    _promtool()   # skipped with its reason where promtool is missing
    text = RULES.read_text(encoding="utf-8")

    def run(mutation: tuple[str, str, str]) -> tuple[int, str]:
        old, new, _ = mutation
        if old not in text:
            return -1, f"the rule text to weaken is not in {RULES.name}: {old!r}"
        folder = tmp_path_factory.mktemp("mutation")
        (folder / RULES.name).write_text(text.replace(old, new), encoding="utf-8")
        shutil.copy(RULES_TEST, folder / RULES_TEST.name)
        result = _promtool_run("test", "rules", RULES_TEST.name, cwd=folder)
        return result.returncode, result.stdout + result.stderr

    with ThreadPoolExecutor(max_workers=max(1, len(os.sched_getaffinity(0)))) as pool:
        return list(pool.map(run, MUTATIONS))


@pytest.mark.parametrize("index", range(len(MUTATIONS)), ids=[alert for _, _, alert in MUTATIONS])
def test_rule_unit_tests_catch_a_broken_rule(mutated_runs: list[tuple[int, str]], index: int) -> None:
    """The unit tests bite: weakening one rule makes exactly that alert's tests fail."""
    returncode, out = mutated_runs[index]
    assert returncode > 0, out[-3000:]
    failed = {name for name in alert_names() if f"alertname: {name}," in out}
    assert failed == {MUTATIONS[index][2]}, out[-3000:]


def test_example_prometheus_config_is_valid(tmp_path: Path) -> None:
    config = yaml.safe_load(PROM_CONFIG.read_text(encoding="utf-8"))
    jobs = [job["job_name"] for job in config["scrape_configs"]]
    assert "inspectd" in jobs                     # the rules select job="inspectd"
    assert any('job="inspectd"' in rule["expr"] for rule in load_rules())
    # Point rule_files at the repo's rules (the example names the installed path).
    config["rule_files"] = [str(RULES)]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    result = _promtool_run("check", "config", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_use_only_exported_metrics() -> None:
    exported = exported_metric_names()
    used = set().union(*(metric_names(rule["expr"]) for rule in load_rules()))
    assert used - exported - PROPOSED_METRICS == set()
    assert PROPOSED_METRICS == frozenset()  # every metric the rules use is exported by the daemon


def test_rule_tests_feed_only_exported_metrics() -> None:
    """No alert is tested on a series the daemon never exports (the test would prove nothing)."""
    tests = yaml.safe_load(RULES_TEST.read_text(encoding="utf-8"))
    fed = set().union(*(metric_names(series["series"]) for case in tests["tests"]
                        for series in case.get("input_series", [])))
    assert fed and fed - exported_metric_names() == set()
