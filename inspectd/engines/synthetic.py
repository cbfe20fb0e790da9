"""Procedural textured parts with drawn defects: the self-contained dataset for tests and the demo.

A part is a rounded plate with a machined, noisy texture and a few holes, placed with small random
shifts, rotations and lighting changes (what a real line varies); a defective part adds a
scratch, a spot or a chip. Deterministic for a given seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

DEFECTS = ("scratch", "spot", "chip")


@dataclass(frozen=True)
class SyntheticSet:
    root: Path
    train_good: Path
    test_good: Path
    test_bad: Path
    masks: Path


def render_part(rng: np.random.Generator, size: int = 128, defect: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One grey part image (H x W uint8) and its defect mask (255 = defect)."""
    s = size
    # Background: dark conveyor with low-frequency variation.
    img = np.full((s, s), 40.0, np.float32)
    img += cv2.GaussianBlur(rng.normal(0, 6, (s, s)).astype(np.float32), (0, 0), s / 16)
    # Plate: a rotated rounded rectangle with a brushed texture.
    plate = np.zeros((s, s), np.uint8)
    cx, cy = s / 2 + rng.uniform(-2, 2) * s / 64, s / 2 + rng.uniform(-2, 2) * s / 64
    angle = rng.uniform(-6, 6)
    box = cv2.boxPoints(((cx, cy), (s * 0.72, s * 0.56), angle)).astype(np.int32)
    cv2.fillConvexPoly(plate, box, 255)
    plate = cv2.GaussianBlur(plate, (0, 0), s / 96) > 127
    brushed = cv2.GaussianBlur(rng.normal(0, 14, (s, s)).astype(np.float32), (0, 0), sigmaX=s / 20, sigmaY=0.6)
    brushed = _rotate(brushed, angle)
    base = 150 + rng.uniform(-10, 10)
    img[plate] = base + brushed[plate] + rng.normal(0, 3, int(plate.sum()))
    # Two mounting holes, which move with the plate.
    rad = np.deg2rad(angle)
    for sign in (-1, 1):
        hx = cx + sign * s * 0.24 * np.cos(rad)
        hy = cy + sign * s * 0.24 * np.sin(rad)
        cv2.circle(img, (int(round(hx)), int(round(hy))), max(2, s // 20), 30.0, -1, lineType=cv2.LINE_AA)
    img *= rng.uniform(0.92, 1.08)  # lighting
    mask = np.zeros((s, s), np.uint8)
    if defect is not None:
        _draw_defect(rng, img, mask, plate, defect, s)
    img += rng.normal(0, 2.0, (s, s))  # sensor noise
    return np.clip(img, 0, 255).astype(np.uint8), mask


def _draw_defect(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray, plate: np.ndarray,
                 kind: str, s: int) -> None:
    ys, xs = np.nonzero(plate)
    i = rng.integers(len(xs))
    x, y = int(xs[i]), int(ys[i])
    # Keep the defect well inside the plate.
    x = int(np.clip(x, s * 0.3, s * 0.7))
    y = int(np.clip(y, s * 0.35, s * 0.65))
    if kind == "scratch":
        length = rng.uniform(0.12, 0.3) * s
        theta = rng.uniform(0, np.pi)
        p1 = (int(x - length / 2 * np.cos(theta)), int(y - length / 2 * np.sin(theta)))
        p2 = (int(x + length / 2 * np.cos(theta)), int(y + length / 2 * np.sin(theta)))
        value = 235.0 if rng.random() < 0.5 else 70.0
        cv2.line(img, p1, p2, value, max(1, s // 64), lineType=cv2.LINE_AA)
        cv2.line(mask, p1, p2, 255, max(1, s // 64) + 1)
    elif kind == "spot":
        r = int(rng.uniform(0.03, 0.06) * s)
        value = 60.0 if rng.random() < 0.6 else 240.0
        cv2.circle(img, (x, y), r, value, -1, lineType=cv2.LINE_AA)
        cv2.circle(mask, (x, y), r, 255, -1)
    elif kind == "chip":
        # A bite out of the plate edge: background shows through.
        ex = int(xs[np.argmin(xs)]) if rng.random() < 0.5 else int(xs[np.argmax(xs)])
        ey = int(np.clip(y, s * 0.35, s * 0.65))
        r = int(rng.uniform(0.05, 0.08) * s)
        cv2.circle(img, (ex, ey), r, 40.0, -1, lineType=cv2.LINE_AA)
        cv2.circle(mask, (ex, ey), r, 255, -1)
        mask &= (plate * 255).astype(np.uint8)
    else:
        raise ValueError(f"unknown defect {kind!r}")


def _rotate(a: np.ndarray, angle: float) -> np.ndarray:
    h, w = a.shape
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    return cv2.warpAffine(a, m, (w, h), borderMode=cv2.BORDER_REFLECT)


def make_dataset(root: str | Path, n_train: int = 40, n_test_good: int = 12, n_test_bad: int = 12,
                 size: int = 128, seed: int = 0) -> SyntheticSet:
    """Write train_good/, test_good/, test_bad/ (+ masks/) PNGs under `root`; reuse them if complete."""
    root = Path(root)
    ds = SyntheticSet(root, root / "train_good", root / "test_good", root / "test_bad", root / "masks")
    marker = root / f".complete-{n_train}-{n_test_good}-{n_test_bad}-{size}-{seed}"
    if marker.exists():
        return ds
    rng = np.random.default_rng(seed)
    for d in (ds.train_good, ds.test_good, ds.test_bad, ds.masks):
        d.mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        cv2.imwrite(str(ds.train_good / f"good_{i:04d}.png"), render_part(rng, size)[0])
    for i in range(n_test_good):
        cv2.imwrite(str(ds.test_good / f"good_{i:04d}.png"), render_part(rng, size)[0])
    for i in range(n_test_bad):
        kind = DEFECTS[i % len(DEFECTS)]
        img, mask = render_part(rng, size, defect=kind)
        cv2.imwrite(str(ds.test_bad / f"{kind}_{i:04d}.png"), img)
        cv2.imwrite(str(ds.masks / f"{kind}_{i:04d}.png"), mask)
    marker.touch()
    return ds
