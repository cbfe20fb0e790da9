"""Is a bundle's anomaly map drawn where its cells look? A label-free check.

    python benchmarks/map_alignment.py --bundle BUNDLE --good TRAIN_GOOD_FOLDER [--seed 0]

The bundle's held-out good training images (the same 10 % `inspectd train` holds out with that
seed) get the label-free validation defects of inspectd/engines/validation.py (two each); each
defect's mask is the set of pixels it changed. The engine's maps (PyTorch rebuild of the bundle),
upsampled to the input as `inspectd eval` does, are then shifted by whole pixels (replicated at
the borders) and the pixel AUROC is computed for every shift: a peak away from shift 0 means the
map is drawn off where the defects are. Never reads a test image.

Also reported: where one map cell "looks" — the centroid of |d map cell / d input| on stationary
noise input, minus the centre the map draws it at, for cells near the middle of the frame.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from inspectd.engines.bundle import load_bundle
from inspectd.engines.fitting import validation_frames
from inspectd.engines.model import build_from_bundle, shift_map
from inspectd.engines.preprocess import list_images, load_prepared
from inspectd.engines.train import TrainConfig, holdout_split
from inspectd.stats import roc_auc


def cell_offsets(model: torch.nn.Module, shape: tuple[int, int, int], seed: int, n_images: int = 3
                 ) -> np.ndarray:
    """(dy, dx) in input pixels: gradient centroid of a map cell minus its drawn centre, for cells
    around the frame's middle, on stationary noise input."""
    h, w, c = shape
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_images):
        x = torch.from_numpy((128 + 20 * rng.standard_normal((1, h, w, c))).clip(0, 255)).float().requires_grad_(True)
        _, amap = model(x)
        mh, mw = amap.shape[-2:]
        sy, sx = h / mh, w / mw
        ys, xs = np.mgrid[0:h, 0:w]
        for i, j in ((mh // 2, mw // 2), (mh // 2 - 3, mw // 2 + 2), (mh // 2 + 4, mw // 2 - 5)):
            g, = torch.autograd.grad(amap[0, i, j], x, retain_graph=True)
            g = g[0].abs().sum(-1).numpy()
            out.append(((g * ys).sum() / g.sum() - (sy * (i + 0.5) - 0.5),
                        (g * xs).sum() / g.sum() - (sx * (j + 0.5) - 0.5)))
    return np.asarray(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True, type=Path)
    ap.add_argument("--good", required=True, type=Path, help="the folder the bundle was trained on")
    ap.add_argument("--seed", type=int, default=0, help="the training seed (which images were held out)")
    ap.add_argument("--shifts", default="-32:17:4", help="start:stop:step in input pixels")
    args = ap.parse_args()
    torch.set_num_threads(1)
    bundle = load_bundle(args.bundle)
    spec = bundle.input_spec
    model = build_from_bundle(bundle).eval()
    good_paths = list_images(args.good)
    hold_idx, _ = holdout_split(len(good_paths), np.random.default_rng(args.seed), TrainConfig(seed=args.seed))
    frames, masks = validation_frames([load_prepared(good_paths[i], spec) for i in hold_idx], args.seed)
    n_good = len(hold_idx)
    with torch.no_grad():
        maps = torch.cat([model(torch.from_numpy(frames[i:i + 16]))[1] for i in range(0, len(frames), 16)])
    h, w = spec.height, spec.width
    up = F.interpolate(maps[:, None], size=(h, w), mode="bilinear", align_corners=False)
    sub = (slice(None), slice(None, None, 2), slice(None, None, 2))  # every 4th pixel: same ranking, 4x faster

    def auroc(dy: int, dx: int) -> float:
        """The map drawn dy pixels lower and dx further right (negative: up / left)."""
        s = shift_map(up, (dy, dx))[:, 0].numpy()[sub]
        return roc_auc(s[~masks[sub]], s[masks[sub]])

    start, stop, step = (int(v) for v in args.shifts.split(":"))
    print(f"{args.bundle} ({bundle.manifest.method.name}, {h}x{w}, map {tuple(maps.shape[-2:])}): "
          f"{n_good} held-out good + {len(frames) - n_good} synthetic defects, "
          f"{int(masks.sum())} defect pixels", file=sys.stderr)
    print("| shift px | dy only | dx only | both |\n|---|---|---|---|")
    best = (auroc(0, 0), 0)
    for d in range(start, stop, step):
        both = auroc(d, d)
        best = max(best, (both, d))
        print(f"| {d:+d} | {auroc(d, 0):.4f} | {auroc(0, d):.4f} | {both:.4f} |", flush=True)
    offs = cell_offsets(model, spec.shape, args.seed)
    print(f"\nbest shift (both axes): {best[1]:+d} px, validation pixel AUROC {best[0]:.4f} (unshifted "
          f"{auroc(0, 0):.4f}); cell gradient centroid - drawn centre: dy {offs[:, 0].mean():+.1f} "
          f"(sd {offs[:, 0].std():.1f}), dx {offs[:, 1].mean():+.1f} (sd {offs[:, 1].std():.1f}) px")
    return 0


if __name__ == "__main__":
    sys.exit(main())
