"""Engine-only vs daemon end-to-end, in one run, on the same images and bundle.

    python benchmarks/daemon_latency.py --bundle BUNDLE [--images DIR] [--frames 10000] [--pace 0.9] [--runs 3]

1. engine only: preprocess.prepare + Backend.infer (batch 1) on the decoded images, in a loop
   -> latency p50/p99 and throughput; then the same engine alone at the paced rate of step 2
   (`engine_paced`: the wait behind slower neighbours that no daemon can avoid), once per run;
2. daemon latency: `inspectd run` (child process) on a replay of the same images, paced at
   `--pace` x the engine's measured throughput, a real ZeroMQ subscriber -> acquired_ns to verdict
   received p50/p99, and from the verdict headers where it went: queue_ms (acquisition -> engine
   call: queue wait + preprocessing) and infer_ms (the engine call);
3. daemon throughput: the same replay as fast as the daemon takes frames, `--frames` verdicts
   (dropped / fail-safe verdicts counted apart), then the daemon's resident memory (VmRSS).
Steps 2 and 3 are repeated `--runs` times; every run is printed, not the best.

Targets (issues 4, 16): daemon p99 <= engine p99 + 1 ms when paced at 90 % of engine throughput;
daemon throughput >= 95 % of engine-only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import yaml
import zmq

from inspectd.engines import preprocess
from inspectd.engines.bundle import load_bundle
from inspectd.engines.runtime import open_backend


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


@contextlib.contextmanager
def warm_engine(bundle_path: Path, files: list[Path], backend_name: str,
                options: dict | None = None) -> Iterator[tuple[Any, list[np.ndarray], Any]]:
    """(input spec, frames, backend): the frames a source would hand over (decoded once, H x W grey
    or H x W x 3) and the bundle's engine, opened and warmed up on them; closed on exit."""
    bundle = load_bundle(bundle_path)
    spec = bundle.input_spec
    frames = [preprocess.read_image(p, spec.color_mode)[..., 0] if spec.color_mode == "gray"
              else preprocess.read_image(p, spec.color_mode) for p in files]
    backend, _ = open_backend(bundle, [backend_name], {backend_name: options or {}})
    with backend:
        for f in frames[:5]:
            backend.infer(preprocess.prepare(f, spec)[None])
        yield spec, frames, backend


def engine_only(bundle_path: Path, files: list[Path], n: int, backend_name: str,
                options: dict | None = None) -> dict:
    with warm_engine(bundle_path, files, backend_name, options) as (spec, frames, backend):
        lat: list[float] = []
        infer_only: list[float] = []
        t_start = time.perf_counter()
        for i in range(n):
            t0 = time.perf_counter()
            batch = preprocess.prepare(frames[i % len(frames)], spec)[None]
            t1 = time.perf_counter()
            backend.infer(batch)
            t2 = time.perf_counter()
            lat.append((t2 - t0) * 1000)
            infer_only.append((t2 - t1) * 1000)
        elapsed = time.perf_counter() - t_start
    return {"p50_ms": _pct(lat, 50), "p99_ms": _pct(lat, 99), "infer_p50_ms": _pct(infer_only, 50),
            "infer_p99_ms": _pct(infer_only, 99), "fps": n / elapsed, "mean_ms": float(np.mean(lat))}


def engine_paced(bundle_path: Path, files: list[Path], n: int, fps: float, backend_name: str,
                 queue_size: int, options: dict | None = None) -> dict:
    """The floor under any daemon's paced latency: the engine alone, frames arriving every 1/fps s
    (as the paced replay delivers them), each judged as soon as the engine is free, the oldest
    dropped when more than `queue_size` wait. Latency = arrival -> engine done: its own time plus
    the wait behind slower neighbours, with no acquisition, hand-over or publishing at all."""
    period = 1.0 / fps
    lat: list[float] = []
    dropped = 0
    with warm_engine(bundle_path, files, backend_name, options) as (spec, frames, backend):
        t_start = time.perf_counter() + 0.05
        i = 0
        while i < n:
            arrival = t_start + i * period
            now = time.perf_counter()
            if now < arrival:
                time.sleep(arrival - now)
            else:
                waiting = int((now - t_start) / period) - i  # arrived after frame i, not yet judged
                if waiting > queue_size - 1:
                    skip = waiting - (queue_size - 1)
                    dropped += skip
                    i += skip
                    arrival = t_start + i * period
            backend.infer(preprocess.prepare(frames[i % len(frames)], spec)[None])
            lat.append((time.perf_counter() - arrival) * 1000)
            i += 1
    return {"p50_ms": _pct(lat, 50), "p99_ms": _pct(lat, 99), "dropped": dropped, "results": len(lat)}


def replay_source(images: Path, fps: float | None) -> dict:
    return {"type": "replay", "path": str(images), "loop": True, **({"fps": fps} if fps else {})}


class DaemonProcess:
    def __init__(self, workdir: Path, bundle: Path, source: dict, backend: str, queue_size: int,
                 budget_ms: float = 1000.0, options: dict | None = None) -> None:
        stamp = f"{os.getpid()}-{int(time.time() * 1000)}"
        self.endpoint = f"ipc://{workdir}/bench-{stamp}.sock"
        cfg = {"zmq": {"endpoint": self.endpoint, "sndhwm": 100000}, "metrics": {"port": 0},
               "heartbeat_interval_s": 1.0,
               "lines": [{"id": "bench", "bundle": str(bundle), "backends": [backend], "threshold": 5.0,
                          "latency_budget_ms": budget_ms, "queue_size": queue_size,
                          "heatmap": {"publish": "none"}, "source": source,
                          **({"backend_options": {backend: options}} if options else {})}]}
        path = workdir / f"bench-{stamp}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        self.proc = subprocess.Popen([sys.executable, "-m", "inspectd.cli", "--log-level", "INFO", "run",
                                      "--config", str(path)], stderr=subprocess.PIPE, text=True)
        self.ready = threading.Event()
        self.metrics_port: int | None = None
        self.log: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line.rstrip())
            served = re.search(r"metrics on http://[^:]+:(\d+)/metrics", line)
            if served:
                self.metrics_port = int(served.group(1))
            if re.search(r" ready: ", line):
                self.ready.set()

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stalls_over_10ms(self) -> float:
        """Share of the daemon's stall-watch wake-ups more than 10 ms late (inspectd_interpreter_stall_seconds)."""
        if self.metrics_port is None:
            return float("nan")
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        values = {name: float(value) for name, _, value in (line.rpartition(" ") for line in text.splitlines()
                                                             if line.startswith("inspectd_interpreter_stall"))}
        count = values.get("inspectd_interpreter_stall_seconds_count", 0.0)
        in_time = values.get('inspectd_interpreter_stall_seconds_bucket{le="0.01"}', 0.0)
        return 1.0 - in_time / count if count else float("nan")

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the daemon has used so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(5)
        self._reader.join(5)  # the log up to the exit; then the pipe is ours to close
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return rc


def daemon_run(workdir: Path, bundle: Path, source: dict, n: int, backend: str, queue_size: int,
               timeout_s: float, budget_ms: float = 1000.0, options: dict | None = None) -> dict:
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 200000)
    sub.setsockopt(zmq.SUBSCRIBE, b"verdict.bench")
    daemon = DaemonProcess(workdir, bundle, source, backend, queue_size, budget_ms, options)
    try:
        sub.connect(daemon.endpoint)
        if not daemon.ready.wait(60):
            raise SystemExit("daemon did not become ready:\n" + "\n".join(daemon.log[-20:]))
        lat: list[float] = []
        queue_ms: list[float] = []
        infer_ms: list[float] = []
        failsafe = 0
        reasons: dict[str, int] = {}
        first = last = None
        cpu_first = cpu_last = 0.0
        end = time.monotonic() + timeout_s
        while len(lat) + failsafe < n and time.monotonic() < end:
            if not sub.poll(1000):
                continue
            parts = sub.recv_multipart()
            received_ns = time.time_ns()
            header = json.loads(parts[1])
            if first is None:
                first = time.perf_counter()
                cpu_first = daemon.cpu_s()
                continue  # the clock starts at the first verdict (after start-up)
            last = time.perf_counter()
            if header["score"] is None:
                failsafe += 1  # dropped (queue full) or deadline: not a result
                reasons[(header.get("error") or "?").split(":")[0]] = \
                    reasons.get((header.get("error") or "?").split(":")[0], 0) + 1
            else:
                lat.append((received_ns - header["acquired_ns"]) / 1e6)
                if header.get("queue_ms") is not None:
                    queue_ms.append(header["queue_ms"])
                    infer_ms.append(header["infer_ms"])
        rss = daemon.rss_mb()
        cpu_last = daemon.cpu_s()
        stalls = daemon.stalls_over_10ms()
        elapsed = (last - first) if first is not None and last is not None else float("nan")
    finally:
        rc = daemon.stop()
        sub.close(0)
        ctx.term()
    return {"p50_ms": _pct(lat, 50), "p99_ms": _pct(lat, 99), "results": len(lat), "failsafe": failsafe,
            "queue_p50_ms": _pct(queue_ms, 50), "queue_p99_ms": _pct(queue_ms, 99),
            "infer_p50_ms": _pct(infer_ms, 50), "infer_p99_ms": _pct(infer_ms, 99),
            "result_fps": len(lat) / elapsed if elapsed else float("nan"), "rss_mb": rss, "exit": rc,
            "cpu_ms_per_frame": 1000 * (cpu_last - cpu_first) / max(len(lat) + failsafe, 1),
            "stalls_over_10ms": stalls,
            "reasons": reasons}


def add_backend_option_arg(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--backend-option", action="append", default=[], metavar="KEY=VALUE",
                    help="the line's backend_options for --backend (YAML value), e.g. spin=false; repeatable")


def backend_options(args: argparse.Namespace) -> dict:
    out = {}
    for item in args.backend_option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--backend-option {item!r}: expected KEY=VALUE")
        out[key] = yaml.safe_load(value)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True, type=Path)
    ap.add_argument("--images", type=Path, help="folder of images (default: generated synthetic parts)")
    ap.add_argument("--frames", type=int, default=10000, help="daemon throughput run (RSS is read after it)")
    ap.add_argument("--latency-frames", type=int, default=2000)
    ap.add_argument("--engine-frames", type=int, default=2000)
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--timeout", type=float, default=900.0, help="per daemon run, seconds")
    ap.add_argument("--pace", type=float, default=0.9, help="paced replay rate, x engine-only throughput")
    ap.add_argument("--runs", type=int, default=3, help="daemon runs (paced + as fast as possible) to report")
    add_backend_option_arg(ap)
    args = ap.parse_args()
    options = backend_options(args)

    with tempfile.TemporaryDirectory(prefix="inspectd-bench-") as tmp:
        work = Path(tmp)
        images = args.images
        if images is None:
            from inspectd.engines.synthetic import make_dataset

            ds = make_dataset(work / "parts", n_train=0, n_test_good=24, n_test_bad=8,
                              size=load_bundle(args.bundle).input_spec.height, seed=1)
            images = work / "replay"
            images.mkdir()
            for d in (ds.test_good, ds.test_bad):
                for p in preprocess.list_images(d):
                    (images / f"{d.name}_{p.name}").write_bytes(p.read_bytes())
        files = preprocess.list_images(images)
        if not files:
            raise SystemExit(f"{images}: no images")

        eng = engine_only(args.bundle, files, args.engine_frames, args.backend, options)
        paced_fps = max(1.0, args.pace * eng["fps"])
        runs = []
        for _ in range(args.runs):
            floor = engine_paced(args.bundle, files, args.latency_frames, paced_fps, args.backend, 4, options)
            lat = daemon_run(work, args.bundle, replay_source(images, paced_fps), args.latency_frames,
                             args.backend, queue_size=4, timeout_s=args.timeout, options=options)
            # As fast as possible: the replay is back-pressured by the queue, 2 deep keeps the worker busy.
            thr = daemon_run(work, args.bundle, replay_source(images, None), args.frames, args.backend,
                             queue_size=2, timeout_s=args.timeout, options=options)
            runs.append((floor, lat, thr))

    print(f"\ninspectd daemon benchmark: bundle {args.bundle}, {len(files)} images, backend {args.backend}, "
          f"{os.cpu_count()} CPUs, {args.runs} daemon runs, backend options {options or 'default'}")
    print(f"{'':40}{'p50 ms':>9}{'p99 ms':>9}{'frames/s':>10}{'queue p50/p99':>16}{'infer p50/p99':>16}")
    print(f"{'engine only (prepare + infer)':40}{eng['p50_ms']:9.2f}{eng['p99_ms']:9.2f}{eng['fps']:10.1f}"
          f"{'':16}{eng['infer_p50_ms']:8.2f}/{eng['infer_p99_ms']:<7.2f}")
    for i, (floor, lat, thr) in enumerate(runs, 1):
        print(f"{f'run {i}: engine alone, paced':40}{floor['p50_ms']:9.2f}{floor['p99_ms']:9.2f}"
              f"{'':10}  dropped {floor['dropped']}")
        for name, r in ((f"run {i}: paced @ {paced_fps:.0f} fps ({args.pace:.0%})", lat),
                        (f"run {i}: as fast as possible", thr)):
            print(f"{name:40}{r['p50_ms']:9.2f}{r['p99_ms']:9.2f}{r['result_fps']:10.1f}"
                  f"{r['queue_p50_ms']:8.2f}/{r['queue_p99_ms']:<7.2f}{r['infer_p50_ms']:8.2f}/{r['infer_p99_ms']:<7.2f}")
    for i, (floor, lat, thr) in enumerate(runs, 1):
        print(f"run {i}: daemon p99 - engine p99 (paced): {lat['p99_ms'] - eng['p99_ms']:+.2f} ms (target <= +1 ms; "
              f"the engine alone at that pace {floor['p99_ms'] - eng['p99_ms']:+.2f} ms, the daemon over it "
              f"{lat['p99_ms'] - floor['p99_ms']:+.2f} ms); "
              f"daemon / engine throughput {100 * thr['result_fps'] / eng['fps']:.1f} % (target >= 95 %); "
              f"stall-watch wake-ups over 10 ms late {100 * lat['stalls_over_10ms']:.1f} / "
              f"{100 * thr['stalls_over_10ms']:.1f} %; "
              f"fail-safe paced {lat['failsafe']} {lat['reasons'] or ''}, max rate {thr['failsafe']} "
              f"{thr['reasons'] or ''}; RSS {thr['rss_mb']:.0f} MiB after {thr['results'] + thr['failsafe']} frames; "
              f"exit {lat['exit']}, {thr['exit']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
