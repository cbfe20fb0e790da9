"""MTD accuracy benchmark: the flow engine vs two baselines on the same backbone, taps and size.

    python benchmarks/mtd_accuracy.py --epochs 20 --out /tmp/mtd-bench

Standard protocol (see mtd_data.py). The flow bundle is trained with a fixed, predeclared epoch
count and evaluated once through ONNX Runtime (the daemon's path). Baselines (benchmark-only code,
not in the product): PaDiM-style per-position Gaussian, and nearest-neighbour patch distance
(PatchCore-style, full memory bank of pooled patches). All three use the images the flow trained
on (the flow's 10% hold-out for score statistics is excluded from every model).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mtd_data import DEFAULT_ROOT, prepare_split  # noqa: E402

from inspectd.stats import roc_auc  # noqa: E402
from inspectd.engines.evaluate import evaluate  # noqa: E402
from inspectd.engines.model import ModelConfig, build_model  # noqa: E402
from inspectd.engines.preprocess import InputSpec, list_images, load_prepared  # noqa: E402
from inspectd.engines.train import TrainConfig, extract_features, train  # noqa: E402


def _masks(paths: list[Path], masks_dir: Path, size: int) -> np.ndarray:
    import cv2
    out = np.zeros((len(paths), size, size), bool)
    for i, p in enumerate(paths):
        m = masks_dir / (p.stem + ".png")
        if m.exists():
            out[i] = cv2.resize(cv2.imread(str(m), cv2.IMREAD_GRAYSCALE), (size, size),
                                interpolation=cv2.INTER_NEAREST) > 127
    return out


def _pixel_auroc(maps: np.ndarray, masks: np.ndarray) -> float:
    t = torch.from_numpy(maps).float()[:, None]
    up = F.interpolate(t, size=masks.shape[1:], mode="bilinear", align_corners=False)[:, 0].numpy()
    return roc_auc(up[~masks], up[masks])


def _gauss_smooth(maps: torch.Tensor, sigma: float = 4.0) -> torch.Tensor:
    from inspectd.engines.model import gaussian_kernel1d
    k = gaussian_kernel1d(sigma)
    r = k.numel() // 2
    x = F.pad(maps[:, None], (r, r, r, r), mode="replicate")
    x = F.conv2d(F.conv2d(x, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))
    return x[:, 0]


def baselines(model, train_imgs, test_imgs, size: int, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Returns name -> (image scores, maps at size/4) for the test images."""
    dev = torch.device("cpu")
    tr = extract_features(model, train_imgs, dev, "baseline features (train)")
    te = extract_features(model, test_imgs, dev, "baseline features (test)")
    out = {}

    # PaDiM: taps upsampled to the finest tap, a random subset of 100 channels, per-position Gaussian.
    def embed(feats: list[torch.Tensor]) -> torch.Tensor:
        h = feats[0].shape[-1]
        return torch.cat([F.interpolate(f.float(), size=(h, h), mode="bilinear", align_corners=False)
                          for f in feats], dim=1)
    g = torch.Generator().manual_seed(seed)
    etr = embed(tr)
    idx = torch.randperm(etr.shape[1], generator=g)[:100]
    etr = etr[:, idx]
    n, d, h, w = etr.shape
    x = etr.permute(2, 3, 0, 1).reshape(h * w, n, d)
    mean = x.mean(dim=1, keepdim=True)
    xc = x - mean
    cov = xc.transpose(1, 2) @ xc / (n - 1) + 0.01 * torch.eye(d)
    inv = torch.linalg.inv(cov)
    maps = []
    for sl in range(0, te[0].shape[0], 32):
        e = embed([t[sl:sl + 32] for t in te])[:, idx]
        y = e.permute(2, 3, 0, 1).reshape(h * w, -1, d) - mean
        m = torch.einsum("pnd,pde,pne->pn", y, inv, y).clamp_min(0).sqrt()
        maps.append(m.T.reshape(-1, h, w))
    pmap = torch.cat(maps)
    pmap = _gauss_smooth(F.interpolate(pmap[:, None], size=(size // 4, size // 4), mode="bilinear",
                                       align_corners=False)[:, 0])
    out["PaDiM-style Gaussian"] = (pmap.flatten(1).max(1).values.numpy(), pmap.numpy())

    # Nearest neighbour: each tap pooled to 8x8, concatenated, full memory bank, max patch distance.
    def pooled(feats: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([F.adaptive_avg_pool2d(f.float(), 8) for f in feats], dim=1)
    bank = pooled(tr).permute(0, 2, 3, 1).reshape(-1, sum(f.shape[1] for f in tr))
    dists = []
    for sl in range(0, te[0].shape[0], 16):
        q = pooled([t[sl:sl + 16] for t in te])
        b, c, ph, pw = q.shape
        qq = q.permute(0, 2, 3, 1).reshape(-1, c)
        dmin = torch.cdist(qq, bank).min(dim=1).values
        dists.append(dmin.reshape(b, ph, pw))
    nmap = torch.cat(dists)
    nmap = _gauss_smooth(F.interpolate(nmap[:, None], size=(size // 4, size // 4), mode="bilinear",
                                       align_corners=False)[:, 0])
    out["nearest-neighbour patches"] = (nmap.flatten(1).max(1).values.numpy(), nmap.numpy())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_ROOT))
    ap.add_argument("--out", default="/tmp/mtd-bench")
    ap.add_argument("--epochs", type=int, default=20, help="predeclared; never chosen on the test set")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--taps", default="4,10,15")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--hidden-ratio", type=float, default=0.4)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--fusion", default="fused", choices=["separate", "fused"])
    ap.add_argument("--score-term", default="z2", choices=["z2", "nll"])
    ap.add_argument("--augment", default="none", help="comma list of rotate,translate,scale or none")
    ap.add_argument("--fused-size", type=int, default=8)
    ap.add_argument("--kernel-size", type=int, default=3)
    ap.add_argument("--reduction", default="mean", choices=["max", "topk", "mean"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-baselines", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    out = Path(args.out)
    dirs = prepare_split(Path(args.data), out / "split")
    taps = [int(t) for t in args.taps.split(",")]
    mc = ModelConfig(taps=taps, image_size=args.image_size, color_mode="gray", steps=args.steps,
                     hidden_ratio=args.hidden_ratio, map_size=args.image_size // 4, seed=args.seed,
                     fusion=args.fusion, fused_size=args.fused_size, kernel_size=args.kernel_size,
                     reduction=args.reduction, score_term=args.score_term)
    augment = [] if args.augment == "none" else args.augment.split(",")
    cfg = TrainConfig(model=mc, epochs=args.epochs, views=args.views if augment else 1, augment=augment,
                      seed=args.seed)
    t0 = time.monotonic()
    result = train(dirs["train_good"], out / "bundle", cfg, force=True)
    train_s = time.monotonic() - t0
    t0 = time.monotonic()
    report = evaluate(out / "bundle", dirs["test_good"], dirs["test_bad"], out / "eval", masks_dir=dirs["masks"])
    eval_s = time.monotonic() - t0
    rows = [{"method": f"flow ({args.fusion}{f' {args.fused_size}x{args.fused_size}' if args.fusion == 'fused' else ''}, "
                       f"{args.steps} steps, k{args.kernel_size}, hidden x{args.hidden_ratio}, {args.score_term}, "
                       f"{args.reduction}, augment {args.augment}, {args.epochs} epochs)", "image_auroc": report["image_auroc"],
             "pixel_auroc": report.get("pixel_auroc"), "train_s": round(train_s, 1)}]
    if not args.skip_baselines:
        spec = InputSpec(args.image_size, args.image_size, "gray")
        used = set(result.bundle.manifest.training.image_names)
        train_imgs = [load_prepared(p, spec) for p in list_images(dirs["train_good"]) if p.name in used]
        test_paths = list_images(dirs["test_good"]) + list_images(dirs["test_bad"])
        test_imgs = [load_prepared(p, spec) for p in test_paths]
        labels = np.array([0] * len(list_images(dirs["test_good"])) + [1] * len(list_images(dirs["test_bad"])))
        masks = _masks(test_paths, dirs["masks"], args.image_size)
        model = build_model(replace(mc, fusion="separate")).eval()  # baselines use the raw taps
        for name, (scores, maps) in baselines(model, train_imgs, test_imgs, args.image_size, args.seed).items():
            rows.append({"method": name, "image_auroc": roc_auc(scores[labels == 0], scores[labels == 1]),
                         "pixel_auroc": _pixel_auroc(maps, masks), "train_s": None})
    summary = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                          f"{torch.get_num_threads()} torch threads", "date": time.strftime("%Y-%m-%d"),
               "config": cfg.to_dict(), "n_train": result.n_train, "n_holdout": result.n_holdout,
               "n_test_good": report["n_good"], "n_test_bad": report["n_bad"], "eval_s": round(eval_s, 1),
               "rows": rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print("\n| method | image AUROC | pixel AUROC | train time |\n|---|---|---|---|")
    for r in rows:
        px = f"{r['pixel_auroc']:.4f}" if r["pixel_auroc"] is not None else "-"
        tt = f"{r['train_s']:.0f} s" if r["train_s"] is not None else "-"
        print(f"| {r['method']} | {r['image_auroc']:.4f} | {px} | {tt} |")


if __name__ == "__main__":
    main()
