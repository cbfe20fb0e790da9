"""`inspectd run --config lines.yaml`: metrics endpoint, publisher, one pipeline per line, systemd
notifications, and the signals (SIGTERM/SIGINT stop cleanly, SIGHUP reloads thresholds)."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

from inspectd.daemon.config import (DaemonConfig, LineConfig, ThresholdFile, config_warnings, load_config,
                                    summary)
from inspectd.errors import ConfigError
from inspectd.daemon.frame import Verdict
from inspectd.daemon.archive import NgArchive
from inspectd.daemon.line import LineSettings, LineThreshold
from inspectd.daemon.metrics import Metrics, MetricsServer
from inspectd.daemon.pipeline import LinePipeline
from inspectd.daemon.publish import CurveServerKeys, Publisher
from inspectd.daemon.systemd import SystemdNotifier

log = logging.getLogger("inspectd.run")

STOP_BUDGET_S = 4.0          # SIGTERM -> exit within 5 s, with a margin for the interpreter exit
ENGINE_READY_TIMEOUT_S = 120.0
SOURCE_READY_TIMEOUT_S = 10.0


def line_settings(cfg: LineConfig) -> LineSettings:
    src = cfg.source
    low, high = getattr(src, "reconnect_backoff_s", (0.5, 10.0))
    return LineSettings(line=cfg.id, latency_budget_ms=cfg.latency_budget_ms,
                        on_deadline_miss=cfg.on_deadline_miss, roi=cfg.roi,
                        backend_preference=tuple(cfg.backends), backend_options=dict(cfg.backend_options),
                        heatmap_mode=cfg.heatmap.publish, archive_save=cfg.archive.save,
                        queue_size=cfg.queue_size,
                        backpressure=src.type == "replay" and getattr(src, "fps", None) is None,
                        # A camera read waits up to its fetch timeout: that is how fast a lost camera shows.
                        read_timeout_s=getattr(src, "fetch_timeout_s", LineSettings.read_timeout_s),
                        reconnect_min_s=low, reconnect_max_s=high)


def line_threshold(cfg: LineConfig) -> LineThreshold:
    if isinstance(cfg.threshold, ThresholdFile):
        return LineThreshold(cfg.id, path=cfg.threshold.file)
    return LineThreshold(cfg.id, value=float(cfg.threshold))


def _curve_keys(config: DaemonConfig) -> CurveServerKeys | None:
    """The server key pair (its file must be private: mode 0600) and the checked client allow-list."""
    curve = config.zmq.curve
    if curve is None:
        return None
    from inspectd.keys import allowed_client_keys, load_secret_key_file

    public, secret = load_secret_key_file(curve.server_secret_key_file, "zmq.curve.server_secret_key_file")
    allowed = None
    if curve.allowed_clients_dir is not None:
        n = len(allowed_client_keys(curve.allowed_clients_dir, "zmq.curve.allowed_clients_dir"))
        log.info("CURVE: %d client key%s allowed (%s)", n, "" if n == 1 else "s", curve.allowed_clients_dir)
        allowed = str(curve.allowed_clients_dir)
    else:
        log.warning("CURVE without allowed_clients_dir: encrypted, but any client that knows the server's "
                    "public key may subscribe")
    return CurveServerKeys(public_key=public, secret_key=secret, allowed_clients_dir=allowed)


class Daemon:
    """All lines of one config, their publisher and metrics. `start()`, `reload_thresholds()`, `stop()`."""

    def __init__(self, config: DaemonConfig, notifier: SystemdNotifier | None = None) -> None:
        self.config = config
        self.notifier = notifier or SystemdNotifier()
        self.metrics = Metrics()
        self.metrics_server: MetricsServer | None = None
        self.publisher: Publisher | None = None
        self.lines: dict[str, LinePipeline] = {}
        self.archives: list[NgArchive] = []
        self._stop_supervisor = threading.Event()
        self._supervisor = threading.Thread(target=self._supervise, name="supervisor", daemon=True)
        self._last_status = ""

    # ---- start -----------------------------------------------------------------------------------

    def build(self) -> None:
        """Everything that can fail on bad input, before any thread starts (errors are one line)."""
        from inspectd.daemon.sources import make_source
        from inspectd.engines.bundle import check_line_roi, load_bundle

        curve = _curve_keys(self.config)
        for cfg in self.config.lines:
            settings = line_settings(cfg)
            threshold = line_threshold(cfg)
            bundle = load_bundle(cfg.bundle)
            # Same pixels as training: a line ROI other than the bundle's is refused (none: the bundle's applies).
            check_line_roi(cfg.roi, bundle.roi, f"lines[{self.config.lines.index(cfg)}].roi (line {cfg.id})",
                           bundle.path)
            source = make_source(cfg)
            drift = self._drift_for(cfg)
            archive = None
            self.metrics.archive_enabled.labels(line=cfg.id).set(0)
            trigger = getattr(cfg.source, "trigger", None)
            self.metrics.source_triggered.labels(line=cfg.id).set(int(trigger is not None and trigger.mode == "On"))
            if cfg.archive.enabled:
                archive = NgArchive(cfg.archive.dir, cfg.archive.quota_mb * 1024 * 1024, cfg.id,
                                    metrics=self.metrics)
                self.archives.append(archive)
            self.lines[cfg.id] = LinePipeline(settings, source, bundle, threshold,
                                              emit=self._emitter(cfg), metrics=self.metrics,
                                              archive=archive, drift=drift)
        z = self.config.zmq
        self.publisher = Publisher(z.endpoint, sndhwm=z.sndhwm, linger_ms=z.linger_ms,
                                   heartbeat_interval_s=self.config.heartbeat_interval_s, curve=curve,
                                   on_sent=self._on_sent, on_dropped=self._on_dropped)
        for line_id in self.lines:
            self.publisher.register_line(line_id)

    def start(self, stop_requested: threading.Event | None = None,
              before_lines: Any | None = None) -> bool:
        """Start serving; returns False if a stop was requested during warm-up.

        `before_lines()`, if given, runs once the publisher is bound and before any line acquires
        (an embedding program can wait there until its subscriber is connected)."""
        stop_requested = stop_requested or threading.Event()
        m = self.config.metrics
        self.metrics_server = self.metrics.serve(m.host, m.port)
        if self.publisher is None:
            raise RuntimeError("Daemon.build() must run before start()")
        self.publisher.start()
        if before_lines is not None:
            before_lines()
        for archive in self.archives:
            archive.start()
        for pipeline in self.lines.values():
            self.publisher.set_line_status(pipeline.line, pipeline.status())
            pipeline.start()
        log.info("started %s; publishing on %s", summary(self.config), self.publisher.bound_endpoint)
        self.notifier.status("warming up engines")
        # READY only after every engine is warm; a camera that is not there yet does not block
        # READY for long: its line reports the camera down and keeps reconnecting.
        if not self._wait(lambda p: p.engine_ready.is_set(), ENGINE_READY_TIMEOUT_S, stop_requested):
            return False
        self._wait(lambda p: p.source_ready.is_set(), SOURCE_READY_TIMEOUT_S, stop_requested)
        if stop_requested.is_set():
            return False
        self.metrics.up.set(1)
        self._supervisor.start()
        status = self.status_line()
        self.notifier.ready(status)
        log.info("ready: %s", status)
        return True

    def _wait(self, cond: Any, timeout_s: float, stop_requested: threading.Event) -> bool:
        end = time.monotonic() + timeout_s
        while not all(cond(p) for p in self.lines.values()):
            if stop_requested.wait(0.05):
                return False
            if time.monotonic() > end:
                pending = [p.line for p in self.lines.values() if not cond(p)]
                log.warning("not ready after %.0f s: %s", timeout_s, ", ".join(pending))
                return True
        return True

    def _drift_for(self, cfg: LineConfig) -> Any:
        if not isinstance(cfg.threshold, ThresholdFile):
            return None
        from inspectd.stats import DriftWatch

        try:
            return DriftWatch.from_calibration(cfg.threshold.file)
        except Exception as exc:  # drift is a diagnostic: its absence never stops a line
            log.info("line %s: no score drift metric (%s)", cfg.id, exc)
            return None

    def _emitter(self, cfg: LineConfig) -> Any:
        encoding = cfg.heatmap.encoding
        size = (cfg.heatmap.width, cfg.heatmap.height)
        mode = cfg.heatmap.publish

        def emit(verdict: Verdict) -> None:
            publisher = self.publisher
            if publisher is None:
                return
            publisher.publish_verdict(verdict)
            # The pipeline may make a heatmap for the archive only; publish per the line's setting.
            if verdict.heatmap is not None and (mode == "all" or (mode == "ng" and verdict.verdict == "NG")):
                publisher.publish_heatmap(verdict, encoding=encoding, size=size)
        return emit

    def _on_sent(self, topic: str, header: dict) -> None:
        if topic.startswith("verdict."):
            latency_s = (header["published_ns"] - header["acquired_ns"]) / 1e9
            self.metrics.end_to_end_seconds.labels(line=header["line"]).observe(max(latency_s, 0.0))

    def _on_dropped(self, line: str, kind: str, reason: str) -> None:
        # A verdict/heatmap the publisher could not send (subscribers also see a seq gap).
        self.metrics.publish_dropped.labels(line=line, topic=kind, reason=reason).inc()

    # ---- running ---------------------------------------------------------------------------------

    def status_line(self) -> str:
        return "; ".join(p.summary() for p in self.lines.values())

    def healthy(self) -> bool:
        return all(p.healthy() for p in self.lines.values())

    def _supervise(self) -> None:
        """Heartbeat status, STATUS=, and WATCHDOG=1 only while every line's frames flow or its
        source is healthily waiting (a stuck worker or a lost camera stops the pings)."""
        interval = min(self.config.heartbeat_interval_s, 1.0)
        wd = self.notifier.watchdog_interval_s()
        if wd is not None:
            interval = min(interval, wd)
        while not self._stop_supervisor.wait(interval):
            try:
                for pipeline in self.lines.values():
                    if self.publisher is not None:
                        self.publisher.set_line_status(pipeline.line, pipeline.status())
                if wd is not None and self.healthy():
                    self.notifier.watchdog()
                status = self.status_line()
                if status != self._last_status:
                    self.notifier.status(status)
                    self._last_status = status
            except Exception:
                log.exception("supervisor tick failed")

    def reload_thresholds(self, config_path: str | Path | None = None) -> None:
        """SIGHUP. With `config_path`, each line's threshold spec is re-read from the config file
        (`inspectd calibrate` may have repointed it), validated and applied; without, the current
        threshold files are re-read. A config or threshold file that does not load keeps the old
        thresholds and logs one line. Only thresholds change; anything else needs a restart."""
        log.info("SIGHUP: reloading thresholds")
        fresh: dict[str, LineConfig] = {}
        if config_path is not None:
            try:
                fresh = {cfg.id: cfg for cfg in load_config(config_path).lines}
            except ConfigError as exc:
                log.error("threshold reload failed, keeping the current thresholds: %s", exc)
                return
        for pipeline in self.lines.values():
            cfg = fresh.get(pipeline.line)
            if config_path is not None and cfg is None:
                log.error("line %s: threshold reload failed, keeping %.4g: the line is no longer in %s",
                          pipeline.line, pipeline.threshold.value, config_path)
                continue
            spec: float | Path | None = None
            if cfg is not None:
                spec = cfg.threshold.file if isinstance(cfg.threshold, ThresholdFile) else float(cfg.threshold)
            before = pipeline.threshold.path
            if pipeline.threshold.reload(spec) or pipeline.threshold.path != before:
                # The drift reference is the calibration's good scores: follow the new file.
                pipeline.drift = self._drift_for(cfg) if cfg is not None else pipeline.drift
            self.metrics.threshold.labels(line=pipeline.line).set(pipeline.threshold.value)

    # ---- stop ------------------------------------------------------------------------------------

    def stop(self, budget_s: float = STOP_BUDGET_S) -> None:
        """Stop acquisition, resolve in-flight frames (result or deadline), publish them, close."""
        end = time.monotonic() + budget_s
        self.notifier.stopping()
        self._stop_supervisor.set()
        for pipeline in self.lines.values():
            pipeline.request_stop()
        for pipeline in self.lines.values():
            pipeline.stop(timeout_s=max(0.2, end - time.monotonic() - 0.5))
        if self._supervisor.is_alive():
            self._supervisor.join(1.0)
        self.metrics.up.set(0)
        for archive in self.archives:
            if not archive.stop(timeout=max(0.1, min(1.0, end - time.monotonic() - 0.5))):
                log.warning("NG archive %s: records still queued at exit were not written", archive.line)
        if self.publisher is not None:
            # Verdicts resolved above are queued before the stop marker: they go out first.
            if not self.publisher.stop(timeout=max(0.2, end - time.monotonic())):
                log.warning("publisher did not stop in time")
        if self.metrics_server is not None:
            self.metrics_server.shutdown(timeout=1.0)
        self.notifier.close()
        log.info("stopped")


def run(config_path: str | Path) -> int:
    config = load_config(config_path, validate_paths=True)
    logging.getLogger().setLevel(config.log_level)
    for warning in config_warnings(config, str(config_path)):
        log.warning("%s", warning)
    stop_requested = threading.Event()
    reload_requested = threading.Event()

    def on_stop(signum: int, _frame: Any) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        stop_requested.set()

    def on_hup(_signum: int, _frame: Any) -> None:
        reload_requested.set()

    # Handlers only set flags; the main thread does the work (a handler may interrupt anything).
    old = {s: signal.signal(s, h) for s, h in
           ((signal.SIGTERM, on_stop), (signal.SIGINT, on_stop), (signal.SIGHUP, on_hup))}
    daemon = Daemon(config)
    try:
        daemon.build()
        try:
            daemon.start(stop_requested)
            while not stop_requested.wait(0.1):
                if reload_requested.is_set():
                    reload_requested.clear()
                    daemon.reload_thresholds(config_path)
        finally:
            daemon.stop()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    return run(args.config)
