"""The daemon's local control socket: `<state_dir>/control.sock` (AF_UNIX stream), one JSON request
and one JSON response per connection.

Authentication is the file system: the socket is created mode 0660 (owner: the daemon's user,
group: its group), so only that user, root and members of the group can connect(2) at all (the
`inspectd recipe|promote|rollback` commands and the bridges, which run on the same box in that
group). As a second check the daemon reads the peer's credentials (SO_PEERCRED) and refuses a
peer that is not root, not the daemon's user and not in the socket's group (e.g. someone made
the socket world-writable). The peer's uid/user/pid go into the audit record of every change.

Requests: {"op": "list"|"recipe"|"shadow"|"promote"|"rollback", "line": L, ...,
"reason": optional text (cut to 1,000 characters), "via": "cli"|"mqtt"|"opcua", "requester": optional text,
"answer_within_s": how long the requester waits (a change not done by then is not made)}.
Responses: {"ok": true, ...} or {"ok": false, "error": "why"}.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import struct
import threading
import time
from pathlib import Path
from typing import Any, Callable

from inspectd.daemon.audit import cap_reason, user_name
from inspectd.errors import InspectdError

log = logging.getLogger("inspectd.control")

SOCKET_NAME = "control.sock"
SOCKET_MODE = 0o660
MAX_REQUEST = 65536
IO_TIMEOUT_S = 5.0
CLIENT_TIMEOUT_S = 330.0   # a switch may load and parity-gate an engine
ANSWER_MARGIN_S = 1.0      # a change is made only if its answer can still reach the requester in time


def answer_deadline(request: dict, received_mono: float) -> float | None:
    """The monotonic time after which a change asked for by `request` must not be made any more: the
    requester said how long it waits (answer_within_s); None if it did not say."""
    wait = request.get("answer_within_s")
    if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not wait > 0:
        return None
    return received_mono + float(wait) - ANSWER_MARGIN_S


def socket_path(state_dir: str | os.PathLike) -> Path:
    return Path(state_dir) / SOCKET_NAME


def peer_credentials(conn: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the connected process."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)


SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13; Python names it only in some builds
_MAX_GROUPS = 256   # Python's getsockopt buffer is at most 1024 bytes; more groups: /proc (ERANGE)


def peer_groups(conn: socket.socket, pid: int) -> set[int]:
    """The connected process's supplementary groups: from the socket itself (SO_PEERGROUPS), so it
    works where /proc is hidden (the unit's ProtectProc=invisible); /proc/<pid>/status otherwise."""
    try:
        raw = conn.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * _MAX_GROUPS)
        return set(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
    except OSError:
        pass
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Groups:"):
                return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return set()


class ControlServer:
    """Accepts connections on its own thread; each request is handled on a short-lived thread by
    `handler(request, who) -> response dict` (exceptions become {"ok": false, "error": ...})."""

    def __init__(self, path: str | os.PathLike, handler: Callable[[dict, dict], dict]) -> None:
        self.path = Path(path)
        self.handler = handler
        self.refused = 0
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if len(str(self.path).encode()) >= 107:
            raise InspectdError(f"control socket path too long for AF_UNIX: {self.path}")
        if self.path.exists() or self.path.is_symlink():
            if not stat.S_ISSOCK(self.path.lstat().st_mode):
                raise InspectdError(f"{self.path} exists and is not a socket; not replacing it")
            self.path.unlink()   # a stale socket of a daemon that did not exit cleanly
        # Bound under a temporary name, chmod'ed, then renamed: never reachable with a wider mode.
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        if tmp.exists():
            tmp.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(tmp))
            os.chmod(tmp, SOCKET_MODE)
            os.replace(tmp, self.path)
            sock.listen(16)
        except OSError as exc:
            sock.close()
            raise InspectdError(f"cannot create the control socket {self.path}: {exc.strerror or exc}") from None
        sock.settimeout(0.5)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self._thread.start()
        log.info("control socket %s (mode %04o)", self.path, SOCKET_MODE)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
        if self._sock is not None:
            self._sock.close()
        try:
            self.path.unlink()
        except OSError:
            pass

    def authorized(self, uid: int, gid: int, groups: set[int]) -> bool:
        try:
            sock_gid = os.stat(self.path).st_gid
        except OSError:
            sock_gid = os.getegid()
        return uid == 0 or uid == os.geteuid() or gid == sock_gid or sock_gid in groups

    def _serve(self) -> None:
        sock = self._sock  # start() sets it before this thread starts
        if sock is None:
            return
        while not self._stop.is_set():
            try:
                conn, _ = sock.accept()
            except socket.timeout:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                continue
            threading.Thread(target=self._handle, args=(conn,), name="control-req", daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(IO_TIMEOUT_S)
                pid, uid, gid = peer_credentials(conn)
                who = {"uid": uid, "user": user_name(uid), "gid": gid, "peer_pid": pid, "via": "socket"}
                if not self.authorized(uid, gid, peer_groups(conn, pid)):
                    try:   # read (and ignore) the request: closing with unread data would reset the answer
                        _read_request(conn)
                    except (OSError, ValueError):
                        pass
                    self.refused += 1
                    log.warning("control: refused uid %d (%s) pid %d: not root, the daemon's user or in the "
                                "socket's group", uid, who["user"], pid)
                    response: dict[str, Any] = {"ok": False, "error": f"not authorized: uid {uid} ({who['user']}) "
                                                f"is not root, the daemon's user or in the socket's group"}
                else:
                    request = _read_request(conn)
                    request["_received_mono"] = time.monotonic()
                    via = request.get("via")
                    if isinstance(via, str) and via in ("cli", "mqtt", "opcua"):
                        who["via"] = f"socket/{via}"
                    if isinstance(request.get("requester"), str):
                        who["requester"] = request["requester"][:200]
                    if isinstance(request.get("reason"), str):  # cut, never refused: it lands in the audit log
                        request["reason"] = cap_reason(request["reason"])
                    try:
                        response = dict(self.handler(request, who), ok=True)
                    except InspectdError as exc:
                        response = {"ok": False, "error": str(exc)}
                    except Exception as exc:  # a bug in one request never takes the socket down
                        log.exception("control request failed")
                        response = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                conn.sendall(json.dumps(response, default=str).encode() + b"\n")
            except (OSError, ValueError) as exc:
                log.warning("control: bad request: %s", exc)
                try:
                    conn.sendall(json.dumps({"ok": False, "error": f"bad request: {exc}"}).encode() + b"\n")
                except OSError:
                    pass


def _read_request(conn: socket.socket) -> dict:
    data = b""
    while b"\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST:
            raise ValueError("request too large")
    request = json.loads(data.decode("utf-8") or "null")
    if not isinstance(request, dict):
        raise ValueError("expected a JSON object")
    return request


def request(path: str | os.PathLike, payload: dict, timeout_s: float = CLIENT_TIMEOUT_S) -> dict:
    """One request to the daemon's control socket; InspectdError when it cannot be reached
    (PermissionError: this user may not use it)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        try:
            sock.connect(str(path))
        except PermissionError:
            raise InspectdError(f"{path}: permission denied: the control socket is for the daemon's user and "
                                f"group (run as that user, or add yours to the group)") from None
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise InspectdError(f"{path}: no daemon listening ({exc.strerror or exc})") from None
        # How long we wait: a change the daemon cannot finish within it is not made (see ANSWER_MARGIN_S).
        payload = dict(payload, answer_within_s=payload.get("answer_within_s", timeout_s))
        sock.sendall(json.dumps(payload).encode() + b"\n")
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except socket.timeout:
        raise InspectdError(f"{path}: no answer within {timeout_s:.0f} s") from None
    except (BrokenPipeError, ConnectionResetError):  # the daemon stopped with our connection queued
        raise InspectdError(f"{path}: the daemon closed the connection without an answer (stopping?)") from None
    finally:
        sock.close()
    try:
        return json.loads(data.decode())
    except ValueError:
        raise InspectdError(f"{path}: malformed answer {data[:200]!r}") from None
