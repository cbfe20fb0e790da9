"""ZeroMQ publisher: verdicts, heatmaps and heartbeats on one PUB socket.

The socket is created, bound, used and closed by ONE thread (ZeroMQ sockets are not thread
safe); the pipeline and the deadline keeper hand it work through a thread-safe queue and never
block on the network. Message format (docs/ARCHITECTURE.md): multipart
[topic utf-8, JSON header utf-8, optional binary payload] on topics `verdict.<line>`,
`heatmap.<line>` and `heartbeat.<line>`; `seq` counts per topic from 0 since daemon start and is
stamped, like `published_ns`, when the message is actually sent, so a subscriber that sees a
gap in seq knows messages were lost on the wire (PUB drops at the high-water mark).

Additions to the contract: every header also carries `daemon_start_ns`, so a subscriber can tell a
daemon restart from a gap on any topic; heartbeats carry `last_seq` ({topic: last seq sent} for the
line's verdict/heatmap topics), so a loss at the end of a burst is noticed at the next heartbeat.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import zmq

from inspectd.daemon.frame import Verdict
from inspectd.fileio import json_value
from inspectd.errors import ConfigError, InspectdError

log = logging.getLogger(__name__)

SCHEMA = 1
HEATMAP_ENCODINGS = ("png", "raw")
LINE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Enough for minutes of backlog at line rate; beyond that the publisher thread is stuck and
# memory must not grow without bound.
DEFAULT_QUEUE_SIZE = 10000

OnSent = Callable[[str, dict], None]


@dataclass(frozen=True)
class CurveServerKeys:
    """CURVE encryption for the PUB socket: the server's Z85 key pair (zmq.curve_keypair()).
    Subscribers need `public_key`. With `allowed_clients_dir` (a folder of client public
    certificates, NAME.key) a ZAP authenticator on the publisher's context admits only those
    clients; without it any client holding the server's public key may subscribe (encryption,
    not access control)."""

    public_key: bytes
    secret_key: bytes
    allowed_clients_dir: str | None = None


def encode_header(header: dict) -> bytes:
    return json.dumps(json_value(header), allow_nan=False, separators=(",", ":")).encode()


def verdict_header(v: Verdict, topic: str, seq: int, published_ns: int, daemon_start_ns: int) -> dict:
    """The verdict header of docs/ARCHITECTURE.md (heatmap headers add encoding and shape)."""
    return {
        "schema": SCHEMA,
        "topic": topic,
        "line": v.line,
        "seq": seq,
        "frame_id": v.frame_id,
        "acquired_ns": v.acquired_ns,
        "published_ns": published_ns,
        "verdict": v.verdict,
        "score": v.score,
        "raw_score": v.raw_score,
        "threshold": v.threshold,
        "latency_ms": v.latency_ms,
        "deadline_missed": v.deadline_missed,
        "backend": v.backend,
        "bundle_id": v.bundle_id,
        "error": v.error,
        "daemon_start_ns": daemon_start_ns,
    }


def encode_heatmap(heatmap: np.ndarray, encoding: str, size: tuple[int, int] | None) -> tuple[bytes, list[int]]:
    """Resize a uint8 Hm x Wm heatmap to size=(w, h) and encode it; returns (payload, [h, w])."""
    import cv2  # only the heatmap path needs OpenCV

    if heatmap.dtype != np.uint8 or heatmap.ndim != 2:
        raise ValueError(f"heatmap must be a 2-D uint8 array, got {heatmap.dtype} {heatmap.shape}")
    if size is not None and (heatmap.shape[1], heatmap.shape[0]) != tuple(size):
        heatmap = cv2.resize(heatmap, (int(size[0]), int(size[1])), interpolation=cv2.INTER_LINEAR)
    shape = [int(heatmap.shape[0]), int(heatmap.shape[1])]
    if encoding == "png":
        ok, buf = cv2.imencode(".png", heatmap)
        if not ok:
            raise ValueError("PNG encoding of the heatmap failed")
        return buf.tobytes(), shape
    return np.ascontiguousarray(heatmap).tobytes(), shape


def _check_heatmap_options(encoding: str, size: tuple[int, int] | None) -> None:
    if encoding not in HEATMAP_ENCODINGS:
        raise ConfigError(f"heatmap encoding must be one of {', '.join(HEATMAP_ENCODINGS)}, got {encoding!r}")
    if size is not None:
        if (len(size) != 2 or not all(isinstance(s, (int, np.integer)) for s in size)
                or not all(0 < int(s) <= 4096 for s in size)):
            raise ConfigError(f"heatmap size must be (width, height) in 1..4096 pixels, got {size!r}")


_STOP = object()


class Publisher:
    """Publishes verdicts, heatmaps and heartbeats from its own thread.

    `on_sent(topic, header)` is called in the publisher thread after each verdict/heatmap is
    sent (header has acquired_ns and published_ns): the pipeline uses it for the
    acquisition -> publish latency metric. It must be quick and must not raise (errors are logged).
    """

    def __init__(self, endpoint: str, sndhwm: int = 1000, linger_ms: int = 0,
                 heartbeat_interval_s: float = 1.0, curve: CurveServerKeys | None = None,
                 on_sent: OnSent | None = None, heatmap_encoding: str = "png",
                 heatmap_size: tuple[int, int] | None = None, daemon_start_ns: int | None = None,
                 queue_size: int = DEFAULT_QUEUE_SIZE) -> None:
        if not isinstance(endpoint, str) or "://" not in endpoint:
            raise ConfigError(f"ZeroMQ endpoint must look like tcp://HOST:PORT or ipc://PATH, got {endpoint!r}")
        if sndhwm < 0:
            raise ConfigError(f"sndhwm must be >= 0, got {sndhwm}")
        if not heartbeat_interval_s > 0:
            raise ConfigError(f"heartbeat interval must be > 0 s, got {heartbeat_interval_s}")
        _check_heatmap_options(heatmap_encoding, heatmap_size)
        self.endpoint = endpoint
        self.sndhwm = sndhwm
        self.linger_ms = linger_ms
        self.heartbeat_interval_s = float(heartbeat_interval_s)
        self.curve = curve
        self.on_sent = on_sent
        self.heatmap_encoding = heatmap_encoding
        self.heatmap_size = heatmap_size
        self.daemon_start_ns = daemon_start_ns if daemon_start_ns is not None else time.time_ns()
        self.bound_endpoint: str | None = None   # the real address (port resolved when bound to '*')
        self.dropped = 0                         # items refused because the queue was full
        self.sent: dict[str, int] = {}           # per topic, for diagnostics
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._lines: dict[str, dict] = {}
        self._lines_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._stopping = False
        self._seq: dict[str, int] = {}

    # ---- called from any thread -------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        """Start the publisher thread; returns once the socket is bound. Raises InspectdError
        (e.g. address in use) when it cannot bind."""
        if self._thread is not None:
            raise InspectdError("publisher already started")
        self._thread = threading.Thread(target=self._run, name="inspectd-publisher", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            self._stopping = True  # refuse work: nothing may queue up behind a publisher that never ran
            raise InspectdError(f"ZeroMQ publisher on {self.endpoint} did not start within {timeout:.0f} s")
        if self._start_error is not None:
            self._stopping = True
            self._thread.join(timeout)
            raise InspectdError(f"cannot bind ZeroMQ publisher to {self.endpoint}: {self._start_error}")

    def register_line(self, line: str) -> None:
        """Heartbeats go out for every registered line, frames or not."""
        if not isinstance(line, str) or not LINE_NAME.match(line):
            raise ConfigError(f"line name must be 1-64 of A-Z a-z 0-9 _ -, got {line!r}")
        with self._lines_lock:
            self._lines.setdefault(line, {})

    def set_line_status(self, line: str, status: dict) -> None:
        """Replace the status dict sent in the line's heartbeats (camera_connected, frames, ...)."""
        self.register_line(line)
        with self._lines_lock:
            self._lines[line] = dict(status)

    def publish_verdict(self, v: Verdict) -> bool:
        """Queue a verdict; False when the publisher is stopped or its queue is full (counted)."""
        return self._put(("verdict", v, None, None))

    def publish_heatmap(self, v: Verdict, encoding: str | None = None,
                        size: tuple[int, int] | None = None) -> bool:
        """Queue the verdict's heatmap (uint8 Hm x Wm), resized to size=(w, h) and encoded as PNG or
        raw bytes in the publisher thread. False when there is no heatmap or it was not queued."""
        if v.heatmap is None:
            return False
        encoding = encoding or self.heatmap_encoding
        size = size if size is not None else self.heatmap_size
        _check_heatmap_options(encoding, size)
        return self._put(("heatmap", v, encoding, size))

    def queue_depth(self) -> int:
        return self._queue.qsize()

    def stop(self, timeout: float = 5.0) -> bool:
        """Send what is queued, close the socket (with the configured linger) and join the thread.
        True when the thread ended within `timeout`."""
        if self._thread is None:
            return True
        if not self._stopping:
            self._stopping = True
            try:
                # The stop marker must get in even when the queue is full: wait for room.
                self._queue.put(_STOP, timeout=timeout)
            except queue.Full:
                log.error("publisher queue stayed full for %.1f s while stopping", timeout)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _put(self, item: tuple) -> bool:
        if self._stopping or self._thread is None:
            log.debug("publisher not running; %s for %s not sent", item[0], item[1].line)
            return False
        try:
            self._queue.put_nowait(item)
            return True
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.error("publisher queue full: %d messages dropped so far", self.dropped)
            return False

    # ---- publisher thread --------------------------------------------------------------------

    def _start_authenticator(self, ctx: zmq.Context) -> Any:
        """ZAP handler for the allow-list, on this thread's context (ZAP is per context)."""
        if self.curve is None or self.curve.allowed_clients_dir is None:
            return None
        from zmq.auth.thread import ThreadAuthenticator

        auth = ThreadAuthenticator(ctx, log=logging.getLogger("inspectd.zap"))
        auth.start()
        # Reads every NAME.key in the folder once; clients not listed fail the CURVE handshake.
        auth.configure_curve(domain="*", location=self.curve.allowed_clients_dir)
        return auth

    def _run(self) -> None:
        ctx = zmq.Context()
        try:
            auth = self._start_authenticator(ctx)
        except Exception as exc:  # before any socket: report it from start()
            self._start_error = exc
            ctx.term()
            self._started.set()
            return
        sock = ctx.socket(zmq.PUB)
        try:
            sock.setsockopt(zmq.SNDHWM, self.sndhwm)
            sock.setsockopt(zmq.LINGER, self.linger_ms)
            if self.curve is not None:
                sock.curve_server = True
                sock.curve_secretkey = self.curve.secret_key
                sock.curve_publickey = self.curve.public_key
            sock.bind(self.endpoint)
            self.bound_endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        except (zmq.ZMQError, ValueError, TypeError) as exc:
            self._start_error = exc
            sock.close(0)
            if auth is not None:
                auth.stop()
            ctx.term()
            self._started.set()
            return
        self._started.set()
        try:
            self._loop(sock)
        finally:
            sock.close(self.linger_ms)
            if auth is not None:
                auth.stop()
            ctx.term()

    def _loop(self, sock: zmq.Socket) -> None:
        next_heartbeat = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= next_heartbeat:
                self._send_heartbeats(sock)
                # Fixed cadence; after a long stall skip missed beats instead of bursting.
                next_heartbeat += self.heartbeat_interval_s
                if next_heartbeat < now:
                    next_heartbeat = now + self.heartbeat_interval_s
            try:
                item = self._queue.get(timeout=max(0.0, next_heartbeat - time.monotonic()))
            except queue.Empty:
                continue
            if item is _STOP:
                return
            kind, v, encoding, size = item
            try:
                if kind == "verdict":
                    self._send_verdict(sock, v)
                else:
                    self._send_heatmap(sock, v, encoding, size)
            except Exception:  # one bad item must not stop the line's publishing
                log.exception("could not publish %s for %s frame %s", kind, v.line, v.frame_id)

    def _next_seq(self, topic: str) -> int:
        seq = self._seq.get(topic, 0)
        self._seq[topic] = seq + 1
        self.sent[topic] = seq + 1
        return seq

    def _send(self, sock: zmq.Socket, topic: str, header: dict, payload: bytes | None) -> None:
        parts = [topic.encode(), encode_header(header)]
        if payload is not None:
            parts.append(payload)
        # PUB never blocks: at the high-water mark ZeroMQ drops, and subscribers see a seq gap.
        sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=payload is None or len(payload) < 65536)

    def _notify_sent(self, topic: str, header: dict) -> None:
        if self.on_sent is None:
            return
        try:
            self.on_sent(topic, header)
        except Exception:
            log.exception("on_sent callback failed")

    def _send_verdict(self, sock: zmq.Socket, v: Verdict) -> None:
        topic = f"verdict.{v.line}"
        header = verdict_header(v, topic, self._next_seq(topic), time.time_ns(), self.daemon_start_ns)
        self._send(sock, topic, header, None)
        self._notify_sent(topic, header)

    def _send_heatmap(self, sock: zmq.Socket, v: Verdict, encoding: str, size: tuple[int, int] | None) -> None:
        payload, shape = encode_heatmap(v.heatmap, encoding, size)  # before seq: a failure is no gap
        topic = f"heatmap.{v.line}"
        header = verdict_header(v, topic, self._next_seq(topic), time.time_ns(), self.daemon_start_ns)
        header["encoding"] = encoding
        header["shape"] = shape
        self._send(sock, topic, header, payload)
        self._notify_sent(topic, header)

    def _send_heartbeats(self, sock: zmq.Socket) -> None:
        with self._lines_lock:
            lines = [(line, dict(status)) for line, status in self._lines.items()]
        for line, status in lines:
            topic = f"heartbeat.{line}"
            header = {
                "schema": SCHEMA,
                "topic": topic,
                "line": line,
                "seq": self._next_seq(topic),
                "published_ns": time.time_ns(),
                "status": status,
                "interval_s": self.heartbeat_interval_s,
                "daemon_start_ns": self.daemon_start_ns,
                # Last seq sent on the line's data topics: lets a subscriber notice lost messages at
                # the end of a burst, which no later verdict would reveal.
                "last_seq": {t: self._seq[t] - 1 for t in (f"verdict.{line}", f"heatmap.{line}")
                             if t in self._seq},
            }
            try:
                self._send(sock, topic, header, None)
            except zmq.ZMQError as exc:
                log.error("heartbeat for %s not sent: %s", line, exc)
