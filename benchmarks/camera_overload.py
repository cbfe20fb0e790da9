"""A camera faster than the engine: the GenTL simulator (viky.cti, in the genicam wheel) set to
`--fps` frames a second (AcquisitionFrameRate), one line judging with BUNDLE under a `--budget-ms`
budget, heatmaps published for NG parts as a line does. A real ZeroMQ subscriber counts, over
`--seconds` after a settle period (read and discarded), the parts judged, the fail-safe verdicts by
reason, and the judged parts' latency (acquisition -> verdict received). Each run is printed.

    python benchmarks/camera_overload.py --bundle B [--fps 60] [--seconds 25] [--runs 2]

To compare two revisions, alternate runs with PYTHONPATH at a worktree of the other
(`PYTHONPATH=/tmp/prev python benchmarks/camera_overload.py ...`): the daemon inherits it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import genicam
import numpy as np
import yaml
import zmq

CTI = Path(genicam.__file__).parent / "viky.cti"
SETTLE_S = 3.0


def one_run(bundle: Path, fps: float, seconds: float, budget_ms: float, workdir: Path, run: int) -> str:
    endpoint = f"ipc://{workdir}/overload-{run}.sock"
    cfg = {"zmq": {"endpoint": endpoint, "sndhwm": 10000}, "metrics": {"port": 0},
           "heartbeat_interval_s": 1.0, "state_dir": str(workdir / f"state-{run}"),
           "lines": [{"id": "cam1", "bundle": str(bundle), "backends": ["onnxruntime"], "threshold": 5.0,
                      "latency_budget_ms": budget_ms, "on_deadline_miss": "NG",
                      "heatmap": {"publish": "ng", "width": 64, "height": 64, "encoding": "png"},
                      "source": {"type": "genicam", "cti": str(CTI), "device": {"index": 0},
                                 "features": {"AcquisitionFrameRate": float(fps)}}}]}
    config = workdir / f"overload-{run}.yaml"
    config.write_text(yaml.safe_dump(cfg))
    log_path = workdir / f"daemon-{run}.log"
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.connect(endpoint)
    sub.setsockopt(zmq.SUBSCRIBE, b"verdict.")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "inspectd.cli", "run", "--config", str(config)], stderr=log)
    try:
        end = time.time() + 120
        while " ready: " not in log_path.read_text():
            if time.time() > end or proc.poll() is not None:
                raise SystemExit(f"the daemon did not become ready (log: {log_path})")
            time.sleep(0.5)
        settle = time.time() + SETTLE_S
        while time.time() < settle:  # what queued before the window is not measured
            if sub.poll(100):
                sub.recv_multipart()
        latency: list[float] = []
        failsafe: dict[str, int] = {}
        end = time.time() + seconds
        while time.time() < end:
            if sub.poll(200):
                header = json.loads(sub.recv_multipart()[1])
                if header.get("score") is None:
                    why = (header.get("error") or "?")[:40]
                    failsafe[why] = failsafe.get(why, 0) + 1
                else:
                    latency.append((time.time_ns() - header["acquired_ns"]) / 1e6)
    finally:
        proc.terminate()
        proc.wait(30)
        sub.close(0)
        ctx.term()
    lat = np.asarray(latency)
    if lat.size == 0:
        return f"run {run}: no part judged; fail-safe {failsafe}; exit {proc.returncode}"
    return (f"run {run}: judged {lat.size} ({lat.size / seconds:.1f}/s), fail-safe {failsafe}; judged latency "
            f"p50 {np.percentile(lat, 50):.1f} p99 {np.percentile(lat, 99):.1f} max {lat.max():.1f} ms; "
            f"exit {proc.returncode}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--fps", type=float, default=60.0)
    ap.add_argument("--seconds", type=float, default=25.0)
    ap.add_argument("--budget-ms", type=float, default=150.0)
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    if not CTI.exists():
        raise SystemExit(f"{CTI}: the GenTL simulator is not installed (genicam wheel without viky.cti)")
    pythonpath = os.environ.get("PYTHONPATH")
    print(f"camera overload: bundle {args.bundle}, simulator at {args.fps:g} fps, budget {args.budget_ms:g} ms"
          + (f", PYTHONPATH={pythonpath}" if pythonpath else ""), flush=True)
    with tempfile.TemporaryDirectory(prefix="inspectd-overload-") as tmp:
        for run in range(1, args.runs + 1):
            print(one_run(args.bundle, args.fps, args.seconds, args.budget_ms, Path(tmp), run), flush=True)


if __name__ == "__main__":
    main()
