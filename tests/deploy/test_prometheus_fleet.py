"""Many boxes, one view: the shipped fleet configs with the real Prometheus binary in both roles.

A real `inspectd run` child (replay line, tiny bundle) is scraped by a Prometheus in agent mode
started with deploy/prometheus/agent.yml and the flags of systemd/prometheus-agent.conf, which
remote-writes with `box="box-a"` to a central Prometheus started with central.yml and the flags of
systemd/prometheus-central.conf (remote-write receiver, the alert rules). Everything is asserted on
the central one: the daemon's metrics arrive with the box label, every Grafana panel query answers
for that box, the box variable finds it, and the alert rules evaluate cleanly over remote-written
data. Only addresses, paths and intervals differ from the shipped files."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.deployfiles import PROM_DIR, RULES, dashboard_queries, load_dashboard, load_rules, substitute
from tests.deploy.test_prometheus_live import (LINE, _daemon_command, _free_port, _http_get, _Procs,
                                               _query, _tensorrt_available, _wait_for, _write_daemon_config,
                                               replay_parts)

AGENT_CONFIG = PROM_DIR / "agent.yml"
CENTRAL_CONFIG = PROM_DIR / "central.yml"
AGENT_DROPIN = PROM_DIR / "systemd" / "prometheus-agent.conf"
CENTRAL_DROPIN = PROM_DIR / "systemd" / "prometheus-central.conf"
BOX = "box-a"
TEST_BUDGET_S = 60.0     # everything after the fixtures; about 30 s on two shared cores
# Flags the test sets itself (temporary paths, free ports); every other flag of the drop-in is used as is.
_OWN_FLAGS = ("--config.file", "--storage.agent.path", "--storage.tsdb.path", "--web.listen-address")

__all__ = ["replay_parts"]  # the fixture, imported for its use here


def _prometheus() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        reason = "prometheus not installed (apt-get install prometheus; see .ci/apt-packages)"
        print(reason)
        pytest.skip(reason)
    return binary


def _promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None:
        reason = "promtool not installed (apt-get install prometheus; see .ci/apt-packages)"
        print(reason)
        pytest.skip(reason)
    return tool


def dropin_flags(path: Path) -> list[str]:
    """The Prometheus flags of a drop-in's (last) ExecStart=, less `$ARGS` and the flags the test
    sets itself."""
    execs = [line.split("=", 1)[1].strip() for line in path.read_text(encoding="utf-8").splitlines()
             if line.startswith("ExecStart=")]
    assert execs and execs[0] == "" and execs[-1], f"{path}: expected ExecStart= (reset) then the new one"
    argv = shlex.split(execs[-1])
    assert argv[0] == "/usr/bin/prometheus" and "$ARGS" in argv  # the Debian unit's binary and ARGS
    return [a for a in argv[1:] if a != "$ARGS" and not a.startswith(_OWN_FLAGS)]


def _central_config(tmp_path: Path, port: int) -> Path:
    config = yaml.safe_load(CENTRAL_CONFIG.read_text(encoding="utf-8"))
    config["rule_files"] = [str(RULES)]  # the installed path -> the repo's rules
    config["global"]["evaluation_interval"] = "1s"
    for job in config.get("scrape_configs", []):
        for group in job.get("static_configs", []):
            group["targets"] = [f"127.0.0.1:{port}"]  # itself, on the test's port
    path = tmp_path / "central.yml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _agent_config(tmp_path: Path, metrics_port: int, central_port: int) -> Path:
    config = yaml.safe_load(AGENT_CONFIG.read_text(encoding="utf-8"))
    config["global"].update(scrape_interval="1s", scrape_timeout="1s")
    config["global"]["external_labels"]["box"] = BOX
    [job] = [job for job in config["scrape_configs"] if job["job_name"] == "inspectd"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
    [remote] = config["remote_write"]
    remote["url"] = f"http://127.0.0.1:{central_port}/api/v1/write"
    remote["queue_config"]["batch_send_deadline"] = "1s"  # the shipped 5 s, shortened for the test
    path = tmp_path / "agent.yml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_shipped_fleet_configs_pass_promtool(tmp_path: Path) -> None:
    promtool = _promtool()
    agent = subprocess.run([promtool, "check", "config", "--agent", str(AGENT_CONFIG)],
                           capture_output=True, text=True, timeout=60)
    assert agent.returncode == 0, agent.stdout + agent.stderr
    config = yaml.safe_load(AGENT_CONFIG.read_text(encoding="utf-8"))
    assert "box" in config["global"]["external_labels"]
    assert [job["job_name"] for job in config["scrape_configs"]] == ["inspectd"]  # the rules' job name
    assert "rule_files" not in config  # agent mode evaluates nothing: the central Prometheus does
    central = _central_config(tmp_path, 9090)
    result = subprocess.run([promtool, "check", "config", str(central)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "--enable-feature=agent" in dropin_flags(AGENT_DROPIN) or "--agent" in dropin_flags(AGENT_DROPIN)
    assert "--web.enable-remote-write-receiver" in dropin_flags(CENTRAL_DROPIN)


def test_agent_remote_writes_to_central_with_box_label(tmp_path: Path, tiny_bundle: Path,
                                                       replay_parts: Path) -> None:
    prometheus = _prometheus()
    started = time.monotonic()
    deadline = started + TEST_BUDGET_S

    metrics_port, central_port, agent_port = _free_port(), _free_port(), _free_port()
    daemon_config = _write_daemon_config(tmp_path, replay_parts, tiny_bundle, metrics_port)
    central = f"http://127.0.0.1:{central_port}"
    agent = f"http://127.0.0.1:{agent_port}"
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    expect_fallback = not _tensorrt_available()

    procs = _Procs()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    try:
        procs.start("daemon", _daemon_command(daemon_config), tmp_path / "daemon.log", env=env)
        procs.start("central", [prometheus, *dropin_flags(CENTRAL_DROPIN),
                                f"--config.file={_central_config(tmp_path, central_port)}",
                                f"--storage.tsdb.path={tmp_path / 'central-tsdb'}",
                                f"--web.listen-address=127.0.0.1:{central_port}", "--log.level=warn"],
                    tmp_path / "central.log")
        procs.start("agent", [prometheus, *dropin_flags(AGENT_DROPIN),
                              f"--config.file={_agent_config(tmp_path, metrics_port, central_port)}",
                              f"--storage.agent.path={tmp_path / 'agent-wal'}",
                              f"--web.listen-address=127.0.0.1:{agent_port}", "--log.level=warn"],
                    tmp_path / "agent.log")

        def ready(url: str) -> bool:
            try:
                return _http_get(url, timeout=2)[0] == 200
            except OSError:
                return False

        def daemon_ready() -> bool:
            try:
                status, body = _http_get(metrics_url, timeout=2)
            except OSError:
                return False
            return status == 200 and "\ninspectd_up 1.0" in body

        _wait_for(lambda: ready(f"{central}/-/ready"), 20, "the central Prometheus to be ready", procs, deadline)
        _wait_for(lambda: ready(f"{agent}/-/ready"), 20, "the agent to be ready", procs, deadline)
        # Really agent mode: it stores nothing it could answer queries from.
        assert _query(agent, "up").get("status") != "success"
        _wait_for(daemon_ready, 60, "the daemon to serve metrics with inspectd_up 1", procs, deadline)

        # ---- the daemon's metrics reach the central Prometheus through remote write, labelled --
        def arrived() -> bool:
            answer = _query(central, f'inspectd_up{{job="inspectd",box="{BOX}"}} == 1')
            return answer.get("status") == "success" and bool(answer["data"]["result"])

        _wait_for(arrived, 30, f'inspectd_up{{box="{BOX}"}} in the central Prometheus', procs, deadline,
                  why=lambda: json.dumps(_query(central, "inspectd_up")))
        up = _query(central, 'up{job="inspectd"}')["data"]["result"]
        assert [(s["metric"].get("box"), s["value"][1]) for s in up] == [(BOX, "1")]
        # (ALERTS{job="inspectd"} is the central's own: pending InspectdTargetMissing before data came)
        unlabelled = _query(central, '{__name__=~"inspectd_.+|up|scrape_.+",job="inspectd",box=""}')
        unlabelled = unlabelled["data"]["result"]
        assert unlabelled == [], "series reached the central Prometheus without the box label"

        # ---- every dashboard query answers for the box (and for All boxes) ---------------------
        queries = [(title, ref, expr) for title, ref, expr in dashboard_queries(load_dashboard())]
        optional = {expr for _, _, expr in queries
                    if "inspectd_backend_fallbacks_total" in expr and not expect_fallback}
        empty: list[str] = []

        def all_queries_have_data() -> bool:
            empty.clear()
            for title, ref, expr in queries:
                for box in (BOX, ".*"):
                    sent = substitute(expr, LINE, box=box)
                    answer = _query(central, sent)
                    if answer.get("status") != "success":
                        pytest.fail(f"dashboard panel {title!r} {ref}: central Prometheus rejects {sent!r}: "
                                    f"{answer.get('error')}")
                    if not answer["data"]["result"] and expr not in optional:
                        empty.append(f"{title} {ref} (box {box}): {sent}")
            return not empty

        # Drift needs 50 OK parts and rate windows two samples: a few seconds of line time.
        _wait_for(all_queries_have_data, 30, "every dashboard query to return data centrally", procs, deadline,
                  why=lambda: "queries without data:\n" + "\n".join(empty))

        # Another box's selection shows none of box-a's series (the filter filters).
        for title, ref, expr in queries:
            if "inspectd_" in expr:
                sent = substitute(expr, LINE, box="box-b")
                assert _query(central, sent)["data"]["result"] == [], (title, ref, sent)

        # ---- the box and line variables find the box and its line --------------------------------
        def label_values(label: str, match: str) -> list[str]:
            status, body = _http_get(f"{central}/api/v1/label/{label}/values?"
                                     + urllib.parse.urlencode({"match[]": match}))
            assert status == 200, body
            return json.loads(body)["data"]

        assert label_values("box", "inspectd_up") == [BOX]
        assert LINE in label_values("line", f'inspectd_frames_total{{box=~"{BOX}"}}')

        # ---- the alert rules evaluate on the central Prometheus over remote-written data ---------
        rules_state: list[dict[str, Any]] = []

        def rules_evaluated() -> bool:
            status, body = _http_get(f"{central}/api/v1/rules")
            rules_state[:] = [r for g in json.loads(body)["data"]["groups"] for r in g["rules"]]
            return status == 200 and len(rules_state) == len(load_rules()) and all(
                r["health"] != "unknown" for r in rules_state)

        _wait_for(rules_evaluated, 15, "the central Prometheus to evaluate the rules", procs, deadline)
        assert [(r["name"], r["lastError"]) for r in rules_state if r["health"] != "ok"] == []
        states = {r["name"]: r["state"] for r in rules_state}
        # `up` travels through remote write too: the daemon-down alerts see the box's target.
        for name in ("InspectdDown", "InspectdTargetMissing", "InspectdCameraDown", "InspectdNoFrames"):
            assert states[name] == "inactive", (name, states[name])
        if expect_fallback:  # TensorRT was skipped: the fallback alert fires, labelled with the box
            assert states["InspectdBackendFallback"] == "firing"
            [fallback] = [r for r in rules_state if r["name"] == "InspectdBackendFallback"]
            assert {a["labels"].get("box") for a in fallback["alerts"]} == {BOX}

        # The agent sent everything without failures.
        status, body = _http_get(f"{agent}/metrics")
        assert status == 200
        for line in body.splitlines():
            if line.startswith("prometheus_remote_storage_samples_failed_total"):
                assert float(line.rsplit(" ", 1)[1]) == 0, line
        assert time.monotonic() - started < TEST_BUDGET_S + 5
    finally:
        procs.stop_all()
