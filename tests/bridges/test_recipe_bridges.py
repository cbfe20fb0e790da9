"""Recipe switches asked on the PLC side: MQTT `inspectd/<line>/recipe/set` -> `.../recipe/result` and
the OPC UA method `SetRecipe(name)`, both through the bridges (real child processes) to the real
daemon's control socket; the audit log names the path each came by."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import yaml

from tests.bridges.conftest import BRIDGE, Child, free_port, replay_config, wait_port
from tests.bridges.test_mqtt_bridge import Watcher as _JsonWatcher
from tests.daemon.test_run import Daemon

import paho.mqtt.client as mqtt


class Watcher(_JsonWatcher):
    """Status and recipe results only (recipe/set carries plain text, not JSON)."""

    def __init__(self, port: int) -> None:  # noqa: D107 - same client as the base, other topics
        import queue
        self.q = queue.Queue()
        topics = [("inspectd/line1/status", 1), ("inspectd/line1/recipe/result", 1)]
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=f"rwatch-{port}")
        self.client.on_connect = lambda c, u, f, rc, p=None: c.subscribe(topics)
        self.client.on_message = lambda c, u, m: self.q.put((time.monotonic(), m.topic, json.loads(m.payload),
                                                             bool(m.retain)))
        self.client.connect_async("127.0.0.1", port, keepalive=5)
        self.client.loop_start()


def test_mqtt_and_opcua_forward_recipe_requests(tmp_path: Path, tiny_bundle: Path, tiny_method_bundles: Any,
                                                synthetic_parts: Any, mosquitto: Any) -> None:
    opc_port = free_port()
    cfg, _ = replay_config(tmp_path, tiny_bundle, synthetic_parts, {
        "mqtt": {"host": "127.0.0.1", "port": mosquitto.port, "client_id": "rb"},
        "opcua": {"endpoint": f"opc.tcp://127.0.0.1:{opc_port}/inspectd/"}})
    raw = yaml.safe_load(cfg.read_text())
    raw["state_dir"] = str(tmp_path / "state")
    raw["lines"][0]["recipes"] = [{"name": "B", "bundle": str(tiny_method_bundles("cutpaste-ae")), "threshold": 7.0,
                                   "preload": True}]
    cfg.write_text(yaml.safe_dump(raw))
    daemon = Daemon(cfg)
    mq = Child(BRIDGE + ["mqtt", "--config", str(cfg)])
    op = Child(BRIDGE + ["opcua", "--config", str(cfg)])
    watcher = Watcher(mosquitto.port)
    try:
        daemon.wait_log(r"recipe B ready in standby")
        watcher.wait("inspectd/line1/status", lambda p: p.get("status") == "ok", 30)
        pub = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="plc")
        pub.connect("127.0.0.1", mosquitto.port)
        pub.loop_start()
        pub.publish("inspectd/line1/recipe/set", "nope", qos=1).wait_for_publish(5)
        _, bad = watcher.wait("inspectd/line1/recipe/result", lambda p: p.get("requested") == "nope", 20)
        assert bad["ok"] is False and "unknown recipe" in bad["error"]
        pub.publish("inspectd/line1/recipe/set", json.dumps({"name": "B", "requester": "plc-7"}),
                    qos=1).wait_for_publish(5)
        _, good = watcher.wait("inspectd/line1/recipe/result", lambda p: p.get("requested") == "B", 20)
        assert good["ok"] is True and good["active"]["recipe"] == "B", good
        pub.disconnect()
        pub.loop_stop()

        async def call() -> dict:
            from asyncua import Client, ua
            wait_port(opc_port, 30)
            client = Client(f"opc.tcp://127.0.0.1:{opc_port}/inspectd/", timeout=10)
            await client.connect()
            try:
                idx = await client.get_namespace_index("urn:inspectd")
                folder = client.get_node(ua.NodeId("line1", idx))
                out = await folder.call_method(ua.NodeId("line1.SetRecipe", idx), "default")
                return json.loads(out)
            finally:
                await client.disconnect()

        answer = asyncio.run(call())
        assert answer["ok"] is True and answer["active"]["recipe"] == "default", answer
    finally:
        watcher.close()
        mq.stop()
        op.stop()
        daemon.kill()
    records = [json.loads(x) for x in (tmp_path / "state" / "audit.jsonl").read_text().splitlines()]
    assert [(r["new"]["recipe"], r["who"]["via"]) for r in records] == [("B", "socket/mqtt"),
                                                                       ("default", "socket/opcua")]
    assert records[0]["who"]["requester"] == "plc-7"


def test_a_retained_recipe_request_is_not_applied_again_at_every_reconnect(tmp_path: Path, tiny_bundle: Path,
                                                                           synthetic_parts: Any,
                                                                           mosquitto: Any) -> None:
    """A PLC publishes its recipe request retained (common practice for 'state' topics). Applied
    once, live; later the line is switched back by the operator. A bridge restart (or a broker
    restart, a network blip) must not replay the old retained request and switch the line again."""
    from inspectd.daemon.control import request, socket_path

    cfg, _ = replay_config(tmp_path, tiny_bundle, synthetic_parts, {
        "mqtt": {"host": "127.0.0.1", "port": mosquitto.port, "client_id": "rr"}})
    raw = yaml.safe_load(cfg.read_text())
    raw["state_dir"] = str(tmp_path / "state")
    raw["lines"][0]["recipes"] = [{"name": "B", "bundle": str(tiny_bundle), "threshold": 7.0}]
    cfg.write_text(yaml.safe_dump(raw))
    sock = socket_path(tmp_path / "state")
    daemon = Daemon(cfg)
    mq = Child(BRIDGE + ["mqtt", "--config", str(cfg)])
    watcher = Watcher(mosquitto.port)
    pub = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="plc-retained")
    try:
        daemon.wait_log(r"ready: line1")
        watcher.wait("inspectd/line1/status", lambda p: p.get("status") == "ok", 30)
        pub.connect("127.0.0.1", mosquitto.port)
        pub.loop_start()
        pub.publish("inspectd/line1/recipe/set", "B", qos=1, retain=True).wait_for_publish(5)
        _, done = watcher.wait("inspectd/line1/recipe/result", lambda p: p.get("requested") == "B", 20)
        assert done["ok"] is True
        assert request(sock, {"op": "recipe", "line": "line1", "name": "default"})["ok"]
        mq.stop()
        mq = Child(BRIDGE + ["mqtt", "--config", str(cfg)])
        # The broker replays the retained request as the new bridge subscribes. Wait for the bridge's
        # decision on it: its warning that it ignores it, or (were it forwarded) its line with the
        # daemon's answer, which comes once the daemon has switched.
        end = time.monotonic() + 30
        while not any("recipe request" in line for line in mq.lines):
            assert time.monotonic() < end and mq.proc.poll() is None, f"the replayed request was not seen:\n{mq.log()}"
            time.sleep(0.1)
        assert request(sock, {"op": "list", "line": "line1"})["active"]["recipe"] == "default", mq.log()
    finally:
        pub.publish("inspectd/line1/recipe/set", b"", qos=1, retain=True)  # clear the retained message
        pub.loop_stop()
        pub.disconnect()
        watcher.close()
        mq.stop()
        daemon.kill()


def _feed_fifo(fifo: Path, text: str, timeout_s: float = 10.0) -> None:
    """Write `text` to the FIFO once a reader has it open (the daemon opening the bundle), then put
    the real file in its place for any later read."""
    import errno
    import os

    end = time.monotonic() + timeout_s
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as exc:
            if exc.errno != errno.ENXIO or time.monotonic() > end:
                raise
            time.sleep(0.05)
    try:
        os.set_blocking(fd, True)
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    real = fifo.with_name(fifo.name + ".real")
    real.write_text(text)
    os.replace(real, fifo)


def test_opcua_set_recipe_that_outlasts_the_callers_wait_fails_and_changes_nothing(
        tmp_path: Path, tiny_bundle: Path, synthetic_parts: Any) -> None:
    """A PLC calls SetRecipe over OPC UA and waits seconds (asyncua's client: 4 s by default) for the
    answer. The recipe is not preloaded and its bundle sits on a share that answers late (its
    manifest a FIFO, written only later). The call must come back in time with a clear failure, and
    the daemon must not switch afterwards: the PLC was told 'failed', so the line stays as it was.
    Real daemon child, real `inspectd bridge opcua` child, real asyncua client."""
    import os
    import shutil

    from asyncua import Client, ua

    from inspectd.daemon.control import request, socket_path

    slow = tmp_path / "slow-bundle"
    shutil.copytree(tiny_bundle, slow)
    opc_port = free_port()
    cfg, _ = replay_config(tmp_path, tiny_bundle, synthetic_parts, {
        "opcua": {"endpoint": f"opc.tcp://127.0.0.1:{opc_port}/inspectd/"}})
    raw = yaml.safe_load(cfg.read_text())
    raw["state_dir"] = str(tmp_path / "state")
    raw["lines"][0]["recipes"] = [{"name": "B", "bundle": str(slow), "threshold": 7.0}]
    cfg.write_text(yaml.safe_dump(raw))
    sock = socket_path(tmp_path / "state")
    daemon = Daemon(cfg)
    op = Child(BRIDGE + ["opcua", "--config", str(cfg)])
    manifest = slow / "manifest.json"
    text = manifest.read_text()

    async def call() -> tuple[dict, float]:
        wait_port(opc_port, 30)
        client = Client(f"opc.tcp://127.0.0.1:{opc_port}/inspectd/")    # default request timeout (4 s)
        await client.connect()
        try:
            idx = await client.get_namespace_index("urn:inspectd")
            folder = client.get_node(ua.NodeId("line1", idx))
            t0 = time.monotonic()
            out = await folder.call_method(ua.NodeId("line1.SetRecipe", idx), "B")
            return json.loads(out), time.monotonic() - t0
        finally:
            await client.disconnect()

    try:
        daemon.wait_log(r"ready: line1")
        manifest.unlink()
        os.mkfifo(manifest)          # the share stops answering after the daemon started
        try:
            answer, took = asyncio.run(call())
        finally:
            _feed_fifo(manifest, text)   # the share answers, too late
        assert answer["ok"] is False and answer["requested"] == "B", answer
        assert "nothing changed" in answer["error"], answer
        assert took < 4.0, took
        # The daemon finishes the open (an engine ready to switch to) after the caller's wait ...
        daemon.wait_log(r"recipe B engine \S+ warmed up")
        # ... and then must not switch. A request of our own waits for the line's recipe lock, which
        # the late switch holds until it has decided; an unknown name then changes nothing itself.
        barrier = request(sock, {"op": "recipe", "line": "line1", "name": "no-such-recipe"})
        assert barrier["ok"] is False and "unknown recipe" in barrier["error"], barrier
        assert request(sock, {"op": "list", "line": "line1"})["active"]["recipe"] == "default", op.log()
    finally:
        op.stop()
        daemon.kill()
    audit = tmp_path / "state" / "audit.jsonl"
    assert not audit.exists() or '"what":"recipe"' not in audit.read_text()


def test_an_empty_recipe_set_clears_a_retained_request_and_is_not_a_request(tmp_path: Path, mosquitto: Any,
                                                                             caplog: Any) -> None:
    """A PLC clears its retained request the standard MQTT way: an empty payload, retained, on
    recipe/set. The bridge, subscribed, gets it live: not a request, so no answer on recipe/result
    and nothing above DEBUG in the log; a request published after it is answered as usual (so the
    silence is not a bridge that answers nothing). Real Mosquitto, real paho PLC client, real bridge
    in-process (no daemon behind it: the request after it is answered 'not reachable')."""
    import logging
    import queue
    import threading

    from inspectd.bridges import mqtt as bridge_mqtt
    from inspectd.bridges.common import load_settings
    from tests.bridges.test_mqtt_bridge import _wait_status, bare_config

    caplog.set_level(logging.DEBUG, logger="inspectd.bridges.mqtt")
    bridge = bridge_mqtt.MqttBridge(load_settings(bare_config(tmp_path, {"host": "127.0.0.1", "port": mosquitto.port,
                                                                          "client_id": "clear"}), "mqtt"))
    results: queue.Queue[dict] = queue.Queue()
    watch = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="clear-watch")
    watch.on_message = lambda c, u, m: results.put(json.loads(m.payload))
    subscribed = threading.Event()
    watch.on_subscribe = lambda c, u, mid, rcs, p=None: subscribed.set()
    plc = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="clear-plc")
    bridge.start()
    try:
        _wait_status(mosquitto.port, lambda p: True, 10)   # published after the bridge subscribed to recipe/set
        watch.connect("127.0.0.1", mosquitto.port)
        watch.loop_start()
        watch.subscribe("inspectd/line1/recipe/result", qos=1)
        assert subscribed.wait(5), "no SUBACK for recipe/result"
        plc.connect("127.0.0.1", mosquitto.port)
        plc.loop_start()
        plc.publish("inspectd/line1/recipe/set", b"", qos=1, retain=True).wait_for_publish(5)
        plc.publish("inspectd/line1/recipe/set", "nope", qos=1).wait_for_publish(5)
        answers = [results.get(timeout=10)]
        time.sleep(0.5)               # an answer to the empty payload, if any, has landed by now
        while not results.empty():
            answers.append(results.get())
        assert [a.get("requested") for a in answers] == ["nope"], answers
        said = [r.getMessage() for r in caplog.records if r.name == "inspectd.bridges.mqtt"
                and r.levelno > logging.DEBUG and "recipe" in r.getMessage()]
        assert len(said) == 1 and "'nope'" in said[0], said
    finally:
        plc.disconnect()
        plc.loop_stop()
        watch.disconnect()
        watch.loop_stop()
        bridge.stop()
