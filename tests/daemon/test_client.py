"""VerdictSubscriber and `inspectd watch` against the real Publisher (or, to craft exact sequence
numbers, a plain ZeroMQ PUB socket) over ipc sockets in tmp_path."""

from __future__ import annotations

import argparse
import io
import json
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from inspectd.client import LineStatus, Message, VerdictSubscriber, line_status_from_heartbeat
from inspectd.daemon.config import ZmqConfig
from inspectd.daemon.frame import Verdict
from inspectd.daemon.publish import Publisher
from inspectd.daemon.watch import format_verdict, register_watch, run_watch
from inspectd.errors import ConfigError, InspectdError


def make_verdict(frame_id: int, line: str = "line1", verdict: str = "OK", **kw) -> Verdict:
    fields = dict(line=line, frame_id=frame_id, acquired_ns=time.time_ns(), verdict=verdict, score=0.5,
                  raw_score=-1.0, threshold=4.0, latency_ms=9.0, deadline_missed=False,
                  backend="onnxruntime-cpu", bundle_id="b1")
    fields.update(kw)
    return Verdict(**fields)


class Events:
    """Thread-safe record of callbacks, with a wait."""

    def __init__(self):
        self.items: list[tuple] = []
        self.cond = threading.Condition()

    def add(self, *item):
        with self.cond:
            self.items.append(item)
            self.cond.notify_all()

    def of(self, kind):
        with self.cond:
            return [i[1:] for i in self.items if i[0] == kind]

    def wait(self, kind, n=1, timeout=5.0):
        end = time.monotonic() + timeout
        with self.cond:
            while len([i for i in self.items if i[0] == kind]) < n:
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"waited {timeout} s for {n} {kind}; got {self.items[-5:]}")
                self.cond.wait(left)
        return self.of(kind)


def subscriber(endpoint, events: Events, **kw) -> VerdictSubscriber:
    return VerdictSubscriber(
        endpoint,
        on_verdict=lambda m: events.add("verdict", m),
        on_heatmap=lambda m: events.add("heatmap", m),
        on_heartbeat=lambda m: events.add("heartbeat", m),
        on_gap=lambda topic, expected, got: events.add("gap", topic, expected, got),
        on_heartbeat_lost=lambda line: events.add("lost", line),
        on_heartbeat_restored=lambda line: events.add("restored", line),
        on_restart=lambda line: events.add("restart", line),
        **kw)


class RawPub:
    """A plain PUB socket for crafted messages (exact seq numbers, garbage)."""

    def __init__(self, endpoint):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)

    def send(self, topic, header, payload=None):
        parts = [topic.encode(), json.dumps(header).encode()] + ([payload] if payload is not None else [])
        self.sock.send_multipart(parts)

    def heartbeat(self, line, seq, start_ns=None):
        h = {"schema": 1, "topic": f"heartbeat.{line}", "line": line, "seq": seq,
             "published_ns": time.time_ns(), "status": {}, "interval_s": 0.05}
        if start_ns is not None:
            h["daemon_start_ns"] = start_ns
        self.send(f"heartbeat.{line}", h)

    def verdict(self, line, seq, start_ns=None, **kw):
        h = {"schema": 1, "topic": f"verdict.{line}", "line": line, "seq": seq, "frame_id": seq,
             "acquired_ns": time.time_ns(), "published_ns": time.time_ns(), "verdict": "OK", "score": 0.1,
             "raw_score": 0.0, "threshold": 3.0, "latency_ms": 5.0, "deadline_missed": False,
             "backend": "x", "bundle_id": "b", "error": None}
        if start_ns is not None:
            h["daemon_start_ns"] = start_ns
        h.update(kw)
        self.send(f"verdict.{line}", h)

    def close(self):
        self.sock.close(0)
        self.ctx.term()


def sync_raw(pub: RawPub, sub: VerdictSubscriber, events: Events, line="line1"):
    """Heartbeat until the subscription reached the raw publisher (slow joiner), seq 0.. on heartbeats."""
    for seq in range(200):
        pub.heartbeat(line, seq)
        if sub.poll_once(0.05) is not None:
            return seq
    raise AssertionError("subscriber never connected")


@pytest.fixture
def endpoint(tmp_path):
    return f"ipc://{tmp_path}/pub.sock"


@pytest.fixture
def publisher(endpoint):
    pub = Publisher(endpoint, heartbeat_interval_s=0.05)
    pub.register_line("line1")
    pub.start()
    yield pub
    pub.stop(5)


def test_thread_mode_receives_verdicts_and_heatmaps(endpoint, publisher):
    events = Events()
    sub = subscriber(endpoint, events, topics=("verdict", "heatmap", "heartbeat"))
    sub.start()
    try:
        events.wait("heartbeat")
        hm = np.full((4, 6), 200, np.uint8)
        for i in range(5):
            publisher.publish_verdict(make_verdict(i, verdict="NG" if i == 3 else "OK", heatmap=hm))
        publisher.publish_heatmap(make_verdict(3, verdict="NG", heatmap=hm), encoding="raw")
        verdicts = events.wait("verdict", 5)
        (heat,) = events.wait("heatmap", 1)[0]
        with pytest.raises(InspectdError, match="own thread"):
            sub.poll_once(0.01)  # the socket belongs to the subscriber thread
    finally:
        assert sub.stop(5)
    msgs = [v[0] for v in verdicts]
    assert all(isinstance(m, Message) and m.kind == "verdict" and m.line == "line1" for m in msgs)
    assert [m.header["frame_id"] for m in msgs] == [0, 1, 2, 3, 4]
    assert [m.header["verdict"] for m in msgs] == ["OK", "OK", "OK", "NG", "OK"]
    assert heat.topic == "heatmap.line1" and heat.header["shape"] == [4, 6]
    np.testing.assert_array_equal(heat.heatmap_image(), hm)
    assert events.of("gap") == [] and events.of("restart") == []
    assert sub.received >= 6 and sub.malformed == 0


def test_gap_detected_with_exact_numbers(endpoint):
    pub = RawPub(endpoint)
    events = Events()
    sub = subscriber(endpoint, events, heartbeat_timeout_s=None)
    try:
        sync_raw(pub, sub, events)
        for seq in (0, 1, 4, 5, 9):
            pub.verdict("line1", seq)
        got = []
        while len(got) < 5:
            m = sub.poll_once(5)
            assert m is not None
            if m.kind == "verdict":
                got.append(m.header["seq"])
    finally:
        sub.close()
        pub.close()
    assert got == [0, 1, 4, 5, 9]
    assert events.of("gap") == [("verdict.line1", 2, 4), ("verdict.line1", 6, 9)]
    assert sub.lost == 5


def test_tail_loss_reported_by_heartbeat(endpoint):
    pub = RawPub(endpoint)
    events = Events()
    sub = subscriber(endpoint, events, heartbeat_timeout_s=None)
    try:
        hb = sync_raw(pub, sub, events) + 1
        pub.verdict("line1", 0)
        pub.verdict("line1", 1)
        # The daemon sent verdicts 2..4 too, but they never arrived; its next heartbeat says so.
        h = {"schema": 1, "topic": "heartbeat.line1", "line": "line1", "seq": hb, "published_ns": 1,
             "status": {}, "interval_s": 0.05, "last_seq": {"verdict.line1": 4}}
        pub.send("heartbeat.line1", h)
        pub.verdict("line1", 5)
        seen = []
        while len(seen) < 4:
            m = sub.poll_once(5)
            assert m is not None
            seen.append(m.kind)
    finally:
        sub.close()
        pub.close()
    assert seen == ["verdict", "verdict", "heartbeat", "verdict"]
    assert events.of("gap") == [("verdict.line1", 2, 5)]  # reported once, not again at verdict 5
    assert sub.lost == 3


def test_real_loss_at_high_water_mark_is_reported(endpoint):
    # A subscriber that does not read while the daemon publishes big heatmaps loses messages (PUB
    # drops at the HWM); the seq gap must tell it how many.
    pub = Publisher(endpoint, sndhwm=2, heartbeat_interval_s=0.05)
    pub.register_line("line1")
    pub.start()
    events = Events()
    sub = subscriber(endpoint, events, topics=("heatmap", "heartbeat"), rcvhwm=2, heartbeat_timeout_s=None)
    try:
        while sub.poll_once(1.0) is None:
            pass
        big = np.random.default_rng(0).integers(0, 255, (512, 512), dtype=np.uint8)
        n = 200
        for i in range(n):
            pub.publish_heatmap(make_verdict(i, heatmap=big), encoding="raw")
        end = time.monotonic() + 20
        while pub.sent.get("heatmap.line1", 0) < n and time.monotonic() < end:
            time.sleep(0.05)
        heatmaps = []
        quiet_until = time.monotonic() + 1.0   # heartbeats keep coming: stop after 1 s without heatmaps
        while time.monotonic() < quiet_until:
            m = sub.poll_once(0.2)
            if m is not None and m.kind == "heatmap":
                heatmaps.append(m.header["seq"])
                quiet_until = time.monotonic() + 1.0
    finally:
        sub.close()
        pub.stop(5)
    assert pub.sent["heatmap.line1"] == n
    assert 0 < len(heatmaps) < n
    gaps = [g for g in events.of("gap") if g[0] == "heatmap.line1"]
    assert gaps, "messages were dropped but no gap was reported"
    # Every message sent is accounted for: received or reported lost, including a loss at the end
    # of the burst (reported from the heartbeats' last_seq).
    lost = sum(got - expected for _, expected, got in gaps)
    assert len(heatmaps) + lost == n


def test_restart_detected_by_daemon_start(endpoint):
    events = Events()
    sub = subscriber(endpoint, events, heartbeat_timeout_s=None)
    sub.start()
    try:
        first = Publisher(endpoint, heartbeat_interval_s=0.05, daemon_start_ns=1000)
        first.register_line("line1")
        first.start()
        events.wait("heartbeat", 3)
        first.publish_verdict(make_verdict(1))
        events.wait("verdict", 1)
        first.stop(5)
        second = Publisher(endpoint, heartbeat_interval_s=0.05, daemon_start_ns=2000)
        second.register_line("line1")
        second.start()
        try:
            events.wait("restart", 1, timeout=10)
            n = len(events.of("heartbeat"))
            events.wait("heartbeat", n + 3)
        finally:
            second.stop(5)
    finally:
        sub.stop(5)
    assert events.of("restart") == [("line1",)]  # once per restart, not once per topic
    # Seq counting restarted at 0 for the new daemon: its low seqs are not a 'gap' from the old
    # daemon's numbers; only beats sent before the reconnect completed may show as lost from 0.
    assert all(g[0] == "heartbeat.line1" and g[1] == 0 for g in events.of("gap"))


def test_restart_detected_by_seq_going_back(endpoint):
    pub = RawPub(endpoint)
    events = Events()
    sub = subscriber(endpoint, events, heartbeat_timeout_s=None)
    try:
        sync_raw(pub, sub, events)
        for seq in (0, 1, 2, 0, 1):   # no daemon_start_ns in these headers: seq going back is the sign
            pub.verdict("line1", seq)
        n = 0
        while n < 5:
            m = sub.poll_once(5)
            assert m is not None
            n += m.kind == "verdict"
    finally:
        sub.close()
        pub.close()
    assert events.of("restart") == [("line1",)]
    assert events.of("gap") == []


def test_heartbeat_lost_and_restored(endpoint):
    events = Events()
    sub = subscriber(endpoint, events, heartbeat_timeout_s=0.5)
    sub.start()
    try:
        pub = Publisher(endpoint, heartbeat_interval_s=0.05)
        pub.register_line("line1")
        pub.start()
        events.wait("heartbeat", 3)
        assert not sub.heartbeat_lost("line1")
        pub.stop(5)
        stopped = time.monotonic()
        events.wait("lost", 1, timeout=5)
        # Generous bound: the loss is reported soon after the 0.5 s timeout, not at some later time.
        assert time.monotonic() - stopped < 0.5 + 2.0
        assert sub.heartbeat_lost("line1")
        pub = Publisher(endpoint, heartbeat_interval_s=0.05, daemon_start_ns=pub.daemon_start_ns)
        pub.register_line("line1")
        pub.start()
        try:
            events.wait("restored", 1, timeout=10)
        finally:
            pub.stop(5)
    finally:
        sub.stop(5)
    assert events.of("lost") == [("line1",)]  # once per loss, not on every poll
    assert events.of("restored") == [("line1",)]


def test_expected_line_never_heard_from_is_lost(endpoint):
    # A reject consumer started before (or without) the daemon must fail safe.
    events = Events()
    sub = subscriber(endpoint, events, lines=["line7"], heartbeat_timeout_s=0.3)
    try:
        end = time.monotonic() + 5
        while not events.of("lost") and time.monotonic() < end:
            sub.poll_once(0.1)
    finally:
        sub.close()
    assert events.of("lost") == [("line7",)]


def test_lines_filter_is_exact(endpoint):
    pub = RawPub(endpoint)
    events = Events()
    sub = subscriber(endpoint, events, lines=["line1"], heartbeat_timeout_s=None)
    try:
        sync_raw(pub, sub, events)
        pub.verdict("line10", 0)   # shares the prefix "verdict.line1"
        pub.verdict("line2", 0)
        pub.verdict("line1", 0)
        end = time.monotonic() + 5
        m = None
        while (m is None or m.kind != "verdict") and time.monotonic() < end:
            m = sub.poll_once(0.5)   # None also for a message filtered out
    finally:
        sub.close()
        pub.close()
    assert m.line == "line1"
    assert [v[0].line for v in events.of("verdict")] == ["line1"]


def test_malformed_messages_are_skipped(endpoint):
    pub = RawPub(endpoint)
    events = Events()
    sub = subscriber(endpoint, events, heartbeat_timeout_s=None)
    try:
        sync_raw(pub, sub, events)
        pub.sock.send_multipart([b"verdict.line1", b"{not json"])
        pub.sock.send_multipart([b"verdict.line1", b"[1,2]"])
        pub.sock.send_multipart([b"verdict.line1", json.dumps({"seq": "x"}).encode()])
        pub.sock.send_multipart([b"verdict.line1"])
        pub.sock.send_multipart([b"verdict.line1", b"\xff\xfe"])
        pub.sock.send_multipart([b"verdict.line1", b"[" * 200_000 + b"]" * 200_000])  # too deep to parse
        pub.verdict("line1", 0)
        end = time.monotonic() + 5
        m = None
        while (m is None or m.kind != "verdict") and time.monotonic() < end:
            m = sub.poll_once(0.5)   # malformed ones give None and are skipped
    finally:
        sub.close()
        pub.close()
    assert m.header["seq"] == 0
    assert sub.malformed == 6


def test_bad_arguments():
    with pytest.raises(ConfigError, match="endpoint"):
        VerdictSubscriber("127.0.0.1:5556")
    with pytest.raises(ConfigError, match="topics"):
        VerdictSubscriber("tcp://127.0.0.1:5556", topics=("verdicts",))
    with pytest.raises(ConfigError, match="heartbeat timeout"):
        VerdictSubscriber("tcp://127.0.0.1:5556", heartbeat_timeout_s=0)
    sub = VerdictSubscriber("tcp://no-such-host.invalid:x")
    with pytest.raises(InspectdError, match="cannot connect"):
        sub.poll_once(0)


def test_watch_prints_verdicts_gaps_and_losses(endpoint):
    out = io.StringIO()
    pub = RawPub(endpoint)
    stop = threading.Event()

    def feed():
        seq = 0
        # Heartbeats until the watcher is surely subscribed, then verdicts, then silence.
        for _ in range(20):
            pub.heartbeat("line1", seq)
            seq += 1
            time.sleep(0.05)
        pub.verdict("line1", 0, frame_id=41, verdict="OK", score=0.25, latency_ms=8.0)
        pub.verdict("line1", 1, frame_id=42, verdict="NG", score=9.5, latency_ms=12.5)
        pub.verdict("line1", 5, frame_id=46, verdict="SKIP", score=None, deadline_missed=True,
                     error="deadline")
        stop.wait(10)

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        shown = run_watch(endpoint, line="line1", stream=out, duration=3.0, heartbeat_timeout_s=1.0)
    finally:
        stop.set()
        feeder.join(10)
        pub.close()
    text = out.getvalue()
    lines = text.splitlines()
    assert shown == 3
    verdict_lines = [ln for ln in lines if " frame " in ln]
    assert len(verdict_lines) == 3
    assert "line1" in verdict_lines[1] and "42" in verdict_lines[1] and " NG " in verdict_lines[1]
    assert "9.500" in verdict_lines[1] and "12.5 ms" in verdict_lines[1]
    assert "DEADLINE MISSED" in verdict_lines[2] and "DEADLINE MISSED" not in verdict_lines[1]
    assert "!! gap: 3 messages lost on verdict.line1" in lines
    assert any(ln.startswith("!! heartbeat lost: line1") for ln in lines)


def _free_tcp_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_watch_on_an_endpoint_nobody_publishes_on_says_so_and_fails():
    """The real `inspectd watch` on a TCP port nobody listens on (a wrong --endpoint, or the daemon not
    running): within a few heartbeat intervals (5 s) one line on stderr names the endpoint and the
    likely causes, while it keeps watching; at the end of --duration it exits 1. It used to stay
    silent and exit 0 (with --line, only "heartbeat lost" on stdout, which does not say why)."""
    import subprocess
    import sys

    endpoint = f"tcp://127.0.0.1:{_free_tcp_port()}"
    proc = subprocess.Popen([sys.executable, "-m", "inspectd", "watch", "--endpoint", endpoint, "--line", "line3",
                             "--duration", "7"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline().startswith(f"watching {endpoint}")
        watching = time.monotonic()
        warning = proc.stderr.readline().strip()
        warned_after = time.monotonic() - watching
        stdout, stderr = proc.communicate(timeout=30)
        ended_after = time.monotonic() - watching
    finally:
        proc.kill()
        proc.wait()
    assert 4.0 < warned_after < 6.5 and ended_after - warned_after > 0.5, (warned_after, ended_after)
    assert endpoint in warning and "no heartbeat" in warning, warning
    assert "daemon" in warning and "not running" in warning and "zmq.endpoint" in warning, warning
    assert "--server-key" in warning and "--line" in warning, warning
    assert [line for line in stderr.splitlines() if line.strip()] == []  # said once
    assert proc.returncode == 1


def test_watch_ended_before_the_warning_still_says_nothing_came(tmp_path, capsys):
    """--duration shorter than the 5 s: the one line comes at the end, exit code 1."""
    parser = argparse.ArgumentParser()
    register_watch(parser.add_subparsers(dest="command"))
    endpoint = f"ipc://{tmp_path}/nobody.sock"
    args = parser.parse_args(["watch", "--endpoint", endpoint, "--duration", "1"])
    assert args.func(args) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and endpoint in err[0] and "no heartbeat" in err[0], err


def test_watch_of_a_live_publisher_exits_0_without_a_warning(endpoint, publisher, capsys):
    parser = argparse.ArgumentParser()
    register_watch(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["watch", "--endpoint", endpoint, "--line", "line1", "--duration", "1.5"])
    assert args.func(args) == 0
    assert capsys.readouterr().err == ""


def test_format_verdict_handles_missing_fields():
    text = format_verdict({"line": "l", "frame_id": 3, "verdict": "SKIP", "score": None})
    assert "SKIP" in text and "score        -" in text


def test_register_watch_parser():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    register_watch(sub)
    args = parser.parse_args(["watch", "--endpoint", "tcp://10.0.0.5:5555", "--line", "line2"])
    assert args.endpoint == "tcp://10.0.0.5:5555" and args.line == "line2" and callable(args.func)
    # Without --endpoint: the daemon's own default endpoint.
    assert parser.parse_args(["watch"]).endpoint == ZmqConfig().endpoint == "tcp://127.0.0.1:5555"
    bad = parser.parse_args(["watch", "--duration", "-1"])
    with pytest.raises(ConfigError, match="duration"):
        bad.func(bad)
    half = parser.parse_args(["watch", "--server-key", "server.key"])
    with pytest.raises(ConfigError, match="--client-key"):
        half.func(half)
    missing = parser.parse_args(["watch", "--server-key", "/nonexistent/server.key",
                                 "--client-key", "/nonexistent/me.key_secret"])
    with pytest.raises(ConfigError, match="server public key"):
        missing.func(missing)


def test_docs_and_defaults_agree_on_the_endpoint():
    root = Path(__file__).resolve().parents[2]
    files = [root / "README.md", *(root / "docs").rglob("*.md"), *(root / "deploy").rglob("*"),
             root / "inspectd" / "client.py", root / "inspectd" / "daemon" / "watch.py",
             root / "examples" / "reject_gate.py"]
    wrong = [f"{f.relative_to(root)}:{n}" for f in files if f.is_file()
             for n, text in enumerate(f.read_text(errors="replace").splitlines(), 1)
             if re.search(r"(?<![\w.])tcp://(127\.0\.0\.1|localhost):(?!5555\b)\d+", text)]  # not opc.tcp://
    assert not wrong, f"loopback ZeroMQ endpoints other than the daemon's 5555: {wrong}"
    assert not [str(f) for f in files if f.is_file() and "5556" in f.read_text(errors="replace")]


def _status_heartbeat(pub: "RawPub", seq: int, status: dict, line: str = "line1") -> None:
    pub.send(f"heartbeat.{line}", {"schema": 1, "topic": f"heartbeat.{line}", "line": line, "seq": seq,
                                   "published_ns": time.time_ns(), "status": status, "interval_s": 0.05,
                                   "daemon_start_ns": 7})


def test_line_status_follows_heartbeats_and_their_loss(endpoint):
    changes: list[LineStatus] = []
    pub = RawPub(endpoint)
    sub = VerdictSubscriber(endpoint, lines=["line1"], heartbeat_timeout_s=0.5, verdict_timeout_s=0.4,
                            on_line_status=lambda line, st: changes.append(st))
    seq = 0

    def beat(status: dict, polls: int = 1) -> None:
        nonlocal seq
        for _ in range(polls):
            _status_heartbeat(pub, seq, status)
            seq += 1
            sub.poll_once(0.05)

    try:
        assert sub.line_status("line1").reason == "no heartbeat yet" and not sub.line_status("line1").safe
        end = time.monotonic() + 10
        while not sub.line_status("line1").heartbeat:  # slow joiner
            assert time.monotonic() < end
            beat({"state": "starting", "camera_connected": False, "engine_ready": False})
        assert sub.line_status("line1").state == "starting"
        ok = {"state": "ok", "camera_connected": True, "engine_ready": True, "frames": 1}
        beat(ok)
        st = sub.line_status("line1")
        assert st.safe and st.reason == "ok" and st.camera_connected and st.engine_ready
        n_changes = len(changes)
        beat({**ok, "frames": 2}, polls=3)   # counters change on every beat: not a status change
        assert len(changes) == n_changes
        beat({"state": "blind", "camera_connected": False, "engine_ready": True,
              "last_error": "camera lost: device removed"})
        st = sub.line_status("line1")
        assert not st.safe and st.reason == "camera lost" and st.camera_connected is False
        assert changes[-1] == st
        beat({"state": "engine_failed", "camera_connected": True, "engine_ready": False,
              "failed": "no usable backend"})
        assert sub.line_status("line1").reason == "engine failed: no usable backend"
        beat(ok)
        assert sub.line_status("line1").safe
        # Heartbeats flow, the camera says connected, but no verdict comes: quiet, not safe.
        end = time.monotonic() + 5
        while not sub.line_status("line1").quiet:
            assert time.monotonic() < end
            beat(ok)
        assert sub.line_status("line1").reason == "no verdicts" and not sub.line_status("line1").safe
        pub.verdict("line1", 0, start_ns=7)
        end = time.monotonic() + 5
        while sub.line_status("line1").quiet:
            assert time.monotonic() < end
            sub.poll_once(0.05)
        assert sub.line_status("line1").safe
        # Silence: the status says so without any message arriving.
        end = time.monotonic() + 5
        while sub.line_status("line1").heartbeat:
            assert time.monotonic() < end
            sub.poll_once(0.05)
        st = sub.line_status("line1")
        assert st.reason == "heartbeat lost" and not st.safe and changes[-1] == st
        assert sub.line_statuses == {"line1": st}
    finally:
        sub.close()
        pub.close()
    states = [c.reason for c in changes]
    assert states[0] == "line starting"  # the first heartbeat is the first change
    for expected in ("ok", "camera lost", "engine failed: no usable backend", "no verdicts", "heartbeat lost"):
        assert expected in states, states


@pytest.mark.parametrize("status, state, reason", [
    ({}, "unknown", "line status unknown"),
    ({"camera_connected": "yes", "state": "sideways"}, "unknown", "line status unknown"),
    # A daemon without "state": derived from what it does say.
    ({"camera_connected": False, "ready": False}, "blind", "camera lost"),
    ({"camera_connected": True, "ready": True}, "ok", "ok"),
    ({"camera_connected": True, "ready": True, "failed": "parity gate"}, "engine_failed", "engine failed: parity gate"),
    ({"state": "ok", "camera_connected": True, "engine_ready": True}, "ok", "ok"),
    ({"state": "stopping", "camera_connected": True, "engine_ready": True}, "stopping", "daemon stopping"),
    # A state this client does not know (a newer daemon's) is never "ok", whatever else it says.
    ({"state": "paused", "camera_connected": True, "engine_ready": True}, "unknown", "line status unknown"),
    ({"state": None, "camera_connected": True, "engine_ready": True}, "unknown", "line status unknown"),
])
def test_line_status_from_partial_or_older_heartbeats(status, state, reason):
    st = line_status_from_heartbeat("l", status)
    assert (st.state, st.reason, st.safe) == (state, reason, state == "ok")
    assert line_status_from_heartbeat("l", None).state == "unknown"


def test_watch_prints_line_status_changes(endpoint):
    out = io.StringIO()
    pub = RawPub(endpoint)
    stop = threading.Event()

    def feed():
        ok = {"state": "ok", "camera_connected": True, "engine_ready": True}
        blind = {"state": "blind", "camera_connected": False, "engine_ready": True}
        for seq in range(60):
            _status_heartbeat(pub, seq, ok if seq < 30 else blind)
            if stop.wait(0.03):
                return

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        run_watch(endpoint, line="line1", stream=out, duration=2.5, heartbeat_timeout_s=1.0)
    finally:
        stop.set()
        feeder.join(10)
        pub.close()
    lines = out.getvalue().splitlines()
    assert "-- line line1: ok" in lines and "!! line line1: camera lost" in lines, lines
    assert lines.index("-- line line1: ok") < lines.index("!! line line1: camera lost")


class _BlackHoleRelay:
    """A TCP hop between subscriber and daemon standing in for the network. `cut()` is the daemon's
    box losing power: the existing connection goes silent (nothing forwarded, nothing closed: no FIN
    or RST ever reaches the subscriber); connections made afterwards are relayed again."""

    def __init__(self, upstream_port: int) -> None:
        import socket

        self.upstream = upstream_port
        self.generation = 0
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.port = self.listener.getsockname()[1]
        self.conns: list = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _pump(self, src, dst, generation: int) -> None:
        try:
            while data := src.recv(65536):
                if self.generation == generation:
                    dst.sendall(data)
        except OSError:
            pass

    def _accept(self) -> None:
        import socket

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream))
            except OSError:
                client.close()  # nothing listening: refused, the subscriber retries
                continue
            self.conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b, self.generation), daemon=True).start()

    def cut(self) -> None:
        self.generation += 1

    def close(self) -> None:
        self.listener.close()
        for c in self.conns:
            c.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_subscriber_reconnects_after_the_daemons_box_lost_power(tmp_path):
    """The daemon's box loses power (its TCP connection to a reject gate on another box just goes
    silent) and comes back on the same address: the subscriber must notice the dead connection,
    reconnect and report the line healthy again, not stay in 'heartbeat lost' until restarted."""
    port = _free_port()
    relay = _BlackHoleRelay(port)

    def daemon() -> Publisher:
        pub = Publisher(f"tcp://127.0.0.1:{port}", heartbeat_interval_s=0.2)
        pub.set_line_status("line1", {"state": "ok", "camera_connected": True, "engine_ready": True})
        pub.start()
        return pub

    pub = daemon()
    events = Events()
    sub = subscriber(f"tcp://127.0.0.1:{relay.port}", events, lines=["line1"], heartbeat_timeout_s=1.0)
    sub.start()
    try:
        events.wait("heartbeat", 3, timeout=10)
        relay.cut()
        pub.stop()
        events.wait("lost", 1, timeout=10)
        pub = daemon()
        events.wait("restored", 1, timeout=20)
        assert sub.line_status("line1").reason == "ok"
    finally:
        sub.stop()
        pub.stop()
        relay.close()


def test_a_subscriber_joining_a_running_shadow_stream_reports_no_gap(endpoint):
    """A candidate bundle's shadow verdicts flow before a consumer of `shadow.<line>` joins: what it
    missed before it subscribed is not a loss (a reject gate would reject on a false gap)."""
    pub = Publisher(endpoint, heartbeat_interval_s=0.05)
    pub.register_line("line1")
    pub.start()
    events = Events()
    sub = subscriber(endpoint, events, lines=["line1"], topics=("verdict", "heartbeat", "shadow"))
    try:
        for i in range(5):
            pub.publish_shadow(make_verdict(i))
        time.sleep(0.3)
        end = time.monotonic() + 1.0
        while time.monotonic() < end:   # joins late: the first thing it sees is a heartbeat
            sub.poll_once(0.05)
        pub.publish_shadow(make_verdict(5))
        got = []
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            msg = sub.poll_once(0.05)
            if msg is not None and msg.kind == "shadow":
                got.append(msg.header["frame_id"])
    finally:
        sub.close()
        pub.stop()
    assert got == [5], got  # it does receive the shadow stream it joined late
    assert events.of("gap") == [] and sub.lost == 0
