"""Soak: `inspectd run` (a child process, as in production) replays images at the maximum rate
the line takes for --frames verdicts or --seconds, whichever comes first, while a healthy
VerdictSubscriber (inspectd.client) counts every verdict and seq gap.

    python benchmarks/soak.py --bundle BUNDLE [--images DIR] [--frames 100000] [--seconds 600]

Every --sample-s the daemon's resident memory (VmRSS), thread count and open file descriptors
are read from /proc/<pid>. After --warmup-s the first sample is the baseline. Targets (issue 7):
RSS growth after warm-up <= 20 MB, no growth in threads or open files, zero seq gaps for the
healthy subscriber, no restart. Exit status 0 when every target is met, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from inspectd.client import Message, VerdictSubscriber

RSS_TARGET_MB = 20.0
# A sample can catch a file the replay source is reading at that instant: +2 is noise, not growth.
FD_SLACK = 2


def _proc_status(pid: int) -> tuple[float, int, int]:
    """(VmRSS MB, threads, open fds) of a live process."""
    rss, threads = float("nan"), -1
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
        elif line.startswith("Threads:"):
            threads = int(line.split()[1])
    return rss, threads, len(os.listdir(f"/proc/{pid}/fd"))


class Counter:
    """The healthy subscriber's callbacks (run in its thread)."""

    def __init__(self) -> None:
        self.verdicts = 0
        self.failsafe = 0
        self.gaps: list[tuple[str, int, int]] = []
        self.restarts = 0
        self.heartbeat_losses = 0
        self.first_seq: int | None = None
        self.last_seq: int | None = None

    def on_verdict(self, msg: Message) -> None:
        self.verdicts += 1
        if msg.header.get("score") is None:
            self.failsafe += 1
        if self.first_seq is None:
            self.first_seq = msg.header["seq"]
        self.last_seq = msg.header["seq"]

    def on_gap(self, topic: str, expected: int, got: int) -> None:
        self.gaps.append((topic, expected, got))

    def on_restart(self, _line: str) -> None:
        self.restarts += 1

    def on_lost(self, _line: str) -> None:
        self.heartbeat_losses += 1


def soak(bundle: Path, images: Path, frames: int, seconds: float, warmup_s: float, sample_s: float,
         backend: str, sndhwm: int, heatmaps: str, workdir: Path) -> dict[str, Any]:
    endpoint = f"ipc://{workdir}/soak-{os.getpid()}.sock"
    config = workdir / "soak.yaml"
    config.write_text(yaml.safe_dump({
        "zmq": {"endpoint": endpoint, "sndhwm": sndhwm}, "metrics": {"port": 0}, "heartbeat_interval_s": 1.0,
        "lines": [{"id": "soak", "bundle": str(bundle), "backends": [backend], "threshold": 5.0,
                   "latency_budget_ms": 1000, "heatmap": {"publish": heatmaps},
                   "source": {"type": "replay", "path": str(images), "loop": True}}]}))  # no fps: max rate
    count = Counter()
    sub = VerdictSubscriber(endpoint, lines=["soak"], heartbeat_timeout_s=5.0, rcvhwm=100000,
                            on_verdict=count.on_verdict, on_gap=count.on_gap, on_restart=count.on_restart,
                            on_heartbeat_lost=count.on_lost)
    log = open(workdir / "daemon.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "inspectd", "run", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=log)
    samples: list[dict[str, float]] = []
    sub.start()
    t_start = time.monotonic()
    baseline: dict[str, float] | None = None
    try:
        while count.verdicts == 0:
            if proc.poll() is not None or time.monotonic() - t_start > 120:
                raise SystemExit(f"daemon did not start; see {workdir / 'daemon.log'}")
            time.sleep(0.1)
        t0 = time.monotonic()
        next_sample = t0
        while count.verdicts < frames and time.monotonic() - t0 < seconds:
            if proc.poll() is not None:
                raise SystemExit(f"daemon exited with {proc.returncode}; see {workdir / 'daemon.log'}")
            now = time.monotonic()
            if now >= next_sample:
                rss, threads, fds = _proc_status(proc.pid)
                s = {"t_s": now - t0, "verdicts": count.verdicts, "rss_mb": rss, "threads": threads, "fds": fds}
                samples.append(s)
                if baseline is None and now - t0 >= warmup_s:
                    baseline = s
                next_sample += sample_s
            time.sleep(min(0.05, max(0.0, next_sample - time.monotonic())))
        elapsed = time.monotonic() - t0
        final = dict(zip(("rss_mb", "threads", "fds"), _proc_status(proc.pid)))
        time.sleep(1.5)  # one more heartbeat: a loss at the very end shows up as a gap via last_seq
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait(5)
        sub.stop()
        log.close()
    after = [s for s in samples if baseline is not None and s["t_s"] >= baseline["t_s"]]
    if baseline is None:
        baseline = samples[-1] if samples else {"rss_mb": float("nan"), "threads": -1, "fds": -1, "t_s": 0}
        after = [baseline]
    result = {
        "verdicts": count.verdicts, "failsafe": count.failsafe, "seconds": round(elapsed, 1),
        "fps": round(count.verdicts / elapsed, 1) if elapsed else None,
        "warmup_s": round(baseline["t_s"], 1), "rss_baseline_mb": round(baseline["rss_mb"], 1),
        "rss_final_mb": round(final["rss_mb"], 1),
        "rss_growth_mb": round(final["rss_mb"] - baseline["rss_mb"], 1),
        "rss_max_growth_mb": round(max(s["rss_mb"] for s in after) - baseline["rss_mb"], 1),
        "threads_baseline": baseline["threads"], "threads_max": max(s["threads"] for s in after),
        "threads_final": final["threads"],
        "fds_baseline": baseline["fds"], "fds_max": max(s["fds"] for s in after), "fds_final": final["fds"],
        "seq_gaps": len(count.gaps), "lost": sub.lost, "restarts": count.restarts,
        "heartbeat_losses": count.heartbeat_losses, "exit_code": rc,
    }
    result["pass"] = bool(result["rss_growth_mb"] <= RSS_TARGET_MB
                          and result["threads_max"] <= result["threads_baseline"]
                          and result["fds_max"] <= result["fds_baseline"] + FD_SLACK and result["lost"] == 0
                          and result["restarts"] == 0 and rc == 0)
    return result


def _table(r: dict[str, Any]) -> str:
    rows = [
        ("verdicts (fail-safe)", f"{r['verdicts']} ({r['failsafe']}) in {r['seconds']} s, {r['fps']} /s", ""),
        ("RSS after warm-up -> end", f"{r['rss_baseline_mb']} -> {r['rss_final_mb']} MB "
         f"(growth {r['rss_growth_mb']}, max {r['rss_max_growth_mb']})", f"<= {RSS_TARGET_MB:g} MB"),
        ("threads baseline / max / end", f"{r['threads_baseline']} / {r['threads_max']} / {r['threads_final']}",
         "no growth"),
        ("open fds baseline / max / end", f"{r['fds_baseline']} / {r['fds_max']} / {r['fds_final']}",
         f"no growth (+{FD_SLACK} transient)"),
        ("seq gaps (messages lost)", f"{r['seq_gaps']} ({r['lost']})", "0"),
        ("restarts / heartbeat losses", f"{r['restarts']} / {r['heartbeat_losses']}", "0 / 0"),
        ("daemon exit code (SIGTERM)", str(r["exit_code"]), "0"),
    ]
    out = ["| measure | result | target |", "|---|---|---|"]
    out += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    out.append(f"\n**{'PASS' if r['pass'] else 'FAIL'}**")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True, type=Path)
    ap.add_argument("--images", type=Path, help="folder of images to replay (default: the bundle's golden/)")
    ap.add_argument("--frames", type=int, default=100_000)
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--warmup-s", type=float, default=20.0, help="RSS/threads/fds baseline taken after this")
    ap.add_argument("--sample-s", type=float, default=1.0)
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--sndhwm", type=int, default=1000, help="the publisher's high-water mark (config default)")
    ap.add_argument("--heatmaps", choices=["none", "ng", "all"], default="ng", help="heatmaps published")
    ap.add_argument("--json", type=Path, help="also write the result as JSON here")
    args = ap.parse_args()
    if args.frames < 1 or args.seconds <= 0 or args.warmup_s < 0 or args.sample_s <= 0:
        ap.error("--frames, --seconds and --sample-s must be positive, --warmup-s >= 0")
    images = args.images or args.bundle / "golden"
    if not images.is_dir():
        ap.error(f"--images: {images} is not a folder")
    with tempfile.TemporaryDirectory(prefix="inspectd-soak-") as tmp:
        result = soak(args.bundle, images, args.frames, args.seconds, args.warmup_s, args.sample_s, args.backend,
                      args.sndhwm, args.heatmaps, Path(tmp))
    print(_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
