"""The audit trail: every change to what decides verdicts (bundle, threshold, recipe, ROI, shadow,
promote, rollback, calibrate, a SIGHUP reload that changed something) as one JSON line in
`<state_dir>/audit.jsonl`.

Each record is written with ONE os.write on an O_APPEND descriptor, then fsync'd: records from
the daemon and from commands (`inspectd calibrate`) never interleave or overwrite each other, and
the file is never rewritten. An exclusive flock around read-last-generation + append makes the
`generation` (the config generation: +1 per record) strictly increasing across processes.

Record: {"time": ISO-8601 UTC, "time_ns", "generation", "line", "what", "old", "new", "reason",
"who": {"uid", "user", "pid", "via"}, ...}.
"""

from __future__ import annotations

import fcntl
import json
import os
import pwd
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from inspectd.errors import ConfigError

AUDIT_FILE = "audit.jsonl"
AUDIT_MODE = 0o640
_TAIL_BYTES = 65536
MAX_REASON_CHARS = 1000  # a reason is a note for people; requester is capped at 200 (control.py)


def audit_path(state_dir: str | os.PathLike) -> Path:
    return Path(state_dir) / AUDIT_FILE


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def local_who(via: str = "cli") -> dict[str, Any]:
    """The calling process as the `who` of a record (commands run locally)."""
    uid = os.getuid()
    return {"uid": uid, "user": user_name(uid), "pid": os.getpid(), "via": via}


def cap_reason(reason: str | None) -> str | None:
    """A reason as recorded: at most MAX_REASON_CHARS, cut with an ellipsis (never refused: the
    change matters more than its note, and a huge note would bloat every reader of the log)."""
    if reason is None or len(reason) <= MAX_REASON_CHARS:
        return reason
    return reason[:MAX_REASON_CHARS - 1] + "\u2026"


def _last_generation(fd: int) -> int:
    """The generation of the last readable record. Reads back from the end in growing windows until
    a complete line parses: a record can be longer than any fixed tail (a long `old`/`new`), and a
    tail holding only part of one must not read as 0 (the next generation would restart at 1)."""
    pos = os.fstat(fd).st_size
    step = _TAIL_BYTES
    head = b""  # the start of the earliest line read so far: incomplete until its newline is read
    while pos > 0:
        start = max(0, pos - step)
        lines = (os.pread(fd, pos - start, start) + head).split(b"\n")
        pos = start
        head = lines.pop(0) if start > 0 else b""
        for raw in reversed(lines):
            try:
                return int(json.loads(raw)["generation"])
            except (ValueError, KeyError, TypeError):
                continue  # a record torn by a crash, or a foreign line: the one before counts
        step *= 2  # a long line: fewer, larger reads
    return 0


class AuditLog:
    """Append-only JSON lines; `append()` returns the record written (with its generation)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def generation(self) -> int:
        """The generation of the last record (0: no change recorded yet)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                return _last_generation(fd)
            finally:
                os.close(fd)
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise ConfigError(f"{self.path}: cannot read the audit log ({exc.strerror or exc})") from None

    def _open_for_append(self) -> int:
        """O_APPEND descriptor; a log created here belongs to the state folder's owner, so a first
        record written by root (`sudo inspectd calibrate`) leaves it writable by the service user."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, AUDIT_MODE)
            except FileExistsError:  # (O_CREAT too: a dangling symlink is created through, as before)
                return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, AUDIT_MODE)
        except OSError as exc:
            raise ConfigError(f"{self.path}: cannot open the audit log ({exc.strerror or exc})") from None
        folder = os.stat(self.path.parent)
        if os.geteuid() == 0:
            try:
                os.fchown(fd, folder.st_uid, folder.st_gid)
            except OSError:
                pass  # the record matters more than its owner
        return fd

    def append(self, line: str | None, what: str, old: Any, new: Any, who: dict[str, Any],
               reason: str | None = None, **extra: Any) -> dict[str, Any]:
        fd = self._open_for_append()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            rfd = os.open(self.path, os.O_RDONLY)
            try:
                generation = _last_generation(rfd) + 1
                size = os.fstat(rfd).st_size
                torn = size > 0 and os.pread(rfd, 1, size - 1) != b"\n"
            finally:
                os.close(rfd)
            now_ns = time.time_ns()
            record = {"time": datetime.fromtimestamp(now_ns / 1e9, timezone.utc).isoformat(timespec="milliseconds"),
                      "time_ns": now_ns, "generation": generation, "line": line, "what": what,
                      "old": old, "new": new, "reason": reason, "who": who, **extra}
            data = (json.dumps(record, default=str, separators=(",", ":")) + "\n").encode()
            if torn:
                data = b"\n" + data  # a record torn by a crash stays its own (unreadable) line
            try:
                written = os.write(fd, data)   # one write on O_APPEND: never interleaved with another writer
                if written != len(data):
                    raise OSError(f"short write to {self.path} ({written} of {len(data)} bytes)")
                os.fsync(fd)
            except OSError:
                try:  # a full disk tore the record: take it back (we hold the lock), never glue the next to it
                    os.ftruncate(fd, size)
                except OSError:
                    pass
                raise
            return record
        finally:
            os.close(fd)   # releases the flock

    def records(self, line: str | None = None) -> Iterator[dict[str, Any]]:
        try:
            with self.path.open("rb") as f:
                for raw in f:
                    try:
                        rec = json.loads(raw)
                    except ValueError:
                        continue
                    if line is None or rec.get("line") == line:
                        yield rec
        except FileNotFoundError:
            return


def format_record(rec: dict[str, Any]) -> str:
    who = rec.get("who") or {}
    by = f"{who.get('user', '?')}(uid {who.get('uid', '?')})"
    if who.get("via"):
        by += f" via {who['via']}"
    if who.get("peer_pid") is not None:
        by += f" pid {who['peer_pid']}"
    reason = f"  reason: {rec['reason']}" if rec.get("reason") else ""
    return (f"{rec.get('time')}  gen {rec.get('generation')}  {rec.get('line') or '-'}  {rec.get('what')}: "
            f"{json.dumps(rec.get('old'), default=str)} -> {json.dumps(rec.get('new'), default=str)}  by {by}{reason}")
