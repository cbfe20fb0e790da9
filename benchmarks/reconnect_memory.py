"""Memory held per camera reconnect: a GenICam source on the GenTL simulator (viky.cti) opened,
read and closed N times in an acquisition thread (as the daemon's), RSS after each; optionally
beside a second line that keeps the shared producer (Harvester) open.

    python benchmarks/reconnect_memory.py --reconnects 50 --runs 3
    python benchmarks/reconnect_memory.py --reconnects 50 --runs 3 --second-line

Prints, per run, the RSS growth per reconnect after a warm-up of 10 (MiB), and a JSON summary line.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import threading
import time
from pathlib import Path

from recipes_memory import rss_mb  # this process's VmRSS, MiB

WARMUP = 10


def one_run(reconnects: int, second_line: bool) -> float:
    import genicam

    from inspectd.daemon.sources.genicam import GenicamSource

    cti = Path(genicam.__file__).parent / "viky.cti"
    samples: list[float] = []

    def acquisition() -> None:
        other = GenicamSource("other", cti, {"index": 1}) if second_line else None
        if other is not None:
            other.open()
        src = GenicamSource("line", cti, {"index": 0})
        try:
            for _ in range(reconnects + WARMUP):
                src.open()
                if src.read(3.0) is None:
                    raise RuntimeError("the simulator camera delivered no frame")
                src.close()
                gc.collect()
                samples.append(rss_mb())
        finally:
            src.close()
            if other is not None:
                other.close()

    worker = threading.Thread(target=acquisition, name="acquisition")
    worker.start()
    worker.join()
    if len(samples) < reconnects + WARMUP:
        raise RuntimeError("the run did not finish")
    return (samples[-1] - samples[WARMUP - 1]) / reconnects


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reconnects", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--second-line", action="store_true", help="another line keeps the producer open")
    args = parser.parse_args()
    t0 = time.time()
    per = []
    for run in range(args.runs):
        mib = one_run(args.reconnects, args.second_line)
        per.append(round(mib, 4))
        print(f"run {run + 1}: {mib:.4f} MiB RSS per reconnect ({args.reconnects} reconnects after {WARMUP})")
    print(json.dumps({"reconnects": args.reconnects, "second_line": args.second_line, "mib_per_reconnect": per,
                      "seconds": round(time.time() - t0, 1), "machine": platform.node()}))


if __name__ == "__main__":
    main()
