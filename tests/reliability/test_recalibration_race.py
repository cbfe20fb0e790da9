"""A recalibration + SIGHUP that lands while a recipe switch is opening its engine (seconds on a
real line: load, parity gate, warm-up). In-process Daemon with real bundles, real ONNX Runtime and
real replay; the only thing added is a gate in the line's backend opener that holds the switch's
engine open until the test has recalibrated and reloaded."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import yaml

from inspectd.daemon.config import load_config
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
