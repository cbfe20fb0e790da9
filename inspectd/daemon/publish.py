"""ZeroMQ publisher: verdicts, heatmaps and heartbeats on one PUB socket.

The socket is created, bound, used and closed by ONE thread (ZeroMQ sockets are not thread
safe); the pipeline and the deadline keeper hand it work through thread-safe queues and never
block on the network. Message format (docs/ARCHITECTURE.md): multipart
[topic utf-8, JSON header utf-8, optional binary payload] on topics `verdict.<line>`,
`heatmap.<line>` and `heartbeat.<line>`; `seq` counts per topic from 0 since daemon start and is
stamped, like `published_ns`, when the message is actually sent, so a subscriber that sees a
gap in seq knows messages were lost (on the wire: PUB drops at the high-water mark; or in the
publisher, below).

Additions to the contract: every header also carries `daemon_start_ns`, so a subscriber can tell a
daemon restart from a gap on any topic; heartbeats carry `last_seq` ({topic: last seq sent} for the
line's verdict/heatmap topics), so a loss at the end of a burst is noticed at the next heartbeat.

Drops inside the publisher are never silent: a verdict or heatmap refused because the queue is
full, or one that fails to encode or send, still uses up its `seq` (the subscriber sees a gap, at
the latest at the next heartbeat), is counted in the heartbeat's `dropped` ({topic: n since daemon
start}) and is reported through `on_dropped(line, kind, reason)` (the daemon's
inspectd_publish_dropped_total).

Hot path: heatmaps are resized and PNG-encoded in the thread that calls `publish_heatmap` (the
line's own worker), never in the publisher thread, and queued verdicts are always sent before
queued heatmaps: one line's heatmaps cannot delay another line's verdicts.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import zmq

from inspectd.client import ZMTP_PING_IVL_MS, ZMTP_PING_TIMEOUT_MS
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
# Encoded heatmaps can be megabytes each: a short queue of their own bounds that memory, and a
# full heatmap queue never costs a verdict its place.
DEFAULT_HEATMAP_QUEUE_SIZE = 64
DROP_REASONS = ("queue_full", "encode_error", "send_error")


class EndpointServed(Exception):
    """Another process accepts connections on the ipc:// endpoint's socket file."""


class PublisherBindError(InspectdError):
    """The verdict endpoint cannot be bound: one line naming the cause and the config field to change
    (zmq.endpoint), in the config file when the caller names it (`in_config`)."""

    def __init__(self, endpoint: str, error: BaseException, config: str = "the config") -> None:
        self.endpoint, self.error = endpoint, error
        if isinstance(error, EndpointServed) or getattr(error, "errno", None) == errno.EADDRINUSE:
            what = "a path of its own" if ipc_path(endpoint) else "a free port"
            fix = (f"another inspectd (another config or inspectd@ instance) or another program serves it; "
                   f"give zmq.endpoint in {config} {what}")
        else:
            fix = f"{error}; check zmq.endpoint in {config}"
        super().__init__(f"cannot bind ZeroMQ publisher to {endpoint}: {fix}")

    def in_config(self, config: str) -> "PublisherBindError":
        """The same error, naming the config file the field is in."""
        return PublisherBindError(self.endpoint, self.error, config)


def ipc_path(endpoint: str) -> str | None:
    """The socket file of an ipc:// endpoint (None for other transports and Linux abstract names)."""
    path = endpoint[len("ipc://"):] if endpoint.startswith("ipc://") else ""
    return path if path and not path.startswith("@") else None


def _served(path: str) -> bool:
    """Something accepts connections on the Unix socket file `path` (False: no file, a stale one left
    by a process that is gone, or not a socket). ZeroMQ itself would unlink a live one and bind anew,
    taking the endpoint from whoever serves it."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except TimeoutError:  # a listener too busy to accept is still a listener
        return True
    except OSError:
        return False
    finally:
        probe.close()
    return True


def _file_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


OnSent = Callable[[str, dict], None]
OnDropped = Callable[[str, str, str], None]   # (line, kind verdict|heatmap, reason)


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
        "queue_ms": v.queue_ms,    # acquisition -> engine call (queue wait + preprocessing)
        "infer_ms": v.infer_ms,    # the engine call
        "deadline_missed": v.deadline_missed,
        "backend": v.backend,
        "bundle_id": v.bundle_id,
        "recipe": v.recipe,
        "error": v.error,
        "daemon_start_ns": daemon_start_ns,
        # To match a verdict to a physical part: the camera's own timestamp (device ticks, ns on most
        # cameras; null without one) and the line's GenICam chunk values ({name: value or null}).
        "camera_timestamp": v.meta.get("camera_timestamp") if isinstance(v.meta, dict) else None,
        "chunks": dict(v.meta.get("chunks") or {}) if isinstance(v.meta, dict) else {},
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


@dataclass
class _Item:
    kind: str                       # verdict | heatmap
    verdict: Verdict
    payload: bytes | None = None    # heatmaps: already encoded by the caller's thread
    encoding: str | None = None
    shape: list[int] | None = None


class Publisher:
    """Publishes verdicts, heatmaps and heartbeats from its own thread.

    `on_sent(topic, header)` is called in the publisher thread after each verdict/heatmap is
    sent (header has acquired_ns and published_ns): the pipeline uses it for the
    acquisition -> publish latency metric. `on_dropped(line, kind, reason)` is called (in the
    caller's or the publisher thread) for each verdict/heatmap that will not go out, reason one of
    DROP_REASONS. Both must be quick and must not raise (errors are logged).
    """

    def __init__(self, endpoint: str, sndhwm: int = 1000, linger_ms: int = 0,
                 heartbeat_interval_s: float = 1.0, curve: CurveServerKeys | None = None,
                 on_sent: OnSent | None = None, heatmap_encoding: str = "png",
                 heatmap_size: tuple[int, int] | None = None, daemon_start_ns: int | None = None,
                 queue_size: int = DEFAULT_QUEUE_SIZE, heatmap_queue_size: int = DEFAULT_HEATMAP_QUEUE_SIZE,
                 on_dropped: OnDropped | None = None) -> None:
        if not isinstance(endpoint, str) or "://" not in endpoint:
            raise ConfigError(f"ZeroMQ endpoint must look like tcp://HOST:PORT or ipc://PATH, got {endpoint!r}")
        if sndhwm < 0:
            raise ConfigError(f"sndhwm must be >= 0, got {sndhwm}")
        if not heartbeat_interval_s > 0:
            raise ConfigError(f"heartbeat interval must be > 0 s, got {heartbeat_interval_s}")
        _check_heatmap_options(heatmap_encoding, heatmap_size)
        if queue_size < 1 or heatmap_queue_size < 1:
            raise ConfigError(f"publisher queue sizes must be >= 1, got {queue_size} and {heatmap_queue_size}")
        self.endpoint = endpoint
        self.sndhwm = sndhwm
        self.linger_ms = linger_ms
        self.heartbeat_interval_s = float(heartbeat_interval_s)
        self.curve = curve
        self.on_sent = on_sent
        self.on_dropped = on_dropped
        self.heatmap_encoding = heatmap_encoding
        self.heatmap_size = heatmap_size
        self.daemon_start_ns = daemon_start_ns if daemon_start_ns is not None else time.time_ns()
        self.bound_endpoint: str | None = None   # the real address (port resolved when bound to '*')
        self.dropped = 0                         # verdicts/heatmaps that did not go out (all reasons)
        self.dropped_by_topic: dict[str, int] = {}
        self.sent: dict[str, int] = {}           # per topic, for diagnostics
        self.queue_size = queue_size
        self.heatmap_queue_size = heatmap_queue_size
        # Two queues under one condition: the publisher thread always empties verdicts first.
        self._cond = threading.Condition()
        self._verdicts: deque[_Item] = deque()
        self._heatmaps: deque[_Item] = deque()
        self._stop_requested = False
        self._beat_now = False  # set_line_status(now=True): send heartbeats without waiting for the beat
        self._skipped: dict[str, int] = {}       # topic -> seqs to skip (drops not yet reflected in seq)
        self._lines: dict[str, dict] = {}
        self._lines_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._stopping = False
        self._seq: dict[str, int] = {}
        self._ipc_file: tuple[int, int] | None = None  # the socket file we bound (ipc:// only)
        self._ipc_lost_said = False

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
            raise PublisherBindError(self.endpoint, self._start_error)

    def register_line(self, line: str) -> None:
        """Heartbeats go out for every registered line, frames or not."""
        if not isinstance(line, str) or not LINE_NAME.match(line):
            raise ConfigError(f"line name must be 1-64 of A-Z a-z 0-9 _ -, got {line!r}")
        with self._lines_lock:
            self._lines.setdefault(line, {})

    def set_line_status(self, line: str, status: dict, now: bool = False) -> None:
        """Replace the status dict sent in the line's heartbeats (camera_connected, frames, ...).
        now: send every line's heartbeat at once instead of at the next beat (a change a consumer
        must not learn a heartbeat interval late, such as a stop)."""
        self.register_line(line)
        with self._lines_lock:
            self._lines[line] = dict(status)
        if now:
            with self._cond:
                self._beat_now = True
                self._cond.notify()

    def publish_verdict(self, v: Verdict) -> bool:
        """Queue a verdict; False when the publisher is stopped or its queue is full (a drop:
        counted, reported, and its seq is skipped so subscribers see a gap)."""
        return self._put(_Item("verdict", v))

    def publish_heatmap(self, v: Verdict, encoding: str | None = None,
                        size: tuple[int, int] | None = None) -> bool:
        """Resize the verdict's heatmap (uint8 Hm x Wm) to size=(w, h) and encode it (PNG or raw)
        in the CALLING thread, then queue it. Publish the verdict first. False when there is no
        heatmap, it could not be encoded, or it was not queued (the latter two are drops)."""
        if v.heatmap is None:
            return False
        encoding = encoding or self.heatmap_encoding
        size = size if size is not None else self.heatmap_size
        _check_heatmap_options(encoding, size)
        if self._stopping or self._thread is None:
            return False  # not running: do not spend the encoding
        try:
            payload, shape = encode_heatmap(v.heatmap, encoding, size)
        except Exception as exc:
            log.error("heatmap for %s frame %s not encoded: %s", v.line, v.frame_id, exc)
            self._drop("heatmap", v.line, "encode_error", skip_seq=True)
            return False
        return self._put(_Item("heatmap", v, payload, encoding, shape))

    def publish_shadow(self, v: Verdict, active: dict | None = None) -> bool:
        """Queue a shadow (candidate bundle) verdict on `shadow.<line>`. It shares the low-priority
        queue with heatmaps: queued verdicts always go out first, and a full queue drops it."""
        if active is not None:
            v.meta = dict(v.meta or {}, _active=active)
        return self._put(_Item("shadow", v))

    def queue_depth(self) -> int:
        with self._cond:
            return len(self._verdicts) + len(self._heatmaps)

    def stop(self, timeout: float = 5.0) -> bool:
        """Send what is queued, close the socket (with the configured linger) and join the thread.
        True when the thread ended within `timeout`."""
        if self._thread is None:
            return True
        self._stopping = True
        with self._cond:
            # Whatever is queued still goes out (verdicts first), then the thread ends.
            self._stop_requested = True
            self._cond.notify_all()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _put(self, item: _Item) -> bool:
        if self._stopping or self._thread is None:
            log.debug("publisher not running; %s for %s not sent", item.kind, item.verdict.line)
            return False
        with self._cond:
            q, limit = ((self._verdicts, self.queue_size) if item.kind == "verdict"
                        else (self._heatmaps, self.heatmap_queue_size))   # heatmaps and shadow verdicts
            if len(q) < limit:
                q.append(item)
                self._cond.notify()
                return True
        self._drop(item.kind, item.verdict.line, "queue_full", skip_seq=True)
        return False

    def _drop(self, kind: str, line: str, reason: str, skip_seq: bool) -> None:
        """Count a verdict/heatmap that will not go out. skip_seq: its seq was never taken, so take
        one now (the publisher thread folds it in before the topic's next seq or heartbeat)."""
        topic = f"{kind}.{line}"
        with self._cond:
            self.dropped += 1
            self.dropped_by_topic[topic] = self.dropped_by_topic.get(topic, 0) + 1
            if skip_seq:
                self._skipped[topic] = self._skipped.get(topic, 0) + 1
            n = self.dropped
        if n == 1 or n % 1000 == 0:
            log.error("publisher: %s on %s dropped (%s); %d dropped so far", kind, line, reason, n)
        if self.on_dropped is not None:
            try:
                self.on_dropped(line, kind, reason)
            except Exception:
                log.exception("on_dropped callback failed")

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
            # Subscribers whose box vanished without closing are dropped (their queue freed) after this.
            sock.setsockopt(zmq.HEARTBEAT_IVL, ZMTP_PING_IVL_MS)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, ZMTP_PING_TIMEOUT_MS)
            if self.curve is not None:
                sock.curve_server = True
                sock.curve_secretkey = self.curve.secret_key
                sock.curve_publickey = self.curve.public_key
            path = ipc_path(self.endpoint)
            if path is not None and _served(path):
                raise EndpointServed(path)
            sock.bind(self.endpoint)
            self.bound_endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            if path is not None:
                self._ipc_file = _file_id(path)
        except (zmq.ZMQError, ValueError, TypeError, EndpointServed) as exc:
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
            if now >= next_heartbeat or self._beat_now:
                self._beat_now = False
                self._keep_ipc_file(sock)
                self._send_heartbeats(sock)
                # Fixed cadence; after a long stall skip missed beats instead of bursting.
                next_heartbeat += self.heartbeat_interval_s
                if next_heartbeat < now:
                    next_heartbeat = now + self.heartbeat_interval_s
            with self._cond:
                if not (self._verdicts or self._heatmaps or self._stop_requested or self._beat_now):
                    self._cond.wait(max(0.0, next_heartbeat - time.monotonic()))
                if self._verdicts:
                    item = self._verdicts.popleft()
                elif self._heatmaps:
                    item = self._heatmaps.popleft()
                elif self._stop_requested:
                    return
                else:
                    continue
            self._send_item(sock, item)

    def _keep_ipc_file(self, sock: zmq.Socket) -> None:
        """An ipc:// socket file removed under a running daemon (by hand, by a /tmp cleaner) leaves every
        subscriber that connects from then on unable to reach it, while it looks healthy: bind it anew
        (a second listener; subscribers already connected keep their connection). A file replaced by
        another process's socket is said, not fought over."""
        path = ipc_path(self.endpoint)
        if path is None or self._ipc_file is None:
            return
        now = _file_id(path)
        if now == self._ipc_file:
            return
        if now is not None:
            if not self._ipc_lost_said:
                self._ipc_lost_said = True
                log.error("publisher: %s is now another process's socket: subscribers that connect from now on "
                          "reach it, not this daemon; stop that process, then restart this daemon", path)
            return
        try:
            sock.bind(self.endpoint)
        except zmq.ZMQError as exc:
            if not self._ipc_lost_said:
                self._ipc_lost_said = True
                log.error("publisher: %s was removed and cannot be bound again (%s): subscribers cannot "
                          "connect until this daemon restarts", path, exc)
            return
        self._ipc_file = _file_id(path)
        self._ipc_lost_said = False
        log.warning("publisher: %s was removed under the running daemon; bound it again", path)

    def _send_item(self, sock: zmq.Socket, item: _Item) -> None:
        v = item.verdict
        topic = f"{item.kind}.{v.line}"
        seq = self._next_seq(topic)  # taken first: a failure below leaves a gap, never a silent loss
        try:
            header = verdict_header(v, topic, seq, time.time_ns(), self.daemon_start_ns)
            if item.kind == "heatmap":
                header["encoding"] = item.encoding
                header["shape"] = item.shape
            elif item.kind == "shadow":  # the active verdict of the same frame, for comparison
                header["active"] = (v.meta or {}).get("_active")
            self._send(sock, topic, header, item.payload)
        except Exception as exc:  # one bad item must not stop the line's publishing
            log.error("could not publish %s for %s frame %s: %s", item.kind, v.line, v.frame_id, exc)
            self._drop(item.kind, v.line, "send_error", skip_seq=False)
            return
        self._notify_sent(topic, header)

    def _fold_skipped(self, topic: str) -> None:
        """Publisher thread: advance the topic's seq past drops reported since (they become a gap)."""
        with self._cond:
            n = self._skipped.pop(topic, 0)
        if n:
            self._seq[topic] = self._seq.get(topic, 0) + n
            self.sent[topic] = self._seq[topic]

    def _next_seq(self, topic: str) -> int:
        self._fold_skipped(topic)
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

    def _send_heartbeats(self, sock: zmq.Socket) -> None:
        with self._lines_lock:
            lines = [(line, dict(status)) for line, status in self._lines.items()]
        for line, status in lines:
            topic = f"heartbeat.{line}"
            data_topics = (f"verdict.{line}", f"heatmap.{line}", f"shadow.{line}")
            for t in data_topics:
                self._fold_skipped(t)  # a drop at the end of a burst shows in last_seq now
            with self._cond:
                dropped = {t: self.dropped_by_topic[t] for t in data_topics if t in self.dropped_by_topic}
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
                "last_seq": {t: self._seq[t] - 1 for t in data_topics if t in self._seq},
                # Verdicts/heatmaps the publisher itself dropped since daemon start (queue full,
                # encode or send error); a subscriber's gaps also include losses on the wire.
                "dropped": dropped,
            }
            try:
                self._send(sock, topic, header, None)
            except zmq.ZMQError as exc:
                log.error("heartbeat for %s not sent: %s", line, exc)
