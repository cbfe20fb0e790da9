"""The audit trail under real operations: a full disk that tears a record, a log the daemon cannot
read or write, a log first created by root (`sudo inspectd calibrate`)."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from inspectd.daemon.audit import AuditLog, audit_path, local_who
from inspectd.daemon.control import request, socket_path
from tests.daemon.test_recipes import _Collector, _config, _replay
from tests.daemon.test_run import Daemon
from tests.helpers import fill_filesystem


def test_a_record_torn_by_a_full_disk_never_swallows_the_next_one(tiny_tmpfs: Path) -> None:
    """The disk fills in the middle of a record: the append fails, and once there is room again the
    next record (and every later one) is readable, with a generation one above the last good one."""
    log = AuditLog(tiny_tmpfs / "audit.jsonl")
    assert log.append("line1", "threshold", 4.0, 5.0, local_who())["generation"] == 1
    filler = fill_filesystem(tiny_tmpfs)
    with pytest.raises(OSError):
        log.append("line1", "recipe", "A", "B", local_who(), reason="x" * 20000)  # larger than what is left
    filler.unlink()
    promoted = log.append("line1", "promote", "A", "B", local_who())
    later = log.append("line1", "rollback", "B", "A", local_who())
    records = list(log.records())
    assert [r["what"] for r in records] == ["threshold", "promote", "rollback"], records
    assert [r["generation"] for r in records] == [1, 2, 3]
    assert (promoted["generation"], later["generation"]) == (2, 3)
    assert log.path.read_bytes().endswith(b"\n")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: it plays `sudo inspectd calibrate`")
def test_a_log_first_written_by_root_belongs_to_the_state_folders_owner(tmp_path: Path) -> None:
    """`sudo inspectd calibrate` is often the first to write the audit log: the file must stay
    writable by the service user who owns the state folder, or the daemon's own records fail."""
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, 65534, 65534)
    AuditLog(audit_path(state)).append("line1", "calibrate", None, 5.0, local_who())
    st = audit_path(state).stat()
    assert (st.st_uid, st.st_gid) == (65534, 65534)


def test_an_unreadable_audit_log_never_stops_inspection(tmp_path: Path, tiny_bundle: Path, synthetic_parts: Any) -> None:
    """The audit log cannot be read or written (here: a folder where the file should be; in the field:
    root-owned after a `sudo` command, or a broken disk). The daemon starts, a SIGHUP recalibration
    still applies (the record that could not be written is logged), and the line keeps judging."""
    state = tmp_path / "state"
    audit_path(state).mkdir(parents=True)
    replay = _replay(tmp_path, synthetic_parts)
    cfg = _config(tmp_path, replay, tiny_bundle)
    daemon = Daemon(cfg)
    col = _Collector(f"ipc://{tmp_path}/pub.sock")
    try:
        daemon.wait_log(r"ready: line1")
        col.wait(lambda: len(col.headers()) >= 5)
        _config(tmp_path, replay, tiny_bundle, threshold=6.0)
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_log(r"audit log .*: record not written")
        n = len(col.headers())
        col.wait(lambda: len([h for h in col.headers()[n:] if h["threshold"] == 6.0]) >= 5)
        assert daemon.proc.poll() is None
    finally:
        daemon.proc.send_signal(signal.SIGTERM)
        code = daemon.proc.wait(10)
        col.close()
    assert code == 0, "\n".join(daemon.lines[-20:])


def test_a_record_longer_than_the_tail_window_keeps_generations_increasing(tmp_path: Path) -> None:
    """The last generation is read from the end of the log; a last record longer than any fixed tail
    (64 KiB used to be read) must not make the next generation start again at 1. Nor must such a
    record followed by one torn by a crash."""
    log = AuditLog(tmp_path / "audit.jsonl")
    for _ in range(3):
        log.append("line1", "recipe", "A", "B", local_who(), "normal")
    assert log.append("line1", "recipe", "B", "A", local_who(), "x" * 200_000)["generation"] == 4
    assert log.generation() == 4
    assert log.append("line1", "recipe", "A", "B", local_who(), "normal")["generation"] == 5
    log.append("line1", "shadow", None, {"bundle": "b" * 150_000}, local_who())
    with log.path.open("ab") as f:
        f.write(b'{"time": "torn by a crash", "generation": 9')   # no newline: a torn last record
    assert log.generation() == 6
    assert log.append("line1", "promote", "A", "B", local_who())["generation"] == 7
    assert [r["generation"] for r in log.records()] == [1, 2, 3, 4, 5, 6, 7]


def test_a_huge_reason_over_the_control_socket_is_cut_never_refused(tmp_path: Path, tiny_bundle: Path,
                                                                     synthetic_parts: Any) -> None:
    """A recipe switch asked over the control socket (the CLI, MQTT and OPC UA bridges) with a ~65 KB
    reason: the switch is made, the audit keeps the first 1,000 characters (ending with an
    ellipsis), and generations stay strictly increasing: the long record used to restart them at 1."""
    replay = _replay(tmp_path, synthetic_parts)
    cfg = _config(tmp_path, replay, tiny_bundle,
                  recipes=[{"name": "B", "bundle": str(tiny_bundle), "threshold": 3.0}])
    sock = socket_path(tmp_path / "state")
    daemon = Daemon(cfg)
    try:
        daemon.wait_log(r"ready: line1")
        long_reason = "order 4711 " + "x" * 65_200          # the request still fits the socket's 64 KiB
        for name, reason in (("B", long_reason), ("default", "back"), ("B", "again")):
            answer = request(sock, {"op": "recipe", "line": "line1", "name": name, "reason": reason})
            assert answer["ok"], answer
    finally:
        daemon.proc.send_signal(signal.SIGTERM)
        code = daemon.proc.wait(10)
    assert code == 0, "\n".join(daemon.lines[-20:])
    records = list(AuditLog(audit_path(tmp_path / "state")).records())
    assert [(r["what"], r["new"]["recipe"]) for r in records] == [("recipe", "B"), ("recipe", "default"),
                                                                  ("recipe", "B")], records
    assert [r["generation"] for r in records] == [1, 2, 3]
    cut = records[0]["reason"]
    assert len(cut) == 1000 and cut.endswith("…") and cut[:-1] == long_reason[:999]
    assert [r["reason"] for r in records[1:]] == ["back", "again"]
