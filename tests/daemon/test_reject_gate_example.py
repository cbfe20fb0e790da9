"""examples/reject_gate.py, run as a child process the way an integrator would run it:

* against a real in-process Daemon on the GenTL simulator (viky.cti via harvesters) whose camera
  goes away and comes back: the gate rejects everything while the camera is lost, resumes when
  it is back, and rejects everything again when the daemon (and its heartbeats) stop;
* against a plain ZeroMQ PUB socket with crafted messages: lost verdicts (seq gap), engine failure
  and a daemon restart each switch it to reject-all; its single-part rejects follow NG/SKIP.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import genicam
import pytest
import zmq

from inspectd.daemon.config import config_from_dict
from inspectd.daemon.run import Daemon
from tests.engines.test_runtime_toybundle import make_toy_bundle
from tests.daemon.test_metrics import scrape
from tests.helpers import sample

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "reject_gate.py"
CTI = Path(genicam.__file__).parent / "viky.cti"


def line_state(daemon: Daemon) -> str:
    """The state inspectd_line_state marks current for line "cam", by a real HTTP scrape of /metrics."""
    got = scrape(daemon.metrics_server.url)
    (state,) = [dict(labels)["inspectd_line_state"] for (name, labels), v in got.items()
                if name == "inspectd_line_state" and dict(labels)["line"] == "cam" and v == 1]
    return state


@pytest.fixture(scope="module")
def toy_bundle_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_toy_bundle(tmp_path_factory.mktemp("gate") / "toy")


class Gate:
    """The example as a child process; its stdout lines are collected by a reader thread."""

    def __init__(self, endpoint: str, line: str, *extra: str) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, str(EXAMPLE), "--endpoint", endpoint, "--line", line,
                                      *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=env)
        self.lines: list[str] = []
        self._q: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._q.put(line.rstrip("\n"))

    def expect(self, text: str, timeout_s: float = 10.0) -> float:
        """Wait for a stdout line starting with `text` (after those already consumed); its arrival time."""
        end = time.monotonic() + timeout_s
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"reject_gate never printed {text!r}; printed {self.lines}; "
                                     f"stderr: {self._stderr()}")
            try:
                line = self._q.get(timeout=left)
            except queue.Empty:
                continue
            self.lines.append(line)
            if line.startswith(text):
                return time.monotonic()

    def _stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr.closed:
            return "(still running)"
        return self.proc.stderr.read()[-2000:]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(5)
        self._reader.join(5)
        while not self._q.empty():
            self.lines.append(self._q.get())
        self.proc.stdout.close()
        self.proc.stderr.close()
        return rc


@pytest.mark.skipif(not CTI.is_file(), reason="genicam wheel without viky.cti")
def test_example_rejects_all_while_the_camera_is_lost(tmp_path: Path, toy_bundle_path: Path) -> None:
    # The line uses its own copy of the producer: removing the copy keeps the camera away (the
    # reconnect cannot open it), putting it back lets the line reconnect.
    cti = tmp_path / "viky.cti"
    shutil.copy(CTI, cti)
    endpoint = f"ipc://{tmp_path}/v.sock"
    cfg = config_from_dict({
        "zmq": {"endpoint": endpoint}, "metrics": {"port": 0}, "heartbeat_interval_s": 0.2,
        "lines": [{"id": "cam", "bundle": str(toy_bundle_path), "threshold": 1000.0, "latency_budget_ms": 1000,
                   "backends": ["onnxruntime"], "heatmap": {"publish": "none"},
                   "source": {"type": "genicam", "cti": str(cti), "device": {"serial": "2"},
                              "pixel_format": "Mono8", "reconnect_backoff_s": [0.2, 0.4]}}]})
    daemon = Daemon(cfg)
    daemon.build()
    gate = None
    stopped = False
    try:
        assert daemon.start(threading.Event())
        gate = Gate(endpoint, "cam", "--heartbeat-timeout", "1.0", "--hold", "0.5")
        gate.expect("REJECT ALL: no heartbeat yet")   # nothing known at start: fail safe
        gate.expect("RESUME: cam ok", 20)
        pipe = daemon.lines["cam"]
        n_frames = sample(daemon.metrics, "inspectd_frames_total", line="cam", verdict="OK")

        # The camera goes away: its producer file is gone and the open device is closed under harvesters.
        cti.unlink()
        pulled = time.monotonic()
        pipe.source._ia.device.module.close()
        blind_at = gate.expect("REJECT ALL: camera lost", 10)
        assert n_frames > 0                        # parts were inspected before the loss
        # Heartbeat interval 0.2 s + a fetch timeout: noticed well within 5 s.
        assert blind_at - pulled < 5.0
        # It stays blind (and the gate closed) while the camera is away, though heartbeats flow.
        time.sleep(1.5)
        assert sample(daemon.metrics, "inspectd_camera_connected", line="cam") == 0
        assert not any(ln.startswith("RESUME") for ln in gate.lines[gate.lines.index("REJECT ALL: camera lost"):])
        assert line_state(daemon) == "blind"       # what a Grafana state panel shows (a real scrape)

        shutil.copy(CTI, cti)                      # the camera comes back
        gate.expect("RESUME: cam ok", 15)
        assert line_state(daemon) == "ok"          # set with the heartbeat that said so

        daemon.stop()                              # the daemon goes away: heartbeats stop
        stopped = True
        gate.expect("REJECT ALL: heartbeat lost", 5)
    finally:
        rc = gate.stop() if gate is not None else 0
        if not stopped:
            daemon.stop()
        if not cti.exists():
            shutil.copy(CTI, cti)
    assert rc == 0, gate.lines


class RawPub:
    """A plain PUB socket for crafted daemon messages (exact seq numbers and status)."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.start_ns = time.time_ns()
        self.hb_seq = 0
        self.verdict_seq = 0

    def heartbeat(self, state: str = "ok", **status: object) -> None:
        status = {"camera_connected": state != "blind", "engine_ready": state == "ok", "state": state, **status}
        h = {"schema": 1, "topic": "heartbeat.L1", "line": "L1", "seq": self.hb_seq, "published_ns": time.time_ns(),
             "status": status, "interval_s": 0.1, "daemon_start_ns": self.start_ns,
             "last_seq": {"verdict.L1": self.verdict_seq - 1} if self.verdict_seq else {}}
        self.hb_seq += 1
        self.sock.send_multipart([b"heartbeat.L1", json.dumps(h).encode()])

    def verdict(self, verdict: str = "OK", skip: int = 0) -> None:
        self.verdict_seq += skip
        h = {"schema": 1, "topic": "verdict.L1", "line": "L1", "seq": self.verdict_seq, "frame_id": 1000 + self.verdict_seq,
             "acquired_ns": time.time_ns(), "published_ns": time.time_ns(), "verdict": verdict, "score": 0.1,
             "raw_score": 0.0, "threshold": 3.0, "latency_ms": 5.0, "deadline_missed": False, "backend": "x",
             "bundle_id": "b", "error": None, "daemon_start_ns": self.start_ns}
        self.verdict_seq += 1
        self.sock.send_multipart([b"verdict.L1", json.dumps(h).encode()])

    def restart(self) -> None:
        self.start_ns += 1
        self.hb_seq = self.verdict_seq = 0

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def test_example_rejects_all_on_lost_verdicts_engine_failure_and_restart(tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/raw.sock"
    pub = RawPub(endpoint)
    gate = Gate(endpoint, "L1", "--heartbeat-timeout", "2.0", "--hold", "0.5")
    try:
        gate.expect("REJECT ALL: no heartbeat yet")
        end = time.monotonic() + 15
        while not any(ln.startswith("RESUME") for ln in gate.lines):  # slow joiner: beat until heard
            assert time.monotonic() < end, gate.lines
            pub.heartbeat("ok")
            try:
                gate.expect("RESUME: L1 ok", 0.1)
            except AssertionError:
                pass
        pub.verdict("OK")
        pub.verdict("NG")
        gate.expect("REJECT frame 1001 (NG)")
        pub.verdict("SKIP")
        gate.expect("REJECT frame 1002 (SKIP)")

        pub.verdict("OK", skip=3)                  # three verdicts lost on the way
        gate.expect("REJECT ALL: 3 verdicts lost")
        pub.heartbeat("ok")
        t_hold = time.monotonic()
        resumed = gate.expect("RESUME: L1 ok", 5)
        assert resumed - t_hold > 0.2              # held for a while, not reopened at once

        pub.heartbeat("engine_failed", failed="no usable backend")
        gate.expect("REJECT ALL: engine failed: no usable backend")
        pub.heartbeat("ok")
        gate.expect("RESUME: L1 ok")

        pub.restart()                              # a new daemon: seq from 0, new daemon_start_ns
        pub.heartbeat("starting")
        gate.expect("REJECT ALL: daemon restarted")
        gate.expect("REJECT ALL: line starting")
        pub.heartbeat("ok")
        gate.expect("RESUME: L1 ok", 5)
    finally:
        rc = gate.stop()
        pub.close()
    assert rc == 0
    # No part-level reject was printed while everything was rejected anyway, and OK parts passed silently.
    assert not any("frame 1000 " in ln or "frame 1000 (" in ln for ln in gate.lines)


@pytest.mark.skipif(not zmq.has("curve"), reason="libzmq built without CURVE")
def test_example_speaks_curve_and_refuses_half_a_key_pair(tmp_path: Path) -> None:
    from inspectd.daemon.publish import CurveServerKeys, Publisher
    from inspectd.keys import generate, load_secret_key_file

    server_pub, server_sec = generate(tmp_path / "keys", "server")
    _, gate_sec = generate(tmp_path / "keys", "gate")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    shutil.copy(tmp_path / "keys" / "gate.key", allowed / "gate.key")
    public, secret = load_secret_key_file(server_sec)
    pub = Publisher("tcp://127.0.0.1:*", heartbeat_interval_s=0.1,
                    curve=CurveServerKeys(public, secret, allowed_clients_dir=str(allowed)))
    pub.set_line_status("L1", {"state": "ok", "camera_connected": True, "engine_ready": True})
    pub.start()
    gate = Gate(pub.bound_endpoint, "L1", "--heartbeat-timeout", "1.0",
                "--server-key", str(server_pub), "--client-key", str(gate_sec))
    try:
        gate.expect("RESUME: L1 ok", 15)           # the encrypted, allow-listed stream is read
        pub.set_line_status("L1", {"state": "blind", "camera_connected": False, "engine_ready": True})
        gate.expect("REJECT ALL: camera lost", 5)
    finally:
        assert gate.stop() == 0
        pub.stop()
    half = subprocess.run([sys.executable, str(EXAMPLE), "--line", "L1", "--server-key", str(server_pub)],
                          capture_output=True, text=True, timeout=60)
    assert half.returncode == 2 and "go together" in half.stderr
