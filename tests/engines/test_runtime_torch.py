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


def test_autocast_keeps_the_layers_up_to_the_first_tap_in_fp32() -> None:
    """Under autocast (a reduced-precision engine) the stem and the blocks up to the first tap run
    in FP32 and hand FP32 to the rest, which runs in FP16 (runtime/precision.py says why)."""
    import torch

    from inspectd.engines.backbone import EfficientNetFeatures

    net = EfficientNetFeatures("efficientnet-lite0", taps=(4, 10)).eval()
    seen: dict[str, torch.dtype] = {}
    net._conv_stem.register_forward_hook(lambda m, i, o: seen.__setitem__("stem", o.dtype))
    for k, block in enumerate(net._blocks):
        block.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, o.dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        first, second = net(torch.rand(1, 3, 64, 64))
    assert seen["stem"] == torch.float32 and all(seen[k] == torch.float32 for k in range(5))
    assert all(seen[k] == torch.float16 for k in range(5, 11))
    assert first.dtype == torch.float32 and second.dtype == torch.float16
    with torch.no_grad():  # no autocast: FP32 throughout, as the export sees it
        assert all(t.dtype == torch.float32 for t in net(torch.rand(1, 3, 64, 64)))


@pytest.mark.usefixtures("one_torch_thread")
def test_an_fp16_engine_of_the_default_architecture_passes_the_parity_gate(default_architecture_bundle: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """FP16 arithmetic (torch autocast on this CPU: what a GPU's FP16 engine computes, without a GPU)
    on the product's default architecture. With the first layers in FP16 too the gate refused it
    (this test failed), and a GPU line would have fallen back to its CPU backend (RESULTS.md §27)."""
    bundle = load_bundle(default_architecture_bundle)
    with TorchBackend(bundle, device="cpu", fp16=True) as backend:
        assert backend.describe()["precision"] == "fp16-autocast"
        report = parity_gate(backend, bundle)
        assert report.passed and report.max_score_diff > 0  # passes, and it really ran in FP16
    # The operator's check before deploying to a GPU line, on the training machine:
    assert main(["check-engine", "--bundle", str(default_architecture_bundle), "--backend", "torch",
                 "--option", "device=cpu", "--option", "fp16=true"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("PASS: backend torch vs onnxruntime-cpu")
