"""Robustness to part motion (issue 10, item 4): the seed's augmentation claim, measured on MTD.

    python benchmarks/robustness.py --out /tmp/bench/robustness

Paper 000 (../shared/methods/README.md) reports that augmenting the good training images with
rotation / translation / scale keeps accuracy on a "transformed" test set (every test image, good
and bad, transformed 2 times per transform x 3 transforms = 6x the test set): NF 0.912 vs NF+DA
0.975, PaDiM 0.861. It does not give its ranges; ours are declared here, fixed before any run:

    rotation     angle uniform in [10, 30] degrees, random sign, about the image centre
    translation  distance uniform in [5, 15] % of the side, direction uniform in [0, 360) degrees
                 (dx = d cos(theta) W, dy = d sin(theta) H)
    scale        factor 1 +/- s, s uniform in [0.05, 0.15], random sign (0.85-0.95 or 1.05-1.15),
                 about the image centre

One transform per output image (a rotated image is only rotated). Applied to the source file at its
native resolution (the bundle's own resize then runs as for any camera frame), bilinear, borders
reflected (cv2.BORDER_REFLECT_101, as the product's training augmentation), written losslessly as
PNG to <out>/transformed/{good,bad}. Draws come from numpy's default_rng([SEED, crc32(file name)]),
so a file's transforms do not depend on --limit or on the order of files. Labels are preserved: a
transformed defective image stays defective; <out>/transformed/transforms.csv lists every draw and
whether the defect (its mask, warped the same way) is still in the frame ("defect_lost" counts the
bad images whose whole defect left the frame; they stay labelled bad, as in the paper, and the
"defect in frame" column repeats the transformed AUROC without them).

Compared (image ROC AUC on the original test split and on the transformed set, plus per transform):
  flow                 `inspectd train --good <train> --out <bundle> --augment none`
  flow + augmentation  `inspectd train --good <train> --out <bundle> --augment rotate,translate,scale`
  (every other flag at the product default; --extra-train-args is appended to both), scored once
  through ONNX Runtime by `inspectd eval`'s code;
  PaDiM-style Gaussian (and, computed by the same call, nearest-neighbour patches) from
  benchmarks/baselines.py, at the bundle's input size, fitted on exactly the images the bundle
  trained on (its manifest's image_names). The product's training augmentation ranges are recorded
  next to the test ranges in summary.json (they are narrower: the transformed set also measures
  motion beyond what the augmentation shows the flow).

--limit N keeps the first N test images of each class and the first 4N training images (smoke runs
only; its numbers mean nothing). Writes <out>/summary.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shlex
import shutil
import sys
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import baselines  # noqa: E402
from datasets import split_folders  # noqa: E402

from inspectd.cli import main as inspectd_main  # noqa: E402
from inspectd.engines.bundle import load_bundle  # noqa: E402
from inspectd.engines.evaluate import evaluate  # noqa: E402
from inspectd.engines.model import ModelConfig  # noqa: E402
from inspectd.engines.preprocess import list_images, load_prepared  # noqa: E402
from inspectd.stats import roc_auc  # noqa: E402

# ---- declared before any run; never tuned on results -------------------------------------------
SEED = 0
PER_TRANSFORM = 2                     # images per transform per test image
ROTATION_DEG = (10.0, 30.0)           # |angle|, random sign
TRANSLATION_FRAC = (0.05, 0.15)       # distance as a fraction of the side, random direction
SCALE_DELTA = (0.05, 0.15)            # |factor - 1|, random sign
BORDER = cv2.BORDER_REFLECT_101
TRANSFORMS = ("rotation", "translation", "scale")
BASELINE_CHUNK = 1200                 # test images per baselines() call (bounds feature memory)

FLOWS = {"flow": ["--augment", "none"],
         "flow + augmentation": ["--augment", "rotate,translate,scale"]}


def draw(kind: str, rng: np.random.Generator) -> dict[str, float]:
    sign = float(rng.choice([-1.0, 1.0]))
    if kind == "rotation":
        return {"angle_deg": sign * float(rng.uniform(*ROTATION_DEG)), "dx_frac": 0.0, "dy_frac": 0.0, "scale": 1.0}
    if kind == "translation":
        d, theta = float(rng.uniform(*TRANSLATION_FRAC)), float(rng.uniform(0.0, 2.0 * math.pi))
        return {"angle_deg": 0.0, "dx_frac": d * math.cos(theta), "dy_frac": d * math.sin(theta), "scale": 1.0}
    return {"angle_deg": 0.0, "dx_frac": 0.0, "dy_frac": 0.0, "scale": 1.0 + sign * float(rng.uniform(*SCALE_DELTA))}


def matrix(p: dict[str, float], h: int, w: int) -> np.ndarray:
    m = cv2.getRotationMatrix2D((w / 2, h / 2), p["angle_deg"], p["scale"])
    m[:, 2] += (p["dx_frac"] * w, p["dy_frac"] * h)
    return m


def _read(path: Path, flags: int) -> np.ndarray:
    img = cv2.imdecode(np.fromfile(str(path), np.uint8), flags)
    if img is None:
        raise SystemExit(f"{path}: not a readable image")
    return img


def build_transformed(good: list[Path], bad: list[Path], masks_dir: Path, out: Path) -> dict:
    """Writes out/{good,bad}/<stem>__<kind><k>.png and out/transforms.csv; returns counts."""
    if out.exists():
        shutil.rmtree(out)
    (out / "good").mkdir(parents=True)
    (out / "bad").mkdir()
    rows, lost, bad_with_mask = [], 0, 0
    for label, paths in (("good", good), ("bad", bad)):
        for src in paths:
            img = _read(src, cv2.IMREAD_UNCHANGED)
            h, w = img.shape[:2]
            mask = None
            mp = masks_dir / (src.stem + ".png")
            if label == "bad" and mp.exists():
                mask = _read(mp, cv2.IMREAD_GRAYSCALE)
                if mask.shape != (h, w):
                    mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
                if not (mask > 127).any():
                    mask = None
            rng = np.random.default_rng([SEED, zlib.crc32(src.name.encode())])
            for kind in TRANSFORMS:
                for k in range(1, PER_TRANSFORM + 1):
                    p = draw(kind, rng)
                    m = matrix(p, h, w)
                    warped = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=BORDER)
                    name = f"{src.stem}__{kind}{k}.png"
                    if not cv2.imwrite(str(out / label / name), warped):
                        raise SystemExit(f"could not write {out / label / name}")
                    kept = ""
                    if mask is not None:
                        bad_with_mask += 1
                        wm = cv2.warpAffine(mask, m, (w, h), flags=cv2.INTER_NEAREST, borderMode=BORDER)
                        kept_px = int((wm > 127).sum())
                        kept = f"{kept_px / max(1, int((mask > 127).sum())):.3f}"
                        lost += kept_px == 0
                    rows.append({"file": name, "label": label, "source": src.name, "kind": kind,
                                 **{k2: round(v, 4) for k2, v in p.items()}, "defect_area_kept": kept})
    with open(out / "transforms.csv", "w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    return {"n_good": sum(r["label"] == "good" for r in rows), "n_bad": sum(r["label"] == "bad" for r in rows),
            "bad_images_with_mask": bad_with_mask, "defect_lost": int(lost),
            "kind_of": {r["file"]: r["kind"] for r in rows},
            "lost": {r["file"] for r in rows if r["defect_area_kept"] and float(r["defect_area_kept"]) == 0.0}}


def limited(dirs: dict[str, Path], work: Path, n: int) -> dict[str, Path]:
    """Symlinked copies of the split with the first 4n train and first n test images per class."""
    if work.exists():
        shutil.rmtree(work)
    res = {"masks": dirs["masks"]}
    for key, count in (("train_good", 4 * n), ("test_good", n), ("test_bad", n)):
        res[key] = work / key
        res[key].mkdir(parents=True)
        for p in list_images(dirs[key])[:count]:
            os.symlink(p.resolve(), res[key] / p.name)
    return res


def aurocs(names: list[str], labels: np.ndarray, scores: np.ndarray, kind_of: dict[str, str] | None,
           lost: set[str] = frozenset()) -> dict:
    res = {"all": roc_auc(scores[labels == 0], scores[labels == 1])}
    if kind_of:
        kept = np.array([n not in lost for n in names])
        res["defect_in_frame"] = roc_auc(scores[labels == 0], scores[(labels == 1) & kept])
        kinds = np.array([kind_of[n] for n in names])
        for kind in TRANSFORMS:
            sel = kinds == kind
            res[kind] = roc_auc(scores[sel & (labels == 0)], scores[sel & (labels == 1)])
    return res


def flow_scores(bundle: Path, good: Path, bad: Path, out: Path) -> tuple[list[str], np.ndarray, np.ndarray, dict]:
    report = evaluate(bundle, good, bad, out)
    names, labels, scores = [], [], []
    with open(out / "scores.csv", newline="") as fh:
        for r in csv.DictReader(fh):
            names.append(r["file"])
            labels.append(int(r["label"] == "bad"))
            scores.append(float(r["raw_score"]))
    if report["skipped"]:
        raise SystemExit(f"eval skipped {report['skipped']} unreadable images in {good} / {bad}")
    return names, np.array(labels), np.array(scores), report


def baseline_scores(mc: ModelConfig, train_imgs: list[np.ndarray], spec, paths: list[Path],
                    stride: int) -> dict[str, np.ndarray]:
    """baselines() over `paths` in chunks (the fit is deterministic, so chunks score alike)."""
    res: dict[str, list[np.ndarray]] = {}
    for i in range(0, len(paths), BASELINE_CHUNK):
        imgs = [load_prepared(p, spec) for p in paths[i:i + BASELINE_CHUNK]]
        for name, (scores, _maps) in baselines(mc, train_imgs, imgs, stride).items():
            res.setdefault(name, []).append(np.asarray(scores))
    return {k: np.concatenate(v) for k, v in res.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--limit", type=int, default=None, help="first N test images per class, first 4N train "
                    "images (smoke runs only)")
    ap.add_argument("--extra-train-args", default="", help="appended to both `inspectd train` runs "
                    "(quick tests only, e.g. '--epochs 1 --no-select')")
    args = ap.parse_args()
    if args.limit is not None and args.limit < 2:
        ap.error("--limit must be at least 2")
    started = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dirs = split_folders("mtd", out / "split")
    if args.limit is not None:
        dirs = limited(dirs, out / f"limit{args.limit}", args.limit)
    good_paths, bad_paths = list_images(dirs["test_good"]), list_images(dirs["test_bad"])

    t0 = time.monotonic()
    tr = build_transformed(good_paths, bad_paths, dirs["masks"], out / "transformed")
    transform_s = time.monotonic() - t0
    kind_of, lost = tr.pop("kind_of"), tr.pop("lost")
    print(f"transformed set: {tr['n_good']} good + {tr['n_bad']} bad images "
          f"({tr['defect_lost']} bad with the whole defect out of frame)", flush=True)
    sets = {"original": (dirs["test_good"], dirs["test_bad"], None),
            "transformed": (out / "transformed" / "good", out / "transformed" / "bad", kind_of)}

    rows, bundles_info = [], {}
    extra = shlex.split(args.extra_train_args)
    for method, flags in FLOWS.items():
        bdir = out / ("bundle-" + method.replace(" + ", "-").replace(" ", "-"))
        argv = ["train", "--good", str(dirs["train_good"]), "--out", str(bdir), "--force", *flags, *extra]
        print(f"\n== {method}: inspectd {' '.join(argv)}", flush=True)
        t0 = time.monotonic()
        code = inspectd_main(argv)
        if code:
            raise SystemExit(f"inspectd train failed ({code}) for {method}")
        train_s = time.monotonic() - t0
        m = load_bundle(bdir).manifest
        cfg = m.training.config
        bundles_info[method] = {"bundle": str(bdir), "argv": argv, "train_s": round(train_s, 1),
                                "input": [m.input.height, m.input.width], "tiles": m.input.tiles,
                                "augment_used": cfg.get("augment"), "views": cfg.get("views"),
                                "epochs": cfg.get("epochs"), "selection": cfg.get("selection"),
                                "n_train": m.training.n_train, "n_holdout": m.training.n_holdout,
                                "train_augmentation_ranges": {k: cfg.get(k) for k in
                                                              ("rotate_deg", "translate_frac", "scale_range")}}
        row = {"method": method, "train_s": round(train_s, 1)}
        for set_name, (g, b, kinds) in sets.items():
            names, labels, scores, _ = flow_scores(bdir, g, b, out / "eval" / bdir.name / set_name)
            row[set_name] = aurocs(names, labels, scores, kinds, lost)
        rows.append(row)

    # Baselines at each distinct (input size, training images) the flow bundles used.
    fitted: dict[tuple, list[str]] = {}
    for method in FLOWS:
        b = load_bundle(bundles_info[method]["bundle"])
        mc = ModelConfig.from_dict(b.manifest.training.config["model"])
        stride = mc.fused_stride if mc.fusion == "fused" else 32
        spec = b.input_spec
        key = (spec.height, spec.width, spec.color_mode, spec.roi, tuple(b.manifest.training.image_names), stride)
        if key in fitted:
            fitted[key].append(method)
            continue
        fitted[key] = [method]
        used = set(b.manifest.training.image_names)
        train_imgs = [load_prepared(p, spec) for p in list_images(dirs["train_good"]) if p.name in used]
        print(f"\n== baselines at {spec.height}x{spec.width}, grid stride {stride}, {len(train_imgs)} training "
              f"images (those of {method})", flush=True)
        per_set = {}
        for set_name, (g, bd, kinds) in sets.items():
            gp, bp = list_images(g), list_images(bd)
            labels = np.array([0] * len(gp) + [1] * len(bp))
            scored = baseline_scores(mc, train_imgs, spec, gp + bp, stride)
            per_set[set_name] = {name: aurocs([p.name for p in gp + bp], labels, s, kinds, lost)
                                 for name, s in scored.items()}
        suffix = "" if len(fitted) == 1 else f" (at the input of {method})"
        for name in per_set["original"]:
            rows.append({"method": name + suffix, "train_s": None, "input": [spec.height, spec.width],
                         "grid_stride": stride, **{s: per_set[s][name] for s in sets}})

    summary = {
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *sys.argv[1:]]),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
                   f"{torch.get_num_threads()} torch threads",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "wall_s": round(time.time() - started, 1),
        "limit": args.limit, "extra_train_args": args.extra_train_args,
        "test_ranges": {"rotation_deg_abs": list(ROTATION_DEG), "translation_frac_of_side": list(TRANSLATION_FRAC),
                        "scale_delta_abs": list(SCALE_DELTA), "per_transform": PER_TRANSFORM,
                        "border": "BORDER_REFLECT_101", "seed": SEED, "transform_s": round(transform_s, 1)},
        "train_augmentation_ranges": bundles_info["flow + augmentation"]["train_augmentation_ranges"],
        "counts": {"original": {"good": len(good_paths), "bad": len(bad_paths)}, "transformed": tr},
        "bundles": bundles_info,
        "rows": rows,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(json.dumps(summary, indent=2, default=str))
    print(f"\nMTD image ROC AUC, original test split ({len(good_paths)} good / {len(bad_paths)} bad) and "
          f"transformed ({tr['n_good']} / {tr['n_bad']})\n")
    print("| method | original | transformed | transformed, defect in frame | rotation | translation | scale "
          "| train time |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = r["transformed"]
        tt = f"{r['train_s']:.0f} s" if r["train_s"] is not None else "-"
        print(f"| {r['method']} | {r['original']['all']:.4f} | {t['all']:.4f} | {t['defect_in_frame']:.4f} | "
              f"{t['rotation']:.4f} | "
              f"{t['translation']:.4f} | {t['scale']:.4f} | {tt} |")


if __name__ == "__main__":
    main()
