"""Every engine method runs in the daemon unchanged: `inspectd run` as a child process scores a
replay of good parts and a replay of defective parts through ONNX Runtime, with the same config,
verdict stream and metrics as the flow. Each verdict's raw score is one that ONNX Runtime gives
an image of that line's folder offline, and the defective line is judged NG more often."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from inspectd.client import VerdictSubscriber
from inspectd.engines.bundle import load_bundle
from tests.daemon.test_run import Daemon, _collect, _contiguous, _scrape, _write_config


def _ort_scores(bundle: Any, folder: Path) -> np.ndarray:
    from inspectd.engines.preprocess import list_images, load_prepared
    from inspectd.engines.runtime.onnxruntime_backend import OnnxRuntimeBackend

    images = np.stack([load_prepared(p, bundle.input_spec) for p in list_images(folder)])
    backend = OnnxRuntimeBackend(bundle)
    try:
        return np.asarray(backend.infer(images)[0], dtype=np.float64)
    finally:
        backend.close()


@pytest.mark.parametrize("method", ["cutpaste-ae", "inpaint", "vae", "classifier"])
def test_every_method_runs_in_the_daemon(method: str, tmp_path: Path, tiny_method_bundles: Any,
                                         synthetic_parts: Any) -> None:
    bundle_path = tiny_method_bundles(method)
    bundle = load_bundle(bundle_path)
    assert bundle.manifest.method.name == method
    offline = {name: _ort_scores(bundle, folder) for name, folder in
               (("good", synthetic_parts.test_good), ("bad", synthetic_parts.test_bad))}
    # Threshold (normalised units) halfway between the median good and the median bad image.
    threshold = float(bundle.normalize((np.median(offline["good"]) + np.median(offline["bad"])) / 2))
    good, bad = tmp_path / "good", tmp_path / "bad"
    shutil.copytree(synthetic_parts.test_good, good)
    shutil.copytree(synthetic_parts.test_bad, bad)

    def line(line_id: str, folder: Path) -> dict[str, Any]:
        return {"id": line_id, "source": {"type": "replay", "path": str(folder), "fps": 20, "loop": True},
                "bundle": str(bundle_path), "backends": ["onnxruntime"], "threshold": threshold,
                "latency_budget_ms": 2000, "heatmap": {"publish": "ng", "encoding": "png", "width": 32, "height": 32}}

    endpoint = f"ipc://{tmp_path}/pub.sock"
    cfg = _write_config(tmp_path / "lines.yaml", [line("good", good), line("bad", bad)], endpoint)
    daemon = Daemon(cfg)
    sub = VerdictSubscriber(endpoint, lines=["good", "bad"], topics=("verdict", "heatmap"), heartbeat_timeout_s=None)
    try:
        port = int(daemon.wait_log(r"metrics on http://127\.0\.0\.1:(\d+)/metrics").group(1))
        daemon.wait_log(r"ready: .*\bbad: camera up, onnxruntime")
        daemon.wait_log(r"ready: .*\bgood: camera up, onnxruntime")
        msgs = _collect(sub, 4.0)
        by_line = {name: [m.header for m in msgs if m.kind == "verdict" and m.header["line"] == name]
                   for name in ("good", "bad")}
        for name, headers in by_line.items():
            assert len(headers) >= 12, f"{name}: only {len(headers)} verdicts"
            _contiguous([m for m in msgs if m.header.get("line") == name], "verdict")
            for h in headers:
                assert h["bundle_id"] == bundle.bundle_id and not h["deadline_missed"]
                assert np.min(np.abs(offline[name] - h["raw_score"])) <= 1e-4 * max(1.0, abs(h["raw_score"])), h
                assert h["verdict"] == ("NG" if h["score"] > threshold else "OK")
        ng = {name: np.mean([h["verdict"] == "NG" for h in hs]) for name, hs in by_line.items()}
        assert ng["bad"] > ng["good"], ng
        heatmaps = [m for m in msgs if m.kind == "heatmap"]
        assert heatmaps and heatmaps[0].heatmap_image().shape == (32, 32)
        metrics = _scrape(port)
        assert metrics['inspectd_frames_total{line="bad",verdict="NG"}'] > 0
    finally:
        sub.close()
        daemon.kill()
