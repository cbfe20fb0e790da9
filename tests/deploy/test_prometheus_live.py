"""A real Prometheus scrapes a real running daemon (replay source, tiny bundle): every PromQL
expression of the dashboard and of the alert rules parses, every dashboard query returns data,
the rules evaluate without errors, and the `line` variable finds the line.

Bounded: the daemon and Prometheus part takes < 90 s and both processes are stopped in `finally`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from tests.deploy.deployfiles import RULES, dashboard_queries, load_dashboard, load_rules, substitute

LINE = "deploytest"
BUDGET_MS = 500          # generous: two shared CPU cores; deadline misses are not what this tests
TEST_BUDGET_S = 85.0     # everything after the fixtures


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _http_get(url: str, timeout: float = 3.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:       # Prometheus answers bad queries with 400 + JSON
        return exc.code, exc.read().decode("utf-8", "replace")


def _log_tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-n:]
    except OSError:
        return "(no log)"


class _Procs:
    """The processes under test and their logs; `check()` fails the test if one died."""

    def __init__(self) -> None:
        self.procs: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}

    def start(self, name: str, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        fh = log.open("wb")
        try:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        finally:
            fh.close()  # the child has its own copy
        self.procs[name] = (proc, log)

    def check(self) -> None:
        for name, (proc, log) in self.procs.items():
            if proc.poll() is not None:
                pytest.fail(f"{name} exited with {proc.returncode}:\n{_log_tail(log)}")

    def stop_all(self) -> None:
        for proc, _ in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _ in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def _wait_for(cond: Callable[[], bool], timeout_s: float, what: str, procs: _Procs, deadline: float,
              why: Callable[[], str] = lambda: "") -> None:
    """Poll `cond` until true; on timeout fail with `why()` and the process logs."""
    end = min(time.monotonic() + timeout_s, deadline)
    while True:
        procs.check()
        if cond():
            return
        if time.monotonic() > end:
            logs = "\n".join(f"--- {name} log:\n{_log_tail(log)}" for name, (_, log) in procs.procs.items())
            pytest.fail(f"timed out waiting for {what}\n{why()}\n{logs}")
        time.sleep(0.5)


def _daemon_command(config: Path) -> list[str]:
    # `python -m inspectd` once inspectd/__main__.py exists; the CLI module works meanwhile.
    module = "inspectd" if importlib.util.find_spec("inspectd.__main__") else "inspectd.cli"
    return [sys.executable, "-m", module, "run", "--config", str(config)]


def _tensorrt_available() -> bool:
    from inspectd.engines.runtime import backend_class

    try:
        backend_class("tensorrt")
    except Exception:
        return False
    return True


def _write_daemon_config(tmp_path: Path, parts: Path, bundle: Path, metrics_port: int) -> Path:
    # A stand-in calibration file: the threshold plus a reference distribution of normalized good
    # scores (mean 0, std 1 by construction), enough for the daemon to export inspectd_score_drift.
    # This test checks that the series exists, not its value.
    calib = tmp_path / "calib.json"
    reference = [round(-2.0 + 4.0 * i / 60, 4) for i in range(61)]
    calib.write_text(json.dumps({"threshold": 3.0, "good_scores": reference}), encoding="utf-8")
    config = {
        "zmq": {"endpoint": f"tcp://127.0.0.1:{_free_port()}"},
        "metrics": {"host": "127.0.0.1", "port": metrics_port},
        "heartbeat_interval_s": 1.0,
        "state_dir": str(tmp_path / "state"),  # never the machine's /var/lib/inspectd
        "log_level": "INFO",
        "lines": [{
            "id": LINE,
            "source": {"type": "replay", "path": str(parts), "fps": 25, "loop": True,
                       "labels_from_subfolders": True},
            "bundle": str(bundle),
            # TensorRT first: on a machine without it the line falls back to ONNX Runtime, which
            # gives the dashboard's fallback panel real data.
            "backends": ["tensorrt", "onnxruntime"],
            "threshold": {"file": str(calib)},
            "latency_budget_ms": BUDGET_MS,
            "on_deadline_miss": "NG",
            "queue_size": 4,
            "heatmap": {"publish": "none"},
            "archive": {"enabled": False},
        }],
    }
    path = tmp_path / "lines.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def _query(prom: str, expr: str) -> dict[str, Any]:
    status, body = _http_get(f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    try:
        return json.loads(body)
    except json.JSONDecodeError:
        return {"status": "error", "error": f"HTTP {status}: {body[:200]}"}


@pytest.fixture
def replay_parts(tmp_path: Path, synthetic_parts: Any) -> Path:
    """good/ and bad/ subfolders (labels for the replay source) from the generated test images."""
    root = tmp_path / "parts"
    for label, src in (("good", synthetic_parts.test_good), ("bad", synthetic_parts.test_bad)):
        (root / label).mkdir(parents=True)
        for image in sorted(Path(src).glob("*.png")):
            shutil.copy(image, root / label / image.name)
    return root


def test_dashboard_and_rules_against_live_prometheus(tmp_path: Path, tiny_bundle: Path,
                                                     replay_parts: Path) -> None:
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        reason = "prometheus not installed (apt-get install prometheus; see .ci/apt-packages)"
        print(reason)
        pytest.skip(reason)
    started = time.monotonic()
    deadline = started + TEST_BUDGET_S

    metrics_port, prom_port = _free_port(), _free_port()
    daemon_config = _write_daemon_config(tmp_path, replay_parts, tiny_bundle, metrics_port)
    prom_config = tmp_path / "prometheus.yml"
    prom_config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "inspectd",
                            "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}],
    }), encoding="utf-8")
    prom = f"http://127.0.0.1:{prom_port}"
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    expect_fallback = not _tensorrt_available()

    procs = _Procs()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    try:
        procs.start("daemon", _daemon_command(daemon_config), tmp_path / "daemon.log", env=env)
        procs.start("prometheus", [prometheus, f"--config.file={prom_config}",
                                   f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                   f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
                    tmp_path / "prometheus.log")

        def daemon_ready() -> bool:
            try:
                status, body = _http_get(metrics_url, timeout=2)
            except OSError:
                return False
            return status == 200 and "\ninspectd_up 1.0" in body

        def prometheus_ready() -> bool:
            try:
                return _http_get(f"{prom}/-/ready", timeout=2)[0] == 200
            except OSError:
                return False

        _wait_for(daemon_ready, 60, "the daemon to serve metrics with inspectd_up 1", procs, deadline)
        _wait_for(prometheus_ready, 20, "Prometheus to be ready", procs, deadline)

        # ---- every dashboard query parses and returns data for the line ------------------------
        queries = [(title, ref, substitute(expr, LINE))
                   for title, ref, expr in dashboard_queries(load_dashboard())]
        optional = {expr for _, _, expr in queries
                    if "inspectd_backend_fallbacks_total" in expr and not expect_fallback}
        empty: list[str] = []

        def all_queries_have_data() -> bool:
            empty.clear()
            for title, ref, expr in queries:
                answer = _query(prom, expr)
                if answer.get("status") != "success":
                    pytest.fail(f"dashboard panel {title!r} {ref}: Prometheus rejects {expr!r}: "
                                f"{answer.get('error')}")
                if not answer["data"]["result"] and expr not in optional:
                    empty.append(f"{title} {ref}: {expr}")
            return not empty

        # Drift needs 50 OK parts and rate windows two scrapes: a few seconds of line time.
        _wait_for(all_queries_have_data, 45, "every dashboard query to return data", procs, deadline,
                  why=lambda: "queries without data:\n" + "\n".join(empty))

        # ---- the line variable finds the line -----------------------------------------------
        status, body = _http_get(f"{prom}/api/v1/label/line/values?"
                                 + urllib.parse.urlencode({"match[]": "inspectd_frames_total"}))
        assert status == 200 and LINE in json.loads(body)["data"]

        # ---- every rule expression parses, and the rules evaluate without errors ---------------
        for rule in load_rules():
            answer = _query(prom, rule["expr"])
            assert answer.get("status") == "success", (rule.get("alert"), answer.get("error"))

        rules_state: list[dict[str, Any]] = []

        def rules_evaluated() -> bool:
            status, body = _http_get(f"{prom}/api/v1/rules")
            rules_state[:] = [r for g in json.loads(body)["data"]["groups"] for r in g["rules"]]
            return status == 200 and len(rules_state) == len(load_rules()) and all(
                r["health"] != "unknown" for r in rules_state)

        _wait_for(rules_evaluated, 15, "Prometheus to evaluate the rules", procs, deadline)
        bad = [(r["name"], r["health"], r.get("lastError")) for r in rules_state if r["health"] != "ok"]
        assert bad == []
        # A healthy line with its camera (replay) up: the camera and daemon alerts stay inactive.
        states = {r["name"]: r["state"] for r in rules_state}
        for name in ("InspectdDown", "InspectdTargetMissing", "InspectdCameraDown", "InspectdNoFrames"):
            assert states[name] == "inactive", (name, states[name])
        if expect_fallback:  # TensorRT was skipped: the fallback alert is active (it has no `for`)
            assert states["InspectdBackendFallback"] == "firing"

        # ---- the unit's stop timeout holds: SIGTERM -> exit 0 well within TimeoutStopSec -----
        daemon, _ = procs.procs["daemon"]
        daemon.send_signal(signal.SIGTERM)
        try:
            rc = daemon.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail("the daemon did not exit within 10 s of SIGTERM")
        assert rc == 0, _log_tail(tmp_path / "daemon.log")
        assert time.monotonic() - started < 90
    finally:
        procs.stop_all()
