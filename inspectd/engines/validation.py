"""Label-free validation: held-out good images plus synthetic defects made from them.

Training picks data-dependent settings (resolution, reduction, epochs ...) by how well a candidate
separates held-out good images from synthetic defects painted onto copies of those same images.
No real defect and no test image is ever read: everything here derives from the training folder.

Defect kinds (each at a random place, size and strength):
  cutpaste  a patch of the image pasted elsewhere in it (CutPaste, area 2-15 %, aspect 0.3-3.3)
  scar      a thin rotated strip of another part of the image (CutPaste-scar)
  blob      an ellipse of darkened or brightened, noisy intensity (pits, stains)
  blur      a local Gaussian blur spot (dust, out-of-focus debris)
  crack     a thin dark polyline (cracks, scratches)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

KINDS = ("cutpaste", "scar", "blob", "blur", "crack")


@dataclass(frozen=True)
class ValidationSet:
    good: list[np.ndarray]
    bad: list[np.ndarray]
    kinds: list[str]


def _cutpaste(img: np.ndarray, rng: np.random.Generator, scar: bool) -> np.ndarray:
    h, w = img.shape[:2]
    if scar:
        ph, pw = int(rng.uniform(0.01, 0.03) * h) + 2, int(rng.uniform(0.1, 0.25) * w) + 4
    else:
        area = rng.uniform(0.02, 0.15) * h * w
        aspect = rng.choice([rng.uniform(0.3, 1.0), rng.uniform(1.0, 3.3)])
        ph = int(np.clip(np.sqrt(area * aspect), 4, h - 2))
        pw = int(np.clip(np.sqrt(area / aspect), 4, w - 2))
    ph, pw = min(ph, h - 2), min(pw, w - 2)
    sy, sx = rng.integers(0, h - ph), rng.integers(0, w - pw)
    patch = img[sy:sy + ph, sx:sx + pw].astype(np.float32)
    # Jitter the patch's brightness a little so it is not an exact copy of its source.
    patch = np.clip(patch * rng.uniform(0.85, 1.15) + rng.uniform(-12, 12), 0, 255)
    mask = np.full((ph, pw), 255, np.uint8)
    if scar:
        # Rotate the strip inside a canvas large enough for any angle.
        d = int(np.ceil(np.hypot(ph, pw))) + 2
        canvas = np.zeros((d, d) + img.shape[2:], np.float32)
        mcanvas = np.zeros((d, d), np.uint8)
        oy, ox = (d - ph) // 2, (d - pw) // 2
        canvas[oy:oy + ph, ox:ox + pw] = patch
        mcanvas[oy:oy + ph, ox:ox + pw] = 255
        m = cv2.getRotationMatrix2D((d / 2, d / 2), rng.uniform(-60, 60), 1.0)
        patch = cv2.warpAffine(canvas, m, (d, d), flags=cv2.INTER_LINEAR).reshape(canvas.shape)
        mask = cv2.warpAffine(mcanvas, m, (d, d), flags=cv2.INTER_NEAREST)
        ph = pw = d
        if d >= min(h, w) - 1:
            return img
    ty, tx = rng.integers(0, h - ph), rng.integers(0, w - pw)
    out = img.astype(np.float32)
    region = out[ty:ty + ph, tx:tx + pw]
    sel = mask > 0
    region[sel] = patch[sel]
    return np.clip(out, 0, 255).astype(np.uint8)


def _ellipse_mask(h: int, w: int, rng: np.random.Generator, lo: float, hi: float) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    r = min(h, w)
    axes = (int(rng.uniform(lo, hi) * r) + 1, int(rng.uniform(lo, hi) * r) + 1)
    centre = (int(rng.integers(axes[0], max(axes[0] + 1, w - axes[0]))),
              int(rng.integers(axes[1], max(axes[1] + 1, h - axes[1]))))
    cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 255, -1)
    return mask


def _soft_blend(img: np.ndarray, other: np.ndarray, mask: np.ndarray) -> np.ndarray:
    alpha = cv2.GaussianBlur(mask.astype(np.float32) / 255.0, (0, 0), 1.0)
    alpha = alpha.reshape(alpha.shape + (1,) * (img.ndim - 2))
    return np.clip(img.astype(np.float32) * (1 - alpha) + other * alpha, 0, 255).astype(np.uint8)


def _blob(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape[:2]
    mask = _ellipse_mask(h, w, rng, 0.015, 0.06)
    shift = rng.choice([-1.0, 1.0]) * rng.uniform(25, 70)
    noise = rng.normal(0, rng.uniform(3, 15), img.shape).astype(np.float32)
    return _soft_blend(img, img.astype(np.float32) + shift + noise, mask)


def _blur(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape[:2]
    mask = _ellipse_mask(h, w, rng, 0.03, 0.1)
    blurred = cv2.GaussianBlur(img, (0, 0), rng.uniform(2.0, 5.0)).reshape(img.shape).astype(np.float32)
    return _soft_blend(img, blurred, mask)


def _crack(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape[:2]
    mask = np.zeros((h, w), np.uint8)
    p = np.array([rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h])
    angle = rng.uniform(0, 2 * np.pi)
    length = rng.uniform(0.1, 0.35) * min(h, w)
    pts = [p.copy()]
    for _ in range(6):
        angle += rng.normal(0, 0.4)
        p = p + length / 6 * np.array([np.cos(angle), np.sin(angle)])
        pts.append(p.copy())
    cv2.polylines(mask, [np.array(pts, np.int32)], False, 255, thickness=max(1, int(round(min(h, w) / 200))))
    dark = img.astype(np.float32) * rng.uniform(0.2, 0.6)
    return _soft_blend(img, dark, mask)


def synthesize(img: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """One synthetic defect of `kind` on a copy of `img` (H x W x C uint8)."""
    if kind == "cutpaste":
        return _cutpaste(img, rng, scar=False)
    if kind == "scar":
        return _cutpaste(img, rng, scar=True)
    if kind == "blob":
        return _blob(img, rng)
    if kind == "blur":
        return _blur(img, rng)
    if kind == "crack":
        return _crack(img, rng)
    raise ValueError(f"unknown synthetic defect {kind!r} (choose from {', '.join(KINDS)})")


def make_validation_set(good: Sequence[np.ndarray], seed: int, per_image: int = 2) -> ValidationSet:
    """Held-out good images and `per_image` synthetic defects on each, kinds in turn."""
    rng = np.random.default_rng(seed + 7919)
    bad, kinds = [], []
    k = 0
    for img in good:
        for _ in range(per_image):
            kind = KINDS[k % len(KINDS)]
            k += 1
            bad.append(synthesize(img, kind, rng))
            kinds.append(kind)
    return ValidationSet(list(good), bad, kinds)
