"""Recipe switches meeting engine faults (real ONNX Runtime engines, real replay, real state files).

Doubles, named as such: NanAfterStartDouble wraps the REAL ONNX Runtime backend under another
backend's name and returns NaN scores for a set number of calls after its start-up calls (a GPU
backend going bad); the openers below fail or slow down one open on command (a transient open
failure: device memory taken; a slow fail-over open).
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from inspectd.daemon.config import config_from_dict
from inspectd.daemon.line import LineSettings, LineThreshold
from inspectd.daemon.pipeline import ENGINE_START_CALLS, LinePipeline
from inspectd.daemon.recipes import LineRecipes, state_path
from inspectd.daemon.sources.replay import ReplaySource
from inspectd.engines.bundle import Bundle, load_bundle
from inspectd.engines.runtime import Backend, EngineInfo, open_backend
from tests.engines.test_runtime_toybundle import make_toy_bundle
from tests.reliability.conftest import Collector

WHO = {"user": "test"}


class NanAfterStartDouble(Backend):
    """TEST DOUBLE: the real ONNX Runtime backend named `name`; after its start-up calls the next
    `bad` calls return NaN scores (None: every call), then it answers normally again."""

    def __init__(self, inner: Backend, name: str, bad: int | None) -> None:
        super().__init__(inner.bundle)
        self.inner, self.name, self._free, self._bad = inner, name, ENGINE_START_CALLS, bad

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores, maps = self.inner.infer(batch)
        if self._free > 0:
            self._free -= 1
            return scores, maps
        if self._bad is None or self._bad > 0:
            if self._bad is not None:
                self._bad -= 1
            return np.full_like(scores, np.nan), maps
        return scores, maps

    def close(self) -> None:
        self.inner.close()


@pytest.fixture(scope="module")
def two_bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Two toy bundles (A: a preloaded recipe, B: the line's own) and a folder of frames to replay."""
    root = tmp_path_factory.mktemp("recipes")
    a, b = make_toy_bundle(root / "A"), make_toy_bundle(root / "B")
    frames = root / "frames"
    frames.mkdir()
    for p in sorted((a / "golden").glob("*.png")):
        shutil.copy(p, frames / p.name)
    return a, b, frames


def _line(tmp: Path, two_bundles: tuple[Path, Path, Path], opener: Callable[..., Any], fps: float,
          backends: list[str], active: str | None = None, **pipeline: Any
          ) -> tuple[LineRecipes, LinePipeline, Collector, Path]:
    """A line whose own bundle is B with recipe A (preloaded), as the daemon wires it."""
    a, b, frames = two_bundles
    line = {"id": "L", "bundle": str(b), "threshold": 5.0, "backends": backends, "latency_budget_ms": 2000,
            "recipes": [{"name": "A", "bundle": str(a), "threshold": 5.0, "preload": True}],
            "source": {"type": "replay", "path": str(frames), "fps": fps, "loop": True}}
    if active is not None:
        line["recipe"] = active
    state = tmp / "state"
    lc = config_from_dict({"state_dir": str(state), "lines": [line]}).lines[0]
    recipes = LineRecipes(lc, state, lambda *args, **kw: 0)
    spec = recipes.initial
    bundle = load_bundle(spec.bundle)
    got = Collector()
    pipe = LinePipeline(LineSettings.from_config(lc), ReplaySource.from_config(lc.source, "L"), bundle,
                        LineThreshold.from_config("L", spec.threshold, bundle.bundle_id), got,
                        backend_opener=opener, recipe=spec.name, **pipeline)
    recipes.attach(pipe, None, None)
    return recipes, pipe, got, state


def _wait(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    end = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _persisted(state: Path) -> str:
    return json.loads(state_path(state, "L").read_text())["active"]


def test_a_preloaded_recipe_whose_engine_failed_is_opened_anew_on_a_switch_back(
        tmp_path: Path, two_bundles: tuple[Path, Path, Path]) -> None:
    """A's engine fails to open at start (device memory taken for a moment); the operator switches to
    the line's own bundle, then back to A. The switch back opens A again and A judges parts; what
    recipes.json says is what the line runs. (Before: A waited in standby without an engine, the
    switch back was refused after recipes.json had already been changed to A, and A never opened again.)"""
    opens = {"A": 0}

    def opener(bundle: Bundle, settings: LineSettings, on_fallback: Any, threshold: float) -> tuple[Backend, EngineInfo]:
        if bundle.path.name == "A":
            opens["A"] += 1
            if opens["A"] == 1:
                raise RuntimeError("transient: device memory taken")
        return open_backend(bundle, ["onnxruntime"], on_fallback=on_fallback)

    recipes, pipe, got, state = _line(tmp_path, two_bundles, opener, fps=20, backends=["onnxruntime"], active="A")
    pipe.engine_retry_s = (1000.0, 1000.0)  # the line's own retry must not be what reopens A
    pipe.start()
    try:
        assert pipe.wait_ready(20)
        assert pipe.recipe == "A" and pipe.state == "engine_failed"
        assert recipes.switch("default", WHO)["active"]["recipe"] == "default"
        listed = {r["name"]: r for r in recipes.list()["recipes"]}
        assert listed["A"]["ready"] is False
        assert recipes.switch("A", WHO)["active"]["recipe"] == "A"
        assert opens["A"] == 2 and pipe.recipe == "A" and _persisted(state) == "A"
        n = len(got.verdicts)
        _wait(lambda: len(got.verdicts) >= n + 5, 20, "verdicts after the switch back")
        judged = [v for v in got.verdicts[n:] if v.recipe == "A"]
        assert judged and all(v.error is None for v in judged), [v.error for v in judged]
    finally:
        pipe.stop()


def test_a_recipe_left_during_a_failover_is_not_parked_with_a_closed_engine(
        tmp_path: Path, two_bundles: tuple[Path, Path, Path]) -> None:
    """Recipe A's TensorRT backend returns NaN, so the worker fails over (closing A's engine) and opens
    ONNX Runtime, which takes a while; the operator switches away meanwhile, then back to A. A must
    judge parts again (before: A waited in standby with its closed engine, and every frame after the
    switch back got the fail-safe verdict); the fail-over that lost the race leaves the status alone."""
    failover_opening, failover_opened = threading.Event(), threading.Event()

    def opener(bundle: Bundle, settings: LineSettings, on_fallback: Any, threshold: float) -> tuple[Backend, EngineInfo]:
        first = settings.backend_preference[0]
        inner, _ = open_backend(bundle, ["onnxruntime"])
        if bundle.path.name == "A" and first == "tensorrt":
            return NanAfterStartDouble(inner, "tensorrt", bad=None), EngineInfo("tensorrt", {})
        if bundle.path.name == "A" and not failover_opening.is_set():  # the fail-over's open: slow
            failover_opening.set()
            time.sleep(2.0)
            failover_opened.set()
        return inner, EngineInfo(first, {})

    recipes, pipe, got, _ = _line(tmp_path, two_bundles, opener, fps=20, backends=["tensorrt", "onnxruntime"],
                                  active="A", stall_after_s=2.0)
    pipe.start()
    try:
        assert pipe.wait_ready(20)
        assert failover_opening.wait(30), "no fail-over"
        recipes.switch("default", WHO)
        assert failover_opened.wait(10)
        time.sleep(1.0)  # its warm-up (a few ms on the toy engine), then the worker installs it or not
        assert pipe.recipe == "default" and pipe.status()["backend"] == pipe.active.backend == "tensorrt"
        assert recipes.switch("A", WHO)["changed"]
        n = len(got.verdicts)
        _wait(lambda: len(got.verdicts) >= n + 10, 20, "verdicts after the switch back")
        after = got.verdicts[n:]
        assert all(v.recipe == "A" for v in after)
        # A opened anew: its TensorRT backend fails again and it fails over, but never serves a closed engine
        assert all(v.error is None or "non-finite" in v.error for v in after), [v.error for v in after]
        _wait(lambda: pipe.state == "ok" and pipe.active.backend == "onnxruntime", 20, "A on ONNX Runtime")
    finally:
        pipe.stop()


def test_engine_errors_of_the_recipe_switched_away_from_do_not_count_against_the_next(
        tmp_path: Path, two_bundles: tuple[Path, Path, Path]) -> None:
    """The line's own recipe has 4 engine errors in a row on the TensorRT backend (one short of a
    fail-over); the operator switches to A, whose first frame errs once. A stays on its TensorRT backend
    (before: the count carried over, A's one error made five, and its backend was given up)."""
    def opener(bundle: Bundle, settings: LineSettings, on_fallback: Any, threshold: float) -> tuple[Backend, EngineInfo]:
        first = settings.backend_preference[0]
        inner, _ = open_backend(bundle, ["onnxruntime"])
        if first == "tensorrt":
            return NanAfterStartDouble(inner, "tensorrt", bad=4 if bundle.path.name == "B" else 1), EngineInfo("tensorrt", {})
        return inner, EngineInfo(first, {})

    recipes, pipe, got, _ = _line(tmp_path, two_bundles, opener, fps=2, backends=["tensorrt", "onnxruntime"])
    pipe.start()
    try:
        assert pipe.wait_ready(20)
        recipes.start_background()
        _wait(lambda: pipe.engine_errors >= 4 and "A" in recipes.standby, 20, "four errors and A preloaded")
        assert pipe.engine_errors == 4
        recipes.switch("A", WHO)
        _wait(lambda: sum(1 for v in got.verdicts if v.recipe == "A" and v.error is None) >= 3, 20,
              "A judging parts")
        assert pipe.engine_errors == 5 and pipe.active.backend == "tensorrt"
        # Five of the last few seconds' parts failed safe: the line says so until A's judged parts
        # outnumber them (failsafe_rate.py), then it is ok on the same backend.
        _wait(lambda: pipe.state == "ok", 10, "the line ok again")
        assert pipe.engine_errors == 5 and pipe.active.backend == "tensorrt"
    finally:
        pipe.stop()
