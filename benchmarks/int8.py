"""ONNX Runtime INT8 vs FP32 on CPU, side by side in one run, on an existing bundle (MTD flow):

    python benchmarks/int8.py --dataset mtd --bundle /tmp/bench/mtd/bundle --split /tmp/bench/mtd/split

1. builds the INT8 engine into a COPY of the bundle's engine cache (the bundle itself is not
   changed unless --in-place) with the default recipe (backbone quantised, the rest FP32), and the
   other recipes of --recipes as measured variants (what quantising more would cost);
2. accuracy: image and pixel AUROC on the standard test split (test_good, test_bad, masks) for
   FP32 and each INT8 variant, every image prepared once and scored by every engine;
3. the parity gate (inspectd.engines.runtime.parity) of each INT8 variant vs FP32 on the golden images;
4. latency at batch 1: several rounds, each timing every engine in turn (interleaved), p50 / p99
   and throughput per round and over all rounds, and INT8/FP32 throughput ratios.
Targets (issue 16): INT8 >= 1.8x FP32 throughput at batch 1, image AUROC within 0.003, gate passing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from inspectd.engines.bundle import load_bundle
from inspectd.engines.evaluate import Scored, _pixel_auroc
from inspectd.engines.preprocess import list_images, prepare, read_image
from inspectd.engines.runtime import ort_int8
from inspectd.engines.runtime.bench import environment
from inspectd.engines.runtime.onnxruntime_backend import OnnxRuntimeBackend
from inspectd.engines.runtime.parity import ParityError, parity_gate
from inspectd.stats import roc_auc

TARGET_SPEEDUP, TARGET_AUROC_DELTA = 1.8, 0.003


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="mtd", help="label for the report (the split folders decide)")
    ap.add_argument("--bundle", default="/tmp/bench/mtd/bundle")
    ap.add_argument("--split", default=None, help="folder with test_good/, test_bad/, masks/ "
                                                   "(default: <bundle>/../split)")
    ap.add_argument("--calibration", default=None, help="folder of good images (default: the bundle's)")
    ap.add_argument("--recipes", default="backbone-late,backbone,backbone-conv,all-conv,all",
                    help="INT8 recipes; the first is the one the targets are judged on")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = usable CPUs)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iterations", type=int, default=100, help="timed calls per engine per round")
    ap.add_argument("--in-place", action="store_true", help="cache the INT8 engine in the bundle itself")
    args = ap.parse_args()
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    split = Path(args.split) if args.split else Path(args.bundle).resolve().parent / "split"

    env = environment()
    print(f"# {args.dataset}: ONNX Runtime {env.get('onnxruntime')} CPU, {env['cpu']}, "
          f"{len(os.sched_getaffinity(0))} usable CPUs, CPU features [{ort_int8.cpu_features()}]")
    print("# machine shared with other jobs while measuring: latency figures are noisy; ratios are "
          "from interleaved calls in the same run")
    with tempfile.TemporaryDirectory(prefix="int8-bench-") as tmp:
        bundle_dir = Path(args.bundle)
        if not args.in_place:
            bundle_dir = Path(tmp) / "bundle"
            shutil.copytree(args.bundle, bundle_dir, ignore=shutil.ignore_patterns("engines"))
        bundle = load_bundle(bundle_dir)
        engines: dict[str, OnnxRuntimeBackend] = {
            "fp32": OnnxRuntimeBackend(bundle, intra_op_threads=args.threads)}
        for recipe in recipes:
            t0 = time.perf_counter()
            try:
                path, _ = ort_int8.build_int8(bundle, calibration=args.calibration, recipe=recipe, force=True)
            except Exception as exc:  # a recipe that cannot be built is reported, not fatal
                print(f"int8 {recipe}: not built: {exc}")
                continue
            print(f"int8 {recipe}: built in {time.perf_counter() - t0:.1f} s -> {path.name}", flush=True)
            engines[f"int8 {recipe}"] = OnnxRuntimeBackend(bundle, intra_op_threads=args.threads,
                                                           precision="int8", int8_recipe=recipe)

        # ---- accuracy
        good, bad = list_images(split / "test_good"), list_images(split / "test_bad")
        masks = split / "masks"
        scored: dict[str, list[Scored]] = {k: [] for k in engines}
        for label, paths in ((0, good), (1, bad)):
            for p in paths:
                source = read_image(p, bundle.input_spec.color_mode)
                img = prepare(source, bundle.input_spec)
                for name, eng in engines.items():
                    s, m = eng.infer(img[None])
                    scored[name].append(Scored(p, label, float(s[0]), m[0], img, source.shape[:2]))
        print(f"\n## accuracy on {args.dataset} test split ({len(good)} good, {len(bad)} bad)")
        print("| engine | image AUROC | pixel AUROC | image AUROC - FP32 |\n|---|---|---|---|")
        auroc: dict[str, float] = {}
        for name, items in scored.items():
            g = np.array([i.score for i in items if i.label == 0])
            b = np.array([i.score for i in items if i.label == 1])
            auroc[name] = float(roc_auc(g, b))
            px = _pixel_auroc(items, masks, bundle).get("pixel_auroc") if masks.is_dir() else None
            print(f"| {name} | {auroc[name]:.4f} | {'-' if px is None else f'{px:.4f}'} | "
                  f"{auroc[name] - auroc['fp32']:+.4f} |", flush=True)

        # ---- parity gate
        print("\n## parity gate (vs ONNX Runtime FP32 CPU, golden images)")
        gate: dict[str, bool] = {}
        for name, eng in engines.items():
            if name == "fp32":
                continue
            try:
                report = parity_gate(eng, bundle)
                gate[name] = True
                print(f"{name}: PASS: {report.summary()}")
            except ParityError as exc:
                gate[name] = False
                print(f"{name}: FAIL: {exc}")

        # ---- latency
        x = np.ascontiguousarray(scored["fp32"][0].image[None])
        print(f"\n## latency, batch 1, {engines['fp32'].describe()['intra_op_threads']} intra-op threads, "
              f"{args.rounds} rounds x {args.iterations} calls per engine, interleaved")
        print("| round | engine | p50 ms | p99 ms | img/s | img/s vs FP32 |\n|---|---|---|---|---|---|")
        all_times: dict[str, list[float]] = {k: [] for k in engines}
        for eng in engines.values():
            for _ in range(10):
                eng.infer(x)
        for r in range(args.rounds):
            times: dict[str, list[float]] = {k: [] for k in engines}
            for _ in range(args.iterations):
                for name, eng in engines.items():
                    t = time.perf_counter()
                    eng.infer(x)
                    times[name].append(time.perf_counter() - t)
            for name, t in times.items():
                all_times[name].extend(t)
                _row(str(r + 1), name, t, times["fp32"])
        for name, t in all_times.items():
            _row("all", name, t, all_times["fp32"])

        # ---- targets (first recipe)
        main_name = f"int8 {recipes[0]}" if recipes else ""
        if main_name in engines:
            speed = _ips(all_times[main_name]) / _ips(all_times["fp32"])
            delta = auroc[main_name] - auroc["fp32"]
            print(f"\n## targets ({main_name})")
            print(f"throughput INT8/FP32 batch 1: {speed:.2f}x (target >= {TARGET_SPEEDUP}x): "
                  f"{'met' if speed >= TARGET_SPEEDUP else 'MISSED'}")
            print(f"image AUROC INT8 - FP32: {delta:+.4f} (target within {TARGET_AUROC_DELTA}): "
                  f"{'met' if abs(delta) <= TARGET_AUROC_DELTA else 'MISSED'}")
            print(f"parity gate: {'passed' if gate.get(main_name) else 'FAILED'}")
        for eng in engines.values():
            eng.close()
    return 0


def _ips(seconds: list[float]) -> float:
    return len(seconds) / float(np.sum(seconds))


def _row(round_label: str, name: str, t: list[float], ref: list[float]) -> None:
    a = np.asarray(t) * 1e3
    print(f"| {round_label} | {name} | {np.median(a):.2f} | {np.percentile(a, 99):.2f} | {_ips(t):.1f} | "
          f"{_ips(t) / _ips(ref):.2f}x |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
