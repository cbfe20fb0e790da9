"""Probes of a trained bundle's image scores (RESULTS.md §7 and §10): read-only, nothing is chosen here.

    python benchmarks/map_probes.py reductions --bundle /tmp/bench/mtd-pca/bundle --split /tmp/bench/mtd/split
    python benchmarks/map_probes.py cutpaste-weights --bundle /tmp/bench/cutpaste-ae-mtd-heads/bundle \
        --split /tmp/bench/mtd/split
    python benchmarks/map_probes.py ae-error --bundle /tmp/bench/cpae-mtd-aeseed/bundle --split /tmp/bench/cpae-mtd-aeseed/split
    python benchmarks/map_probes.py edge --bundle /tmp/s21/mtd/bundle --split /tmp/s21/mtd/split
    python benchmarks/map_probes.py positions --bundle /tmp/s22/mtd/bundle --split /tmp/s22/mtd/split
    python benchmarks/map_probes.py score-term --bundle /tmp/s22/mtd/bundle --split /tmp/s22/mtd/split

reductions: the bundle's maps (ONNX Runtime) on its label-free validation set (the held-out good
images named in its manifest + the synthetic defects `inspectd train` makes from them) and on the
test split, reduced by mean / top-k 3 % / max and by two combinations z-standardised on the held-out
good images (max of z(mean), z(max); their sum). With masks and class-prefixed file names (MTD):
test AUROC per defect class, and the median of the map over the pixels at least `--margin` input
px away from the annotated defect, against the good images' median (does the image differ away
from its defect?), beside plain image statistics of the files.
cutpaste-weights: a cutpaste-ae bundle's two standardised scores, its combined rule re-weighted by
validation AUROC on every synthetic kind and on only the kinds neither head trains on (blob, blur,
crack), and the CutPaste head scored by its patch map's max instead of its pooled embedding.
ae-error: a cutpaste-ae bundle's trained autoencoder with other measures of its reconstruction
difference (squared error as shipped, absolute error, 1 - SSIM), each standardised per position on
the bundle's good training images, reduced by top-k / max / mean, alone and added to the CutPaste
score at validation's best ratio (the product's `combine=validation` rule).
edge: how much of a defect's image score the map shift cost, by where the defect lies. The bundle's
held-out good images (never a test image), each with one dark disc (radius `--radius` input px,
60 grey levels darker) at the centre, at each corner and at the middle of each edge; scored by the
bundle's engine (PyTorch, its weights) with the image score taken from the shifted map (bundles
before RESULTS.md §28) and from the map before the shift (the product since); coverage = what the
disc adds to the latter score at that place, as a share of what it adds at the centre. Also both
rules' AUROC on the bundle's label-free validation set.
positions: is the flow's map stationary? The map the engine's image score reduces (MapHead.scored_map:
every cell, before the shift) on the bundle's training images (never the held-out ones): its mean and
standard deviation per map position, border rows and columns against the interior; where the
held-out good images' maxima fall; and the bundle's reduction on maps standardised per position by
those training statistics (mean only, and mean and std), against the maps as shipped, on the
label-free validation set and the test split (the test reported only).
score-term: a flow bundle's own trained members scored by each per-position term (ModelConfig.score_term:
"z2" = 0.5|z|^2, what the product ships, and "nll" = 0.5|z|^2 - log|det J|, the density the flows
were trained to fit), each reduced by mean / top-k / max, on the label-free validation set and the
test split (the test reported only). The head's standardisation is one offset and scale per
source, so an AUROC does not depend on it and the bundle's own is kept for both terms.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import torch

from inspectd.engines.bundle import load_bundle
from inspectd.engines.fitting import batches
from inspectd.engines.fitting import reduce_maps, validation_auroc
from inspectd.engines.methods.cutpaste_ae import RATIOS
from inspectd.engines.methods.inpaint import ssim_kernel, ssim_map
from inspectd.engines.model import build_from_bundle, resample_grid, tile_images
from inspectd.engines.preprocess import list_images, prepare, prepare_mask, read_image
from inspectd.engines.runtime.onnxruntime_backend import OnnxRuntimeBackend
from inspectd.engines.validation import KINDS, make_validation_set
from inspectd.stats import roc_auc

SETS = ("val_good", "val_bad", "test_good", "test_bad")
# The floor of the AUROC - 0.5 weighting cutpaste-ae used until the sixth session (the probe's rows in
# RESULTS section 10 were taken with it; the product now picks validation's best ratio instead).
OLD_MIN_WEIGHT = 0.05


def _auroc(good: np.ndarray, bad: np.ndarray) -> float:
    return round(float(roc_auc(good, bad)), 4)


def _images(bundle_dir: Path, split: Path) -> tuple[dict[str, list[np.ndarray]], list[str], list[Path]]:
    """Prepared images of every set, the validation defects' kinds and the test_bad paths."""
    spec = load_bundle(bundle_dir).input_spec
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    hold = set(manifest["training"]["holdout_names"])
    seed = manifest["training"]["config"].get("seed", 0)

    def prep(paths: list[Path]) -> list[np.ndarray]:
        return [prepare(read_image(p, spec.color_mode), spec) for p in paths]
    val = make_validation_set(prep([p for p in list_images(split / "train_good") if p.name in hold]), seed)
    bad_paths = list_images(split / "test_bad")
    return ({"val_good": list(val.good), "val_bad": list(val.bad),
             "test_good": prep(list_images(split / "test_good")), "test_bad": prep(bad_paths)},
            list(val.kinds), bad_paths)


def _report(name: str, scores: dict[str, np.ndarray], kinds: list[str]) -> None:
    kinds_a = np.array(kinds)
    per_kind = " ".join(f"{k} {_auroc(scores['val_good'], scores['val_bad'][kinds_a == k]):.3f}" for k in KINDS)
    print(f"{name:22s} validation {_auroc(scores['val_good'], scores['val_bad']):.4f} ({per_kind})  "
          f"test {_auroc(scores['test_good'], scores['test_bad']):.4f}")


def reductions(args: argparse.Namespace) -> None:
    bundle = load_bundle(args.bundle)
    backend = OnnxRuntimeBackend(bundle)
    images, kinds, bad_paths = _images(args.bundle, args.split)
    maps = {s: np.stack([backend.infer(im[None])[1][0] for im in images[s]]) for s in SETS}
    flat = {s: m.reshape(len(m), -1) for s, m in maps.items()}
    k = max(1, round(0.03 * flat["val_good"].shape[1]))
    red = {s: {"mean": f.mean(1), "top-k 3 %": np.sort(f, 1)[:, -k:].mean(1), "max": f.max(1)}
           for s, f in flat.items()}
    ref = red["val_good"]
    for s in SETS:  # z on the held-out good images, as the engine standardises its scores
        z = {r: (red[s][r] - ref[r].mean()) / ref[r].std(ddof=1) for r in ("mean", "max")}
        red[s]["z-max(mean, max)"] = np.maximum(z["mean"], z["max"])
        red[s]["z-sum(mean, max)"] = z["mean"] + z["max"]
    for r in red["val_good"]:
        _report(r, {s: red[s][r] for s in SETS}, kinds)
    # MTD names its defective files CLASS__...; other datasets get one class
    classes = np.array([p.name.split("__")[0] if "__" in p.name else "all" for p in bad_paths])
    if len(set(classes)) > 1:
        for r in ("mean", "top-k 3 %", "max"):
            print(f"test by class, {r}: " + " ".join(
                f"{c} {_auroc(red['test_good'][r], red['test_bad'][r][classes == c]):.3f}" for c in sorted(set(classes))))
    masks_dir = args.split / "masks"
    if masks_dir.is_dir():
        _away_from_defect(bundle, maps, bad_paths, classes, masks_dir, args.margin)
        _file_statistics(args.split)


def _away_from_defect(bundle, maps: dict[str, np.ndarray], bad_paths: list[Path], classes: np.ndarray,
                      masks_dir: Path, margin: int) -> None:
    spec = bundle.input_spec
    h, w = maps["test_bad"].shape[1:]
    radius = max(1, round(margin * h / spec.shape[0]))  # input px -> map px
    kernel = np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)
    away = []
    for path, amap in zip(bad_paths, maps["test_bad"]):
        mask_file = masks_dir / (path.stem + ".png")
        mask = cv2.imread(str(mask_file), cv2.IMREAD_GRAYSCALE) if mask_file.exists() else None
        if mask is None:
            away.append(np.nan)
            continue
        m = prepare_mask(mask, spec, read_image(path, spec.color_mode).shape[:2])
        near = cv2.dilate((cv2.resize(m.astype(np.uint8), (w, h), interpolation=cv2.INTER_AREA) > 0).astype(np.uint8),
                          kernel) > 0
        away.append(float(np.median(amap[~near])) if (~near).sum() >= 20 else np.nan)
    away_a = np.array(away)
    ok = ~np.isnan(away_a)
    good = np.median(maps["test_good"].reshape(len(maps["test_good"]), -1), axis=1)
    by_class = ""
    if len(set(classes)) > 1:
        by_class = "; by class " + " ".join(f"{c} {_auroc(good, away_a[ok & (classes == c)]):.3f}"
                                            for c in sorted(set(classes)) if (ok & (classes == c)).any())
    print(f"median map >= {margin} input px from the defect vs good images' median map: AUROC "
          f"{_auroc(good, away_a[ok]):.4f} over {ok.sum()} defective images{by_class}")


def _file_statistics(split: Path) -> None:
    def stats(folder: Path) -> np.ndarray:
        rows = []
        for p in list_images(folder):
            im = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE).astype(np.float32)
            rows.append((im.mean(), im.std(), np.abs(cv2.Laplacian(im, cv2.CV_32F)).mean(), im.size))
        return np.array(rows)
    good, bad = stats(split / "test_good"), stats(split / "test_bad")
    parts = []
    for i, name in enumerate(("brightness", "contrast", "sharpness", "image size")):
        a = roc_auc(good[:, i], bad[:, i])
        parts.append(f"{name} {max(a, 1 - a):.3f}")
    print("plain image statistics, good vs defective (AUROC, either direction): " + ", ".join(parts))


def _weights(auroc: dict[str, float]) -> dict[str, float]:
    """cutpaste-ae's former weighting rule (AUROC - 0.5, floored) on given AUROCs."""
    raw = {k: max(v - 0.5, OLD_MIN_WEIGHT) for k, v in auroc.items()}
    return {k: 2.0 * v / sum(raw.values()) for k, v in raw.items()}


@torch.no_grad()
def cutpaste_weights(args: argparse.Namespace) -> None:
    bundle = load_bundle(args.bundle)
    model = build_from_bundle(bundle)
    images, kinds, _ = _images(args.bundle, args.split)
    got: dict[str, dict[str, np.ndarray]] = {}
    for s in SETS:
        parts = [model.components(torch.from_numpy(np.stack(images[s][sl]))) for sl in batches(len(images[s]), 8)]
        got[s] = {k: torch.cat([p[k] for p in parts]).numpy() for k in ("cutpaste", "ae")}
        got[s]["cutpaste map max"] = torch.cat([p["cutpaste_map"].flatten(1).max(1).values for p in parts]).numpy()
    folded = bundle.manifest.method.details["combination_weights"]  # folded into the engine's score_std
    z = {s: {k: got[s][k] / folded[k] for k in ("cutpaste", "ae")} for s in SETS}
    for k in ("cutpaste", "ae", "cutpaste map max"):
        _report(k, {s: got[s][k] for s in SETS}, kinds)
    kinds_a = np.array(kinds)
    for label, subset in (("every kind", KINDS), ("blob, blur, crack", ("blob", "blur", "crack"))):
        sel = np.isin(kinds_a, subset)
        w = _weights({k: roc_auc(z["val_good"][k], z["val_bad"][k][sel]) for k in ("cutpaste", "ae")})
        comb = {s: w["cutpaste"] * z[s]["cutpaste"] + w["ae"] * z[s]["ae"] for s in SETS}
        print(f"weights from validation on {label}: cutpaste {w['cutpaste']:.3f}, ae {w['ae']:.3f} -> combined test "
              f"{_auroc(comb['test_good'], comb['test_bad']):.4f}")


@torch.no_grad()
def ae_error(args: argparse.Namespace) -> None:
    bundle = load_bundle(args.bundle)
    model = build_from_bundle(bundle)
    mc, kernel = model.config, ssim_kernel()
    images, _, _ = _images(args.bundle, args.split)
    spec = bundle.input_spec
    hold = set(json.loads((args.bundle / "manifest.json").read_text())["training"]["holdout_names"])
    images["train"] = [prepare(read_image(p, spec.color_mode), spec) for p in list_images(args.split / "train_good")
                       if p.name not in hold]
    differences = {"squared": lambda x, r: (r - x) ** 2, "absolute": lambda x, r: (r - x).abs(),
                   "1 - SSIM": lambda x, r: 1 - ssim_map(x, r, kernel)}

    def error_maps(imgs: list[np.ndarray], diff) -> torch.Tensor:
        out = []
        for sl in batches(len(imgs), 16):
            x = model.ae_input(tile_images(torch.from_numpy(np.stack(imgs[sl])), mc))
            out.append(resample_grid(diff(x, model.autoencoder(x)).mean(1, keepdim=True), model.ae_head.tile_map)[:, 0])
        return torch.cat(out)

    cp = {s: torch.cat([model.components(torch.from_numpy(np.stack(images[s][sl])), "cutpaste")["cutpaste"]
                        for sl in batches(len(images[s]), 8)]).numpy() for s in SETS}
    print(f"CutPaste alone: validation {_auroc(cp['val_good'], cp['val_bad']):.4f}, "
          f"test {_auroc(cp['test_good'], cp['test_bad']):.4f}")
    n_good = len(cp["val_good"])
    for name, diff in differences.items():
        train = error_maps(images["train"], diff)
        mean, std = train.mean(0), train.std(0)
        std = std.clamp_min(float(std.median()) * 0.1 + 1e-8)  # as fit_ae_positions
        maps = {s: ((error_maps(images[s], diff) - mean) / std).flatten(1) for s in SETS}
        k = max(1, int(round(mc.topk_fraction * maps["val_good"].shape[1])))
        for red in ("topk", "max", "mean"):
            raw = {s: reduce_maps(maps[s], red, k) for s in SETS}
            mu, sd = raw["val_good"].mean(), raw["val_good"].std(ddof=1)
            z = {s: (raw[s] - mu) / sd for s in SETS}
            both = {r: {s: cp[s] + r * z[s] for s in SETS} for r in RATIOS}
            aurocs = [validation_auroc(np.concatenate([both[r]["val_good"], both[r]["val_bad"]]), n_good)
                      for r in RATIOS]
            best = RATIOS[int(np.argmax(aurocs))]
            print(f"{name:9s} {red:5s} AE alone: validation {_auroc(z['val_good'], z['val_bad']):.4f}, test "
                  f"{_auroc(z['test_good'], z['test_bad']):.4f} | combined at ratio {best:g}: validation "
                  f"{max(aurocs):.4f}, test {_auroc(both[best]['test_good'], both[best]['test_bad']):.4f}")


def _disc(image: np.ndarray, cy: int, cx: int, radius: int) -> np.ndarray:
    yy, xx = np.mgrid[:image.shape[0], :image.shape[1]]
    out = image.astype(np.int16)
    out[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius * radius] -= 60
    return np.clip(out, 0, 255).astype(np.uint8)


@torch.no_grad()
def edge(args: argparse.Namespace) -> None:
    bundle = load_bundle(args.bundle)
    model = build_from_bundle(bundle)
    images, _, _ = _images(args.bundle, args.split)
    held_out = images["val_good"]
    h, w = held_out[0].shape[:2]
    r = args.radius
    places = {"centre": (h // 2, w // 2), "top-left": (r, r), "top": (r, w // 2), "top-right": (r, w - 1 - r),
              "left": (h // 2, r), "right": (h // 2, w - 1 - r), "bottom-left": (h - 1 - r, r),
              "bottom": (h - 1 - r, w // 2), "bottom-right": (h - 1 - r, w - 1 - r)}
    print(f"{args.bundle}: map shift {list(model.config.map_shift)} map px, reduction {model.config.reduction}, "
          f"{len(held_out)} held-out good images, disc radius {r} px")
    # Both rules on the label-free validation set (held-out good first, then the synthetic defects
    # made from them); the held-out good images' mean score is the "no disc" row.
    val = images["val_good"] + images["val_bad"]
    good, aurocs = {}, {}
    for rule in (False, True):
        model.head.score_before_shift = rule
        v = np.array([model(torch.from_numpy(im)[None])[0].item() for im in val])
        good[rule] = v[:len(held_out)].mean()
        aurocs[rule] = _auroc(v[:len(held_out)], v[len(held_out):])
    print(f"{'no disc':13s} shifted map {good[False]:8.3f}  before the shift {good[True]:8.3f}")
    for rule in (False, True):
        print(f"validation AUROC, score {'before the shift' if rule else 'of the shifted map'}: {aurocs[rule]:.4f}")
    for name, (cy, cx) in places.items():
        scores = {}
        for rule in (False, True):
            model.head.score_before_shift = rule
            scores[rule] = np.array([model(torch.from_numpy(_disc(im, cy, cx, r))[None])[0].item()
                                     for im in held_out])
        if name == "centre":
            centre = scores[True].mean()
        # coverage: what the disc adds to the product's score here, as a share of what it adds at the centre
        print(f"{name:13s} shifted map {scores[False].mean():8.3f}  before the shift {scores[True].mean():8.3f}  "
              f"ratio of means {scores[False].mean() / scores[True].mean():.3f}  "
              f"lowest ratio {np.min(scores[False] / scores[True]):.3f}  "
              f"coverage {(scores[True].mean() - good[True]) / (centre - good[True]):.3f}")


def _scored_maps(model: torch.nn.Module, images: list[np.ndarray], batch: int = 8) -> np.ndarray:
    """(N, H, W) maps that the engine's image score reduces (MapHead.scored_map), by a hook on its head."""
    got: list[np.ndarray] = []
    hook = model.head.register_forward_hook(
        lambda head, inputs, output: got.append(head.scored_map(inputs[0])[:, 0].numpy()))
    try:
        with torch.no_grad():
            for part in batches(len(images), batch):
                model(torch.from_numpy(np.stack(images[part])))
    finally:
        hook.remove()
    return np.concatenate(got)


def positions(args: argparse.Namespace) -> None:
    bundle = load_bundle(args.bundle)
    model = build_from_bundle(bundle).eval()
    spec = bundle.input_spec
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    hold = set(manifest["training"]["holdout_names"])
    train = [prepare(read_image(p, spec.color_mode), spec) for p in list_images(args.split / "train_good")
             if p.name not in hold]
    images, kinds, _ = _images(args.bundle, args.split)
    fit = _scored_maps(model, train)
    mean, std = fit.mean(0), fit.std(0, ddof=1)
    h, w = mean.shape
    border = np.zeros((h, w), bool)
    border[[0, -1], :] = True
    border[:, [0, -1]] = True
    print(f"{args.bundle}: {len(train)} training images (held-out excluded), map {h}x{w}, "
          f"reduction {model.config.reduction}")
    print(f"per-position mean: interior {mean[~border].mean():.3f} (sd over positions {mean[~border].std():.3f}), "
          f"border {mean[border].mean():.3f}; rows top..bottom " + " ".join(f"{v:.2f}" for v in mean.mean(1)))
    print(f"per-position std:  interior {std[~border].mean():.3f}, border {std[border].mean():.3f}; "
          f"cols left..right " + " ".join(f"{v:.2f}" for v in std.mean(0)))
    maps = {k: _scored_maps(model, images[k]) for k in SETS}
    peaks = maps["val_good"].reshape(len(maps["val_good"]), -1).argmax(1)
    on_border = border.reshape(-1)[peaks].mean()
    print(f"held-out good images' maxima on the border: {on_border:.2f} of them (border is {border.mean():.2f} "
          f"of the map)")
    variants = {"as shipped": lambda m: m, "per-position mean": lambda m: m - mean,
                "per-position z": lambda m: (m - mean) / std}
    for name, f in variants.items():
        red = {k: model.head.reduce(torch.from_numpy(f(maps[k])).float()).numpy() for k in SETS}
        _report(name, red, kinds)


def score_term(args: argparse.Namespace) -> None:
    bundle = load_bundle(args.bundle)
    model = build_from_bundle(bundle).eval()
    images, kinds, _ = _images(args.bundle, args.split)
    print(f"{args.bundle}: shipped score_term {model.config.score_term}, reduction {model.config.reduction}")
    for term in ("z2", "nll"):
        model.config = replace(model.config, score_term=term)
        maps = {k: torch.from_numpy(_scored_maps(model, images[k])).float() for k in SETS}
        for r in ("mean", "topk", "max"):
            _report(f"{term}, {r}", {k: model.head.reduce(maps[k], r).numpy() for k in SETS}, kinds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("probe", choices=["reductions", "cutpaste-weights", "ae-error", "edge", "positions",
                                           "score-term"])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--split", type=Path, required=True, help="folder with train_good/, test_good/, test_bad/ [, masks/]")
    ap.add_argument("--margin", type=int, default=48, help="input px kept clear of the defect (reductions)")
    ap.add_argument("--radius", type=int, default=8, help="radius of the dark disc in input px (edge)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    {"reductions": reductions, "cutpaste-weights": cutpaste_weights, "ae-error": ae_error,
     "edge": edge, "positions": positions, "score-term": score_term}[args.probe](args)


if __name__ == "__main__":
    main()
