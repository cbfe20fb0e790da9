"""The live view on the daemon's HTTP endpoint: a real `inspectd run` child on a replay line,
looked at by a real headless browser (Debian's chromium): verdict rows appear and keep coming
without a reload, the latest NG frame is shown with its heatmap overlay at camera resolution, the
page is not blank; read-only (POST refused). Plus the sink's contract: references, no rendering."""

from __future__ import annotations

import http.client
import json
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from inspectd.daemon.frame import Frame, Verdict
from inspectd.daemon.live import LiveView, render_overlay
from inspectd.daemon.metrics import Metrics
from tests.daemon.test_run import Daemon, _write_config

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Root in a container: no sandbox, no GPU; the dbus noise on stderr is harmless.
CHROME_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
                "--disable-dev-shm-usage"]


class _Bundle:
    """TEST DOUBLE for Bundle: the fixed display range 0..1 and an optional ROI."""

    def __init__(self, roi: Any = None) -> None:
        self.roi = roi

    def heatmap_u8(self, m: np.ndarray) -> np.ndarray:
        return (np.clip(m, 0, 1) * 255 + 0.5).astype(np.uint8)


def _verdict(line: str, fid: int, kind: str, image: np.ndarray, amap: np.ndarray | None) -> Verdict:
    frame = Frame(line=line, frame_id=fid, acquired_ns=time.time_ns(), acquired_mono=time.monotonic(), image=image)
    return Verdict(line=line, frame_id=fid, acquired_ns=frame.acquired_ns, verdict=kind, score=5.0, raw_score=1.0,
                   threshold=3.0, latency_ms=4.0, deadline_missed=False, backend="onnxruntime", bundle_id="b",
                   frame=frame, anomaly_map=amap)


def test_sink_keeps_references_and_renders_only_on_request() -> None:
    view = LiveView(keep=3)
    status = {"state": "ok", "camera_connected": True, "engine_ready": True, "backend": "onnxruntime",
              "threshold": 3.0}
    bundle = _Bundle(roi=(20, 10, 40, 30))
    sink = view.add_line("l1", lambda: status, lambda: bundle)
    image = np.full((60, 80), 100, np.uint8)
    amap = np.zeros((8, 8), np.float32)
    amap[2:4, 2:4] = 1.0
    sink.accept(_verdict("l1", 1, "NG", image, amap))
    latest = view._lines["l1"].latest_ng
    assert latest is not None and latest.image is image and latest.anomaly_map is amap and latest.png is None
    for fid in range(2, 6):
        sink.accept(_verdict("l1", fid, "OK", image, None))
    snap = view.snapshot()
    assert snap["lines"][0]["counts"] == {"OK": 4, "NG": 1, "SKIP": 0}
    assert [v["frame_id"] for v in snap["verdicts"]] == [3, 4, 5]  # the last `keep`
    assert [v["frame_id"] for v in view.snapshot(since=4)["verdicts"]] == [5]
    assert snap["lines"][0]["ng"]["url"] == "/live/l1/ng.png?frame=1"
    # The overlay: camera resolution, heat only inside the bundle's ROI (outlined), warm where hot.
    out = render_overlay(image, amap, _Bundle(roi=(20, 10, 40, 30)))
    assert out.shape == (60, 80, 3)
    assert (out[:9] == 100).all() and (out[:, :19] == 100).all()  # outside the ROI: the frame as it was
    b, g, r = (out[12:38, 22:58, i].astype(int) for i in range(3))
    assert ((r - b) > 40).any()
    png = view.ng_png("l1")
    assert png is not None and view.ng_png("l1") is png  # rendered once, then cached
    assert view.ng_png("other") is None


def test_ng_frames_are_drawn_with_the_bundle_that_judged_them() -> None:
    """A recipe switch or a promote changes the line's bundle: each NG picture keeps its own
    bundle (display range, ROI); a late verdict of the bundle switched away from is not shown."""
    view = LiveView()
    first, second = _Bundle(roi=(0, 0, 40, 30)), _Bundle(roi=(20, 10, 40, 30))
    first.bundle_id, second.bundle_id = "b", "b2"
    active = [first]
    sink = view.add_line("l1", lambda: {"state": "ok"}, lambda: active[0])
    image, amap = np.full((60, 80), 100, np.uint8), np.ones((8, 8), np.float32)
    sink.accept(_verdict("l1", 1, "NG", image, amap))
    assert view._lines["l1"].latest_ng.bundle is first
    active[0] = second
    sink.accept(_verdict("l1", 2, "NG", image, amap))  # judged by "b" just before the switch
    assert view._lines["l1"].latest_ng.summary["frame_id"] == 1
    late = _verdict("l1", 3, "NG", image, amap)
    late.bundle_id = "b2"
    sink.accept(late)
    assert view._lines["l1"].latest_ng.bundle is second and view._lines["l1"].latest_ng.summary["frame_id"] == 3


def _get(url: str, data: bytes | None = None) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=5) as resp:
            return resp.status, resp.read(), resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers.get("Content-Type", "")


def _chromium(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *CHROME_FLAGS, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def chromium_ok() -> None:
    if CHROMIUM is None:
        pytest.skip("chromium not installed (apt-get install chromium; listed in .ci/apt-packages)")
    proc = _chromium("--dump-dom", "data:text/html,<p id=x>ok</p>", timeout=60)
    if proc.returncode != 0 or 'id="x"' not in proc.stdout:
        pytest.skip(f"chromium cannot run here: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}")


def test_live_page_in_a_headless_browser(tmp_path: Path, tiny_bundle: Path, synthetic_parts: Any,
                                         chromium_ok: None) -> None:
    replay = tmp_path / "replay"
    shutil.copytree(synthetic_parts.test_good, replay / "good")
    shutil.copytree(synthetic_parts.test_bad, replay / "bad")
    cfg = _write_config(tmp_path / "lines.yaml", [{
        # 100 fps: Chromium's virtual time runs the page's 500 ms polls back to back, a few ms of real
        # time apart; at 10 fps most of them found no new verdict and the "updates" check below failed
        # about one run in six on a fast machine.
        "id": "line1", "source": {"type": "replay", "path": str(replay), "fps": 100, "loop": True},
        "bundle": str(tiny_bundle), "backends": ["onnxruntime"], "threshold": 2.0, "latency_budget_ms": 1000,
        "heatmap": {"publish": "none"},  # the live view needs no published heatmap: it keeps the raw map
    }], f"ipc://{tmp_path}/pub.sock")
    daemon = Daemon(cfg)
    try:
        port = int(daemon.wait_log(r"live view on http://127\.0\.0\.1:(\d+)/").group(1))
        base = f"http://127.0.0.1:{port}"
        daemon.wait_log(r"ready: line1: camera up, onnxruntime")
        # Read-only: a POST changes nothing and is refused; /metrics is still served.
        assert _get(base + "/", data=b"x")[0] == 405
        assert b"inspectd_frames_total" in _get(base + "/metrics")[1]
        status, page, ctype = _get(base + "/")
        assert status == 200 and ctype.startswith("text/html")
        assert b"http://" not in page and b"https://" not in page  # nothing fetched from the internet
        end = time.monotonic() + 20
        snap: dict[str, Any] = {}
        while time.monotonic() < end:
            snap = json.loads(_get(base + "/live/status.json")[1])
            if snap["lines"][0]["ng"] and snap["lines"][0]["counts"]["OK"]:
                break
            time.sleep(0.2)
        line = snap["lines"][0]
        assert line["ng"] is not None, snap
        assert line["status"]["camera_connected"] is True and line["status"]["engine_ready"] is True
        assert line["status"]["backend"] == "onnxruntime" and line["status"]["threshold"] == 2.0
        assert 0 < line["status"]["engine_ms"] < 500 and line["status"]["latency_budget_ms"] == 1000
        # The served overlay: the grey 128x128 camera frame at its own resolution, coloured by the heatmap.
        status, png, ctype = _get(base + line["ng"]["url"])
        assert status == 200 and ctype == "image/png"
        overlay = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
        assert overlay.shape == (128, 128, 3)
        b, g, r = (overlay[..., i].astype(int) for i in range(3))
        assert ((r - b) > 40).mean() > 0.01, "no warm heatmap colours on the NG frame"

        # A real browser: rows arrive through several polls (no reload) and the overlay image loads.
        proc = _chromium("--virtual-time-budget=4000", "--dump-dom", base + "/")
        dom = proc.stdout
        rows = dom.count('<tr class="v-')
        assert rows >= 5 and '<tr class="v-NG"' in dom, (rows, proc.stderr[-500:])
        updates = int(dom.split('data-updates="', 1)[1].split('"', 1)[0])
        assert updates >= 2, "the table did not update without a reload"
        assert 'id="ngimg-line1"' in dom and 'data-size="128x128"' in dom  # decoded by the browser
        assert "connected" in dom and "onnxruntime" in dom
        assert re.search(r'<span class="good">[\d.]+ ms of 1000 ms budget</span>', dom), "no engine time row"
        shot = tmp_path / "live.png"
        proc = _chromium("--virtual-time-budget=3000", "--window-size=1200,800", f"--screenshot={shot}", base + "/")
        image = cv2.imread(str(shot), cv2.IMREAD_COLOR)
        assert image is not None and image.shape[:2] == (800, 1200), proc.stderr[-500:]
        assert image.std() > 20 and len(np.unique(image.reshape(-1, 3), axis=0)) > 50, "blank screenshot"
    finally:
        daemon.kill()


def test_live_view_can_be_turned_off(tmp_path: Path, tiny_bundle: Path, synthetic_parts: Any) -> None:
    import yaml

    cfg = _write_config(tmp_path / "lines.yaml", [{
        "id": "line1", "source": {"type": "replay", "path": str(synthetic_parts.test_good), "fps": 10, "loop": True},
        "bundle": str(tiny_bundle), "backends": ["onnxruntime"], "threshold": 5.0}], f"ipc://{tmp_path}/pub.sock")
    data = yaml.safe_load(cfg.read_text())
    data["metrics"]["live"] = False
    cfg.write_text(yaml.safe_dump(data))
    daemon = Daemon(cfg)
    try:
        port = int(daemon.wait_log(r"metrics on http://127\.0\.0\.1:(\d+)/metrics").group(1))
        daemon.wait_log(r"ready: line1")
        for path in ("/", "/live", "/live/line1/ng.png"):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
                body = resp.read().decode("utf-8", "replace")
            assert "text/plain" in resp.headers["Content-Type"] and "inspectd_up" in body, path
        assert not any("live view on" in line for line in daemon.lines)
    finally:
        daemon.kill()


def _raw_get(port: int, target: bytes) -> tuple[int, bytes]:
    """One HTTP/1.0 GET with the request target sent byte for byte (urllib would percent-encode it:
    the WSGI server hands the query on raw, decoded as latin-1)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(b"GET " + target + b" HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.mark.parametrize("since", [b"\xb2", b"%C2%B2", b"\xb9", b"9" * 5000, b"9" * 19, b"-1", b"1.5", b"0x10", b""],
                         ids=["superscript-two", "percent-encoded-superscript-two", "superscript-one", "5000-digits",
                              "19-digits", "negative", "fraction", "hex", "empty"])
def test_a_bad_since_is_a_400_never_a_500(since: bytes, capfd: pytest.CaptureFixture[str]) -> None:
    """`since=` on the daemon's real HTTP server: '²' passes str.isdigit() but not int(), and 5,000
    digits pass isdigit() but exceed int()'s limit; both were a 500 with a traceback in the journal.
    Anything but 1 to 18 ASCII digits is a 400 saying why; good values still filter."""
    view = LiveView()
    sink = view.add_line("line1", lambda: {"state": "ok"}, lambda: None)
    image = np.zeros((4, 4), np.uint8)
    for fid in range(1, 4):
        sink.accept(_verdict("line1", fid, "OK", image, None))
    server = Metrics().serve("127.0.0.1", 0, live=view)
    try:
        status, body = _raw_get(server.port, b"/live/status.json?since=" + since)
        assert status == 400 and body == b"since: expected a whole number of 1 to 18 digits\n", (status, body[:300])
        # The first `since` counts, wherever it stands.
        assert _raw_get(server.port, b"/live/status.json?x=1&since=" + since + b"&since=2")[0] == 400
        for target, frames in ((b"/live/status.json", [1, 2, 3]), (b"/live/status.json?since=2", [3]),
                               (b"/live/status.json?since=" + b"9" * 18, []),
                               (b"/live/status.json?other=%C2%B2&since=1", [2, 3]),
                               (b"/live/status.json?since=%32", [3])):  # percent-encoded "2"
            status, body = _raw_get(server.port, target)
            assert status == 200, (target, status, body[:300])
            assert [v["frame_id"] for v in json.loads(body)["verdicts"]] == frames
    finally:
        server.shutdown()
    assert "Traceback" not in capfd.readouterr().err


def _host_request(port: int, path: str, host: str | None, method: str = "GET",
                  connect: str = "127.0.0.1") -> tuple[int, bytes, str]:
    """One request on the daemon's real HTTP server with the Host header as given (None: no Host
    header at all), the way a browser sends it after a DNS rebinding: the connection goes to this
    server, the Host names the attacker's domain."""
    conn = http.client.HTTPConnection(connect, port, timeout=5)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        if host is not None:
            conn.putheader("Host", host)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.read(), resp.getheader("Content-Type", "")
    finally:
        conn.close()


def _view_with_an_ng_frame() -> LiveView:
    view = LiveView()
    sink = view.add_line("l1", lambda: {"state": "ok", "camera_connected": True}, lambda: _Bundle())
    amap = np.zeros((8, 8), np.float32)
    amap[2:4, 2:4] = 1.0
    sink.accept(_verdict("l1", 1, "NG", np.full((60, 80), 100, np.uint8), amap))
    sink.accept(_verdict("l1", 2, "OK", np.full((60, 80), 100, np.uint8), None))
    return view


LIVE_PATHS = ("/", "/live", "/live/", "/live/status.json", "/live/status.json?since=1", "/live/l1/ng.png",
              "/live/other/ng.png", "/live/nothing-here")


def test_the_live_view_refuses_a_host_that_is_not_this_server(capfd: pytest.CaptureFixture[str]) -> None:
    """DNS rebinding: a web page of evil.example, open in an operator's browser, makes its name
    resolve to 127.0.0.1; the browser then reads the live view (part images, verdicts) as
    same-origin, but its requests carry `Host: evil.example`. Every live-view path answers such a
    request with 421 and one short plain-text line, for any method; loopback names and addresses
    (any port: an SSH tunnel forwards another one) are served. /metrics is not checked: Prometheus
    sends its target's host:port, whatever name the scrape config gives this box."""
    server = Metrics().serve("127.0.0.1", 0, live=_view_with_an_ng_frame())
    port = server.port
    try:
        forged = ["evil.example", f"evil.example:{port}", "attacker.test:80", f"localhost.evil.example:{port}",
                  f"127.0.0.1.nip.io:{port}", f"localhost@evil.example:{port}", f"evil.example:{port}:80",
                  "localhost:http", "[::1", "::1", f"127.0.0.1:{port}, evil.example", "", None]
        for host in forged:
            for path in LIVE_PATHS:
                status, body, ctype = _host_request(port, path, host)
                assert status == 421, (host, path, status, body[:100])
                assert ctype.startswith("text/plain") and body.endswith(b"\n") and body.count(b"\n") == 1, body
                assert len(body) < 200 and b"l1" not in body and b"PNG" not in body
            assert _host_request(port, "/live/status.json", host, method="HEAD")[:2] == (421, b"")
            assert _host_request(port, "/live/status.json", host, method="POST")[0] == 421
        for host in (f"127.0.0.1:{port}", "127.0.0.1", f"localhost:{port}", "localhost", f"LocalHost:{port}",
                     f"[::1]:{port}", "[::1]", "localhost:8080", f"127.0.0.2:{port}"):
            status, body, ctype = _host_request(port, "/live/status.json", host)
            assert status == 200 and ctype == "application/json", (host, status, body[:100])
            assert json.loads(body)["lines"][0]["line"] == "l1"
            status, body, ctype = _host_request(port, "/live/l1/ng.png", host)
            assert status == 200 and body.startswith(b"\x89PNG"), (host, status)
            assert _host_request(port, "/", host)[0] == 200
        # What a plain client sends (Host: 127.0.0.1:PORT) is served.
        assert _get(f"http://127.0.0.1:{port}/live/status.json")[0] == 200
        # Prometheus scrapes by whatever name its config gives: /metrics does not look at Host.
        for host in ("inspect-box.plant.example:9108", f"evil.example:{port}", None):
            status, body, ctype = _host_request(port, "/metrics", host)
            assert status == 200 and ctype.startswith("text/plain") and b"inspectd_frames_total" in body, host
    finally:
        server.shutdown()
    assert "Traceback" not in capfd.readouterr().err


def _non_loopback_address() -> str | None:
    """An IPv4 address of this machine that is not loopback (the interface a default route uses;
    nothing is sent), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: only picks the outgoing interface
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_the_live_view_served_on_a_network_address_answers_to_that_address() -> None:
    """metrics.host set to an address of the box (or 0.0.0.0): the live view is opened as
    http://ADDRESS:PORT/, so that Host is served, besides the loopback names; a foreign name still
    gets 421."""
    address = _non_loopback_address()
    if address is None:
        pytest.skip("no non-loopback IPv4 address on this machine")
    server = Metrics().serve(address, 0, live=_view_with_an_ng_frame())
    port = server.port
    try:
        for host in (f"{address}:{port}", address, f"localhost:{port}"):
            assert _host_request(port, "/live/status.json", host, connect=address)[0] == 200, host
        for host in (f"evil.example:{port}", "0.0.0.0", f"127.0.0.1.{address}"):
            assert _host_request(port, "/live/status.json", host, connect=address)[0] == 421, host
    finally:
        server.shutdown()
    server = Metrics().serve("0.0.0.0", 0, live=_view_with_an_ng_frame())  # every interface
    port = server.port
    try:
        # The address the browser connected to is this server's address: served.
        assert _host_request(port, "/live/status.json", f"{address}:{port}", connect=address)[0] == 200
        assert _host_request(port, "/live/status.json", f"127.0.0.1:{port}", connect="127.0.0.1")[0] == 200
        assert _host_request(port, "/live/status.json", f"evil.example:{port}", connect=address)[0] == 421
        assert _host_request(port, "/metrics", f"evil.example:{port}", connect=address)[0] == 200
    finally:
        server.shutdown()
    hostname = socket.gethostname()
    try:
        socket.getaddrinfo(hostname, 0, type=socket.SOCK_STREAM)
    except OSError:
        return  # the box's name does not resolve here: nothing more to bind to
    server = Metrics().serve(hostname, 0, live=_view_with_an_ng_frame())  # metrics.host: the box's name
    port = server.port
    connect = server._server.server_address[0]  # type: ignore[attr-defined]
    try:
        for host in (f"{hostname}:{port}", hostname.upper()):
            assert _host_request(port, "/live/status.json", host, connect=connect)[0] == 200, host
        assert _host_request(port, "/live/status.json", f"evil.example:{port}", connect=connect)[0] == 421
    finally:
        server.shutdown()


def test_the_live_view_answers_to_this_boxs_own_name_and_configured_names() -> None:
    """Listening on every interface (metrics.host 0.0.0.0), the view is opened by the box's own host
    name or by an alias in metrics.live_hosts (a reverse proxy's name): served. A rebinding page's
    Host is its own domain: still 421. From the daemon's own config, end to end."""
    from inspectd.daemon.config import MetricsConfig
    from inspectd.daemon.live import LiveView

    cfg = MetricsConfig(host="0.0.0.0", port=0, live_hosts=["Line-3.Plant.example"])
    view = LiveView(host_names=cfg.live_hosts)
    view_with_frame = _view_with_an_ng_frame()
    view_with_frame.host_names = view.host_names
    server = Metrics().serve(cfg.host, cfg.port, live=view_with_frame)
    port = server.port
    try:
        for host in (f"{socket.gethostname()}:{port}", socket.getfqdn(), "line-3.plant.example.",
                     f"LINE-3.plant.example:{port}"):
            assert _host_request(port, "/live/status.json", host, connect="127.0.0.1")[0] == 200, host
        for host in (f"evil.example:{port}", f"line-3.plant.example.evil.example:{port}", "plant.example"):
            assert _host_request(port, "/live/status.json", host, connect="127.0.0.1")[0] == 421, host
    finally:
        server.shutdown()
