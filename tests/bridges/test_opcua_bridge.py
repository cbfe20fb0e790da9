"""`inspectd bridge opcua` as a child process with Basic256Sha256 SignAndEncrypt and certificates
made here: a real asyncua client (trusted certificate as its user identity) sees the daemon's
verdicts (same frame id and seq) as variables and events; anonymous and unencrypted clients are
refused; Healthy goes false when the daemon is killed and true again when it comes back. A value
the daemon did not send is a Bad StatusCode, not a sentinel; asyncua's INFO lines stay out of the
bridge's log unless it runs at DEBUG."""

from __future__ import annotations

import asyncio
import sys
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
                                                                       synthetic_parts: Any,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst of verdicts, faster than OPC UA writes them (eleven variables and an event each),
    then the line goes blind: Healthy must go false early in the backlog's writing, not after it.
    In-process bridge, a real daemon-side Publisher (ZeroMQ), a real asyncua client. Each verdict's
    write is made 0.5 ms slower (the loop blocked, as by a write to a larger address space): on a fast
    machine the subscriber thread, sharing the GIL with the writing loop, read the burst off ZeroMQ
    hardly faster than it was written, so there was no backlog left to jump."""
    import threading

    from inspectd.bridges.common import load_settings
    from inspectd.bridges.opcua import OpcuaBridge
    from inspectd.daemon.publish import Publisher
    from tests.bridges.conftest import SubscriberTap
    from tests.daemon.test_client import make_verdict

    port = free_port()
    url = f"opc.tcp://127.0.0.1:{port}/inspectd/"
    cfg, endpoint = replay_config(tmp_path, tiny_bundle, synthetic_parts, {
        "opcua": {"endpoint": url, "namespace_uri": "urn:inspectd:test"}})
    pub = Publisher(endpoint, heartbeat_interval_s=0.1, sndhwm=100000)
    ok = {"state": "ok", "camera_connected": True, "engine_ready": True}
    pub.set_line_status("line1", ok)
    pub.start()
    write = OpcuaBridge._apply

    async def slower_write(self: OpcuaBridge, item: tuple) -> None:
        if item[0] == "verdict":
            time.sleep(0.0005)  # blocks the loop like a write, without suspending it; other threads run
        await write(self, item)

    monkeypatch.setattr(OpcuaBridge, "_apply", slower_write)
    bridge = OpcuaBridge(load_settings(cfg, "opcua"))
    tap = SubscriberTap(bridge.subscriber)
    stop = threading.Event()
    thread = threading.Thread(target=lambda: asyncio.run(bridge.serve(stop)), daemon=True)
    thread.start()

    async def scenario() -> None:
        wait_port(port, 30)
        # While the bridge writes the backlog its loop answers requests late (seconds on a loaded box):
        # a client whose watchdog gives up after 1 s would drop its subscription and see no more values.
        async with Client(url, timeout=10, watchdog_intervall=10.0) as client:
            idx = await client.get_namespace_index("urn:inspectd:test")
            changes = Changes()
            sub = await client.create_subscription(20, changes)
            await sub.subscribe_data_change([client.get_node(ua.NodeId(f"line1.{n}", idx)) for n in ("Healthy", "Seq")])

            def last(name: str) -> Any:
                vals = [v for _, n, v in changes.values if n == f"line1.{name}"]
                return vals[-1] if vals else None

            await _until(lambda: last("Healthy") is True, 20, "Healthy never became true")
            n_verdicts = 3000   # a second or more of writing (under QUEUE_SIZE: none may be dropped)
            for i in range(n_verdicts):
                pub.publish_verdict(make_verdict(i + 1))
            # The bridge has taken every verdict off ZeroMQ (with the slower writes, reading is well
            # ahead): the blind heartbeat is not behind them in the ZeroMQ stream, only behind the writes.
            await asyncio.to_thread(tap.wait, lambda t: t.verdicts >= n_verdicts, 30, "the verdicts reached the bridge")
            blind = time.monotonic()
            pub.set_line_status("line1", {**ok, "state": "blind", "camera_connected": False})
            at = await _until(lambda: last("Healthy") is False, 30, "Healthy never went false")
            seq_then = last("Seq")
            # a backlog really was being written meanwhile, and none of it is lost
            assert seq_then is not None and seq_then < n_verdicts - 1, seq_then
            end = await _until(lambda: last("Seq") == n_verdicts - 1, 90, "the backlog was not written to the end")
            assert bridge.dropped == 0
            # "At once": early in the backlog's writing, not after it. Relative, so that a loaded CI
            # machine (everything slower) does not fail it: 1 s on a quiet machine was 1.7-3.4 s under load.
            assert at - blind < 0.5 * (end - blind), (f"Healthy went false {at - blind:.1f} s after the camera "
                                                      f"was lost, the backlog ended {end - blind:.1f} s after")

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
    from tests.bridges.conftest import SubscriberTap
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
    tap = SubscriberTap(bridge.subscriber)
    release = threading.Event()   # holds the server's loop below until set
    stop = threading.Event()
    thread = threading.Thread(target=lambda: asyncio.run(bridge.serve(stop)), daemon=True)
    thread.start()

    async def scenario() -> None:
        wait_port(port, 30)
        # the server's loop is held for a moment below (up to seconds on a loaded box): a client whose
        # watchdog gives up after 1 s would drop its subscription (and so never see the change)
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
            # The server's loop is busy until both the burst and the change have been handed to it.
            bridge._loop.call_soon_threadsafe(release.wait, 30)
            try:
                for i in range(200):
                    pub.publish_verdict(make_verdict(i + 1))
                # the verdicts reach the bridge first, then the change
                tap.wait(lambda t: t.verdicts >= 200, 10, "the burst reaching the bridge")
                pub.set_line_status("line1", {**ok, "state": "blind", "camera_connected": False}, now=True)
                tap.wait(lambda t: any(st.state == "blind" for st in t.statuses), 10, "the change reaching the bridge")
            finally:
                release.set()
            await _until(lambda: last("Healthy") is False, 10, "Healthy stayed true: the status change was lost")
            assert last("Status") == "blind"
            await _until(lambda: bridge.dropped > 0, 5, "the burst did not overfill the queue (test precondition)")

    try:
        asyncio.run(scenario())
    finally:
        release.set()
        stop.set()
        thread.join(10)
        pub.stop()


# ---- missing values and asyncua's log volume ----------------------------------------------------------

def _bare_config(tmp_path: Path, opcua: dict[str, Any], stale_after_s: float | None = None) -> tuple[Path, str]:
    """A config for a bridge alone (no daemon runs from it: its bundle need not exist)."""
    import yaml

    from tests.daemon.test_run import _write_config

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    cfg = _write_config(tmp_path / "lines.yaml", [{
        "id": "line1", "source": {"type": "replay", "path": str(tmp_path)}, "bundle": str(tmp_path / "bundle"),
        "threshold": 3.0}], endpoint)
    raw = yaml.safe_load(cfg.read_text())
    raw["bridges"] = {"opcua": opcua, **({"stale_after_s": stale_after_s} if stale_after_s else {})}
    cfg.write_text(yaml.safe_dump(raw))
    return cfg, endpoint


class _InProcessBridge:
    """OpcuaBridge.serve in a thread (its own loop), as `inspectd bridge opcua` runs it."""

    def __init__(self, cfg: Path) -> None:
        import threading

        from inspectd.bridges.common import load_settings
        from inspectd.bridges.opcua import OpcuaBridge

        self.bridge = OpcuaBridge(load_settings(cfg, "opcua"))
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self.bridge.serve(self.stop_event)), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(10)


async def _data_value(client: Client, idx: int, name: str) -> ua.DataValue:
    return await client.get_node(ua.NodeId(f"line1.{name}", idx)).read_data_value(raise_on_bad_status=False)


async def _value(client: Client, idx: int, name: str) -> Any:
    """The variable's value when Good, else its StatusCode's value."""
    dv = await _data_value(client, idx, name)
    return dv.Value.Value if dv.StatusCode.is_good() else dv.StatusCode.value


async def _wait_value(client: Client, idx: int, name: str, want: Any, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while (got := await _value(client, idx, name)) != want:
        assert time.monotonic() < end, f"line1.{name} is {got!r}, not {want!r}, after {timeout_s} s"
        await asyncio.sleep(0.05)


def test_a_missing_camera_timestamp_or_score_is_bad_no_data_not_a_sentinel(tmp_path: Path) -> None:
    """A verdict without a camera timestamp (header camera_timestamp null: replay sources, cameras
    that keep none) and without a score (a fail-safe verdict) must not show up as -1 / NaN, which a
    PLC takes for readings: the variable's StatusCode is BadNoData, its DataType stays Int64 /
    Double, and the next verdict that has them is written Good. The event carries null fields.
    In-process bridge, a real daemon-side Publisher (ZeroMQ), a real asyncua client."""
    from inspectd.daemon.publish import Publisher
    from tests.daemon.test_client import make_verdict

    port = free_port()
    url = f"opc.tcp://127.0.0.1:{port}/inspectd/"
    cfg, endpoint = _bare_config(tmp_path, {"endpoint": url, "namespace_uri": "urn:inspectd:test"})
    pub = Publisher(endpoint, heartbeat_interval_s=0.1)
    pub.set_line_status("line1", {"state": "ok", "camera_connected": True, "engine_ready": True})
    pub.start()
    bridge = _InProcessBridge(cfg)

    async def scenario() -> None:
        wait_port(port, 30)
        async with Client(url, timeout=5) as client:
            idx = await client.get_namespace_index("urn:inspectd:test")
            changes = Changes()
            sub = await client.create_subscription(20, changes)
            etype = await client.nodes.base_event_type.get_child([f"{idx}:InspectdVerdictEventType"])
            await sub.subscribe_events(client.get_node(ua.NodeId("line1", idx)), etype)
            # Healthy: the bridge hears the publisher, so it gets what is published from now on
            await _wait_value(client, idx, "Healthy", True, 20)

            def event_of(frame_id: int) -> Any:
                return next((e for e in changes.events if e.FrameId == frame_id), None)

            # No camera timestamp (meta without one), no score (fail-safe verdict).
            pub.publish_verdict(make_verdict(1, verdict="NG", score=None, raw_score=None, deadline_missed=True))
            await _until(lambda: event_of(1) is not None, 10, "no event for the verdict without a camera timestamp")
            for name, dtype in (("CameraTimestamp", ua.ObjectIds.Int64), ("Score", ua.ObjectIds.Double)):
                dv = await _data_value(client, idx, name)
                assert dv.StatusCode.value == ua.StatusCodes.BadNoData, (name, dv)
                assert dv.Value is None or dv.Value.Value is None, (name, dv)
                dt = await client.get_node(ua.NodeId(f"line1.{name}", idx)).read_data_type()
                assert dt == ua.NodeId(dtype), (name, dt)
            for name, want in (("FrameId", 1), ("Threshold", 4.0), ("LastVerdict", "NG")):
                dv = await _data_value(client, idx, name)
                assert dv.StatusCode.is_good() and dv.Value.Value == want, (name, dv)
            ev = event_of(1)
            assert ev.CameraTimestamp is None and ev.Score is None, ev

            # Both present: Good, typed as before.
            pub.publish_verdict(make_verdict(2, score=0.25, meta={"camera_timestamp": 123456789012}))
            await _until(lambda: event_of(2) is not None, 10, "no event for the verdict with a camera timestamp")
            dv = await _data_value(client, idx, "CameraTimestamp")
            assert dv.StatusCode.is_good() and dv.Value.VariantType == ua.VariantType.Int64, dv
            assert dv.Value.Value == 123456789012
            dv = await _data_value(client, idx, "Score")
            assert dv.StatusCode.is_good() and dv.Value.Value == 0.25, dv
            assert event_of(2).CameraTimestamp == 123456789012

    try:
        asyncio.run(scenario())
    finally:
        bridge.stop()
        pub.stop()


def test_variables_say_waiting_for_initial_data_then_no_data_while_the_daemon_is_unheard(tmp_path: Path) -> None:
    """Before the first verdict the verdict variables hold no reading (BadWaitingForInitialData, not
    -1 / NaN / ""), nor does CameraConnected before the first status; while the daemon is not heard
    (heartbeats lost) CameraConnected and Healthy are a plain, Good False (a PLC that keeps the last
    good value on a Bad status must not read True from a daemon that is gone). In-process bridge,
    a real Publisher, a real asyncua client."""
    from inspectd.daemon.publish import Publisher

    port = free_port()
    url = f"opc.tcp://127.0.0.1:{port}/inspectd/"
    cfg, endpoint = _bare_config(tmp_path, {"endpoint": url, "namespace_uri": "urn:inspectd:test"},
                                 stale_after_s=0.5)
    bridge = _InProcessBridge(cfg)
    pub = Publisher(endpoint, heartbeat_interval_s=0.1)

    async def scenario() -> None:
        wait_port(port, 30)
        async with Client(url, timeout=5) as client:
            idx = await client.get_namespace_index("urn:inspectd:test")
            for name in ("LastVerdict", "Score", "Threshold", "FrameId", "Seq", "AcquiredTime", "CameraTimestamp",
                         "Chunks", "CameraConnected"):
                dv = await _data_value(client, idx, name)
                assert dv.StatusCode.value == ua.StatusCodes.BadWaitingForInitialData, (name, dv)
            for name, want in (("Healthy", False), ("Status", "unknown"), ("FramesOK", 0), ("FramesNG", 0)):
                dv = await _data_value(client, idx, name)
                assert dv.StatusCode.is_good() and dv.Value.Value == want, (name, dv)

            pub.set_line_status("line1", {"state": "ok", "camera_connected": True, "engine_ready": True})
            pub.start()
            await _wait_value(client, idx, "Healthy", True, 20)
            assert await _value(client, idx, "CameraConnected") is True
            pub.stop()     # the daemon is gone: heartbeats stop
            await _wait_value(client, idx, "Status", "offline", 10)
            for name in ("CameraConnected", "Healthy"):
                dv = await _data_value(client, idx, name)
                assert dv.StatusCode.is_good() and dv.Value.Value is False, (name, dv)

    try:
        asyncio.run(scenario())
    finally:
        bridge.stop()
        pub.stop()


def _asyncua_info_lines(lines: list[str]) -> list[str]:
    """Records of asyncua* loggers at INFO in `inspectd`'s stderr format: `date time LEVEL name: message`."""
    out = []
    for line in lines:
        parts = line.split(" ", 4)
        if len(parts) == 5 and parts[2] == "INFO" and parts[3].startswith("asyncua"):
            out.append(line)
    return out


def test_asyncua_info_lines_stay_out_of_the_journal_unless_debug(tmp_path: Path) -> None:
    """`inspectd bridge opcua` at the default INFO level: asyncua's own INFO lines (about 1,100 at
    start: address space population) are not logged, the bridge's own INFO line is; with
    `--log-level DEBUG` asyncua's lines are there again. Two real bridge processes, stderr read."""
    from tests.daemon.test_run import _MODULE

    children = {}
    for level in ("INFO", "DEBUG"):
        port = free_port()
        folder = tmp_path / level
        folder.mkdir()
        cfg, _ = _bare_config(folder, {"endpoint": f"opc.tcp://127.0.0.1:{port}/inspectd/",
                                       "namespace_uri": "urn:inspectd:test"})
        children[level] = Child([sys.executable, "-m", _MODULE, "--log-level", level, "bridge", "opcua",
                                 "--config", str(cfg)])
    def started(child: Child) -> bool:   # the bridge's line comes after the server's start
        return any("inspectd.bridges.opcua: OPC UA bridge:" in line for line in child.lines)

    try:
        # DEBUG first: asyncua's INFO lines come early in its server's start; once they are there the
        # DEBUG bridge has shown what it must, and is killed so that the INFO bridge has the CPUs.
        for level, done in (("DEBUG", lambda c: _asyncua_info_lines(c.lines) or started(c)), ("INFO", started)):
            child, end = children[level], time.monotonic() + 60
            while not done(child):
                assert child.proc.poll() is None and time.monotonic() < end, child.log()
                time.sleep(0.05)
            if level == "DEBUG":
                child.proc.kill()
        assert children["INFO"].stop() == 0, children["INFO"].log()   # stop(): all its lines are read
        quiet = _asyncua_info_lines(children["INFO"].lines)
        assert not quiet, f"{len(quiet)} asyncua INFO line(s) at --log-level INFO, e.g. {quiet[:3]}"
        assert any(" INFO inspectd.bridges.opcua: OPC UA bridge:" in line for line in children["INFO"].lines)
        assert _asyncua_info_lines(children["DEBUG"].lines), "--log-level DEBUG hid asyncua's INFO lines"
    finally:
        for child in children.values():
            child.stop()
