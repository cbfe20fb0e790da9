"""`inspectd bridge mqtt` as a child process between a real daemon child (replay line, tiny bundle)
and a real Mosquitto broker: verdicts arrive with the daemon's frame id and seq, the retained status
goes offline when the daemon is killed, and the bridge follows a daemon restart and a broker restart."""

from __future__ import annotations

import contextlib
import json
import queue
import time
from pathlib import Path
from typing import Any, Iterator

import paho.mqtt.client as mqtt
import pytest
import yaml

from inspectd.client import VerdictSubscriber
from tests.bridges.conftest import BRIDGE, Child, Mosquitto, replay_config
from tests.daemon.test_run import Daemon, _collect


class Watcher:
    """A paho subscriber on inspectd/line1/#; resubscribes after a broker restart."""

    def __init__(self, port: int) -> None:
        self.q: queue.Queue[tuple[float, str, dict, bool]] = queue.Queue()
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=f"watch-{port}")
        self.client.on_connect = lambda c, u, f, rc, p=None: c.subscribe("inspectd/line1/#", qos=1)
        self.client.on_message = lambda c, u, m: self.q.put((time.monotonic(), m.topic, json.loads(m.payload),
                                                             bool(m.retain)))
        self.client.reconnect_delay_set(0.2, 1)
        self.client.connect_async("127.0.0.1", port, keepalive=5)
        self.client.loop_start()

    def wait(self, topic: str, pred: Any, timeout_s: float) -> tuple[float, dict]:
        end = time.monotonic() + timeout_s
        seen = []
        while time.monotonic() < end:
            try:
                at, t, payload, _ = self.q.get(timeout=0.1)
            except queue.Empty:
                continue
            seen.append((t, payload.get("status", payload.get("seq"))))
            if t == topic and pred(payload):
                return at, payload
        raise AssertionError(f"no matching message on {topic} within {timeout_s} s; saw {seen[-10:]}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_mqtt_bridge_end_to_end(tmp_path: Path, tiny_bundle: Path, synthetic_parts: Any, mosquitto: Any) -> None:
    stale = 0.6
    cfg, endpoint = replay_config(tmp_path, tiny_bundle, synthetic_parts, {
        "stale_after_s": stale, "mqtt": {"host": "127.0.0.1", "port": mosquitto.port, "client_id": "t"}})
    daemon = Daemon(cfg)
    bridge = Child(BRIDGE + ["mqtt", "--config", str(cfg)])
    watcher = Watcher(mosquitto.port)
    try:
        # 1. the line comes up; a verdict carries the daemon's frame id and seq.
        watcher.wait("inspectd/line1/status", lambda p: p["status"] == "ok", 60)
        with VerdictSubscriber(endpoint, lines=["line1"], topics=("verdict",)) as direct:
            got = _collect(direct, 10, until=lambda m: m.kind == "verdict" and m.header["seq"] >= 1)
            sent = {(m.header["seq"], m.header["frame_id"]) for m in got if m.kind == "verdict"}
            assert sent, "the daemon published no verdict"
            _, v = watcher.wait("inspectd/line1/verdict", lambda p: (p["seq"], p["frame_id"]) in sent, 10)
        assert v["verdict"] in ("OK", "NG") and v["line"] == "line1"
        assert v["chunks"] == {"EncoderValue": None}   # replay: named chunk passed through as null
        assert "camera_timestamp" in v and "acquired_ns" in v

        # 2. daemon killed: the retained status says offline within stale_after_s (+ slack for 2 cores).
        start_ns = v["daemon_start_ns"]
        killed = time.monotonic()
        daemon.kill()
        at, st = watcher.wait("inspectd/line1/status", lambda p: p["status"] == "offline", stale + 3)
        assert st["online"] is False and st["healthy"] is False and st["reason"] == "heartbeat lost"
        assert at - killed <= stale + 1.5, at - killed

        # 3. daemon restarted on the same endpoint: status ok again, verdicts of the new daemon.
        daemon = Daemon(cfg)
        watcher.wait("inspectd/line1/status", lambda p: p["status"] == "ok", 60)
        watcher.wait("inspectd/line1/verdict", lambda p: p["daemon_start_ns"] != start_ns, 10)

        # 4. broker restarted (no persistence: retained status lost): the bridge reconnects,
        #    republishes the retained status and verdicts flow again.
        watcher.close()
        mosquitto.stop()
        time.sleep(0.3)
        mosquitto.start()
        fresh = Watcher(mosquitto.port)
        try:
            _, st = fresh.wait("inspectd/line1/status", lambda p: p["status"] == "ok", 15)
            fresh.wait("inspectd/line1/verdict", lambda p: p["daemon_start_ns"] != start_ns, 10)
        finally:
            fresh.close()
        # 5. stopping the bridge leaves the line marked offline (retained), not a stale "ok".
        assert bridge.stop() == 0, bridge.log()
        last = Watcher(mosquitto.port)
        try:
            _, st = last.wait("inspectd/line1/status", lambda p: True, 5)
            assert st["status"] == "offline" and st["bridge"] == "offline"
        finally:
            last.close()
    finally:
        watcher.close()
        bridge.stop()
        daemon.kill()


def test_last_will_marks_lines_offline_when_the_bridge_dies(tmp_path: Path, mosquitto: Any) -> None:
    """No daemon needed: the bridge connects, says the line's status, is SIGKILLed; the broker
    publishes its will (offline, retained)."""
    cfg = tmp_path / "lines.yaml"
    cfg.write_text(json.dumps({"zmq": {"endpoint": "tcp://127.0.0.1:1"}, "heartbeat_interval_s": 0.2,
                               "lines": [{"id": "line1", "source": {"type": "replay", "path": str(tmp_path)},
                                          "bundle": str(tmp_path), "threshold": 3.0}],
                               "bridges": {"mqtt": {"port": mosquitto.port, "keepalive_s": 2}}}))
    bridge = Child(BRIDGE + ["mqtt", "--config", str(cfg)])
    watcher = Watcher(mosquitto.port)
    try:
        watcher.wait("inspectd/line1/status", lambda p: p["bridge"] == "online", 20)
        bridge.proc.kill()
        _, st = watcher.wait("inspectd/line1/status", lambda p: p["bridge"] == "offline", 10)
        assert st["status"] == "offline" and st["reason"] == "bridge offline"
    finally:
        watcher.close()
        bridge.stop()


def test_mqtt_bridge_over_tls_with_a_password(tmp_path: Path, tiny_bundle: Path, synthetic_parts: Any) -> None:
    """A real Mosquitto that only speaks TLS and refuses anonymous clients: the bridge connects with
    its username, password file and CA, verdicts arrive; a wrong password is refused and said so."""
    import shutil
    import ssl
    import subprocess
    import tempfile

    from tests.bridges.conftest import make_cert

    # Mosquitto started as root drops to its own user before reading its files: they cannot live
    # under pytest's private (0700) tmp_path.
    broker_files = Path(tempfile.mkdtemp(prefix="inspectd-mqtt-tls-"))
    broker_files.chmod(0o755)
    server_cert, server_key = make_cert(broker_files, "broker", "urn:test:broker", key_mode=0o644)
    passwd = broker_files / "broker.passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwd), "line", "s3cret"], check=True, capture_output=True)
    passwd.chmod(0o644)  # the broker may drop root privileges before reading it
    broker = Mosquitto(tmp_path)
    broker.stop()
    broker.conf.write_text(f"listener {broker.port} 127.0.0.1\nallow_anonymous false\npassword_file {passwd}\n"
                           f"cafile {server_cert}\ncertfile {server_cert}\nkeyfile {server_key}\n"
                           f"persistence false\nlog_dest stderr\n")
    broker.start()
    good_pw, bad_pw = tmp_path / "pw", tmp_path / "bad-pw"
    good_pw.write_text("s3cret\n")
    bad_pw.write_text("wrong\n")
    good_pw.chmod(0o600)
    bad_pw.chmod(0o600)

    def mqtt_cfg(pw: Path) -> dict[str, Any]:
        return {"mqtt": {"host": "localhost", "port": broker.port, "client_id": f"t-{pw.name}", "username": "line",
                         "password_file": str(pw), "tls": {"ca": str(server_cert)}}}

    cfg, _ = replay_config(tmp_path, tiny_bundle, synthetic_parts, mqtt_cfg(good_pw))
    daemon = Daemon(cfg)
    bridge = Child(BRIDGE + ["mqtt", "--config", str(cfg)])
    got: queue.Queue[tuple[str, dict]] = queue.Queue()
    watch = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="tls-watch")
    watch.username_pw_set("line", "s3cret")
    watch.tls_set(ca_certs=str(server_cert), cert_reqs=ssl.CERT_REQUIRED)
    watch.on_connect = lambda c, u, f, rc, p=None: c.subscribe("inspectd/line1/#", qos=1)
    watch.on_message = lambda c, u, m: got.put((m.topic, json.loads(m.payload)))
    watch.connect("localhost", broker.port, keepalive=5)
    watch.loop_start()
    try:
        end, verdict = time.monotonic() + 60, None
        while verdict is None and time.monotonic() < end:
            try:
                topic, payload = got.get(timeout=0.5)
            except queue.Empty:
                continue
            if topic == "inspectd/line1/verdict":
                verdict = payload
        assert verdict is not None and verdict["line"] == "line1", bridge.log()
        assert bridge.stop() == 0, bridge.log()

        # The same bridge with a wrong password: refused by the broker, and the log says why.
        raw = yaml.safe_load(cfg.read_text())
        raw["bridges"] = mqtt_cfg(bad_pw)
        cfg.write_text(yaml.safe_dump(raw))
        refused = Child(BRIDGE + ["mqtt", "--config", str(cfg)])
        try:
            end = time.monotonic() + 20
            while time.monotonic() < end and not any("not authori" in x.lower() or "bad user name or password"
                                                     in x.lower() for x in refused.lines):
                time.sleep(0.2)
            assert any("not authori" in x.lower() or "bad user name or password" in x.lower()
                       for x in refused.lines), refused.log()
        finally:
            refused.stop()
    finally:
        watch.disconnect()
        watch.loop_stop()
        bridge.stop()
        daemon.kill()
        broker.stop()
        shutil.rmtree(broker_files, ignore_errors=True)


def test_status_gets_through_when_a_broker_outage_filled_the_verdict_queue(tmp_path: Path, tiny_bundle: Path,
                                                                           synthetic_parts: Any, mosquitto: Any,
                                                                           monkeypatch: Any) -> None:
    """The broker is away long enough for the verdicts held for it to fill the bridge's queue (10,000
    in the product; 30 here so the test takes seconds), and meanwhile the daemon goes away. When the
    broker is back, its retained status must say offline — not nothing, and not a stale 'ok'.
    In-process bridge (to lower the cap), a real daemon-side Publisher, a real Mosquitto."""
    from inspectd.bridges import mqtt as bridge_mqtt
    from tests.bridges.conftest import SubscriberTap
    from tests.daemon.test_client import make_verdict

    monkeypatch.setattr(bridge_mqtt, "MAX_QUEUED", 30)
    cfg, endpoint = replay_config(tmp_path, tiny_bundle, synthetic_parts, {
        "mqtt": {"host": "127.0.0.1", "port": mosquitto.port, "client_id": "full"}})
    with _ok_line_through_bridge(bridge_mqtt, cfg, endpoint, mosquitto.port) as (pub, bridge):
        _quick_reconnect(bridge)
        tap = SubscriberTap(bridge.subscriber)
        mosquitto.stop()
        for i in range(60):
            pub.publish_verdict(make_verdict(i))
            time.sleep(0.01)
        tap.wait(lambda t: t.verdicts >= 60, 10, "the verdicts reaching the bridge")
        assert bridge.verdicts_dropped > 0, "the verdicts did not fill the queue (test precondition)"
        pub.stop()                    # the daemon goes away while the broker is still away
        # the bridge notices (stale after two heartbeat intervals)
        tap.wait(lambda t: t.statuses and not t.statuses[-1].heartbeat, 10, "the bridge taking the line as offline")
        mosquitto.start()
        _wait_status(mosquitto.port, lambda p: p.get("status") == "offline", 20)


def test_a_puback_arriving_while_a_verdict_is_published_never_deadlocks(tmp_path: Path, tiny_bundle: Path,
                                                                        synthetic_parts: Any) -> None:
    """paho calls on_publish (a QoS 1 PUBACK) on its network thread while holding its outgoing-message
    lock; the subscriber thread publishes verdicts, which takes that same lock. The bridge must never
    hold a lock of its own across publish() that on_publish also takes: the two threads would wait
    for each other for good (no verdicts, no keepalive; the broker publishes the 'offline' will).
    Real paho client and bridge; the PUBACK's moment is forced by holding paho's lock as its network
    thread does."""
    import threading

    from inspectd.bridges import mqtt as bridge_mqtt
    from inspectd.bridges.common import load_settings
    from inspectd.client import Message

    cfg, _ = replay_config(tmp_path, tiny_bundle, synthetic_parts, {
        "mqtt": {"host": "127.0.0.1", "port": 1, "client_id": "lock"}})    # never connected: publish queues
    bridge = bridge_mqtt.MqttBridge(load_settings(cfg, "mqtt"))
    client = bridge.clients["line1"]
    header = {"seq": 1, "line": "line1", "verdict": "OK", "frame_id": 1}
    msg = Message(topic="verdict.line1", kind="verdict", line="line1", header=header, payload=None)

    def network() -> None:   # what paho does on a PUBACK: on_publish under its outgoing-message lock
        with client._out_message_mutex:
            time.sleep(0.3)
            client.on_publish(client, None, 1, None, None)

    def subscriber() -> None:
        time.sleep(0.1)
        bridge._on_verdict(msg)
        bridge._on_status("line1", bridge_mqtt.LineStatus("line1"))

    threads = [threading.Thread(target=network, daemon=True), threading.Thread(target=subscriber, daemon=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(3.0)
    assert not any(t.is_alive() for t in threads), "the bridge deadlocked with paho's network thread"


@pytest.mark.parametrize("kind, module", [("mqtt", "paho"), ("opcua", "asyncua")])
def test_a_bridge_without_its_library_says_how_to_install_it(tmp_path: Path, kind: str, module: str) -> None:
    """A bridge unit on a box installed without the bridges extra: one line saying what to install
    (exit 2: systemd's journal shows it), not a ModuleNotFoundError traceback every 2 s."""
    import subprocess
    import sys

    cfg = tmp_path / "lines.yaml"
    cfg.write_text(yaml.safe_dump({
        "zmq": {"endpoint": "tcp://127.0.0.1:5555"},
        "lines": [{"id": "line1", "source": {"type": "replay", "path": "p"}, "bundle": "b", "threshold": 1.0}],
        "bridges": {"mqtt": {"host": "127.0.0.1", "port": 1883},
                    "opcua": {"endpoint": "opc.tcp://127.0.0.1:4840/inspectd/"}}}))
    code = (f"import sys; sys.modules[{module!r}] = None; from inspectd.cli import main; "
            f"sys.exit(main(['bridge', {kind!r}, '--config', {str(cfg)!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(err) == 1, proc.stderr
    assert "inspectd[bridges]" in err[0] and "Traceback" not in proc.stderr


OK_STATUS = {"state": "ok", "camera_connected": True, "engine_ready": True}


@contextlib.contextmanager
def _ok_line_through_bridge(bridge_mqtt: Any, cfg: Path, endpoint: str, broker_port: int) -> Iterator[tuple[Any, Any]]:
    """A daemon-side Publisher saying line1 is ok and an in-process MQTT bridge (whose module the
    test may have patched), yielded once the broker at `broker_port` retains that 'ok'; both
    stopped after the block."""
    from inspectd.bridges.common import load_settings
    from inspectd.daemon.publish import Publisher

    pub = Publisher(endpoint, heartbeat_interval_s=0.2)
    pub.set_line_status("line1", OK_STATUS)
    pub.start()
    bridge = bridge_mqtt.MqttBridge(load_settings(cfg, "mqtt"))
    bridge.start()
    try:
        _wait_status(broker_port, lambda p: p.get("status") == "ok", 20)
        yield pub, bridge
    finally:
        bridge.stop()
        pub.stop()


def _wait_status(broker_port: int, cond: Any, timeout_s: float) -> dict:
    """The first (retained or new) line1 status on the broker that meets `cond`."""
    watcher = Watcher(broker_port)
    try:
        return watcher.wait("inspectd/line1/status", cond, timeout_s)[1]
    finally:
        watcher.close()
BLIND_STATUS = {"state": "blind", "camera_connected": False, "engine_ready": True}


def _flap_until_blind(pub: Any, tap: Any, changes: int) -> None:
    """`changes` status changes of line1 (blind, ok, blind, ...), the last one blind; each is sent at
    once, and the next only once the bridge has taken it (`tap`: a SubscriberTap on the bridge's
    subscriber), so that none is lost between two heartbeats."""
    for k in range(changes):
        status = BLIND_STATUS if (changes - 1 - k) % 2 == 0 else OK_STATUS
        taken = len(tap.statuses)
        pub.set_line_status("line1", status, now=True)
        tap.wait(lambda t: any(s.heartbeat and s.state == status["state"] for s in t.statuses[taken:]), 10,
                 f"status change {k + 1} of {changes} ({status['state']}) reaching the bridge")


def _quick_reconnect(bridge: Any) -> None:
    """paho's reconnect attempts every 0.1 .. 0.5 s instead of the bridge's 1 .. 5 s, so that a test
    does not wait out the backoff once the broker is back (what is published then is unchanged)."""
    for client in bridge.clients.values():
        client.reconnect_delay_set(min_delay=0.1, max_delay=0.5)


def _wait_paho_idle(bridge: Any, timeout_s: float) -> None:
    """Until paho holds no message of the bridge's any more: each one it held (an older status too)
    has been acknowledged by the broker, so it has landed there."""
    _until(lambda: all(not client._out_messages for client in bridge.clients.values()), timeout_s,
           "the broker acknowledging every message the bridge held")


def _status_changes_seen(caplog: Any) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "inspectd.bridges.mqtt" and r.getMessage().startswith("line line1: status ")]


def test_the_current_status_is_retained_after_more_status_changes_in_an_outage_than_reserved_places(
        tmp_path: Path, tiny_bundle: Path, synthetic_parts: Any, mosquitto: Any, monkeypatch: Any,
        caplog: Any) -> None:
    """The broker is away long enough for verdicts to fill their share of the bridge's queue (30 places
    here instead of 10,000), and meanwhile the camera flaps more often than the places verdicts leave
    free (16), ending blind. Once the broker is back it must retain the line's current status (blind,
    healthy false), not an older 'ok' taken from the queue; a bridge stopped afterwards leaves
    'offline'. In-process bridge (to lower the cap), a real daemon-side Publisher, a real Mosquitto."""
    import logging

    from inspectd.bridges import mqtt as bridge_mqtt
    from tests.bridges.conftest import SubscriberTap
    from tests.daemon.test_client import make_verdict

    caplog.set_level(logging.INFO, logger="inspectd.bridges.mqtt")
    monkeypatch.setattr(bridge_mqtt, "MAX_QUEUED", 30)
    # stale_after_s long: a heartbeat late on a loaded box must not add an 'offline' after the last change
    cfg, endpoint = replay_config(tmp_path, tiny_bundle, synthetic_parts, {
        "stale_after_s": 10.0, "mqtt": {"host": "127.0.0.1", "port": mosquitto.port, "client_id": "flap"}})
    with _ok_line_through_bridge(bridge_mqtt, cfg, endpoint, mosquitto.port) as (pub, bridge):
        _quick_reconnect(bridge)
        tap = SubscriberTap(bridge.subscriber)
        mosquitto.stop()
        for i in range(60):
            pub.publish_verdict(make_verdict(i))
            time.sleep(0.01)
        tap.wait(lambda t: t.verdicts >= 60, 10, "the verdicts reaching the bridge")
        assert bridge.verdicts_dropped > 0, "the verdicts did not fill their share of the queue (test precondition)"
        before = len(_status_changes_seen(caplog))
        _flap_until_blind(pub, tap, bridge_mqtt.STATUS_ROOM + 5)
        seen = _status_changes_seen(caplog)[before:]
        assert len(seen) > bridge_mqtt.STATUS_ROOM and "status blind" in seen[-1], seen
        mosquitto.start()
        _wait_status(mosquitto.port, lambda p: p.get("status") == "blind", 20)
        # anything older the bridge still held has landed by now: paho has had it all acknowledged
        _wait_paho_idle(bridge, 20)
        retained = _wait_status(mosquitto.port, lambda p: True, 10)
        assert retained["status"] == "blind" and retained["healthy"] is False, retained
        bridge.stop()
        retained = _wait_status(mosquitto.port, lambda p: True, 10)
        assert retained["status"] == "offline" and retained["bridge"] == "offline", retained


def test_a_stopping_bridge_leaves_offline_retained_when_the_broker_does_not_acknowledge(
        tmp_path: Path, tiny_bundle: Path, synthetic_parts: Any, mosquitto: Any, monkeypatch: Any) -> None:
    """The path to the broker stalls (the connection stays up, nothing is acknowledged) while verdicts
    and status changes fill the bridge's queue; then the bridge is stopped. Once the path moves again
    the broker must retain 'offline': a bridge that cannot hand over its own 'offline' must not
    disconnect cleanly (a DISCONNECT cancels the will). In-process bridge (to lower the cap), a real
    daemon-side Publisher, a real Mosquitto behind a relay that can stall."""
    from inspectd.bridges import mqtt as bridge_mqtt
    from tests.bridges.conftest import StallingRelay, SubscriberTap
    from tests.daemon.test_client import make_verdict

    monkeypatch.setattr(bridge_mqtt, "MAX_QUEUED", 30)
    # How long stop() waits for the broker to acknowledge 'offline' (2 s in the product): the path is
    # stalled for as long as stop() runs, so no wait would be answered; a shorter one only ends sooner.
    monkeypatch.setattr(bridge_mqtt, "FINAL_STATUS_WAIT_S", 1.0)
    relay = StallingRelay(mosquitto.port)
    cfg, endpoint = replay_config(tmp_path, tiny_bundle, synthetic_parts, {
        "mqtt": {"host": "127.0.0.1", "port": relay.port, "client_id": "stall", "keepalive_s": 60}})
    try:
        with _ok_line_through_bridge(bridge_mqtt, cfg, endpoint, mosquitto.port) as (pub, bridge):
            tap = SubscriberTap(bridge.subscriber)
            relay.stall()
            for i in range(40):
                pub.publish_verdict(make_verdict(i))
                time.sleep(0.01)
            tap.wait(lambda t: t.verdicts >= 40, 10, "the verdicts reaching the bridge")
            _flap_until_blind(pub, tap, bridge_mqtt.STATUS_ROOM + 3)
            bridge.stop()
            relay.resume()
            relay.wait_drained(20)        # the broker has read what the relay held, and the close after it
            retained = _wait_status(mosquitto.port, lambda p: True, 10)
            assert retained["status"] == "offline" and retained["healthy"] is False, retained
    finally:
        relay.close()


# ---- connection problems are logged (once, with the broker and the reason) ------------------------

def bare_config(tmp_path: Path, mqtt_cfg: dict[str, Any]) -> Path:
    """One line and no daemon behind it: enough for an in-process MQTT bridge."""
    cfg = tmp_path / "lines.yaml"
    cfg.write_text(json.dumps({"zmq": {"endpoint": "tcp://127.0.0.1:1"}, "heartbeat_interval_s": 0.2,
                               "state_dir": str(tmp_path / "state"),
                               "lines": [{"id": "line1", "source": {"type": "replay", "path": str(tmp_path)},
                                          "bundle": str(tmp_path), "threshold": 3.0}],
                               "bridges": {"mqtt": mqtt_cfg}}))
    return cfg


def _until(cond: Any, timeout_s: float, what: str) -> None:
    end = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        time.sleep(0.05)


def _bridge_lines(caplog: Any, level: int) -> list[str]:
    """The MQTT bridge's log lines at exactly `level`."""
    return [r.getMessage() for r in caplog.records if r.name == "inspectd.bridges.mqtt" and r.levelno == level]


def _connected_lines(caplog: Any) -> list[str]:
    import logging
    return [x for x in _bridge_lines(caplog, logging.INFO) if "connected to MQTT broker" in x]


def _count_calls(client: Any, callback: str, counted: list, when: Any = lambda *a: True) -> None:
    """Note each call of the bridge's paho `callback` (the bridge's own, if any, still runs)."""
    own = getattr(client, callback)

    def noting(*args: Any) -> None:
        if when(*args):
            counted.append(time.monotonic())
        if own is not None:
            own(*args)

    setattr(client, callback, noting)


def test_a_broker_that_is_not_there_is_logged_once_then_the_connection_when_it_comes(tmp_path: Path,
                                                                                     caplog: Any) -> None:
    """Nothing listens on the broker's port: one ERROR line naming host:port and why (not one per
    retry of paho's network thread); once a broker listens there, one INFO line says connected.
    Real paho client (its own retries, made quicker than the bridge's 1..5 s so the test takes
    seconds), real bridge in-process, then a real Mosquitto on that port."""
    import logging

    from inspectd.bridges import mqtt as bridge_mqtt
    from inspectd.bridges.common import load_settings
    from tests.bridges.conftest import free_port

    caplog.set_level(logging.DEBUG, logger="inspectd.bridges.mqtt")
    port = free_port()
    bridge = bridge_mqtt.MqttBridge(load_settings(bare_config(tmp_path, {"host": "127.0.0.1", "port": port,
                                                                          "client_id": "down"}), "mqtt"))
    attempts: list[float] = []
    _count_calls(bridge.clients["line1"], "on_connect_fail", attempts)
    bridge.clients["line1"].reconnect_delay_set(min_delay=0.1, max_delay=0.3)
    bridge.start()
    broker = None
    try:
        _until(lambda: len(attempts) >= 4, 5, "four failed connection attempts")
        time.sleep(0.1)
        errors = _bridge_lines(caplog, logging.ERROR)
        assert len(errors) == 1, errors
        assert f"127.0.0.1:{port}" in errors[0] and "connection refused" in errors[0].lower(), errors
        broker = Mosquitto(tmp_path, port=port)
        _until(lambda: _connected_lines(caplog), 10, "INFO 'connected to MQTT broker'")
        assert f"127.0.0.1:{port}" in _connected_lines(caplog)[0]
        assert len(_bridge_lines(caplog, logging.ERROR)) == 1
    finally:
        bridge.stop()
        if broker is not None:
            broker.stop()


def test_a_lost_broker_is_an_error_line_and_the_reconnect_an_info_line(tmp_path: Path, mosquitto: Any,
                                                                        caplog: Any) -> None:
    """The broker dies under a connected bridge: an ERROR line names host:port and says the
    connection was lost; the failed attempts while it is down say why (refused); once it is back,
    INFO 'connected' again. Real Mosquitto killed and restarted, real bridge in-process (paho's
    retries made quicker than the bridge's 1..5 s, so the test takes seconds)."""
    import logging

    from inspectd.bridges import mqtt as bridge_mqtt
    from inspectd.bridges.common import load_settings

    caplog.set_level(logging.DEBUG, logger="inspectd.bridges.mqtt")
    where = f"127.0.0.1:{mosquitto.port}"
    bridge = bridge_mqtt.MqttBridge(load_settings(bare_config(tmp_path, {"host": "127.0.0.1", "port": mosquitto.port,
                                                                          "client_id": "lost"}), "mqtt"))
    attempts: list[float] = []
    _count_calls(bridge.clients["line1"], "on_connect_fail", attempts)
    _quick_reconnect(bridge)
    bridge.start()
    try:
        _until(lambda: _connected_lines(caplog), 10, "INFO 'connected to MQTT broker'")
        mosquitto.stop()
        _until(lambda: attempts, 5, "a failed reconnection attempt")
        time.sleep(0.1)
        errors = _bridge_lines(caplog, logging.ERROR)
        assert errors and where in errors[0] and "lost" in errors[0], errors
        assert len(errors) == 2 and where in errors[1] and "connection refused" in errors[1].lower(), errors
        mosquitto.start()
        _until(lambda: len(_connected_lines(caplog)) == 2, 10, "a second INFO 'connected to MQTT broker'")
        assert where in _connected_lines(caplog)[1]
        assert not _bridge_lines(caplog, logging.WARNING), _bridge_lines(caplog, logging.WARNING)
    finally:
        bridge.stop()


def test_a_broker_refusing_the_bridge_is_logged_once_with_its_reason(tmp_path: Path, caplog: Any) -> None:
    """A real Mosquitto that admits no anonymous client refuses the bridge (CONNACK 'Not authorized')
    at every retry: one ERROR line naming host:port and the reason, no line per retry, and the
    broker closing the refused connection is not reported as a lost connection. (paho's retries made
    quicker than the bridge's 1..5 s, so the test takes seconds.)"""
    import logging

    from inspectd.bridges import mqtt as bridge_mqtt
    from inspectd.bridges.common import load_settings

    caplog.set_level(logging.DEBUG, logger="inspectd.bridges.mqtt")
    broker = Mosquitto(tmp_path)
    broker.stop()
    broker.conf.write_text(f"listener {broker.port} 127.0.0.1\nallow_anonymous false\npersistence false\n")
    broker.start()
    bridge = bridge_mqtt.MqttBridge(load_settings(bare_config(tmp_path, {"host": "127.0.0.1", "port": broker.port,
                                                                          "client_id": "refused"}), "mqtt"))
    refusals: list[float] = []
    _count_calls(bridge.clients["line1"], "on_connect", refusals, when=lambda c, u, f, rc, p=None: rc.is_failure)
    _quick_reconnect(bridge)
    bridge.start()
    try:
        _until(lambda: len(refusals) >= 2, 5, "two refused connection attempts")
        time.sleep(0.1)
        errors = _bridge_lines(caplog, logging.ERROR)
        assert len(errors) == 1, errors
        assert f"127.0.0.1:{broker.port}" in errors[0] and "not authori" in errors[0].lower(), errors
        assert not _bridge_lines(caplog, logging.WARNING), _bridge_lines(caplog, logging.WARNING)
    finally:
        bridge.stop()
        broker.stop()
