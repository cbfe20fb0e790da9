"""Publisher: real PUB socket, checked with plain ZeroMQ SUB sockets (not our client) so the wire
format itself is what is tested."""

from __future__ import annotations

import json
import threading
import time

import cv2
import numpy as np
import pytest
import zmq

from inspectd.daemon.frame import Verdict
from inspectd.daemon.publish import CurveServerKeys, Publisher
from inspectd.errors import ConfigError, InspectdError

CONTRACT_VERDICT_FIELDS = {"schema", "topic", "line", "seq", "frame_id", "acquired_ns", "published_ns", "verdict",
                           "score", "raw_score", "threshold", "latency_ms", "deadline_missed", "backend",
                           "bundle_id", "error"}
CONTRACT_HEARTBEAT_FIELDS = {"line", "seq", "published_ns", "status", "interval_s", "daemon_start_ns"}


def make_verdict(frame_id: int, line: str = "line1", verdict: str = "OK", heatmap=None, **kw) -> Verdict:
    fields = dict(line=line, frame_id=frame_id, acquired_ns=time.time_ns(), verdict=verdict, score=1.25,
                  raw_score=-3.5, threshold=4.0, latency_ms=7.5, deadline_missed=False,
                  backend="onnxruntime-cpu", bundle_id="b123", heatmap=heatmap)
    fields.update(kw)
    return Verdict(**fields)


class Sub:
    """A plain SUB socket used only from the test thread."""

    def __init__(self, endpoint: str, prefixes=("",), rcvhwm: int = 1000, curve=None):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, rcvhwm)
        if curve is not None:
            self.sock.curve_serverkey, self.sock.curve_publickey, self.sock.curve_secretkey = curve
        for p in prefixes:
            self.sock.setsockopt(zmq.SUBSCRIBE, p.encode())
        self.sock.connect(endpoint)

    def recv(self, timeout: float = 5.0):
        if not self.sock.poll(int(timeout * 1000)):
            return None
        parts = self.sock.recv_multipart()
        return [parts[0].decode(), json.loads(parts[1])] + parts[2:]

    def wait_for(self, topic_prefix: str, timeout: float = 5.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            msg = self.recv(max(0.01, end - time.monotonic()))
            if msg is not None and msg[0].startswith(topic_prefix):
                return msg
        raise AssertionError(f"no {topic_prefix} message within {timeout} s")

    def close(self):
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture
def endpoint(tmp_path):
    return f"ipc://{tmp_path}/pub.sock"


@pytest.fixture
def pub_factory():
    made = []

    def make(endpoint, **kw):
        kw.setdefault("heartbeat_interval_s", 0.05)
        p = Publisher(endpoint, **kw)
        p.start()
        made.append(p)
        return p

    yield make
    for p in made:
        assert p.stop(5)


def connected(pub: Publisher, sub: Sub, line: str = "line1") -> None:
    """Beat the ZeroMQ slow-joiner: wait until the subscription has reached the publisher."""
    pub.register_line(line)
    sub.wait_for(f"heartbeat.{line}")


def test_verdict_wire_format_and_contiguous_seq(endpoint, pub_factory):
    sent = []
    pub = pub_factory(endpoint, on_sent=lambda topic, header: sent.append((topic, header)))
    sub = Sub(endpoint, prefixes=("verdict.", "heartbeat."))
    try:
        connected(pub, sub)
        for i in range(20):
            assert pub.publish_verdict(make_verdict(100 + i, verdict="NG" if i % 2 else "OK"))
        got = []
        while len(got) < 20:
            msg = sub.recv()
            assert msg is not None, f"only {len(got)} verdicts arrived"
            if msg[0].startswith("verdict."):
                got.append(msg)
    finally:
        sub.close()
    for i, (topic, header) in enumerate(got):
        assert topic == "verdict.line1"
        assert CONTRACT_VERDICT_FIELDS <= set(header)
        assert header["schema"] == 1 and header["topic"] == topic and header["line"] == "line1"
        assert header["seq"] == i  # per topic, from 0 since start, heartbeats have their own count
        assert header["frame_id"] == 100 + i
        assert header["verdict"] == ("NG" if i % 2 else "OK")
        assert header["score"] == 1.25 and header["raw_score"] == -3.5 and header["threshold"] == 4.0
        assert header["deadline_missed"] is False and header["error"] is None
        assert header["published_ns"] >= header["acquired_ns"]
        assert header["daemon_start_ns"] == pub.daemon_start_ns
    # The next heartbeat tells which verdict seq was sent last (lets subscribers see tail losses).
    sub2 = Sub(endpoint, prefixes=("heartbeat.",))
    try:
        _, hb = sub2.wait_for("heartbeat.line1")
    finally:
        sub2.close()
    assert hb["last_seq"] == {"verdict.line1": 19}
    # on_sent saw the same headers (it feeds the end-to-end latency metric).
    assert [h["seq"] for t, h in sent if t == "verdict.line1"] == list(range(20))
    assert all(h["published_ns"] >= h["acquired_ns"] for _, h in sent)


def test_heartbeats_for_registered_lines_without_frames(endpoint, pub_factory):
    pub = pub_factory(endpoint, heartbeat_interval_s=0.1)
    pub.register_line("line1")
    pub.set_line_status("line2", {"camera_connected": False, "frames": 0, "backend": "onnxruntime-cpu"})
    sub = Sub(endpoint, prefixes=("heartbeat.",))
    beats: dict[str, list] = {"line1": [], "line2": []}
    try:
        end = time.monotonic() + 10
        while min(len(b) for b in beats.values()) < 4 and time.monotonic() < end:
            msg = sub.recv(1.0)
            if msg is not None:
                beats[msg[1]["line"]].append(msg[1])
        pub.set_line_status("line2", {"camera_connected": True, "frames": 12})
        while True:
            msg = sub.wait_for("heartbeat.line2")
            if msg[1]["status"].get("camera_connected"):
                break
    finally:
        sub.close()
    for line, headers in beats.items():
        assert len(headers) >= 4, line
        assert CONTRACT_HEARTBEAT_FIELDS <= set(headers[0])
        seqs = [h["seq"] for h in headers]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # contiguous, nothing skipped
        assert all(h["interval_s"] == 0.1 and h["daemon_start_ns"] == pub.daemon_start_ns for h in headers)
    assert beats["line2"][0]["status"] == {"camera_connected": False, "frames": 0, "backend": "onnxruntime-cpu"}
    assert msg[1]["status"] == {"camera_connected": True, "frames": 12}
    # Fixed cadence: 4 beats cannot come from a burst (generous bound, no timing precision claimed).
    span_s = (beats["line1"][-1]["published_ns"] - beats["line1"][0]["published_ns"]) / 1e9
    assert span_s >= 0.2


@pytest.mark.parametrize("encoding", ["png", "raw"])
def test_heatmap_payload_resized_and_decodable(endpoint, pub_factory, encoding):
    heatmap = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (8, 1))  # 8 x 16 gradient
    pub = pub_factory(endpoint, heatmap_encoding=encoding, heatmap_size=(32, 16))
    sub = Sub(endpoint, prefixes=("heatmap.", "heartbeat."))
    try:
        connected(pub, sub)
        assert pub.publish_heatmap(make_verdict(5, verdict="NG", heatmap=heatmap))
        assert not pub.publish_heatmap(make_verdict(6))  # no heatmap: nothing to send
        topic, header, payload = sub.wait_for("heatmap.")
    finally:
        sub.close()
    assert topic == "heatmap.line1"
    assert header["encoding"] == encoding and header["shape"] == [16, 32]
    assert header["seq"] == 0 and header["frame_id"] == 5 and header["verdict"] == "NG"
    expected = cv2.resize(heatmap, (32, 16), interpolation=cv2.INTER_LINEAR)
    if encoding == "png":
        assert payload[:8] == b"\x89PNG\r\n\x1a\n"
        image = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_UNCHANGED)
    else:
        assert len(payload) == 16 * 32
        image = np.frombuffer(payload, np.uint8).reshape(16, 32)
    np.testing.assert_array_equal(image, expected)


def test_port_in_use_raises_from_start():
    first = Publisher("tcp://127.0.0.1:*")
    first.start()
    try:
        taken = first.bound_endpoint
        assert taken.startswith("tcp://127.0.0.1:")
        second = Publisher(taken)
        with pytest.raises(InspectdError, match=f"cannot bind ZeroMQ publisher to {taken}: another inspectd .* "
                                                f"give zmq.endpoint in the config a free port"):
            second.start()
        # A refused start leaves nothing running.
        assert not second.publish_verdict(make_verdict(1))
    finally:
        assert first.stop(5)


def test_a_served_ipc_endpoint_is_refused_and_its_owner_keeps_it(tmp_path):
    """ZeroMQ unlinks an ipc:// socket file and binds anew even while another process serves it: the
    second publisher would take every subscriber that connects from then on. Refused instead."""
    endpoint = f"ipc://{tmp_path}/pub.sock"
    first = Publisher(endpoint, heartbeat_interval_s=0.05)
    first.register_line("line1")
    first.start()
    try:
        second = Publisher(endpoint)
        with pytest.raises(InspectdError, match="another inspectd .* give zmq.endpoint in the config a path of its own"):
            second.start()
        late = Sub(endpoint)  # connects after the refusal: still the first publisher's
        try:
            assert late.wait_for("heartbeat.line1")[1]["daemon_start_ns"] == first.daemon_start_ns
        finally:
            late.sock.close()
            late.ctx.term()
    finally:
        assert first.stop(5)


def test_a_stale_ipc_file_of_a_process_that_is_gone_is_replaced(tmp_path):
    import socket

    path = tmp_path / "pub.sock"
    gone = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    gone.bind(str(path))  # the file stays after close, as after a SIGKILL
    gone.close()
    pub = Publisher(f"ipc://{path}", heartbeat_interval_s=0.05)
    pub.register_line("line1")
    pub.start()
    sub = Sub(f"ipc://{path}")
    try:
        sub.wait_for("heartbeat.line1")
    finally:
        sub.sock.close()
        sub.ctx.term()
        assert pub.stop(5)


def test_an_ipc_file_removed_under_a_running_publisher_is_bound_again(tmp_path, caplog):
    """Removed by hand or by a /tmp cleaner: subscribers connecting afterwards could not reach a daemon
    that still looked healthy. Bound again at the next heartbeat; subscribers already connected stay."""
    path = tmp_path / "pub.sock"
    pub = Publisher(f"ipc://{path}", heartbeat_interval_s=0.05)
    pub.register_line("line1")
    pub.start()
    early = Sub(f"ipc://{path}")
    late = None
    try:
        early.wait_for("heartbeat.line1")
        path.unlink()
        end = time.monotonic() + 5
        while not path.exists():
            assert time.monotonic() < end, "the socket file was not bound again"
            time.sleep(0.02)
        late = Sub(f"ipc://{path}")
        late.wait_for("heartbeat.line1")
        assert pub.publish_verdict(make_verdict(7))
        assert early.wait_for("verdict.line1")[1]["frame_id"] == 7
        assert late.wait_for("verdict.line1")[1]["frame_id"] == 7
        assert any("bound it again" in r.getMessage() for r in caplog.records)
    finally:
        for sub in (early, late):
            if sub is not None:
                sub.sock.close()
                sub.ctx.term()
        assert pub.stop(5)


def test_bad_settings_are_clear_errors():
    with pytest.raises(ConfigError, match="endpoint"):
        Publisher("localhost:5556")
    with pytest.raises(ConfigError, match="heartbeat interval"):
        Publisher("tcp://127.0.0.1:*", heartbeat_interval_s=0)
    with pytest.raises(ConfigError, match="heatmap encoding"):
        Publisher("tcp://127.0.0.1:*", heatmap_encoding="jpeg")
    with pytest.raises(ConfigError, match="heatmap size"):
        Publisher("tcp://127.0.0.1:*", heatmap_size=(0, 10))
    with pytest.raises(InspectdError, match="cannot bind"):
        Publisher("tcp://no-such-host.invalid:5556").start()
    pub = Publisher("tcp://127.0.0.1:*")
    with pytest.raises(ConfigError, match="line name"):
        pub.register_line("line 1")
    with pytest.raises(ConfigError, match="line name"):
        pub.register_line("a.b")  # a dot would break topic prefixes


def test_stop_flushes_queue_and_refuses_later_work(endpoint, pub_factory):
    pub = pub_factory(endpoint, linger_ms=2000)
    sub = Sub(endpoint, prefixes=("verdict.", "heartbeat."), rcvhwm=0)
    try:
        connected(pub, sub)
        n = 300
        for i in range(n):
            assert pub.publish_verdict(make_verdict(i))
        assert pub.stop(10)          # returns only after everything queued was sent
        assert not pub.publish_verdict(make_verdict(n))
        seqs = []
        while True:
            msg = sub.recv(2.0)
            if msg is None:
                break
            if msg[0] == "verdict.line1":
                seqs.append(msg[1]["seq"])
    finally:
        sub.close()
    assert seqs == list(range(n))


def test_non_finite_and_numpy_values_make_valid_json(endpoint, pub_factory):
    pub = pub_factory(endpoint)
    sub = Sub(endpoint, prefixes=("verdict.", "heartbeat."))
    try:
        connected(pub, sub)
        pub.publish_verdict(make_verdict(np.int64(9), verdict="SKIP", score=float("nan"),
                                         raw_score=np.float32(2.5), deadline_missed=np.bool_(True),
                                         error="deadline"))
        _, header = sub.wait_for("verdict.")
    finally:
        sub.close()
    assert header["score"] is None and header["raw_score"] == 2.5
    assert header["frame_id"] == 9 and header["deadline_missed"] is True and header["error"] == "deadline"


def test_publish_from_many_threads_keeps_seq_contiguous(endpoint, pub_factory):
    pub = pub_factory(endpoint)
    sub = Sub(endpoint, prefixes=("verdict.", "heartbeat."), rcvhwm=0)
    try:
        connected(pub, sub)
        workers = [threading.Thread(target=lambda k=k: [pub.publish_verdict(make_verdict(k * 1000 + i))
                                                        for i in range(100)]) for k in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(10)
        got = []
        while len(got) < 400:
            msg = sub.recv()
            assert msg is not None, f"only {len(got)} of 400 verdicts"
            if msg[0] == "verdict.line1":
                got.append(msg[1])
    finally:
        sub.close()
    assert [h["seq"] for h in got] == list(range(400))
    assert sorted(h["frame_id"] for h in got) == sorted(k * 1000 + i for k in range(4) for i in range(100))


@pytest.mark.skipif(not zmq.has("curve"), reason="libzmq built without CURVE")
def test_curve_encrypted_stream(pub_factory):
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    pub = pub_factory("tcp://127.0.0.1:*", curve=CurveServerKeys(server_public, server_secret))
    sub = Sub(pub.bound_endpoint, prefixes=("heartbeat.", "verdict."),
              curve=(server_public, client_public, client_secret))
    try:
        connected(pub, sub)
        pub.publish_verdict(make_verdict(1))
        _, header = sub.wait_for("verdict.")
        assert header["frame_id"] == 1
    finally:
        sub.close()


def _wait_connected(sub, timeout_s: float = 5.0) -> None:
    """Until the subscriber has seen a heartbeat (ZeroMQ's slow joiner: earlier messages are lost)."""
    end = time.monotonic() + timeout_s
    while not (m := sub.poll_once(0.05)) or m.kind != "heartbeat":
        assert time.monotonic() < end, "subscriber never connected"


def test_verdicts_dropped_in_the_publisher_leave_a_gap_a_count_and_a_report(endpoint, pub_factory):
    from inspectd.client import VerdictSubscriber

    release = threading.Event()
    dropped: list[tuple[str, str, str]] = []

    def on_sent(topic, header):
        if header["frame_id"] == 0:
            release.wait(10)  # hold the publisher thread on the first verdict: the queue fills behind it

    pub = pub_factory(endpoint, queue_size=2, on_sent=on_sent, on_dropped=lambda *a: dropped.append(a))
    gaps: list[tuple[str, int, int]] = []
    sub = VerdictSubscriber(endpoint, lines=["line1"], topics=("verdict", "heartbeat"), heartbeat_timeout_s=None,
                            on_gap=lambda *g: gaps.append(g))
    try:
        pub.register_line("line1")
        _wait_connected(sub)
        assert pub.publish_verdict(make_verdict(0))
        end = time.monotonic() + 5
        while pub.queue_depth():  # the publisher took frame 0 and is now held in on_sent
            assert time.monotonic() < end
            time.sleep(0.005)
        accepted = [pub.publish_verdict(make_verdict(i)) for i in range(1, 6)]
        assert accepted == [True, True, False, False, False]
        assert dropped == [("line1", "verdict", "queue_full")] * 3 and pub.dropped == 3
        release.set()
        verdicts, heartbeat = [], None
        end = time.monotonic() + 5
        while len(verdicts) < 3 or heartbeat is None:
            assert time.monotonic() < end, (verdicts, heartbeat)
            m = sub.poll_once(0.05)
            if m is not None and m.kind == "verdict":
                verdicts.append(m.header)
            elif m is not None and m.kind == "heartbeat" and len(verdicts) == 3:
                heartbeat = m.header
    finally:
        release.set()
        sub.close()
    # Three refused verdicts used up three seqs: subscribers see exactly that gap.
    assert [h["frame_id"] for h in verdicts] == [0, 1, 2]
    assert [h["seq"] for h in verdicts] == [0, 4, 5]
    assert gaps == [("verdict.line1", 1, 4)] and sub.lost == 3
    assert heartbeat["dropped"] == {"verdict.line1": 3} and heartbeat["last_seq"]["verdict.line1"] == 5


def test_heatmap_that_cannot_be_encoded_shows_at_the_next_heartbeat(endpoint, pub_factory):
    from inspectd.client import VerdictSubscriber

    dropped: list[tuple[str, str, str]] = []
    pub = pub_factory(endpoint, on_dropped=lambda *a: dropped.append(a))
    gaps: list[tuple[str, int, int]] = []
    sub = VerdictSubscriber(endpoint, lines=["line1"], topics=("heatmap", "heartbeat"), heartbeat_timeout_s=None,
                            on_gap=lambda *g: gaps.append(g))
    try:
        pub.register_line("line1")
        _wait_connected(sub)
        assert pub.publish_heatmap(make_verdict(0, heatmap=np.zeros((8, 8), np.uint8)))
        end = time.monotonic() + 5
        while not (m := sub.poll_once(0.05)) or m.kind != "heatmap":
            assert time.monotonic() < end, "no heatmap"
        assert m.header["seq"] == 0
        # A float map is a bug upstream: it is not sent, and nothing later on the topic would tell.
        assert not pub.publish_heatmap(make_verdict(1, heatmap=np.zeros((8, 8), np.float32)))
        end = time.monotonic() + 5
        while not gaps:
            assert time.monotonic() < end, "the lost heatmap was never reported"
            sub.poll_once(0.05)
    finally:
        sub.close()
    assert dropped == [("line1", "heatmap", "encode_error")]
    assert gaps == [("heatmap.line1", 1, 2)]


def test_publisher_drops_are_exported_as_a_metric():
    from inspectd.daemon.config import config_from_dict
    from inspectd.daemon.run import Daemon
    from tests.helpers import sample

    cfg = config_from_dict({"lines": [{"id": "L1", "source": {"type": "replay", "path": "/nonexistent"},
                                       "bundle": "/nonexistent", "threshold": 3.0}]})
    daemon = Daemon(cfg)
    daemon.metrics.init_line("L1")
    assert sample(daemon.metrics, "inspectd_publish_dropped_total", line="L1", topic="verdict",
                  reason="queue_full") == 0
    # The daemon's Publisher reports drops through this callback (wired in Daemon.build).
    daemon._on_dropped("L1", "verdict", "queue_full")
    daemon._on_dropped("L1", "heatmap", "encode_error")
    assert sample(daemon.metrics, "inspectd_publish_dropped_total", line="L1", topic="verdict",
                  reason="queue_full") == 1
    assert sample(daemon.metrics, "inspectd_publish_dropped_total", line="L1", topic="heatmap",
                  reason="encode_error") == 1
