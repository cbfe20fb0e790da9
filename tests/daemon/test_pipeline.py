"""LinePipeline with real parts: ReplaySource on generated images, the tiny bundle on ONNX Runtime,
the real Metrics registry. The only doubles are backends wrapping the real ORT backend to be slow
or to return NaN (named as such), to drive the deadline and engine-error paths."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from inspectd.daemon.frame import Verdict
from inspectd.daemon.line import LineSettings, LineThreshold
from inspectd.daemon.metrics import Metrics
from inspectd.daemon.pipeline import ENGINE_START_CALLS, WARMUP_CALLS, LinePipeline, default_backend_opener
from inspectd.daemon.sinks import MetricsSink, Sinks
from inspectd.daemon.sources.replay import ReplaySource
from inspectd.engines import preprocess
from inspectd.engines.bundle import Bundle, load_bundle
from inspectd.engines.preprocess import load_stored
from inspectd.engines.runtime import Backend, EngineInfo, open_backend
from inspectd.errors import ConfigError

from tests.helpers import Collector, sample as _sample, train_colour_bundle
from tests.reliability.conftest import line_settings

THRESHOLD = 5.0


class SlowOrtBackend(Backend):
    """TEST DOUBLE: the real ONNX Runtime backend plus a sleep after its first `warmup_calls` calls
    (by default the warm-up and the timed start-up calls: a blocked engine)."""

    name = "onnxruntime"

    def __init__(self, inner: Backend, delay_s: float, warmup_calls: int = ENGINE_START_CALLS) -> None:
        super().__init__(inner.bundle)
        self.inner, self.delay_s, self._free = inner, delay_s, warmup_calls
        self.completed = 0

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self.inner.infer(batch)
        if self._free > 0:
            self._free -= 1
        else:
            time.sleep(self.delay_s)
            self.completed += 1
        return out

    def close(self) -> None:
        self.inner.close()


class NanOrtBackend(SlowOrtBackend):
    """TEST DOUBLE: the real ONNX Runtime backend whose scores turn NaN after warm-up."""

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores, maps = super().infer(batch)
        return (np.full_like(scores, np.nan), maps) if self.completed else (scores, maps)


def _opener(wrap: Any) -> Any:
    def opener(bundle: Bundle, settings: LineSettings, on_fallback: Any,
               threshold: float) -> tuple[Backend, EngineInfo]:
        backend, info = open_backend(bundle, ["onnxruntime"], on_fallback=on_fallback)
        return wrap(backend), info
    return opener


@pytest.fixture(scope="module")
def bundle(tiny_bundle: Path) -> Bundle:
    return load_bundle(tiny_bundle)


@pytest.fixture(scope="module")
def replay_dir(tmp_path_factory: pytest.TempPathFactory, synthetic_parts: Any) -> Path:
    """good/ and bad/ subfolders, so the replay source labels each frame."""
    root = tmp_path_factory.mktemp("replay")
    shutil.copytree(synthetic_parts.test_good, root / "good")
    shutil.copytree(synthetic_parts.test_bad, root / "bad", ignore=shutil.ignore_patterns("masks"))
    return root


def _sinks(out: Collector, metrics: Metrics | None) -> Sinks:
    """The collector plus the metrics sink, as run.py wires a line (publisher -> collector here)."""
    sinks = Sinks().add("collector", out)
    return sinks.add("metrics", MetricsSink(metrics)) if metrics is not None else sinks


def _run_line(settings: LineSettings, source: Any, bundle: Bundle, n: int, threshold: float = THRESHOLD,
              opener: Any = default_backend_opener, metrics: Metrics | None = None,
              settle_s: float = 0.0) -> tuple[list[Verdict], Collector, LinePipeline]:
    out = Collector()
    pipe = LinePipeline(settings, source, bundle, LineThreshold(settings.line, value=threshold),
                        _sinks(out, metrics), metrics=metrics, backend_opener=opener).start()
    try:
        assert pipe.wait_ready(30.0)
        verdicts = out.wait_for(n)
        time.sleep(settle_s)  # late results / stray duplicates would show up here
    finally:
        pipe.stop(timeout_s=3.0)
    return verdicts, out, pipe


def test_replay_gives_the_engines_verdicts(bundle: Bundle, replay_dir: Path) -> None:
    files = sorted(p for p in replay_dir.rglob("*.png"))
    # Expected: the same engine called directly on the same files.
    backend, _ = open_backend(bundle, ["onnxruntime"])
    with backend:
        expected, expected_raw = {}, {}
        for p in files:
            raw = float(backend.infer(preprocess.load_prepared(p, bundle.input_spec)[None])[0][0])
            expected[p.name + p.parent.name] = "NG" if bundle.normalize(raw) > THRESHOLD else "OK"
            expected_raw[p.name + p.parent.name] = raw
    metrics = Metrics()
    settings = line_settings("L1", latency_budget_ms=2000, backend_preference=("onnxruntime",),
                            heatmap_mode="ng", queue_size=64)
    verdicts, _, pipe = _run_line(settings, ReplaySource("L1", replay_dir), bundle, len(files), metrics=metrics,
                                  settle_s=0.3)
    assert len(verdicts) == len(files)  # exactly one verdict per frame
    assert [v.frame_id for v in verdicts] == list(range(1, len(files) + 1))
    got = {Path(v.meta["path"]).name + Path(v.meta["path"]).parent.name: v.verdict for v in verdicts}
    assert got == expected
    # Each frame's own score (frames are judged back to back, the next handed over while one goes out).
    got_raw = {Path(v.meta["path"]).name + Path(v.meta["path"]).parent.name: v.raw_score for v in verdicts}
    assert got_raw == pytest.approx(expected_raw, rel=1e-5, abs=1e-5)
    by_label = {lab: [v.verdict for v in verdicts if v.meta.get("label") == lab] for lab in ("good", "bad")}
    assert by_label["good"] and all(x == "OK" for x in by_label["good"])
    assert sum(x == "NG" for x in by_label["bad"]) >= len(by_label["bad"]) // 2
    for v in verdicts:
        assert not v.deadline_missed and v.error is None and v.backend == "onnxruntime"
        assert v.score == pytest.approx(float(bundle.normalize(v.raw_score)))
        assert v.threshold == THRESHOLD and v.bundle_id == bundle.bundle_id
        # heatmap per config: NG only, at the model's map size, fixed display range
        assert (v.heatmap is not None) == (v.verdict == "NG")
        if v.heatmap is not None:
            assert v.heatmap.dtype == np.uint8 and v.heatmap.shape == bundle.map_shape
    n_ng = sum(v.verdict == "NG" for v in verdicts)
    assert _sample(metrics, "inspectd_frames_total", line="L1", verdict="NG") == n_ng
    assert _sample(metrics, "inspectd_frames_total", line="L1", verdict="OK") == len(files) - n_ng
    assert _sample(metrics, "inspectd_inference_seconds_count", line="L1", backend="onnxruntime") == len(files)
    assert _sample(metrics, "inspectd_engine_info", line="L1", backend="onnxruntime",
                   bundle_id=bundle.bundle_id) == 1
    assert _sample(metrics, "inspectd_camera_connected", line="L1") == 0  # closed by stop()
    assert _sample(metrics, "inspectd_deadline_misses_total", line="L1") == 0
    assert pipe.status()["verdicts"] == len(files)


def test_deadline_miss_verdicts_arrive_at_the_deadline_and_late_results_are_not_published(
        bundle: Bundle, replay_dir: Path) -> None:
    budget_ms = 150
    slow: list[SlowOrtBackend] = []

    def wrap(inner: Backend) -> Backend:
        slow.append(SlowOrtBackend(inner, delay_s=0.6))
        return slow[-1]

    metrics = Metrics()
    settings = line_settings("slow", latency_budget_ms=budget_ms, on_deadline_miss="NG",
                            backend_preference=("onnxruntime",), queue_size=16)
    source = ReplaySource("slow", replay_dir / "good", fps=4)
    verdicts, out, pipe = _run_line(settings, source, bundle, 3, opener=_opener(wrap), metrics=metrics,
                                    settle_s=1.0)  # let the engine finish a frame after its deadline
    first = verdicts[:3]
    for v, arrived in zip(first, out.arrived_ns[:3]):
        assert v.deadline_missed is True and v.verdict == "NG" and v.score is None
        assert "no result within 150 ms" in (v.error or "")
        late_by_ms = (arrived - v.acquired_ns) / 1e6
        # Fired by the deadline thread while the engine sleeps 600 ms: at the budget, not after the engine.
        assert budget_ms - 5 <= late_by_ms < budget_ms + 300, late_by_ms
    assert slow[0].completed >= 1          # the engine did finish frames after their deadline ...
    assert pipe.late_results >= 1          # ... and those results were counted, not published
    ids = [v.frame_id for v in out.verdicts]
    assert len(ids) == len(set(ids))       # never a second verdict for a frame
    assert all(v.deadline_missed for v in out.verdicts)
    assert _sample(metrics, "inspectd_deadline_misses_total", line="slow") == len(out.verdicts)
    assert _sample(metrics, "inspectd_frames_total", line="slow", verdict="NG") == len(out.verdicts)


@pytest.mark.parametrize("delay_s, level, says", [
    (0.08, "ERROR", "over the latency budget of 50 ms"),       # slower than the whole budget
    (0.03, "WARNING", "more than half the latency budget"),    # two calls do not fit
    (0.0, None, None),                                         # the tiny engine: a few ms
])
def test_an_engine_too_slow_for_the_budget_is_said_at_start(bundle: Bundle, replay_dir: Path,
                                                            caplog: pytest.LogCaptureFixture,
                                                            delay_s: float, level: str | None,
                                                            says: str | None) -> None:
    """Timed after warm-up, before any part: the log says it (with the way out), the heartbeat and
    the metrics carry the figure beside the budget. The line still starts and judges parts."""
    metrics = Metrics()
    settings = line_settings("t", latency_budget_ms=50, backend_preference=("onnxruntime",), queue_size=16)
    opener = _opener(lambda inner: SlowOrtBackend(inner, delay_s=delay_s, warmup_calls=WARMUP_CALLS))
    with caplog.at_level("WARNING", logger="inspectd.pipeline"):
        _, _, pipe = _run_line(settings, ReplaySource("t", replay_dir / "good", fps=2), bundle, 1,
                               opener=opener, metrics=metrics)
    said = [r for r in caplog.records if "per frame on this machine" in r.getMessage()]
    engine_ms = pipe.status()["engine_ms"]
    assert pipe.status()["latency_budget_ms"] == 50
    assert _sample(metrics, "inspectd_latency_budget_seconds", line="t") == pytest.approx(0.05)
    assert _sample(metrics, "inspectd_engine_seconds_at_start", line="t") == pytest.approx(engine_ms / 1000)
    if level is None:
        assert not said and engine_ms < 25
        return
    assert engine_ms >= delay_s * 1000
    assert len(said) == 1 and said[0].levelname == level, [(r.levelname, r.getMessage()) for r in said]
    assert says in said[0].getMessage() and "--members 1" in said[0].getMessage()


def test_a_recipe_engine_is_held_against_the_budget_and_a_shadow_only_timed(bundle: Bundle, replay_dir: Path,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    """open_recipe_engine (a switched-in or preloaded recipe) says an engine over half the budget;
    a shadow's engine (check_budget False: off the critical path, on one thread) is timed only."""
    settings = line_settings("r", latency_budget_ms=50, backend_preference=("onnxruntime",), queue_size=4)
    opener = _opener(lambda inner: SlowOrtBackend(inner, delay_s=0.03, warmup_calls=WARMUP_CALLS))
    pipe = LinePipeline(settings, ReplaySource("r", replay_dir / "good"), bundle,
                        LineThreshold("r", value=THRESHOLD), Collector(), backend_opener=opener)
    opened = []
    with caplog.at_level("WARNING", logger="inspectd.pipeline"):
        for name, check in (("shadow", False), ("B", True)):
            opened.append(pipe.open_recipe_engine(name, bundle, LineThreshold("r", value=THRESHOLD), None,
                                                  check_budget=check))
    for recipe in opened:
        assert recipe.runner is not None and recipe.runner.close(5.0)
    assert all(r.engine_ms is not None and r.engine_ms >= 30 for r in opened)
    said = [r.getMessage() for r in caplog.records if "per frame on this machine" in r.getMessage()]
    assert len(said) == 1 and "recipe 'B' engine takes" in said[0], said


def test_skip_policy_and_drop_oldest_when_the_queue_is_full(bundle: Bundle, replay_dir: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """Also said in the log (once, then every 100th): found on the camera line at 60 fps, 43 % of the
    parts failed safe this way with nothing in the journal and no alert (no deadline was missed)."""
    metrics = Metrics()
    settings = line_settings("q", latency_budget_ms=5000, on_deadline_miss="SKIP",
                            backend_preference=("onnxruntime",), queue_size=1)
    source = ReplaySource("q", replay_dir / "bad")  # 12 frames as fast as the source goes
    opener = _opener(lambda inner: SlowOrtBackend(inner, delay_s=0.15))
    with caplog.at_level("WARNING", logger="inspectd.pipeline"):
        verdicts, out, _ = _run_line(settings, source, bundle, 12, opener=opener, metrics=metrics, settle_s=0.5)
    said = [r.getMessage() for r in caplog.records
            if "got the fail-safe verdict, inference queue full" in r.getMessage()]
    assert len(said) == 1 and "frames arrive faster than the engine judges them" in said[0], said
    assert sorted(v.frame_id for v in out.verdicts) == list(range(1, 13))  # every frame: one verdict
    dropped = [v for v in out.verdicts if v.error and "queue full" in v.error]
    assert dropped, "a 1-deep queue behind a 150 ms engine must drop"
    assert all(v.verdict == "SKIP" and not v.deadline_missed for v in dropped)
    assert _sample(metrics, "inspectd_dropped_frames_total", line="q", reason="queue_full") == len(dropped)
    # drop oldest: the newest frame is never the one dropped
    assert 12 not in {v.frame_id for v in dropped}


def test_a_frame_taken_ahead_still_counts_against_the_queue_bound(bundle: Bundle, replay_dir: Path) -> None:
    """`queue_size` bounds how many frames wait for the engine, so how stale a judged part can be. The
    worker takes a waiting frame ahead while the engine runs (to prepare it meanwhile); that frame
    still waits: it counts in the queue depth and, being the oldest, is dropped first when newer parts
    arrive. Before: with queue_size 2, three parts waited (the one taken ahead judged after a whole
    extra engine call while newer parts were dropped)."""
    engine_s = 0.2
    settings = line_settings("qa", latency_budget_ms=10_000, backend_preference=("onnxruntime",), queue_size=2)
    out = Collector()
    pipe = LinePipeline(settings, ReplaySource("qa", replay_dir / "bad", fps=25), bundle,  # a part every 40 ms
                        LineThreshold("qa", value=THRESHOLD), out,
                        backend_opener=_opener(lambda inner: SlowOrtBackend(inner, delay_s=engine_s))).start()
    depths: list[int] = []
    try:
        assert pipe.wait_ready(30.0)
        end = time.monotonic() + 30.0
        while len(out.verdicts) < 12 and time.monotonic() < end:
            depths.append(pipe.queue_depth)
            time.sleep(0.002)
    finally:
        pipe.stop(timeout_s=3.0)
    assert sorted(v.frame_id for v in out.verdicts) == list(range(1, 13))
    judged = [v for v in out.verdicts if v.score is not None]
    assert max(v.frame_id for v in judged) == 12  # drop oldest: the newest part is judged
    assert 2 in depths and max(depths) == 2, sorted(set(depths))
    dropped = [v for v in out.verdicts if v.error and "queue full" in v.error]
    assert len(judged) + len(dropped) == 12
    # From the verdicts alone: when each judged part went to the engine, how many others were waiting
    # (acquired before, handed over or dropped after)? With queue_size 2: at most one.
    ms = 1e6
    started = {v.frame_id: v.acquired_ns + v.queue_ms * ms for v in judged}
    ended = {**started, **{v.frame_id: v.acquired_ns + v.latency_ms * ms for v in dropped}}
    acquired = {v.frame_id: v.acquired_ns for v in out.verdicts}
    others = {f: sum(1 for g in ended if g != f and acquired[g] + ms <= t < ended[g] - ms) for f, t in started.items()}
    assert max(others.values()) <= 1, others


def test_replay_as_fast_as_the_pipeline_takes_is_back_pressured_not_dropped(bundle: Bundle,
                                                                             replay_dir: Path) -> None:
    metrics = Metrics()
    settings = line_settings("bp", latency_budget_ms=5000, backend_preference=("onnxruntime",),
                            queue_size=1, backpressure=True)
    opener = _opener(lambda inner: SlowOrtBackend(inner, delay_s=0.05))
    verdicts, out, _ = _run_line(settings, ReplaySource("bp", replay_dir / "bad"), bundle, 12, opener=opener,
                                 metrics=metrics, settle_s=0.2)
    assert [v.frame_id for v in out.verdicts] == list(range(1, 13))
    assert all(v.score is not None and v.error is None for v in out.verdicts)
    assert _sample(metrics, "inspectd_dropped_frames_total", line="bp", reason="queue_full") == 0


class StampingOrtBackend(SlowOrtBackend):
    """TEST DOUBLE: the real ONNX Runtime backend, slowed as SlowOrtBackend, that stamps when each
    call after warm-up starts."""

    def __init__(self, inner: Backend, delay_s: float) -> None:
        super().__init__(inner, delay_s)
        self.started: list[float] = []

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._free == 0:
            self.started.append(time.monotonic())
        return super().infer(batch)


def test_with_frames_waiting_the_engine_judges_the_next_while_the_last_verdict_goes_out(
        bundle: Bundle, replay_dir: Path) -> None:
    """With a backlog, the worker hands the next frame to the engine before it delivers the verdict it
    just got (and prepares that next frame while the engine runs): the engine is not idle while a
    verdict is built, encoded and delivered. Measured: the daemon took 90 % of the engine's own
    throughput, all of the rest being this serial work (RESULTS §25)."""
    made: list[StampingOrtBackend] = []

    def wrap(inner: Backend) -> Backend:
        made.append(StampingOrtBackend(inner, delay_s=0.03))
        return made[-1]

    delivered: dict[int, float] = {}

    def slow_sink(v: Verdict) -> None:
        """TEST SINK: stamps each verdict as it arrives, then takes 20 ms (an archive on a slow disk)."""
        delivered[v.frame_id] = time.monotonic()
        time.sleep(0.02)

    out = Collector()
    sinks = Sinks().add("slow", slow_sink).add("collector", out)
    settings = line_settings("pp", latency_budget_ms=10_000, backend_preference=("onnxruntime",),
                            queue_size=16, backpressure=True)
    pipe = LinePipeline(settings, ReplaySource("pp", replay_dir / "bad"), bundle,
                        LineThreshold("pp", value=THRESHOLD), sinks, backend_opener=_opener(wrap)).start()
    try:
        assert pipe.wait_ready(30.0)
        verdicts = out.wait_for(12)
    finally:
        pipe.stop(timeout_s=3.0)
    assert [v.frame_id for v in verdicts[:12]] == list(range(1, 13))
    assert all(v.score is not None and v.error is None for v in verdicts[:12])
    started = made[0].started  # call k (from 0) judged frame k + 1
    overlapped = [k for k in range(2, 13) if started[k - 1] < delivered[k - 1]]
    assert len(overlapped) >= 9, f"frame k+1 handed to the engine before frame k's verdict went out for {overlapped}"


def test_stop_resolves_every_in_flight_frame_exactly_once(bundle: Bundle, replay_dir: Path) -> None:
    settings = line_settings("stop", latency_budget_ms=400, backend_preference=("onnxruntime",), queue_size=4)
    out = Collector()
    pipe = LinePipeline(settings, ReplaySource("stop", replay_dir / "good", fps=30), bundle,
                        LineThreshold("stop", value=THRESHOLD), out,
                        backend_opener=_opener(lambda inner: SlowOrtBackend(inner, delay_s=0.25))).start()
    assert pipe.wait_ready(30.0)
    out.wait_for(2)
    t0 = time.monotonic()
    pipe.stop(timeout_s=3.0)  # frames are queued and one is inside the (slow) engine right now
    assert time.monotonic() - t0 < 3.0
    n = len(out.verdicts)
    time.sleep(0.5)
    assert len(out.verdicts) == n                      # nothing trickles out after stop()
    ids = [v.frame_id for v in out.verdicts]
    assert sorted(ids) == list(range(1, pipe.frames_acquired + 1))  # every acquired frame, once
    assert any(v.deadline_missed for v in out.verdicts) and any(v.score is not None for v in out.verdicts)


def test_malformed_frames_and_engine_errors_get_fail_safe_verdicts(bundle: Bundle, replay_dir: Path) -> None:
    metrics = Metrics()
    # An ROI outside the 128x128 frames makes every frame malformed for this line.
    bad_roi = line_settings("roi", latency_budget_ms=2000, roi=(100, 100, 64, 64),
                           backend_preference=("onnxruntime",), queue_size=16)
    verdicts, _, _ = _run_line(bad_roi, ReplaySource("roi", replay_dir / "good"), bundle, 12, metrics=metrics)
    assert all(v.verdict == "NG" and v.score is None and "malformed" in (v.error or "") for v in verdicts)
    assert _sample(metrics, "inspectd_dropped_frames_total", line="roi", reason="malformed") == 12

    nan = line_settings("nan", latency_budget_ms=2000, on_deadline_miss="OK",
                       backend_preference=("onnxruntime",), queue_size=16)
    opener = _opener(lambda inner: NanOrtBackend(inner, delay_s=0.0))
    verdicts, _, pipe = _run_line(nan, ReplaySource("nan", replay_dir / "good"), bundle, 12, opener=opener,
                                  metrics=metrics)
    assert all(v.verdict == "OK" and v.score is None and "non-finite" in (v.error or "") for v in verdicts)
    assert _sample(metrics, "inspectd_engine_errors_total", line="nan") == 12
    assert pipe.engine_errors == 12


def test_frames_of_another_size_than_the_bundle_learned_get_fail_safe_verdicts_said_once(
        bundle: Bundle, tmp_path: Path, synthetic_parts: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A camera whose Width/Height, binning or sensor ROI changed (or another camera) gives frames of
    another size; each was resized to the model's input all the same and judged by a model that never
    saw such frames. Now each gets the fail-safe verdict naming both sizes, counted as malformed, and
    the log says it once (then every REPEAT_LOG_EVERY-th frame), not 20 times a second."""
    import cv2

    assert bundle.input_spec.frame_size == (128, 128)  # the synthetic parts it was trained on
    (tmp_path / "good").mkdir()
    for p in sorted(synthetic_parts.test_good.glob("*.png")):
        cv2.imwrite(str(tmp_path / "good" / p.name), cv2.resize(cv2.imread(str(p)), (160, 128)))
    metrics = Metrics()
    settings = line_settings("wide", latency_budget_ms=2000, backend_preference=("onnxruntime",), queue_size=16)
    with caplog.at_level("WARNING", logger="inspectd.pipeline"):
        verdicts, _, _ = _run_line(settings, ReplaySource("wide", tmp_path / "good"), bundle, 12, metrics=metrics)
    assert all(v.verdict == "NG" and v.score is None for v in verdicts)
    assert all("frame of 160x128 px, but the bundle was trained on 128x128 frames" in (v.error or "")
               for v in verdicts), verdicts[0].error
    assert _sample(metrics, "inspectd_dropped_frames_total", line="wide", reason="malformed") == 12
    said = [r for r in caplog.records if "malformed" in str(r.msg)]  # the malformed-frame line itself
    assert len(said) == 1, [r.getMessage() for r in said]


def test_a_line_without_a_backend_does_not_stop_another_line(bundle: Bundle, replay_dir: Path) -> None:
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here: the tensorrt-only line would not fail")
    metrics = Metrics()
    # TensorRT is not on this machine: the real factory fails, so this line can never infer.
    broken = line_settings("broken", latency_budget_ms=2000, backend_preference=("tensorrt",),
                          queue_size=16)
    healthy = line_settings("healthy", latency_budget_ms=2000, backend_preference=("tensorrt", "onnxruntime"),
                           queue_size=16)
    out_b, out_h = Collector(), Collector()
    pipes = [LinePipeline(broken, ReplaySource("broken", replay_dir / "bad"), bundle,
                          LineThreshold("broken", value=THRESHOLD), out_b, metrics=metrics).start(),
             LinePipeline(healthy, ReplaySource("healthy", replay_dir / "bad"), bundle,
                          LineThreshold("healthy", value=THRESHOLD), out_h, metrics=metrics).start()]
    try:
        broken_v = out_b.wait_for(12)
        healthy_v = out_h.wait_for(12)
        st = pipes[0].status()  # while running (a stopped line says "stopping")
    finally:
        for p in pipes:
            p.stop(timeout_s=3.0)
    assert pipes[0].failed and "no backend" in pipes[0].failed
    # Not ready, and says so (heartbeat status, metric for the InspectdEngineNotReady alert).
    assert st["engine_ready"] is False and st["state"] == "engine_failed", st
    assert _sample(metrics, "inspectd_engine_ready", line="broken") == 0
    assert st["engine_ms"] is None and math.isnan(_sample(metrics, "inspectd_engine_seconds_at_start", line="broken"))
    assert pipes[1].status()["engine_ready"] is True and pipes[1].status()["engine_ms"] > 0
    assert _sample(metrics, "inspectd_engine_ready", line="healthy") == 1
    assert all(v.verdict == "NG" and v.score is None and "no backend" in (v.error or "") for v in broken_v), \
        [v.error for v in broken_v]
    assert all(v.score is not None and v.error is None for v in healthy_v)
    assert _sample(metrics, "inspectd_dropped_frames_total", line="broken", reason="engine_error") == 12
    # the healthy line skipped tensorrt and runs on onnxruntime; the skip is counted once, by the skipped backend
    assert pipes[1].backend_name == "onnxruntime"
    assert _sample(metrics, "inspectd_backend_fallbacks_total", line="healthy", backend="tensorrt") == 1


def test_threshold_file_reload_is_atomic_and_a_bad_file_keeps_the_old_value(tmp_path: Path) -> None:
    path = tmp_path / "calib.json"
    path.write_text(json.dumps({"threshold": 2.5, "good_scores": [0.1]}))
    th = LineThreshold.from_config("L", path)
    assert th.value == 2.5
    path.write_text(json.dumps({"threshold": 4.0}))
    assert th.reload() is True and th.value == 4.0
    for bad in ("{not json", json.dumps({"thresh": 1.0}), json.dumps({"threshold": "high"}),
                '{"threshold": Infinity}'):
        path.write_text(bad)
        assert th.reload() is False and th.value == 4.0
    path.unlink()
    assert th.reload() is False and th.value == 4.0
    assert LineThreshold.from_config("L", 3).value == 3.0 and LineThreshold.from_config("L", 3).reload() is False
    with pytest.raises(ConfigError, match="does not exist"):
        LineThreshold.from_config("L", tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="on_deadline_miss"):
        line_settings("L", latency_budget_ms=10, on_deadline_miss="MAYBE")


def test_camera_loss_on_the_gentl_simulator_reconnects_with_backoff(tiny_camera_bundle: Path) -> None:
    import genicam

    from inspectd.daemon.sources.genicam import GenicamSource

    cti = Path(genicam.__file__).parent / "viky.cti"
    if not cti.is_file():
        pytest.skip("genicam wheel without viky.cti")
    metrics = Metrics()
    src = GenicamSource("cam", cti, {"serial": "2"}, pixel_format="Mono8")
    settings = line_settings("cam", latency_budget_ms=1000, backend_preference=("onnxruntime",),
                            queue_size=4, reconnect_min_s=0.2, reconnect_max_s=1.0)
    out = Collector()
    pipe = LinePipeline(settings, src, load_bundle(tiny_camera_bundle), LineThreshold("cam", value=THRESHOLD), out,
                        metrics=metrics).start()
    try:
        assert pipe.wait_ready(30.0)
        out.wait_for(3)
        assert _sample(metrics, "inspectd_camera_connected", line="cam") == 1
        src._ia._device_proxy.module.close()  # pull the (simulated) device away under harvesters
        end = time.monotonic() + 20
        while _sample(metrics, "inspectd_camera_reconnects_total", line="cam") < 1 and time.monotonic() < end:
            time.sleep(0.05)
        assert _sample(metrics, "inspectd_camera_reconnects_total", line="cam") == 1
        n = len(out.verdicts)
        out.wait_for(n + 3)  # frames flow again after the reconnect
        assert pipe.camera_connected and "camera lost" in (pipe.last_error or "")
        assert _sample(metrics, "inspectd_camera_connected", line="cam") == 1
    finally:
        pipe.stop(timeout_s=3.0)
    assert all(v.score is not None for v in out.verdicts)


def test_line_settings_come_from_the_config_schema_only(tmp_path: Path) -> None:
    """One source of defaults: LineSettings has none of its own; a line built from a minimal config
    gets exactly the schema's defaults (heatmap publish mode, camera fetch timeout, backoff...)."""
    import dataclasses

    from inspectd.daemon.config import ArchiveConfig, GenicamSourceConfig, HeatmapConfig, LineConfig, config_from_dict

    assert all(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               for f in dataclasses.fields(LineSettings))
    cfg = config_from_dict({"lines": [
        {"id": "cam", "source": {"type": "genicam", "cti": str(tmp_path / "p.cti"), "device": {"index": 0}},
         "bundle": str(tmp_path), "threshold": 3.0},
        {"id": "rep", "source": {"type": "replay", "path": str(tmp_path)}, "bundle": str(tmp_path),
         "threshold": 3.0}]})
    cam, rep = (LineSettings.from_config(c) for c in cfg.lines)
    fields = LineConfig.model_fields
    assert cam.heatmap_mode == HeatmapConfig().publish == rep.heatmap_mode
    assert cam.latency_budget_ms == fields["latency_budget_ms"].default
    assert cam.on_deadline_miss == fields["on_deadline_miss"].default
    assert cam.queue_size == fields["queue_size"].default
    assert cam.backend_preference == tuple(fields["backends"].default_factory())
    assert cam.archive_enabled == ArchiveConfig().enabled and cam.archive_save == ArchiveConfig().save
    genicam_fields = GenicamSourceConfig.model_fields
    assert cam.read_timeout_s == genicam_fields["fetch_timeout_s"].default
    assert (cam.reconnect_min_s, cam.reconnect_max_s) == tuple(genicam_fields["reconnect_backoff_s"].default)
    assert cam.backpressure is False and rep.backpressure is True  # replay without fps: as fast as taken


def test_a_failing_sink_does_not_keep_the_verdict_from_the_others(bundle: Bundle, replay_dir: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    class BrokenSink:
        """TEST SINK: raises on every verdict (a bug or a full disk in one consumer)."""

        calls = 0

        def accept(self, verdict: Verdict) -> None:
            BrokenSink.calls += 1
            raise OSError("No space left on device")

    metrics = Metrics()
    out = Collector()
    sinks = Sinks().add("broken", BrokenSink()).add("collector", out).add("metrics", MetricsSink(metrics))
    settings = line_settings("sk", latency_budget_ms=2000, backend_preference=("onnxruntime",), queue_size=64)
    pipe = LinePipeline(settings, ReplaySource("sk", replay_dir / "good"), bundle, LineThreshold("sk", value=THRESHOLD),
                        sinks, metrics=metrics).start()
    try:
        assert pipe.wait_ready(30.0)
        verdicts = out.wait_for(12)
    finally:
        pipe.stop(timeout_s=3.0)
    assert len(verdicts) == 12 and all(v.score is not None for v in verdicts)
    assert BrokenSink.calls == 12 and sinks.failures == {"broken": 12, "collector": 0, "metrics": 0}
    assert _sample(metrics, "inspectd_frames_total", line="sk", verdict="OK") == 12
    assert caplog.text.count("verdict sink broken failed") == 1  # logged once, not per frame


class RecordingOrtBackend(SlowOrtBackend):
    """TEST DOUBLE: the real ONNX Runtime backend that keeps a copy of every batch it is given."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner, delay_s=0.0)
        self.batches: list[np.ndarray] = []

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.batches.append(batch.copy())
        return super().infer(batch)


def test_an_engine_is_timed_on_the_bundles_golden_part_not_a_blank_frame(bundle: Bundle, replay_dir: Path) -> None:
    """The warm-up and timed calls score the bundle's first golden good image (real content: an
    engine whose work depends on it, like inpaint's early-exit loop, times as parts will)."""
    made: list[RecordingOrtBackend] = []

    def wrap(inner: Backend) -> Backend:
        made.append(RecordingOrtBackend(inner))
        return made[-1]
    settings = line_settings("g", latency_budget_ms=50, backend_preference=("onnxruntime",), queue_size=4)
    pipe = LinePipeline(settings, ReplaySource("g", replay_dir / "good"), bundle,
                        LineThreshold("g", value=THRESHOLD), Collector(), backend_opener=_opener(wrap))
    recipe = pipe.open_recipe_engine("A", bundle, LineThreshold("g", value=THRESHOLD), None)
    assert recipe.runner is not None and recipe.runner.close(5.0)
    golden = load_stored(bundle.golden_images()[0][0], bundle.input_spec)
    assert len(made[0].batches) == ENGINE_START_CALLS
    assert golden.std() > 0  # a real part, not a flat frame
    for batch in made[0].batches:
        assert batch.shape == (1, *bundle.input_spec.shape)
        np.testing.assert_array_equal(batch[0], golden)


def test_the_sources_own_counts_reach_the_metrics_across_a_reopen(bundle: Bundle, replay_dir: Path) -> None:
    """Incomplete buffers and frames the camera numbered but never delivered (the source's counts)
    go into the line's metrics; a reopen restarts the source's counts, and what it counted since
    then is added, not taken for a lower baseline (before: lost after every reconnect)."""
    from inspectd.daemon.sources.base import SourceStats

    metrics = Metrics()
    settings = line_settings("c", backend_preference=("onnxruntime",))
    pipe = LinePipeline(settings, ReplaySource("c", replay_dir / "good"), bundle, LineThreshold("c", value=THRESHOLD),
                        Collector(), metrics=metrics)
    pipe.source.stats.incomplete_frames, pipe.source.stats.skipped_by_camera = 3, 5
    pipe._sync_source_counts()
    pipe.source.stats = SourceStats(incomplete_frames=1, skipped_by_camera=2)  # reopened, counted again since
    pipe._sync_source_counts()
    pipe._sync_source_counts()  # nothing new: nothing added
    assert _sample(metrics, "inspectd_incomplete_frames_total", line="c") == 4
    assert _sample(metrics, "inspectd_dropped_frames_total", line="c", reason="camera_skipped") == 7


def test_an_exhausted_replay_is_a_disconnected_camera_and_a_blind_line(bundle: Bundle, tmp_path: Path,
                                                                       replay_dir: Path) -> None:
    """A replay that is not looping and has delivered its last frame will deliver no more: the
    line's status (what the heartbeat publishes) and inspectd_camera_connected say the camera is
    not connected and the state is "blind" (a reject gate stops trusting the line), while every
    frame it did deliver has its verdict, the source is not reopened (no second pass, no
    reconnect counted) and the watchdog is still fed. Before: camera_connected stayed true."""
    from inspectd.client import line_status_from_heartbeat

    parts = tmp_path / "parts"
    parts.mkdir()
    for p in sorted((replay_dir / "good").glob("*.png"))[:4]:
        shutil.copy(p, parts / p.name)
    metrics = Metrics()
    settings = line_settings("x", backend_preference=("onnxruntime",), queue_size=16,
                             latency_budget_ms=2000)  # the subject is the camera state, not speed
    out = Collector()
    pipe = LinePipeline(settings, ReplaySource("x", parts, fps=50), bundle, LineThreshold("x", value=THRESHOLD),
                        _sinks(out, metrics), metrics=metrics).start()
    try:
        assert pipe.wait_ready(30.0)
        verdicts = out.wait_for(4)
        end = time.monotonic() + 5.0
        while pipe.status()["camera_connected"] and time.monotonic() < end:
            time.sleep(0.02)
        status = pipe.status()
        assert status["camera_connected"] is False and status["state"] == "blind", status
        assert status["engine_ready"] is True
        assert _sample(metrics, "inspectd_camera_connected", line="x") == 0
        seen = line_status_from_heartbeat("x", status)  # as a reject gate reads the heartbeat
        assert not seen.safe and seen.camera_connected is False
        time.sleep(0.5)  # it stays so: the loop does not reopen the replay for another pass
        status = pipe.status()
        assert status["camera_connected"] is False and status["state"] == "blind", status
        assert _sample(metrics, "inspectd_camera_connected", line="x") == 0
        assert _sample(metrics, "inspectd_camera_reconnects_total", line="x") == 0
        assert pipe.frames_acquired == 4 and pipe.healthy()
    finally:
        pipe.stop(timeout_s=3.0)
    assert sorted(v.frame_id for v in verdicts) == [1, 2, 3, 4] and len(out.verdicts) == 4
    assert all(v.error is None and not v.deadline_missed for v in out.verdicts)


def test_a_line_failing_many_parts_safe_says_so_in_its_status_until_it_judges_again(
        bundle: Bundle, replay_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Camera up, engine up, but the engine too slow for the budget: every part got the fail-safe
    verdict while the heartbeat said "ok", so a reject gate kept trusting the line. Now the state is
    "failing_safe" with why (a reject gate reads it as not safe), said once in the log, and it goes
    back to "ok" once the parts are judged again."""
    from inspectd.client import line_status_from_heartbeat

    settings = line_settings("f", backend_preference=("onnxruntime",), queue_size=2, latency_budget_ms=60)
    slow: list[SlowOrtBackend] = []
    opener = _opener(lambda inner: slow.append(SlowOrtBackend(inner, delay_s=0.2)) or slow[-1])
    out = Collector()
    pipe = LinePipeline(settings, ReplaySource("f", replay_dir / "good", fps=20, loop=True), bundle,
                        LineThreshold("f", value=THRESHOLD), _sinks(out, None), backend_opener=opener).start()
    try:
        with caplog.at_level("INFO", logger="inspectd.pipeline"):
            assert pipe.wait_ready(30.0)
            out.wait_for(12)
            status = pipe.status()
            assert status["state"] == "failing_safe", status
            assert status["camera_connected"] is True and status["engine_ready"] is True
            assert status["failing_safe"] == "no result within 60 ms"  # the last fail-safe verdict's reason
            seen = line_status_from_heartbeat("f", status)  # as a reject gate reads the heartbeat
            assert not seen.safe and seen.reason == "failing parts safe: no result within 60 ms"
            assert pipe.summary().endswith(", FAILING SAFE (no result within 60 ms)")  # systemctl status
            slow[0].delay_s = 0.0  # the engine is fast again: parts are judged
            end = time.monotonic() + 15.0
            while pipe.status()["state"] != "ok" and time.monotonic() < end:
                time.sleep(0.1)
            status = pipe.status()
            assert status["state"] == "ok" and status["failing_safe"] is None, status
            assert line_status_from_heartbeat("f", status).safe and "FAILING" not in pipe.summary()
    finally:
        pipe.stop(timeout_s=3.0)
    said = [r.getMessage() for r in caplog.records if "is failing its parts safe" in r.getMessage()]
    assert len(said) == 1 and "line f is failing its parts safe" in said[0], said
    assert any("line f judges its parts again" in r.getMessage() for r in caplog.records)
    assert any(v.error is None for v in out.verdicts[-5:])  # judged again at the end


def test_mono_frames_for_a_bundle_trained_on_colour_get_fail_safe_verdicts(tmp_path: Path, replay_dir: Path) -> None:
    """A colour bundle fed mono frames (a camera switched to Mono8, a replay of grey files) had them
    replicated to three channels and judged by a model that never saw a grey part (on the GenTL
    simulator: every frame NG, the median at 147 times the threshold). Now each gets the fail-safe
    verdict saying so."""
    colour = train_colour_bundle(replay_dir / "good", tmp_path / "rgb")
    rgb_bundle = load_bundle(tmp_path / "rgb")
    assert rgb_bundle.input_spec.color_mode == "rgb"
    settings = line_settings("mono", latency_budget_ms=2000, backend_preference=("onnxruntime",), queue_size=16)
    verdicts, _, _ = _run_line(settings, ReplaySource("mono", replay_dir / "good"), rgb_bundle, 6)
    assert all(v.score is None and v.verdict == "NG" for v in verdicts), [v.error for v in verdicts]
    assert all("a mono frame (one channel), but the bundle was trained on colour frames" in (v.error or "")
               for v in verdicts), verdicts[0].error
    # The same parts in colour are judged.
    verdicts, _, _ = _run_line(settings, ReplaySource("mono", colour), rgb_bundle, 6)
    assert all(v.score is not None for v in verdicts), [v.error for v in verdicts]
