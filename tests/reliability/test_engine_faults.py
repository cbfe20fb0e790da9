"""Engine faults and malformed frames on a running LinePipeline (real ONNX Runtime, real metrics).

Doubles, named as such: FlakyBackendDouble wraps the REAL ONNX Runtime backend and raises or
returns NaN/inf on command (stand-in for a GPU backend going bad at run time); ArraySource is a
real Source implementation that hands over in-memory arrays, the way a broken driver would.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from inspectd.daemon.frame import Frame
from inspectd.daemon.line import LineSettings, LineThreshold
from inspectd.daemon.metrics import Metrics
from inspectd.daemon.pipeline import ENGINE_START_CALLS, LinePipeline
from inspectd.daemon.sinks import MetricsSink, Sinks
from inspectd.daemon.sources.base import Source
from inspectd.daemon.sources.replay import ReplaySource
from inspectd.engines.bundle import Bundle
from inspectd.engines.runtime import Backend, EngineInfo, open_backend
from tests.helpers import header_bomb_jpeg
from tests.reliability.conftest import Collector, line_settings, sample

THRESHOLD = 5.0


class FlakyBackendDouble(Backend):
    """TEST DOUBLE: the real ONNX Runtime backend under another backend's name; after `good`
    calls (the warm-up and timed start-up calls included) every call fails in the given `mode`: raise | nan | inf | nan_map."""

    def __init__(self, inner: Backend, name: str, mode: str, good: int = ENGINE_START_CALLS) -> None:
        super().__init__(inner.bundle)
        self.inner, self.name, self.mode, self._good = inner, name, mode, good
        self.calls = 0
        self.closed = False

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.calls += 1
        scores, maps = self.inner.infer(batch)
        if self.calls <= self._good:
            return scores, maps
        if self.mode == "raise":
            raise RuntimeError("CUDA error 700: an illegal memory access was encountered")
        if self.mode == "nan_map":
            maps = maps.copy()
            maps[0, 0, 0] = np.nan
            return scores, maps
        return np.full_like(scores, np.nan if self.mode == "nan" else np.inf), maps

    def close(self) -> None:
        self.closed = True
        self.inner.close()


class StallingBackendDouble(FlakyBackendDouble):
    """TEST DOUBLE: the real ONNX Runtime backend that, after `good` calls, never answers (no
    exception, no result: a hung GPU driver) until `release` is set."""

    def __init__(self, inner: Backend, name: str, good: int = ENGINE_START_CALLS) -> None:
        super().__init__(inner, name, "stall", good)
        self.release = threading.Event()

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.calls += 1
        if self.calls > self._good:
            self.release.wait(30)
        return self.inner.infer(batch)


class ArraySource(Source):
    """TEST SOURCE: a real Source over a list of in-memory images (no camera needed)."""

    def __init__(self, line: str, images: list[Any]) -> None:
        super().__init__(line)
        self.images = list(images)
        self._i = 0

    def open(self) -> None:
        pass

    def read(self, timeout_s: float) -> Frame | None:
        if self._i >= len(self.images):
            time.sleep(min(timeout_s, 0.05))
            return None
        self._i += 1
        return Frame(line=self.line, frame_id=self._i, acquired_ns=time.time_ns(),
                     acquired_mono=time.monotonic(), image=self.images[self._i - 1])

    def close(self) -> None:
        pass


def _flaky_opener(mode: str, made: list[FlakyBackendDouble], calls: list[tuple[str, ...]]) -> Any:
    """Opener: "gpu" (the double) while it is in the preference list, else the real ORT backend."""
    def opener(bundle: Bundle, settings: LineSettings, on_fallback: Any,
               threshold: float) -> tuple[Backend, EngineInfo]:
        calls.append(tuple(settings.backend_preference))
        if settings.backend_preference[0] == "gpu":
            inner, _ = open_backend(bundle, ["onnxruntime"])
            made.append(FlakyBackendDouble(inner, "gpu", mode))
            return made[-1], EngineInfo(backend="gpu", details={})
        return open_backend(bundle, [b for b in settings.backend_preference if b != "gpu"],
                            on_fallback=on_fallback)
    return opener


@pytest.mark.parametrize("mode, why", [("raise", "illegal memory access"), ("nan", "non-finite score"),
                                       ("inf", "non-finite score"), ("nan_map", "non-finite values")])
def test_failing_engine_gives_fail_safe_verdicts_then_falls_back(toy: Bundle, toy_frames: Path, mode: str,
                                                                 why: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="inspectd.pipeline")
    metrics = Metrics()
    made: list[FlakyBackendDouble] = []
    calls: list[tuple[str, ...]] = []
    settings = line_settings("L", latency_budget_ms=2000, on_deadline_miss="NG",
                            backend_preference=("gpu", "onnxruntime"), queue_size=64, backpressure=True)
    out = Collector()
    pipe = LinePipeline(settings, ReplaySource("L", toy_frames, loop=True), toy, LineThreshold("L", value=THRESHOLD),
                        out, metrics=metrics, backend_opener=_flaky_opener(mode, made, calls),
                        failover_after_errors=3).start()
    try:
        assert pipe.wait_ready(20.0)
        verdicts = out.wait_for(12)
    finally:
        pipe.stop(timeout_s=3.0)
    failed = verdicts[:3]
    # The 3 frames the broken engine saw: fail-safe NG, the reason in the verdict ...
    assert all(v.verdict == "NG" and v.score is None and why in (v.error or "") for v in failed), \
        [(v.verdict, v.error) for v in failed]
    assert all(v.backend == "gpu" for v in failed)
    # ... then the line gave the engine up and runs on the reference, which passes frames through.
    after = verdicts[3:]
    assert after and all(v.error is None and v.score is not None and v.backend == "onnxruntime" for v in after)
    assert made[0].closed and calls == [("gpu", "onnxruntime"), ("onnxruntime",)]
    assert sample(metrics, "inspectd_engine_errors_total", line="L") == 3
    assert sample(metrics, "inspectd_dropped_frames_total", line="L", reason="engine_error") == 3
    assert sample(metrics, "inspectd_backend_fallbacks_total", line="L", backend="gpu") == 1
    assert sample(metrics, "inspectd_engine_info", line="L", backend="onnxruntime", bundle_id=toy.bundle_id) == 1
    assert pipe.status()["backend"] == "onnxruntime" and pipe.failed is None
    text = caplog.text
    assert "engine error on frame" in text and why in text
    assert "backend gpu failed 3 frames in a row" in text and "falling back to onnxruntime" in text


def test_failing_engine_without_another_backend_keeps_serving_fail_safe(toy: Bundle, toy_frames: Path) -> None:
    metrics = Metrics()
    made: list[FlakyBackendDouble] = []
    calls: list[tuple[str, ...]] = []
    settings = line_settings("solo", latency_budget_ms=2000, on_deadline_miss="SKIP",
                            backend_preference=("gpu",), queue_size=64, backpressure=True)
    out = Collector()
    pipe = LinePipeline(settings, ReplaySource("solo", toy_frames, loop=True), toy,
                        LineThreshold("solo", value=THRESHOLD), out, metrics=metrics,
                        backend_opener=_flaky_opener("nan", made, calls), failover_after_errors=3).start()
    try:
        assert pipe.wait_ready(20.0)
        verdicts = out.wait_for(10)
        st = pipe.status()  # while running (a stopped line says "stopping")
    finally:
        pipe.stop(timeout_s=3.0)
    assert all(v.verdict == "SKIP" and "non-finite" in (v.error or "") for v in verdicts)
    assert calls == [("gpu",)] and len(made) == 1 and made[0].closed  # never reopened; closed at stop()
    assert sample(metrics, "inspectd_backend_fallbacks_total", line="solo", backend="gpu") == 0
    assert pipe._worker_thread.is_alive() is False  # stopped cleanly, never crashed
    assert pipe.failed is None
    # Not ready: the only engine fails every frame (status for consumers, metric for the alert).
    assert st["engine_ready"] is False and st["state"] == "engine_failed", st
    assert sample(metrics, "inspectd_engine_ready", line="solo") == 0


def test_malformed_frames_are_counted_and_fail_safe_never_a_crash(toy: Bundle) -> None:
    metrics = Metrics()
    good = np.full((32, 32), 128, np.uint8)
    bad = [
        np.zeros((0, 0), np.uint8),                 # empty buffer
        np.zeros((0,), np.uint8),                   # empty 1-D buffer
        np.zeros((32, 32, 4), np.uint8),            # wrong pixel format: 4 channels (RGBA/Bayer mistake)
        np.zeros((32, 32, 2), np.uint8),            # 2 channels (YUV422 packed mistaken for mono)
        np.zeros((32, 32), np.uint16),              # Mono16 where Mono8 was expected
        np.zeros((32, 32), np.float32),             # float image
        np.zeros(1024, np.uint8),                   # a raw 1-D buffer not reshaped
        np.zeros((2, 32, 32, 1), np.uint8),         # 4-D
        b"\x00" * 1024,                             # bytes, not an array
        None,                                       # nothing at all
    ]
    images = [good] + bad + [good]
    settings = line_settings("m", latency_budget_ms=2000, on_deadline_miss="NG",
                            backend_preference=("onnxruntime",), queue_size=64)
    out = Collector()
    pipe = LinePipeline(settings, ArraySource("m", images), toy, LineThreshold("m", value=THRESHOLD), out,
                        metrics=metrics).start()
    try:
        assert pipe.wait_ready(20.0)
        verdicts = out.wait_for(len(images))
        time.sleep(0.3)
    finally:
        pipe.stop(timeout_s=3.0)
    assert [v.frame_id for v in out.verdicts] == list(range(1, len(images) + 1))  # one verdict each
    first, *middle, last = verdicts
    assert first.error is None and last.error is None and last.score is not None  # the line lives on
    for v in middle:
        assert v.verdict == "NG" and v.score is None and "malformed frame" in (v.error or ""), v.error
    assert sample(metrics, "inspectd_dropped_frames_total", line="m", reason="malformed") == len(bad)
    assert pipe.engine_errors == 0 and pipe.failed is None


def test_undecodable_replay_files_are_skipped_and_counted(toy: Bundle, toy_frames: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "mixed"
    shutil.copytree(toy_frames / "good", folder)
    (folder / "good_zz_empty.png").write_bytes(b"")
    (folder / "good_zz_trunc.png").write_bytes((folder / "good_00.png").read_bytes()[:40])
    (folder / "good_zz_bomb.jpg").write_bytes(header_bomb_jpeg())
    source = ReplaySource("r", folder)
    settings = line_settings("r", latency_budget_ms=2000, backend_preference=("onnxruntime",), queue_size=64)
    out = Collector()
    pipe = LinePipeline(settings, source, toy, LineThreshold("r", value=THRESHOLD), out).start()
    try:
        assert pipe.wait_ready(20.0)
        verdicts = out.wait_for(3)
        time.sleep(0.3)
    finally:
        pipe.stop(timeout_s=3.0)
    assert len(out.verdicts) == 3 and all(v.error is None for v in verdicts)
    assert source.stats.skipped_files == 3


def _stalling_gpu_line(line: str, toy: Bundle, toy_frames: Path, metrics: Metrics, only_first_stalls: bool = False
                       ) -> tuple[LinePipeline, Collector, list[StallingBackendDouble], list[tuple[str, ...]]]:
    """A started line preferring backend "gpu" (StallingBackendDouble: the real ONNX Runtime, hung
    after its start-up calls), then onnxruntime; 100 ms budget, 8 frames of queue at 40 fps
    (200 ms of queue: during a stall the frame pushed out of the full queue was already resolved by
    its deadline). With `only_first_stalls`, gpu engines opened after the line's own answer.
    Returns the line, its collector, the doubles made and every opener call's backend list."""
    made: list[StallingBackendDouble] = []
    calls: list[tuple[str, ...]] = []

    def opener(bundle: Bundle, settings: LineSettings, on_fallback: Any,
               threshold: float) -> tuple[Backend, EngineInfo]:
        calls.append(tuple(settings.backend_preference))
        if settings.backend_preference[0] == "gpu":
            inner, _ = open_backend(bundle, ["onnxruntime"])
            made.append(StallingBackendDouble(inner, "gpu", good=10 ** 9 if only_first_stalls and made else ENGINE_START_CALLS))
            return made[-1], EngineInfo(backend="gpu", details={})
        return open_backend(bundle, ["onnxruntime"], on_fallback=on_fallback)

    settings = line_settings(line, latency_budget_ms=100, on_deadline_miss="NG",
                             backend_preference=("gpu", "onnxruntime"), queue_size=8)
    collected = Collector()
    out = Sinks().add("collector", collected).add("metrics", MetricsSink(metrics))
    pipe = LinePipeline(settings, ReplaySource(line, toy_frames, fps=40, loop=True), toy,
                        LineThreshold(line, value=THRESHOLD), out, metrics=metrics, backend_opener=opener,
                        stall_after_s=1.0).start()
    return pipe, collected, made, calls


def _stop_stalling_line(pipe: LinePipeline, made: list[StallingBackendDouble]) -> None:
    pipe.request_stop()
    time.sleep(0.3)
    pipe.stop(timeout_s=3.0)
    for b in made:
        b.release.set()


def test_stalled_engine_is_failed_over_and_each_frame_is_counted_once(toy: Bundle, toy_frames: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """A backend that stops answering (no exception) is given up after the stall bound, like an
    erroring one, and the line goes on with the next backend. Meanwhile every frame gets exactly
    one verdict and is counted once: a frame resolved by its deadline in a full queue is not also
    counted as a queue drop."""
    caplog.set_level(logging.INFO, logger="inspectd.pipeline")
    metrics = Metrics()
    pipe, collected, made, _ = _stalling_gpu_line("st", toy, toy_frames, metrics)
    try:
        assert pipe.wait_ready(20.0)
        end = time.monotonic() + 15
        while not any(v.backend == "onnxruntime" and v.score is not None for v in collected.verdicts):
            assert time.monotonic() < end, pipe.status()
            assert pipe.healthy()  # the worker loop is not stuck: it waits on a bounded call
            time.sleep(0.05)
        n = len(collected.verdicts)
        collected.wait_for(n + 10)
    finally:
        _stop_stalling_line(pipe, made)
    verdicts = collected.verdicts
    ids = [v.frame_id for v in verdicts]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == pipe.frames_acquired  # one verdict per frame
    deadline = [v for v in verdicts if v.deadline_missed]
    drops = [v for v in verdicts if v.error and "queue full" in v.error]
    assert deadline, "the stall must have produced deadline verdicts"
    # Counted once: every verdict in exactly one frames_total bucket, drops only for real drops.
    total = sum(sample(metrics, "inspectd_frames_total", line="st", verdict=x) for x in ("OK", "NG", "SKIP"))
    assert total == len(verdicts) == pipe.verdicts
    assert sample(metrics, "inspectd_deadline_misses_total", line="st") == len(deadline)
    assert sample(metrics, "inspectd_dropped_frames_total", line="st", reason="queue_full") == len(drops)
    assert pipe.dropped["queue_full"] == len(drops)
    # Failed over: gpu given up after the stall bound, onnxruntime serves, the line is ready again.
    assert sample(metrics, "inspectd_backend_fallbacks_total", line="st", backend="gpu") == 1
    assert pipe.engine_stalls == 1 and pipe.status()["backend"] == "onnxruntime"
    assert pipe.status()["engine_ready"] is True
    assert "backend gpu stalled" in caplog.text and "falling back to onnxruntime" in caplog.text
    after = [v for v in verdicts if v.backend == "onnxruntime" and v.score is not None]
    assert len(after) >= 10


def test_stalled_engine_without_another_backend_is_not_ready_until_it_answers_again(toy: Bundle,
                                                                                     toy_frames: Path) -> None:
    metrics = Metrics()
    made: list[StallingBackendDouble] = []

    def opener(bundle: Bundle, settings: LineSettings, on_fallback: Any,
               threshold: float) -> tuple[Backend, EngineInfo]:
        inner, _ = open_backend(bundle, ["onnxruntime"])
        made.append(StallingBackendDouble(inner, "gpu"))
        return made[-1], EngineInfo(backend="gpu", details={})

    settings = line_settings("alone", latency_budget_ms=100, on_deadline_miss="NG", backend_preference=("gpu",),
                             queue_size=4)
    collected = Collector()
    pipe = LinePipeline(settings, ReplaySource("alone", toy_frames, fps=20, loop=True), toy,
                        LineThreshold("alone", value=THRESHOLD), Sinks().add("c", collected), metrics=metrics,
                        backend_opener=opener, stall_after_s=0.5).start()
    try:
        assert pipe.wait_ready(20.0)
        end = time.monotonic() + 10
        while pipe.status()["state"] != "engine_failed":
            assert time.monotonic() < end, pipe.status()
            time.sleep(0.05)
        assert sample(metrics, "inspectd_engine_ready", line="alone") == 0 and pipe.healthy()
        n = len(collected.verdicts)
        collected.wait_for(n + 5)  # frames keep getting (fail-safe) verdicts meanwhile
        assert all(v.score is None for v in collected.verdicts[n:])
        made[0].release.set()  # the driver comes back
        end = time.monotonic() + 10
        while not (pipe.status()["state"] == "ok" and pipe.engine_ready):
            assert time.monotonic() < end, pipe.status()
            time.sleep(0.05)
        n = len(collected.verdicts)
        assert any(v.score is not None for v in collected.wait_for(n + 5)[n:])
        assert sample(metrics, "inspectd_engine_ready", line="alone") == 1
    finally:
        for b in made:
            b.release.set()
        pipe.stop(timeout_s=3.0)
    assert len(made) == 1 and pipe.engine_stalls == 1  # kept (nothing to fail over to), one stall


def test_a_switch_away_from_a_stalled_engine_is_not_a_failover_of_the_new_one(toy: Bundle, toy_frames: Path) -> None:
    """The operator switches (or rolls back) exactly when an engine misbehaves: the outgoing
    engine's stall must not be blamed on the recipe switched in — no backend given up, no engine
    opened for it, the heartbeat's backend the one that judges."""
    metrics = Metrics()
    pipe, collected, made, calls = _stalling_gpu_line("sw", toy, toy_frames, metrics, only_first_stalls=True)
    try:
        assert pipe.wait_ready(20.0)
        healthy = pipe.open_recipe_engine("default", toy, LineThreshold("sw", value=THRESHOLD), None)
        end = time.monotonic() + 10
        while made[0].calls <= 2:      # the first frame is stuck in the line's engine
            assert time.monotonic() < end
            time.sleep(0.01)
        pipe.retire(pipe.activate(healthy))
        n = len(collected.verdicts)
        collected.wait_for(n + 20)
        time.sleep(1.5)                 # past the stall bound of the frame that was stuck
        n = len(collected.verdicts)
        collected.wait_for(n + 10)
    finally:
        _stop_stalling_line(pipe, made)
    assert calls == [("gpu", "onnxruntime")] * 2, calls   # the line's engine, the switched-in one: nothing else
    assert sample(metrics, "inspectd_backend_fallbacks_total", line="sw", backend="gpu") == 0
    assert pipe.status()["backend"] == "gpu" and pipe.status()["engine_ready"] is True
    assert [v.backend for v in collected.verdicts[-10:]] == ["gpu"] * 10
    assert all(v.score is not None for v in collected.verdicts[-10:])


class HangingSource(ArraySource):
    """TEST SOURCE: after `good` frames, a read that does not return (a driver call stuck in the
    camera's producer: no frame, no exception, no timeout) until `release` is set."""

    def __init__(self, line: str, images: list[Any], good: int) -> None:
        super().__init__(line, images)
        self.good = good
        self.release = threading.Event()
        self.hung_at: float | None = None

    def read(self, timeout_s: float) -> Frame | None:
        if self._i == self.good and not self.release.is_set():
            self.hung_at = time.monotonic()
            self.release.wait(30)
        return super().read(timeout_s)


def test_a_hung_camera_read_is_blind_in_the_heartbeat_not_ok(toy: Bundle) -> None:
    """No frames and no verdicts while the status still said "ok" would let an NG-only reject gate
    pass every part until the systemd watchdog (tens of seconds, or never without one) restarts
    the daemon: within about two read timeouts the line reports "blind" (clients: not safe), and
    "ok" again when frames flow."""
    settings = line_settings("h", latency_budget_ms=2000, backend_preference=("onnxruntime",))
    source = HangingSource("h", [np.full((32, 32), 128, np.uint8)] * 40, good=3)
    out = Collector()
    pipe = LinePipeline(settings, source, toy, LineThreshold("h", value=THRESHOLD), out).start()
    try:
        assert pipe.wait_ready(20.0)
        out.wait_for(3)
        assert pipe.status()["state"] == "ok"
        end = time.monotonic() + 2 * settings.read_timeout_s + 5
        while pipe.status()["state"] == "ok":
            assert time.monotonic() < end, "a hung read still reported ok"
            time.sleep(0.05)
        assert pipe.status()["state"] == "blind"
        assert source.hung_at is not None and time.monotonic() - source.hung_at >= 2 * settings.read_timeout_s
        assert pipe.healthy()   # not yet a watchdog matter: the line reports it first
        source.release.set()
        out.wait_for(10)
        end = time.monotonic() + 5
        while pipe.status()["state"] != "ok":
            assert time.monotonic() < end
            time.sleep(0.05)
    finally:
        source.release.set()
        pipe.stop(timeout_s=3.0)


def test_an_engine_that_failed_to_open_is_tried_again_and_the_line_recovers(toy: Bundle, toy_frames: Path) -> None:
    """The only engine fails to open once (a transient cause: device memory taken by another
    process; injected as one failing open of the real ONNX Runtime backend). Frames get the
    fail-safe verdict meanwhile; after the back-off the line opens it again and judges parts."""
    metrics = Metrics()
    calls: list[float] = []

    def fails_once(bundle: Bundle, settings: LineSettings, on_fallback: Any,
                   threshold: float) -> tuple[Backend, EngineInfo]:
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise RuntimeError("out of device memory (injected)")
        return open_backend(bundle, list(settings.backend_preference), on_fallback=on_fallback)

    settings = line_settings("again", latency_budget_ms=2000, on_deadline_miss="NG",
                             backend_preference=("onnxruntime",), queue_size=64, backpressure=True)
    out = Collector()
    pipe = LinePipeline(settings, ReplaySource("again", toy_frames, loop=True), toy,
                        LineThreshold("again", value=THRESHOLD), out, metrics=metrics, backend_opener=fails_once)
    pipe.engine_retry_s = (0.5, 1.0)
    pipe.start()
    try:
        assert pipe.wait_ready(20.0) and pipe.state == "engine_failed"
        end = time.monotonic() + 20.0
        while not any(v.score is not None for v in out.verdicts) and time.monotonic() < end:
            time.sleep(0.05)
    finally:
        pipe.stop(timeout_s=3.0)
    verdicts = list(out.verdicts)
    first_real = next(i for i, v in enumerate(verdicts) if v.score is not None)
    assert first_real > 0 and all(v.verdict == "NG" and "out of device memory" in (v.error or "")
                                  for v in verdicts[:first_real])
    assert all(v.error is None for v in verdicts[first_real:])
    assert len(calls) == 2 and calls[1] - calls[0] >= 0.5
    assert pipe.failed is None and pipe.engine_ok
    assert sample(metrics, "inspectd_engine_ready", line="again") == 1


def test_a_retry_after_a_failed_failover_never_reopens_the_backend_given_up(toy: Bundle, toy_frames: Path) -> None:
    """The GPU backend (a double: real ONNX Runtime under another name) fails every frame; the line
    gives it up and fails over to ONNX Runtime, whose open fails once (injected). The retry opens
    ONNX Runtime again — never the GPU backend it gave up, which would fail 5 more frames (or, hung,
    hold the worker for minutes) every cycle."""
    made: list[FlakyBackendDouble] = []
    calls: list[tuple[str, ...]] = []
    flaky = _flaky_opener("raise", made, calls)

    def opener(bundle: Bundle, settings: LineSettings, on_fallback: Any, threshold: float) -> tuple[Backend, EngineInfo]:
        if tuple(settings.backend_preference) == ("onnxruntime",) and ("onnxruntime",) not in calls:
            calls.append(("onnxruntime",))
            raise RuntimeError("out of memory (injected)")
        return flaky(bundle, settings, on_fallback, threshold)

    settings = line_settings("L", latency_budget_ms=2000, on_deadline_miss="NG",
                             backend_preference=("gpu", "onnxruntime"), queue_size=64, backpressure=True)
    out = Collector()
    pipe = LinePipeline(settings, ReplaySource("L", toy_frames, loop=True), toy, LineThreshold("L", value=THRESHOLD),
                        out, backend_opener=opener, failover_after_errors=3)
    pipe.engine_retry_s = (0.3, 0.6)
    pipe.start()
    try:
        assert pipe.wait_ready(20.0)
        end = time.monotonic() + 20.0
        while not any(v.score is not None and v.backend == "onnxruntime" for v in out.verdicts):
            assert time.monotonic() < end, (calls, pipe.status())
            time.sleep(0.05)
    finally:
        pipe.stop(timeout_s=3.0)
    assert calls == [("gpu", "onnxruntime"), ("onnxruntime",), ("onnxruntime",)], calls


def test_an_engine_that_opens_after_the_line_gave_up_on_it_is_closed(toy: Bundle, toy_frames: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU engine's open hangs past the bound (a driver that takes minutes), the line gives up on it
    and judges fail-safe; when the open finally returns, the engine it made (GPU memory, a context)
    must be closed, not left behind on every retry. The GPU backend is a double (real ONNX Runtime
    under another name) that records its close; the bound is lowered from 300 s to 0.5 s."""
    from inspectd.daemon import pipeline as pipeline_module

    monkeypatch.setattr(pipeline_module, "ENGINE_OPEN_STALE_S", 0.5)
    made: list[FlakyBackendDouble] = []
    release = threading.Event()

    def slow_opener(bundle: Bundle, settings: LineSettings, on_fallback: Any,
                    threshold: float) -> tuple[Backend, EngineInfo]:
        release.wait(10)
        inner, _ = open_backend(bundle, ["onnxruntime"])
        made.append(FlakyBackendDouble(inner, "gpu", "raise", good=10**9))
        return made[-1], EngineInfo(backend="gpu", details={})

    settings = line_settings("slow", latency_budget_ms=2000, on_deadline_miss="NG",
                             backend_preference=("gpu",), queue_size=8, backpressure=True)
    pipe = LinePipeline(settings, ReplaySource("slow", toy_frames, loop=True), toy,
                        LineThreshold("slow", value=THRESHOLD), Collector(), backend_opener=slow_opener)
    pipe.engine_retry_s = (600.0, 600.0)
    pipe.start()
    try:
        assert pipe.wait_ready(10.0) and pipe.state == "engine_failed"
        release.set()                        # the hung open returns, long after the line gave up
        end = time.monotonic() + 5.0
        while not (made and made[0].closed):
            assert time.monotonic() < end, "the late engine was never closed"
            time.sleep(0.05)
    finally:
        release.set()
        pipe.stop(timeout_s=3.0)
