"""`inspectd run --config lines.yaml`: metrics endpoint, publisher, one pipeline per line, systemd
notifications, and the signals (SIGTERM/SIGINT stop cleanly, SIGHUP reloads thresholds)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from inspectd.daemon.config import (DaemonConfig, LineConfig, config_warnings, load_config, restart_changes,
                                    summary)
from inspectd.errors import ConfigError, InspectdError
from inspectd.daemon.audit import AuditLog, audit_path, local_who
from inspectd.daemon.control import ControlServer, answer_deadline, socket_path
from inspectd.daemon.recipes import LineRecipes
from inspectd.daemon.archive import NgArchive
from inspectd.daemon.line import LineSettings, LineThreshold, options_dict
from inspectd.daemon.live import LiveView
from inspectd.daemon.metrics import Metrics, MetricsBindError, MetricsServer
from inspectd.daemon.pipeline import LinePipeline
from inspectd.daemon.publish import CurveServerKeys, Publisher, PublisherBindError
from inspectd.daemon.sinks import ArchiveSink, DriftSink, MetricsSink, PublisherSink, Sinks
from inspectd.daemon.stallwatch import StallWatch
from inspectd.daemon.systemd import SystemdNotifier

log = logging.getLogger("inspectd.run")

STOP_BUDGET_S = 4.0          # SIGTERM -> exit within 5 s, with a margin for the interpreter exit
ENGINE_READY_TIMEOUT_S = 120.0
# READY waits this long for cameras at most: a late camera is a line in state "blind" (heartbeat,
# metric, alert), not a service that is not up.
SOURCE_READY_TIMEOUT_S = 3.0
# Watchdog: the publisher must send a heartbeat at least this often (in heartbeat intervals).
PUBLISHER_STALE_INTERVALS = 5
PUBLISHER_STALE_MIN_S = 5.0


def line_settings(cfg: LineConfig, ort_lines: int = 1) -> LineSettings:
    """The pipeline's settings, from the validated config only. ONNX Runtime lines share the CPUs
    this process may run on: without an explicit `intra_op_threads` each of the `ort_lines` gets
    an equal share (see onnxruntime_backend.default_intra_op_threads)."""
    options = options_dict(cfg.backend_options)
    if "onnxruntime" in cfg.backends:
        from inspectd.engines.runtime.onnxruntime_backend import default_intra_op_threads

        ort = dict(options.get("onnxruntime", {}))
        if not ort.get("intra_op_threads") and not ort.get("threads"):
            ort["intra_op_threads"] = default_intra_op_threads(ort_lines)
        options["onnxruntime"] = ort
    return LineSettings.from_config(cfg, backend_options=options)


def ort_lines(lines: Sequence[LineConfig]) -> int:
    """How many lines share ONNX Runtime's CPU budget (line_settings)."""
    return sum("onnxruntime" in c.backends for c in lines)


def _daemon_answers(path: Path) -> bool:
    """A running daemon answers on the control socket at `path` (False: none there, or a stale one)."""
    from inspectd.daemon.control import request

    if not path.exists():
        return False
    try:
        request(path, {"op": "ping"}, timeout_s=1.0)
    except InspectdError:
        return False
    return True


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
        self.stall_watch = StallWatch(self.metrics.interpreter_stall_seconds.observe)
        # The read-only live page on the metrics endpoint (daemon/live.py), unless metrics.live is off.
        self.live: LiveView | None = LiveView(host_names=config.metrics.live_hosts) if config.metrics.live else None
        self.publisher: Publisher | None = None
        self.lines: dict[str, LinePipeline] = {}
        self.recipes: dict[str, LineRecipes] = {}
        self.audit = AuditLog(audit_path(config.state_dir))
        self.control: ControlServer | None = None
        self.archives: list[NgArchive] = []
        self._stop_supervisor = threading.Event()
        self._supervisor = threading.Thread(target=self._supervise, name="supervisor", daemon=True)
        self._last_status = ""
        self._was_healthy = True
        self._ready = threading.Event()        # READY sent: the watchdog pings from then on
        self._publisher_beats = (-1, time.monotonic())  # (heartbeats sent, when that count last moved)

    # ---- start -----------------------------------------------------------------------------------

    def build(self) -> None:
        """Everything that can fail on bad input, before any thread starts (errors are one line)."""
        from inspectd.daemon.sources import make_source

        self._refuse_a_shared_state_dir()
        curve = _curve_keys(self.config)
        n_ort = ort_lines(self.config.lines)
        z = self.config.zmq
        self.publisher = Publisher(z.endpoint, sndhwm=z.sndhwm, linger_ms=z.linger_ms,
                                   heartbeat_interval_s=self.config.heartbeat_interval_s, curve=curve,
                                   on_sent=self._on_sent, on_dropped=self._on_dropped)
        for cfg in self.config.lines:
            # The recipe active at start: the config's `recipe` (default: the line's own bundle and
            # threshold) unless a switch/promote persisted in state_dir says otherwise (daemon/recipes.py).
            recipes = LineRecipes(cfg, self.config.state_dir, self._record_change)
            try:
                spec, bundle, threshold = self._open_initial(cfg, recipes)
            except (InspectdError, OSError) as exc:
                # What a switch or promote persisted can go stale (the candidate's folder cleaned up):
                # that line judges with its config's recipe; it never keeps every other line from starting.
                if not recipes.fall_back_to_config(exc):
                    raise
                spec, bundle, threshold = self._open_initial(cfg, recipes)
            settings = dataclasses.replace(line_settings(cfg, n_ort), roi=spec.roi)
            source = make_source(cfg)
            archive = None
            self.metrics.archive_enabled.labels(line=cfg.id).set(0)
            trigger = getattr(cfg.source, "trigger", None)
            self.metrics.source_triggered.labels(line=cfg.id).set(int(trigger is not None and trigger.mode == "On"))
            if cfg.archive.enabled:
                archive = NgArchive(cfg.archive.dir, cfg.archive.quota_mb * 1024 * 1024, cfg.id,
                                    metrics=self.metrics, queue_bytes=cfg.archive.queue_mb * 1024 * 1024)
                self.archives.append(archive)
            sinks = Sinks()
            pipeline = LinePipeline(settings, source, bundle, threshold, sinks, metrics=self.metrics,
                                    recipe=spec.name)
            self._wire_sinks(sinks, cfg, pipeline, archive)
            self.lines[cfg.id] = pipeline
            recipes.attach(pipeline, self.publisher, self.metrics)
            self.recipes[cfg.id] = recipes
        self.metrics.config_generation.set(self._audit_generation())
        for line_id in self.lines:
            self.publisher.register_line(line_id)

    def _open_initial(self, cfg: LineConfig, recipes: LineRecipes) -> tuple[Any, Any, LineThreshold]:
        """The line's recipe at start: its spec, loaded bundle and threshold (ROI checked)."""
        from inspectd.engines.bundle import check_line_roi, load_bundle

        spec = recipes.initial
        bundle = load_bundle(spec.bundle)
        threshold = LineThreshold.from_config(cfg.id, spec.threshold, bundle.bundle_id)
        # Same pixels as training: a line ROI other than the bundle's is refused (none: the bundle's applies).
        named = f", recipe {spec.name}" if cfg.recipes else ""  # no recipes: the line's own bundle
        check_line_roi(spec.roi, bundle.roi, f"lines[{self.config.lines.index(cfg)}].roi (line {cfg.id}{named})",
                       bundle.path)
        return spec, bundle, threshold

    def start(self, stop_requested: threading.Event | None = None,
              before_lines: Any | None = None) -> bool:
        """Start serving; returns False if a stop was requested during warm-up.

        `before_lines()`, if given, runs once the publisher is bound and before any line acquires
        (an embedding program can wait there until its subscriber is connected)."""
        stop_requested = stop_requested or threading.Event()
        if self.publisher is None:
            raise RuntimeError("Daemon.build() must run before start()")
        # The two endpoints first, each refused in one line (held by another daemon) before anything
        # else has started or logged.
        self.publisher.start()
        m = self.config.metrics
        self.metrics_server = self.metrics.serve(m.host, m.port, live=self.live)
        self.stall_watch.start()
        if self.live is not None:
            log.info("live view on http://%s:%d/", m.host, self.metrics_server.port)
        if before_lines is not None:
            before_lines()
        for archive in self.archives:
            archive.start()
        for pipeline in self.lines.values():
            self._report_status(pipeline)
            pipeline.start()
        for recipes in self.recipes.values():
            recipes.start_background()   # preloaded recipes and the shadow bundle, after the line's engine
        self._start_control()
        log.info("started %s; publishing on %s", summary(self.config), self.publisher.bound_endpoint)
        self.notifier.status("warming up engines")
        # Heartbeat status from now on (state "starting"); watchdog pings only once READY is sent.
        self._supervisor.start()
        # READY once every engine is warm or has failed (a failed engine is a line that is not
        # ready: status, metric, alert); a camera that is not there yet does not block READY for
        # long: its line reports the camera down ("blind") and keeps reconnecting.
        if not self._wait(lambda p: p.engine_resolved.is_set(), ENGINE_READY_TIMEOUT_S, stop_requested):
            return False
        self._wait(lambda p: p.source_ready.is_set(), SOURCE_READY_TIMEOUT_S, stop_requested)
        if stop_requested.is_set():
            return False
        self.metrics.up.set(1)
        status = self.status_line()
        self.notifier.ready(status)
        self._ready.set()  # pings only after READY=1 went out
        log.info("ready: %s", status)
        return True

    # ---- control socket, recipes, audit ---------------------------------------------------------------

    def _refuse_a_shared_state_dir(self) -> None:
        """Another running daemon on this state_dir (its control socket answers): refused, since the
        control socket, recipes.json and calibrations there are one daemon's (requests for our lines
        would reach it, and switch its line of the same id)."""
        path = socket_path(self.config.state_dir)
        if not _daemon_answers(path):
            return  # none, or a stale socket of a daemon that is gone: ours replaces it
        raise ConfigError(f"state_dir {self.config.state_dir}: another inspectd daemon runs on it (its control "
                          f"socket {path} answers); give each config (each inspectd@ instance) a state_dir of its own")

    def _start_control(self) -> None:
        """The local control socket (daemon/control.py). A daemon without it still inspects: the
        problem is logged, recipes just cannot be switched at run time."""
        path = socket_path(self.config.state_dir)
        try:
            if _daemon_answers(path):  # started since build() checked: never steal a live daemon's socket
                log.error("control socket %s answers (another daemon on this state_dir?): not replacing it; "
                          "recipe/promote/rollback requests go to that daemon", path)
                return
            server = ControlServer(path, self._control_request)
            server.start()
            self.control = server
        except (InspectdError, OSError) as exc:
            log.error("no control socket (recipe/promote/rollback unavailable): %s", exc)

    def _record_change(self, line: str | None, what: str, old: Any, new: Any, who: dict[str, Any],
                       reason: str | None = None) -> int:
        """Audit one change of what decides verdicts; the generation metric follows."""
        try:
            record = self.audit.append(line, what, old, new, who, reason)
        except (InspectdError, OSError) as exc:
            log.error("audit log %s: record not written (%s): %s %s -> %s", self.audit.path, exc, what, old, new)
            return self._audit_generation()
        log.info("audit: generation %d: line %s %s by %s", record["generation"], line, what, who.get("user"))
        self.metrics.config_generation.set(record["generation"])
        return record["generation"]

    def _audit_generation(self) -> int:
        """The audit log's generation; an unreadable log is logged, never a reason to stop inspecting."""
        try:
            return self.audit.generation()
        except InspectdError as exc:
            log.error("audit log: %s (config generation reported as 0)", exc)
            return 0

    def _control_request(self, req: dict, who: dict) -> dict:
        op = req.get("op")
        if op == "ping":
            return {"pong": True}
        if op == "lines":
            return {"lines": list(self.recipes)}
        line = req.get("line")
        recipes = self.recipes.get(line) if isinstance(line, str) else None
        if recipes is None:
            raise InspectdError(f"no line {line!r} (lines: {', '.join(self.recipes)})")
        reason = req.get("reason") if isinstance(req.get("reason"), str) else None
        deadline = answer_deadline(req, req.get("_received_mono", time.monotonic()))
        if op == "list":
            return recipes.list()
        if op == "recipe":
            name = req.get("name")
            if not isinstance(name, str) or not name:
                raise InspectdError("recipe: a recipe name is required")
            return recipes.switch(name, who, reason, deadline=deadline)
        if op == "shadow":
            return recipes.set_shadow(req.get("bundle"), req.get("threshold_file") or req.get("threshold"),
                                      who, reason, deadline=deadline)
        if op == "promote":
            return recipes.promote(who, reason, deadline=deadline)
        if op == "rollback":
            return recipes.rollback(who, reason, deadline=deadline)
        raise InspectdError(f"unknown op {op!r} (list, recipe, shadow, promote, rollback)")

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

    def _wire_sinks(self, sinks: Sinks, cfg: LineConfig, pipeline: LinePipeline, archive: NgArchive | None) -> None:
        """Where a line's verdicts go, in one place: published first (the reject signal), then
        counted, archived and fed to the drift watch. A failing sink never starves the others."""
        h = cfg.heatmap
        sinks.add("publisher", PublisherSink(self.publisher, h.publish, h.encoding, (h.width, h.height)))
        sinks.add("metrics", MetricsSink(self.metrics))
        if archive is not None:
            sinks.add("archive", ArchiveSink(archive, cfg.archive.save))
        # The drift watch of the recipe that judged the verdict (its calibration file's good scores).
        sinks.add("drift", DriftSink(pipeline.drift_for, self.metrics))
        # Counters and references only (the latest NG frame and its map); rendered on request.
        if self.live is not None:
            sinks.add("live", self.live.add_line(cfg.id, pipeline.status, lambda: pipeline.bundle))

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
        """The watchdog's question: do the process's loops make progress? Every line's acquisition
        and inference loops, and the publisher's heartbeat loop. Camera and engine state are not
        part of it: they are reported (heartbeat status, metrics, alerts), never a reason for
        systemd to kill the service (which would take every line down with it)."""
        return self._publisher_ticking() and all(p.healthy() for p in self.lines.values())

    def _publisher_ticking(self) -> bool:
        if self.publisher is None or not self.lines:
            return True
        beats = sum(self.publisher.sent.get(f"heartbeat.{line}", 0) for line in self.lines)
        now = time.monotonic()
        count, since = self._publisher_beats
        if beats != count:
            self._publisher_beats = (beats, now)
            return True
        stale = max(PUBLISHER_STALE_MIN_S, PUBLISHER_STALE_INTERVALS * self.config.heartbeat_interval_s)
        return now - since <= stale

    def _report_status(self, pipeline: LinePipeline, now: bool = False) -> None:
        """The line's status to its heartbeats (at once with `now`) and its state to the metrics."""
        status = pipeline.status()
        self.metrics.line_state.labels(line=pipeline.line).state(status["state"])
        if self.publisher is not None:
            self.publisher.set_line_status(pipeline.line, status, now=now)

    def _supervise(self) -> None:
        """Heartbeat status, STATUS=, and (after READY) WATCHDOG=1 while the loops make progress."""
        interval = min(self.config.heartbeat_interval_s, 1.0)
        wd = self.notifier.watchdog_interval_s()
        if wd is not None:
            interval = min(interval, wd)
        while not self._stop_supervisor.wait(interval):
            try:
                for pipeline in self.lines.values():
                    self._report_status(pipeline)
                healthy = self.healthy()
                if wd is not None and self._ready.is_set() and healthy:
                    self.notifier.watchdog()
                if healthy != self._was_healthy:
                    self._was_healthy = healthy
                    if healthy:
                        log.info("all loops make progress again")
                    else:  # systemd will kill us after WatchdogSec: say why first
                        log.error("a loop makes no progress (watchdog pings withheld): %s", self.status_line())
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
                reread = load_config(config_path)
            except ConfigError as exc:
                log.error("threshold reload failed, keeping the current thresholds: %s", exc)
                return
            fresh = {cfg.id: cfg for cfg in reread.lines}
            # An operator who edited more than a threshold and reloaded must not believe it applied.
            ignored = restart_changes(self.config, reread)
            if ignored:
                log.warning("SIGHUP applies thresholds only; changed in %s and not applied until a restart: %s",
                            config_path, ", ".join(ignored))
        for pipeline in self.lines.values():
            cfg = fresh.get(pipeline.line)
            if config_path is not None and cfg is None:
                log.error("line %s: threshold reload failed, keeping %.4g: the line is no longer in %s",
                          pipeline.line, pipeline.threshold.value, config_path)
                continue
            recipes = self.recipes[pipeline.line]  # build() gives every line its recipes
            with recipes.lock:  # after any switch in progress: the recipe it switched in is reloaded
                self._reload_line(pipeline, recipes, cfg)

    def _reload_line(self, pipeline: LinePipeline, recipes: LineRecipes, cfg: LineConfig | None) -> None:
        """One line's SIGHUP work: the active recipe's threshold, then the recipes waiting."""
        # The ACTIVE recipe's threshold as the config now gives it (a promoted bundle's file: re-read).
        spec: float | Path | None = recipes.threshold_spec(cfg)
        before = pipeline.threshold.path
        before_value = pipeline.threshold.value
        drift_before = pipeline.threshold.drift
        pipeline.threshold.reload(spec)  # re-reads the calibration: threshold and drift reference
        if pipeline.threshold.drift is not drift_before:
            self.metrics.clear_drift(pipeline.line)
        self.metrics.threshold.labels(line=pipeline.line).set(pipeline.threshold.value)
        if pipeline.threshold.value != before_value or pipeline.threshold.path != before:
            self._record_change(pipeline.line, "threshold",
                                {"recipe": pipeline.recipe, "threshold": before_value,
                                 "threshold_file": str(before) if before else None},
                                {"recipe": pipeline.recipe, "threshold": pipeline.threshold.value,
                                 "threshold_file": str(pipeline.threshold.path) if pipeline.threshold.path
                                 else None},
                                dict(local_who(), via="SIGHUP"), "SIGHUP reload")
        # standby and rollback engines: a switch must not bring a stale threshold
        recipes.reload_waiting(cfg, dict(local_who(), via="SIGHUP"))

    # ---- stop ------------------------------------------------------------------------------------

    def stop(self, budget_s: float = STOP_BUDGET_S) -> None:
        """Stop acquisition, resolve in-flight frames (result or deadline), publish them, close."""
        end = time.monotonic() + budget_s
        self.notifier.stopping()
        for pipeline in self.lines.values():
            pipeline.request_stop()
            pipeline.shadow = None
            self._report_status(pipeline, now=True)  # a reject gate must stop trusting the line now, not at the next beat
        self._stop_supervisor.set()
        if self.control is not None:
            self.control.stop()
        for pipeline in self.lines.values():
            pipeline.stop(timeout_s=max(0.2, end - time.monotonic() - 0.5), close_source=False)
        for recipes in self.recipes.values():
            recipes.stop()
        # Cameras last: a driver's stop may hold the interpreter for a frame period.
        for pipeline in self.lines.values():
            pipeline.close_source()
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
        self.stall_watch.stop()
        started = self.metrics_server is not None  # bound after the publisher: None = start() never ran
        if self.metrics_server is not None:
            self.metrics_server.shutdown(timeout=1.0)
        self.notifier.close()
        if started:  # a start refused (an endpoint taken) is its one error line, not "stopped"
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

    def reload_loop() -> None:
        # Its own thread: a reload waits for each line's recipe operation in progress (an engine
        # open can take minutes), and SIGTERM must never wait behind it.
        while not stop_requested.is_set():
            if reload_requested.wait(0.2):
                reload_requested.clear()
                try:
                    daemon.reload_thresholds(config_path)
                except Exception:  # never leave a SIGHUP unanswered for good, nor end the loop
                    log.exception("SIGHUP reload failed; the thresholds in use are kept")

    # Handlers only set flags; the main and reload threads do the work (a handler may interrupt anything).
    old = {s: signal.signal(s, h) for s, h in
           ((signal.SIGTERM, on_stop), (signal.SIGINT, on_stop), (signal.SIGHUP, on_hup))}
    daemon = Daemon(config)
    try:
        daemon.build()
        try:
            try:
                daemon.start(stop_requested)
            except (MetricsBindError, PublisherBindError) as exc:  # name the file holding the field
                raise exc.in_config(str(config_path)) from None
            threading.Thread(target=reload_loop, name="reload", daemon=True).start()
            while not stop_requested.wait(0.1):
                pass
        finally:
            daemon.stop()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    return run(args.config)
