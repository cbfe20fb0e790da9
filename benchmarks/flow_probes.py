"""Two probes of why the flow trails nearest-neighbour patches on MTD (RESULTS.md §6, probes).

    python benchmarks/flow_probes.py nn-scaling    --dataset mtd --image-size 256
    python benchmarks/flow_probes.py feature-noise --dataset mtd --image-size 256 --noise 0.2,0.5 --components 0
    python benchmarks/flow_probes.py pca --dataset mtd --image-size 256 --components 64,128,256,384,472
    python benchmarks/flow_probes.py ensemble --dataset ksdd --image-size 960x384 --seeds 0,1,2 --variant '{}'

nn-scaling: nearest-neighbour patches (the baseline of baselines.py: taps pooled to the stride-32
grid, Euclidean distance to the nearest training patch) on the raw taps, on per-channel
standardised taps (what the flow sees), and on each tap alone.
feature-noise: the default flow (8 coupling steps, 20 epochs) trained with Gaussian noise of
standard deviation sigma added to its standardised inputs during training only (a floor under the
variances it can learn, as PaDiM's ridge term).
pca: the same flow on the top-k principal components of the raw fused taps (ModelConfig.components:
a fixed projection before the flow, each component scaled to unit variance), so it models only the
directions in which good parts vary most, as the raw nearest-neighbour distance weighs them.
ensemble: the product's flow (ModelConfig defaults + --variant) trained once per seed (initial
weights, permutations, batch order), each scored alone and the members' anomaly maps averaged
(a deep ensemble: does averaging initialisations remove the seed-to-seed spread of §6c?).
All read the backbone taps design_study.py caches (the same training rows, hold-out and
validation set); both report validation AUROC (held-out good vs synthetic defects) and test AUROC
(reported only).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import design_study as ds  # noqa: E402

from inspectd.engines.fitting import ScheduledSteps  # noqa: E402
from inspectd.engines.methods.flow import build_model, fit_nll_statistics, fit_statistics  # noqa: E402
from inspectd.engines.model import ModelConfig  # noqa: E402
from inspectd.engines.train import TrainConfig  # noqa: E402
from inspectd.stats import roc_auc  # noqa: E402

SETS = ("val", "test")
CACHED_SETS = ("val_good", "val_bad", "test_good", "test_bad")


def _auroc(good, bad) -> float:
    return round(float(roc_auc(good, bad)), 4)


def nn_scaling(cached: dict, stride: int = 32) -> list[dict]:
    train = cached["train"]
    grid = (train[0].shape[-2] * 8 // stride, train[0].shape[-1] * 8 // stride)  # tap 0 is at stride 8

    def pooled(taps):
        return torch.cat([F.adaptive_avg_pool2d(t.float(), grid) for t in taps], dim=1)
    tr = pooled(train)
    widths = [t.shape[1] for t in train]
    mu, sd = tr.mean((0, 2, 3), keepdim=True), tr.std((0, 2, 3), keepdim=True).clamp_min(1e-3)
    rows = []
    variants = [("raw, all taps", None, False), ("standardised, all taps", None, True)]
    variants += [(f"raw, tap {i} only", i, False) for i in range(len(widths))]
    for name, tap, standardise in variants:
        lo = 0 if tap is None else sum(widths[:tap])
        hi = sum(widths) if tap is None else lo + widths[tap]

        def norm(x):
            return ((x - mu) / sd if standardise else x)[:, lo:hi]
        bank = norm(tr).permute(0, 2, 3, 1).reshape(-1, hi - lo)
        row = {"probe": "nn-scaling", "variant": name}
        for s in SETS:
            good, bad = cached[f"{s}_good"], cached[f"{s}_bad"]
            q = norm(pooled([torch.cat([g, b]) for g, b in zip(good, bad)]))
            d = torch.cat([torch.cdist(q[i:i + 16].permute(0, 2, 3, 1).reshape(-1, hi - lo), bank).min(1).values
                           for i in range(0, q.shape[0], 16)]).reshape(q.shape[0], -1)
            n = good[0].shape[0]
            for red, x in (("mean", d.mean(1)), ("max", d.max(1).values)):
                row[f"{s}_{red}"] = _auroc(x[:n].numpy(), x[n:].numpy())
        rows.append(row)
    return rows


def feature_noise(cached: dict, base: ModelConfig, sigma: float, epochs: int, components: int) -> dict:
    """The flow (8 coupling steps, `components` as ModelConfig.components: the product's projection)
    trained on cached taps, with `sigma` noise on its inputs during training."""
    mc = replace(base, fusion="fused", steps=8, components=components, members=1)
    model = build_model(mc)
    cfg = TrainConfig(model=mc, epochs=epochs, augment=[], views=1)
    t0 = time.monotonic()
    emb = ds._embed_all(model, cached["train"])
    n = emb[0].shape[0]
    fit_statistics(model, emb, n)
    flow = model.flows[0]
    opt = torch.optim.Adam([p for p in flow.parameters() if p.requires_grad], lr=cfg.lr_min,
                           weight_decay=cfg.weight_decay)
    per_epoch = max(1, n // cfg.batch_size)
    steps = ScheduledSteps(opt, per_epoch * epochs, cfg, "train", clip=5.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    flow.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for b in range(per_epoch):
            rows = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            f = model.flow_input(0, emb[0][rows].float())
            steps.step(flow(f + sigma * torch.randn(f.shape, generator=gen), None).mean())
    flow.eval()
    steps.close()
    fit_nll_statistics(model, emb, n, torch.device("cpu"))
    model.eval()
    row = {"probe": "pca" if components else "feature-noise", "noise": sigma, "components": components, "epochs": epochs, "train_s": round(time.monotonic() - t0, 1)}
    row.update(_aurocs({k: ds.cached_maps(model, cached[k]) for k in CACHED_SETS}, model.head.topk))
    return row


def ensemble(cached: dict, base: ModelConfig, seeds: list[int], epochs: int, variant: dict) -> list[dict]:
    """One flow per seed, then the running average of their maps (members 1..k)."""
    rows, members = [], []
    for seed in seeds:
        # One flow per seed (the probe that chose ModelConfig.members ran before it existed).
        mc = replace(base, **{"fusion": "fused", "members": 1, **variant, "seed": seed})
        model, train_s = ds.train_cached(mc, cached["train"], epochs)
        members.append({k: ds.cached_maps(model, cached[k]) for k in CACHED_SETS})
        common = {"probe": "ensemble", **variant, "epochs": epochs, "train_s": round(train_s, 1)}
        rows.append({**common, "members": [seed], **_aurocs(members[-1], model.head.topk)})
        if len(members) > 1:
            avg = {k: torch.stack([m[k] for m in members]).mean(0) for k in CACHED_SETS}
            rows.append({**common, "members": seeds[:len(members)], **_aurocs(avg, model.head.topk)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _aurocs(maps: dict[str, torch.Tensor], topk: int) -> dict[str, float]:
    """Validation and test AUROC of `maps` (cached_maps per set) under every reduction."""
    s = {k: ds.reduced(m, topk) for k, m in maps.items()}
    return {f"{k}_{red}": _auroc(s[f"{k}_good"][red], s[f"{k}_bad"][red]) for k in SETS for red in ds.REDUCTIONS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("probe", choices=["nn-scaling", "feature-noise", "pca", "ensemble"])
    ap.add_argument("--dataset", choices=["mtd", "ksdd"], default="mtd")
    ap.add_argument("--image-size", default="256", help="HxW (or one number: square)")
    ap.add_argument("--noise", default="0.2", help="comma-separated standard deviations (feature-noise)")
    ap.add_argument("--components", default="256",
                    help="comma-separated k (pca); feature-noise: one k, 0 = every channel (the previous default)")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seeds", default="0,1,2", help="ensemble: one member per seed")
    ap.add_argument("--variant", default="{}", help="ensemble: ModelConfig overrides (JSON)")
    ap.add_argument("--cache", default="/tmp/design-cache")
    ap.add_argument("--out", default=None, help="append JSON lines here")
    args = ap.parse_args()
    h, w = (int(v) for v in (args.image_size.split("x") if "x" in args.image_size else [args.image_size] * 2))
    base = ModelConfig(image_height=h, image_width=w, fusion="separate")
    cached = ds.cached_taps(args.dataset, base, args.cache)
    if args.probe == "nn-scaling":
        rows = nn_scaling(cached)
    elif args.probe == "ensemble":
        rows = ensemble(cached, base, [int(v) for v in args.seeds.split(",")], args.epochs, json.loads(args.variant))
    elif args.probe == "pca":
        rows = [feature_noise(cached, base, 0.0, args.epochs, components=int(k)) for k in args.components.split(",")]
    else:
        rows = [feature_noise(cached, base, float(s), args.epochs, int(args.components)) for s in args.noise.split(",")]
    for row in rows:
        row = {"dataset": args.dataset, "size": f"{h}x{w}", **row}
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
