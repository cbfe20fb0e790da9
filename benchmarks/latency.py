"""Latency figures for benchmarks/RESULTS.md.

    python benchmarks/latency.py --bundle BUNDLE [--iterations 500] [--batch 8] [--json out.json]

Runs `inspectd.engines.runtime.bench.run_bench` (every backend that can run here, side by
side, warm-up excluded, host<->device copies included in each timed call), prints a Markdown
section ready to paste into RESULTS.md, and checks the issue's targets:
- CPU: whole engine p50 <= 1.3x the backbone alone (needs `backbone.onnx` in the bundle);
- GPU: end-to-end p99 <= 2 ms at batch 1 for each GPU backend (tensorrt, torch on CUDA).
Exit status 0 always (the figures are the output); targets are reported as met / missed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import warnings
from pathlib import Path

from inspectd.engines.bundle import load_bundle
from inspectd.engines.runtime.bench import BACKBONE_FILE, BenchResult, run_bench

HEAD_RATIO_TARGET = 1.3
GPU_P99_TARGET_MS = 2.0
GPU_BACKENDS = ("tensorrt", "torch")


def markdown(result: BenchResult, bundle_path: str) -> str:
    env = result.environment
    h, w, c = result.input_shape
    lines = [f"### {result.bundle_id} ({h}x{w}x{c}) on {env.get('cpu', '?')} ({env.get('cpu_count')} cores)",
             "",
             f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, bundle `{bundle_path}`, "
             f"onnxruntime {env.get('onnxruntime', '-')}, Python {env.get('python')}.",
             ""]
    for name, facts in result.engines.items():
        lines.append(f"- {name}: " + ", ".join(f"{k}={v}" for k, v in facts.items() if k != "backend"))
    for name, reason in result.skipped.items():
        lines.append(f"- {name}: not measured ({reason})")
    lines += ["", "| what | batch | n | p50 ms | p90 ms | p99 ms | max ms | images/s |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result.rows:
        lines.append(f"| {r.name} | {r.batch} | {r.iterations} | {r.p50_ms:.3f} | {r.p90_ms:.3f} | "
                     f"{r.p99_ms:.3f} | {r.max_ms:.3f} | {r.images_per_s:.1f} |")
    lines += ["", *targets(result)]
    return "\n".join(lines)


def targets(result: BenchResult) -> list[str]:
    out = []
    ratio = result.head_cost_ratio()
    if ratio is None:
        out.append(f"- CPU target (engine <= {HEAD_RATIO_TARGET}x backbone, p50): not measured "
                   "(no backbone.onnx in the bundle, or onnxruntime not run)")
    else:
        verdict = "met" if ratio <= HEAD_RATIO_TARGET else "MISSED"
        out.append(f"- CPU target (engine <= {HEAD_RATIO_TARGET}x backbone, p50): {ratio:.2f}x, {verdict}")
    for name in GPU_BACKENDS:
        row = result.row(name, 1)
        if row is None:
            continue
        verdict = "met" if row.p99_ms <= GPU_P99_TARGET_MS else "MISSED"
        out.append(f"- GPU target ({name}, batch 1, p99 <= {GPU_P99_TARGET_MS} ms incl. copies): "
                   f"{row.p99_ms:.3f} ms, {verdict}")
    return out


def export_backbone(bundle_path: str, out: Path) -> Path | None:
    """The bundle's backbone alone (input adapter + EfficientNet up to the last tap) as ONNX,
    from the torch weights: the "plain backbone" the CPU target compares against. None when
    torch or the bundle's weights are missing (this script may import torch; the runtime not)."""
    try:
        import torch

        from inspectd.engines.export import OPSET
        from inspectd.engines.model import build_from_bundle
    except ImportError as exc:
        print(f"backbone-only not measured: {exc}", file=sys.stderr)
        return None
    bundle = load_bundle(bundle_path)
    try:
        model = build_from_bundle(bundle)
    except (OSError, KeyError) as exc:
        print(f"backbone-only not measured: cannot rebuild the torch model ({exc})", file=sys.stderr)
        return None

    class Backbone(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.adapter, self.backbone = model.adapter, model.backbone

        def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
            return self.backbone(self.adapter(images))

    example = torch.zeros((1, *bundle.input_spec.shape), dtype=torch.uint8)
    n_taps = len(model.backbone.taps)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about the grey-input branch: it is constant per bundle
        torch.onnx.export(Backbone().eval(), (example,), str(out), dynamo=False, opset_version=OPSET,
                          input_names=["images"], output_names=[f"tap{i}" for i in range(n_taps)],
                          dynamic_axes={"images": {0: "batch"}, **{f"tap{i}": {0: "batch"} for i in range(n_taps)}})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--backend", action="append", default=None, help="repeatable; default: all that run here")
    ap.add_argument("--iterations", type=int, default=500)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = all cores)")
    ap.add_argument("--frame", type=int, nargs=2, default=None, metavar=("W", "H"),
                    help="camera frame size for the preprocessing timing")
    ap.add_argument("--no-backbone", action="store_true", help="skip the backbone-only timing")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw result as JSON here")
    args = ap.parse_args(argv)
    bundle = load_bundle(args.bundle)
    options = {"onnxruntime": {"threads": args.threads}} if args.threads else {}
    with tempfile.TemporaryDirectory(prefix="inspectd-bench-") as tmp:
        backbone = None
        if not args.no_backbone and not (bundle.path / BACKBONE_FILE).is_file():
            backbone = export_backbone(args.bundle, Path(tmp) / BACKBONE_FILE)
        result = run_bench(bundle, backends=args.backend, iterations=args.iterations, batch=args.batch,
                           warmup=args.warmup, options=options, frame_size=(args.frame[0], args.frame[1]) if args.frame else None,
                           backbone_onnx=backbone)
    if args.json is not None:
        args.json.write_text(json.dumps(result.as_dict(), indent=2) + "\n", encoding="utf-8")
    print(markdown(result, args.bundle))
    return 0


if __name__ == "__main__":
    sys.exit(main())
