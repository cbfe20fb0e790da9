"""What the daemon's periodic Python threads cost an engine call, side by side in one run.

    python benchmarks/daemon_tickers.py --bundle BUNDLE [--rounds 5] [--calls 60]

One ONNX Runtime session on the bundle's model.onnx with the product's session options (pool threads
sleeping between operators, the daemon's thread budget), batch 1 on seeded noise. Python threads wake
as the daemon's periodic ones do (the stall watch at 100 Hz, the supervisor at 20 Hz, the main loop at
10 Hz, the reload loop at 5 Hz) and do nothing else. Each round times `--calls` calls with the tickers
parked, then as many with them waking; every round is printed, then all rounds together.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from inspectd.engines.bundle import load_bundle
from inspectd.engines.runtime.onnxruntime_backend import session_options, thread_budget, usable_cpus

PERIODS_S = (0.01, 0.05, 0.1, 0.2)  # stall watch, supervisor, main loop, reload loop


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=60)
    args = ap.parse_args(argv)
    bundle = load_bundle(args.bundle)
    sess = ort.InferenceSession(str(bundle.model_path), session_options(ort, thread_budget(usable_cpus())),
                                providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    x = np.random.default_rng(0).integers(0, 256, (1, *bundle.input_spec.shape), dtype=np.uint8)
    for _ in range(10):
        sess.run(None, {name: x})
    stop, waking = threading.Event(), threading.Event()

    def tick(period_s: float) -> None:
        while not stop.is_set():
            if waking.is_set():
                stop.wait(period_s)
            else:
                waking.wait(0.5)

    for period in PERIODS_S:
        threading.Thread(target=tick, args=(period,), daemon=True).start()
    times: dict[str, list[float]] = {"parked": [], "waking": []}
    for rnd in range(args.rounds):
        for mode in times:
            (waking.set if mode == "waking" else waking.clear)()
            time.sleep(0.05)
            calls = []
            for _ in range(args.calls):
                t0 = time.perf_counter()
                sess.run(None, {name: x})
                calls.append(time.perf_counter() - t0)
            times[mode] += calls
            print(f"round {rnd} {mode:7s} mean {np.mean(calls) * 1e3:.2f} ms  p50 {np.median(calls) * 1e3:.2f} ms",
                  flush=True)
    stop.set()
    for mode, calls in times.items():
        print(f"all     {mode:7s} mean {np.mean(calls) * 1e3:.2f} ms  p50 {np.median(calls) * 1e3:.2f} ms  "
              f"p99 {np.percentile(calls, 99) * 1e3:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
