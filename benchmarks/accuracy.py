"""Accuracy benchmark: `inspectd train` with no flags vs two baselines at the same input, one dataset.

    python benchmarks/accuracy.py --dataset mtd --out /tmp/bench/mtd
    python benchmarks/accuracy.py --dataset ksdd --out /tmp/bench/ksdd

The flow is trained exactly as `inspectd train --good <train folder> --out <bundle>` does with no
other flag (the product default, label-free selection included) and scored once through ONNX
Runtime by `inspectd eval`'s code. The baselines (benchmarks/baselines.py) learn from the same
training images at the bundle's input size. Protocols: ../shared/datasets/<dataset>/README.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import baselines  # noqa: E402
from datasets import split_folders  # noqa: E402

from inspectd.cli import main as inspectd_main  # noqa: E402
from inspectd.engines.bundle import load_bundle  # noqa: E402
from inspectd.engines.evaluate import evaluate  # noqa: E402
from inspectd.engines.model import ModelConfig  # noqa: E402
from inspectd.engines.preprocess import list_images, load_prepared, prepare_mask  # noqa: E402
from inspectd.stats import roc_auc  # noqa: E402


def load_masks(paths: list[Path | None], spec) -> list[np.ndarray | None]:
    """Defect masks (None: no mask file) prepared like the images they belong to."""
    masks = []
    for p in paths:
        mk = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) if p is not None and p.exists() else None
        masks.append(prepare_mask(mk, spec) if mk is not None else None)
    return masks


def mask_paths(bad_paths: list[Path], masks_dir: Path) -> list[Path]:
    """The mask file of each defective image of a split folder (named like it, .png)."""
    return [masks_dir / (p.stem + ".png") for p in bad_paths]


def pixel_auroc(maps: np.ndarray, masks: list[np.ndarray | None], n_good: int, size: tuple[int, int]) -> float:
    t = torch.from_numpy(maps).float()[:, None]
    up = F.interpolate(t, size=size, mode="bilinear", align_corners=False)[:, 0].numpy()
    full = [np.zeros(size, bool)] * n_good + [m if m is not None else np.zeros(size, bool) for m in masks]
    mk = np.stack(full)
    return roc_auc(up[~mk], up[mk])


def fit_method(method, split, size: tuple[int, int], opts: dict, device: torch.device):
    """One method trained on a split's training images (its held-out ones for standardisation and
    label-free choices) as `inspectd train` fits it, seed 0: (fitted, options, seconds)."""
    from inspectd.engines.methods import FitData
    from inspectd.engines.train import TrainConfig

    cfg = TrainConfig(model=ModelConfig(image_height=size[0], image_width=size[1]), method=method.name,
                      options=opts, seed=0, select=True)
    options = method.parse_options(opts)
    torch.manual_seed(0)
    t0 = time.monotonic()
    fitted = method.fit(FitData(split.train, split.holdout, cfg, options, np.random.default_rng(0), device))
    return fitted, options, time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=["mtd", "ksdd"], required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--train-args", default="", help="extra `inspectd train` flags (default: none, the product)")
    ap.add_argument("--skip-baselines", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    dirs = split_folders(args.dataset, out / "split")
    t0 = time.monotonic()
    code = inspectd_main(["train", "--good", str(dirs["train_good"]), "--out", str(out / "bundle"), "--force",
                          *args.train_args.split()])
    if code:
        raise SystemExit(f"inspectd train failed ({code})")
    train_s = time.monotonic() - t0
    bundle = load_bundle(out / "bundle")
    report = evaluate(out / "bundle", dirs["test_good"], dirs["test_bad"], out / "eval", masks_dir=dirs["masks"])
    m = bundle.manifest
    mc = ModelConfig.from_dict(m.training.config["model"])
    rows = [{"method": f"{m.method.name} (inspectd train {args.train_args or 'defaults'})",
             "image_auroc": report["image_auroc"],
             "pixel_auroc": report.get("pixel_auroc"), "train_s": round(train_s, 1)}]
    if not args.skip_baselines:
        spec = bundle.input_spec
        used = set(m.training.image_names)
        train_imgs = [load_prepared(p, spec) for p in list_images(dirs["train_good"]) if p.name in used]
        good_paths, bad_paths = list_images(dirs["test_good"]), list_images(dirs["test_bad"])
        test_imgs = [load_prepared(p, spec) for p in good_paths + bad_paths]
        labels = np.array([0] * len(good_paths) + [1] * len(bad_paths))
        masks = load_masks(mask_paths(bad_paths, dirs["masks"]), spec)
        stride = mc.fused_stride if mc.fusion == "fused" else 32
        for name, (scores, maps) in baselines(mc, train_imgs, test_imgs, stride).items():
            rows.append({"method": f"{name} (grid stride {stride})",
                         "image_auroc": roc_auc(scores[labels == 0], scores[labels == 1]),
                         "pixel_auroc": pixel_auroc(maps, masks, len(good_paths), (spec.height, spec.width)),
                         "train_s": None})
    summary = {"dataset": args.dataset, "machine": f"{platform.node()} {platform.machine()}, "
               f"{torch.get_num_threads()} torch threads", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "input": [m.input.height, m.input.width], "selection": m.training.config.get("selection"),
               "n_train": m.training.n_train, "n_holdout": m.training.n_holdout, "n_test_good": report["n_good"],
               "n_test_bad": report["n_bad"], "rows": rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print("\n| method | image AUROC | pixel AUROC | train time |\n|---|---|---|---|")
    for r in rows:
        px = f"{r['pixel_auroc']:.4f}" if r["pixel_auroc"] is not None else "-"
        tt = f"{r['train_s']:.0f} s" if r["train_s"] is not None else "-"
        print(f"| {r['method']} | {r['image_auroc']:.4f} | {px} | {tt} |")


if __name__ == "__main__":
    main()
