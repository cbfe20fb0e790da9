"""ONNX Runtime pool-thread spinning vs engine latency at a line's pace, side by side in one run.

    python benchmarks/ort_spinning.py --bundle BUNDLE [--rates 10,30,0] [--rounds 3] [--iterations 100]
    python benchmarks/ort_spinning.py --bundle BUNDLE --concurrent 2,2+2,2+1 [--rounds 2] [--seconds 8]

Three settings, each one ONNX Runtime session on the bundle's model.onnx (batch 1, the product's
thread budget), timed in turn within every round and at every rate (0 = back to back), calls
started 1/rate apart as a line's parts arrive (`inspectd bench --rate`'s timing):
- off: pool threads sleep whenever they have no work, also between the operators of one call
  (the product default);
- spin in call: they spin between operators and stop when the call returns
  (`session.force_spinning_stop`; a line's `backend_options.onnxruntime.spin: true`; the default
  from 2026-12-02 until RESULTS.md §23 showed what it does beside a busy process);
- spin on: ONNX Runtime's own default, threads also spin on after the call (shown for its cost only).
Per setting: p50 / p99 of the call, and the CPU the process used per call (all threads) — what the
setting takes from the daemon's other threads. Every round is printed, not the best.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from inspectd.daemon.pipeline import timing_frame
from inspectd.engines.bundle import load_bundle
from inspectd.engines.runtime.bench import time_paced
from inspectd.engines.runtime.onnxruntime_backend import default_intra_op_threads, session_options


def _session(model: Path, threads: int, setting: str) -> ort.InferenceSession:
    if setting == "spin on":  # ONNX Runtime's own defaults for spinning (it goes on after the call)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    else:
        opts = session_options(ort, threads, spin=setting != "off")
    return ort.InferenceSession(str(model), sess_options=opts, providers=["CPUExecutionProvider"])


def _worker(bundle_path: Path, threads: int, spin: bool, start: float, seconds: float) -> None:
    """One engine, back to back from `start` (wall clock) for `seconds`; prints its figures as JSON."""
    bundle = load_bundle(bundle_path)
    frame = timing_frame(bundle)
    session = ort.InferenceSession(str(bundle.model_path), sess_options=session_options(ort, threads, spin),
                                   providers=["CPUExecutionProvider"])
    feed = {bundle.manifest.model.input_name: frame}
    for _ in range(5):
        session.run(None, feed)
    while time.time() < start:
        time.sleep(0.001)
    ms: list[float] = []
    while time.time() < start + seconds:
        t0 = time.perf_counter()
        session.run(None, feed)
        ms.append((time.perf_counter() - t0) * 1000)
    print(json.dumps({"calls": len(ms), "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99))}))


def concurrent(bundle: Path, specs: list[str], rounds: int, seconds: float) -> None:
    print(f"bundle {bundle}, ONNX Runtime {ort.__version__}, {seconds:g} s per row, engines in separate processes")
    print(f"{'round':>5} {'engines':>8} {'setting':14} {'calls/s':>8}  p50 ms / p99 ms per engine")
    for r in range(1, rounds + 1):
        for spec in specs:
            threads = [int(t) for t in spec.split("+")]
            for name in ("off", "spin in call"):
                start = time.time() + 5  # every worker loaded and warm before the clock starts
                procs = [subprocess.Popen([sys.executable, __file__, "--bundle", str(bundle), "--worker",
                                           f"{t},{int(name != 'off' and t > 1)},{start},{seconds}"],
                                          stdout=subprocess.PIPE, text=True) for t in threads]
                out = [json.loads(p.communicate()[0]) for p in procs]
                total = sum(o["calls"] for o in out) / seconds
                each = ", ".join(f"{o['p50']:.1f} / {o['p99']:.1f}" for o in out)
                print(f"{r:5d} {spec:>8} {name:14} {total:8.1f}  {each}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True, type=Path)
    ap.add_argument("--rates", default="10,30,0", help="calls per second, comma-separated; 0 = back to back")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=100, help="timed calls per setting, rate and round")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: the product's default)")
    ap.add_argument("--concurrent", help="engines at once, as intra-op threads: e.g. 2,2+2,2+1")
    ap.add_argument("--seconds", type=float, default=8.0, help="with --concurrent: seconds per row")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        threads, spin, start, seconds = args.worker.split(",")
        _worker(args.bundle, int(threads), spin == "1", float(start), float(seconds))
        return
    if args.concurrent:
        concurrent(args.bundle, args.concurrent.split(","), args.rounds, args.seconds)
        return
    bundle = load_bundle(args.bundle)
    threads = args.threads or default_intra_op_threads()
    frame = timing_frame(bundle)
    settings = ("off", "spin in call", "spin on")
    sessions = {s: _session(bundle.model_path, threads, s) for s in settings}
    input_name = bundle.manifest.model.input_name
    rates = [float(r) for r in args.rates.split(",")]
    print(f"bundle {args.bundle}, {threads} intra-op threads, ONNX Runtime {ort.__version__}, "
          f"{args.iterations} calls per row")
    print(f"{'round':>5} {'rate':>7} {'setting':14} {'p50 ms':>8} {'p99 ms':>8} {'CPU ms/call':>12}  vs off (p50)")
    for r in range(1, args.rounds + 1):
        for rate in rates:
            p50_off = None
            for name in settings:
                session = sessions[name]
                cpu0 = time.process_time()
                secs = time_paced(lambda: session.run(None, {input_name: frame}), args.iterations, 5,
                                  1.0 / rate if rate else 0.0)
                cpu_ms = (time.process_time() - cpu0) * 1000 / (args.iterations + 5)
                ms = np.asarray(secs) * 1000
                p50, p99 = float(np.percentile(ms, 50)), float(np.percentile(ms, 99))
                p50_off = p50 if name == "off" else p50_off
                label = f"{rate:g}/s" if rate else "b2b"
                print(f"{r:5d} {label:>7} {name:14} {p50:8.2f} {p99:8.2f} {cpu_ms:12.2f}  {p50_off / p50:5.2f}x",
                      flush=True)


if __name__ == "__main__":
    main()
