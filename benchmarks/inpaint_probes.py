"""Read-only probes of the inpaint method (paper 004): which inference reading of one trained generator
separates defects, judged on label-free validation first and reported on the test split.

    python benchmarks/inpaint_probes.py train    --dataset mtd --rows 3,1 --work /tmp/inp
    python benchmarks/inpaint_probes.py readings --dataset mtd --row 3 --work /tmp/inp --threads 1

`train` fits the ablation rows of benchmarks/inpaint.py (1 plain AE, 2 + fuzzy masking, 3 + skips +
weighted SSIM) with the method's defaults on the product's split (MTD / KSDD at 256x256, generator at
128 px, seed 0) and saves each generator's weights under --work. `readings` loads one row's weights and
scores the held-out good images + synthetic defects (validation, label-free) and the test split under
each reading (the map head's statistics refitted per reading on 64 training tiles):

  recon             D(I, G(I)): the map of rows 1-3 (no dynamic inference)
  inpaint-half      D(I, R) with R the complementary-mask inpainting: cells of a fixed random half
                    fuzzy-masked and repaired by G, the other half likewise, each cell taken from the
                    pass in which it was masked (the way G was trained to repair)
  inpaint-checker   the same with a checkerboard of cells
  inpaint-minus-r1  relu(D(I, R) - D(I, G(I))): the paper's "background" term removed
  inpaint-paper     relu(D(I, R) - D(I, R1) - D(R_{n-1}, R_n)): Algorithm 1's converged branch with
                    the masked repair in its score (lines 8-9)
  inpaint-twice     R inpainted again with the opposite half
  dynamic-current   the method's dynamic inference as shipped (row 4 of benchmarks/inpaint.py)

Nothing here changes the product; the rows print as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import fit_method, load_masks, pixel_auroc  # noqa: E402
from datasets import load_split  # noqa: E402
from inpaint import ROWS as ABLATION_ROWS  # noqa: E402

from inspectd.engines.fitting import batches, reduce_maps, validation_auroc, validation_frames  # noqa: E402
from inspectd.engines.methods.inpaint import METHOD, InpaintModel, _tiles, apply_fuzzy, calibrate  # noqa: E402
from inspectd.engines.model_config import ModelConfig  # noqa: E402
from inspectd.engines.preprocess import InputSpec  # noqa: E402
from inspectd.stats import roc_auc  # noqa: E402

SIZE = (256, 256)
ROWS = {str(i + 1): flags for i, (_, flags) in enumerate(ABLATION_ROWS)}  # benchmarks/inpaint.py's rows 1-3


def train(args: argparse.Namespace) -> None:
    split = load_split(args.dataset, SIZE, args.work / f"{args.dataset}-split")
    for r in args.rows.split(","):
        fitted, _, seconds = fit_method(METHOD, split, SIZE, {"epochs": METHOD.default_epochs, "size": 128, **ROWS[r]}, torch.device("cpu"))
        torch.save(fitted.model.state_dict(), args.work / f"{args.dataset}-row{r}.pt")
        print(json.dumps({"row": r, "seconds": round(seconds, 1), "loss": fitted.final_loss}), flush=True)


def readings(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    split = load_split(args.dataset, SIZE, args.work / f"{args.dataset}-split")
    masks = load_masks(split.masks, InputSpec(SIZE[0], SIZE[1], "gray"))
    model = InpaintModel(ModelConfig(image_height=SIZE[0], image_width=SIZE[1]),
                         METHOD.parse_options({**ROWS[args.row], "size": 128, "dynamic": True}))
    state = torch.load(args.work / f"{args.dataset}-row{args.row}.pt")
    own = model.state_dict()
    model.load_state_dict({k: (own[k] if k.startswith("head.") else state.get(k, own[k])) for k in own})
    model.eval()
    gen, grid, diff = model.gen, model.options.grid, model.difference
    half = (torch.rand(grid, grid, generator=torch.Generator().manual_seed(7)) < 0.5).float()
    checker = ((torch.arange(grid)[:, None] + torch.arange(grid)[None]) % 2).float()

    def inpaint(x: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        a = cells[None, None].expand(x.shape[0], 1, -1, -1)
        ra = gen(apply_fuzzy(x, a, model.weight, model.interference))
        rb = gen(apply_fuzzy(x, 1 - a, model.weight, model.interference))
        up = F.interpolate(a, size=x.shape[-2:], mode="nearest")
        return up * ra + (1 - up) * rb

    def paper(x: torch.Tensor) -> torch.Tensor:
        r1, prev, cur, _, _ = model.dyn(x, model.threshold)
        return F.relu(diff(x, inpaint(x, half)) - diff(x, r1) - diff(prev, cur))

    variants = {"recon": lambda x: diff(x, gen(x)),
                "inpaint-half": lambda x: diff(x, inpaint(x, half)),
                "inpaint-checker": lambda x: diff(x, inpaint(x, checker)),
                "inpaint-minus-r1": lambda x: F.relu(diff(x, inpaint(x, half)) - diff(x, gen(x))),
                "inpaint-paper": paper,
                "inpaint-twice": lambda x: diff(x, inpaint(inpaint(x, half), 1 - half)),
                "dynamic-current": model.tile_map}
    if args.variants:
        variants = {k: variants[k] for k in args.variants.split(",")}
    device = torch.device("cpu")
    train_x = _tiles(model, split.train, device)
    with torch.no_grad():
        calibrate(model, train_x, _tiles(model, split.holdout, device))
    frames, vmasks = validation_frames(split.holdout, 0)
    test = split.test_good + split.test_bad
    n_good, n_hold = len(split.test_good), len(split.holdout)
    sub = train_x[torch.linspace(0, train_x.shape[0] - 1, 64).long()]

    @torch.no_grad()
    def maps_of(fn, images) -> torch.Tensor:
        out = []
        for sl in batches(len(images), 16):
            x = model.prepare(torch.from_numpy(np.stack(images[sl])))
            out.append(model.head([model._to_grid(fn(x))])[1])
        return torch.cat(out)

    for name, fn in variants.items():
        with torch.no_grad():
            ms = torch.cat([model._to_grid(fn(sub[sl])).flatten() for sl in batches(64, 16)])
        model.head.nll_mean[0] = ms.mean()
        model.head.nll_std[0] = ms.std().clamp_min(1e-6)
        vm, tm = maps_of(fn, list(frames)), maps_of(fn, test)
        row = {"dataset": args.dataset, "row": args.row, "reading": name}
        for red in ("mean", "topk", "max"):
            row[f"val_{red}"] = round(validation_auroc(reduce_maps(vm.flatten(1), red, model.head.topk), n_hold), 4)
            s = reduce_maps(tm.flatten(1), red, model.head.topk)
            row[f"test_{red}"] = round(roc_auc(s[:n_good], s[n_good:]), 4)
        row["val_pixel"] = round(pixel_auroc(vm.numpy(), list(vmasks[n_hold:]), n_hold, frames.shape[1:3]), 4)
        row["test_pixel"] = round(pixel_auroc(tm.numpy(), masks, n_good, SIZE), 4)
        print(json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("--rows", default="3,1")
    r = sub.add_parser("readings")
    r.add_argument("--row", choices=sorted(ROWS), default="3")
    r.add_argument("--variants", default="", help="comma-separated readings (default: all)")
    r.add_argument("--threads", type=int, default=1)
    for p in (t, r):
        p.add_argument("--dataset", choices=["mtd", "ksdd"], required=True)
        p.add_argument("--work", type=Path, default=Path("/tmp/inp"))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    train(args) if args.command == "train" else readings(args)


if __name__ == "__main__":
    main()
