"""Heatmap overlays for people: eval reports, the NG archive, the demo."""

from __future__ import annotations

import cv2
import numpy as np


def overlay(image: np.ndarray, heat_u8: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a uint8 heatmap (fixed display range, see Bundle.heatmap_u8) over an image.

    `image` is H x W, H x W x 1 or H x W x 3 RGB; returns H x W x 3 BGR ready for cv2.imwrite.
    """
    if image.ndim == 3 and image.shape[2] == 3:
        bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    else:
        bgr = cv2.cvtColor(image.reshape(image.shape[:2]), cv2.COLOR_GRAY2BGR)
    heat = cv2.resize(heat_u8, (bgr.shape[1], bgr.shape[0]), interpolation=cv2.INTER_LINEAR)
    colour = cv2.applyColorMap(heat, cv2.COLORMAP_JET)
    # Only where the map is hot, so OK regions keep their look.
    weight = (alpha * (heat.astype(np.float32) / 255.0))[:, :, None]
    return (bgr * (1 - weight) + colour * weight).astype(np.uint8)
