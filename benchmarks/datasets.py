"""The benchmark datasets as prepared images, split as `inspectd train` splits its folder.

mtd: ../shared/datasets/mtd (train on split_train_good.txt; test = other good + all defective).
ksdd: ../shared/datasets/ksdd (train on split_train_good.txt; test = other good + all bad).
`holdout` is the 10 % of the training files `inspectd train` keeps out of flow training (same
seed-0 permutation), so benchmark models and baselines learn from exactly the product's images.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inspectd.engines.preprocess import InputSpec, list_images, load_prepared

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
MTD_DEFECTS = ("MT_Blowhole", "MT_Break", "MT_Crack", "MT_Fray", "MT_Uneven")


@dataclass
class Split:
    train: list[np.ndarray]
    holdout: list[np.ndarray]
    test_good: list[np.ndarray]
    test_bad: list[np.ndarray]
    test_bad_paths: list[Path]
    masks: list[Path | None]


def split_folders(dataset: str, work: Path, root: Path | None = None) -> dict[str, Path]:
    """work/{train_good,test_good,test_bad,masks} as symlinks: the folders the CLI is given."""
    root = Path(root) if root is not None else SHARED / dataset
    names = {n.strip() for n in (root / "split_train_good.txt").read_text().split() if n.strip()}
    dirs = {k: work / k for k in ("train_good", "test_good", "test_bad", "masks")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)

    def link(src: Path, dst: Path) -> None:
        if not dst.exists():
            os.symlink(src.resolve(), dst)

    if dataset == "mtd":
        for jpg in sorted((root / "MT_Free" / "Imgs").glob("*.jpg")):
            link(jpg, dirs["train_good" if jpg.name in names else "test_good"] / jpg.name)
        for cls in MTD_DEFECTS:
            for jpg in sorted((root / cls / "Imgs").glob("*.jpg")):
                name = f"{cls}__{jpg.name}"
                link(jpg, dirs["test_bad"] / name)
                if jpg.with_suffix(".png").exists():
                    link(jpg.with_suffix(".png"), dirs["masks"] / (Path(name).stem + ".png"))
    else:
        for jpg in sorted((root / "good").glob("*.jpg")):
            link(jpg, dirs["train_good" if jpg.name in names else "test_good"] / jpg.name)
        for jpg in sorted((root / "bad").glob("*.jpg")):
            link(jpg, dirs["test_bad"] / jpg.name)
            mask = root / "masks" / (jpg.stem + ".png")
            if mask.exists():
                link(mask, dirs["masks"] / mask.name)
    if len(list(dirs["train_good"].iterdir())) != len(names):
        raise SystemExit(f"{dataset}: split lists {len(names)} training files, found "
                         f"{len(list(dirs['train_good'].iterdir()))}")
    return dirs


def load_split(dataset: str, size: tuple[int, int], work: Path | None = None, seed: int = 0,
               holdout_fraction: float = 0.1) -> Split:
    dirs = split_folders(dataset, work or Path(f"/tmp/bench-split-{dataset}"))
    spec = InputSpec(size[0], size[1], "gray")
    train = [load_prepared(p, spec) for p in list_images(dirs["train_good"])]
    order = np.random.default_rng(seed).permutation(len(train))
    n_hold = max(2, int(round(len(train) * holdout_fraction)))
    hold = sorted(order[:n_hold])
    keep = sorted(order[n_hold:])
    bad_paths = list_images(dirs["test_bad"])
    return Split(train=[train[i] for i in keep], holdout=[train[i] for i in hold],
                 test_good=[load_prepared(p, spec) for p in list_images(dirs["test_good"])],
                 test_bad=[load_prepared(p, spec) for p in bad_paths], test_bad_paths=bad_paths,
                 masks=[(dirs["masks"] / (p.stem + ".png")) if (dirs["masks"] / (p.stem + ".png")).exists()
                        else None for p in bad_paths])
