"""VAE engine (paper 002): joint vs decoupled training on MTD and KSDD.

    OMP_NUM_THREADS=1 python benchmarks/vae.py --out /tmp/bench/vae

For each dataset and each training way (`training=joint`, `training=decoupled`; every other option
the product default of `--method vae`), the method is fitted on the same split as `inspectd train`
(training files minus the 10 % holdout, seed 0; label-free choice of the map reduction on the
holdout + synthetic defects, never on the test set) and the test split scored in eager PyTorch
(which the method's tests hold equal to ONNX Runtime). Every dataset at 256x256 grey (KSDD
squashed, as benchmarks/inpaint.py; the VAE works at 128x128).

Reported per row: image and pixel AUROC, the final KLD (nats per image) and MSE (per pixel) on the
training tiles and on the held-out tiles against the decoupled targets, the active latent units
(Burda et al.: Var_x E_q[z_u|x] > 0.01 on the held-out good tiles) and the training time.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import fit_method, load_masks, pixel_auroc  # noqa: E402
from datasets import load_split  # noqa: E402

from inspectd.engines.fitting import score_images  # noqa: E402
from inspectd.engines.methods.vae import METHOD  # noqa: E402
from inspectd.engines.preprocess import InputSpec  # noqa: E402
from inspectd.stats import roc_auc  # noqa: E402

# Rows: name -> the options that differ from the product default. joint-mean (the per-pixel mean
# MSE in the joint sum) is the setting where a joint VAE is expected to collapse.
ROWS = {"joint": {"training": "joint"}, "decoupled": {"training": "decoupled"},
        "joint-mean": {"training": "joint", "joint_mse": "mean"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--datasets", default="mtd,ksdd")
    ap.add_argument("--image-size", type=int, default=256, help="bundle input (square), default %(default)s")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for scoring (training: one thread)")
    ap.add_argument("--rows", default="joint,decoupled", help=f"comma list of {', '.join(ROWS)}")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size = (args.image_size, args.image_size)
    spec = InputSpec(size[0], size[1], "gray")
    device = torch.device("cpu")
    rows = []
    t_all = time.monotonic()
    for dataset in args.datasets.split(","):
        split = load_split(dataset, size, out / f"split-{dataset}")
        masks = load_masks(split.masks, spec)
        test = split.test_good + split.test_bad
        n_good = len(split.test_good)
        print(f"{dataset}: {len(split.train)} train, {len(split.holdout)} holdout, {n_good} test good, "
              f"{len(split.test_bad)} test bad; input {size}", file=sys.stderr)
        for training in args.rows.split(","):
            fitted, options, train_s = fit_method(METHOD, split, size, dict(ROWS[training]), device)
            scores, maps = score_images(fitted.model.eval(), test, device)
            d = fitted.details
            row = {"dataset": dataset, "training": training,
                   "image_auroc": round(roc_auc(scores[:n_good], scores[n_good:]), 4),
                   "pixel_auroc": round(pixel_auroc(maps, masks, n_good, size), 4),
                   "reduction": fitted.model.head.reduction,
                   "final_kld_train": d["final"]["train"]["kld"], "final_mse_train": d["final"]["train"]["mse"],
                   "final_kld_holdout": d["final"]["holdout"]["kld"],
                   "final_mse_holdout": d["final"]["holdout"]["mse"],
                   "kld_target": d["kld_target"], "mse_target": d["mse_target"], "baseline_mse": d["baseline_mse"],
                   "active_units": d["active_units"], "latent": d["latent"], "train_s": round(train_s, 1),
                   "options": METHOD.options_dict(options), "history": d["history"],
                   "unit_variances": d["unit_variances"], "selection": fitted.selection}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("history", "unit_variances", "selection")}),
                  file=sys.stderr, flush=True)
            summary = {"machine": f"{platform.node()} {platform.machine()}, training on one torch thread, "
                                  f"{args.threads} for scoring",
                       "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "input": list(size),
                       "total_s": round(time.monotonic() - t_all, 1), "rows": rows}
            (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n| data | training | image AUROC | pixel AUROC | KLD train / holdout (target) | "
          "MSE train / holdout (target; mean-tile) | active units | training |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dataset']} | {r['training']} | {r['image_auroc']:.4f} | {r['pixel_auroc']:.4f} | "
              f"{r['final_kld_train']:.2f} / {r['final_kld_holdout']:.2f} ({r['kld_target']:g}) | "
              f"{r['final_mse_train']:.5f} / {r['final_mse_holdout']:.5f} ({r['mse_target']:.5f}; "
              f"{r['baseline_mse']:.5f}) | {r['active_units']}/{r['latent']} | {r['train_s']:.0f} s |")
    print(f"\ntotal {time.monotonic() - t_all:.0f} s")


if __name__ == "__main__":
    main()
