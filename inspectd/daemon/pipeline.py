"""One line's data path: acquisition thread -> bounded queue (drop oldest) -> inference worker
that owns the Backend -> verdict -> emit (the Publisher). The DeadlineKeeper resolves each frame
exactly once: by the result, or by the fail-safe verdict at acquisition + latency budget.

Every thread catches and reports its own failures: one line going wrong never stops another.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import math
import threading
import time
from typing import Any, Callable

import numpy as np

from inspectd.daemon.deadline import DeadlineKeeper
from inspectd.daemon.frame import Frame, Verdict
from inspectd.daemon.line import LineSettings, LineThreshold
from inspectd.daemon.sources.base import SourceError, SourceLost
from inspectd.engines import preprocess
from inspectd.engines.bundle import Bundle
from inspectd.engines.runtime import Backend, EngineInfo, open_backend
from inspectd.errors import DataError

log = logging.getLogger("inspectd.pipeline")

BackendOpener = Callable[[Bundle, LineSettings, Callable[[str, str], None], float],
                         tuple[Backend, EngineInfo]]
Emit = Callable[[Verdict], None]

# After this many engine errors in a row the backend is presumed broken (not one bad frame): the
# line closes it and reopens through the opener without it, so the next backend in the line's
# list that passes the parity gate takes over.
ENGINE_FAILOVER_AFTER = 5


def default_backend_opener(bundle: Bundle, settings: LineSettings, on_fallback: Callable[[str, str], None],
                           threshold: float) -> tuple[Backend, EngineInfo]:
    """The first backend of the line's list that loads and, unless it is the ONNX Runtime reference,
    passes the parity gate on the bundle's golden images at the line's threshold."""
    from inspectd.engines.runtime.parity import make_gate

    return open_backend(bundle, settings.backend_preference, settings.backend_options,
                        gate=make_gate(bundle, threshold=threshold), on_fallback=on_fallback)


class LinePipeline:
    """The threads of one line. `start()`, `wait_ready()`, `stop()`; `emit(verdict)` is called
    exactly once per acquired frame, from the worker or the deadline thread."""

    def __init__(self, settings: LineSettings, source: Any, bundle: Bundle, threshold: LineThreshold,
                 emit: Emit, metrics: Any | None = None, archive: Any | None = None,
                 drift: Any | None = None, backend_opener: BackendOpener = default_backend_opener,
                 failover_after_errors: int = ENGINE_FAILOVER_AFTER) -> None:
        self.settings = settings
        self.line = settings.line
        self.source = source
        self.bundle = bundle
        self.threshold = threshold
        self._emit_fn = emit
        self.metrics = metrics
        self.archive = archive
        self.drift = drift
        self._backend_opener = backend_opener
        self._failover_after = max(1, int(failover_after_errors))
        self._consecutive_engine_errors = 0
        self._excluded_backends: list[str] = []   # failed at run time: never reopened by this line
        self._budget_s = settings.latency_budget_ms / 1000.0

        self._queue: collections.deque[tuple[int, Frame]] = collections.deque()
        self._queue_cond = threading.Condition(threading.Lock())
        self._keys = itertools.count()
        self._keeper = DeadlineKeeper(self._on_deadline, name=f"deadline-{self.line}")

        self._stop_acquisition = threading.Event()
        self._stop_worker = threading.Event()
        self.engine_ready = threading.Event()
        self.source_ready = threading.Event()
        self._acq_thread = threading.Thread(target=self._acquire_loop, name=f"acquire-{self.line}", daemon=True)
        self._worker_thread = threading.Thread(target=self._worker_loop, name=f"infer-{self.line}", daemon=True)

        # Status for heartbeats, STATUS= and the watchdog (plain attributes: single writer each).
        self.backend_name = "none"
        self.camera_connected = False
        self.last_activity_mono = time.monotonic()
        self.frames_acquired = 0
        self.verdicts = 0
        self.deadline_misses = 0
        self.dropped: collections.Counter[str] = collections.Counter()
        self.engine_errors = 0
        self.last_error: str | None = None
        self.failed: str | None = None      # the line cannot infer at all (backend failed to open)
        self.last_worker_progress_mono = time.monotonic()
        self._started = False
        self._incomplete_seen = 0
        self._emit_lock = threading.Lock()  # verdict counters from two threads

        if metrics is not None:
            metrics.init_line(self.line, threshold.value)

    # ---- lifecycle -------------------------------------------------------------------------------

    def start(self) -> "LinePipeline":
        self._started = True
        self._keeper.start()
        self._worker_thread.start()
        self._acq_thread.start()
        return self

    def wait_ready(self, timeout_s: float) -> bool:
        """True once the engine is warmed up (or failed: the line then fail-safes every frame)
        and the source opened."""
        end = time.monotonic() + timeout_s
        return (self.engine_ready.wait(max(0.0, end - time.monotonic()))
                and self.source_ready.wait(max(0.0, end - time.monotonic())))

    def request_stop(self) -> None:
        """Stop acquiring new frames (returns at once; `stop()` waits for the rest)."""
        self._stop_acquisition.set()

    def stop(self, timeout_s: float = 3.0) -> None:
        """Stop acquiring, let in-flight frames resolve (result or deadline), then stop the rest."""
        if not self._started:
            self._close_source()
            return
        end = time.monotonic() + timeout_s
        self._stop_acquisition.set()
        self._acq_thread.join(min(2.0, timeout_s))
        # Every frame already registered resolves by its deadline at the latest.
        self._keeper.stop(timeout_s=max(0.0, min(end - time.monotonic(), self._budget_s + 0.5)))
        self._stop_worker.set()
        with self._queue_cond:
            self._queue_cond.notify_all()
        self._worker_thread.join(max(0.1, end - time.monotonic()))
        if self._worker_thread.is_alive():
            log.warning("line %s: inference worker still busy at shutdown", self.line)

    # ---- status ----------------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def late_results(self) -> int:
        return self._keeper.late_results

    def status(self) -> dict[str, Any]:
        return {"camera_connected": self.camera_connected, "frames": self.frames_acquired,
                "verdicts": self.verdicts, "backend": self.backend_name, "bundle_id": self.bundle.bundle_id,
                "threshold": self.threshold.value, "queue_depth": self.queue_depth,
                "deadline_misses": self.deadline_misses, "dropped": dict(self.dropped),
                "engine_errors": self.engine_errors, "late_results": self.late_results,
                "ready": self.engine_ready.is_set() and self.source_ready.is_set(),
                "failed": self.failed, "last_error": self.last_error}

    def healthy(self, stale_s: float | None = None) -> bool:
        """For the systemd watchdog: frames flow or the source is healthily waiting, and the worker
        is not stuck on a frame. A lost camera or a hung thread makes the line unhealthy."""
        if stale_s is None:
            stale_s = max(5.0, 3 * self.settings.read_timeout_s, 2 * self._budget_s)
        now = time.monotonic()
        if not (self._acq_thread.is_alive() and self._worker_thread.is_alive()):
            return False
        if not self.camera_connected or now - self.last_activity_mono > stale_s:
            return False
        return now - self.last_worker_progress_mono <= stale_s

    def summary(self) -> str:
        cam = "up" if self.camera_connected else "DOWN"
        state = f"FAILED ({self.failed})" if self.failed else self.backend_name
        return (f"{self.line}: camera {cam}, {state}, {self.verdicts} verdicts, "
                f"{self.deadline_misses} deadline misses")

    # ---- acquisition -----------------------------------------------------------------------------

    def _acquire_loop(self) -> None:
        # Frames taken during engine warm-up could only be dropped or fail-safed: wait for it.
        while not self.engine_ready.wait(0.1):
            if self._stop_acquisition.is_set():
                return
        backoff = self.settings.reconnect_min_s
        connected_once = False
        while not self._stop_acquisition.is_set():
            if not self.camera_connected:
                try:
                    self.source.open()
                except Exception as exc:  # SourceError and anything a driver throws
                    msg = str(exc) if isinstance(exc, SourceError) else f"{type(exc).__name__}: {exc}"
                    self.last_error = f"source: {msg}"
                    log.error("line %s: cannot open source (retry in %.1f s): %s", self.line, backoff, msg)
                    self._close_source()
                    if self._stop_acquisition.wait(backoff):
                        break
                    backoff = min(backoff * 2, self.settings.reconnect_max_s)
                    continue
                self._set_camera(True)
                if connected_once:
                    log.info("line %s: camera reconnected", self.line)
                    if self.metrics is not None:
                        self.metrics.camera_reconnects.labels(line=self.line).inc()
                else:
                    log.info("line %s: source open", self.line)
                connected_once = True
                self.source_ready.set()
            if self.settings.backpressure and not self._wait_for_room():
                continue
            try:
                frame = self.source.read(self.settings.read_timeout_s)
            except Exception as exc:  # SourceLost, or an unexpected driver error: treat it as a loss
                self._camera_lost(str(exc) if isinstance(exc, SourceLost) else f"{type(exc).__name__}: {exc}")
                # Back off before reopening too: a camera that opens and fails at once must not spin.
                if self._stop_acquisition.wait(backoff):
                    break
                backoff = min(backoff * 2, self.settings.reconnect_max_s)
                continue
            self.last_activity_mono = time.monotonic()  # a healthy wait counts as activity
            self._sync_incomplete()
            if frame is None:
                continue
            backoff = self.settings.reconnect_min_s  # frames flow: the camera is really back
            try:
                self._enqueue(frame)
            except Exception:  # a bug here must not end acquisition for the line
                log.exception("line %s: frame %s could not be queued", self.line, frame.frame_id)
        self._close_source()
        self._set_camera(False)

    def _wait_for_room(self) -> bool:
        with self._queue_cond:
            if len(self._queue) >= self.settings.queue_size:
                self._queue_cond.wait(self.settings.read_timeout_s)
            room = len(self._queue) < self.settings.queue_size
        if not room:
            self.last_activity_mono = time.monotonic()  # waiting on our own worker is not a stall
        return room

    def _camera_lost(self, why: str) -> None:
        self.last_error = f"camera lost: {why}"
        log.error("line %s: camera lost: %s", self.line, why)
        self._set_camera(False)
        self._close_source()

    def _close_source(self) -> None:
        try:
            self.source.close()
        except Exception as exc:
            log.warning("line %s: closing the source failed: %s", self.line, exc)

    def _set_camera(self, up: bool) -> None:
        self.camera_connected = up
        if self.metrics is not None:
            self.metrics.camera_connected.labels(line=self.line).set(1 if up else 0)

    def _sync_incomplete(self) -> None:
        stats = getattr(self.source, "stats", None)
        seen = int(getattr(stats, "incomplete_frames", 0) or 0)
        if seen > self._incomplete_seen:
            if self.metrics is not None:
                self.metrics.incomplete_frames.labels(line=self.line).inc(seen - self._incomplete_seen)
            self._incomplete_seen = seen
        elif seen < self._incomplete_seen:  # the source reset its stats (reopen)
            self._incomplete_seen = seen

    def _enqueue(self, frame: Frame) -> None:
        frame.line = self.line
        key = next(self._keys)
        # The clock starts at acquisition, not when the worker gets to the frame.
        self._keeper.register(frame, frame.acquired_mono + self._budget_s, key=key)
        self.frames_acquired += 1
        if self.metrics is not None:
            self.metrics.last_frame_timestamp.labels(line=self.line).set(frame.acquired_ns / 1e9)
        dropped: tuple[int, Frame] | None = None
        with self._queue_cond:
            if len(self._queue) >= self.settings.queue_size:
                dropped = self._queue.popleft()  # drop oldest: the newest part is the one still in reach
            self._queue.append((key, frame))
            depth = len(self._queue)
            self._queue_cond.notify()
        if self.metrics is not None:
            self.metrics.queue_depth.labels(line=self.line).set(depth)
        if dropped is not None:
            self._count_drop("queue_full")
            self._fail_safe(dropped[0], dropped[1], "dropped: inference queue full", deadline_missed=False)

    # ---- inference -------------------------------------------------------------------------------

    def _worker_loop(self) -> None:
        backend: Backend | None = None
        try:
            backend = self._open_engine()
            while True:
                item = self._next_item()
                if item is None:
                    break
                self._process(backend, *item)
                if backend is not None and self._consecutive_engine_errors >= self._failover_after:
                    backend = self._fail_over(backend)
        except Exception as exc:  # never let one line's worker take the process down
            self.failed = f"worker crashed: {type(exc).__name__}: {exc}"
            log.exception("line %s: inference worker crashed; frames now get the fail-safe verdict", self.line)
            self.engine_ready.set()
            self._fail_safe_loop(self.failed)
        finally:
            if backend is not None:
                try:
                    backend.close()
                except Exception as exc:
                    log.warning("line %s: closing backend failed: %s", self.line, exc)

    def _fail_over(self, backend: Backend) -> Backend | None:
        """The current backend keeps failing: close it and open the next one of the line's list
        (through the opener, so the parity gate applies). Without another backend, keep this one."""
        failed = self.backend_name
        remaining = tuple(b for b in self.settings.backend_preference
                          if b != failed and b not in self._excluded_backends)
        n = self._consecutive_engine_errors
        self._consecutive_engine_errors = 0
        if not remaining:
            log.error("line %s: backend %s failed %d frames in a row and no other backend is configured; "
                      "keeping it", self.line, failed, n)
            return backend
        log.error("line %s: backend %s failed %d frames in a row (last: %s); falling back to %s",
                  self.line, failed, n, self.last_error, ", ".join(remaining))
        self._excluded_backends.append(failed)
        if self.metrics is not None:  # labelled with the backend that was given up
            self.metrics.backend_fallbacks.labels(line=self.line, backend=failed).inc()
        try:
            backend.close()
        except Exception as exc:
            log.warning("line %s: closing backend %s failed: %s", self.line, failed, exc)
        return self._open_engine(dataclasses.replace(self.settings, backend_preference=remaining))

    def _open_engine(self, settings: LineSettings | None = None) -> Backend | None:
        settings = settings or self.settings

        def on_fallback(name: str, reason: str) -> None:
            log.warning("line %s: backend %s not used: %s", self.line, name, reason)
            if self.metrics is not None:  # labelled with the backend that was skipped
                self.metrics.backend_fallbacks.labels(line=self.line, backend=name).inc()

        try:
            backend, info = self._backend_opener(self.bundle, settings, on_fallback, self.threshold.value)
        except Exception as exc:
            self.failed = f"no backend: {exc}"
            self.backend_name = "none"
            log.error("line %s: %s; every frame gets the fail-safe verdict %s", self.line, self.failed,
                      self.settings.on_deadline_miss)
            self.engine_ready.set()
            return None
        self.backend_name = info.backend
        if self.metrics is not None:
            self.metrics.set_engine(self.line, info.backend, self.bundle.bundle_id)
        try:
            # Warm-up: first inference allocates arenas / builds engines; keep it out of the budget.
            spec = self.bundle.input_spec
            warm = np.zeros((1, *spec.shape), np.uint8)
            for _ in range(2):
                backend.infer(warm)
        except Exception as exc:
            self.failed = f"warm-up failed: {exc}"
            log.error("line %s: %s", self.line, self.failed)
            backend.close()
            self.engine_ready.set()
            return None
        log.info("line %s: engine %s warmed up (bundle %s)", self.line, info.backend, self.bundle.bundle_id)
        self.engine_ready.set()
        return backend

    def _next_item(self) -> tuple[int, Frame] | None:
        with self._queue_cond:
            while not self._queue:
                self.last_worker_progress_mono = time.monotonic()  # idle is not stuck
                if self._stop_worker.is_set():
                    return None
                self._queue_cond.wait(0.5)
            item = self._queue.popleft()
            self._queue_cond.notify_all()  # room for a back-pressured source
            self.last_worker_progress_mono = time.monotonic()
            depth = len(self._queue)
        if self.metrics is not None:
            self.metrics.queue_depth.labels(line=self.line).set(depth)
        return item

    def _fail_safe_loop(self, why: str) -> None:
        while True:
            item = self._next_item()
            if item is None:
                return
            self._count_drop("engine_error")
            self._fail_safe(item[0], item[1], why, deadline_missed=False)

    def _process(self, backend: Backend | None, key: int, frame: Frame) -> None:
        if not self._keeper.is_pending(key):
            return  # already resolved by its deadline while queued: do not spend the engine on it
        if backend is None:
            self._count_drop("engine_error")
            self._fail_safe(key, frame, self.failed or "no backend", deadline_missed=False)
            return
        try:
            image = frame.image
            if not isinstance(image, np.ndarray):
                raise DataError(f"frame image is a {type(image).__name__}, not an array")
            batch = preprocess.prepare(image, self.bundle.input_spec, self.settings.roi)[None]
        except Exception as exc:
            self._count_drop("malformed")
            log.warning("line %s: frame %s malformed: %s", self.line, frame.frame_id, exc)
            self._fail_safe(key, frame, f"malformed frame: {exc}", deadline_missed=False)
            return
        t0 = time.perf_counter()
        try:
            raw_scores, maps = backend.infer(batch)
            raw = float(raw_scores[0])
            if not math.isfinite(raw):
                raise ValueError(f"non-finite score {raw}")
            if not np.isfinite(maps[0]).all():
                raise ValueError("non-finite values in the anomaly map")
        except Exception as exc:
            self._consecutive_engine_errors += 1
            self.engine_errors += 1
            self.last_error = f"engine: {exc}"
            if self.metrics is not None:
                self.metrics.engine_errors.labels(line=self.line).inc()
            self._count_drop("engine_error")
            log.error("line %s: engine error on frame %s: %s", self.line, frame.frame_id, exc)
            self._fail_safe(key, frame, f"engine error: {exc}", deadline_missed=False)
            return
        self._consecutive_engine_errors = 0
        infer_s = time.perf_counter() - t0
        if self.metrics is not None:
            self.metrics.inference_seconds.labels(line=self.line, backend=self.backend_name).observe(infer_s)
        if not self._keeper.claim(key):
            log.debug("line %s: late result for frame %s (%.1f ms after acquisition) not published",
                      self.line, frame.frame_id, (time.monotonic() - frame.acquired_mono) * 1000)
            return
        threshold = self.threshold.value
        score = float(self.bundle.normalize(raw))
        verdict = "NG" if score > threshold else "OK"
        heatmap = None
        mode = self.settings.heatmap_mode
        archived = self.archive is not None and (verdict == "NG" or self.settings.archive_save == "all")
        if mode == "all" or (mode == "ng" and verdict == "NG") or archived:
            # Fixed display range; resizing and encoding happen in the publisher thread.
            heatmap = self.bundle.heatmap_u8(maps[0])
        self._publish(Verdict(
            line=self.line, frame_id=frame.frame_id, acquired_ns=frame.acquired_ns, verdict=verdict,
            score=score, raw_score=raw, threshold=threshold,
            latency_ms=(time.monotonic() - frame.acquired_mono) * 1000.0, deadline_missed=False,
            backend=self.backend_name, bundle_id=self.bundle.bundle_id, heatmap=heatmap, meta=frame.meta),
            frame)

    # ---- verdicts --------------------------------------------------------------------------------

    def _on_deadline(self, frame: Frame, reason: str) -> None:
        """DeadlineKeeper callback (its thread): the frame had no result in time."""
        self._publish(self._fail_safe_verdict(frame, f"no result within {self.settings.latency_budget_ms:g} ms"
                                              + ("" if reason == "deadline" else f" ({reason})"),
                                              deadline_missed=True), frame)

    def _fail_safe(self, key: int, frame: Frame, why: str, deadline_missed: bool) -> None:
        if self._keeper.claim(key):
            self._publish(self._fail_safe_verdict(frame, why, deadline_missed), frame)

    def _fail_safe_verdict(self, frame: Frame, why: str, deadline_missed: bool) -> Verdict:
        return Verdict(line=self.line, frame_id=frame.frame_id, acquired_ns=frame.acquired_ns,
                       verdict=self.settings.on_deadline_miss, score=None, raw_score=None,
                       threshold=self.threshold.value,
                       latency_ms=(time.monotonic() - frame.acquired_mono) * 1000.0,
                       deadline_missed=deadline_missed, backend=self.backend_name,
                       bundle_id=self.bundle.bundle_id, error=why, meta=frame.meta)

    def _count_drop(self, reason: str) -> None:
        with self._emit_lock:
            self.dropped[reason] += 1
        if self.metrics is not None:
            self.metrics.dropped_frames.labels(line=self.line, reason=reason).inc()

    def _publish(self, verdict: Verdict, frame: Frame) -> None:
        with self._emit_lock:
            self.verdicts += 1
            if verdict.deadline_missed:
                self.deadline_misses += 1
        if self.metrics is not None:
            # end_to_end_seconds is observed when the message is really sent (Publisher on_sent).
            self.metrics.observe_verdict(self.line, verdict.verdict, verdict.score, verdict.deadline_missed)
        try:
            self._emit_fn(verdict)
        except Exception:
            log.exception("line %s: publishing verdict for frame %s failed", self.line, verdict.frame_id)
        if verdict.deadline_missed:
            log.warning("line %s: frame %s deadline missed -> %s", self.line, verdict.frame_id, verdict.verdict)
        if verdict.verdict == "OK" and verdict.score is not None and self.drift is not None:
            # DriftWatch compares OK scores with the calibration's good scores below the threshold.
            try:
                self.drift.update(verdict.score)
                drift = self.drift.value()
                if drift is not None and self.metrics is not None:
                    self.metrics.score_drift.labels(line=self.line).set(drift)
            except Exception as exc:
                log.debug("line %s: drift update failed: %s", self.line, exc)
        if self.archive is not None and (verdict.verdict == "NG" or self.settings.archive_save == "all"):
            try:
                self.archive.submit(frame, verdict)
            except Exception as exc:
                log.warning("line %s: NG archive failed: %s", self.line, exc)
