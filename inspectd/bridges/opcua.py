"""OPC UA bridge: an asyncua server with, per line, a folder `<line>` under Objects holding

    LastVerdict (String: OK|NG|SKIP), Score (Double), Threshold (Double), FrameId (Int64), Seq (Int64),
    AcquiredTime (DateTime), CameraTimestamp (Int64), Chunks (String, JSON {name: value}),
    CameraConnected (Boolean), Healthy (Boolean), Status (String), FramesOK (UInt64), FramesNG (UInt64)

a method `SetRecipe(name: String) -> String` (JSON answer {"ok", "active"/"error"}) that forwards a
recipe switch to the daemon's control socket (who may call it: the server's security settings)
and answers within `set_recipe_timeout_s` (default 3 s: an OPC UA client gives up on a call after a
few seconds, asyncua's after 4); a switch the daemon cannot finish by then is not made and the
answer says so (recipes switched from a PLC should be `preload: true`),
and an `InspectdVerdictEventType` event per verdict emitted by the line's folder (properties Line,
Verdict, FrameId, Seq, Score, Threshold, AcquiredTime, CameraTimestamp, Chunks). Healthy is True only
while heartbeats arrive within `stale_after_s` and the daemon says the line is inspecting (camera
connected, engine ready); it goes false when the stream is stale or the camera is lost.

A value the daemon's message lacks (a null camera_timestamp, the null score of a fail-safe verdict:
null in MQTT and the JSON headers) is written as status BadNoData with no value, never as an
in-band sentinel (-1, NaN) a PLC would take for a reading; the variable keeps its DataType. Before
the first verdict (first status for CameraConnected) the variables are BadWaitingForInitialData.
Event fields without a value are null. CameraConnected while the daemon is not heard is a plain
False, not BadNoData: many PLC read blocks keep the last good value on a Bad status, and a gate
on CameraConnected must not go on reading True from a daemon that is gone.

Security (bridges.opcua.security): only the Basic256Sha256 SignAndEncrypt endpoint is offered, the
server's certificate and private key come from files, anonymous sessions are refused and a client
must present, as its X509 user identity, a certificate from `trusted_clients_dir`. Without a
security section the server offers None/Anonymous (keep it on loopback, the default endpoint).

The ZeroMQ subscriber runs in its own thread and hands messages to the server's asyncio loop:
verdicts through a bounded queue (when it is full, new ones are dropped and counted), the line's
status apart from it, newest only, written before the next queued verdict. A status is sent only
when it changes, so it is never dropped and never waits behind a verdict backlog.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from inspectd.bridges.common import (BridgeSettings, load_settings, make_subscriber, recipe_request,
                                     status_payload, stop_event_on_signals)
from inspectd.client import LineStatus, Message
from inspectd.daemon.config import OpcuaBridgeConfig
from inspectd.errors import ConfigError

log = logging.getLogger("inspectd.bridges.opcua")

QUEUE_SIZE = 10000   # verdicts waiting for the loop (status updates are kept apart, never dropped)
CERT_SUFFIXES = (".pem", ".der", ".crt", ".cer")

# name -> (VariantType name, initial value); None: no value until the daemon sends one
VARIABLES: dict[str, tuple[str, Any]] = {
    "LastVerdict": ("String", None),
    "Score": ("Double", None),
    "Threshold": ("Double", None),
    "FrameId": ("Int64", None),
    "Seq": ("Int64", None),
    "AcquiredTime": ("DateTime", None),
    "CameraTimestamp": ("Int64", None),
    "Chunks": ("String", None),
    "CameraConnected": ("Boolean", None),
    "Healthy": ("Boolean", False),
    "Status": ("String", "unknown"),
    "FramesOK": ("UInt64", 0),
    "FramesNG": ("UInt64", 0),
}
# A zero of each type, only to create a variable with its DataType before it has a value.
_ZERO: dict[str, Any] = {"String": "", "Double": 0.0, "Int64": 0, "UInt64": 0, "Boolean": False, "DateTime": None}
EVENT_PROPERTIES = (("Line", "String"), ("Verdict", "String"), ("FrameId", "Int64"), ("Seq", "Int64"),
                    ("Score", "Double"), ("Threshold", "Double"), ("AcquiredTime", "DateTime"),
                    ("CameraTimestamp", "Int64"), ("Chunks", "String"))


# The helpers below give None for a value the message lacks: _write turns it into a Bad status.
def _datetime(ns: Any) -> datetime | None:
    return datetime.fromtimestamp(ns / 1e9, tz=timezone.utc) if isinstance(ns, int) and ns > 0 else None


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _bool(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def quiet_asyncua() -> None:
    """Keep asyncua's loggers at WARNING (or the bridge's level, when higher) unless the bridge
    runs at DEBUG: at start asyncua logs about 1,100 INFO lines (address space population) that
    would drown the bridge's own lines in the journal."""
    level = log.getEffectiveLevel()
    if level > logging.DEBUG:
        # max(): at --log-level ERROR, WARNING on the asyncua logger would let its warnings through
        logging.getLogger("asyncua").setLevel(max(logging.WARNING, level))


def _check_private(path: Path, field: str, source: str) -> None:
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"{source}: {field}: {path}: {exc.strerror or exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{source}: {field}: {path} is readable by group/others (mode "
                          f"{stat.S_IMODE(mode):04o}); chmod 600 {path}")


def trusted_certificates(folder: Path, source: str) -> list[Path]:
    field = "bridges.opcua.security.trusted_clients_dir"
    if not folder.is_dir():
        raise ConfigError(f"{source}: {field}: {folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in CERT_SUFFIXES and p.is_file())
    if not files:
        raise ConfigError(f"{source}: {field}: {folder} holds no client certificates "
                          f"({', '.join('*' + s for s in CERT_SUFFIXES)}): nobody could connect")
    return files


class OpcuaBridge:
    def __init__(self, settings: BridgeSettings) -> None:
        self.settings = settings
        self.cfg: OpcuaBridgeConfig = settings.config.bridges.opcua
        sec = self.cfg.security
        if sec is not None:
            for field in ("certificate", "private_key"):
                if not Path(getattr(sec, field)).is_file():
                    raise ConfigError(f"{settings.source}: bridges.opcua.security.{field}: "
                                      f"{getattr(sec, field)} does not exist")
            _check_private(Path(sec.private_key), "bridges.opcua.security.private_key", settings.source)
            self.trusted = trusted_certificates(Path(sec.trusted_clients_dir), settings.source)
        self.set_recipe_timeout_s: float = self.cfg.set_recipe_timeout_s  # bridges.opcua.set_recipe_timeout_s
        self.server: Any = None
        self.nodes: dict[str, dict[str, Any]] = {}
        self.events: dict[str, Any] = {}
        self.counts: dict[str, dict[str, int]] = {}
        self._queue: asyncio.Queue | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Loop thread only: each line's newest status not written yet, and what wakes the loop
        # for a status or a verdict.
        self._statuses: dict[str, dict[str, Any]] = {}
        self._wake: asyncio.Event | None = None
        self.dropped = 0   # verdicts dropped because the queue was full
        self.subscriber = make_subscriber(settings, self._on_verdict, self._on_status)

    # ---- subscriber thread -> loop ---------------------------------------------------------------
    def _put_verdict(self, item: tuple) -> None:
        """Loop thread."""
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 100 == 0:
                log.warning("OPC UA update queue full: %d verdict(s) dropped", self.dropped)
            return
        self._wake.set()

    def _put_status(self, line: str, payload: dict[str, Any]) -> None:
        """Loop thread. Replaces a status of the line not written yet: only the newest matters."""
        self._statuses[line] = payload
        self._wake.set()

    def _on_verdict(self, msg: Message) -> None:
        self._loop.call_soon_threadsafe(self._put_verdict, ("verdict", msg.line, msg.header))

    def _on_status(self, line: str, status: LineStatus) -> None:
        payload = status_payload(status)
        log.info("line %s: status %s (%s)", line, payload["status"], payload["reason"])
        self._loop.call_soon_threadsafe(self._put_status, line, payload)

    # ---- server ---------------------------------------------------------------------------------
    async def setup(self) -> None:
        from asyncua import Server, ua
        from asyncua.server.user_managers import CertificateUserManager

        sec = self.cfg.security
        user_manager = None
        if sec is not None:
            user_manager = CertificateUserManager()
            for path in self.trusted:
                try:
                    await user_manager.add_user(path, name=path.stem)
                except Exception as exc:
                    raise ConfigError(f"{self.settings.source}: bridges.opcua.security.trusted_clients_dir: "
                                      f"{path}: not a certificate ({exc})") from None
        server = Server(user_manager=user_manager)
        await server.init()
        server.set_endpoint(self.cfg.endpoint)
        server.set_server_name("inspectd verdicts")
        if sec is not None:
            try:
                await server.load_certificate(str(sec.certificate))
                await server.load_private_key(str(sec.private_key))
            except Exception as exc:
                raise ConfigError(f"{self.settings.source}: bridges.opcua.security: cannot load the server "
                                  f"certificate / private key: {exc}") from None
            uri = _certificate_uri(server.iserver.certificate)
            if uri:
                await server.set_application_uri(uri)
            server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
            server.set_identity_tokens([ua.X509IdentityToken])   # anonymous off
        else:
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
            server.set_identity_tokens([ua.AnonymousIdentityToken])
        idx = await server.register_namespace(self.cfg.namespace_uri)
        etype = await server.create_custom_event_type(
            idx, "InspectdVerdictEventType", ua.ObjectIds.BaseEventType,
            [(name, getattr(ua.VariantType, vt)) for name, vt in EVENT_PROPERTIES])
        for line in self.settings.lines:
            folder = await server.nodes.objects.add_folder(ua.NodeId(line, idx), ua.QualifiedName(line, idx))
            nodes: dict[str, Any] = {"folder": folder}
            for name, (vt, initial) in VARIABLES.items():
                node_id = ua.NodeId(f"{line}.{name}", idx)
                variant = ua.Variant(_ZERO[vt] if initial is None else initial, getattr(ua.VariantType, vt))
                nodes[name] = await folder.add_variable(node_id, ua.QualifiedName(name, idx), variant)
            self.nodes[line] = nodes
            # BadWaitingForInitialData: the spec's "waiting for the server to obtain values from the
            # underlying data source", i.e. no verdict / status from the daemon yet.
            await self._write(line, {name: None for name, (_, initial) in VARIABLES.items() if initial is None},
                              missing=ua.StatusCodes.BadWaitingForInitialData)
            await folder.add_method(ua.NodeId(f"{line}.SetRecipe", idx), ua.QualifiedName("SetRecipe", idx),
                                    self._set_recipe_method(line), [ua.VariantType.String], [ua.VariantType.String])
            self.counts[line] = {"OK": 0, "NG": 0}
            self.events[line] = await server.get_event_generator(etype, folder)
        self.server = server

    def _set_recipe_method(self, line: str) -> Any:
        from asyncua import uamethod

        @uamethod
        async def set_recipe(parent: Any, name: Any) -> str:
            loop = asyncio.get_running_loop()   # the socket call blocks (engine load): off the loop
            answer = await loop.run_in_executor(None, recipe_request, self.settings, line, str(name or ""), "opcua",
                                                self.set_recipe_timeout_s)
            log.info("line %s: recipe request %r over OPC UA: %s", line, answer.get("requested"),
                     "done" if answer.get("ok") else f"refused: {answer.get('error')}")
            return json.dumps(answer, default=str)

        return set_recipe

    async def _write(self, line: str, values: dict[str, Any], missing: int | None = None) -> None:
        """Write the line's variables; a None value is written as status `missing` (default
        BadNoData) without a value."""
        from asyncua import ua

        # BadNoData ("no data exists for the requested time range or event filter"): the spec's
        # "there is no value for this sample". Not BadNoDataAvailable: that is a non-blocking
        # stream's "nothing to read yet, try again", and this sample's value will never come.
        code = ua.StatusCodes.BadNoData if missing is None else missing
        now = datetime.now(timezone.utc)
        for name, value in values.items():
            vt = VARIABLES[name][0]
            if value is None:
                # No Variant: a Bad value carries none (Part 4, DataValue); the DataType attribute stays.
                dv = ua.DataValue(StatusCode=ua.StatusCode(code), SourceTimestamp=now)
            else:
                dv = ua.DataValue(ua.Variant(value, getattr(ua.VariantType, vt)), SourceTimestamp=now)
            await self.nodes[line][name].write_value(dv)

    async def _apply(self, item: tuple) -> None:
        kind, line, data = item
        if line not in self.nodes:
            return
        if kind == "status":
            # Not heard: False (Good), never BadNoData: a PLC keeping the last good value on a Bad
            # status would read True from a daemon that is gone (see the module docstring).
            await self._write(line, {"Healthy": bool(data["healthy"]), "Status": data["status"],
                                     "CameraConnected": _bool(data["camera_connected"]) if data["online"] else False})
            return
        verdict = str(data.get("verdict") or "")
        if verdict in self.counts[line]:
            self.counts[line][verdict] += 1
        chunks = json.dumps(data.get("chunks") or {}, separators=(",", ":"))
        values = {"LastVerdict": verdict or None, "Score": _float(data.get("score")),
                  "Threshold": _float(data.get("threshold")), "FrameId": _int(data.get("frame_id")),
                  "Seq": _int(data.get("seq")), "AcquiredTime": _datetime(data.get("acquired_ns")),
                  "CameraTimestamp": _int(data.get("camera_timestamp")), "Chunks": chunks,
                  "FramesOK": self.counts[line]["OK"], "FramesNG": self.counts[line]["NG"]}
        await self._write(line, values)
        gen = self.events[line]
        ev = gen.event
        # None: a null event field (an event field has no StatusCode of its own)
        ev.Line, ev.Verdict, ev.FrameId, ev.Seq = line, verdict or None, values["FrameId"], values["Seq"]
        ev.Score, ev.Threshold, ev.AcquiredTime = values["Score"], values["Threshold"], values["AcquiredTime"]
        ev.CameraTimestamp, ev.Chunks = values["CameraTimestamp"], chunks
        ev.Severity = 700 if verdict != "OK" else 100
        await gen.trigger(message=f"{line} frame {values['FrameId']}: {verdict}")

    async def _next_update(self) -> tuple | None:
        """A pending status first (newest per line), else the oldest queued verdict; None after
        0.5 s with nothing to do (so the caller can look at its stop flag)."""
        if not self._statuses and self._queue.empty():
            # Nothing pending, and nothing can arrive before we wait: the callbacks that add
            # updates run on this loop, which is here.
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), 0.5)
            except asyncio.TimeoutError:
                return None
        if self._statuses:
            line = next(iter(self._statuses))
            return ("status", line, self._statuses.pop(line))
        if not self._queue.empty():
            return self._queue.get_nowait()
        return None

    async def serve(self, stop: Any) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue(QUEUE_SIZE)
        self._wake = asyncio.Event()
        await self.setup()
        async with self.server:
            self.subscriber.start()
            log.info("OPC UA bridge: %s -> %s (%s, namespace %s) for %s", self.settings.endpoint,
                     self.cfg.endpoint, "Basic256Sha256 SignAndEncrypt, certificates" if self.cfg.security
                     else "no security, anonymous", self.cfg.namespace_uri, ", ".join(self.settings.lines))
            try:
                while not stop.is_set():
                    item = await self._next_update()
                    if item is None:
                        continue
                    try:
                        await self._apply(item)
                    except Exception:
                        log.exception("OPC UA update %s for line %s failed", item[0], item[1])
                    # The writes never suspend: without this a backlog would hold the loop until it is
                    # drained, the server answering no client meanwhile and a status change that came
                    # in waiting behind the whole backlog. Let the loop run between two updates.
                    await asyncio.sleep(0)
            finally:
                await asyncio.get_running_loop().run_in_executor(None, self.subscriber.stop)


def _certificate_uri(cert_der: bytes | None) -> str | None:
    """The URI in the certificate's subjectAltName (OPC UA's ApplicationUri), if any."""
    if not cert_der:
        return None
    from cryptography import x509

    try:
        cert = x509.load_der_x509_certificate(cert_der)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except Exception:
        return None
    return uris[0] if uris else None


def run(config_path: str | os.PathLike) -> int:
    settings = load_settings(config_path, "opcua")
    quiet_asyncua()   # before the server's start, which is where asyncua is loudest
    stop = stop_event_on_signals()
    bridge = OpcuaBridge(settings)
    asyncio.run(bridge.serve(stop))
    return 0
