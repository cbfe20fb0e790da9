"""One line's data path: acquisition thread -> bounded queue (drop oldest) -> inference worker
that owns the Backend -> verdict -> the line's VerdictSink (daemon/sinks.py: publisher, metrics,
archive, drift, wired by run.py). The DeadlineKeeper resolves each frame exactly once: by the
result, or by the fail-safe verdict at acquisition + latency budget.

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
from pathlib import Path
from typing import Any, Callable

import numpy as np

from inspectd.daemon.deadline import DeadlineKeeper
from inspectd.daemon.failsafe_rate import FailSafeRate
from inspectd.daemon.frame import Frame, Verdict
from inspectd.daemon.line import LineSettings, LineThreshold
from inspectd.daemon.sinks import VerdictSink, as_sink
from inspectd.daemon.sources.base import SourceError, SourceLost
from inspectd.engines import preprocess
from inspectd.engines.bundle import Bundle
from inspectd.engines.runtime import Backend, EngineInfo, open_backend
from inspectd.engines.runtime.bench import sample_inputs
from inspectd.errors import DataError, InspectdError

log = logging.getLogger("inspectd.pipeline")

BackendOpener = Callable[[Bundle, LineSettings, Callable[[str, str], None], float],
                         tuple[Backend, EngineInfo]]

# After this many engine errors in a row the backend is presumed broken (not one bad frame): the
# line closes it and reopens through the opener without it, so the next backend in the line's
# list that passes the parity gate takes over.
ENGINE_FAILOVER_AFTER = 5
# A call that neither answers nor raises (hung driver) is given up after max(this, N x budget),
# and failed over like an erroring backend. The deadline keeper fail-safes frames meanwhile.
ENGINE_STALL_MIN_S = 2.0
ENGINE_STALL_BUDGETS = 10
WARMUP_STALL_S = 60.0        # first calls load kernels / allocate arenas: slower, still bounded
# Opening an engine: WARMUP_CALLS untimed calls (arenas, kernels), then TIMED_CALLS timed ones whose
# median is the engine's time per frame on this machine, compared with the line's budget at start
# so that a bundle too slow for the line is said in the log, the status and the metrics before
# parts get fail-safe verdicts (the line still starts: the operator decides).
WARMUP_CALLS = 2
TIMED_CALLS = 5
ENGINE_START_CALLS = WARMUP_CALLS + TIMED_CALLS
RUNNER_CLOSE_S = 5.0         # closing a backend that is not stuck
SUBMIT_TAKEN_S = 1.0         # a call handed to an engine's thread is taken within this (or left to the stall bound)
# Watchdog: a loop that has not moved for this long is hung (camera and engine state do not count).
PROGRESS_STALE_MIN_S = 10.0
ENGINE_RETRY_S = (10.0, 300.0)  # an engine that failed to open is tried again after this, doubling up to that
REPEAT_LOG_EVERY = 100          # frames malformed (same reason, in a row) or dropped: one log line each this many
# A free-running camera silent this long (or 10 read timeouts, if longer) with no driver error is taken
# for lost and reconnected: some GenTL producers only time out when a GigE camera drops off.
SILENT_CAMERA_S = 10.0
ENGINE_OPEN_STALE_S = 300.0  # loading + parity-gating an engine (never building one): given up after


def time_engine(infer: Callable[[np.ndarray], Any], frame: np.ndarray) -> float:
    """Warm an engine up (WARMUP_CALLS untimed calls), then time it: the median of TIMED_CALLS calls
    on `frame` (a batch of one prepared image, `timing_frame`), in ms. Raises what the engine raises."""
    for _ in range(WARMUP_CALLS):
        infer(frame)
    times = []
    for _ in range(TIMED_CALLS):
        start = time.perf_counter()
        infer(frame)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1000.0


def timing_frame(bundle: Bundle) -> np.ndarray:
    """What an engine is warmed up and timed on: the bundle's first golden good image, a real part
    (an engine whose work depends on the content, like inpaint's early-exit loop, is timed as parts
    will time it, not on a blank frame); seeded noise for a bundle without golden images."""
    return sample_inputs(bundle, 1)


def engine_time_problem(engine_ms: float, budget_ms: float, on_deadline_miss: str) -> tuple[int, str] | None:
    """(logging level, what to say) when an engine taking `engine_ms` per frame is too slow for a
    line's budget; None when it fits. A frame that arrives while another is being scored waits for
    it, so the budget must hold two engine calls."""
    advice = ("raise the line's latency_budget_ms or deploy a faster bundle (inspectd train --members 1 "
              "or a smaller --image-size; an INT8 or GPU backend)")
    if engine_ms >= budget_ms:
        return logging.ERROR, (f"takes {engine_ms:.1f} ms per frame on this machine, over the latency budget "
                               f"of {budget_ms:g} ms: most parts will get the fail-safe verdict "
                               f"{on_deadline_miss}; {advice}")
    if 2 * engine_ms > budget_ms:
        return logging.WARNING, (f"takes {engine_ms:.1f} ms per frame on this machine, more than half the "
                                 f"latency budget of {budget_ms:g} ms: a frame that arrives while another is "
                                 f"scored will miss its deadline; {advice}")
    return None


def default_backend_opener(bundle: Bundle, settings: LineSettings, on_fallback: Callable[[str, str], None],
                           threshold: float) -> tuple[Backend, EngineInfo]:
    """The first backend of the line's list that loads and, unless it is the ONNX Runtime reference,
    passes the parity gate on the bundle's golden images at the line's threshold."""
    from inspectd.engines.runtime.parity import make_gate

    return open_backend(bundle, settings.backend_preference, settings.backend_options,
                        gate=make_gate(bundle, threshold=threshold), on_fallback=on_fallback)


class RecipeNotReady(InspectdError):
    """A recipe (or candidate) whose engine cannot judge parts: unknown, bundle does not load,
    parity gate failed, warm-up failed. The message is the reason given to the requester."""


@dataclasses.dataclass(frozen=True)
class ActiveRecipe:
    """What decides a verdict, as one immutable object: the worker reads `pipeline.active` ONCE per
    frame and judges the frame with this engine, bundle (normalization, input spec), ROI and
    threshold only, so a switch lands between two frames, never inside one. (`threshold` is the
    recipe's own LineThreshold: a SIGHUP reload of that recipe's calibration file moves it.)"""

    name: str
    bundle: Bundle
    threshold: LineThreshold
    roi: tuple[int, int, int, int] | None
    runner: "_EngineRunner | None" = None
    backend: str = "none"
    engine_ms: float | None = None   # median time per frame measured when its engine was warmed

    @property
    def threshold_spec(self) -> float | Path:
        """Where the threshold comes from NOW (its calibration file, or the number), for the state
        file and the audit: it follows SIGHUP reloads, so a promote records (and a rollback brings
        back) what the recipe really judged with, not what it started with."""
        t = self.threshold
        return t.path if t.path is not None else t.value


@dataclasses.dataclass(frozen=True)
class _Taken:
    """A frame the worker took from the queue; prepared (its batch, or why it has none) for one recipe."""

    key: int
    frame: Frame
    batch: np.ndarray | None = None
    prepared_for: ActiveRecipe | None = None
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class _InFlight:
    """A frame handed to an engine whose answer the worker collects next."""

    active: ActiveRecipe
    runner: "_EngineRunner"
    key: int
    frame: Frame
    queue_ms: float


class EngineStalled(Exception):
    """The backend did not answer within the stall bound (no exception, just no answer)."""


class EngineBusy(EngineStalled):
    """A call given up earlier is still inside the backend: no new call can start."""


class _EngineRunner:
    """One backend's own thread: it opens the backend, runs every call and closes it, so a call
    that never returns (a hung GPU driver) can be given up: the worker waits at most the stall
    bound and stays free to fail over. Everything of one backend happens on this one thread (GPU
    libraries keep per-thread state); the backend is closed here once a call in progress returns."""

    def __init__(self, line: str) -> None:
        self.backend: Backend | None = None
        self._cond = threading.Condition(threading.Lock())
        self._fn: Callable[[], Any] | None = None
        self._result: Any = None
        self._error: BaseException | None = None
        self._busy = False      # a call was handed over and has not returned yet
        self._submitted_mono = 0.0
        self.last_call_s = 0.0  # how long the last call took on the backend's thread
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=f"engine-{line}", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        return self._busy

    @property
    def usable(self) -> bool:
        """An open backend on a live thread that was not asked to close: calls can be made."""
        return self.backend is not None and not self._closing and self._thread.is_alive()

    def call(self, fn: Callable[[], Any], stall_s: float, tick: Callable[[], None]) -> Any:
        """`fn()` run on the backend's thread; EngineStalled after `stall_s` without an answer.
        `tick()` is called while waiting (the worker's own loop is alive: it waits on a bounded call)."""
        self.submit(fn)
        return self.collect(stall_s, tick)

    def submit(self, fn: Callable[[], Any]) -> None:
        """Hand `fn` to the backend's thread; returns once that thread has taken it (`collect()`
        waits for its answer). Waiting for the take matters: a caller that went on with Python
        work at once would hold the GIL the backend's thread needs to start the call."""
        with self._cond:
            if self._busy:
                raise EngineBusy("a call given up earlier has not returned yet")
            self._fn, self._result, self._error, self._busy = fn, None, None, True
            self._submitted_mono = time.monotonic()
            self._cond.notify_all()
            while self._fn is not None and self._thread.is_alive():
                if time.monotonic() - self._submitted_mono > SUBMIT_TAKEN_S:
                    break  # not taken yet: collect() bounds the wait
                self._cond.wait(0.1)

    def collect(self, stall_s: float, tick: Callable[[], None]) -> Any:
        """The answer of the call submitted last; EngineStalled `stall_s` after it was submitted."""
        with self._cond:
            end = self._submitted_mono + stall_s
            while self._busy:
                left = end - time.monotonic()
                if left <= 0:
                    raise EngineStalled(f"no answer within {stall_s:.1f} s")
                self._cond.wait(min(left, 0.5))
                tick()
            if self._error is not None:
                raise self._error
            return self._result

    def open(self, opener: Callable[[], tuple[Backend, Any]], stall_s: float,
             tick: Callable[[], None]) -> tuple[Backend, Any]:
        """Open a backend on this thread. It belongs to the runner from the moment it exists: if the
        caller gave up (an open past its bound) and closed the runner, it is closed when the open returns."""
        def adopt() -> tuple[Backend, Any]:
            backend, info = opener()
            self.backend = backend
            return backend, info

        return self.call(adopt, stall_s, tick)

    def infer(self, batch: np.ndarray, stall_s: float, tick: Callable[[], None]) -> tuple[np.ndarray, np.ndarray]:
        self.start_infer(batch)
        return self.collect_infer(stall_s, tick)

    def start_infer(self, batch: np.ndarray) -> None:
        backend = self.backend
        if backend is None:
            raise RuntimeError("no backend open")
        self.submit(lambda: backend.infer(batch))

    def collect_infer(self, stall_s: float, tick: Callable[[], None]) -> tuple[np.ndarray, np.ndarray]:
        result = self.collect(stall_s, tick)
        if result is None:
            raise RuntimeError("the engine returned nothing")
        return result

    def close(self, timeout_s: float) -> bool:
        """Ask the thread to close the backend and end; True when it did within `timeout_s`
        (False: a call is still stuck in the backend, which is left to the process exit)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._fn is None and not self._closing:
                    self._cond.wait()
                if self._fn is None:
                    break
                fn, self._fn = self._fn, None
                self._cond.notify_all()  # taken (submit() returns)
            result: Any = None
            error: BaseException | None = None
            t0 = time.perf_counter()
            try:
                result = fn()
            except BaseException as exc:  # reported to the caller
                error = exc
            elapsed = time.perf_counter() - t0
            with self._cond:
                self._result, self._error, self._busy = result, error, False
                self.last_call_s = elapsed
                self._cond.notify_all()
        if self.backend is not None:
            try:
                self.backend.close()
            except Exception as exc:
                log.warning("closing backend %s failed: %s", getattr(self.backend, "name", "?"), exc)


class LinePipeline:
    """The threads of one line. `start()`, `wait_ready()`, `stop()`; `sink.accept(verdict)` is called
    exactly once per acquired frame, from the worker or the deadline thread.

    `sink` is a VerdictSink (run.py wires publisher, metrics, archive and drift into one `Sinks`) or
    a plain callable. `metrics` is for the line's own state (queue, camera, engine, drops)."""

    def __init__(self, settings: LineSettings, source: Any, bundle: Bundle, threshold: LineThreshold,
                 sink: VerdictSink | Callable[[Verdict], None], metrics: Any | None = None,
                 backend_opener: BackendOpener = default_backend_opener,
                 failover_after_errors: int = ENGINE_FAILOVER_AFTER,
                 stall_after_s: float | None = None, recipe: str = "default") -> None:
        self.settings = settings
        self.line = settings.line
        self.source = source
        # The active recipe: swapped whole (activate()), read once per frame by the worker.
        self._active = ActiveRecipe(recipe, bundle, threshold, settings.roi)
        self._swap_lock = threading.Lock()
        self._retired: list[_EngineRunner] = []   # runners swapped out: closed by the worker between frames
        self.shadow: Any = None                   # a ShadowScorer (daemon/shadow.py) or None
        self.sink = as_sink(sink)
        self.metrics = metrics
        self._backend_opener = backend_opener
        self._failover_after = max(1, int(failover_after_errors))
        self._consecutive_engine_errors = 0
        self._malformed_why: str | None = None    # the last malformed frame's reason (worker thread)
        self._malformed_run = 0
        self._queue_full_drops = 0                # frames failed safe because the queue was full
        self._stalled = False
        self._excluded_backends: list[str] = []   # failed at run time: never reopened by this line
        # A failed open may be transient (device memory taken, a driver reset): tried again, backing off.
        self.engine_retry_s = ENGINE_RETRY_S
        self.silent_camera_s = max(SILENT_CAMERA_S, 10 * settings.read_timeout_s)
        self._retry_wait_s = 0.0
        self._retry_at: float | None = None
        self._budget_s = settings.latency_budget_ms / 1000.0
        self.stall_after_s = (float(stall_after_s) if stall_after_s is not None
                              else max(ENGINE_STALL_MIN_S, ENGINE_STALL_BUDGETS * self._budget_s))

        self._queue: collections.deque[tuple[int, Frame]] = collections.deque()
        self._held: tuple[int, Frame] | None = None  # taken ahead by the worker, not handed over yet
        self._queue_cond = threading.Condition(threading.Lock())
        self._keys = itertools.count()
        self._keeper = DeadlineKeeper(self._on_deadline, name=f"deadline-{self.line}")

        self._stop_acquisition = threading.Event()
        self._stop_worker = threading.Event()
        # Set once the engine is warm OR has failed to open: start-up waits on it, never longer.
        self.engine_resolved = threading.Event()
        self.source_ready = threading.Event()
        self._acq_thread = threading.Thread(target=self._acquire_loop, name=f"acquire-{self.line}", daemon=True)
        self._worker_thread = threading.Thread(target=self._worker_loop, name=f"infer-{self.line}", daemon=True)

        # Status for heartbeats, STATUS= and the watchdog (plain attributes: single writer each).
        self.backend_name = "none"
        self.camera_connected = False
        self.engine_ok = False              # a warm backend answers (False: starting, failed or stalled)
        self.engine_ms: float | None = None  # the active engine's time per frame, measured at its warm-up
        self._source_attempted = False      # the first open() has been tried (state "starting" until then)
        now = time.monotonic()
        self.last_activity_mono = now       # acquisition loop progress
        self.last_worker_progress_mono = now
        self.frames_acquired = 0
        self.last_frame_size: tuple[int, int] | None = None  # (height, width) the source delivers
        self.last_frame_channels: int | None = None          # 1 (mono) or 3 (colour)
        self.verdicts = 0
        self.deadline_misses = 0
        self.dropped: collections.Counter[str] = collections.Counter()
        self.engine_errors = 0
        self.engine_stalls = 0
        self.last_error: str | None = None
        self.failed: str | None = None      # the line cannot infer at all (backend failed to open)
        self._started = False
        # The source's own counts (they restart when it reopens), as last carried into the metrics.
        self._source_seen = {"incomplete_frames": 0, "skipped_by_camera": 0}
        self._count_lock = threading.Lock()  # verdict counters from two threads
        self._fail_safe_rate = FailSafeRate(self.line)  # many parts failing safe: state "failing_safe"

        if metrics is not None:
            metrics.init_line(self.line, threshold.value, self._budget_s)
            self._set_engine_ok(False)

    # ---- the active recipe ------------------------------------------------------------------------

    @property
    def active(self) -> ActiveRecipe:
        return self._active

    @property
    def bundle(self) -> Bundle:
        return self._active.bundle

    @property
    def threshold(self) -> LineThreshold:
        return self._active.threshold

    @property
    def recipe(self) -> str:
        return self._active.name

    def open_recipe_engine(self, name: str, bundle: Bundle, threshold: LineThreshold,
                           roi: tuple[int, int, int, int] | None,
                           backends: tuple[str, ...] | None = None, settings: LineSettings | None = None,
                           check_budget: bool = True) -> ActiveRecipe:
        """Load, parity-gate, warm and time an engine for `bundle` (on its own runner thread, in the
        calling thread's time: never the line's worker). RecipeNotReady with the reason when it
        cannot judge parts. `check_budget` False: an engine off the critical path (a shadow) is
        timed but not held against the line's budget."""
        settings = settings or self.settings
        if backends is not None:
            settings = dataclasses.replace(settings, backend_preference=backends)

        def on_fallback(backend: str, reason: str) -> None:
            log.warning("line %s: recipe %s: backend %s not used: %s", self.line, name, backend, reason)

        runner = _EngineRunner(f"{self.line}-{name}")
        try:
            _, info = runner.open(lambda: self._backend_opener(bundle, settings, on_fallback, threshold.value),
                                  ENGINE_OPEN_STALE_S, lambda: None)
        except Exception as exc:
            runner.close(0.0 if runner.busy else RUNNER_CLOSE_S)
            raise RecipeNotReady(f"recipe {name!r}: no backend passed (bundle {bundle.bundle_id}): {exc}") from None
        try:
            engine_ms = self._warm_up(runner, bundle, lambda: None)
        except Exception as exc:
            runner.close(0.0 if runner.busy else RUNNER_CLOSE_S)
            raise RecipeNotReady(f"recipe {name!r}: engine warm-up failed: {exc}") from None
        log.info("line %s: recipe %s engine %s warmed up (bundle %s, %.1f ms per frame)", self.line, name,
                 info.backend, bundle.bundle_id, engine_ms)
        if check_budget:
            self._check_engine_time(engine_ms, f"recipe {name!r}")
        return ActiveRecipe(name, bundle, threshold, roi, runner, info.backend, engine_ms)

    def _warm_up(self, runner: "_EngineRunner", bundle: Bundle, tick: Callable[[], None]) -> float:
        """Warm the runner's engine up and time it (time_engine), each call bounded like warm-up."""
        timeout_s = max(self.stall_after_s, WARMUP_STALL_S)
        return time_engine(lambda batch: runner.infer(batch, timeout_s, tick), timing_frame(bundle))

    def _check_engine_time(self, engine_ms: float, what: str) -> None:
        """Say at start when the engine is too slow for the line's budget (engine_time_problem)."""
        problem = engine_time_problem(engine_ms, self.settings.latency_budget_ms, self.settings.on_deadline_miss)
        if problem is not None:
            log.log(problem[0], "line %s: %s engine %s", self.line, what, problem[1])

    def _set_engine_ms(self, engine_ms: float | None) -> None:
        self.engine_ms = engine_ms
        if self.metrics is not None:
            gauge = self.metrics.engine_seconds_at_start.labels(line=self.line)
            gauge.set(float("nan") if engine_ms is None else engine_ms / 1000.0)

    def drift_for(self, verdict: Verdict) -> Any:
        """The drift watch of the recipe that judged `verdict` while it is still the active one
        (its threshold's calibration file: threshold.drift); None otherwise, so that no score is
        ever compared with another bundle's or calibration's reference."""
        active = self._active
        if verdict.recipe != active.name or verdict.bundle_id != active.bundle.bundle_id:
            return None
        return active.threshold.drift

    def activate(self, new: ActiveRecipe) -> ActiveRecipe:
        """Make `new` (a warm engine: RecipeNotReady otherwise) the active recipe, atomically for the
        worker: the next frame it takes is judged by `new` alone. Returns the recipe it replaced
        (the caller keeps it warm, e.g. for rollback, or passes it to `retire()`)."""
        if new.runner is None or not new.runner.usable:
            raise RecipeNotReady(f"recipe {new.name!r}: engine not warmed")
        with self._swap_lock:
            old, self._active = self._active, new   # the one assignment the worker sees
        self.backend_name = new.backend
        self.failed = None
        self._retry_at = None
        self._set_engine_ok(True)
        self._set_engine_ms(new.engine_ms)
        if self.metrics is not None:
            self.metrics.set_engine(self.line, new.backend, new.bundle.bundle_id)
            self.metrics.threshold.labels(line=self.line).set(new.threshold.value)
            if hasattr(self.metrics, "set_recipe"):
                self.metrics.set_recipe(self.line, new.name)
            if hasattr(self.metrics, "clear_drift"):  # the old recipe's figure; the new one's comes with its scores
                self.metrics.clear_drift(self.line)
        log.info("line %s: recipe %s active (bundle %s, threshold %.4g, %s)", self.line, new.name,
                 new.bundle.bundle_id, new.threshold.value, new.backend)
        return old

    def retire(self, recipe: ActiveRecipe) -> None:
        """Close a swapped-out recipe's engine once the worker is done with the frame in hand."""
        if recipe.runner is None or recipe.runner is self._active.runner:
            return
        if self._worker_thread.is_alive():
            with self._swap_lock:
                self._retired.append(recipe.runner)
        else:
            recipe.runner.close(0.0 if recipe.runner.busy else RUNNER_CLOSE_S)

    def _close_retired(self) -> None:
        if not self._retired:
            return
        with self._swap_lock:
            runners, self._retired = self._retired, []
        for runner in runners:  # the worker no longer holds them: close off-thread (a close may take time)
            threading.Thread(target=runner.close, args=(RUNNER_CLOSE_S,), daemon=True,
                             name=f"close-{self.line}").start()

    # ---- lifecycle -------------------------------------------------------------------------------

    def start(self) -> "LinePipeline":
        self._started = True
        self._keeper.start()
        self._worker_thread.start()
        self._acq_thread.start()
        return self

    @property
    def engine_ready(self) -> bool:
        """The line can judge parts: a warm backend that answers."""
        return self.engine_ok

    def wait_ready(self, timeout_s: float) -> bool:
        """True once the engine is warmed up (or failed: the line then fail-safes every frame)
        and the source opened."""
        end = time.monotonic() + timeout_s
        return (self.engine_resolved.wait(max(0.0, end - time.monotonic()))
                and self.source_ready.wait(max(0.0, end - time.monotonic())))

    def request_stop(self) -> None:
        """Stop acquiring new frames (returns at once; `stop()` waits for the rest)."""
        self._stop_acquisition.set()

    def stop(self, timeout_s: float = 3.0, close_source: bool = True) -> None:
        """Stop acquiring, let in-flight frames resolve (result or deadline), then stop the rest.
        A frame the acquisition thread is still reading gets its verdict too: the read ends
        within the source's read timeout and the frame is queued before the keeper stops.
        The source is closed last (`close_source=False`: the caller calls `close_source()`, after
        every line's frames are resolved): a camera driver's stop can block the whole
        interpreter for a frame period (GenTL calls keep the GIL), which must not hold up
        the verdicts of frames already taken."""
        if not self._started:
            self.close_source()
            return
        end = time.monotonic() + timeout_s
        self._stop_acquisition.set()
        self._acq_thread.join(max(0.0, min(end - time.monotonic(), self.settings.read_timeout_s + 1.0)))
        if self._acq_thread.is_alive():
            log.warning("line %s: acquisition still in a source call at shutdown", self.line)
        # Every frame already registered resolves by its deadline at the latest.
        self._keeper.stop(timeout_s=max(0.0, min(end - time.monotonic(), self._budget_s + 0.5)))
        self._stop_worker.set()
        with self._queue_cond:
            self._queue_cond.notify_all()
        self._worker_thread.join(max(0.1, end - time.monotonic()))
        if self._worker_thread.is_alive():
            log.warning("line %s: inference worker still busy at shutdown", self.line)
        if close_source:
            self.close_source()

    def close_source(self) -> None:
        """Close the camera / replay after the acquisition thread has ended (a Source is used by
        one thread only: with the thread still inside a driver call it is left to the exit)."""
        if self._acq_thread.is_alive():
            log.warning("line %s: source not closed: the acquisition thread is still in a driver call", self.line)
            return
        self._close_source()
        self._set_camera(False)

    # ---- status ----------------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Frames waiting for the engine: queued, or taken ahead by the worker and not yet handed over."""
        return self._waiting()

    def _waiting(self) -> int:
        return len(self._queue) + (self._held is not None)

    @property
    def late_results(self) -> int:
        return self._keeper.late_results

    @property
    def state(self) -> str:
        """starting | ok | blind (camera down, a source that will deliver no more frames, or an
        acquisition loop stuck in a driver call) | engine_failed (no backend, or the one in use
        fails or stalls with no alternative left) | failing_safe (camera and engine up, but a
        quarter or more of the last 5 s of parts got the fail-safe verdict: failsafe_rate.py) |
        stopping (the daemon is stopping: no new part is taken; frames already taken still get their
        verdicts)."""
        return self._state(self._fail_safe_rate.reason())

    def _state(self, failing_safe: str | None) -> str:
        """`state` given the failing-safe reason already read (one read per heartbeat, so its state
        and its `failing_safe` always agree)."""
        if self._stop_acquisition.is_set():
            return "stopping"
        if self.engine_resolved.is_set() and not self.engine_ok:
            return "engine_failed"
        if not self.engine_resolved.is_set() or not self._source_attempted:
            return "starting"
        if not self.camera_connected or getattr(self.source, "exhausted", False) or self.acquisition_stuck:
            return "blind"
        if failing_safe is not None:
            return "failing_safe"
        return "ok"

    @property
    def acquisition_stuck(self) -> bool:
        """The acquisition loop has not come back from the source for over two read timeouts (+1 s):
        no frames will come, although the camera still counts as connected. Reported at once (the
        heartbeat goes "blind", so a reject gate stops trusting the line) instead of only when the
        systemd watchdog, much later, restarts the daemon."""
        if not self._started or self._stop_acquisition.is_set():
            return False
        return time.monotonic() - self.last_activity_mono > 2 * self.settings.read_timeout_s + 1.0

    def status(self) -> dict[str, Any]:
        """The heartbeat's `status` dict (contract: README, ZeroMQ table)."""
        failing_safe = self._fail_safe_rate.reason()
        return {"state": self._state(failing_safe), "camera_connected": self.camera_connected,
                "engine_ready": self.engine_ok,
                "frames": self.frames_acquired, "verdicts": self.verdicts, "backend": self.backend_name,
                "bundle_id": self.bundle.bundle_id, "threshold": self.threshold.value, "recipe": self.recipe,
                "engine_ms": self.engine_ms, "latency_budget_ms": self.settings.latency_budget_ms,
                "queue_depth": self.queue_depth, "deadline_misses": self.deadline_misses,
                "dropped": dict(self.dropped), "engine_errors": self.engine_errors,
                "engine_stalls": self.engine_stalls, "late_results": self.late_results,
                "ready": self.engine_resolved.is_set() and self.source_ready.is_set(),
                "failed": self.failed, "last_error": self.last_error, "failing_safe": failing_safe}

    def healthy(self, stale_s: float | None = None) -> bool:
        """For the systemd watchdog: the line's threads are alive and their loops make progress.
        Camera and engine state do not count (they go to the status, the metrics and alerts): a
        camera outage or a failed engine must never get the service killed and restarted."""
        if not self._started:
            return True
        if stale_s is None:
            stale_s = max(PROGRESS_STALE_MIN_S, 3 * self.settings.read_timeout_s + 1.0)
        now = time.monotonic()
        if not (self._acq_thread.is_alive() and self._worker_thread.is_alive()):
            return self._stop_acquisition.is_set()  # ended because we are stopping: not a hang
        if now - self.last_activity_mono > stale_s:
            return False
        return now - self.last_worker_progress_mono <= stale_s

    def summary(self) -> str:
        cam = "up" if self.camera_connected else "DOWN"
        engine = f"FAILED ({self.failed})" if self.failed else (
            self.backend_name if self.engine_ok or not self.engine_resolved.is_set()
            else f"{self.backend_name} NOT READY")
        failing = self._fail_safe_rate.reason()
        return (f"{self.line}: camera {cam}, {engine}, {self.verdicts} verdicts, "
                f"{self.deadline_misses} deadline misses" + (f", FAILING SAFE ({failing})" if failing else ""))

    # ---- acquisition -----------------------------------------------------------------------------

    def _tick_acquisition(self) -> None:
        self.last_activity_mono = time.monotonic()

    def _pause(self, seconds: float) -> bool:
        """Wait (backoff) while showing progress; True if a stop was requested meanwhile."""
        end = time.monotonic() + seconds
        while True:
            self._tick_acquisition()
            left = end - time.monotonic()
            if left <= 0:
                return self._stop_acquisition.is_set()
            if self._stop_acquisition.wait(min(left, 0.5)):
                return True

    def _acquire_loop(self) -> None:
        # Frames taken during engine warm-up could only be dropped or fail-safed: wait for it.
        while not self.engine_resolved.wait(0.1):
            self._tick_acquisition()
            if self._stop_acquisition.is_set():
                return
        backoff = self.settings.reconnect_min_s
        connected_once = False
        last_frame = time.monotonic()  # of the source as opened: a free-running camera's silence is measured from it
        while not self._stop_acquisition.is_set():
            self._tick_acquisition()
            if not self.camera_connected:
                try:
                    self.source.open()
                except Exception as exc:  # SourceError and anything a driver throws
                    msg = str(exc) if isinstance(exc, SourceError) else f"{type(exc).__name__}: {exc}"
                    self.last_error = f"source: {msg}"
                    self._source_attempted = True
                    log.error("line %s: cannot open source (retry in %.1f s): %s", self.line, backoff, msg)
                    self._close_source()
                    if self._pause(backoff):
                        break
                    backoff = min(backoff * 2, self.settings.reconnect_max_s)
                    continue
                self._set_camera(True)
                self._source_attempted = True
                if connected_once:
                    log.info("line %s: camera reconnected", self.line)
                    if self.metrics is not None:
                        self.metrics.camera_reconnects.labels(line=self.line).inc()
                else:
                    log.info("line %s: source open", self.line)
                connected_once = True
                last_frame = time.monotonic()
                self.source_ready.set()
            if self.settings.backpressure and not self._wait_for_room():
                last_frame = time.monotonic()  # not reading while our own queue is full: no silence of the camera
                continue
            try:
                frame = self.source.read(self.settings.read_timeout_s)
            except Exception as exc:  # SourceLost, or an unexpected driver error: treat it as a loss
                self._camera_lost(str(exc) if isinstance(exc, SourceLost) else f"{type(exc).__name__}: {exc}")
                # Back off before reopening too: a camera that opens and fails at once must not spin.
                if self._pause(backoff):
                    break
                backoff = min(backoff * 2, self.settings.reconnect_max_s)
                continue
            self._tick_acquisition()  # a healthy wait counts as activity
            self._sync_source_counts()
            if frame is None:
                if getattr(self.source, "exhausted", False):
                    # A source at its end (a replay that does not loop) delivers no more frames: no
                    # camera (camera_connected false, gauge 0, state "blind"). Not a loss: never
                    # reopened (a second pass); idle until stop() closes it.
                    self.last_error = "source exhausted: no more frames"
                    log.info("line %s: source exhausted: camera not connected until the daemon restarts", self.line)
                    self._set_camera(False)
                    while not self._pause(1.0):
                        pass
                    break
                silent = time.monotonic() - last_frame
                if getattr(self.source, "free_running", False) and silent > self.silent_camera_s:
                    # No error, no frames: the line would say "ok" while inspecting nothing.
                    self._camera_lost(f"no frame for {silent:.0f} s from a free-running camera and no error from "
                                      f"its driver (cable, power, or acquisition stopped); reconnecting")
                    if self._pause(backoff):
                        break
                    backoff = min(backoff * 2, self.settings.reconnect_max_s)
                continue
            last_frame = time.monotonic()
            backoff = self.settings.reconnect_min_s  # frames flow: the camera is really back
            try:
                # Also when a stop came during the read: the frame was taken, it gets its verdict.
                self._enqueue(frame)
            except Exception:  # a bug here must not end acquisition for the line
                log.exception("line %s: frame %s could not be queued", self.line, frame.frame_id)
        # The source stays open: stop() closes it once the frames taken are resolved.

    def _wait_for_room(self) -> bool:
        with self._queue_cond:
            if self._waiting() >= self.settings.queue_size:
                self._queue_cond.wait(self.settings.read_timeout_s)
            room = self._waiting() < self.settings.queue_size
        self._tick_acquisition()  # waiting on our own worker is not a stall of this loop
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

    def _set_engine_ok(self, ok: bool) -> None:
        self.engine_ok = ok
        if self.metrics is not None and hasattr(self.metrics, "engine_ready"):
            self.metrics.engine_ready.labels(line=self.line).set(1 if ok else 0)

    def _sync_source_counts(self) -> None:
        """The source's incomplete buffers and camera-skipped frames into the line's metrics. Its
        counts restart at a reopen: what it counted since then is new, not a lower baseline."""
        stats = getattr(self.source, "stats", None)
        for name, before in self._source_seen.items():
            seen = int(getattr(stats, name, 0) or 0)
            new = seen - before if seen >= before else seen
            self._source_seen[name] = seen
            if new <= 0:
                continue
            if name == "skipped_by_camera":  # no verdict for these at all: on a triggered line, parts
                log.warning("line %s: the camera numbered %d frame(s) that never reached the line (reading "
                            "fell behind its stream buffers)", self.line, new)
            if self.metrics is not None:
                if name == "incomplete_frames":
                    self.metrics.incomplete_frames.labels(line=self.line).inc(new)
                else:
                    self.metrics.dropped_frames.labels(line=self.line, reason="camera_skipped").inc(new)

    def _enqueue(self, frame: Frame) -> None:
        frame.line = self.line
        key = next(self._keys)
        self.frames_acquired += 1
        if isinstance(frame.image, np.ndarray) and frame.image.ndim >= 2:
            self.last_frame_size = (int(frame.image.shape[0]), int(frame.image.shape[1]))
            self.last_frame_channels = 1 if frame.image.ndim == 2 else int(frame.image.shape[2])
        if self.metrics is not None:
            self.metrics.last_frame_timestamp.labels(line=self.line).set(frame.acquired_ns / 1e9)
        # The clock starts at acquisition, not when the worker gets to the frame. (A keeper already
        # stopped resolves the frame at once: a frame read during shutdown still gets its verdict.)
        self._keeper.register(frame, frame.acquired_mono + self._budget_s, key=key)
        dropped: tuple[int, Frame] | None = None
        with self._queue_cond:
            if self._waiting() >= self.settings.queue_size:
                # Drop oldest: the newest part is the one still in reach. A frame the worker took ahead
                # is the oldest waiting one; resolved here, the worker finds it no longer pending.
                if self._held is not None:
                    dropped, self._held = self._held, None
                else:
                    dropped = self._queue.popleft()
            self._queue.append((key, frame))
            depth = self._waiting()
            self._queue_cond.notify()
        if self.metrics is not None:
            self.metrics.queue_depth.labels(line=self.line).set(depth)
        if dropped is not None:
            # Counted as a drop only if this resolves it: during a stall the deadline got there first.
            self._fail_safe(dropped[0], dropped[1], "dropped: inference queue full", deadline_missed=False,
                            drop_reason="queue_full")
            self._say_queue_full(dropped[1])

    def _say_queue_full(self, frame: Frame) -> None:
        """Parts failed safe because frames come faster than the engine judges them had no log line and
        no alert of their own (the deadline was never reached: no miss either). Said at the first and
        then every REPEAT_LOG_EVERY-th (acquisition thread)."""
        self._queue_full_drops += 1
        n = self._queue_full_drops
        if n == 1 or n % REPEAT_LOG_EVERY == 0:
            engine_ms = self._active.engine_ms
            per_frame = f" (its engine took {engine_ms:.1f} ms per frame at start)" if engine_ms else ""
            log.warning("line %s: frame %s got the fail-safe verdict, inference queue full: frames arrive faster "
                        "than the engine judges them%s; %d so far. Lower the camera's frame rate or deploy a faster "
                        "bundle or backend", self.line, frame.frame_id, per_frame, n)

    # ---- inference -------------------------------------------------------------------------------

    def _worker_loop(self) -> None:
        try:
            first = self._active
            if not self._install_runner(first, self._open_engine(first)):
                self._follow_active()
            counted = first.runner  # the engine whose errors in a row are being counted
            # With frames waiting, the next one is taken and prepared while the engine judges this
            # one, and handed to the engine before this one's verdict is built and delivered: that
            # serial work no longer leaves the engine idle (RESULTS §25). Without a backlog nothing
            # waits and each frame goes through alone, as before.
            ahead: _Taken | None = None
            in_flight: _InFlight | None = None
            while True:
                if in_flight is None:
                    taken, ahead = ahead or self._take(), None
                    if taken is None:
                        break
                    active = self._active        # once per frame: engine, bundle, ROI, threshold together
                    if active.runner is not counted:  # a switch (or a new engine): its own count from zero
                        self._stalled = False
                        self._consecutive_engine_errors = 0
                        counted = active.runner
                    in_flight = self._start(active, taken)
                if in_flight is not None:
                    active = in_flight.active
                    ahead = ahead or self._take_ahead(active)
                    outcome = self._collect(in_flight)
                    following = None
                    # The same recipe still active and its engine answering: the next frame goes in first.
                    if outcome is not None and ahead is not None and ahead.error is None and self._active is active:
                        following, ahead = self._start(active, ahead), None
                    if outcome is not None:
                        self._finish(in_flight, *outcome)
                    in_flight = following
                    if in_flight is not None:
                        continue
                if active.runner is None and self._active is active:
                    self._retry_engine(active)
                if active.runner is not None and (self._stalled or
                                                  self._consecutive_engine_errors >= self._failover_after):
                    if self._active is active:
                        if not self._install_runner(active, self._fail_over(active, active.runner)):
                            self._follow_active()
                    else:  # switched away meanwhile: the outgoing engine's trouble is not the new recipe's
                        self._stalled = False
                        self._consecutive_engine_errors = 0
                self._close_retired()
        except Exception as exc:  # never let one line's worker take the process down
            self.failed = f"worker crashed: {type(exc).__name__}: {exc}"
            self._set_engine_ok(False)
            log.exception("line %s: inference worker crashed; frames now get the fail-safe verdict", self.line)
            self.engine_resolved.set()
            self._fail_safe_loop(self.failed)
        finally:
            runner = self._active.runner
            if runner is not None and not runner.close(RUNNER_CLOSE_S):
                log.warning("line %s: backend %s still stuck in a call at shutdown", self.line, self.backend_name)
            with self._swap_lock:
                retired, self._retired = self._retired, []
            for old in retired:
                old.close(0.0 if old.busy else 1.0)

    def _retry_engine(self, active: ActiveRecipe) -> None:
        """The active recipe has no engine (its open failed): open it again once the back-off has
        passed (frames meanwhile get the fail-safe verdict, as they did since the failure)."""
        now = time.monotonic()
        if self._retry_at is None:
            self._retry_wait_s = self.engine_retry_s[0]
            self._retry_at = now + self._retry_wait_s
            return
        if now < self._retry_at:
            return
        # Not the backends given up at run time (failing or hung): unless they are all there is.
        remaining = tuple(b for b in self.settings.backend_preference if b not in self._excluded_backends)
        log.warning("line %s: opening the engine again (%s)", self.line, self.failed)
        runner = self._open_engine(active, dataclasses.replace(self.settings, backend_preference=remaining)
                                   if remaining else None)
        if not self._install_runner(active, runner):
            self._follow_active()
        if runner is None:
            self._retry_wait_s = min(2.0 * self._retry_wait_s, self.engine_retry_s[1])
            self._retry_at = time.monotonic() + self._retry_wait_s
        else:
            self._retry_at = None

    def _follow_active(self) -> None:
        """A switch won over an open the worker made for the recipe it replaced (the first open, a
        retry or a fail-over): the line runs the switched-in recipe's engine, so the status, the
        figures and the metrics say that one's, whatever the lost open wrote meanwhile."""
        now_active = self._active
        self.failed = None if now_active.runner is not None else self.failed
        self.backend_name = now_active.backend
        self._set_engine_ok(now_active.runner is not None)
        self._set_engine_ms(now_active.engine_ms)
        if self.metrics is not None:
            self.metrics.set_engine(self.line, now_active.backend, now_active.bundle.bundle_id)

    def _install_runner(self, expected: ActiveRecipe, runner: "_EngineRunner | None") -> bool:
        """The worker's new runner for the recipe it opened it for (True); if a recipe was switched in
        meanwhile, that one wins and the runner is retired (closed between frames; False)."""
        with self._swap_lock:
            if self._active is expected:
                self._active = dataclasses.replace(expected, runner=runner, backend=self.backend_name,
                                                   engine_ms=self.engine_ms)
                return True
            if runner is not None and runner is not expected.runner:
                self._retired.append(runner)
            return False

    def _fail_over(self, recipe: ActiveRecipe, runner: _EngineRunner) -> _EngineRunner | None:
        """The recipe's backend (its `runner`) keeps failing or stalled: give it up and open the next
        one of the line's list for the same recipe (through the opener, so the parity gate applies).
        Without another backend, keep this one (the line is not ready until it answers again)."""
        failed = recipe.backend
        why = "stalled" if self._stalled else f"failed {self._consecutive_engine_errors} frames in a row"
        remaining = tuple(b for b in self.settings.backend_preference
                          if b != failed and b not in self._excluded_backends)
        self._consecutive_engine_errors = 0
        self._stalled = False
        was_ok = self.engine_ok
        self._set_engine_ok(False)
        if not remaining:
            if was_ok:  # once per outage, not per frame
                log.error("line %s: backend %s %s and no other backend is configured; keeping it "
                          "(line not ready until it answers again)", self.line, failed, why)
            return runner
        log.error("line %s: backend %s %s (last: %s); falling back to %s",
                  self.line, failed, why, self.last_error, ", ".join(remaining))
        self._excluded_backends.append(failed)
        if self.metrics is not None:  # labelled with the backend that was given up
            self.metrics.backend_fallbacks.labels(line=self.line, backend=failed).inc()
        if not runner.close(0.0 if runner.busy else RUNNER_CLOSE_S):
            # A stalled call cannot be interrupted: its thread closes the backend if it ever returns.
            log.warning("line %s: backend %s left behind in a stalled call", self.line, failed)
        return self._open_engine(recipe, dataclasses.replace(self.settings, backend_preference=remaining))

    def _open_engine(self, recipe: ActiveRecipe, settings: LineSettings | None = None) -> _EngineRunner | None:
        """An engine for `recipe` (its bundle, its threshold for the gate), whatever the line runs
        by the time the open returns (a switch may win meanwhile: _install_runner decides)."""
        settings = settings or self.settings

        def on_fallback(name: str, reason: str) -> None:
            log.warning("line %s: backend %s not used: %s", self.line, name, reason)
            if self.metrics is not None:  # labelled with the backend that was skipped
                self.metrics.backend_fallbacks.labels(line=self.line, backend=name).inc()

        try:
            return self._open_runner(recipe, settings, on_fallback)
        finally:
            self._tick_worker()
            self.engine_resolved.set()

    def _open_runner(self, recipe: ActiveRecipe, settings: LineSettings,
                     on_fallback: Callable[[str, str], None]) -> _EngineRunner | None:
        runner = _EngineRunner(self.line)
        bundle = recipe.bundle
        try:
            # Loading and parity-gating a backend (never building one): on its own thread, bounded.
            _, info = runner.open(
                lambda: self._backend_opener(bundle, settings, on_fallback, recipe.threshold.value),
                ENGINE_OPEN_STALE_S, self._tick_worker)
        except Exception as exc:
            self.failed = f"no backend: {exc}"
            self.backend_name = "none"
            self._set_engine_ok(False)
            self._set_engine_ms(None)
            log.error("line %s: %s; every frame gets the fail-safe verdict %s", self.line, self.failed,
                      self.settings.on_deadline_miss)
            runner.close(0.0 if runner.busy else RUNNER_CLOSE_S)
            return None
        self.backend_name = info.backend
        if self.metrics is not None:
            self.metrics.set_engine(self.line, info.backend, bundle.bundle_id)
        try:
            # Warm-up: first inference allocates arenas / loads kernels; keep it out of the budget.
            engine_ms = self._warm_up(runner, bundle, self._tick_worker)
        except Exception as exc:
            self.failed = f"warm-up failed: {exc}"
            self._set_engine_ok(False)
            self._set_engine_ms(None)
            log.error("line %s: %s", self.line, self.failed)
            runner.close(0.0 if runner.busy else RUNNER_CLOSE_S)
            return None
        self.failed = None
        self._set_engine_ok(True)
        self._set_engine_ms(engine_ms)
        log.info("line %s: engine %s warmed up (bundle %s, %.1f ms per frame)", self.line, info.backend,
                 bundle.bundle_id, engine_ms)
        self._check_engine_time(engine_ms, info.backend)
        return runner

    def _tick_worker(self) -> None:
        self.last_worker_progress_mono = time.monotonic()

    def _next_item(self) -> tuple[int, Frame] | None:
        with self._queue_cond:
            while not self._queue:
                self._tick_worker()  # idle is not stuck
                if self._stop_worker.is_set():
                    return None
                self._queue_cond.wait(0.5)
            item = self._queue.popleft()
            self._queue_cond.notify_all()  # room for a back-pressured source
            self._tick_worker()
            depth = self._waiting()
        if self.metrics is not None:
            self.metrics.queue_depth.labels(line=self.line).set(depth)
        return item

    def _take(self) -> "_Taken | None":
        """The next frame, waiting for one (None: the worker is stopping and the queue is empty)."""
        item = self._next_item()
        return None if item is None else _Taken(*item)

    def _take_ahead(self, active: ActiveRecipe) -> "_Taken | None":
        """A frame already waiting (never waits for one), prepared for `active`."""
        with self._queue_cond:
            if not self._queue:
                return None
            key, frame = self._queue.popleft()
            self._held = (key, frame)  # still waiting (queue_depth, the queue bound) until handed over
            depth = self._waiting()
        self._tick_worker()
        if self.metrics is not None:
            self.metrics.queue_depth.labels(line=self.line).set(depth)
        return self._prepared(active, _Taken(key, frame))

    def _release_held(self, key: int) -> None:
        """The frame taken ahead is being handed over (or given up): it no longer waits."""
        if self._held is None or self._held[0] != key:
            return
        with self._queue_cond:
            if self._held is not None and self._held[0] == key:
                self._held = None
                self._queue_cond.notify_all()  # room for a back-pressured source

    @staticmethod
    def _prepared(active: ActiveRecipe, taken: "_Taken") -> "_Taken":
        """`taken` with its batch for `active`'s input and ROI, or the reason there is none."""
        try:
            image = taken.frame.image
            if not isinstance(image, np.ndarray):  # the source's reason when it gave one
                raise DataError(taken.frame.meta.get("error") or f"frame image is a {type(image).__name__}, not an array")
            batch = preprocess.prepare(image, active.bundle.input_spec, active.roi)[None]
        except Exception as exc:
            return dataclasses.replace(taken, batch=None, prepared_for=active, error=str(exc))
        return dataclasses.replace(taken, batch=batch, prepared_for=active, error=None)

    def _fail_safe_loop(self, why: str) -> None:
        with self._queue_cond:
            held, self._held = self._held, None
        if held is not None:
            self._fail_safe(held[0], held[1], why, deadline_missed=False, drop_reason="engine_error")
        while True:
            item = self._next_item()
            if item is None:
                return
            self._fail_safe(item[0], item[1], why, deadline_missed=False, drop_reason="engine_error")

    def _say_malformed(self, frame: Frame, why: str) -> None:
        """One log line per new reason, then every REPEAT_LOG_EVERY-th frame: a camera that changed its
        frame size gives every frame the same reason, 20 a second (each still counted and fail-safe)."""
        self._malformed_run = self._malformed_run + 1 if why == self._malformed_why else 1
        self._malformed_why = why
        if self._malformed_run == 1 or self._malformed_run % REPEAT_LOG_EVERY == 0:
            again = f" ({self._malformed_run} frames in a row)" if self._malformed_run > 1 else ""
            log.warning("line %s: frame %s malformed%s: %s", self.line, frame.frame_id, again, why)

    def _start(self, active: ActiveRecipe, taken: "_Taken") -> "_InFlight | None":
        """Hand the frame to `active`'s engine; None when it is resolved without it (late already,
        no engine, malformed, the engine refusing the call)."""
        key, frame = taken.key, taken.frame
        self._release_held(key)
        if not self._keeper.is_pending(key):
            return None  # already resolved by its deadline while queued: do not spend the engine on it
        runner = active.runner
        if runner is None:
            self._fail_safe(key, frame, self.failed or "no backend", deadline_missed=False,
                            drop_reason="engine_error")
            return None
        if taken.prepared_for is not active:
            taken = self._prepared(active, taken)
        if taken.error is not None or taken.batch is None:
            why = taken.error or "not prepared"
            self._say_malformed(frame, why)
            self._fail_safe(key, frame, f"malformed frame: {why}", deadline_missed=False, drop_reason="malformed")
            return None
        queue_ms = (time.monotonic() - frame.acquired_mono) * 1000.0
        try:
            runner.start_infer(taken.batch)
        except Exception as exc:
            self._engine_failed_on(key, frame, exc)
            return None
        return _InFlight(active, runner, key, frame, queue_ms)

    def _collect(self, job: "_InFlight") -> tuple[float, np.ndarray, float] | None:
        """The engine's raw score, map and call time for the frame in flight; None when it failed
        (the frame then has its fail-safe verdict)."""
        try:
            raw_scores, maps = job.runner.collect_infer(self.stall_after_s, self._tick_worker)
            raw = float(raw_scores[0])
            if not math.isfinite(raw):
                raise ValueError(f"non-finite score {raw}")
            if not np.isfinite(maps[0]).all():
                raise ValueError("non-finite values in the anomaly map")
        except Exception as exc:
            self._engine_failed_on(job.key, job.frame, exc)
            return None
        self._consecutive_engine_errors = 0
        if not self.engine_ok:  # a kept backend that answers again
            self._set_engine_ok(True)
        infer_s = job.runner.last_call_s
        if self.metrics is not None:
            self.metrics.inference_seconds.labels(line=self.line, backend=job.active.backend).observe(infer_s)
        return raw, maps[0], infer_s

    def _finish(self, job: "_InFlight", raw: float, anomaly_map: np.ndarray, infer_s: float) -> None:
        """The frame's verdict from its engine result, delivered (unless its deadline came first)."""
        active, frame = job.active, job.frame
        if not self._keeper.claim(job.key):
            log.debug("line %s: late result for frame %s (%.1f ms after acquisition) not published",
                      self.line, frame.frame_id, (time.monotonic() - frame.acquired_mono) * 1000)
            return
        threshold = active.threshold.value
        score = float(active.bundle.normalize(raw))
        verdict = "NG" if score > threshold else "OK"
        # Fixed display range; resizing and encoding happen in the publisher thread.
        heatmap = active.bundle.heatmap_u8(anomaly_map) if self._wants_heatmap(verdict) else None
        result = Verdict(
            line=self.line, frame_id=frame.frame_id, acquired_ns=frame.acquired_ns, verdict=verdict,
            score=score, raw_score=raw, threshold=threshold,
            latency_ms=(time.monotonic() - frame.acquired_mono) * 1000.0, deadline_missed=False,
            backend=active.backend, bundle_id=active.bundle.bundle_id, heatmap=heatmap, meta=frame.meta,
            frame=frame, anomaly_map=anomaly_map, recipe=active.name, queue_ms=job.queue_ms,
            infer_ms=infer_s * 1000.0)
        self._deliver(result)
        shadow = self.shadow
        if shadow is not None:  # after the verdict went out; never waits (a full shadow queue drops)
            shadow.offer(frame, result)

    def _engine_failed_on(self, key: int, frame: Frame, exc: Exception) -> None:
        self.engine_errors += 1
        if isinstance(exc, EngineStalled):
            if not isinstance(exc, EngineBusy):
                self.engine_stalls += 1
            self._stalled = True
            self.last_error = f"engine stalled: {exc}"
        else:
            self._consecutive_engine_errors += 1
            self.last_error = f"engine: {exc}"
        if self.metrics is not None:
            self.metrics.engine_errors.labels(line=self.line).inc()
        log.error("line %s: engine error on frame %s: %s", self.line, frame.frame_id, self.last_error)
        why = self.last_error if isinstance(exc, EngineStalled) else f"engine error: {exc}"
        self._fail_safe(key, frame, why, deadline_missed=False, drop_reason="engine_error")

    def _wants_heatmap(self, verdict: str) -> bool:
        mode = self.settings.heatmap_mode
        archived = self.settings.archive_enabled and (verdict == "NG" or self.settings.archive_save == "all")
        return mode == "all" or (mode == "ng" and verdict == "NG") or archived

    # ---- verdicts --------------------------------------------------------------------------------

    def _on_deadline(self, frame: Frame, reason: str) -> None:
        """DeadlineKeeper callback (its thread): the frame had no result in time."""
        self._deliver(self._fail_safe_verdict(frame, f"no result within {self.settings.latency_budget_ms:g} ms"
                                              + ("" if reason == "deadline" else f" ({reason})"),
                                              deadline_missed=True))

    def _fail_safe(self, key: int, frame: Frame, why: str, deadline_missed: bool,
                   drop_reason: str | None = None) -> None:
        """Resolve the frame with the fail-safe verdict, unless it already is resolved (then it
        is neither delivered nor counted again)."""
        if not self._keeper.claim(key, result=False):
            return
        if drop_reason is not None:
            self._count_drop(drop_reason)
        self._deliver(self._fail_safe_verdict(frame, why, deadline_missed))

    def _fail_safe_verdict(self, frame: Frame, why: str, deadline_missed: bool) -> Verdict:
        active = self._active  # one read: recipe, bundle and threshold of the same recipe
        return Verdict(line=self.line, frame_id=frame.frame_id, acquired_ns=frame.acquired_ns,
                       verdict=self.settings.on_deadline_miss, score=None, raw_score=None,
                       threshold=active.threshold.value,
                       latency_ms=(time.monotonic() - frame.acquired_mono) * 1000.0,
                       deadline_missed=deadline_missed, backend=active.backend,
                       bundle_id=active.bundle.bundle_id, error=why, meta=frame.meta, frame=frame,
                       recipe=active.name)

    def _count_drop(self, reason: str) -> None:
        with self._count_lock:
            self.dropped[reason] += 1
        if self.metrics is not None:
            self.metrics.dropped_frames.labels(line=self.line, reason=reason).inc()

    def _deliver(self, verdict: Verdict) -> None:
        """The one exit of a verdict (worker or deadline thread): counters, then the sinks."""
        with self._count_lock:
            self.verdicts += 1
            if verdict.deadline_missed:
                self.deadline_misses += 1
        if verdict.deadline_missed:
            log.warning("line %s: frame %s deadline missed -> %s", self.line, verdict.frame_id, verdict.verdict)
        self._fail_safe_rate.record(verdict.score is None, verdict.error)
        try:
            self.sink.accept(verdict)
        except Exception:  # Sinks isolates its own; a bare callable sink may still raise
            log.exception("line %s: verdict sink failed for frame %s", self.line, verdict.frame_id)
