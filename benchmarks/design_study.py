"""Flow design study on cached backbone features, selected by label-free validation.

    python benchmarks/design_study.py --dataset mtd --image-size 256 --epochs 20 \
        --variants '[{"fused_stride": 32}, {"fused_stride": 16, "reduction": "topk"}]'

For each variant (ModelConfig overrides) the flows are trained on the product's training rows
(the same 10 % hold-out as `inspectd train`) and scored on
  - validation: the held-out good images vs synthetic defects made from them (what selection uses),
  - test: the dataset's standard test split (reported only; never used to choose).
The frozen backbone's raw taps are computed once per resolution and cached under --cache.
Each row trains ModelConfig's default members (3 flows averaged since RESULTS.md §6d; rows before
it trained one): give {"members": 1} to study a single flow.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from datasets import load_split  # noqa: E402

from inspectd.stats import roc_auc  # noqa: E402
from inspectd.engines.fitting import extract_features, reduce_maps  # noqa: E402
from inspectd.engines.methods.flow import (FeatureGraph, build_model, fit_nll_statistics, fit_statistics,  # noqa: E402
                                           train_flows)
from inspectd.engines.model import ModelConfig  # noqa: E402
from inspectd.engines.train import TrainConfig  # noqa: E402
from inspectd.engines.validation import make_validation_set  # noqa: E402


REDUCTIONS = ("mean", "topk", "max")


@torch.no_grad()
def cached_maps(model, raw: list[torch.Tensor], batch: int = 32) -> torch.Tensor:
    """Every cached image's anomaly map, flattened (N, pixels)."""
    step = batch * model.config.tiles[0] * model.config.tiles[1]
    return torch.cat([model.head(model.nll_maps(model.embed([r[i:i + step].float() for r in raw])))[1].flatten(1)
                      for i in range(0, raw[0].shape[0], step)])


def reduced(maps: torch.Tensor, topk: int) -> dict[str, np.ndarray]:
    """Image scores under every reduction (the map does not depend on it: one training, three rows)."""
    return {r: reduce_maps(maps, r, topk) for r in REDUCTIONS}


def score_cached(model, raw: list[torch.Tensor]) -> dict[str, np.ndarray]:
    return reduced(cached_maps(model, raw), model.head.topk)


def train_cached(mc: ModelConfig, raw: list[torch.Tensor], epochs: int):
    """A flow of design `mc` trained on the cached training taps as `inspectd train` trains it
    (seeded alike), and its training seconds."""
    # The subnets' first convolutions draw their initial weights from torch's global stream:
    # seeded per variant as `inspectd train` seeds it, so a row is reproducible (before this,
    # every run drew another initialisation; RESULTS.md §6c, seventh session).
    torch.manual_seed(mc.seed)
    model = build_model(mc)
    cfg = TrainConfig(model=mc, epochs=epochs, augment=[], views=1, seed=mc.seed)
    t0 = time.monotonic()
    emb = _embed_all(model, raw)
    n_rows = emb[0].shape[0]
    fit_statistics(model, emb, n_rows)
    train_flows(model, emb, n_rows, cfg, torch.device("cpu"))
    fit_nll_statistics(model, emb, n_rows, torch.device("cpu"))
    return model.eval(), time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=["mtd", "ksdd"], default="mtd")
    ap.add_argument("--image-size", default="256", help="HxW per tile (or one number: square)")
    ap.add_argument("--tiles", default="1x1")
    ap.add_argument("--backbone", default="efficientnet-lite0")
    ap.add_argument("--taps", default=None, help="block indices, e.g. 6,14,20 (default: ModelConfig's)")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--variants", required=True)
    ap.add_argument("--cache", default="/tmp/design-cache")
    ap.add_argument("--out", default=None, help="append JSON lines here")
    args = ap.parse_args()
    h, w = (int(v) for v in (args.image_size.split("x") if "x" in args.image_size else [args.image_size] * 2))
    tiles = tuple(int(v) for v in args.tiles.split("x"))
    taps = [int(t) for t in args.taps.split(",")] if args.taps else ModelConfig().taps
    base = ModelConfig(backbone=args.backbone, taps=taps, image_height=h, image_width=w, tiles=tiles,
                       fusion="separate")
    cached = cached_taps(args.dataset, base, args.cache)
    n_tiles = tiles[0] * tiles[1]
    for overrides in json.loads(args.variants):
        epochs = overrides.pop("epochs", args.epochs)
        mc = replace(base, **{"fusion": "fused", **overrides})
        model, train_s = train_cached(mc, cached["train"], epochs)
        s = {k: score_cached(model, cached[k]) for k in ("val_good", "val_bad", "test_good", "test_bad")}
        for red in REDUCTIONS:
            row = {"dataset": args.dataset, "size": f"{h}x{w}", "tiles": args.tiles, "backbone": args.backbone,
                   "taps": taps, "epochs": epochs, "components": mc.components, **overrides, "reduction": red,
                   "val_auroc": round(roc_auc(s["val_good"][red], s["val_bad"][red]), 4),
                   "test_auroc": round(roc_auc(s["test_good"][red], s["test_bad"][red]), 4),
                   "train_s": round(train_s, 1), "n_tiles": n_tiles}
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as fh:
                    fh.write(json.dumps(row) + "\n")


def cached_taps(dataset: str, base: ModelConfig, cache: str) -> dict[str, list[torch.Tensor]]:
    """The raw backbone taps of the training rows, the validation set (held-out good + synthetic
    defects) and the test split at `base`'s input, computed once and kept under `cache`."""
    key = f"{dataset}-{base.backbone}-{base.input_height}x{base.input_width}-{base.tiles[0]}x{base.tiles[1]}"
    if list(base.taps) != ModelConfig().taps:
        key += "-taps" + "_".join(map(str, base.taps))
    cache_file = Path(cache) / f"{key}.pt"
    if cache_file.exists():
        return torch.load(cache_file)
    split = load_split(dataset, (base.input_height, base.input_width))
    extractor = FeatureGraph(build_model(base).eval())
    val = make_validation_set(split.holdout, seed=0)
    cached = {}
    for name, imgs in (("train", split.train), ("val_good", val.good), ("val_bad", val.bad),
                       ("test_good", split.test_good), ("test_bad", split.test_bad)):
        cached[name] = extract_features(extractor, imgs, torch.device("cpu"), name)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(cached, cache_file)
    return cached


def _embed_all(model, raw: list[torch.Tensor], batch: int = 64) -> list[torch.Tensor]:
    """The flow inputs of every cached image: one tensor when fused, one per tap when separate."""
    parts: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for i in range(0, raw[0].shape[0], batch):
            parts.append([e.half() for e in model.embed([r[i:i + batch].float() for r in raw])])
    return [torch.cat([p[t] for p in parts]) for t in range(len(parts[0]))]


if __name__ == "__main__":
    main()
