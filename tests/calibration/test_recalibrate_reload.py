"""Issue 11 item 2, end to end with real components: a running `inspectd run` child process, the
real `inspectd calibrate` command in a subprocess (with a strict umask, as root's sudo often has),
`kill -HUP`, then a real HTTP scrape of /metrics and a real ZeroMQ subscriber.

The new threshold must apply after SIGHUP (first calibration: the config is repointed; later ones:
the threshold file is replaced and the YAML is left alone), the threshold file is readable by
others (mode 0644), the config's comments survive, and reports land under state_dir, not next to
the config. A broken threshold file or config on reload keeps the old threshold (one log line).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from inspectd.client import Message, VerdictSubscriber
from inspectd.engines.synthetic import render_part

INSPECTD = [sys.executable, "-m", "inspectd"]
N_GOOD = 60  # 5% at 95% confidence needs 59 good images


class DaemonProcess:
    """`inspectd run` as a child process; stderr read by a thread so it never blocks."""

    def __init__(self, config: Path) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("NOTIFY_SOCKET", None)
        self.proc = subprocess.Popen(INSPECTD + ["run", "--config", str(config)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:  # type: ignore[union-attr]
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def wait_log(self, pattern: str, timeout_s: float = 60.0, start: int = 0) -> re.Match:
        rx = re.compile(pattern)
        end = time.monotonic() + timeout_s
        with self._cond:
            while True:
                for line in self.lines[start:]:
                    m = rx.search(line)
                    if m:
                        return m
                if time.monotonic() > end or self.proc.poll() is not None:
                    raise AssertionError(f"no log line matching {pattern!r}; log:\n" + "\n".join(self.lines[-30:]))
                self._cond.wait(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _metric(port: int, name: str = "inspectd_threshold") -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    (value,) = re.findall(rf'^{name}\{{line="line1"\}} (\S+)$', text, re.M)
    return float(value)


def _verdicts(sub: VerdictSubscriber, seconds: float, until: Any = None) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        msg: Message | None = sub.poll_once(0.1)
        if msg is not None and msg.kind == "verdict":
            got.append(msg.header)
            if until is not None and until(msg.header):
                break
    return got


def _calibrate(config: Path, bundle: Path, good: Path, target: str) -> subprocess.CompletedProcess:
    # umask 077: without an explicit mode the threshold file would be root-only (0600).
    cmd = INSPECTD + ["calibrate", "--bundle", str(bundle), "--good", str(good), "--line", "line1",
                      "--target-false-reject", target, "--config", str(config), "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, preexec_fn=lambda: os.umask(0o077))
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def held_out_good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("recal_good")
    rng = np.random.default_rng(4321)
    for i in range(N_GOOD):
        cv2.imwrite(str(folder / f"recal_good_{i:04d}.png"), render_part(rng, 128)[0])
    return folder


CONFIG = """\
# Line 1 of the test plant. This comment must survive calibration.
zmq:
  endpoint: "{endpoint}"   # consumers connect here
metrics: {{port: 0}}
heartbeat_interval_s: 0.2
state_dir: state            # reports go here, not next to this file
lines:
  - id: line1
    source: {{type: replay, path: replay, fps: 30, loop: true}}
    bundle: {bundle}
    backends: [onnxruntime]
    threshold: 1000.0       # everything OK until the line is calibrated
    latency_budget_ms: 1000
    heatmap: {{publish: none}}
"""


def test_calibrate_then_sighup_applies_the_new_threshold(tmp_path: Path, tiny_bundle: Path, synthetic_parts: Any,
                                                         held_out_good: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    shutil.copytree(synthetic_parts.test_good, etc / "replay" / "good")
    shutil.copytree(synthetic_parts.test_bad, etc / "replay" / "bad")
    endpoint = f"ipc://{tmp_path}/pub.sock"
    config = etc / "lines.yaml"
    config.write_text(CONFIG.format(endpoint=endpoint, bundle=tiny_bundle))
    daemon = DaemonProcess(config)
    sub = VerdictSubscriber(endpoint, lines=["line1"], topics=("verdict",), heartbeat_timeout_s=None)
    try:
        port = int(daemon.wait_log(r"metrics on http://127\.0\.0\.1:(\d+)/metrics").group(1))
        daemon.wait_log(r"ready: line1")
        before = _verdicts(sub, 1.5)
        assert before and all(h["threshold"] == 1000.0 and h["verdict"] == "OK" for h in before)
        assert _metric(port) == 1000.0
        assert _metric(port, "inspectd_source_triggered") == 0  # a replay line is free-running

        # 1. First calibration: the line had a number, so the config is repointed to a stable file.
        out = _calibrate(config, tiny_bundle, held_out_good, "5%").stdout
        threshold_file = etc / "line1.threshold.json"
        assert "threshold file:" in out and str(threshold_file) in out
        text = config.read_text()
        assert "# Line 1 of the test plant. This comment must survive calibration." in text
        assert "# consumers connect here" in text and "# reports go here" in text
        assert "threshold: {file: line1.threshold.json}" in text
        assert stat.S_IMODE(threshold_file.stat().st_mode) == 0o644  # the service user can read it
        first = json.loads(threshold_file.read_text())["threshold"]
        assert 0 < first < 1000
        # Reports under state_dir/<line>/calibration/<time>/, nothing of them next to the config.
        (report,) = (etc / "state" / "line1" / "calibration").glob("*/report.json")
        assert json.loads(report.read_text())["threshold"] == first
        assert stat.S_IMODE(report.stat().st_mode) == 0o644
        assert not list(etc.glob("calibration*")) and not list(etc.glob("*.calibration-*"))

        mark = len(daemon.lines)
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_log(r"line line1: threshold 1000 -> ", timeout_s=10, start=mark)
        after = _verdicts(sub, 10.0, until=lambda h: h["threshold"] == first)
        assert after and after[-1]["threshold"] == first, "SIGHUP did not apply the new threshold"
        after = _verdicts(sub, 3.0)
        assert after and all(h["threshold"] == first for h in after)
        assert all(h["verdict"] == ("NG" if h["score"] > first else "OK") for h in after)
        assert any(h["verdict"] == "NG" for h in after), "the defective parts should now be rejected"
        assert _metric(port) == first

        # 2. Recalibration with a looser target: the same file is replaced, the YAML is not touched.
        yaml_before = config.read_bytes()
        _calibrate(config, tiny_bundle, held_out_good, "20%")
        assert config.read_bytes() == yaml_before
        assert stat.S_IMODE(threshold_file.stat().st_mode) == 0o644
        record = json.loads(threshold_file.read_text())
        second = record["threshold"]
        assert second < first and record["previous_threshold"] == first
        mark = len(daemon.lines)
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_log(r"line line1: threshold \S+ -> ", timeout_s=10, start=mark)
        _verdicts(sub, 10.0, until=lambda h: h["threshold"] == second)
        later = _verdicts(sub, 2.0)
        assert later and all(h["threshold"] == second for h in later)
        assert all(h["verdict"] == ("NG" if h["score"] > second else "OK") for h in later)
        assert _metric(port) == second

        # 3. A broken threshold file, then a broken config: the old threshold stays, one log line each.
        threshold_file.write_text("{broken")
        mark = len(daemon.lines)
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_log(r"threshold reload failed, keeping", timeout_s=10, start=mark)
        config.write_text(text.replace("latency_budget_ms: 1000", "latency_budget: 1000"))
        mark = len(daemon.lines)
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_log(r"threshold reload failed, keeping the current thresholds: .*lines\.yaml: "
                        r"lines\[0\]\.latency_budget: unknown key", timeout_s=10, start=mark)
        assert all(h["threshold"] == second for h in _verdicts(sub, 1.0))
        assert _metric(port) == second and daemon.proc.poll() is None

        # 4. The audit log (issue 15): each calibration and each reload that changed the threshold,
        # in order, with a generation that only grows; `inspectd audit` prints them; the metric agrees.
        from inspectd.daemon.audit import AuditLog, audit_path

        config.write_text(text)  # the config as it was before step 3 broke it
        records = list(AuditLog(audit_path(etc / "state")).records("line1"))
        changes = [(r["what"], r["who"]["via"]) for r in records]
        assert changes == [("calibrate", "calibrate"), ("threshold", "SIGHUP"), ("calibrate", "calibrate"),
                           ("threshold", "SIGHUP")], changes
        assert [r["generation"] for r in records] == sorted({r["generation"] for r in records})
        assert records[1]["old"]["threshold"] == 1000.0 and records[1]["new"]["threshold"] == first
        assert records[3]["old"]["threshold"] == first and records[3]["new"]["threshold"] == second
        printed = subprocess.run(INSPECTD + ["audit", "--config", str(config), "--line", "line1", "--json"],
                                 capture_output=True, text=True, timeout=60)
        assert printed.returncode == 0, printed.stderr
        assert [json.loads(x)["generation"] for x in printed.stdout.splitlines() if x.strip()] == \
            [r["generation"] for r in records]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            (generation,) = re.findall(r"^inspectd_config_generation (\S+)$", resp.read().decode(), re.M)
        assert float(generation) == records[-1]["generation"]
    finally:
        sub.close()
        daemon.stop()


def test_line_threshold_follows_the_spec_of_the_reread_config(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """What reload_thresholds hands LineThreshold: a number, a file, or None (re-read the file)."""
    from inspectd.daemon.line import LineThreshold

    t = LineThreshold("line1", value=3.0)
    assert t.reload() is False and t.value == 3.0          # a number has nothing to re-read
    assert t.reload(4.0) is True and t.value == 4.0 and t.path is None
    calib = tmp_path / "line1.threshold.json"
    calib.write_text(json.dumps({"threshold": 6.5}))
    assert t.reload(calib) is True and t.value == 6.5 and t.path == calib
    calib.write_text(json.dumps({"threshold": 7.0}))
    assert t.reload() is True and t.value == 7.0           # same file, new content
    for bad in (float("nan"), tmp_path / "missing.json"):
        caplog.clear()
        assert t.reload(bad) is False and t.value == 7.0 and t.path == calib
        (record,) = [r for r in caplog.records if r.levelname == "ERROR"]
        assert record.getMessage().startswith("line line1: threshold reload failed, keeping 7")
