"""The classifier with 25 real defects vs 25 real + 200 synthesized ones (`inspectd synthesize`), MTD.

    OMP_NUM_THREADS=1 python benchmarks/synthesis.py --out /tmp/bench/synthesis-mtd

Declared before running (seed 0):
  - split: 25 defective images to train, drawn across the five defect classes in proportion to their
    sizes (benchmarks/classifier.py draw_defects: Blowhole 7, Break 5, Crack 4, Fray 2, Uneven 7 by
    largest remainder), the other 367 defective images + the 191 standard good test images to test;
    good training images as in every MTD benchmark (split_train_good.txt, of which `inspectd train`
    holds 10 % out for its threshold).
  - arm (a): `inspectd train --method classifier --bad <the 25>`;
    arm (b): the same with `--bad <the 25 + 200 synthesized>` (`inspectd synthesize --count 200
    --seed 0 --include-real`, product defaults otherwise: placed anywhere, MTD is tightly cropped).
    Destinations of the synthesized defects: only the good images the classifier trains on (never its
    held-out ones, never a test image).
  - training: product defaults (placement C, pastes 2, flips, 8 epochs, Adam 1e-4 / 1e-3, batch 8);
    `--epochs N` overrides the epochs (the earlier runs of RESULTS.md §16 used 4, to fit a 40-minute
    budget on one thread).
    The number of gradient steps is the same in both arms by construction: an epoch is one pass over
    the (augmented) good set in class-balanced batches, so it does not depend on the number of
    defects: ceil(685 x 3 / 4) = 514 steps per epoch, 4112 in all at 8 epochs. Arm (b) draws the
    defective half of each batch from a larger pool.
  - test: scored through ONNX Runtime (the deployed graph). Reported for each arm:
      NG recall and false rejects at the calibrated threshold (99th percentile of the held-out good
      images' scores, the manifest's good_quantiles, as benchmarks/classifier.py);
      NG recall at the same false-reject rate for both arms, with the threshold set on the test good
      images: at most 1 %, 2 % (primary) and 5 % of the 191 rejected (1, 3, 9 images);
      image AUROC; per-class recall at the primary operating point.
    The target (issue 13): (b) finds more test defects than (a) at the same false-reject rate
    (primary: 2 %). Paired: defects found by (b) only and by (a) only, exact two-sided McNemar p.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from classifier import few_defect_split, link_all, score  # noqa: E402
from datasets import MTD_DEFECTS  # noqa: E402

from inspectd.cli import main as inspectd_main  # noqa: E402
from inspectd.engines.bundle import load_bundle  # noqa: E402
from inspectd.engines.preprocess import list_images  # noqa: E402
from inspectd.engines.train import TrainConfig, holdout_split  # noqa: E402
from inspectd.stats import roc_auc  # noqa: E402

FRR_LEVELS = (0.01, 0.02, 0.05)
PRIMARY = 0.02


def threshold_at_frr(good: np.ndarray, frr: float) -> tuple[float, int]:
    """The lowest threshold (a test good score) with at most floor(frr * n) good scores above it."""
    k = int(math.floor(frr * len(good)))
    return float(np.sort(good)[::-1][k]), k


def mcnemar_p(b: int, c: int) -> float:
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(0, min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--defects", type=int, default=25)
    ap.add_argument("--count", type=int, default=200, help="synthesized defects (arm b)")
    ap.add_argument("--epochs", type=int, default=0, help="0: the product's default")
    ap.add_argument("--image-size", default="256")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arms", default="a,b")
    ap.add_argument("--reuse", action="store_true",
                    help="score an arm's bundle already in --out instead of training it again (training is "
                         "deterministic; its training time is then the manifest's)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import onnxruntime as ort

    args.out.mkdir(parents=True, exist_ok=True)
    dirs, real_dir, train_bad, test_bad, test_good = few_defect_split(args.out, args.defects, args.seed)
    # The good images the classifier trains on (the rest are the ones `inspectd train` holds out).
    good_paths = list_images(dirs["train_good"])
    hold_idx, _ = holdout_split(len(good_paths), np.random.default_rng(args.seed), TrainConfig(seed=args.seed))
    held = {good_paths[i].name for i in hold_idx}
    dest_dir = link_all([p for p in good_paths if p.name not in held], args.out / "synth_good")
    per_class = {c: sum(p.name.startswith(c + "__") for p in train_bad) for c in MTD_DEFECTS}
    print(f"split: {len(train_bad)} defects to train ({per_class}), {len(test_bad)} defects + {len(test_good)} "
          f"good to test; synthesis destinations: {len(good_paths) - len(held)} trained good images", file=sys.stderr)

    syn_dir = args.out / "train_bad_synth"
    t0 = time.monotonic()
    code = inspectd_main(["synthesize", "--good", str(dest_dir), "--bad", str(real_dir), "--masks", str(dirs["masks"]),
                          "--out", str(syn_dir), "--count", str(args.count), "--seed", str(args.seed),
                          "--include-real", "--force"])
    if code != 0:
        raise SystemExit(f"synthesize failed ({code})")
    synth_s = time.monotonic() - t0

    arms = {"a": real_dir, "b": syn_dir}
    results: dict[str, dict] = {}
    scores: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for arm in [a.strip() for a in args.arms.split(",") if a.strip()]:
        out = args.out / f"bundle-{arm}"
        t0 = time.monotonic()
        reused = args.reuse and (out / "manifest.json").is_file()
        if not reused:
            code = inspectd_main(["train", "--method", "classifier", "--good", str(dirs["train_good"]),
                                  "--bad", str(arms[arm]), "--out", str(out), "--image-size", args.image_size,
                                  "--seed", str(args.seed), "--force",
                                  *(["--epochs", str(args.epochs)] if args.epochs else [])])
            if code != 0:
                raise SystemExit(f"training arm {arm} failed ({code})")
        bundle = load_bundle(out)
        train_s = float(bundle.manifest.training.seconds) if reused else time.monotonic() - t0
        if set(bundle.manifest.training.holdout_names) != held:
            raise SystemExit("the bundle's held-out good images differ from the ones kept out of synthesis")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        sess = ort.InferenceSession(str(bundle.model_path), opts, providers=["CPUExecutionProvider"])
        good, _ = score(sess, bundle, test_good)
        bad, _ = score(sess, bundle, test_bad)
        scores[arm] = (good, bad)
        thr = float(bundle.manifest.score.good_quantiles["0.99"])
        details = bundle.manifest.method.details
        row = {"arm": arm, "n_train_defects": len(list_images(arms[arm])), "epochs": args.epochs or bundle.manifest.method.options.get("epochs"),
               "train_s": round(train_s, 1),
               "training_set": details.get("training_set"),
               "train_accuracy_last_epoch": details.get("train_accuracy_last_epoch"),
               "calibrated": {"threshold_p99_holdout_good": round(thr, 4),
                              "ng_recall": round(float((bad > thr).mean()), 4), "ng_found": int((bad > thr).sum()),
                              "false_rejects": int((good > thr).sum())},
               "n_bad": len(bad), "n_good": len(good), "auroc": round(float(roc_auc(good, bad)), 4)}
        for frr in FRR_LEVELS:
            t, k = threshold_at_frr(good, frr)
            row[f"frr_{frr:g}"] = {"max_false_rejects": k, "false_rejects": int((good > t).sum()),
                                   "ng_recall": round(float((bad > t).mean()), 4), "ng_found": int((bad > t).sum())}
        t, _ = threshold_at_frr(good, PRIMARY)
        row["per_class_recall_primary"] = {c: f"{int(sum(b > t for b, p in zip(bad, test_bad) if p.name.startswith(c + '__')))}"
                                              f"/{sum(p.name.startswith(c + '__') for p in test_bad)}"
                                           for c in MTD_DEFECTS}
        results[arm] = row
        print(json.dumps(row), flush=True)
    paired = {}
    if {"a", "b"} <= set(scores):
        for frr in FRR_LEVELS:
            found = {}
            for arm in ("a", "b"):
                good, bad = scores[arm]
                found[arm] = bad > threshold_at_frr(good, frr)[0]
            only_b, only_a = int((found["b"] & ~found["a"]).sum()), int((found["a"] & ~found["b"]).sum())
            paired[f"frr_{frr:g}"] = {"found_by_b_only": only_b, "found_by_a_only": only_a,
                                      "mcnemar_p": float(f"{mcnemar_p(only_b, only_a):.2g}"),
                                      "b_beats_a": bool(found["b"].sum() > found["a"].sum())}
        print(json.dumps({"paired": paired}), flush=True)
    (args.out / "results.json").write_text(json.dumps(
        {"arms": results, "paired": paired, "defects": args.defects, "count": args.count, "seed": args.seed,
         "epochs": args.epochs, "image_size": args.image_size, "synthesize_s": round(synth_s, 1),
         "host": platform.node()}, indent=2))


if __name__ == "__main__":
    main()
