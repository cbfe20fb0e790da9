"""A recalibration + SIGHUP that lands while a recipe switch is opening its engine (seconds on a
real line: load, parity gate, warm-up). In-process Daemon with real bundles, real ONNX Runtime and
real replay; the only thing added is a gate in the line's backend opener that holds the switch's
engine open until the test has recalibrated and reloaded."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from inspectd.daemon.config import load_config
from inspectd.daemon.pipeline import ActiveRecipe
from inspectd.daemon.run import Daemon


def test_a_sighup_during_a_switch_reaches_the_recipe_switched_in(tmp_path: Path, toy_path: Path,
                                                                 toy_frames: Path) -> None:
    own = tmp_path / "default.threshold.json"
    own.write_text(json.dumps({"threshold": 5.0}))
    config = tmp_path / "lines.yaml"
    config.write_text(yaml.safe_dump({
        "zmq": {"endpoint": f"ipc://{tmp_path}/v.sock"}, "metrics": {"port": 0}, "state_dir": str(tmp_path / "state"),
        "lines": [{"id": "l1", "source": {"type": "replay", "path": str(toy_frames), "loop": True, "fps": 20},
                   "bundle": str(toy_path), "threshold": {"file": str(own)}, "backends": ["onnxruntime"],
                   "heatmap": {"publish": "none"}, "recipe": "B",
                   "recipes": [{"name": "B", "bundle": str(toy_path), "threshold": 7.0}]}]}))
    daemon = Daemon(load_config(config))
    daemon.build()
    pipeline, recipes = daemon.lines["l1"], daemon.recipes["l1"]
    opening, release = threading.Event(), threading.Event()
    real_opener = pipeline._backend_opener

    def gated_opener(*args: Any) -> Any:
        if gate_armed.is_set():
            opening.set()
            release.wait(30)
        return real_opener(*args)

    gate_armed = threading.Event()
    pipeline._backend_opener = gated_opener
    try:
        assert daemon.start(threading.Event())
        assert pipeline.wait_ready(20.0) and pipeline.recipe == "B"
        gate_armed.set()
        switch = threading.Thread(target=recipes.switch, args=("default", {"via": "test"}))
        switch.start()
        assert opening.wait(20.0)            # the switch has read default's threshold and is opening
        own.write_text(json.dumps({"threshold": 8.0}))   # inspectd calibrate, then SIGHUP
        reload = threading.Thread(target=daemon.reload_thresholds, args=(config,))
        reload.start()
        reload.join(0.5)
        release.set()
        switch.join(30.0)
        reload.join(30.0)
        assert not switch.is_alive() and not reload.is_alive()
        assert pipeline.recipe == "default"
        assert pipeline.threshold.value == 8.0   # the recalibrated value judges, not the one read before
    finally:
        release.set()
        daemon.stop()


def _line_config(tmp_path: Path, toy_path: Path, toy_frames: Path, **line: Any) -> Path:
    config = tmp_path / "lines.yaml"
    config.write_text(yaml.safe_dump({
        "zmq": {"endpoint": f"ipc://{tmp_path}/v.sock"}, "metrics": {"port": 0}, "state_dir": str(tmp_path / "state"),
        "lines": [dict({"id": "l1", "source": {"type": "replay", "path": str(toy_frames), "loop": True, "fps": 20},
                        "bundle": str(toy_path), "threshold": 5.0, "backends": ["onnxruntime"],
                        "heatmap": {"publish": "none"}}, **line)]}))
    return config


def _wait(cond: Any, timeout_s: float = 20.0) -> bool:
    end = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def _preloading_daemon(tmp_path: Path, toy_path: Path, toy_frames: Path,
                       b_threshold: Any) -> tuple[Path, Daemon, threading.Event, threading.Event]:
    """A built in-process daemon whose line l1 preloads recipe B; B's engine open (the opener's
    second call: the first is the line's own engine) is held until `release`. Returns (config,
    daemon, opening, release)."""
    config = _line_config(tmp_path, toy_path, toy_frames, recipes=[
        {"name": "B", "bundle": str(toy_path), "threshold": b_threshold, "preload": True}])
    daemon = Daemon(load_config(config))
    daemon.build()
    opening, release = _hold_second_open(daemon.lines["l1"])
    return config, daemon, opening, release


def _hold_second_open(pipeline: Any) -> tuple[threading.Event, threading.Event]:
    """Gate the line's backend opener: its second call (a preload) waits for `release` once it has
    set `opening`. Returns (opening, release)."""
    opening, release = threading.Event(), threading.Event()
    real_opener = pipeline._backend_opener
    calls: list[int] = []

    def gated_opener(*args: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            opening.set()
            release.wait(30)
        return real_opener(*args)

    pipeline._backend_opener = gated_opener
    return opening, release


def test_a_sighup_during_the_start_up_preload_reaches_the_preloaded_recipe(tmp_path: Path, toy_path: Path,
                                                                          toy_frames: Path) -> None:
    """Recipe B is preloaded after the line's own engine (seconds on a real line). A recalibration
    + SIGHUP that lands while B's engine is opening must reach B: switched in, it judges with the
    new value, not the one read before its engine opened."""
    b_file = tmp_path / "b.threshold.json"
    b_file.write_text(json.dumps({"threshold": 7.0}))
    config, daemon, opening, release = _preloading_daemon(tmp_path, toy_path, toy_frames, {"file": str(b_file)})
    pipeline, recipes = daemon.lines["l1"], daemon.recipes["l1"]
    try:
        assert daemon.start(threading.Event())
        assert opening.wait(20.0)
        b_file.write_text(json.dumps({"threshold": 8.0}))   # inspectd calibrate, then SIGHUP
        daemon.reload_thresholds(config)
        release.set()
        assert _wait(lambda: isinstance(recipes.standby.get("B"), ActiveRecipe))
        recipes.switch("B", {"via": "test"})
        assert pipeline.threshold.value == 8.0
    finally:
        release.set()
        daemon.stop()


def test_a_switch_during_the_start_up_preload_keeps_one_engine(tmp_path: Path, toy_path: Path,
                                                               toy_frames: Path) -> None:
    """An operator switches to B while B's preload is still opening: the switch opens B itself, and
    the preloaded engine that lands afterwards is closed, not parked beside the active one."""
    _, daemon, opening, release = _preloading_daemon(tmp_path, toy_path, toy_frames, 7.0)
    pipeline, recipes = daemon.lines["l1"], daemon.recipes["l1"]
    try:
        assert daemon.start(threading.Event())
        assert opening.wait(20.0)
        recipes.switch("B", {"via": "test"})  # opens B itself (call 3)
        active_runner = pipeline.active.runner
        release.set()
        assert _wait(lambda: not [t for t in threading.enumerate() if t.name == "recipes-l1"])  # preload done
        assert pipeline.recipe == "B" and pipeline.active.runner is active_runner
        assert "B" not in recipes.standby, recipes.standby
    finally:
        release.set()
        daemon.stop()


def test_a_preload_that_failed_is_tried_again_at_the_switch(tmp_path: Path, toy_path: Path, toy_frames: Path) -> None:
    """B's preload failed (its threshold file was calibrated for another bundle). Once the file is
    fixed, a switch to B opens it: a failed preload must not block a product changeover until restart."""
    b_file = tmp_path / "b.threshold.json"
    b_file.write_text(json.dumps({"threshold": 7.0, "bundle_id": "0123456789ab"}))
    config = _line_config(tmp_path, toy_path, toy_frames, recipes=[
        {"name": "B", "bundle": str(toy_path), "threshold": {"file": str(b_file)}, "preload": True}])
    daemon = Daemon(load_config(config))
    daemon.build()
    pipeline, recipes = daemon.lines["l1"], daemon.recipes["l1"]
    try:
        assert daemon.start(threading.Event())
        assert _wait(lambda: isinstance(recipes.standby.get("B"), str))
        assert "0123456789ab" in recipes.standby["B"]
        b_file.write_text(json.dumps({"threshold": 7.5}))   # calibrated for B's bundle now
        daemon.reload_thresholds(config)
        answer = recipes.switch("B", {"via": "test"})
        assert answer["changed"] and pipeline.recipe == "B" and pipeline.threshold.value == 7.5
        assert pipeline.engine_ok
    finally:
        daemon.stop()


def test_an_engine_that_failed_to_open_is_reopened_by_a_switch_to_its_recipe(tmp_path: Path, toy_path: Path,
                                                                              toy_frames: Path) -> None:
    """The line's only engine failed to open (a transient cause: GPU memory taken by another process,
    a driver reset; injected here as one failing open). `inspectd recipe --line L default` — the
    recipe the line already has — opens it again instead of answering 'nothing changed'."""
    config = _line_config(tmp_path, toy_path, toy_frames)
    daemon = Daemon(load_config(config))
    daemon.build()
    pipeline, recipes = daemon.lines["l1"], daemon.recipes["l1"]
    real_opener = pipeline._backend_opener
    calls: list[int] = []

    def fails_once(*args: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of device memory (injected)")
        return real_opener(*args)

    pipeline._backend_opener = fails_once
    pipeline.engine_retry_s = (600.0, 600.0)  # no automatic retry inside this test
    try:
        assert daemon.start(threading.Event()) is not None
        assert _wait(lambda: pipeline.engine_resolved.is_set())
        assert not pipeline.engine_ok and pipeline.state == "engine_failed"
        answer = recipes.switch("default", {"via": "test"})
        assert answer["changed"] and pipeline.engine_ok and pipeline.active.runner is not None
        assert pipeline.state != "engine_failed" and pipeline.failed is None
    finally:
        daemon.stop()
