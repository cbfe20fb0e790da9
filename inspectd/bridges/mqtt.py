"""MQTT bridge: verdicts to `<prefix>/<line>/verdict` (JSON, QoS from config, default 1) and the
line's status to `<prefix>/<line>/status` (JSON, retained, QoS 1).

Recipe switch: a message on `<prefix>/<line>/recipe/set` (the recipe name, or JSON {"name", "reason",
"requester"}) is forwarded to the daemon's control socket; the answer ({"ok": ..., "active"/"error"})
is published on `<prefix>/<line>/recipe/result` (QoS 1, not retained). A request the broker replays
because it was retained is ignored (only live requests switch: a replay at each reconnect would undo
later switches); an empty message (clearing a retained request) is no request and gets no answer.
Who may publish on recipe/set is the broker's ACL to configure (the bridge cannot tell MQTT clients
apart).

One MQTT connection per line, so each line's status topic has its own last will ("offline",
retained): a bridge that dies or loses the broker leaves every line it served marked offline.
The status says "offline" when the daemon's heartbeats stop for `stale_after_s` (default two
heartbeat intervals), "blind" when the camera is lost, "engine_failed" when the engine failed,
"failing_safe" while a quarter or more of the parts get the fail-safe verdict, "stopping" while
the daemon stops.
paho's network thread reconnects to a restarted broker (backoff 1 .. 5 s); on every (re)connect
the current status is published again, so a broker without persistence gets it back. A failed
connection attempt (nothing listening, refused, TLS, not authorised) or a lost connection is one
ERROR line naming the broker and the reason; while it keeps failing for the same reason, once a
minute (see _trouble); the connection that follows is one INFO line.

The retained status is always the line's newest: paho holds at most one status message per line
(a change while one is unacknowledged waits for its PUBACK and then sends the newest), a status
change while the broker is away is only noted (the reconnect publishes the newest), and verdicts
and recipe answers never take the places kept for it. A stopping bridge publishes 'offline'; if the
broker does not acknowledge it in time, the bridge closes the connection without DISCONNECT, so
the broker publishes the will ('offline') instead of keeping an older status.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import ssl
import stat
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inspectd.bridges.common import (BridgeSettings, default_client_id, load_settings, make_subscriber,
                                     offline_payload, recipe_request, status_payload, stop_event_on_signals,
                                     verdict_payload)
from inspectd.client import LineStatus, Message
from inspectd.daemon.config import MqttBridgeConfig
from inspectd.errors import ConfigError

log = logging.getLogger("inspectd.bridges.mqtt")

MAX_QUEUED = 10000   # verdicts held while the broker is away (oldest kept; then new ones are dropped)
STATUS_ROOM = 16     # places in each line's queue that verdicts never take: status and recipe answers
STATUS_KEEP = 4      # of those, places recipe answers never take: the one status, the final 'offline'
FINAL_STATUS_WAIT_S = 2.0   # stop(): how long the broker may take to acknowledge 'offline'
_CLAIMED = -1        # _status_mid while a status is being handed to paho (its mid not known yet)
REPORT_EVERY_S = 60.0   # a connection failing again for the same reason: one ERROR line per this, per line


@dataclass
class _Link:
    """One line's connection as paho's callbacks told it, for the log lines (see _trouble)."""

    state: str = "connecting"   # "connected" (CONNACK accepted), "refused" (CONNACK failure, said already)
    said: tuple[str, float] | None = None   # the last failure logged: (reason, monotonic time)
    unsaid: int = 0             # failures not logged since
    say_connected: bool = True  # the next connection is worth an INFO line (the first, any after an error)


def read_password_file(path: Path, source: str) -> str:
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{source}: bridges.mqtt.password_file: {path}: {exc.strerror or exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{source}: bridges.mqtt.password_file: {path} is readable by group/others "
                          f"(mode {stat.S_IMODE(mode):04o}); chmod 600 {path}")
    password = text.rstrip("\r\n")
    if not password:
        raise ConfigError(f"{source}: bridges.mqtt.password_file: {path} is empty")
    return password


class MqttBridge:
    """Subscriber -> paho clients (one per line). Thread-safe: paho's publish may be called from the
    subscriber thread while paho's network threads run."""

    def __init__(self, settings: BridgeSettings) -> None:
        import paho.mqtt.client as mqtt

        self._mqtt = mqtt
        self.settings = settings
        cfg: MqttBridgeConfig = settings.config.bridges.mqtt
        self.cfg = cfg
        self.prefix = cfg.topic_prefix
        self._password = read_password_file(cfg.password_file, settings.source) if cfg.password_file else None
        for field in ("ca", "cert", "key"):
            value = getattr(cfg.tls, field, None) if cfg.tls is not None else None
            if value is not None and not Path(value).is_file():
                raise ConfigError(f"{settings.source}: bridges.mqtt.tls.{field}: {value} does not exist")
        # Guards the bookkeeping below. Never held across a paho call: paho runs on_publish on its
        # network thread while holding its own outgoing-message lock, which publish() takes too.
        self._lock = threading.Lock()
        self._status: dict[str, dict[str, Any]] = {}
        self._status_version: dict[str, int] = {line: 0 for line in settings.lines}
        # The version of the newest status handed to paho, and the id of the status message paho
        # still holds (None: none; _CLAIMED: being handed over). At most one per line: see _publish_status.
        self._status_sent: dict[str, int] = {line: -1 for line in settings.lines}
        self._status_mid: dict[str, int | None] = {line: None for line in settings.lines}
        self._closing = False
        # Message ids paho still holds per line, until on_publish: verdicts (they count against the
        # queue's room), everything else, and acknowledgements that came before their id was noted.
        self._held: dict[str, set[int]] = {line: set() for line in settings.lines}
        self._other: dict[str, set[int]] = {line: set() for line in settings.lines}
        self._early: dict[str, set[int]] = {line: set() for line in settings.lines}
        self.verdicts_dropped = 0
        self._where = f"{self.cfg.host}:{self.cfg.port}"   # the broker, as log lines name it
        self._links = {line: _Link() for line in settings.lines}  # changed under self._lock
        self.clients = {line: self._make_client(line) for line in settings.lines}
        self.subscriber = make_subscriber(settings, self._on_verdict, self._on_status)

    def topic(self, line: str, kind: str) -> str:
        return f"{self.prefix}/{line}/{kind}"

    def _make_client(self, line: str) -> Any:
        mqtt = self._mqtt
        client_id = f"{self.cfg.client_id or default_client_id()}-{line}"
        client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=mqtt.MQTTv311, clean_session=True)
        client.will_set(self.topic(line, "status"),
                        json.dumps(offline_payload(line, "bridge offline")), qos=1, retain=True)
        if self.cfg.username is not None:
            client.username_pw_set(self.cfg.username, self._password)
        if self.cfg.tls is not None:
            tls = self.cfg.tls
            client.tls_set(ca_certs=str(tls.ca) if tls.ca else None, certfile=str(tls.cert) if tls.cert else None,
                           keyfile=str(tls.key) if tls.key else None, cert_reqs=ssl.CERT_REQUIRED,
                           tls_version=ssl.PROTOCOL_TLS_CLIENT)
        client.on_message = lambda c, userdata, message, _line=line: self._on_message(_line, message)
        client.on_publish = lambda c, userdata, mid, rc=None, props=None, _line=line: self._on_published(_line, mid)
        client.reconnect_delay_set(min_delay=1, max_delay=5)
        client.max_queued_messages_set(MAX_QUEUED)
        # Everything held may be in flight: with paho's default (20), a status published while a
        # backlog drains after a reconnect would wait for the whole backlog to be acknowledged.
        client.max_inflight_messages_set(MAX_QUEUED)
        client.on_connect = lambda c, userdata, flags, rc, props=None, _line=line: self._on_connect(_line, rc)
        client.on_connect_fail = lambda c, userdata, _line=line: self._on_connect_fail(_line)
        client.on_disconnect = (lambda c, userdata, flags, rc, props=None, _line=line:
                                self._on_disconnect(_line, flags, rc))
        return client

    # ---- connection (paho's network thread of the line) ------------------------------------------
    def _on_connect(self, line: str, rc: Any) -> None:
        link = self._links[line]
        if getattr(rc, "is_failure", False):
            # The broker answered CONNACK with a failure (not authorised, bad user name or password,
            # ...); it then closes the connection, which on_disconnect must not report again.
            with self._lock:
                link.state = "refused"
            self._trouble(line, f"refused: {rc}", f"MQTT broker {self._where} refused the connection: {rc}")
            return
        with self._lock:
            link.state = "connected"
            say, link.say_connected = link.say_connected, False
            unsaid = link.unsaid if say else 0
            if say:
                link.unsaid = 0
        if say:
            log.info("line %s: connected to MQTT broker %s%s", line, self._where,
                     f" (after {unsaid} more failure(s) not logged)" if unsaid else "")
        else:   # the loss before it was not logged either (same reason within REPORT_EVERY_S)
            log.debug("line %s: connected to MQTT broker %s", line, self._where)
        self.clients[line].subscribe(self.topic(line, "recipe/set"), qos=1)
        self._publish_status(line, reconnected=True)

    def _on_connect_fail(self, line: str) -> None:
        """The TCP/TLS connection could not be made (nothing listening, host unknown, timeout, TLS
        handshake or certificate). paho does not pass the exception, but calls this from inside its
        `except OSError:` around reconnect(), so it is the exception being handled."""
        exc = sys.exc_info()[1]
        reason = (str(exc) or type(exc).__name__) if exc is not None else "connection failed"
        self._trouble(line, reason, f"cannot connect to MQTT broker {self._where}: {reason}")

    def _on_disconnect(self, line: str, flags: Any, rc: Any) -> None:
        link = self._links[line]
        with self._lock:
            was, link.state = link.state, "connecting"
            closing = self._closing
        if closing or was == "refused":   # our own stop; or the close that follows a refusal (said)
            log.debug("line %s: MQTT connection closed (%s)", line, rc)
            return
        # paho reports a dropped TCP connection (MQTT_ERR_CONN_LOST) as 'Unspecified error'.
        reason = str(rc)
        if reason == "Unspecified error" and not getattr(flags, "is_disconnect_packet_from_server", False):
            reason = "connection lost"
        if was == "connected":
            self._trouble(line, reason, f"lost the connection to MQTT broker {self._where}: {reason}")
        else:   # closed before any CONNACK: e.g. a TLS listener spoken to in plain text, not a broker
            self._trouble(line, f"closed: {reason}", f"cannot connect to MQTT broker {self._where}: the "
                                                     f"connection closed before the broker answered ({reason})")

    def _trouble(self, line: str, reason: str, text: str) -> None:
        """One ERROR line for a failed attempt or a lost connection. paho retries every 1..5 s for as
        long as the broker is away (or refuses us, or a link flaps), so a failure for the same reason
        as the last one logged, within REPORT_EVERY_S of it, is only counted (DEBUG; the connection
        that follows it too), and the count said with the next line logged: at most one ERROR line
        a minute per line while nothing changes, and at once when the reason does."""
        now = time.monotonic()
        link = self._links[line]
        with self._lock:
            if self._closing:
                return
            said = link.said
            quiet = said is not None and said[0] == reason and now - said[1] < REPORT_EVERY_S
            if quiet:
                link.unsaid += 1
            else:
                unsaid, link.unsaid = link.unsaid, 0
                link.said = (reason, now)
                link.say_connected = True
        if quiet:
            log.debug("line %s: %s; retrying (same as the last error line)", line, text)
            return
        log.error("line %s: %s; retrying%s", line, text,
                  f" ({unsaid} more failure(s) since the last error line)" if unsaid else "")

    def _held_count(self, line: str) -> int:
        """Messages paho holds for the line (call with self._lock held)."""
        return len(self._held[line]) + len(self._other[line]) + (self._status_mid[line] is not None)

    def _publish(self, line: str, kind: str, payload: str, qos: int, retain: bool = False,
                 verdict: bool = False) -> int:
        """client.publish (no lock of ours held), then note the message id paho will acknowledge.
        Verdicts and recipe answers leave places free for the status (paho refuses at MAX_QUEUED)."""
        mqtt = self._mqtt
        with self._lock:
            full = self._held_count(line) >= MAX_QUEUED - (STATUS_ROOM if verdict else STATUS_KEEP)
        if full:
            return mqtt.MQTT_ERR_QUEUE_SIZE
        info = self.clients[line].publish(self.topic(line, kind), payload, qos=qos, retain=retain)
        if info.rc == mqtt.MQTT_ERR_SUCCESS or (qos > 0 and info.rc == mqtt.MQTT_ERR_NO_CONN):  # paho holds it
            with self._lock:
                if info.mid in self._early[line]:
                    self._early[line].discard(info.mid)
                else:
                    (self._held if verdict else self._other)[line].add(info.mid)
        return info.rc

    def _publish_status(self, line: str, reconnected: bool = False) -> None:
        """Hand paho the line's newest status, if it has not got it yet (`reconnected`: again anyway,
        a restarted broker may have lost it). paho resends what it holds, in order, after a
        reconnect, and after what on_connect publishes: a second, older status still held would
        overwrite the newer one on the broker. So paho holds at most one status per line; a newer
        one waits for that one's PUBACK (_on_published). While the broker is away a change is only
        noted: on_connect publishes the newest, ahead of the verdicts held meanwhile."""
        mqtt = self._mqtt
        client = self.clients[line]
        while True:
            connected = client.is_connected()
            with self._lock:
                version = self._status_version[line]
                if (self._closing or not connected or self._status_mid[line] is not None
                        or (self._status_sent[line] == version and not reconnected)):
                    return
                self._status_mid[line] = _CLAIMED
                payload = self._status.get(line) or status_payload(LineStatus(line))
            info = client.publish(self.topic(line, "status"), json.dumps(payload), qos=1, retain=True)
            held = info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN)
            with self._lock:
                self._status_mid[line] = None
                if held:
                    self._status_sent[line] = version
                    if info.mid in self._early[line]:   # acknowledged already: a newer one may be due
                        self._early[line].discard(info.mid)
                    else:
                        self._status_mid[line] = info.mid
                        return
            if not held:
                # Not expected (places are kept for it); the next PUBACK or reconnect tries again.
                log.error("line %s: status %s not queued for MQTT (%s)", line, payload.get("status"),
                          mqtt.error_string(info.rc))
                return
            reconnected = False

    def _on_published(self, line: str, mid: int) -> None:
        """paho's network thread (paho's outgoing-message lock held; publish() may be called: it is
        reentrant for this thread)."""
        with self._lock:
            if mid == self._status_mid[line]:
                self._status_mid[line] = None
                due = True
            else:
                for pending in (self._held[line], self._other[line]):
                    if mid in pending:
                        pending.discard(mid)
                        break
                else:
                    self._early[line].add(mid)  # acknowledged before _publish noted it
                # a status that could not be queued gets another try once there is room
                due = self._status_mid[line] is None
            due = due and self._status_sent[line] != self._status_version[line]
        if due:
            self._publish_status(line)

    def _on_message(self, line: str, message: Any) -> None:
        if message.topic != self.topic(line, "recipe/set"):
            return
        if not message.payload:
            # How MQTT clears a retained message (a PLC withdrawing its retained request), delivered
            # live to us as subscribers: nothing is asked, so nothing is answered.
            log.debug("line %s: empty message on %s (a retained request cleared): not a request", line,
                      message.topic)
            return
        if message.retain:
            # Delivered because we (re)subscribed, not because someone asked now: a retained request
            # replayed at every reconnect would undo any switch made since. Live requests arrive
            # with retain unset even when published retained.
            log.warning("line %s: retained recipe request %r on %s ignored (publish requests without retain)",
                        line, bytes(message.payload)[:64], message.topic)
            return
        # Off paho's network thread: a switch may load and parity-gate an engine.
        threading.Thread(target=self._forward_recipe, args=(line, bytes(message.payload)), daemon=True,
                         name=f"recipe-{line}").start()

    def _forward_recipe(self, line: str, payload: bytes) -> None:
        answer = recipe_request(self.settings, line, payload, "mqtt")
        log.info("line %s: recipe request %r over MQTT: %s", line, answer.get("requested"),
                 "done" if answer.get("ok") else f"refused: {answer.get('error')}")
        rc = self._publish(line, "recipe/result", json.dumps(answer, default=str), qos=1)
        if rc not in (self._mqtt.MQTT_ERR_SUCCESS, self._mqtt.MQTT_ERR_NO_CONN):
            log.error("line %s: recipe answer for %r not queued for MQTT (%s)", line, answer.get("requested"),
                      self._mqtt.error_string(rc))

    # ---- subscriber callbacks (subscriber thread) ----------------------------------------------
    def _on_status(self, line: str, status: LineStatus) -> None:
        payload = status_payload(status)
        log.info("line %s: status %s (%s)", line, payload["status"], payload["reason"])
        with self._lock:
            self._status[line] = payload
            self._status_version[line] += 1
        self._publish_status(line)

    def _on_verdict(self, msg: Message) -> None:
        if msg.line not in self.clients:
            return
        mqtt = self._mqtt
        # Verdicts never take the last places of paho's queue (see _publish): the status and the
        # final 'offline' must still fit after a long broker outage.
        rc = self._publish(msg.line, "verdict", json.dumps(verdict_payload(msg)), qos=self.cfg.qos, verdict=True)
        if rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            return
        with self._lock:
            self.verdicts_dropped += 1
            dropped = self.verdicts_dropped
        if dropped == 1 or dropped % 1000 == 0:
            log.warning("line %s: verdict seq %s not queued for MQTT (%s; %d dropped so far)", msg.line,
                        msg.header.get("seq"), mqtt.error_string(rc), dropped)

    # ---- lifetime --------------------------------------------------------------------------------
    def start(self) -> None:
        for line, client in self.clients.items():
            # connect_async: the network thread keeps retrying while the broker is down.
            client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s)
            client.loop_start()
        self.subscriber.start()
        log.info("MQTT bridge: %s -> %s:%d (%s/<line>/verdict|status) for %s", self.settings.endpoint,
                 self.cfg.host, self.cfg.port, self.prefix, ", ".join(self.settings.lines))

    def stop(self) -> None:
        """Leave every line 'offline' on the broker. A clean disconnect cancels the will, so it is
        made only once the broker has acknowledged our own 'offline'; otherwise the connection is
        closed without DISCONNECT and the broker publishes the will ('offline', retained)."""
        with self._lock:
            if self._closing:
                return
            self._closing = True     # no status after 'offline' (a PUBACK would send one)
        self.subscriber.stop()
        infos: dict[str, Any] = {}
        for line, client in self.clients.items():
            if not client.is_connected():
                continue   # nothing can reach the broker; queued, it would not go out before we leave
            info = client.publish(self.topic(line, "status"), json.dumps(offline_payload(line, "bridge stopped")),
                                  qos=1, retain=True)
            if info.rc == self._mqtt.MQTT_ERR_SUCCESS:
                infos[line] = info
            elif info.rc != self._mqtt.MQTT_ERR_NO_CONN:   # NO_CONN: the connection just dropped
                log.warning("line %s: final 'offline' not queued for MQTT (%s); leaving it to the will",
                            line, self._mqtt.error_string(info.rc))
        end = time.monotonic() + FINAL_STATUS_WAIT_S
        for line, client in self.clients.items():
            info = infos.get(line)
            if info is not None:
                info.wait_for_publish(max(0.0, end - time.monotonic()))
            if info is not None and info.is_published():
                client.disconnect()
                client.loop_stop()
                continue
            if client.is_connected():
                log.warning("line %s: MQTT broker did not acknowledge 'offline' within %.0f s; closing the "
                            "connection without DISCONNECT so the broker publishes the will", line,
                            FINAL_STATUS_WAIT_S)
                self._drop_connection(client)
            else:
                client.disconnect()   # not connected: stops the reconnect attempts
            client.loop_stop()

    @staticmethod
    def _drop_connection(client: Any) -> None:
        """End the TCP connection without an MQTT DISCONNECT (bytes already written still go out
        first, then the FIN): the broker treats it as a lost client and publishes its will. paho's
        network thread sees the end of the stream; loop_stop() then keeps it from reconnecting."""
        sock = client.socket()
        if sock is None:
            return
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError as exc:   # already gone: the broker has lost us, the will fires anyway
            log.debug("socket shutdown: %s", exc)


def run(config_path: str | os.PathLike) -> int:
    settings = load_settings(config_path, "mqtt")
    stop = stop_event_on_signals()
    bridge = MqttBridge(settings)
    bridge.start()
    try:
        while not stop.wait(0.5):
            pass
    finally:
        bridge.stop()
    return 0
