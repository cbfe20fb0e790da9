"""Inpaint method (paper 004) ablation on one dataset, plus engine latency per iteration count.

    python benchmarks/inpaint.py --dataset mtd --out /tmp/bench/inpaint-mtd
    python benchmarks/inpaint.py --dataset ksdd --out /tmp/bench/inpaint-ksdd

Rows (each trained on the same split as `inspectd train`: training files minus the 10 % holdout;
the map reduction chosen label-free per row, never on the test set):
  1 plain AE            fuzzy=false skips=false wssim=false dynamic=false
  2 + fuzzy masking     fuzzy=true  skips=false wssim=false dynamic=false
  3 + skips + wSSIM     fuzzy=true  skips=true  wssim=true  dynamic=false
  4 + dynamic inference row 3's weights, inference only (thresholds calibrated on the holdout)
Image and pixel AUROC per row (eager PyTorch, which the method's tests hold equal to ONNX Runtime),
training time per row, and ONNX Runtime latency at batch 1 of row 4's engine with a fixed number
of generator passes (1/2/5/10, never exiting early) and of the early-exit engine itself.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import fit_method, load_masks, pixel_auroc  # noqa: E402
from datasets import load_split  # noqa: E402

from inspectd.engines.fitting import batches  # noqa: E402
from inspectd.engines.methods.inpaint import (METHOD, InpaintModel, _tiles, calibrate,  # noqa: E402
                                              export_engine, export_fixed_iterations, select_reduction)
from inspectd.engines.model_config import ModelConfig  # noqa: E402
from inspectd.engines.preprocess import InputSpec  # noqa: E402
from inspectd.engines.train import TrainConfig  # noqa: E402
from inspectd.stats import roc_auc  # noqa: E402

ROWS = [("plain AE", {"fuzzy": False, "skips": False, "wssim": False, "dynamic": False}),
        ("+ fuzzy masking", {"fuzzy": True, "skips": False, "wssim": False, "dynamic": False}),
        ("+ skips + weighted SSIM", {"fuzzy": True, "skips": True, "wssim": True, "dynamic": False})]


@torch.no_grad()
def score(model: torch.nn.Module, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    s, m = [], []
    for sl in batches(len(images), 16):
        a, b = model(torch.from_numpy(np.stack(images[sl])))
        s.append(a.numpy())
        m.append(b.numpy())
    return np.concatenate(s), np.concatenate(m)


def latency(path: Path, image: np.ndarray, runs: int) -> dict[str, float]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = image[None]
    for _ in range(3):
        sess.run(None, {"images": x})
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, {"images": x})
        times.append((time.perf_counter() - t0) * 1000)
    return {"p50_ms": round(float(np.percentile(times, 50)), 2), "p99_ms": round(float(np.percentile(times, 99)), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=["mtd", "ksdd"], required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--image-size", type=int, default=256, help="bundle input (square), default %(default)s")
    ap.add_argument("--epochs", type=int, default=METHOD.default_epochs)
    ap.add_argument("--size", type=int, default=128, help="generator working resolution")
    ap.add_argument("--runs", type=int, default=50, help="latency runs per engine")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size = (args.image_size, args.image_size)
    split = load_split(args.dataset, size, out / "split")
    spec = InputSpec(size[0], size[1], "gray")
    masks = load_masks(split.masks, spec)
    test = split.test_good + split.test_bad
    n_good = len(split.test_good)
    device = torch.device("cpu")
    print(f"{args.dataset}: {len(split.train)} train, {len(split.holdout)} holdout, {n_good} test good, "
          f"{len(split.test_bad)} test bad; input {size}, generator {args.size} px, {args.epochs} epochs",
          file=sys.stderr)

    def evaluate(name: str, model: InpaintModel, seconds: float, extra: dict) -> dict:
        s, m = score(model.eval(), test)
        row = {"row": name, "image_auroc": round(roc_auc(s[:n_good], s[n_good:]), 4),
               "pixel_auroc": round(pixel_auroc(m, masks, n_good, size), 4), "train_s": round(seconds, 1),
               "reduction": model.head.reduction, **extra}
        print(json.dumps(row), file=sys.stderr, flush=True)
        return row

    rows, model3 = [], None
    for name, flags in ROWS:
        fitted, _, seconds = fit_method(METHOD, split, size, {"epochs": args.epochs, "size": args.size, **flags},
                                        device)
        rows.append(evaluate(name, fitted.model, seconds, {"final_loss": round(fitted.final_loss, 4)}))
        model3 = fitted.model

    # Row 4: row 3's weights with dynamic inference (calibration on the holdout is its only fitting).
    t0 = time.monotonic()
    opts = {"epochs": args.epochs, "size": args.size, "dynamic": True}
    cfg = TrainConfig(model=ModelConfig(image_height=size[0], image_width=size[1]), method="inpaint",
                      options=opts, seed=0, select=True)
    dyn = InpaintModel(cfg.model, METHOD.parse_options(opts))
    state = {k: v for k, v in model3.state_dict().items() if not k.startswith("head.")}
    dyn.load_state_dict({**dyn.state_dict(), **state}, strict=True)
    dyn.eval()
    with torch.no_grad():
        facts = calibrate(dyn, _tiles(dyn, split.train, device), _tiles(dyn, split.holdout, device))
        select_reduction(dyn, cfg, split.holdout, device)
    with torch.no_grad():
        passes_good = float(dyn.iterations(torch.from_numpy(np.stack(split.test_good[:64])))[0].mean())
        passes_bad = float(dyn.iterations(torch.from_numpy(np.stack(split.test_bad[:64])))[0].mean())
    rows.append(evaluate("+ dynamic inference (row 3 weights)", dyn, time.monotonic() - t0,
                         {**facts, "mean_passes_test_good": round(passes_good, 2),
                          "mean_passes_test_bad": round(passes_bad, 2)}))

    lat = []
    probe = split.test_good[0]
    for n in (1, 2, 5, 10):
        path = out / f"fixed{n}.onnx"
        export_fixed_iterations(dyn, path, n)
        lat.append({"engine": f"{n} generator passes + repair (fixed)", **latency(path, probe, args.runs)})
    export_engine(dyn, out / "dynamic.onnx")
    lat.append({"engine": "early exit, test good image", **latency(out / "dynamic.onnx", probe, args.runs)})
    lat.append({"engine": "early exit, test bad image",
                **latency(out / "dynamic.onnx", split.test_bad[0], args.runs)})
    plain = copy.deepcopy(dyn)
    plain.options.dynamic = False
    export_engine(plain, out / "single.onnx")
    lat.append({"engine": "dynamic off (1 pass)", **latency(out / "single.onnx", probe, args.runs)})

    summary = {"dataset": args.dataset, "machine": f"{platform.node()} {platform.machine()}, "
               f"{torch.get_num_threads()} torch threads", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "input": list(size), "generator_size": args.size, "epochs": args.epochs,
               "n_train": len(split.train), "n_holdout": len(split.holdout), "n_test_good": n_good,
               "n_test_bad": len(split.test_bad), "rows": rows, "latency_batch1": lat}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print("\n| row | image AUROC | pixel AUROC | train time | reduction |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['row']} | {r['image_auroc']:.4f} | {r['pixel_auroc']:.4f} | {r['train_s']:.0f} s | "
              f"{r['reduction']} |")
    print("\n| engine (ONNX Runtime, batch 1) | p50 | p99 |\n|---|---|---|")
    for r in lat:
        print(f"| {r['engine']} | {r['p50_ms']:.1f} ms | {r['p99_ms']:.1f} ms |")


if __name__ == "__main__":
    main()
