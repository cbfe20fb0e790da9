"""The daemon's start-up engine time (pipeline.time_engine) on a blank frame vs on the bundle's first
golden good image (pipeline.timing_frame, what the daemon uses), side by side, three rounds:

    python benchmarks/timing_frame.py --bundle /tmp/s11/inp/bundle

RESULTS.md section 14 (why the daemon times an engine on a real part)."""

from __future__ import annotations

import argparse

import numpy as np

from inspectd.daemon.pipeline import time_engine, timing_frame
from inspectd.engines.bundle import load_bundle
from inspectd.engines.runtime import open_backend


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    bundle = load_bundle(args.bundle)
    backend, _ = open_backend(bundle, ["onnxruntime"])
    blank = np.zeros((1, *bundle.input_spec.shape), np.uint8)
    try:
        for r in range(args.rounds):
            print(f"round {r}: blank {time_engine(backend.infer, blank):.1f} ms, "
                  f"golden {time_engine(backend.infer, timing_frame(bundle)):.1f} ms")
    finally:
        backend.close()


if __name__ == "__main__":
    main()
