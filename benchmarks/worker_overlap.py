"""The line worker alone, as fast as it takes frames: one LinePipeline (the daemon's line settings,
thread budget included) on a looping replay of IMAGES, judging with BUNDLE, verdicts counted by a
sink that keeps nothing. Prints frames/s over FRAMES engine verdicts after 100 warm-up verdicts, and
the median engine call. No publisher, metrics or other daemon threads: what the worker loop itself
costs around the engine.

    python benchmarks/worker_overlap.py --bundle B --images DIR [--frames 600]

To compare two revisions side by side, alternate runs with PYTHONPATH pointing at a checkout of the
other one (`git worktree add /tmp/prev <rev>`; `PYTHONPATH=/tmp/prev python benchmarks/worker_overlap.py ...`):
the first word printed says which worker ran (`overlapped` or `serial`).
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import numpy as np

import inspectd.daemon.pipeline as pipeline_module
from inspectd.daemon.config import config_from_dict
from inspectd.daemon.line import LineThreshold
from inspectd.daemon.pipeline import LinePipeline
from inspectd.daemon.run import line_settings
from inspectd.daemon.sources.replay import ReplaySource
from inspectd.engines.bundle import load_bundle

WARMUP_VERDICTS = 100


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--images", type=Path, required=True)
    ap.add_argument("--frames", type=int, default=600)
    args = ap.parse_args()
    # A budget no frame reaches: only engine verdicts are counted, never fail-safe ones.
    cfg = config_from_dict({"lines": [{"id": "w", "source": {"type": "replay", "path": str(args.images), "loop": True},
                                       "bundle": str(args.bundle), "threshold": 5.0, "latency_budget_ms": 60_000,
                                       "heatmap": {"publish": "none"}}]}).lines[0]
    settings = line_settings(cfg)
    cond = threading.Condition()
    judged: list[float] = []      # engine call ms, per verdict with a score
    stamps: dict[int, float] = {}
    failsafe = [0]
    end = WARMUP_VERDICTS + args.frames

    def sink(v) -> None:  # noqa: ANN001
        with cond:
            if v.score is None:
                failsafe[0] += 1
                return
            judged.append(v.infer_ms)
            if len(judged) in (WARMUP_VERDICTS, end):
                stamps[len(judged)] = time.perf_counter()
            cond.notify_all()

    pipe = LinePipeline(settings, ReplaySource.from_config(cfg.source, "w"), load_bundle(args.bundle),
                        LineThreshold("w", value=5.0), sink).start()
    try:
        if not pipe.wait_ready(120.0):
            raise SystemExit("the line did not become ready")
        with cond:
            while len(judged) < end:
                cond.wait(1.0)
    finally:
        pipe.stop(3.0)
    worker = "overlapped" if hasattr(pipeline_module, "_InFlight") else "serial"
    fps = args.frames / (stamps[end] - stamps[WARMUP_VERDICTS])
    print(f"{worker}: {fps:.2f} frames/s over {args.frames} verdicts; engine call p50 "
          f"{float(np.median(judged[WARMUP_VERDICTS:])):.2f} ms; fail-safe {failsafe[0]}", flush=True)


if __name__ == "__main__":
    main()
