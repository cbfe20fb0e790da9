"""Method cutpaste-ae on one dataset: trained once with its defaults, scored with each score rule.

    python benchmarks/cutpaste_ae.py --dataset mtd --out /tmp/bench/cutpaste-ae-mtd
    python benchmarks/cutpaste_ae.py --dataset ksdd --out /tmp/bench/cutpaste-ae-ksdd

Training is `inspectd train --method cutpaste-ae` with no other flag (input size resolved as the
CLI does: short side 256, the images' aspect kept). The bundle's engine is then rebuilt in PyTorch
(build_from_bundle) and the test split scored once; the three rules (cutpaste alone, ae alone,
combined) come from the same forward pass (the engine's `components`: the standardised scores and
maps of both parts), so switching the rule needs no retraining. The combined rule is also scored
through ONNX Runtime by `inspectd eval`'s code (the deployed path) as a cross-check.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import load_masks, mask_paths, pixel_auroc  # noqa: E402
from datasets import split_folders  # noqa: E402

from inspectd.cli import main as inspectd_main  # noqa: E402
from inspectd.engines.bundle import load_bundle  # noqa: E402
from inspectd.engines.evaluate import evaluate  # noqa: E402
from inspectd.engines.fitting import batches  # noqa: E402
from inspectd.engines.model import build_from_bundle  # noqa: E402
from inspectd.engines.preprocess import list_images, load_prepared  # noqa: E402
from inspectd.progress import Progress  # noqa: E402
from inspectd.stats import roc_auc  # noqa: E402

RULES = ("cutpaste", "ae", "combined", "equal-sum")


@torch.no_grad()
def score_rules(model: torch.nn.Module, paths: list[Path], spec, weights: dict[str, float], batch: int = 8
                ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """rule -> (image scores, maps) for the images at `paths`, one forward pass per batch. combined =
    the engine's (validation-weighted) sum; equal-sum = the plain sum of the two z-scores (the
    weights, recorded in the manifest, divided back out)."""
    parts: dict[str, list[list[np.ndarray]]] = {r: [[], []] for r in RULES}
    bar = Progress(len(paths), "score")
    for sl in batches(len(paths), batch):
        imgs = torch.from_numpy(np.stack([load_prepared(p, spec) for p in paths[sl]]))
        c = model.components(imgs, "combined")
        rules = {"cutpaste": (c["cutpaste"], c["cutpaste_map"]), "ae": (c["ae"], c["ae_map"]),
                 "combined": (c["cutpaste"] + c["ae"], 0.5 * (c["cutpaste_map"] + c["ae_map"])),
                 "equal-sum": (c["cutpaste"] / weights["cutpaste"] + c["ae"] / weights["ae"],
                               0.5 * (c["cutpaste_map"] + c["ae_map"]))}
        for r, (s, m) in rules.items():
            parts[r][0].append(s.numpy())
            parts[r][1].append(m.numpy())
        bar.update(sl.stop - sl.start)
    bar.close()
    return {r: (np.concatenate(s), np.concatenate(m)) for r, (s, m) in parts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=["mtd", "ksdd"], required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--train-args", default="", help="extra `inspectd train` flags (default: none)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for scoring (default 1: fastest on the shared 2-core CPU)")
    args = ap.parse_args()
    out = Path(args.out)
    dirs = split_folders(args.dataset, out / "split")
    t0 = time.monotonic()
    code = inspectd_main(["train", "--method", "cutpaste-ae", "--good", str(dirs["train_good"]),
                          "--out", str(out / "bundle"), "--force", *args.train_args.split()])
    if code:
        raise SystemExit(f"inspectd train failed ({code})")
    train_s = time.monotonic() - t0
    bundle = load_bundle(out / "bundle")
    m = bundle.manifest
    spec = bundle.input_spec

    torch.set_num_threads(args.threads)
    model = build_from_bundle(bundle)
    good_paths, bad_paths = list_images(dirs["test_good"]), list_images(dirs["test_bad"])
    t1 = time.monotonic()
    weights = m.method.details["combination_weights"]
    scored = score_rules(model, good_paths + bad_paths, spec, weights)
    score_s = time.monotonic() - t1
    labels = np.array([0] * len(good_paths) + [1] * len(bad_paths))
    masks = load_masks(mask_paths(bad_paths, dirs["masks"]), spec)
    rows = []
    for r in RULES:
        scores, maps = scored[r]
        rows.append({"rule": r, "image_auroc": roc_auc(scores[labels == 0], scores[labels == 1]),
                     "pixel_auroc": pixel_auroc(maps, masks, len(good_paths), (spec.height, spec.width)),
                     "path": "PyTorch (build_from_bundle), rule switched on the loaded engine"})
    report = evaluate(out / "bundle", dirs["test_good"], dirs["test_bad"], out / "eval", masks_dir=dirs["masks"])
    rows.append({"rule": f"{m.method.options['score']} (bundle default)", "image_auroc": report["image_auroc"],
                 "pixel_auroc": report.get("pixel_auroc"), "path": "ONNX Runtime (inspectd eval)"})
    summary = {"dataset": args.dataset, "method": "cutpaste-ae", "options": m.method.options,
               "machine": f"{platform.node()} {platform.machine()}, {args.threads} torch threads for scoring",
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "input": [m.input.height, m.input.width], "train_s": round(train_s, 1),
               "score_s": round(score_s, 1), "n_train": m.training.n_train, "n_holdout": m.training.n_holdout,
               "n_test_good": len(good_paths), "n_test_bad": len(bad_paths),
               "validation": m.method.details.get("validation"), "combination_weights": weights,
               "standardisation": m.method.details.get("standardisation"), "rows": rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"\ncutpaste-ae on {args.dataset} at {m.input.height}x{m.input.width}, trained once in {train_s:.0f} s")
    print("\n| score rule | image AUROC | pixel AUROC | path |\n|---|---|---|---|")
    for r in rows:
        px = f"{r['pixel_auroc']:.4f}" if r["pixel_auroc"] is not None else "-"
        print(f"| {r['rule']} | {r['image_auroc']:.4f} | {px} | {r['path']} |")


if __name__ == "__main__":
    main()
