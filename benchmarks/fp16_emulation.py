"""Would a GPU's reduced-precision engine of this bundle pass the parity gate? 16-bit arithmetic
emulated on this CPU (no GPU here), against the product's ONNX Runtime FP32 reference.

    python benchmarks/fp16_emulation.py --bundle B --split DIR [--limit 60]

Engines (EMULATIONS of GPU arithmetic, named as such):
- `torch fp16, everything`: torch autocast float16 on CPU over the whole model (what FP16 engines
  computed before the first layers were kept in FP32);
- `torch fp16, FP32 through block k`: the stem and blocks 0..k in FP32, the rest FP16 (k = the
  first tap is what the product does: TorchBackend(fp16=True), and what TensorRT builds are told);
- `tf32, everything`: every convolution's inputs and weights rounded to a 10-bit mantissa, FP32
  accumulation and storage (TF32: what TensorRT and cuDNN do to FP32 layers on Ampere+ by default);
- `torch bf16, FP32 through the first tap`: the same rule with bfloat16 (CPU AMX), for issue 16's
  question whether a CPU BF16 engine could pass the gate;
- `openvino f16` when OpenVINO is installed and the CPU has AVX-512 FP16 (an independent FP16
  implementation; OpenVINO is not a dependency).
Reported per engine: the largest normalised score difference on the bundle's golden images (the
gate's measure, tolerance 0.05) and the largest map difference (tolerance 0.02 of the display
range); on the first --limit good + --limit bad test images the |normalised score difference|
median / p95 / max; the image AUROC on the whole test split for the product's engine rows.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from inspectd.engines import backbone as backbone_mod
from inspectd.engines import preprocess
from inspectd.engines.bundle import load_bundle
from inspectd.engines.runtime.onnxruntime_backend import OnnxRuntimeBackend
from inspectd.engines.runtime.parity import SCORE_TOLERANCE, golden_set
from inspectd.engines.runtime.precision import first_tap
from inspectd.engines.runtime.torch_backend import TorchBackend
from inspectd.stats import roc_auc

THREADS = 2
Engine = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def _tf32(t: torch.Tensor) -> torch.Tensor:
    """Round to nearest with a 10-bit mantissa, kept in float32 (TF32's input rounding)."""
    i = t.float().contiguous().view(torch.int32)
    return ((i + 0x1000) & ~0x1FFF).view(torch.float32)


@contextlib.contextmanager
def _patched(through: int | None, tf32: bool) -> Iterator[None]:
    """`through`: keep the stem and blocks 0..through in FP32 under autocast (-2: nothing; None:
    the product's own rule). `tf32`: every convolution rounds its inputs and weights to TF32."""
    full_precision = backbone_mod.full_precision
    saved_conv, saved_forward = F.conv2d, backbone_mod.EfficientNetFeatures.forward
    if through is not None:
        def forward(self: Any, x: torch.Tensor) -> list[torch.Tensor]:
            out = []
            with full_precision(x) if through >= -1 else contextlib.nullcontext():
                x = self.act(self._bn0(self._conv_stem(x)))
            for i, block in enumerate(self._blocks):
                with full_precision(x) if i <= through else contextlib.nullcontext():
                    x = block(x)
                if i in self.taps:
                    out.append(x)
            return out
        backbone_mod.EfficientNetFeatures.forward = forward
    if tf32:  # torch.nn.functional: what nn.Conv2d and the flow's projection call
        F.conv2d = lambda x, w, *a, **k: saved_conv(_tf32(x), _tf32(w), *a, **k)
    try:
        yield
    finally:
        backbone_mod.EfficientNetFeatures.forward = saved_forward
        F.conv2d = saved_conv


def _bf16(bundle: Any) -> Engine:
    """The bundle's model under autocast bfloat16 on this CPU (AMX / AVX-512 BF16), with the
    product's rule (the layers up to the first tap in FP32)."""
    from inspectd.engines.model import build_from_bundle

    model = build_from_bundle(bundle)

    def infer(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            score, amap = model(torch.from_numpy(x))
        return score.float().numpy().reshape(-1), amap.float().numpy()
    return infer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--split", type=Path, required=True, help="folder with test_good/ and test_bad/")
    ap.add_argument("--limit", type=int, default=60, help="test images per class for the difference figures")
    ap.add_argument("--gate-with-calibration", action="store_true",
                    help="the gate columns over the golden images and the bundle's stored calibration images "
                         "(what a gate on more images would decide)")
    ap.add_argument("--skip-auroc", action="store_true", help="no AUROC column (the slowest part)")
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    bundle = load_bundle(args.bundle)
    spec = bundle.input_spec
    good = preprocess.list_images(args.split / "test_good")
    bad = preprocess.list_images(args.split / "test_bad")
    sample = [preprocess.load_prepared(p, spec)[None] for p in good[: args.limit] + bad[: args.limit]]
    gate_paths = [p for p, _ in golden_set(bundle)]  # what the gate scores
    if args.gate_with_calibration:
        gate_paths += [bundle.path / p for p in bundle.manifest.calibration_images]
    golden = [preprocess.load_stored(p, spec)[None] for p in gate_paths]
    span = max(bundle.manifest.map.display_hi - bundle.manifest.map.display_lo, 1e-12)

    reference = OnnxRuntimeBackend(bundle, intra_op_threads=THREADS)
    fp16 = TorchBackend(bundle, device="cpu", fp16=True, threads=THREADS)
    fp32 = TorchBackend(bundle, device="cpu", fp16=False, threads=THREADS)
    tap = first_tap(bundle)
    engines: list[tuple[str, Engine, Callable[[], Any], bool]] = [
        ("torch fp16, everything", fp16.infer, lambda: _patched(-2, False), True),
        ("torch fp16, FP32 stem", fp16.infer, lambda: _patched(-1, False), False),
        *[(f"torch fp16, FP32 through block {k}", fp16.infer, (lambda k=k: _patched(k, False)), False)
          for k in range(0, (tap or 0))],
        (f"torch fp16, FP32 through block {tap} = the first tap (product)", fp16.infer,
         lambda: _patched(None, False), True),
        ("tf32, everything (fp32 engine, TF32 on)", fp32.infer, lambda: _patched(None, True), False),
        (f"torch bf16, FP32 through block {tap} (CPU BF16, issue 16; not a product engine)", _bf16(bundle),
         contextlib.nullcontext, True),
    ]
    try:
        import openvino as ov

        core = ov.Core()
        if "FP16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            request = core.compile_model(str(bundle.model_path), "CPU", {
                "INFERENCE_PRECISION_HINT": "f16", "INFERENCE_NUM_THREADS": THREADS}).create_infer_request()

            def ov_infer(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                out = request.infer({0: x})
                return np.asarray(out[0]).reshape(-1), np.asarray(out[1])
            engines.append(("openvino f16, everything", ov_infer, contextlib.nullcontext, False))
    except ImportError:
        pass

    def run(infer: Engine, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        outs = [infer(x) for x in images]
        return (bundle.normalize(np.concatenate([o[0].reshape(-1) for o in outs])),
                np.concatenate([np.asarray(o[1]) for o in outs]))

    ref_gold, ref_gold_maps = run(reference.infer, golden)
    ref_sample, _ = run(reference.infer, sample)
    ref_auroc = None
    n_good = min(args.limit, len(good))
    print(f"bundle {bundle.bundle_id} ({spec.height}x{spec.width}), first tap: block {tap}; {len(golden)} gate "
          f"images{' (golden + calibration)' if args.gate_with_calibration else ''}; differences on {len(sample)} "
          f"test images ({n_good} good + {len(sample) - n_good} bad)")
    print("| engine (emulated on CPU) | golden: max score diff (gate 0.05) | golden: max map diff / display range "
          "(gate 0.02) | test: median / p95 / max score diff | good test images: max, how many over 0.05 | image AUROC |"
          "\n|---|---|---|---|---|---|")
    for name, infer, patch, with_auroc in engines:
        with torch.no_grad(), patch():
            gold, gold_maps = run(infer, golden)
            scores, _ = run(infer, sample)
            auroc = ""
            if with_auroc and not args.skip_auroc:
                if ref_auroc is None:
                    all_images = [preprocess.load_prepared(p, spec)[None] for p in good + bad]
                    ref_all, _ = run(reference.infer, all_images)
                    ref_auroc = roc_auc(ref_all[: len(good)], ref_all[len(good):])
                full, _ = run(infer, all_images)
                auroc = f"{roc_auc(full[: len(good)], full[len(good):]):.4f} (FP32 {ref_auroc:.4f})"
        d = np.abs(scores - ref_sample)
        map_diff = float(np.max(np.abs(gold_maps - ref_gold_maps)))
        print(f"| {name} | {np.max(np.abs(gold - ref_gold)):.4f} | {map_diff / span:.4f} | {np.median(d):.4f} / "
              f"{np.quantile(d, 0.95):.4f} / {d.max():.4f} | {d[:n_good].max():.4f}, {int(np.sum(d[:n_good] > SCORE_TOLERANCE))}/{n_good} | "
              f"{auroc} |",
              flush=True)
    for backend in (reference, fp16, fp32):
        backend.close()


if __name__ == "__main__":
    main()
