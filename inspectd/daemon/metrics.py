"""Prometheus metrics for the daemon: one CollectorRegistry per daemon, one HTTP endpoint.

Every metric of docs/ARCHITECTURE.md is an attribute, e.g.
`metrics.frames.labels(line="line1", verdict="OK").inc()`. The registry is private (not the
prometheus_client global one) so tests and several daemons in one process never collide.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any, Callable, Iterable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, ProcessCollector, make_wsgi_app

from inspectd.client import LINE_STATES
from inspectd.daemon.live import BIND_HOST_KEY, LOCAL_ADDRESS_KEY
from inspectd.engines.runtime.onnxruntime_backend import usable_cpus
from inspectd.errors import InspectdError

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (.001, .002, .005, .01, .015, .02, .03, .05, .075, .1, .15, .2, .3, .5, 1.0)
# Normalized scores: 0 = mean of good parts, units of good-part std; thresholds sit around 3..10.
SCORE_BUCKETS = (-2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 15.0, 20.0, 50.0, 100.0)

VERDICTS = ("OK", "NG", "SKIP")
DROP_REASONS = ("queue_full", "malformed", "engine_error", "camera_skipped")  # camera_skipped: never acquired
PUBLISH_DROP_REASONS = ("queue_full", "encode_error", "send_error")  # publish.DROP_REASONS


class MetricsBindError(InspectdError):
    """The metrics endpoint cannot be bound: one line naming the cause and the config field to change
    (metrics.port, metrics.host), in the config file when the caller names it (`in_config`)."""

    def __init__(self, host: str, port: int, error: OSError, config: str = "the config") -> None:
        self.host, self.port, self.error = host, port, error
        why = error.strerror or str(error)
        code = error.errno
        if code == errno.EADDRINUSE:
            fix = (f"the port is held by another inspectd (another config or inspectd@ instance) or another "
                   f"program; give metrics.port in {config} a free port")
        elif code == errno.EACCES:
            fix = f"{why} (ports below 1024 need privileges); give metrics.port in {config} a port from 1024 up"
        elif code == errno.EADDRNOTAVAIL or isinstance(error, socket.gaierror):
            fix = (f"{why}; metrics.host in {config} must be an address of this machine (127.0.0.1, 0.0.0.0 or "
                   f"one of its interfaces' addresses)")
        else:
            fix = f"{why}; check metrics.host and metrics.port in {config}"
        super().__init__(f"cannot serve metrics on {host}:{port}: {fix}")

    def in_config(self, config: str) -> "MetricsBindError":
        """The same error, naming the config file the fields are in."""
        return MetricsBindError(self.host, self.port, self.error, config)


@dataclass
class MetricsServer:
    """A running /metrics endpoint; `port` is the bound port (useful when asked for port 0)."""

    host: str
    port: int
    _server: object
    _thread: threading.Thread

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop serving and release the port. Idempotent."""
        self._server.shutdown()  # type: ignore[attr-defined]
        self._server.server_close()  # type: ignore[attr-defined]
        self._thread.join(timeout)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"


class Metrics:
    """All daemon metrics, registered in one registry (its own unless one is given)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.frames = Counter("inspectd_frames_total", "Frames given a verdict", ["line", "verdict"],
                              registry=r)
        self.deadline_misses = Counter("inspectd_deadline_misses_total",
                                       "Frames resolved by the deadline (fail-safe verdict)", ["line"],
                                       registry=r)
        self.dropped_frames = Counter("inspectd_dropped_frames_total", "Frames dropped before a result",
                                      ["line", "reason"], registry=r)
        self.inference_seconds = Histogram("inspectd_inference_seconds", "Backend inference time",
                                           ["line", "backend"], buckets=LATENCY_BUCKETS, registry=r)
        self.end_to_end_seconds = Histogram("inspectd_end_to_end_seconds",
                                            "Acquisition to verdict published", ["line"],
                                            buckets=LATENCY_BUCKETS, registry=r)
        self.anomaly_score = Histogram("inspectd_anomaly_score", "Normalized anomaly score", ["line"],
                                       buckets=SCORE_BUCKETS, registry=r)
        self.threshold = Gauge("inspectd_threshold", "Line threshold on the normalized score", ["line"],
                               registry=r)
        self.camera_connected = Gauge("inspectd_camera_connected", "Camera connected (0/1)", ["line"],
                                      registry=r)
        self.camera_reconnects = Counter("inspectd_camera_reconnects_total", "Camera reconnects",
                                         ["line"], registry=r)
        self.incomplete_frames = Counter("inspectd_incomplete_frames_total",
                                         "Incomplete frames reported by the camera", ["line"], registry=r)
        self.engine_info = Gauge("inspectd_engine_info", "Active backend and bundle (value 1)",
                                 ["line", "backend", "bundle_id"], registry=r)
        self.last_frame_timestamp = Gauge("inspectd_last_frame_timestamp_seconds",
                                          "Unix time of the last acquired frame", ["line"], registry=r)
        self.backend_fallbacks = Counter("inspectd_backend_fallbacks_total",
                                         "Backends skipped when a line opened its engine (unavailable or failed the parity gate)", ["line", "backend"],
                                         registry=r)
        self.engine_errors = Counter("inspectd_engine_errors_total", "Engine errors", ["line"], registry=r)
        # 1: the camera waits for an external trigger, so no frames while no parts come is normal
        # (the no-frames alert leaves such lines out).
        self.source_triggered = Gauge("inspectd_source_triggered", "Camera in external trigger mode (0/1)",
                                      ["line"], registry=r)
        self.engine_ready = Gauge("inspectd_engine_ready",
                                  "The line's engine is warm and answers (0: starting, failed to open, stalled)",
                                  ["line"], registry=r)
        self.archive_enabled = Gauge("inspectd_archive_enabled", "NG archive enabled (0/1)", ["line"],
                                     registry=r)
        self.archive_errors = Counter("inspectd_archive_errors_total", "NG archive errors", ["line"],
                                      registry=r)
        self.archive_dropped = Counter("inspectd_archive_dropped_total",
                                       "NG archive items dropped (writer queue full)", ["line"], registry=r)
        self.score_drift = Gauge("inspectd_score_drift",
                                 "KS statistic of recent scores vs calibration good scores", ["line"],
                                 registry=r)
        self.queue_depth = Gauge("inspectd_queue_depth", "Frames waiting for inference", ["line"], registry=r)
        # Beside the budget, so a dashboard (and an alert) compares the two without the config.
        self.engine_seconds_at_start = Gauge("inspectd_engine_seconds_at_start",
                                             "The active engine's time per frame, measured when it was warmed "
                                             "up (median of a few calls)", ["line"], registry=r)
        self.latency_budget = Gauge("inspectd_latency_budget_seconds", "The line's latency budget", ["line"],
                                    registry=r)
        self.publish_dropped = Counter("inspectd_publish_dropped_total",
                                       "Verdicts/heatmaps the publisher did not send (a seq gap for subscribers)",
                                       ["line", "topic", "reason"], registry=r)
        self.up = Gauge("inspectd_up", "1 while the daemon runs", registry=r)
        # The daemon's CPU (process_cpu_seconds_total, with its memory and file descriptors) against
        # the CPUs it may use: an engine's latency hides what a part costs the box, and a line that
        # needs half of it loses parts as soon as anything else runs (benchmarks/RESULTS.md §29).
        ProcessCollector(registry=r)
        self.usable_cpus = Gauge("inspectd_usable_cpus", "CPUs this process may run on (its affinity mask)",
                                 registry=r)
        self.usable_cpus.set_function(usable_cpus)
        # Recipes, shadow bundles, audit (daemon/recipes.py, daemon/shadow.py, daemon/audit.py).
        self.recipe_info = Gauge("inspectd_recipe_info", "Active recipe of the line (value 1)", ["line", "recipe"],
                                 registry=r)
        self.shadow_dropped = Counter("inspectd_shadow_dropped_total",
                                      "Frames the shadow bundle did not score (its queue was full)", ["line"],
                                      registry=r)
        self.shadow_agreement = Counter("inspectd_shadow_agreement_total",
                                        "Shadow verdicts that agree / disagree with the active verdict",
                                        ["line", "agree"], registry=r)
        self.shadow_correlation = Gauge("inspectd_shadow_score_correlation",
                                        "Pearson correlation of active vs shadow scores over the last N frames",
                                        ["line"], registry=r)
        self.interpreter_stall_seconds = Histogram(
            "inspectd_interpreter_stall_seconds",
            "How late a thread sleeping 10 ms woke: time no Python thread of the daemon could run "
            "(a C call keeping the GIL, a CPU taken by other processes)", buckets=LATENCY_BUCKETS, registry=r)
        # The heartbeat's status.state, for a dashboard's state-over-time panel: one series per state,
        # 1 for the current one. Each cause of a not-ok state has its own alert (camera down, engine
        # not ready, deadline misses, queue full, malformed frames).
        self.line_state = Enum("inspectd_line_state", "The line's state, as its heartbeat says it (1 = current)",
                               ["line"], states=list(LINE_STATES), registry=r)
        self.config_generation = Gauge("inspectd_config_generation",
                                       "Generation of what decides verdicts (+1 per audited change)", registry=r)
        self._engine_lock = threading.Lock()
        self._engine_labels: dict[str, tuple[str, str]] = {}
        self._recipe_labels: dict[str, str] = {}

    def init_line(self, line: str, threshold: float | None = None, latency_budget_s: float | None = None) -> None:
        """Create the line's series at zero so dashboards and alerts see them before the first event."""
        for verdict in VERDICTS:
            self.frames.labels(line=line, verdict=verdict)
        for reason in DROP_REASONS:
            self.dropped_frames.labels(line=line, reason=reason)
        for counter in (self.deadline_misses, self.camera_reconnects, self.incomplete_frames,
                        self.engine_errors, self.archive_errors, self.archive_dropped):
            counter.labels(line=line)
        self.end_to_end_seconds.labels(line=line)
        self.anomaly_score.labels(line=line)
        self.queue_depth.labels(line=line).set(0)
        self.camera_connected.labels(line=line).set(0)
        for topic in ("verdict", "heatmap"):
            for reason in PUBLISH_DROP_REASONS:
                self.publish_dropped.labels(line=line, topic=topic, reason=reason)
        self.engine_ready.labels(line=line).set(0)
        self.line_state.labels(line=line).state("starting")
        if threshold is not None:
            self.threshold.labels(line=line).set(threshold)
        if latency_budget_s is not None:
            self.latency_budget.labels(line=line).set(latency_budget_s)

    def set_engine(self, line: str, backend: str, bundle_id: str) -> None:
        """Point inspectd_engine_info for `line` at (backend, bundle_id); the old series is removed so
        there is exactly one active series per line (a fallback or bundle reload replaces it)."""
        with self._engine_lock:
            old = self._engine_labels.get(line)
            if old is not None and old != (backend, bundle_id):
                try:
                    self.engine_info.remove(line, *old)
                except KeyError:
                    pass
            self.engine_info.labels(line=line, backend=backend, bundle_id=bundle_id).set(1)
            self._engine_labels[line] = (backend, bundle_id)

    def clear_drift(self, line: str) -> None:
        """No drift figure for the line until its (new) reference has enough scores: a stale one
        would describe another recipe or calibration."""
        try:
            self.score_drift.remove(line)
        except KeyError:
            pass

    def set_recipe(self, line: str, recipe: str) -> None:
        """Exactly one inspectd_recipe_info series per line: the active recipe."""
        with self._engine_lock:
            old = self._recipe_labels.get(line)
            if old is not None and old != recipe:
                try:
                    self.recipe_info.remove(line, old)
                except KeyError:
                    pass
            self.recipe_info.labels(line=line, recipe=recipe).set(1)
            self._recipe_labels[line] = recipe

    def observe_verdict(self, line: str, verdict: str, score: float | None, deadline_missed: bool) -> None:
        """Count one published verdict (helper for the pipeline)."""
        self.frames.labels(line=line, verdict=verdict).inc()
        if deadline_missed:
            self.deadline_misses.labels(line=line).inc()
        if score is not None:
            self.anomaly_score.labels(line=line).observe(score)

    def serve(self, host: str | None = None, port: int | None = None, live: Any | None = None) -> MetricsServer:
        """Start the /metrics HTTP endpoint in a daemon thread. Port 0 picks a free port (see
        `.port` of the result). Raises MetricsBindError when the address cannot be bound. Host and
        port default to the config schema's (`metrics:` in daemon/config.py), the one place
        defaults live. `live` (a daemon/live.py LiveView) adds the read-only live view at / and
        /live/... on the same server; every other path serves the metrics, as before."""
        from inspectd.daemon.config import MetricsConfig

        defaults = MetricsConfig()
        host = defaults.host if host is None else host
        port = defaults.port if port is None else port
        try:
            server, thread = _start_server(host, port, _app(make_wsgi_app(self.registry), live))
        except OSError as exc:
            raise MetricsBindError(host, port, exc) from exc
        bound_port = int(server.server_address[1])
        log.info("metrics on http://%s:%d/metrics", host, bound_port)
        return MetricsServer(host=host, port=bound_port, _server=server, _thread=thread)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    def get_environ(self) -> dict[str, Any]:
        """The WSGI environ plus where this server serves, for the live view's Host check
        (daemon/live.py `host_allowed`: DNS rebinding). /metrics itself does not check Host:
        Prometheus sends its target's host:port, i.e. whatever name or address its scrape config
        or service discovery gives this box (a DNS name, a NAT or proxy address), which this server
        cannot know; a check there would stop scrapes, and with them the alerts, in a way nobody
        sees on the box. What /metrics shows (counters, states, ids) has no part images or verdict
        details; the live view has both, and a browser is what opens it."""
        env = super().get_environ()
        env[BIND_HOST_KEY] = getattr(self.server, "bind_host", "")
        try:
            env[LOCAL_ADDRESS_KEY] = str(self.connection.getsockname()[0])
        except (OSError, IndexError, TypeError):
            env[LOCAL_ADDRESS_KEY] = ""
        return env


def _app(metrics_app: Callable[..., Iterable[bytes]], live: Any | None) -> Callable[..., Iterable[bytes]]:
    if live is None:
        return metrics_app

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        answer = live.route(environ, start_response)
        return metrics_app(environ, start_response) if answer is None else answer

    return app


def _start_server(host: str, port: int, app: Callable[..., Iterable[bytes]]) -> tuple[WSGIServer, threading.Thread]:
    """A threading WSGI server (as prometheus_client's start_http_server) for `app`, in a daemon thread."""
    family = socket.AF_INET
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    except socket.gaierror:
        pass  # make_server reports the bad address
    server_class = type("_MetricsServer", (_Server,), {"address_family": family})
    httpd = make_server(host, port, app, server_class, handler_class=_QuietHandler)
    httpd.bind_host = host  # type: ignore[attr-defined] # metrics.host as configured: the live view's Host check
    thread = threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return httpd, thread
