"""Engine latency of trained bundles side by side in one run (ONNX Runtime CPU, batch 1): any
method, read only through model.onnx, as the daemon runs it.

    python benchmarks/bundle_latency.py --iterations 100 --rounds 3 NAME=BUNDLE [NAME=BUNDLE ...]

Every round times each bundle once in turn (interleaved), so load changes hit all alike; every
round is reported, not the best. Input: the bundle's own golden good images, cycled.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from inspectd.engines.bundle import load_bundle
from inspectd.engines.preprocess import load_stored
from inspectd.engines.runtime.onnxruntime_backend import OnnxRuntimeBackend


def _joined(rounds: list[dict[str, float]], key: str) -> str:
    return " / ".join(f"{r[key]:.1f}" for r in rounds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+", metavar="NAME=BUNDLE")
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: every core)")
    args = ap.parse_args()
    runs = []
    for item in args.bundles:
        name, _, path = item.partition("=")
        bundle = load_bundle(path)
        good, _ = bundle.golden_images()
        images = [load_stored(p, bundle.input_spec)[None] for p in good]
        backend = OnnxRuntimeBackend(bundle, threads=args.threads) if args.threads else OnnxRuntimeBackend(bundle)
        for x in images:
            backend.infer(x)  # warm-up
        runs.append((name, bundle, backend, images))
    rows: dict[str, list[dict[str, float]]] = {name: [] for name, *_ in runs}
    for _ in range(args.rounds):
        for name, bundle, backend, images in runs:
            t = []
            for i in range(args.iterations):
                t0 = time.perf_counter()
                backend.infer(images[i % len(images)])
                t.append((time.perf_counter() - t0) * 1e3)
            rows[name].append({"p50_ms": float(np.percentile(t, 50)), "p99_ms": float(np.percentile(t, 99))})
    for _, _, backend, _ in runs:
        backend.close()
    out = {"cpus": os.cpu_count(), "iterations": args.iterations, "rounds": rows}
    print(json.dumps(out, indent=2))
    print("\n| bundle | method | input | p50 ms (rounds) | p99 ms (rounds) |\n|---|---|---|---|---|")
    for name, bundle, *_ in runs:
        r = rows[name]
        i = bundle.manifest.input
        print(f"| {name} | {bundle.manifest.method.name} | {i.height}x{i.width} | "
              f"{_joined(r, 'p50_ms')} | {_joined(r, 'p99_ms')} |")


if __name__ == "__main__":
    main()
