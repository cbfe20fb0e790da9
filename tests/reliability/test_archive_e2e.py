"""Disk full / read-only archive through a running in-process Daemon: the archive lives on a real
tiny tmpfs (64 KiB) that fills up, or is remounted read-only mid-run. Archiving switches off with
inspectd_archive_enabled=0 and one error counted; inspection continues (verdicts with scores keep
arriving). Needs permission to mount a tmpfs (root in a container); skipped otherwise."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest

from inspectd.daemon.config import config_from_dict
from inspectd.daemon.run import Daemon
from tests.reliability.conftest import sample


def _run_daemon(tmp_path: Path, toy_path: Path, toy_frames: Path, archive: Path, during) -> tuple[Daemon, list]:
    cfg = config_from_dict({
        "zmq": {"endpoint": f"ipc://{tmp_path}/v.sock"}, "metrics": {"port": 0}, "heartbeat_interval_s": 0.5,
        "lines": [{"id": "L1", "bundle": str(toy_path), "threshold": 1000.0, "backends": ["onnxruntime"],
                   "latency_budget_ms": 1000, "heatmap": {"publish": "none"},
                   "archive": {"enabled": True, "dir": str(archive), "quota_mb": 1, "save": "all"},
                   "source": {"type": "replay", "path": str(toy_frames), "fps": 40, "loop": True}}]})
    daemon = Daemon(cfg)
    daemon.build()
    try:
        assert daemon.start(threading.Event())
        during(daemon)
    finally:
        daemon.stop()
    return daemon, []


def _wait(cond, timeout_s: float, what: str) -> None:
    end = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < end, what
        time.sleep(0.02)


def _check_switch_off_and_go_on(daemon: Daemon) -> None:
    m = daemon.metrics
    pipe = daemon.lines["L1"]
    _wait(lambda: sample(m, "inspectd_archive_enabled", line="L1") == 0, 20, "archive never disabled")
    assert sample(m, "inspectd_archive_errors_total", line="L1") == 1
    n = pipe.verdicts
    _wait(lambda: pipe.verdicts >= n + 20, 10, "inspection stopped with the archive")
    assert pipe.healthy() and pipe.failed is None
    scored = sample(m, "inspectd_frames_total", line="L1", verdict="OK")
    assert scored >= n + 20 and sample(m, "inspectd_dropped_frames_total", line="L1", reason="engine_error") == 0


def test_disk_full_disables_archiving_and_inspection_continues(
        tmp_path: Path, toy_path: Path, toy_frames: Path, tiny_tmpfs: Path, caplog: pytest.LogCaptureFixture) -> None:
    def during(daemon: Daemon) -> None:
        assert sample(daemon.metrics, "inspectd_archive_enabled", line="L1") == 1
        _check_switch_off_and_go_on(daemon)  # 40 records/s into 64 KiB: full within seconds
    _run_daemon(tmp_path, toy_path, toy_frames, tiny_tmpfs, during)
    assert any(tiny_tmpfs.rglob("*.json"))  # it did archive until the disk was full
    assert "No space left on device" in caplog.text and "NG archive L1 disabled" in caplog.text


def test_read_only_remount_mid_run_disables_archiving_and_inspection_continues(
        tmp_path: Path, toy_path: Path, toy_frames: Path, tiny_tmpfs: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Room enough that the disk does not fill first.
    subprocess.run(["mount", "-o", "remount,size=16m", str(tiny_tmpfs)], check=True, capture_output=True, timeout=10)

    def during(daemon: Daemon) -> None:
        _wait(lambda: any(tiny_tmpfs.rglob("*.json")), 10, "nothing archived")
        # A write in flight makes the remount "busy": retry briefly, as an operator would.
        for _ in range(50):
            proc = subprocess.run(["mount", "-o", "remount,ro", str(tiny_tmpfs)], capture_output=True, text=True,
                                  timeout=10)
            if proc.returncode == 0:
                break
            time.sleep(0.05)
        assert proc.returncode == 0, proc.stderr
        _check_switch_off_and_go_on(daemon)
    _run_daemon(tmp_path, toy_path, toy_frames, tiny_tmpfs, during)
    assert "Read-only file system" in caplog.text and "NG archive L1 disabled" in caplog.text
