"""The standard MTD split as folders of symlinks (good-only training set, test good/bad, masks).

Protocol (../shared/datasets/mtd/README.md): train on the 761 good files in split_train_good.txt;
test on the other 191 good files and all 392 defective files; masks are the .png next to each .jpg.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFECT_CLASSES = ("MT_Blowhole", "MT_Break", "MT_Crack", "MT_Fray", "MT_Uneven")
DEFAULT_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "mtd"


def prepare_split(root: Path, work: Path) -> dict[str, Path]:
    """Create work/{train_good,test_good,test_bad,masks} (symlinks) and return the folders."""
    root = Path(root)
    if not (root / "split_train_good.txt").is_file():
        raise SystemExit(f"MTD not found at {root} (expected split_train_good.txt)")
    names = {n.strip() for n in (root / "split_train_good.txt").read_text().split() if n.strip()}
    dirs = {k: work / k for k in ("train_good", "test_good", "test_bad", "masks")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)

    def link(src: Path, dst: Path) -> None:
        if not dst.exists():
            os.symlink(src.resolve(), dst)

    for jpg in sorted((root / "MT_Free" / "Imgs").glob("*.jpg")):
        link(jpg, dirs["train_good" if jpg.name in names else "test_good"] / jpg.name)
    for cls in DEFECT_CLASSES:
        for jpg in sorted((root / cls / "Imgs").glob("*.jpg")):
            name = f"{cls}__{jpg.name}"
            link(jpg, dirs["test_bad"] / name)
            mask = jpg.with_suffix(".png")
            if mask.exists():
                link(mask, dirs["masks"] / (Path(name).stem + ".png"))
    counts = {k: len(list(d.iterdir())) for k, d in dirs.items()}
    if counts["train_good"] != len(names):
        raise SystemExit(f"split lists {len(names)} training files, found {counts['train_good']}")
    return dirs
