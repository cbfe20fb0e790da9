"""`inspectd bridge opcua` as a child process with Basic256Sha256 SignAndEncrypt and certificates
made here: a real asyncua client (trusted certificate as its user identity) sees the daemon's
verdicts (same frame id and seq) as variables and events; anonymous and unencrypted clients are
refused; Healthy goes false when the daemon is killed and true again when it comes back."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from asyncua import Client, ua
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

from inspectd.client import VerdictSubscriber
from tests.bridges.conftest import BRIDGE, Child, free_port, make_cert, replay_config, wait_port
from tests.daemon.test_run import Daemon, _collect

CLIENT_URI = "urn:inspectd:test:client"


async def _secure_client(url: str, cert: Path, key: Path, identity: bool = True) -> Client:
    client = Client(url, timeout=5)
    client.application_uri = CLIENT_URI
    await client.set_security(SecurityPolicyBasic256Sha256, str(cert), str(key),
                              mode=ua.MessageSecurityMode.SignAndEncrypt)
    if identity:
        await client.load_client_certificate(str(cert))
        await client.load_private_key(str(key))
    return client


class Changes:
    def __init__(self) -> None:
        self.values: list[tuple[float, str, Any]] = []
        self.events: list[Any] = []

    def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
        self.values.append((time.monotonic(), node.nodeid.Identifier, val))

    def event_notification(self, event: Any) -> None:
        self.events.append(event)


async def _until(pred: Any, timeout_s: float, what: str) -> float:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return time.monotonic()
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} within {timeout_s} s")


def test_opcua_bridge_end_to_end(tmp_path: Path, tiny_bundle: Path, synthetic_parts: Any) -> None:
    pki = tmp_path / "pki"
    server_cert, server_key = make_cert(pki / "server", "server", "urn:inspectd:test:bridge")
    client_cert, client_key = make_cert(pki / "trusted", "client", CLIENT_URI)
    stranger_cert, stranger_key = make_cert(pki / "other", "stranger", CLIENT_URI)
    (pki / "trusted" / "client.key.pem").rename(pki / "client.key.pem")
    client_key = pki / "client.key.pem"
    port = free_port()
    url = f"opc.tcp://127.0.0.1:{port}/inspectd/"
    stale = 0.6
    cfg, endpoint = replay_config(tmp_path, tiny_bundle, synthetic_parts, {
        "stale_after_s": stale,
        "opcua": {"endpoint": url, "namespace_uri": "urn:inspectd:test",
                  "security": {"certificate": str(server_cert), "private_key": str(server_key),
                               "trusted_clients_dir": str(pki / "trusted")}}})
    daemon = Daemon(cfg)
    bridge = Child(BRIDGE + ["opcua", "--config", str(cfg)])

    async def scenario() -> None:
        nonlocal daemon
        wait_port(port, 30)
        # Refused: no security at all (only the SignAndEncrypt endpoint exists) ...
        plain = Client(url, timeout=5)
        with pytest.raises(Exception):
            await plain.connect()
            await plain.disconnect()
        # ... an encrypted channel with an anonymous identity ...
        anon = await _secure_client(url, client_cert, client_key, identity=False)
        with pytest.raises(ua.UaError) as refused:
            await anon.connect()
        assert "IdentityToken" in str(refused.value) or "Rejected" in type(refused.value).__name__, refused.value
        await _disconnect_quietly(anon)
        # ... and a certificate that is not in trusted_clients_dir.
        stranger = await _secure_client(url, stranger_cert, stranger_key)
        with pytest.raises(ua.UaError):
            await stranger.connect()
        await _disconnect_quietly(stranger)

        client = await _secure_client(url, client_cert, client_key)
        async with client:
            idx = await client.get_namespace_index("urn:inspectd:test")
            folder = client.get_node(ua.NodeId("line1", idx))
            node = {name: client.get_node(ua.NodeId(f"line1.{name}", idx))
                    for name in ("Seq", "FrameId", "Healthy", "LastVerdict", "Chunks", "FramesOK", "FramesNG")}
            changes = Changes()
            sub = await client.create_subscription(50, changes)
            await sub.subscribe_data_change([node["Seq"], node["FrameId"], node["Healthy"]])
            etype = await client.nodes.base_event_type.get_child([f"{idx}:InspectdVerdictEventType"])
            await sub.subscribe_events(folder, etype)

            def healthy() -> bool | None:
                vals = [v for _, n, v in changes.values if n == "line1.Healthy"]
                return vals[-1] if vals else None

            await _until(lambda: healthy() is True, 60, "Healthy never became true")
            direct = VerdictSubscriber(endpoint, lines=["line1"], topics=("verdict",))
            got = await asyncio.get_running_loop().run_in_executor(
                None, lambda: _collect(direct, 10, until=lambda m: m.header["seq"] >= 2))
            direct.close()
            sent = {m.header["seq"]: m.header["frame_id"] for m in got}
            assert sent, "the daemon published no verdict"
            await _until(lambda: any(int(e.Seq) in sent and int(e.FrameId) == sent[int(e.Seq)]
                                     for e in changes.events), 10, "no verdict event with the daemon's seq/frame id")
            ev = next(e for e in changes.events if int(e.Seq) in sent)
            assert ev.Verdict in ("OK", "NG") and ev.Line == "line1" and ev.Chunks == '{"EncoderValue":null}'
            # The variables hold the latest verdict (Seq and FrameId of one message, written together).
            seqs = {v for _, n, v in changes.values if n == "line1.Seq"}
            assert seqs & set(sent), (seqs, sent)
            seq, frame_id = await node["Seq"].read_value(), await node["FrameId"].read_value()
            assert frame_id >= 1 and seq >= 0
            assert await node["LastVerdict"].read_value() in ("OK", "NG")
            assert (await node["FramesOK"].read_value()) + (await node["FramesNG"].read_value()) >= 1

            killed = time.monotonic()
            daemon.kill()
            at = await _until(lambda: healthy() is False, stale + 3, "Healthy stayed true after the daemon died")
            assert at - killed <= stale + 1.5, at - killed

            daemon = Daemon(cfg)
            await _until(lambda: healthy() is True, 60, "Healthy did not come back after the daemon restarted")
            n = len(changes.events)
            await _until(lambda: len(changes.events) > n, 10, "no verdict events after the daemon restarted")

    try:
        asyncio.run(scenario())
        assert bridge.stop() == 0, bridge.log()
    except BaseException:
        print(bridge.log())
        raise
    finally:
        bridge.stop()
        daemon.kill()


async def _disconnect_quietly(client: Client) -> None:
    try:
        await client.disconnect()
    except Exception:
        pass


def test_healthy_goes_false_at_once_while_a_verdict_backlog_is_written(tmp_path: Path, tiny_bundle: Path,
                                                                       synthetic_parts: Any) -> None:
    """A burst of 3,000 verdicts, faster than OPC UA writes them (eleven variables and an event
    each: about 1,000 a second here), then the line goes blind: Healthy must go false within a
    second, not after the backlog. In-process bridge, a real daemon-side Publisher (ZeroMQ), a
    real asyncua client."""
    import threading

    from inspectd.bridges.common import load_settings
    from inspectd.bridges.opcua import OpcuaBridge
    from inspectd.daemon.publish import Publisher
    from tests.daemon.test_client import make_verdict

    port = free_port()
    url = f"opc.tcp://127.0.0.1:{port}/inspectd/"
    cfg, endpoint = replay_config(tmp_path, tiny_bundle, synthetic_parts, {
        "opcua": {"endpoint": url, "namespace_uri": "urn:inspectd:test"}})
    pub = Publisher(endpoint, heartbeat_interval_s=0.1, sndhwm=100000)
    ok = {"state": "ok", "camera_connected": True, "engine_ready": True}
    pub.set_line_status("line1", ok)
    pub.start()
    bridge = OpcuaBridge(load_settings(cfg, "opcua"))
    stop = threading.Event()
    thread = threading.Thread(target=lambda: asyncio.run(bridge.serve(stop)), daemon=True)
    thread.start()

    async def scenario() -> None:
        wait_port(port, 30)
        async with Client(url, timeout=5) as client:
            idx = await client.get_namespace_index("urn:inspectd:test")
            changes = Changes()
            sub = await client.create_subscription(20, changes)
            await sub.subscribe_data_change([client.get_node(ua.NodeId(f"line1.{n}", idx)) for n in ("Healthy", "Seq")])

            def last(name: str) -> Any:
                vals = [v for _, n, v in changes.values if n == f"line1.{name}"]
                return vals[-1] if vals else None

            await _until(lambda: last("Healthy") is True, 20, "Healthy never became true")
            n_verdicts = 3000
            for i in range(n_verdicts):
                pub.publish_verdict(make_verdict(i + 1))
            await asyncio.sleep(0.3)
            blind = time.monotonic()
            pub.set_line_status("line1", {**ok, "state": "blind", "camera_connected": False})
            at = await _until(lambda: last("Healthy") is False, 30, "Healthy never went false")
            seq_then = last("Seq")
            assert at - blind < 1.0, f"Healthy went false {at - blind:.1f} s after the camera was lost"
            # a backlog really was being written meanwhile, and none of it is lost
            assert seq_then is not None and seq_then < n_verdicts - 1, seq_then
            await _until(lambda: last("Seq") == n_verdicts - 1, 30, "the backlog was not written to the end")
            assert bridge.dropped == 0

    try:
        asyncio.run(scenario())
    finally:
        stop.set()
        thread.join(10)
        pub.stop()


def test_a_status_change_is_never_dropped_when_the_verdict_queue_is_full(tmp_path: Path, tiny_bundle: Path,
                                                                        synthetic_parts: Any,
                                                                        monkeypatch: Any) -> None:
    """The server's loop is busy (here: held for a moment, as slow clients or event triggers do)
    while a burst of verdicts overfills the bridge's update queue (20 places instead of 10,000) and
    the camera is lost right after. Verdicts may be dropped (and counted); the status change must
    not be: it is sent only on change, so a dropped one would leave Healthy true for good.
    In-process bridge (to lower the queue), a real daemon-side Publisher (ZeroMQ), a real asyncua
    server and client."""
    import threading

    from inspectd.bridges import opcua as bridge_opcua
    from inspectd.bridges.common import load_settings
    from inspectd.daemon.publish import Publisher
    from tests.daemon.test_client import make_verdict

    monkeypatch.setattr(bridge_opcua, "QUEUE_SIZE", 20)
    port = free_port()
    url = f"opc.tcp://127.0.0.1:{port}/inspectd/"
    # stale_after_s long: a heartbeat late on a loaded box would be another status change after
    # the lost one and hide the loss
    cfg, endpoint = replay_config(tmp_path, tiny_bundle, synthetic_parts, {
        "stale_after_s": 10.0, "opcua": {"endpoint": url, "namespace_uri": "urn:inspectd:test"}})
    pub = Publisher(endpoint, heartbeat_interval_s=0.1, sndhwm=100000)
    ok = {"state": "ok", "camera_connected": True, "engine_ready": True}
    pub.set_line_status("line1", ok)
    pub.start()
    bridge = bridge_opcua.OpcuaBridge(load_settings(cfg, "opcua"))
    stop = threading.Event()
    thread = threading.Thread(target=lambda: asyncio.run(bridge.serve(stop)), daemon=True)
    thread.start()

    async def scenario() -> None:
        wait_port(port, 30)
        # the server's loop is held for 3 s below: a client whose watchdog gives up after 1 s would
        # drop its subscription (and so never see the change)
        async with Client(url, timeout=10, watchdog_intervall=10.0) as client:
            idx = await client.get_namespace_index("urn:inspectd:test")
            changes = Changes()
            sub = await client.create_subscription(20, changes)
            await sub.subscribe_data_change([client.get_node(ua.NodeId(f"line1.{n}", idx))
                                             for n in ("Healthy", "Status")])

            def last(name: str) -> Any:
                vals = [v for _, n, v in changes.values if n == f"line1.{name}"]
                return vals[-1] if vals else None

            await _until(lambda: last("Healthy") is True, 20, "Healthy never became true")
            bridge._loop.call_soon_threadsafe(time.sleep, 3.0)     # the server's loop is busy
            for i in range(200):
                pub.publish_verdict(make_verdict(i + 1))
            time.sleep(0.5)           # the verdicts reach the bridge first, then the change
            pub.set_line_status("line1", {**ok, "state": "blind", "camera_connected": False}, now=True)
            await _until(lambda: last("Healthy") is False, 10, "Healthy stayed true: the status change was lost")
            assert last("Status") == "blind"
            await _until(lambda: bridge.dropped > 0, 5, "the burst did not overfill the queue (test precondition)")

    try:
        asyncio.run(scenario())
    finally:
        stop.set()
        thread.join(10)
        pub.stop()
