"""Memory per preloaded recipe engine: RSS delta of opening + warming one more engine, the way the
daemon preloads a recipe (`preload: true`) or keeps a promoted bundle's predecessor for rollback.

    python benchmarks/recipes_memory.py --bundle DIR [--bundle DIR ...] [--count 3] [--threads 1]

Without --bundle it trains the tiny synthetic bundles of the tests (flow and cutpaste-ae, ~30 s on
2 cores) into a temporary folder first. Prints one line per engine and a JSON summary.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path

import numpy as np


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS")


def tiny_bundles(folder: Path) -> list[Path]:
    from inspectd.engines.model import ModelConfig
    from inspectd.engines.synthetic import make_dataset
    from inspectd.engines.train import TrainConfig, train

    parts = make_dataset(folder / "parts", n_train=40, n_test_good=12, n_test_bad=12, size=128, seed=0)
    out = []
    for method, options in (("flow", {}), ("cutpaste-ae", {"epochs": "40", "classifier_epochs": "40"})):
        model = ModelConfig(image_height=128, image_width=128, taps=[4, 10], **({"steps": 4} if method == "flow" else {}))
        cfg = TrainConfig(model=model, method=method, options=options, seed=0, select=False,
                          **({"epochs": 12} if method == "flow" else {}))
        train(parts.train_good, folder / method, cfg, golden_bad_dir=parts.test_bad)
        out.append(folder / method)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", action="append", type=Path, default=[])
    ap.add_argument("--count", type=int, default=3, help="engines opened per bundle")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra_op_threads per engine")
    args = ap.parse_args()
    from inspectd.engines.bundle import load_bundle
    from inspectd.engines.runtime import open_backend

    tmp = None
    bundles = args.bundle
    if not bundles:
        # Trained here, measured in a fresh process: memory freed by training would otherwise be
        # reused by the engines and hide their cost (deltas of 0 MB).
        import subprocess
        tmp = tempfile.TemporaryDirectory()
        bundles = tiny_bundles(Path(tmp.name))
        cmd = [sys.executable, __file__, "--count", str(args.count), "--threads", str(args.threads)]
        for b in bundles:
            cmd += ["--bundle", str(b)]
        rc = subprocess.call(cmd)
        tmp.cleanup()
        return rc
    # The runtime itself (import + first session) is paid once per process, not per recipe: open and
    # close one engine first so the deltas below are per additional preloaded engine.
    import onnxruntime  # noqa: F401
    first = load_bundle(bundles[0])
    backend, _ = open_backend(first, ("onnxruntime",), {"onnxruntime": {"intra_op_threads": args.threads}})
    backend.infer(np.zeros((1, *first.input_spec.shape), np.uint8))
    base_runtime = rss_mb()
    summary = {"threads": args.threads, "baseline_rss_mb": round(base_runtime, 1), "bundles": []}
    keep = [backend]
    for path in bundles:
        bundle = load_bundle(path)
        size_mb = sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 2**20
        deltas = []
        for i in range(args.count):
            gc.collect()
            before = rss_mb()
            b, info = open_backend(bundle, ("onnxruntime",), {"onnxruntime": {"intra_op_threads": args.threads}})
            warm = np.zeros((1, *bundle.input_spec.shape), np.uint8)
            for _ in range(2):
                b.infer(warm)
            keep.append(b)
            gc.collect()
            deltas.append(rss_mb() - before)
            print(f"{bundle.bundle_id} ({Path(path).name}, {size_mb:.1f} MB on disk) engine {i + 1}: "
                  f"+{deltas[-1]:.1f} MB RSS")
        summary["bundles"].append({"bundle": str(path), "bundle_id": bundle.bundle_id, "disk_mb": round(size_mb, 2),
                                   "rss_delta_mb": [round(d, 1) for d in deltas],
                                   "median_mb": round(float(np.median(deltas)), 1)})
    for b in keep:
        b.close()
    print(json.dumps(summary, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
