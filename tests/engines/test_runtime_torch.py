"""Torch backend on the real trained `tiny_bundle` (EfficientNet-Lite0 taps + flow head), on
CPU (explicitly requested: the factory only offers torch with CUDA), gated against ONNX
Runtime CPU like any non-reference backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inspectd.cli import main
from inspectd.engines.bundle import load_bundle
from inspectd.engines.preprocess import load_prepared
from inspectd.engines.runtime import InputShapeError, open_backend
from inspectd.engines.runtime.onnxruntime_backend import OnnxRuntimeBackend
from inspectd.engines.runtime.parity import SCORE_TOLERANCE, parity_gate
from inspectd.engines.runtime.torch_backend import TorchBackend, unavailable_reason

pytest.importorskip("torch", reason="torch not installed (training extra)")


def test_torch_without_cuda_is_unavailable_with_reason(tiny_bundle: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert unavailable_reason().startswith("no CUDA device")
    assert unavailable_reason("cpu") is None
    backend, info = open_backend(load_bundle(tiny_bundle), preference=["torch", "onnxruntime"])
    try:
        assert info.backend == "onnxruntime" and info.skipped["torch"].startswith("no CUDA device")
    finally:
        backend.close()


@pytest.mark.usefixtures("one_torch_thread")
def test_torch_cpu_passes_the_parity_gate(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    good, bad = bundle.golden_images()
    assert good and bad
    with TorchBackend(bundle, device="cpu") as backend:
        # A threshold above the golden good scores (recorded at export), as a calibrated line has.
        threshold = max(float(bundle.normalize(s)) for s in bundle.manifest.golden.good_scores) + 1.0
        report = parity_gate(backend, bundle, threshold=threshold)
        assert report.passed and report.max_score_diff <= SCORE_TOLERANCE and len(report.rows) == len(good + bad)
        assert backend.describe()["precision"] == "fp32" and backend.describe()["device"] == "cpu"
        # Batches work too and agree with batch-1 results.
        x = np.stack([load_prepared(p, bundle.input_spec) for p in good[:3]])
        scores, maps = backend.infer(x)
        assert scores.shape == (3,) and maps.shape == (3, *bundle.map_shape)
        single = backend.infer(x[:1])[0][0]
        assert abs(float(bundle.normalize(float(scores[0]))) - float(bundle.normalize(float(single)))) < SCORE_TOLERANCE


def test_torch_backend_refuses_a_wrong_batch(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    h, w, c = bundle.input_spec.shape
    with TorchBackend(bundle, device="cpu") as backend:
        expected = rf"expected input N x {h} x {w} x {c} \(NHWC\), got 1 x 64 x 64 x {c}"
        with pytest.raises(InputShapeError, match=expected):
            backend.infer(np.zeros((1, 64, 64, c), np.uint8))
        with pytest.raises(InputShapeError, match="expected dtype uint8, got float32"):
            backend.infer(np.zeros((1, h, w, c), np.float32))


def test_reference_reproduces_export_time_golden_scores(tiny_bundle: Path) -> None:
    """ONNX Runtime here scores the golden images as recorded at export: the reference itself
    has not drifted (a different ORT build or preprocessing would show up here first)."""
    bundle = load_bundle(tiny_bundle)
    good, _ = bundle.golden_images()
    with OnnxRuntimeBackend(bundle) as ref:
        got = [float(ref.infer(load_prepared(p, bundle.input_spec)[None])[0][0]) for p in good]
    recorded = bundle.manifest.golden.good_scores
    diffs = [abs(float(bundle.normalize(a)) - float(bundle.normalize(b))) for a, b in zip(got, recorded)]
    assert len(diffs) == len(good) and max(diffs) < 1e-3


@pytest.mark.usefixtures("one_torch_thread")
def test_cli_check_engine_torch_cpu(tiny_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-engine", "--bundle", str(tiny_bundle), "--backend", "torch", "--option", "device=cpu"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("PASS: backend torch vs onnxruntime-cpu")
