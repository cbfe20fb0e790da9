"""Shutdown on the GenTL simulator with a 1 s fetch timeout: a frame that arrives while the
acquisition thread is in its last read (after the stop began) still gets its verdict, with a
score, and the whole daemon stops within the 5 s systemd budget. In-process Daemon (so the test
can see every frame each line acquired), real harvesters, real ONNX Runtime, real ZeroMQ."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import genicam
import pytest

from inspectd.daemon.config import config_from_dict
from inspectd.daemon.run import Daemon
from tests.reliability.conftest import Collector

CTI = Path(genicam.__file__).parent / "viky.cti"
pytestmark = pytest.mark.skipif(not CTI.is_file(), reason="genicam wheel without viky.cti")


def test_frames_read_during_shutdown_get_a_verdict_and_stop_takes_under_5_s(tmp_path: Path, toy_path: Path) -> None:
    def line(line_id: str, serial: str, features: dict) -> dict:
        return {"id": line_id, "bundle": str(toy_path), "threshold": 1000.0, "latency_budget_ms": 1000,
                "backends": ["onnxruntime"], "heatmap": {"publish": "none"},
                "source": {"type": "genicam", "cti": str(CTI), "device": {"serial": serial},
                           "pixel_format": "Mono8", "fetch_timeout_s": 1.0, "features": features}}

    cfg = config_from_dict({"zmq": {"endpoint": f"ipc://{tmp_path}/v.sock"}, "metrics": {"port": 0},
                            "heartbeat_interval_s": 0.2,
                            # "slow": one frame a second, so each read waits up to the 1 s fetch timeout.
                            "lines": [line("fast", "0", {}), line("slow", "1", {"AcquisitionFrameRate": 1.0})]})
    daemon = Daemon(cfg)
    daemon.build()
    got = {name: Collector() for name in ("fast", "slow")}
    for name, collector in got.items():
        daemon.lines[name].sink.add("test", collector)
    stopped = False
    try:
        assert daemon.start(threading.Event())
        got["fast"].wait_for(5)
        n = len(got["slow"].wait_for(1))
        got["slow"].wait_for(n + 1)  # a slow frame just arrived: the next one is ~1 s away
        time.sleep(0.5)              # stop in the middle of that read
        t_stop = time.monotonic()
        daemon.stop()
        stop_s = time.monotonic() - t_stop
        stopped = True
    finally:
        if not stopped:
            daemon.stop()
    assert stop_s < 5.0, stop_s
    for name, collector in got.items():
        pipe = daemon.lines[name]
        ids = [v.frame_id for v in collector.verdicts]
        assert len(ids) == len(set(ids)) == pipe.frames_acquired, (name, len(ids), pipe.frames_acquired)
    # The slow line's last frame was read after the stop began, and was judged, not just fail-safed.
    last = got["slow"].verdicts[-1]
    assert last.frame is not None and last.frame.acquired_mono > t_stop, (last.frame_id, stop_s)
    assert last.score is not None and last.error is None


def test_heartbeats_say_stopping_as_soon_as_a_stop_begins(tmp_path: Path, toy_path: Path, toy_frames: Path) -> None:
    """A reject gate trusts a line only while its heartbeat says "ok": from the moment the daemon
    begins to stop it no longer takes parts, so every heartbeat after that says "stopping" (at once,
    not at the next beat), and the gate's LineStatus is not safe. Real ZeroMQ, a replay line."""
    from inspectd.client import VerdictSubscriber, line_status_from_heartbeat

    cfg = config_from_dict({"zmq": {"endpoint": f"ipc://{tmp_path}/v.sock"}, "metrics": {"port": 0},
                            "heartbeat_interval_s": 0.5, "state_dir": str(tmp_path / "state"),
                            "lines": [{"id": "L", "bundle": str(toy_path), "threshold": 5.0,
                                       "backends": ["onnxruntime"], "latency_budget_ms": 500,
                                       "source": {"type": "replay", "path": str(toy_frames / "good"), "fps": 20,
                                                  "loop": True}}]})
    beats: list[tuple[float, str, bool]] = []
    daemon = Daemon(cfg)
    daemon.build()
    sub = VerdictSubscriber(f"ipc://{tmp_path}/v.sock", lines=["L"], heartbeat_timeout_s=None,
                            on_heartbeat=lambda m: beats.append(
                                (time.monotonic(), m.header["status"]["state"],
                                 line_status_from_heartbeat("L", m.header["status"]).safe)))
    sub.start()
    try:
        assert daemon.start(threading.Event())
        end = time.monotonic() + 10
        while not any(state == "ok" for _, state, _ in beats):
            assert time.monotonic() < end, beats
            time.sleep(0.05)
        t_stop = time.monotonic()
        daemon.stop()
    finally:
        time.sleep(0.2)
        sub.stop()
    after = [(t - t_stop, state, safe) for t, state, safe in beats if t >= t_stop]
    assert after, "no heartbeat after the stop began"
    assert all(state == "stopping" and not safe for _, state, safe in after), after
    assert after[0][0] < 0.3, after  # said at once, not a heartbeat interval later
