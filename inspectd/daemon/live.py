"""The live view: a read-only page on the daemon's HTTP endpoint (the /metrics server, loopback by
default) for the people at the line.

    /  or /live             the page (inline HTML/CSS/JS, nothing from the internet); it polls
    /live/status.json       per line: status (camera, engine, backend, threshold), OK/NG/SKIP counts,
                            the latest NG frame; the last verdicts (`?since=SEQ`: only newer ones;
                            anything but a whole number is a 400)
    /live/<line>/ng.png     the latest NG frame at camera resolution with its heatmap overlay

`LiveSink` (one per line, wired in run.py with the other sinks) runs in the worker / deadline
thread: it counts, appends a small summary and, for an NG verdict with a map, keeps references to
the frame's image and the raw anomaly map. Nothing is rendered there: the overlay (the bundle's
fixed display range `heatmap_u8`, upsampled onto the ROI of the frame) is made on request in the
HTTP thread, once per NG frame (cached). Only GET and HEAD are answered: nothing here changes state.

DNS rebinding: a web page open in an operator's browser can make its own name resolve to this
box's address and then read these pages as same-origin; its requests still say `Host: <its name>`.
So every live-view path first checks the Host header (`host_allowed`): a loopback name or address
(localhost, 127.0.0.0/8, [::1]), the address this connection was accepted on, the configured
bind host (metrics.host, when it is not a wildcard address), this box's own host name and the names
in metrics.live_hosts (`LiveView.host_names`) are served, with any port
or none (an SSH tunnel forwards another port; the port plays no part in rebinding); anything else,
a missing Host included, is a 421 Misdirected Request. /metrics is not checked (daemon/metrics.py).
"""

from __future__ import annotations

import collections
import functools
import ipaddress
import json
import re
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable
from urllib.parse import parse_qsl

import numpy as np

from inspectd.daemon.frame import Verdict
from inspectd.fileio import json_value

__all__ = ["LiveView", "LiveSink", "render_overlay"]

KEEP_VERDICTS = 100   # the last verdicts over all lines, for the table
_NG_PATH = re.compile(r"^/live/([A-Za-z0-9_-]+)/ng\.png$")
MAX_INT_ARG_DIGITS = 18  # `since` is a verdict sequence number: 18 digits outlast any daemon
_DIGITS = re.compile(f"[0-9]{{1,{MAX_INT_ARG_DIGITS}}}")
# The server's WSGI environ keys (daemon/metrics.py) naming where it serves, for the Host check.
BIND_HOST_KEY = "inspectd.bind_host"      # metrics.host as configured (may be a name, or 0.0.0.0)
LOCAL_ADDRESS_KEY = "inspectd.local_address"  # the address this connection was accepted on
_HOST_HEADER = re.compile(r"^(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9._-]+))(?::[0-9]{1,5})?$")
# 421, not 403: the request reached a server that does not answer for the authority it names
# (RFC 9110 15.5.20), which is exactly a foreign Host; the same client is served under this
# server's own address, so it is not a matter of permission (403).
MISDIRECTED = (b"misdirected request: the Host header does not name this server (use 127.0.0.1, metrics.host "
               b"or a name in metrics.live_hosts)\n")


@dataclass
class _LatestNg:
    summary: dict[str, Any]
    image: np.ndarray          # the frame as acquired (reference, never copied or changed)
    anomaly_map: np.ndarray    # the raw map (reference)
    bundle: Any                # the bundle that judged it (display range, ROI): recipes switch bundles
    png: bytes | None = None   # rendered on first request


class _LineLive:
    def __init__(self, line: str, status: Callable[[], dict[str, Any]], bundle: Callable[[], Any]) -> None:
        self.line, self.status, self.bundle = line, status, bundle
        self.counts = {"OK": 0, "NG": 0, "SKIP": 0}
        self.latest_ng: _LatestNg | None = None


class LiveView:
    """The state behind the page, and its WSGI routes (`route()`; None: not a live-view path)."""

    def __init__(self, keep: int = KEEP_VERDICTS, host_names: Iterable[str] = ()) -> None:
        self._configured_names = tuple(host_names)
        self._lines: dict[str, _LineLive] = {}
        self._verdicts: collections.deque[dict[str, Any]] = collections.deque(maxlen=keep)
        self._seq = 0
        self._lock = threading.Lock()
        self._render_lock = threading.Lock()

    @functools.cached_property
    def host_names(self) -> frozenset[str]:
        """Names (not addresses) a browser may open the view by: this box's own and the configured
        metrics.live_hosts. A rebinding page's Host is its own domain, never one of these. Worked
        out at the first request, not at daemon start: getfqdn() may wait on DNS."""
        return frozenset(n.strip().lower().rstrip(".") for n in
                         (*self._configured_names, socket.gethostname(), socket.getfqdn()) if n.strip())

    def add_line(self, line: str, status: Callable[[], dict[str, Any]], bundle: Callable[[], Any]) -> "LiveSink":
        """Register a line (`status()`: LinePipeline.status; `bundle()`: its active Bundle, which a
        recipe switch or a promote changes) and get its sink."""
        self._lines[line] = _LineLive(line, status, bundle)
        return LiveSink(self, line)

    # ---- from the sinks (worker / deadline threads): references and counters only -------------------
    def _accept(self, verdict: Verdict) -> None:
        state = self._lines.get(verdict.line)
        if state is None:
            return
        summary = {"line": verdict.line, "frame_id": verdict.frame_id, "verdict": verdict.verdict,
                   "score": verdict.score, "threshold": verdict.threshold, "latency_ms": verdict.latency_ms,
                   "deadline_missed": verdict.deadline_missed, "error": verdict.error,
                   "acquired_ns": verdict.acquired_ns}
        latest = None
        if (verdict.verdict == "NG" and verdict.anomaly_map is not None and verdict.frame is not None
                and isinstance(verdict.frame.image, np.ndarray)):
            bundle = state.bundle()
            # A verdict of the bundle just switched away from keeps the previous picture: its map
            # must be drawn in its own bundle's display range and ROI.
            if getattr(bundle, "bundle_id", verdict.bundle_id) == verdict.bundle_id:
                latest = _LatestNg(summary, verdict.frame.image, verdict.anomaly_map, bundle)
        with self._lock:
            self._seq += 1
            summary["seq"] = self._seq
            self._verdicts.append(summary)
            state.counts[verdict.verdict] = state.counts.get(verdict.verdict, 0) + 1
            if latest is not None:
                state.latest_ng = latest

    # ---- from the HTTP threads ---------------------------------------------------------------------
    def snapshot(self, since: int = 0) -> dict[str, Any]:
        lines = []
        with self._lock:
            verdicts = [dict(v) for v in self._verdicts if v["seq"] > since]
            seq = self._seq
            per_line = [(s, dict(s.counts), s.latest_ng.summary if s.latest_ng else None)
                        for s in self._lines.values()]
        for state, counts, ng in per_line:
            try:
                status = state.status()
            except Exception as exc:  # a status that cannot be read is shown, not a broken page
                status = {"state": "unknown", "last_error": f"status unavailable: {exc}"}
            keys = ("state", "camera_connected", "engine_ready", "backend", "bundle_id", "threshold",
                    "engine_ms", "latency_budget_ms",
                    "frames", "verdicts", "deadline_misses", "queue_depth", "last_error", "failed", "failing_safe")
            lines.append({"line": state.line, "status": {k: status.get(k) for k in keys}, "counts": counts,
                          "ng": None if ng is None else dict(ng, url=f"/live/{state.line}/ng.png?frame={ng['frame_id']}")})
        return json_value({"seq": seq, "time_ns": time.time_ns(), "lines": lines, "verdicts": verdicts})

    def ng_png(self, line: str) -> bytes | None:
        """The latest NG frame of `line` with its overlay, as PNG (rendered once per NG frame)."""
        state = self._lines.get(line)
        if state is None:
            return None
        latest = state.latest_ng
        if latest is None:
            return None
        if latest.png is None:
            with self._render_lock:  # one render at a time: a page left open in 5 tabs costs one
                if latest.png is None:
                    latest.png = _encode_png(render_overlay(latest.image, latest.anomaly_map, latest.bundle))
        return latest.png

    def route(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes] | None:
        path = environ.get("PATH_INFO", "") or "/"
        ours = path in ("/", "/live", "/live/") or path.startswith("/live/")
        if not ours:
            return None
        method = environ.get("REQUEST_METHOD", "GET")
        if not host_allowed(environ, self.host_names):  # first: a rebinding page learns nothing here
            return _respond(start_response, "421 Misdirected Request", "text/plain; charset=utf-8",
                            MISDIRECTED, [], method)
        if method not in ("GET", "HEAD"):
            return _respond(start_response, "405 Method Not Allowed", "text/plain; charset=utf-8",
                            b"read-only: GET only\n", [("Allow", "GET, HEAD")], method)
        if path in ("/", "/live", "/live/"):
            return _respond(start_response, "200 OK", "text/html; charset=utf-8", PAGE.encode(), [], method)
        if path == "/live/status.json":
            since = _int_arg(environ.get("QUERY_STRING", ""), "since")
            if since is None:
                return _respond(start_response, "400 Bad Request", "text/plain; charset=utf-8",
                                f"since: expected a whole number of 1 to {MAX_INT_ARG_DIGITS} digits\n".encode(),
                                [], method)
            body = json.dumps(self.snapshot(since), separators=(",", ":")).encode()
            return _respond(start_response, "200 OK", "application/json", body, [], method)
        m = _NG_PATH.match(path)
        if m is not None:
            png = self.ng_png(m.group(1))
            if png is not None:
                return _respond(start_response, "200 OK", "image/png", png, [], method)
            return _respond(start_response, "404 Not Found", "text/plain; charset=utf-8",
                            b"no NG frame on this line yet\n", [], method)
        return _respond(start_response, "404 Not Found", "text/plain; charset=utf-8", b"not found\n", [], method)


class LiveSink:
    """One line's verdicts into the LiveView: counters, a summary, references to the latest NG
    frame and its map. Never renders or copies an image."""

    def __init__(self, view: LiveView, line: str) -> None:
        self.view, self.line = view, line

    def accept(self, verdict: Verdict) -> None:
        self.view._accept(verdict)


def render_overlay(image: np.ndarray, anomaly_map: np.ndarray, bundle: Any) -> np.ndarray:
    """The frame at camera resolution (BGR) with the map, in the bundle's fixed display range,
    upsampled onto the region the model saw (the bundle's ROI, or the whole frame) and outlined."""
    import cv2

    from inspectd.engines.heatmap import overlay

    heat = bundle.heatmap_u8(np.asarray(anomaly_map, dtype=np.float32))
    if image.ndim == 3 and image.shape[2] == 3:
        frame = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    else:
        frame = cv2.cvtColor(image.reshape(image.shape[:2]), cv2.COLOR_GRAY2BGR)
    roi = getattr(bundle, "roi", None)
    x, y, w, h = roi if roi is not None else (0, 0, frame.shape[1], frame.shape[0])
    region = np.ascontiguousarray(frame[y:y + h, x:x + w][:, :, ::-1])  # overlay() takes RGB
    frame[y:y + h, x:x + w] = overlay(region, heat)
    if roi is not None:
        cv2.rectangle(frame, (x, y), (x + w - 1, y + h - 1), (255, 255, 0), max(1, min(frame.shape[:2]) // 300))
    return frame


def _encode_png(bgr: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def host_allowed(environ: dict[str, Any], names: Iterable[str] = ()) -> bool:
    """The request's Host header names this server: a loopback name or address, the address the
    connection was accepted on (`LOCAL_ADDRESS_KEY`), the configured bind host (`BIND_HOST_KEY`) or
    one of `names` (lower case), with any port or none. Anything else (another name, a malformed or
    missing Host) is refused: a browser always sends Host, and after a DNS rebinding it is the
    attacking page's name."""
    m = _HOST_HEADER.match(environ.get("HTTP_HOST", ""))
    if m is None:
        return False
    bracketed, plain = m.group(1), m.group(2)
    name = (bracketed or plain).lower().rstrip(".")  # "box.example." is "box.example"
    address = _ip(name)
    if bracketed is not None and (address is None or address.version != 6):
        return False  # only an IPv6 address goes in brackets
    if (address is None and name in ("localhost", *names)) or (address is not None and address.is_loopback):
        return True
    local = _ip(str(environ.get(LOCAL_ADDRESS_KEY, "")))
    if address is not None and local is not None and address == local:
        return True
    bind = str(environ.get(BIND_HOST_KEY, "")).strip("[]").lower()
    bind_address = _ip(bind)
    if not bind or (bind_address is not None and bind_address.is_unspecified):
        return False  # 0.0.0.0 / :: listen everywhere: not a name a browser opens
    return name == bind if bind_address is None else address == bind_address


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """`text` as an IP address (an IPv4-mapped IPv6 one as IPv4), None if it is not one."""
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])  # no zone id
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped if mapped is not None else address


def _int_arg(query: str, name: str) -> int | None:
    """`name`'s value in `query` (the first one): 0 if absent, None unless 1 to MAX_INT_ARG_DIGITS
    ASCII digits. Not str.isdigit(): it takes '\u00b2', which int() refuses, and thousands of
    digits, which int() refuses too (and parses slowly): either was a 500 and a traceback."""
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key == name:
            return int(value) if _DIGITS.fullmatch(value) else None
    return 0


def _respond(start_response: Callable[..., Any], status: str, ctype: str, body: bytes,
             headers: list[tuple[str, str]], method: str) -> list[bytes]:
    start_response(status, [("Content-Type", ctype), ("Content-Length", str(len(body))),
                            ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"),
                            ("Content-Security-Policy",
                             "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                             "img-src 'self'; connect-src 'self'"), *headers])
    return [] if method == "HEAD" else [body]


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>inspectd live</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f4f5f7;color:#222}
header{background:#1f2933;color:#fff;padding:8px 16px;display:flex;gap:16px;align-items:baseline}
header h1{font-size:18px;margin:0} #conn{font-size:12px;opacity:.8}
main{padding:12px 16px;display:grid;gap:16px}
.line{background:#fff;border-radius:6px;padding:12px;box-shadow:0 1px 2px #0002;display:grid;
grid-template-columns:minmax(260px,1fr) minmax(200px,2fr);gap:12px}
.line h2{margin:0 0 6px;font-size:16px} .kv{display:grid;grid-template-columns:auto 1fr;gap:2px 12px}
.kv span:nth-child(odd){color:#667}
.bad{color:#b00020;font-weight:600} .good{color:#0a7d32;font-weight:600}
.counts{font-size:22px;margin-top:8px} .ng img{max-width:100%;border:1px solid #ccc;display:block}
table{border-collapse:collapse;width:100%;background:#fff;box-shadow:0 1px 2px #0002}
th,td{padding:3px 8px;text-align:left;border-bottom:1px solid #eee;font-variant-numeric:tabular-nums}
tr.v-NG td.v{color:#b00020;font-weight:600} tr.v-OK td.v{color:#0a7d32}
tr.v-SKIP td.v{color:#a60}
</style></head><body>
<header><h1>inspectd live</h1><span id="conn">connecting</span></header>
<main><div id="lines"></div>
<section><h2>Last verdicts</h2><table><thead><tr><th>time</th><th>line</th><th>frame</th><th>verdict</th>
<th>score</th><th>threshold</th><th>latency</th><th>note</th></tr></thead><tbody id="verdicts"></tbody></table>
</section></main>
<script>
"use strict";
const KEEP = 50;
let since = 0, updates = 0;
const cards = {};
function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const k in (attrs || {})) e.setAttribute(k, attrs[k]);
  if (text !== undefined) e.textContent = text;
  return e;
}
function num(v, d) { return (v === null || v === undefined) ? "-" : Number(v).toFixed(d); }
function card(line) {
  if (cards[line]) return cards[line];
  const box = el("section", {"class": "line", "id": "line-" + line});
  const info = el("div"); const h = el("h2", {}, line); info.appendChild(h);
  const kv = el("div", {"class": "kv"}); info.appendChild(kv);
  const counts = el("div", {"class": "counts"}); info.appendChild(counts);
  const ng = el("div", {"class": "ng"});
  ng.appendChild(el("div", {"class": "ngcap"}, "no NG frame yet"));
  box.appendChild(info); box.appendChild(ng);
  document.getElementById("lines").appendChild(box);
  cards[line] = {kv: kv, counts: counts, ng: ng, frame: null};
  return cards[line];
}
function render(data) {
  if (data.seq < since) { since = 0; return; }  // the daemon restarted: start over
  for (const L of data.lines) {
    const c = card(L.line), s = L.status;
    c.kv.replaceChildren();
    const rows = [["state", s.state, s.state === "ok" ? "good" : "bad"],
      ["camera", s.camera_connected ? "connected" : "DISCONNECTED", s.camera_connected ? "good" : "bad"],
      ["engine", s.engine_ready ? "ready" : "NOT READY", s.engine_ready ? "good" : "bad"],
      ["backend", s.backend], ["threshold", num(s.threshold, 3)], ["bundle", s.bundle_id]];
    if (s.engine_ms != null && s.latency_budget_ms != null)   // measured at the engine's start; two calls must fit
      rows.push(["engine time", num(s.engine_ms, 1) + " ms of " + num(s.latency_budget_ms, 0) + " ms budget",
                 2 * s.engine_ms > s.latency_budget_ms ? "bad" : "good"]);
    rows.push(["frames", s.frames], ["deadline misses", s.deadline_misses]);
    if (s.failing_safe) rows.push(["failing safe", s.failing_safe, "bad"]);
    if (s.last_error) rows.push(["last error", s.last_error]);
    for (const r of rows) { c.kv.appendChild(el("span", {}, r[0])); c.kv.appendChild(el("span", r[2] ? {"class": r[2]} : {}, String(r[1]))); }
    c.counts.replaceChildren(el("span", {"class": "good", "id": "ok-" + L.line}, "OK " + L.counts.OK),
      document.createTextNode("  "), el("span", {"class": "bad", "id": "ng-" + L.line}, "NG " + L.counts.NG));
    if (L.ng && L.ng.frame_id !== c.frame) {
      c.frame = L.ng.frame_id;
      const img = el("img", {"src": L.ng.url, "alt": "latest NG frame with heatmap", "id": "ngimg-" + L.line});
      img.onload = () => img.setAttribute("data-size", img.naturalWidth + "x" + img.naturalHeight);
      c.ng.replaceChildren(el("div", {"class": "ngcap"}, "latest NG: frame " + L.ng.frame_id + ", score " + num(L.ng.score, 2)), img);
    }
  }
  const body = document.getElementById("verdicts");
  for (const v of data.verdicts) {
    const tr = el("tr", {"class": "v-" + v.verdict});
    const t = new Date(v.acquired_ns / 1e6).toLocaleTimeString();
    const note = v.deadline_missed ? "deadline missed" : (v.error || "");
    const cells = [t, v.line, v.frame_id, v.verdict, num(v.score, 2), num(v.threshold, 2), num(v.latency_ms, 1) + " ms", note];
    cells.forEach((x, i) => tr.appendChild(el("td", i === 3 ? {"class": "v"} : {}, String(x))));
    body.insertBefore(tr, body.firstChild);
  }
  while (body.rows.length > KEEP) body.deleteRow(body.rows.length - 1);
  if (data.verdicts.length) document.body.dataset.updates = String(++updates);  // polls that brought verdicts
  since = data.seq;
}
async function poll() {
  try {
    const r = await fetch("/live/status.json?since=" + since, {cache: "no-store"});
    if (!r.ok) throw new Error("HTTP " + r.status);
    render(await r.json());
    document.getElementById("conn").textContent = "live, updated " + new Date().toLocaleTimeString();
  } catch (e) {
    document.getElementById("conn").textContent = "daemon not reachable (" + e.message + "), retrying";
  }
  setTimeout(poll, 500);
}
poll();
</script></body></html>
"""
