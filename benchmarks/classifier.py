"""Method classifier (paper 001) on MTD with a declared few-defect split, placements A, B and C.

    python benchmarks/classifier.py --out /tmp/bench/classifier-mtd

Split (declared, seed 0): 56 defective images to train, drawn across the five defect classes in
proportion to their sizes (largest remainder), the rest of the defective images to test; good
images as for every MTD benchmark (split_train_good.txt to train, of which `inspectd train` holds
10 % out; the other good images to test). Each placement is `inspectd train --method classifier
--bad <the 56> --option placement=<P>` with the product's defaults for everything else (epochs,
pastes: B and C train on their larger pasted sets for the same number of passes, so more steps, as
the paper's larger sets B and C did). `--equal-steps N` is the earlier study's setting instead: A
trains N passes, B and C (one pasted copy per image, `pastes=1`, a set twice as large) N // 2, so
every placement takes the same number of gradient steps. Generated textures are the backgrounds
(MTD has no background folder).

Reported per placement, scored through ONNX Runtime (the deployed graph):
  - threshold: the 99th percentile of the held-out good images' scores (manifest good_quantiles)
  - NG recall at that threshold (test defects), false rejects (test good images above it)
  - image AUROC
  - CAM peak in mask: how often the activation map's maximum falls inside the defect mask
    (its map cell, map_stride = 4 px, overlaps the mask), over detected defects and over all test
    defects.
  - peak CAM cell overlaps mask: the same question at the resolution the CAM is computed at: the
    map's maximum belongs to one CAM cell (stride s = 32: 8 x 8 cells at 256 px, or s = 16 for a
    bundle trained with cam-stride 16: 16 x 16; the cell whose receptive-field centre, input pixel
    (s i, s j), is nearest the peak); counted when the block of pixels nearest that centre (s x s,
    cut at the frame) overlaps the mask. The map cannot say
    more than which cell: a 17 px defect (MTD's median) inside a 32 px cell is found by the right
    cell, but the peak pixel is the cell's centre whether the defect covers it or not.
  - the first column again from the map as it was drawn before the map fixes (the same weights,
    PyTorch: the CAM resized to the map grid as if each cell looked at its block's centre, then
    smoothed by MapHead), so the fixes' effect is visible on the same models.

Shifted / cluttered copy of the test set (issue 13), declared before any run, the same for every
placement: each test image (good and defective, as prepared for the model) is scaled by
s ~ U[0.6, 0.9] (both axes, INTER_AREA) and pasted at a uniform random offset, wholly inside the
frame, onto a background never used in training: a real surface, a random KolektorSDD *good* image
(../shared/datasets/ksdd/good, 347 commutator surfaces; training pastes use generated textures and
no KSDD image is in any MTD training), a random square crop of side U[0.5, 1.0] x its width at a
uniform position, resized to the input, flipped left-right with probability 1/2. The defect mask
gets the same scale (INTER_NEAREST) and offset. One numpy generator, seed `--shift-seed` (1301),
drawn over the good images then the defective ones in sorted order; written once as PNG under
<out>/shifted-<seed>/ and reused. The threshold stays the one calibrated on the original held-out
good images (what the line would run with when the scene shifts).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from datasets import MTD_DEFECTS, split_folders  # noqa: E402

from inspectd.cli import main as inspectd_main  # noqa: E402
from datasets import SHARED  # noqa: E402

from inspectd.engines.bundle import load_bundle  # noqa: E402
from inspectd.engines.fitting import batches  # noqa: E402
from inspectd.engines.model import build_from_bundle  # noqa: E402
from inspectd.engines.preprocess import InputSpec, list_images, load_prepared, prepare_mask, read_image  # noqa: E402
from inspectd.stats import roc_auc  # noqa: E402


def draw_defects(paths: list[Path], n: int, seed: int) -> list[Path]:
    """n defective images across classes in proportion to class sizes (largest remainder), fixed seed."""
    by_class = {c: [p for p in paths if p.name.startswith(c + "__")] for c in MTD_DEFECTS}
    total = sum(len(v) for v in by_class.values())
    quota = {c: n * len(v) / total for c, v in by_class.items()}
    take = {c: int(q) for c, q in quota.items()}
    for c in sorted(quota, key=lambda c: quota[c] - take[c], reverse=True)[: n - sum(take.values())]:
        take[c] += 1
    rng = np.random.default_rng(seed)
    chosen = []
    for c in MTD_DEFECTS:
        idx = rng.choice(len(by_class[c]), size=take[c], replace=False)
        chosen += [by_class[c][i] for i in sorted(idx)]
    return chosen


def link_all(paths: list[Path], folder: Path) -> Path:
    """`folder` holding a symlink to each of `paths` (a training folder without copying images)."""
    folder.mkdir(parents=True, exist_ok=True)
    for p in paths:
        if not (folder / p.name).exists():
            (folder / p.name).symlink_to(p.resolve())
    return folder


def few_defect_split(out: Path, n_defects: int, seed: int
                     ) -> tuple[dict[str, Path], Path, list[Path], list[Path], list[Path]]:
    """The declared MTD few-defect split: (standard split folders, a folder linking the `n_defects`
    drawn to train, those defects, the other defective images, the standard good test images)."""
    dirs = split_folders("mtd", out / "split")
    bad_paths = list_images(dirs["test_bad"])
    train_bad = draw_defects(bad_paths, n_defects, seed)
    chosen = {p.name for p in train_bad}
    test_bad = [p for p in bad_paths if p.name not in chosen]
    return dirs, link_all(train_bad, out / "train_bad"), train_bad, test_bad, list_images(dirs["test_good"])


def score(sess, bundle, paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    scores, maps = [], []
    for sl in batches(len(paths), 16):
        s, m = sess.run(None, {"images": np.stack([load_prepared(p, bundle.input_spec) for p in paths[sl]])})
        scores.append(s)
        maps.append(m)
    return np.concatenate(scores).astype(np.float64), np.concatenate(maps)


def peak_in_mask(amap: np.ndarray, mask: np.ndarray) -> bool:
    """The map's maximum cell, scaled to the input, overlaps the mask."""
    r, c = np.unravel_index(int(np.argmax(amap)), amap.shape)
    sy, sx = mask.shape[0] / amap.shape[0], mask.shape[1] / amap.shape[1]
    return bool(mask[int(r * sy):int(np.ceil((r + 1) * sy)), int(c * sx):int(np.ceil((c + 1) * sx))].any())


def cell_block(i: int, n: int, stride: int, size: int) -> tuple[int, int]:
    """Pixels (lo, hi) nearest CAM cell i's receptive-field centre (input pixel stride * i) along one
    axis of `size` pixels with n cells: the cells partition the axis."""
    lo = max(0, stride * i - stride // 2)
    hi = size if i == n - 1 else min(size, stride * i + stride // 2)
    return lo, hi


def peak_cell_in_mask(amap: np.ndarray, mask: np.ndarray, stride: int = 32) -> bool:
    """The CAM cell holding the map's maximum (nearest receptive-field centre to the peak map cell's
    centre) has its block of nearest pixels overlapping the mask."""
    r, c = np.unravel_index(int(np.argmax(amap)), amap.shape)
    H, W = mask.shape
    sy, sx = H / amap.shape[0], W / amap.shape[1]
    ny, nx = -(-H // stride), -(-W // stride)
    i = min(ny - 1, int(round(((r + 0.5) * sy - 0.5) / stride)))
    j = min(nx - 1, int(round(((c + 0.5) * sx - 0.5) / stride)))
    y0, y1 = cell_block(i, ny, stride, H)
    x0, x1 = cell_block(j, nx, stride, W)
    return bool(mask[y0:y1, x0:x1].any())


def build_shifted(work: Path, spec: InputSpec, good: list[Path], bad: list[Path], masks: Path,
                  seed: int) -> tuple[list[Path], list[Path], Path]:
    """The shifted / cluttered copy of the test set (module docstring): good and defective PNGs and
    their masks at the input size, under `work`; built once (a `done` file marks it complete)."""
    out = {k: work / k for k in ("good", "bad", "masks")}
    names = lambda paths: [out_dir / (p.stem + ".png") for p, out_dir in paths]  # noqa: E731
    good_out = names([(p, out["good"]) for p in good])
    bad_out = names([(p, out["bad"]) for p in bad])
    if (work / "done").exists():
        return good_out, bad_out, out["masks"]
    for d in out.values():
        d.mkdir(parents=True, exist_ok=True)
    backgrounds = sorted((SHARED / "ksdd" / "good").glob("*.jpg"))
    if not backgrounds:
        raise SystemExit("no KSDD good images for the shifted test set's backgrounds")
    rng = np.random.default_rng(seed)
    h, w = spec.height, spec.width

    def one(src: Path, dst: Path, mask_src: Path | None) -> None:
        img = load_prepared(src, spec)
        bg_src = read_image(backgrounds[int(rng.integers(len(backgrounds)))], spec.color_mode)
        side = int(round(rng.uniform(0.5, 1.0) * min(bg_src.shape[0], bg_src.shape[1])))
        by = int(rng.integers(0, bg_src.shape[0] - side + 1))
        bx = int(rng.integers(0, bg_src.shape[1] - side + 1))
        bg = cv2.resize(np.ascontiguousarray(bg_src[by:by + side, bx:bx + side]), (w, h), interpolation=cv2.INTER_AREA)
        bg = bg.reshape(h, w, -1)
        if rng.random() < 0.5:
            bg = np.ascontiguousarray(bg[:, ::-1])
        s = rng.uniform(0.6, 0.9)
        ph, pw = max(1, int(round(h * s))), max(1, int(round(w * s)))
        oy, ox = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
        part = cv2.resize(img, (pw, ph), interpolation=cv2.INTER_AREA).reshape(ph, pw, -1)
        bg[oy:oy + ph, ox:ox + pw] = part
        cv2.imwrite(str(dst), bg if bg.shape[2] == 1 else cv2.cvtColor(bg, cv2.COLOR_RGB2BGR))
        if mask_src is not None and mask_src.exists():
            raw = cv2.imread(str(mask_src), cv2.IMREAD_GRAYSCALE)
            src_img = cv2.imread(str(src), cv2.IMREAD_GRAYSCALE)
            m = prepare_mask(raw, spec, src_img.shape[:2]).astype(np.uint8) * 255
            full = np.zeros((h, w), np.uint8)
            full[oy:oy + ph, ox:ox + pw] = cv2.resize(m, (pw, ph), interpolation=cv2.INTER_NEAREST)
            cv2.imwrite(str(out["masks"] / dst.name), full)

    for p, d in zip(good, good_out):
        one(p, d, None)
    for p, d in zip(bad, bad_out):
        one(p, d, masks / (p.stem + ".png"))
    (work / "done").write_text(json.dumps({"seed": seed, "good": len(good), "bad": len(bad)}))
    return good_out, bad_out, out["masks"]


@torch.no_grad()
def legacy_maps(bundle, paths: list[Path]) -> np.ndarray:
    """The map as drawn before the map fixes, same weights: the raw CAM resized by MapHead
    (bilinear, as if each cell looked at its block's centre), then smoothed (model config sigma)."""
    model = build_from_bundle(bundle).eval()
    out = []
    for sl in batches(len(paths), 16):
        x = torch.from_numpy(np.stack([load_prepared(p, bundle.input_spec) for p in paths[sl]]))
        m = model.cam(model.late(model.early(x)))
        out.append(model.map_head([m])[1].numpy())
    return np.concatenate(out)


def evaluate(sess, bundle, thr: float, good_paths: list[Path], bad_paths: list[Path],
             mask_of) -> dict:
    """Recall / false rejects at thr, AUROC and the three peak columns; mask_of(path) -> bool mask or None."""
    good, _ = score(sess, bundle, good_paths)
    bad, maps = score(sess, bundle, bad_paths)
    old = legacy_maps(bundle, bad_paths)
    cam_stride = int(bundle.manifest.method.options.get("cam_stride", 32))
    detected = bad > thr
    cols: dict[str, list] = {"peak": [], "cell": [], "legacy": []}
    for i, p in enumerate(bad_paths):
        mask = mask_of(p)
        ok = mask is not None
        cols["peak"].append(peak_in_mask(maps[i], mask) if ok else None)
        cols["cell"].append(peak_cell_in_mask(maps[i], mask, cam_stride) if ok else None)
        cols["legacy"].append(peak_in_mask(old[i], mask) if ok else None)

    def rate(hits: list, only_detected: bool) -> float | None:
        v = [h for h, d in zip(hits, detected) if h is not None and (d or not only_detected)]
        return round(float(np.mean(v)), 4) if v else None

    row = {"ng_recall": round(float(detected.mean()), 4), "ng_found": int(detected.sum()), "n_bad": len(bad),
           "false_rejects": int((good > thr).sum()), "n_good": len(good),
           "auroc": round(float(roc_auc(good, bad)), 4)}
    for key, name in (("peak", "cam_peak_in_mask"), ("cell", "peak_cam_cell_overlaps_mask"),
                      ("legacy", "cam_peak_in_mask_before_map_fixes")):
        row[name + "_detected"] = rate(cols[key], True)
        row[name + "_all"] = rate(cols[key], False)
        row[name + "_n_detected_with_mask"] = sum(1 for h, d in zip(cols[key], detected) if h is not None and d)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--placements", default="A,B,C")
    ap.add_argument("--defects", type=int, default=56)
    ap.add_argument("--image-size", default="256")
    ap.add_argument("--equal-steps", type=int, default=0, metavar="N",
                    help="the earlier study: A trains N passes, B and C N // 2 with pastes=1 (the same "
                         "gradient steps); default 0: every placement at the product's defaults")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shift-seed", type=int, default=1301, help="the shifted test set's draws (declared)")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="a further classifier option for every placement (e.g. cam-stride=16)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import onnxruntime as ort

    args.out.mkdir(parents=True, exist_ok=True)
    dirs, bad_dir, train_bad, test_bad, test_good = few_defect_split(args.out, args.defects, args.seed)
    print(f"split: {len(train_bad)} defects to train "
          f"({', '.join(f'{c}: {sum(p.name.startswith(c) for p in train_bad)}' for c in MTD_DEFECTS)}), "
          f"{len(test_bad)} defects + {len(test_good)} good to test", file=sys.stderr)
    rows = []
    for placement in [p.strip().upper() for p in args.placements.split(",") if p.strip()]:
        if args.equal_steps:
            epochs = args.equal_steps if placement == "A" else max(1, args.equal_steps // 2)
            study = ["--option", f"epochs={epochs}", "--option", "pastes=1"]
        else:
            epochs, study = None, []  # the product's own (ClassifierOptions)
        out = args.out / f"bundle-{placement}"
        t0 = time.monotonic()
        code = inspectd_main(["train", "--method", "classifier", "--good", str(dirs["train_good"]),
                              "--bad", str(bad_dir), "--out", str(out), "--image-size", args.image_size, "--seed", str(args.seed), "--force",
                              "--option", f"placement={placement}", *study,
                              *[a for o in args.option for a in ("--option", o)]])
        if code != 0:
            raise SystemExit(f"training {placement} failed ({code})")
        train_s = time.monotonic() - t0
        bundle = load_bundle(out)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        sess = ort.InferenceSession(str(bundle.model_path), opts, providers=["CPUExecutionProvider"])
        thr = float(bundle.manifest.score.good_quantiles["0.99"])

        def original_mask(p: Path, spec=bundle.input_spec):
            mp = dirs["masks"] / (p.stem + ".png")
            raw = cv2.imread(str(mp), cv2.IMREAD_GRAYSCALE) if mp.exists() else None
            src = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)
            return None if raw is None or src is None else prepare_mask(raw, spec, src.shape[:2])

        t1 = time.monotonic()
        original = evaluate(sess, bundle, thr, test_good, test_bad, original_mask)
        s_good, s_bad, s_masks = build_shifted(args.out / f"shifted-{args.shift_seed}", bundle.input_spec,
                                               test_good, test_bad, dirs["masks"], args.shift_seed)

        def shifted_mask(p: Path):
            m = cv2.imread(str(s_masks / p.name), cv2.IMREAD_GRAYSCALE)
            return None if m is None else m > 127

        shifted = evaluate(sess, bundle, thr, s_good, s_bad, shifted_mask)
        row = {"placement": placement, "epochs": epochs or bundle.manifest.method.options.get("epochs"),
               "pastes": bundle.manifest.method.options.get("pastes"),
               "equal_steps": args.equal_steps, "train_s": round(train_s, 1),
               "eval_s": round(time.monotonic() - t1, 1),
               "threshold_p99_holdout_good": round(thr, 4),
               "original": original, "shifted": shifted,
               "train_accuracy_last_epoch": bundle.manifest.method.details.get("train_accuracy_last_epoch")}
        rows.append(row)
        print(json.dumps(row), flush=True)
    name = "results-" + "".join(r["placement"] for r in rows) + ".json"
    (args.out / name).write_text(json.dumps({"rows": rows, "defects": args.defects, "seed": args.seed,
                                             "options": args.option, "equal_steps": args.equal_steps,
                                             "shift_seed": args.shift_seed, "image_size": args.image_size,
                                             "host": platform.node()}, indent=2))


if __name__ == "__main__":
    main()
