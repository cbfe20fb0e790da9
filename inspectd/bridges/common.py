"""What both bridges share: settings from the daemon config, the subscriber, status and verdict payloads."""

from __future__ import annotations

import logging
import signal
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from inspectd.client import CurveClientKeys, LineStatus, Message, VerdictSubscriber
from inspectd.daemon.config import DaemonConfig, endpoint_host, load_config
from inspectd.errors import ConfigError

log = logging.getLogger("inspectd.bridges")

# Words of the `status` field (MQTT status payload, OPC UA LineStatus variable).
STATUSES = ("ok", "offline", "blind", "engine_failed", "failing_safe", "starting", "stopping", "unknown")


@dataclass(frozen=True)
class BridgeSettings:
    source: str                    # the config file, for messages
    endpoint: str
    curve: CurveClientKeys | None
    lines: tuple[str, ...]
    stale_after_s: float
    heartbeat_interval_s: float
    config: DaemonConfig


def subscribe_endpoint(config: DaemonConfig) -> str:
    """bridges.endpoint, else the daemon's zmq.endpoint (a wildcard bind is reached on loopback)."""
    if config.bridges is not None and config.bridges.endpoint:
        return config.bridges.endpoint
    endpoint = config.zmq.endpoint
    host = endpoint_host(endpoint)
    if host in ("0.0.0.0", "*"):
        return endpoint.replace(f"tcp://{host}:", "tcp://127.0.0.1:", 1)
    if host in ("[::]", "::"):
        return endpoint.replace(f"tcp://{host}:", "tcp://[::1]:", 1)
    return endpoint


def load_settings(path: str | Path, kind: str) -> BridgeSettings:
    """Validate the config for bridge `kind` (mqtt|opcua). Every problem is one ConfigError line
    naming the file and the field."""
    source = str(path)
    config = load_config(path)
    bridges = config.bridges
    if bridges is None or getattr(bridges, kind) is None:
        raise ConfigError(f"{source}: bridges.{kind}: section missing (the {kind} bridge has nothing to do)")
    curve = None
    if config.zmq.curve is not None:
        if bridges.curve is None:
            raise ConfigError(f"{source}: bridges.curve: required because zmq.curve is set "
                              f"(client_secret_key_file: the bridge's NAME.key_secret from `inspectd keys`)")
        from inspectd.keys import load_public_key_file, load_secret_key_file
        server_file = bridges.curve.server_key_file or config.zmq.curve.server_secret_key_file
        field = "bridges.curve.server_key_file" if bridges.curve.server_key_file else \
            "zmq.curve.server_secret_key_file"
        try:
            server = load_public_key_file(server_file, field)
            public, secret = load_secret_key_file(bridges.curve.client_secret_key_file,
                                                  "bridges.curve.client_secret_key_file")
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        curve = CurveClientKeys(server_public_key=server, public_key=public, secret_key=secret)
    stale = bridges.stale_after_s or 2.0 * config.heartbeat_interval_s
    return BridgeSettings(source=source, endpoint=subscribe_endpoint(config), curve=curve,
                          lines=tuple(line.id for line in config.lines), stale_after_s=stale,
                          heartbeat_interval_s=config.heartbeat_interval_s, config=config)


def status_word(status: LineStatus) -> str:
    """One word for the line: offline (no heartbeat), else the daemon's state."""
    if not status.heartbeat:
        return "offline"
    return status.state if status.state in STATUSES else "unknown"


def status_payload(status: LineStatus) -> dict[str, Any]:
    """The status record both bridges publish. `healthy` is True only while the line is known to
    be inspecting parts (heartbeats within stale_after_s, camera connected, engine ready). With the
    heartbeats gone nothing is known of the line: its last state, camera and engine are not repeated."""
    heard = bool(status.heartbeat)
    return {
        "line": status.line,
        "status": status_word(status),
        "online": heard,
        "healthy": bool(status.safe),
        "reason": status.reason,
        "state": status.state if heard else "unknown",
        "camera_connected": status.camera_connected if heard else None,
        "engine_ready": status.engine_ready if heard else None,
        "bridge": "online",
    }


def offline_payload(line: str, reason: str) -> dict[str, Any]:
    return {"line": line, "status": "offline", "online": False, "healthy": False, "reason": reason,
            "state": "unknown", "camera_connected": None, "engine_ready": None, "bridge": "offline"}


def verdict_payload(msg: Message) -> dict[str, Any]:
    """The verdict header as the daemon sent it (frame_id, seq, acquired_ns, camera_timestamp,
    chunks, verdict, score, threshold, ...)."""
    return dict(msg.header)


def default_client_id() -> str:
    host = "".join(c for c in socket.gethostname() if c.isalnum() or c in "-_.")[:24] or "host"
    return f"inspectd-{host}"


def make_subscriber(settings: BridgeSettings, on_verdict: Callable[[Message], None],
                    on_status: Callable[[str, LineStatus], None]) -> VerdictSubscriber:
    def on_gap(topic: str, expected: int, got: int) -> None:
        log.warning("%s: %d message(s) lost (seq %d..%d)", topic, got - expected, expected, got - 1)

    def on_restart(line: str) -> None:
        log.info("line %s: daemon restarted", line)

    return VerdictSubscriber(settings.endpoint, lines=list(settings.lines), topics=("verdict", "heartbeat"),
                             heartbeat_timeout_s=settings.stale_after_s, on_verdict=on_verdict,
                             on_line_status=on_status, on_gap=on_gap, on_restart=on_restart,
                             curve=settings.curve)


def recipe_request(settings: BridgeSettings, line: str, payload: bytes | str, via: str,
                   answer_within_s: float | None = None) -> dict[str, Any]:
    """A recipe switch asked on the PLC side (MQTT recipe/set, OPC UA SetRecipe), forwarded to the
    daemon's control socket (<state_dir>/control.sock, same box). `payload`: the recipe name, or
    JSON {"name": ..., "reason": ..., "requester": ...}. Authentication on the PLC side is the
    broker's / server's (ACLs, certificates); the socket admits this bridge by its user/group and
    audits the switch as `socket/<via>`. The answer is {"ok": bool, ...} (never raises).

    `answer_within_s`: how long the PLC side waits for the answer (None: the control socket's
    default, for MQTT, whose answer goes out whenever it is ready). The daemon is told, and makes no
    change it cannot answer within it; the bridge waits no longer either."""
    import json as _json
    import time as _time

    from inspectd.daemon.control import CLIENT_TIMEOUT_S, request, socket_path
    from inspectd.errors import InspectdError

    text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else str(payload)
    text = text.strip()
    body: dict[str, Any] = {}
    if text.startswith("{"):
        try:
            body = _json.loads(text)
        except ValueError:
            return {"ok": False, "line": line, "error": "malformed JSON request"}
        if not isinstance(body, dict):
            return {"ok": False, "line": line, "error": "expected a JSON object"}
    else:
        body = {"name": text}
    name = body.get("name")
    if not isinstance(name, str) or not name:
        return {"ok": False, "line": line, "error": "no recipe name given"}
    req = {"op": "recipe", "line": line, "name": name, "via": via,
           "reason": body.get("reason") if isinstance(body.get("reason"), str) else f"requested over {via}",
           "requester": str(body.get("requester"))[:200] if body.get("requester") is not None else None}
    wait_s = CLIENT_TIMEOUT_S if answer_within_s is None else answer_within_s
    started = _time.monotonic()
    try:
        answer = request(socket_path(settings.config.state_dir), req, timeout_s=wait_s)
    except InspectdError as exc:
        if _time.monotonic() - started >= wait_s:   # our wait ran out: the daemon's deadline had passed
            answer = {"ok": False, "error": f"recipe {name!r} not switched within {wait_s:g} s (what the "
                                            f"{via} caller waits); nothing changed (a recipe with "
                                            f"preload: true switches at once)"}
        else:
            answer = {"ok": False, "error": str(exc)}
    answer.setdefault("line", line)
    answer["requested"] = name
    return answer


def stop_event_on_signals() -> threading.Event:
    """An Event set by SIGTERM / SIGINT (systemd stop, Ctrl-C)."""
    stop = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop
