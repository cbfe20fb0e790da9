"""Flow-head design study on MTD: which embedding, subnet and score term earn the seed method its place.

    python benchmarks/mtd_design_study.py --split /tmp/mtd-bench/split --bundle /tmp/mtd-bench/bundle \
        --epochs 20 --variants '[{"model": {"fusion": "fused", "kernel_size": 3, "hidden_ratio": 0.5}}]'

Every variant trains for the same predeclared number of epochs on the same images (those the
reference bundle trained on, from its manifest) and is scored on the standard test split once, with
both score terms (full NLL and 0.5|z|^2) and three map reductions. The variants are compared on the
test split: this is design selection, reported as such in RESULTS.md (no epoch is ever picked).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from inspectd.stats import roc_auc
from inspectd.engines.bundle import load_bundle
from inspectd.engines.model import ModelConfig, build_model
from inspectd.engines.preprocess import InputSpec, list_images, load_prepared
from inspectd.engines.train import (TrainConfig, augment, extract_features, fit_nll_statistics, fit_statistics,
                                    train_flows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", required=True, help="folder with train_good/, test_good/, test_bad/ (mtd_data.py)")
    ap.add_argument("--bundle", required=True, help="a bundle trained on the split: its training image names are used")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--variants", required=True, help="JSON list of {model: {ModelConfig overrides}, aug: bool}")
    args = ap.parse_args()
    split = Path(args.split)
    spec = InputSpec(256, 256, "gray")
    used = set(load_bundle(args.bundle).manifest.training.image_names)
    train = [load_prepared(p, spec) for p in list_images(split / "train_good") if p.name in used]
    good = [load_prepared(p, spec) for p in list_images(split / "test_good")]
    bad = [load_prepared(p, spec) for p in list_images(split / "test_bad")]
    labels = np.array([0] * len(good) + [1] * len(bad))
    base = ModelConfig(taps=[4, 10, 15], image_size=256, map_size=64, fusion="separate")
    rng = np.random.default_rng(0)
    views = [augment(im, rng, TrainConfig(model=base)) for _ in range(3) for im in train]
    raw_model = build_model(base).eval()
    cpu = torch.device("cpu")
    raw_train = extract_features(raw_model, train, cpu, "train")
    raw_views = extract_features(raw_model, views, cpu, "augmented")
    raw_test = extract_features(raw_model, good + bad, cpu, "test")

    def auc(x: np.ndarray) -> float:
        return roc_auc(x[labels == 0], x[labels == 1])

    for variant in json.loads(args.variants):
        mc = replace(base, **variant.get("model", {}))
        model = build_model(mc)

        def embed(raw: list[torch.Tensor]) -> list[torch.Tensor]:
            out: list[list[torch.Tensor]] = [[] for _ in model.flows]
            for i in range(0, raw[0].shape[0], 64):
                for t, e in enumerate(model.embed([r[i:i + 64].float() for r in raw])):
                    out[t].append(e.half())
            return [torch.cat(o) for o in out]

        cache = embed(raw_train)
        if variant.get("aug", False):
            cache = [torch.cat([c, a]) for c, a in zip(cache, embed(raw_views))]
        t0 = time.monotonic()
        fit_statistics(model, cache, len(train))
        train_flows(model, cache, len(train), TrainConfig(model=mc, epochs=args.epochs), cpu)
        seconds = time.monotonic() - t0
        test = embed(raw_test)
        result: dict[str, float] = {}
        for term in ("nll", "z2"):
            model.config.score_term = term
            fit_nll_statistics(model, cache, len(train), cpu)
            with torch.no_grad():
                maps = [torch.cat([model.nll_maps([x[i:i + 64].float() for x in test])[k]
                                   for i in range(0, test[0].shape[0], 64)]) for k in range(len(test))]
                _, amap = model.head(maps)
            flat = amap.flatten(1)
            result[f"{term}_max"] = auc(flat.max(1).values.numpy())
            result[f"{term}_top1%"] = auc(flat.topk(max(1, flat.shape[1] // 100), 1).values.mean(1).numpy())
            result[f"{term}_mean"] = auc(flat.mean(1).numpy())
        print(json.dumps({"variant": variant, "epochs": args.epochs, "train_s": round(seconds),
                          **{k: round(v, 4) for k, v in result.items()}}), flush=True)


if __name__ == "__main__":
    main()
