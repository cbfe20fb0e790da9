"""Method classifier (paper 001) on MTD with a declared few-defect split, placements A, B and C.

    python benchmarks/classifier.py --out /tmp/bench/classifier-mtd

Split (declared, seed 0): 56 defective images to train, drawn across the five defect classes in
proportion to their sizes (largest remainder), the rest of the defective images to test; good
images as for every MTD benchmark (split_train_good.txt to train, of which `inspectd train` holds
10 % out; the other good images to test). Each placement is `inspectd train --method classifier
--bad <the 56>` with the same number of gradient steps: A trains `--epochs-a` passes over the good
set; B and C (one pasted copy per image, `pastes=1`, so a set twice as large) half as many. Generated
textures are the backgrounds (MTD has no background folder).

Reported per placement, scored through ONNX Runtime (the deployed graph):
  - threshold: the 99th percentile of the held-out good images' scores (manifest good_quantiles)
  - NG recall at that threshold (test defects), false rejects (test good images above it)
  - image AUROC
  - CAM peak in mask: how often the activation map's maximum falls inside the defect mask
    (its map cell overlaps the mask), over detected defects and over all test defects.
Not done here: the shifted / cluttered copy of the test set on unseen backgrounds (issue 13).
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
from inspectd.engines.bundle import load_bundle  # noqa: E402
from inspectd.engines.fitting import batches  # noqa: E402
from inspectd.engines.preprocess import list_images, load_prepared, prepare_mask  # noqa: E402
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--placements", default="A,B,C")
    ap.add_argument("--defects", type=int, default=56)
    ap.add_argument("--image-size", default="256")
    ap.add_argument("--epochs-a", type=int, default=4, help="passes for A; B and C get half (same steps)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    import onnxruntime as ort

    args.out.mkdir(parents=True, exist_ok=True)
    dirs = split_folders("mtd", args.out / "split")
    bad_paths = list_images(dirs["test_bad"])
    train_bad = draw_defects(bad_paths, args.defects, args.seed)
    bad_dir = args.out / "train_bad"
    bad_dir.mkdir(exist_ok=True)
    for p in train_bad:
        if not (bad_dir / p.name).exists():
            (bad_dir / p.name).symlink_to(p.resolve())
    chosen = {p.name for p in train_bad}
    test_bad = [p for p in bad_paths if p.name not in chosen]
    test_good = list_images(dirs["test_good"])
    print(f"split: {len(train_bad)} defects to train "
          f"({', '.join(f'{c}: {sum(p.name.startswith(c) for p in train_bad)}' for c in MTD_DEFECTS)}), "
          f"{len(test_bad)} defects + {len(test_good)} good to test", file=sys.stderr)
    rows = []
    for placement in [p.strip().upper() for p in args.placements.split(",") if p.strip()]:
        epochs = args.epochs_a if placement == "A" else max(1, args.epochs_a // 2)
        out = args.out / f"bundle-{placement}"
        t0 = time.monotonic()
        code = inspectd_main(["train", "--method", "classifier", "--good", str(dirs["train_good"]),
                              "--bad", str(bad_dir), "--out", str(out), "--image-size", args.image_size, "--seed", str(args.seed), "--force",
                              "--option", f"placement={placement}", "--option", f"epochs={epochs}",
                              "--option", "pastes=1"])
        if code != 0:
            raise SystemExit(f"training {placement} failed ({code})")
        train_s = time.monotonic() - t0
        bundle = load_bundle(out)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        sess = ort.InferenceSession(str(bundle.model_path), opts, providers=["CPUExecutionProvider"])
        good, _ = score(sess, bundle, test_good)
        bad, maps = score(sess, bundle, test_bad)
        thr = bundle.manifest.score.good_quantiles["0.99"]
        detected = bad > thr
        hits = []
        for i, p in enumerate(test_bad):
            mp = dirs["masks"] / (p.stem + ".png")
            raw = cv2.imread(str(mp), cv2.IMREAD_GRAYSCALE) if mp.exists() else None
            src = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)
            if raw is None or src is None:
                hits.append(None)
                continue
            hits.append(peak_in_mask(maps[i], prepare_mask(raw, bundle.input_spec, src.shape[:2])))
        det_hits = [h for h, d in zip(hits, detected) if d and h is not None]
        all_hits = [h for h in hits if h is not None]
        row = {"placement": placement, "epochs": epochs, "train_s": round(train_s, 1),
               "threshold_p99_holdout_good": round(float(thr), 4),
               "ng_recall": round(float(detected.mean()), 4), "ng_found": int(detected.sum()), "n_bad": len(bad),
               "false_rejects": int((good > thr).sum()), "n_good": len(good),
               "auroc": round(float(roc_auc(good, bad)), 4),
               "cam_peak_in_mask_detected": round(float(np.mean(det_hits)), 4) if det_hits else None,
               "cam_peak_in_mask_all": round(float(np.mean(all_hits)), 4) if all_hits else None,
               "train_accuracy_last_epoch": bundle.manifest.method.details.get("train_accuracy_last_epoch")}
        rows.append(row)
        print(json.dumps(row), flush=True)
    (args.out / "results.json").write_text(json.dumps({"rows": rows, "defects": args.defects, "seed": args.seed,
                                                       "image_size": args.image_size, "host": platform.node()},
                                                      indent=2))


if __name__ == "__main__":
    main()
