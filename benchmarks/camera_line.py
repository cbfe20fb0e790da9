"""A line on a real GenTL camera: engine alone vs the daemon acquiring from the camera, in one run.

    python benchmarks/camera_line.py --bundle BUNDLE [--seconds 30] [--runs 3] [--budget-ms 150] [--busy N] [--fps F]

The camera is the GenTL simulator that ships in the genicam wheel (viky.cti: 400x400 RGBa8, free
running at about 20 fps), read through harvesters exactly as on a line.
1. engine only: preprocess.prepare + Backend.infer on frames captured from the camera -> p50/p99;
2. `inspectd run` (child process) acquiring from the camera for `--seconds`, a real ZeroMQ
   subscriber -> acquisition to verdict received p50/p99, queue_ms / infer_ms from the verdict
   headers, fail-safe verdicts by reason (deadline missed, dropped), the daemon's CPU per frame, and
   the share of its stall watch's wake-ups more than 10 ms late (the InspectdInterpreterStalls alert
   fires over 5 %).
Step 2 is repeated `--runs` times; every run is printed. `--busy N`: N other processes keep one CPU
each busy during every daemon run (an operator's recalibration or eval on the line PC, a backup).
`--fps F`: the camera set to F frames a second (AcquisitionFrameRate) in step 2, e.g. faster than the
engine judges them (the queue-full fail-safe verdicts are counted with their reason).
3. what a reconnect costs the other lines of the same daemon: genicam's GenTL calls keep the GIL, so
   while one camera is opened or closed (or looked for and not found) no other Python thread runs.
   A thread that sleeps 1 ms in a loop (the daemon's StallWatch) measures it: how late it woke at
   worst during `--cycles` opens and closes of the camera, and during as many failed lookups (a
   serial that is not there).
4. what waiting costs: the CPU a source uses while read() waits on a camera that sends nothing (a
   triggered line between parts; acquisition stopped here), as % of one core.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import genicam
import yaml

from daemon_latency import add_backend_option_arg, backend_options, daemon_run, engine_only
from inspectd.daemon.capture import capture
from inspectd.daemon.sources.genicam import GenicamSource
from inspectd.daemon.stallwatch import StallWatch

CTI = Path(genicam.__file__).parent / "viky.cti"
CAMERA_FPS = 20.0  # the simulator's frame rate


def capture_frames(work: Path, bundle: Path, source: dict, count: int) -> list[Path]:
    """`count` frames of the camera, saved as `inspectd capture` saves them."""
    config = work / "capture.yaml"
    config.write_text(yaml.safe_dump({"lines": [{"id": "bench", "source": source, "bundle": str(bundle),
                                                 "threshold": 5.0}]}))
    return capture(config, "bench", work / "frames", count).files


def longest_stall_ms(work: Callable[[], None]) -> float:
    """The longest any other thread waited to run (ms) while `work` ran: a 1 ms StallWatch."""
    late: list[float] = []
    with StallWatch(late.append, interval_s=0.001):
        work()
    return max(late) * 1e3


def reconnect_stalls(cycles: int) -> dict[str, float]:
    from inspectd.daemon.sources.base import SourceError

    def open_close() -> None:
        for _ in range(cycles):
            source = GenicamSource("bench", CTI, {"index": 0})
            source.open()
            source.read(3.0)
            source.close()

    def not_found() -> None:
        for _ in range(cycles):
            try:
                GenicamSource("bench", CTI, {"serial": "no-such-camera"}).open()
            except SourceError:
                pass
            time.sleep(0.05)

    return {"open, read, close": longest_stall_ms(open_close), "failed lookup": longest_stall_ms(not_found)}


def idle_wait_cpu(seconds: float = 3.0) -> float:
    """% of one core used by read() waiting on a camera that sends nothing."""
    source = GenicamSource("bench", CTI, {"index": 0})
    source.open()
    try:
        source._ia.stop()  # no more frames; the source does not know
        start, end = os.times(), time.monotonic() + seconds
        while time.monotonic() < end:
            source.read(0.5)
        used = os.times()
    finally:
        source.close()
    return 100 * ((used.user - start.user) + (used.system - start.system)) / (used.elapsed - start.elapsed)


@contextlib.contextmanager
def busy_processes(n: int) -> Iterator[None]:
    """`n` processes that each keep one CPU busy while the block runs, at nice 0 as an operator's
    shell runs them (whatever this script runs at: `nice -n -5 python benchmarks/camera_line.py`
    measures a daemon given the priority a service unit's Nice=-5 gives it)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"],
                              preexec_fn=lambda: os.setpriority(os.PRIO_PROCESS, 0, 0)) for _ in range(n)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True, type=Path)
    ap.add_argument("--seconds", type=float, default=30.0, help="per daemon run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--budget-ms", type=float, default=150.0, help="the line's latency budget")
    ap.add_argument("--engine-frames", type=int, default=500)
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--cycles", type=int, default=10, help="camera opens / failed lookups in step 3")
    ap.add_argument("--busy", type=int, default=0, help="processes keeping one CPU each busy during the daemon runs")
    ap.add_argument("--fps", type=float, default=None,
                    help=f"the camera's frame rate in the daemon runs (default: its own, ~{CAMERA_FPS:g})")
    add_backend_option_arg(ap)
    args = ap.parse_args()
    options = backend_options(args)
    if not CTI.is_file():
        raise SystemExit(f"{CTI}: the GenTL simulator is not installed (genicam wheel without viky.cti)")

    source = {"type": "genicam", "cti": str(CTI), "device": {"index": 0}}
    line_source = {**source, "features": {"AcquisitionFrameRate": args.fps}} if args.fps else source
    frames = int(args.seconds * (args.fps or CAMERA_FPS))
    with tempfile.TemporaryDirectory(prefix="inspectd-camera-") as tmp:
        work = Path(tmp)
        eng = engine_only(args.bundle, capture_frames(work, args.bundle, source, 20), args.engine_frames,
                          args.backend, options)
        runs = []
        for _ in range(args.runs):
            with busy_processes(args.busy):
                runs.append(daemon_run(work, args.bundle, line_source, frames, args.backend, queue_size=4,
                                       timeout_s=args.seconds + 60, budget_ms=args.budget_ms, options=options))
    stalls = reconnect_stalls(args.cycles)
    idle = [idle_wait_cpu() for _ in range(3)]

    print(f"\ninspectd camera line benchmark: bundle {args.bundle}, {CTI.name} at ~{args.fps or CAMERA_FPS:g} fps, "
          f"budget {args.budget_ms:g} ms, backend {args.backend}, {os.cpu_count()} CPUs, {args.runs} runs, "
          f"backend options {options or 'default'}, {args.busy} busy processes beside the daemon")
    print(f"{'':28}{'p50 ms':>9}{'p99 ms':>9}{'frames/s':>10}{'queue p50/p99':>16}{'infer p50/p99':>16}"
          f"{'fail-safe':>11}{'CPU ms/frame':>14}")
    print(f"{'engine only (prepare + infer)':28}{eng['p50_ms']:9.2f}{eng['p99_ms']:9.2f}{eng['fps']:10.1f}"
          f"{'':16}{eng['infer_p50_ms']:8.2f}/{eng['infer_p99_ms']:<7.2f}")
    for i, r in enumerate(runs, 1):
        print(f"{f'run {i}: daemon on the camera':28}{r['p50_ms']:9.2f}{r['p99_ms']:9.2f}{r['result_fps']:10.1f}"
              f"{r['queue_p50_ms']:8.2f}/{r['queue_p99_ms']:<7.2f}{r['infer_p50_ms']:8.2f}/{r['infer_p99_ms']:<7.2f}"
              f"{r['failsafe']:11d}{r['cpu_ms_per_frame']:14.2f}")
    for i, r in enumerate(runs, 1):
        print(f"run {i}: {r['results']} verdicts, fail-safe {r['failsafe']} {r['reasons'] or ''}; "
              f"stall-watch wake-ups over 10 ms late {100 * r['stalls_over_10ms']:.1f} %; "
              f"RSS {r['rss_mb']:.0f} MiB; exit {r['exit']}")
    for what, ms in stalls.items():
        print(f"other threads stalled by the camera, {what} x {args.cycles}: longest {ms:.1f} ms")
    print("CPU while read() waits on a silent camera: " + ", ".join(f"{c:.1f}" for c in idle) + " % of one core")
    return 0


if __name__ == "__main__":
    sys.exit(main())
