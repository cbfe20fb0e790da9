"""Subscriber for inspectd verdicts: the building block for reject-signal consumers.

`VerdictSubscriber` connects a ZeroMQ SUB socket to the daemon's publisher, parses the JSON
headers and watches the stream's health:

* **gaps**: `seq` counts per topic from 0 since daemon start; a jump means messages were lost
  (slow consumer, network) and `on_gap(topic, expected, got)` is called (`got - expected` lost).
  Heartbeats carry the last seq sent per data topic, so a loss at the end of a burst is reported
  at the next heartbeat (then `got` is the seq the next message will have);
* **restarts**: `daemon_start_ns` changes or `seq` goes back -> `on_restart(line)`;
* **heartbeat loss**: no heartbeat for a line within `heartbeat_timeout_s` ->
  `on_heartbeat_lost(line)` (once per loss; `on_heartbeat_restored(line)` when it returns).
  With `lines=[...]` the clock starts at connect, so a daemon that never comes up is noticed too.

* **line status**: each heartbeat carries the line's status (camera connected, engine ready,
  state starting|ok|blind|engine_failed|failing_safe). `line_status(line)` / `line_statuses` return the latest
  `LineStatus`, and `on_line_status(line, status)` is called whenever it changes, including when
  heartbeats stop and, with `verdict_timeout_s`, when heartbeats flow but verdicts do not.
  `LineStatus.safe` is True only while the line is known to be inspecting parts.

It runs either in the caller's thread (`poll_once(timeout)` or iterating `messages()`) or in its
own thread (`start()` / `stop()`); the socket lives in exactly one thread, and callbacks run in
that thread. Never both styles on one subscriber.

A complete reject gate that fails safe (rejects everything) on camera loss, engine failure,
heartbeat loss, lost verdicts and daemon restarts is `examples/reject_gate.py`; its core::

    from inspectd.client import VerdictSubscriber

    def on_status(line, status):
        if not status.safe:                    # camera lost, engine failed, heartbeat lost, ...
            gate.reject_all(line, status.reason)
        else:
            gate.resume(line)

    def on_verdict(msg):
        if msg.header["verdict"] != "OK":      # NG and SKIP (fail-safe) both reject
            gate.reject_part(msg.header["frame_id"])

    sub = VerdictSubscriber("tcp://127.0.0.1:5555", lines=["line1"], heartbeat_timeout_s=3.0,
                            on_verdict=on_verdict, on_line_status=on_status,
                            on_gap=lambda topic, expected, got: gate.reject_all(
                                topic, f"{got - expected} messages lost"))

This module does not import torch and needs only pyzmq and numpy (OpenCV only to decode PNG
heatmaps).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import zmq

from inspectd.errors import ConfigError, InspectdError

log = logging.getLogger(__name__)

ZMTP_PING_IVL_MS = 1000      # connection-level pings: a peer silent this long after one is gone
ZMTP_PING_TIMEOUT_MS = 3000
KINDS = ("verdict", "heatmap", "heartbeat", "shadow")   # shadow.<line>: a candidate bundle's verdicts


@dataclass
class Message:
    """One received message. `kind` is verdict|heatmap|heartbeat; `payload` is the heatmap bytes."""

    topic: str
    kind: str
    line: str
    header: dict[str, Any]
    payload: bytes | None = None

    def heatmap_image(self) -> np.ndarray:
        """The heatmap as a uint8 H x W array (decodes PNG or reshapes raw bytes)."""
        if self.kind != "heatmap" or self.payload is None:
            raise InspectdError(f"{self.topic}: message has no heatmap payload")
        encoding = self.header.get("encoding")
        if encoding == "png":
            import cv2

            img = cv2.imdecode(np.frombuffer(self.payload, np.uint8), cv2.IMREAD_UNCHANGED)
            if img is None:
                raise InspectdError(f"{self.topic}: heatmap PNG cannot be decoded")
            return img
        if encoding == "raw":
            h, w = self.header["shape"]
            if len(self.payload) != h * w:
                raise InspectdError(f"{self.topic}: raw heatmap has {len(self.payload)} bytes, shape says {h}x{w}")
            return np.frombuffer(self.payload, np.uint8).reshape(h, w).copy()
        raise InspectdError(f"{self.topic}: unknown heatmap encoding {encoding!r}")


@dataclass(frozen=True)
class CurveClientKeys:
    """CURVE keys for an encrypted publisher: the server's public key and this client's key pair
    (all Z85, e.g. from zmq.curve_keypair())."""

    server_public_key: bytes
    public_key: bytes
    secret_key: bytes

    @classmethod
    def from_files(cls, server_key_file: str | Path, client_secret_key_file: str | Path) -> "CurveClientKeys":
        """From `inspectd keys` files: the server's NAME.key (public) and this client's
        NAME.key_secret (must be private, mode 0600). ConfigError when either is unusable."""
        from inspectd.keys import load_public_key_file, load_secret_key_file

        server = load_public_key_file(server_key_file, "server public key")
        public, secret = load_secret_key_file(client_secret_key_file, "client secret key")
        return cls(server_public_key=server, public_key=public, secret_key=secret)


LINE_STATES = ("starting", "ok", "blind", "engine_failed", "failing_safe", "stopping")


@dataclass(frozen=True)
class LineStatus:
    """What a consumer knows about one line. `state` is the daemon's own word (LINE_STATES) or
    "unknown" (no heartbeat yet, or a daemon that does not say); `camera_connected` and
    `engine_ready` are None when the daemon did not say. `heartbeat` is False until the first
    heartbeat and while heartbeats are missing; `quiet` is True while heartbeats flow but no
    verdict came for `verdict_timeout_s` (only with that option)."""

    line: str
    state: str = "unknown"
    camera_connected: bool | None = None
    engine_ready: bool | None = None
    heartbeat: bool = False
    quiet: bool = False
    error: str | None = None
    heartbeat_seen: bool = False
    status: dict = field(default_factory=dict, compare=False, repr=False)  # the raw heartbeat status

    @property
    def safe(self) -> bool:
        """True only while parts on this line are being inspected and reported."""
        return self.heartbeat and self.state == "ok" and not self.quiet

    @property
    def reason(self) -> str:
        """Why the line is not safe, in a few words ("ok" when it is)."""
        if not self.heartbeat:
            return "heartbeat lost" if self.heartbeat_seen else "no heartbeat yet"
        if self.state == "blind":
            return "camera lost"
        if self.state == "engine_failed":
            return f"engine failed: {self.error}" if self.error else "engine failed"
        if self.state == "failing_safe":
            return f"failing parts safe: {self.error}" if self.error else "failing parts safe"
        if self.state == "starting":
            return "line starting"
        if self.state == "stopping":
            return "daemon stopping"
        if self.state != "ok":
            return "line status unknown"
        if self.quiet:
            return "no verdicts"
        return "ok"

    def _key(self) -> tuple:
        return (self.state, self.camera_connected, self.engine_ready, self.heartbeat, self.quiet, self.error)


def _opt_bool(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def line_status_from_heartbeat(line: str, status: Any) -> LineStatus:
    """A LineStatus from a heartbeat's `status` dict. Missing or malformed keys are "unknown";
    a daemon without `state` gets one derived from what it does say (failed, camera, ready)."""
    status = status if isinstance(status, dict) else {}
    camera = _opt_bool(status.get("camera_connected"))
    engine = _opt_bool(status.get("engine_ready"))
    failed = status.get("failed")
    if engine is None and status.get("ready") is True:
        engine = True  # older daemons: "ready" = engine warm and source open
    state = status.get("state")
    if "state" in status and state not in LINE_STATES:
        # A state this client does not know (a newer daemon's) is never read as "ok": whatever the
        # camera and engine flags say, the line may not be inspecting (e.g. stopping, to older clients).
        state = "unknown"
    elif state not in LINE_STATES:  # an older daemon without "state": derived from what it does say
        if failed:
            state = "engine_failed"
        elif camera is False:
            state = "blind"
        elif camera is True and engine is True:
            state = "ok"
        else:
            state = "unknown"
    error = None
    if state == "failing_safe" and isinstance(status.get("failing_safe"), str):
        error = status["failing_safe"]
    elif state != "ok":
        error = failed if isinstance(failed, str) and failed else None
        if error is None and isinstance(status.get("last_error"), str):
            error = status["last_error"] or None
    return LineStatus(line=line, state=state, camera_connected=camera, engine_ready=engine, heartbeat=True,
                      error=error, heartbeat_seen=True, status=dict(status))


def parse_message(parts: Sequence[bytes]) -> Message:
    """Parse one multipart message; raises ValueError with a short reason when malformed."""
    if len(parts) not in (2, 3):
        raise ValueError(f"expected 2 or 3 frames, got {len(parts)}")
    topic = parts[0].decode("utf-8")
    kind, sep, line = topic.partition(".")
    if not sep or kind not in KINDS or not line:
        raise ValueError(f"unknown topic {topic!r}")
    header = json.loads(parts[1].decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    seq = header.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise ValueError(f"header seq {seq!r} is not a non-negative integer")
    if header.get("line", line) != line:
        raise ValueError(f"header line {header.get('line')!r} does not match topic {topic!r}")
    return Message(topic=topic, kind=kind, line=line, header=header,
                   payload=bytes(parts[2]) if len(parts) == 3 else None)


class VerdictSubscriber:
    """SUB socket + stream health checks. See the module docstring."""

    def __init__(self, endpoint: str | Sequence[str], lines: Sequence[str] | None = None,
                 topics: Sequence[str] = ("verdict", "heartbeat"), heartbeat_timeout_s: float | None = 3.0,
                 on_verdict: Callable[[Message], None] | None = None,
                 on_heatmap: Callable[[Message], None] | None = None,
                 on_heartbeat: Callable[[Message], None] | None = None,
                 on_gap: Callable[[str, int, int], None] | None = None,
                 on_heartbeat_lost: Callable[[str], None] | None = None,
                 on_heartbeat_restored: Callable[[str], None] | None = None,
                 on_restart: Callable[[str], None] | None = None,
                 rcvhwm: int = 10000, curve: CurveClientKeys | None = None,
                 on_line_status: Callable[[str, LineStatus], None] | None = None,
                 verdict_timeout_s: float | None = None) -> None:
        self.endpoints = [endpoint] if isinstance(endpoint, str) else list(endpoint)
        if not self.endpoints or not all(isinstance(e, str) and "://" in e for e in self.endpoints):
            raise ConfigError(f"ZeroMQ endpoint must look like tcp://HOST:PORT or ipc://PATH, got {endpoint!r}")
        bad = [t for t in topics if t not in KINDS]
        if bad or not topics:
            raise ConfigError(f"topics must be among {', '.join(KINDS)}, got {list(topics)!r}")
        if heartbeat_timeout_s is not None and not heartbeat_timeout_s > 0:
            raise ConfigError(f"heartbeat timeout must be > 0 s, got {heartbeat_timeout_s}")
        if verdict_timeout_s is not None and not verdict_timeout_s > 0:
            raise ConfigError(f"verdict timeout must be > 0 s, got {verdict_timeout_s}")
        self.lines = list(lines) if lines is not None else None
        self.topics = tuple(topics)
        # Heartbeat loss can only be judged when heartbeats are subscribed.
        self.heartbeat_timeout_s = heartbeat_timeout_s if "heartbeat" in self.topics else None
        self.on_verdict = on_verdict
        self.on_heatmap = on_heatmap
        self.on_heartbeat = on_heartbeat
        self.on_gap = on_gap
        self.on_heartbeat_lost = on_heartbeat_lost
        self.on_heartbeat_restored = on_heartbeat_restored
        self.on_restart = on_restart
        self.on_line_status = on_line_status
        # "No verdicts for this long while heartbeats flow" makes a line quiet (not safe); off by
        # default because a triggered line with no parts is legitimately quiet.
        self.verdict_timeout_s = verdict_timeout_s if "verdict" in self.topics else None
        self.rcvhwm = rcvhwm
        self.curve = curve
        # Stream health, readable from other threads for display (plain ints / dicts).
        self.received = 0
        self.malformed = 0
        self.lost = 0                              # sum of all gaps
        self._last_seq: dict[str, int] = {}        # topic -> last seq seen
        self._start_ns: dict[str, int] = {}        # line -> daemon_start_ns seen
        self._last_heartbeat: dict[str, float] = {}  # line -> monotonic time of last heartbeat
        self._heartbeat_lost: set[str] = set()
        self._last_verdict: dict[str, float] = {}   # line -> monotonic time of last verdict
        self._status: dict[str, LineStatus] = {}    # replaced whole, so other threads may read it
        self._ctx: zmq.Context | None = None
        self._sock: zmq.Socket | None = None
        self._owner: int | None = None             # thread ident that owns the socket
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # ---- socket lifetime (in the owning thread) -----------------------------------------------

    def _open(self) -> zmq.Socket:
        if self._sock is not None:
            if self._owner != threading.get_ident():
                raise InspectdError("VerdictSubscriber socket belongs to another thread "
                                    "(use either poll_once/messages or start/stop)")
            return self._sock
        ctx = zmq.Context()
        sock = ctx.socket(zmq.SUB)
        try:
            sock.setsockopt(zmq.RCVHWM, self.rcvhwm)
            sock.setsockopt(zmq.LINGER, 0)
            # A daemon whose box lost power never closes its end: without pings the connection looks
            # up forever and ZeroMQ never reconnects when the daemon is back (ZMTP 3.1 PING / PONG).
            sock.setsockopt(zmq.HEARTBEAT_IVL, ZMTP_PING_IVL_MS)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, ZMTP_PING_TIMEOUT_MS)
            if self.curve is not None:
                sock.curve_serverkey = self.curve.server_public_key
                sock.curve_publickey = self.curve.public_key
                sock.curve_secretkey = self.curve.secret_key
            for prefix in self._prefixes():
                sock.setsockopt(zmq.SUBSCRIBE, prefix.encode())
            for ep in self.endpoints:
                sock.connect(ep)
        except (zmq.ZMQError, ValueError, TypeError) as exc:
            sock.close(0)
            ctx.term()
            raise InspectdError(f"cannot connect subscriber to {', '.join(self.endpoints)}: {exc}") from exc
        self._ctx, self._sock, self._owner = ctx, sock, threading.get_ident()
        now = time.monotonic()
        for line in self.lines or ():
            self._last_heartbeat.setdefault(line, now)  # expected lines: the clock runs from connect
            self._status.setdefault(line, LineStatus(line))
        return sock

    def _prefixes(self) -> list[str]:
        if self.lines is None:
            return [f"{kind}." for kind in self.topics]
        # A prefix "verdict.line1" also matches "verdict.line10": exact lines are filtered on receipt.
        return [f"{kind}.{line}" for kind in self.topics for line in self.lines]

    def close(self) -> None:
        """Close the socket (from the thread that polled). Idempotent."""
        if self._sock is not None:
            self._sock.close(0)
            self._ctx.term()
            self._sock = self._ctx = self._owner = None

    def __enter__(self) -> "VerdictSubscriber":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self.stop()
        else:
            self.close()

    # ---- caller-thread style -------------------------------------------------------------------

    def poll_once(self, timeout: float) -> Message | None:
        """Wait up to `timeout` seconds for one message; handle it (callbacks, gap/restart checks)
        and return it. Heartbeat timeouts are checked on every call. None when nothing came."""
        if self._thread is not None and self._owner != threading.get_ident():
            raise InspectdError("VerdictSubscriber runs in its own thread; do not call poll_once")
        sock = self._open()
        msg = None
        if sock.poll(max(0, int(timeout * 1000))):
            parts = sock.recv_multipart(zmq.NOBLOCK)
            msg = self._handle(parts)
        self._check_heartbeats()
        return msg

    def messages(self, poll_s: float = 0.1, duration: float | None = None) -> Iterator[Message]:
        """Yield messages as they come (until `duration` seconds, or forever)."""
        end = None if duration is None else time.monotonic() + duration
        while end is None or time.monotonic() < end:
            wait = poll_s if end is None else max(0.0, min(poll_s, end - time.monotonic()))
            msg = self.poll_once(wait)
            if msg is not None:
                yield msg

    # ---- own-thread style -----------------------------------------------------------------------

    def start(self) -> None:
        """Receive in a background thread; callbacks run there. Raises InspectdError when the
        socket cannot be set up."""
        if self._thread is not None or self._sock is not None:
            raise InspectdError("subscriber already running")
        ready = threading.Event()
        error: list[BaseException] = []

        def run() -> None:
            try:
                self._open()
            except InspectdError as exc:
                error.append(exc)
                ready.set()
                return
            ready.set()
            try:
                while not self._stop.is_set():
                    try:
                        self.poll_once(0.1)
                    except Exception:  # the heartbeat checks must outlive any one bad message
                        log.exception("subscriber: receiving failed; going on")
                        time.sleep(0.1)
            finally:
                self.close()

        self._stop.clear()
        self._thread = threading.Thread(target=run, name="inspectd-subscriber", daemon=True)
        self._thread.start()
        ready.wait(10)
        if error:
            self._thread.join(5)
            self._thread = None
            raise error[0]

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop the background thread (it closes the socket). True when it ended in time."""
        if self._thread is None:
            return True
        self._stop.set()
        self._thread.join(timeout)
        alive = self._thread.is_alive()
        if not alive:
            self._thread = None
        return not alive

    # ---- stream health --------------------------------------------------------------------------

    def _call(self, fn: Callable | None, *args: Any) -> None:
        if fn is None:
            return
        try:
            fn(*args)
        except Exception:  # a consumer bug must not stop the subscriber (and its heartbeat checks)
            log.exception("subscriber callback %s failed", getattr(fn, "__name__", fn))

    def _handle(self, parts: list[bytes]) -> Message | None:
        try:
            msg = parse_message(parts)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
            self.malformed += 1
            if self.malformed == 1 or self.malformed % 100 == 0:
                log.warning("ignoring malformed message (%d so far): %s", self.malformed, exc)
            return None
        if self.lines is not None and msg.line not in self.lines:
            return None  # prefix match of a longer line name
        self.received += 1
        self._track(msg)
        if msg.kind == "verdict":
            self._last_verdict[msg.line] = time.monotonic()
            if self.verdict_timeout_s is not None or msg.line not in self._status:
                self._update_status(msg.line)  # only the quiet flag depends on verdicts
            self._call(self.on_verdict, msg)
        elif msg.kind == "heatmap":
            self._call(self.on_heatmap, msg)
        elif msg.kind == "shadow":
            pass  # returned by poll_once; never a line's verdict or status
        else:
            self._call(self.on_heartbeat, msg)
        return msg

    def _track(self, msg: Message) -> None:
        seq = msg.header["seq"]
        start_ns = msg.header.get("daemon_start_ns")
        restarted = False
        if isinstance(start_ns, int):
            known = self._start_ns.get(msg.line)
            if known is not None and known != start_ns:
                restarted = True
            self._start_ns[msg.line] = start_ns
        last = self._last_seq.get(msg.topic)
        if not restarted and last is not None and seq <= last:
            restarted = True  # seq went back: a daemon without daemon_start_ns restarted
        if restarted:
            self._call(self.on_restart, msg.line)
            # A new daemon counts every topic of the line from 0 again.
            for kind in KINDS:
                self._last_seq[f"{kind}.{msg.line}"] = -1
            last = -1
        if last is not None and seq != last + 1:
            self.lost += seq - (last + 1)
            self._call(self.on_gap, msg.topic, last + 1, seq)
        # A first message (last is None) sets the baseline: joining late is not a loss.
        self._last_seq[msg.topic] = seq
        # Any sign of a line starts its heartbeat clock (lines=None: lines are learnt as they appear).
        self._last_heartbeat.setdefault(msg.line, time.monotonic())
        if msg.kind == "heartbeat":
            self._check_tail_loss(msg)
            now = time.monotonic()
            self._last_heartbeat[msg.line] = now
            self._last_verdict.setdefault(msg.line, now)  # the quiet clock starts with the line
            if msg.line in self._heartbeat_lost:
                self._heartbeat_lost.discard(msg.line)
                self._call(self.on_heartbeat_restored, msg.line)
            self._update_status(msg.line, line_status_from_heartbeat(msg.line, msg.header.get("status")))

    def _check_tail_loss(self, msg: Message) -> None:
        """Compare the heartbeat's `last_seq` with what arrived: messages lost at the end of a burst
        show up here rather than waiting for the next verdict."""
        last_seq = msg.header.get("last_seq")
        if not isinstance(last_seq, dict):
            return  # a publisher without the field: gaps are found on the next data message only
        for kind in self.topics:
            if kind == "heartbeat":
                continue
            topic = f"{kind}.{msg.line}"
            sent = last_seq.get(topic, -1)   # absent: nothing sent on it since the daemon started
            if not isinstance(sent, int) or isinstance(sent, bool):
                continue
            seen = self._last_seq.get(topic)
            if seen is not None and sent > seen:
                self.lost += sent - seen
                self._call(self.on_gap, topic, seen + 1, sent + 1)
            if seen is None or sent > seen:
                self._last_seq[topic] = sent

    def _check_heartbeats(self) -> None:
        if self.heartbeat_timeout_s is not None:
            now = time.monotonic()
            for line, seen in list(self._last_heartbeat.items()):
                if line not in self._heartbeat_lost and now - seen > self.heartbeat_timeout_s:
                    self._heartbeat_lost.add(line)
                    self._call(self.on_heartbeat_lost, line)
                    self._update_status(line)
        if self.verdict_timeout_s is not None:
            for line in list(self._status):
                self._update_status(line)  # the quiet flag changes with time alone

    def _update_status(self, line: str, new: LineStatus | None = None) -> None:
        """Recompute the line's status (heartbeat and quiet flags on top of the daemon's word) and
        call on_line_status when it changed."""
        old = self._status.get(line)
        base = new if new is not None else (old or LineStatus(line))
        heartbeat = base.heartbeat_seen and line not in self._heartbeat_lost
        quiet = False
        if self.verdict_timeout_s is not None and heartbeat:
            last = self._last_verdict.get(line)
            quiet = last is not None and time.monotonic() - last > self.verdict_timeout_s
        status = replace(base, heartbeat=heartbeat, quiet=quiet)
        self._status[line] = status
        if old is None or old._key() != status._key():
            self._call(self.on_line_status, line, status)

    def heartbeat_lost(self, line: str) -> bool:
        """True while `line` has no heartbeat within the timeout."""
        return line in self._heartbeat_lost

    def line_status(self, line: str) -> LineStatus:
        """The latest status of `line` (state "unknown", heartbeat False before its first heartbeat)."""
        return self._status.get(line) or LineStatus(line)

    @property
    def line_statuses(self) -> dict[str, LineStatus]:
        """Latest status of every known line (a copy; safe to read from any thread)."""
        return dict(self._status)
