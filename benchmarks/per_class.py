"""Where a bundle's image AUROC is lost: per defect class, from an `inspectd eval` scores.csv.

    python benchmarks/per_class.py --scores /tmp/bench/mtd-ens/eval/scores.csv

The class is the defective file name's prefix before "__" (MTD: MT_Blowhole__..., as
benchmarks/datasets.py names the split). For each class: its AUROC against all good test images,
and how many of its images score at or below the highest / the 95th-percentile good score. Then
the good images that score highest (the false rejects any threshold must pass).
"""

from __future__ import annotations

import argparse
import collections
import csv
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from inspectd.stats import roc_auc  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scores", required=True, type=Path, help="scores.csv written by inspectd eval")
    ap.add_argument("--worst", type=int, default=6, help="how many of the highest-scoring good images to list")
    args = ap.parse_args()
    rows = list(csv.DictReader(args.scores.open(newline="")))
    good = sorted((float(r["raw_score"]), r["file"]) for r in rows if r["label"] == "good")
    g = np.array([s for s, _ in good])
    by_class: dict[str, list[float]] = collections.defaultdict(list)
    for r in rows:
        if r["label"] == "bad":
            by_class[r["file"].split("__")[0] if "__" in r["file"] else "all"].append(float(r["raw_score"]))
    p95 = float(np.quantile(g, 0.95))
    print("| class | images | AUROC vs all good | at or below the top good score | at or below the good p95 |")
    print("|---|---|---|---|---|")
    for name, values in sorted(by_class.items()):
        v = np.array(values)
        print(f"| {name} | {len(v)} | {roc_auc(g, v):.4f} | {int((v <= g[-1]).sum())} | {int((v <= p95).sum())} |")
    every = np.concatenate([np.array(v) for v in by_class.values()])
    print(f"| all | {len(every)} | {roc_auc(g, every):.4f} | {int((every <= g[-1]).sum())} | {int((every <= p95).sum())} |")
    print(f"\nhighest-scoring good images (of {len(g)}; good p95 {p95:.2f}):")
    for score, name in good[-args.worst:][::-1]:
        print(f"  {score:8.3f}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
