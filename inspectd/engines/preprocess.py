"""The one preprocessing path (decode -> colour conversion -> resize) shared by training,
evaluation, calibration and the daemon, so train and deploy cannot drift.

Everything after this (uint8 -> float, grey -> 3 channels, ImageNet normalisation) lives
inside the ONNX graph.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np

from inspectd.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".pgm", ".ppm", ".webp")
COLOR_MODES = ("gray", "rgb")
# Recorded in the manifest; changing it changes every score, so it is part of the bundle contract.
RESIZE_METHOD = "cv2.INTER_AREA"


@dataclass(frozen=True)
class InputSpec:
    """What the model's input tensor expects: N x height x width x channels, uint8."""

    height: int
    width: int
    color_mode: str  # "gray" (1 channel) or "rgb" (3 channels)

    @property
    def channels(self) -> int:
        return 1 if self.color_mode == "gray" else 3

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, self.channels)


def decode_image(data: bytes, color_mode: str, name: str = "<bytes>") -> np.ndarray:
    """Decode encoded image bytes to H x W x C uint8 in `color_mode` (RGB order, never BGR)."""
    if color_mode not in COLOR_MODES:
        raise DataError(f"unknown colour mode {color_mode!r} (expected one of {COLOR_MODES})")
    buf = np.frombuffer(data, dtype=np.uint8)
    flag = cv2.IMREAD_GRAYSCALE if color_mode == "gray" else cv2.IMREAD_COLOR
    image = cv2.imdecode(buf, flag) if buf.size else None
    if image is None:
        raise DataError(f"{name}: not a readable image")
    if color_mode == "rgb":
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return _as_hwc(image)


def read_image(path: str | os.PathLike, color_mode: str) -> np.ndarray:
    """Read an image file (any path, including non-ASCII) as H x W x C uint8 in `color_mode`."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return decode_image(data, color_mode, name=str(path))


def convert_color(image: np.ndarray, color_mode: str) -> np.ndarray:
    """Convert a decoded frame (H x W mono, H x W x 1, or H x W x 3 RGB) to `color_mode`.

    Camera sources deliver RGB order; grey frames become 3 channels only inside the graph
    (for an "rgb" bundle a Mono8 camera is replicated here, explicitly).
    """
    image = _as_hwc(image)
    channels = image.shape[2]
    if color_mode == "gray":
        if channels == 1:
            return image
        if channels == 3:
            return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[:, :, None]
    elif color_mode == "rgb":
        if channels == 3:
            return image
        if channels == 1:
            return np.repeat(image, 3, axis=2)
    else:
        raise DataError(f"unknown colour mode {color_mode!r} (expected one of {COLOR_MODES})")
    raise DataError(f"cannot convert a frame with {channels} channels to {color_mode}")


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    if image.shape[0] == height and image.shape[1] == width:
        return _as_hwc(image)
    out = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    return _as_hwc(out)


def prepare(image: np.ndarray, spec: InputSpec, roi: Sequence[int] | None = None) -> np.ndarray:
    """Crop (ROI x, y, w, h in source pixels), colour-convert and resize to the model input."""
    if image.dtype != np.uint8:
        raise DataError(f"frame dtype {image.dtype} is not uint8")
    if image.ndim not in (2, 3) or image.size == 0:
        raise DataError(f"frame of shape {image.shape} is not an image")
    if roi is not None:
        x, y, w, h = (int(v) for v in roi)
        if x < 0 or y < 0 or w <= 0 or h <= 0 or x + w > image.shape[1] or y + h > image.shape[0]:
            raise DataError(f"ROI {list(roi)} lies outside the {image.shape[1]}x{image.shape[0]} frame")
        image = image[y:y + h, x:x + w]
    image = convert_color(image, spec.color_mode)
    return np.ascontiguousarray(resize(image, spec.height, spec.width))


def load_prepared(path: str | os.PathLike, spec: InputSpec) -> np.ndarray:
    """Read a file and prepare it for the model: the path used by train, eval and calibrate."""
    return prepare(read_image(path, spec.color_mode), spec)


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files (by suffix) directly in `folder`, sorted by name. Errors name the folder."""
    root = Path(folder)
    if not root.exists():
        raise DataError(f"{root}: folder does not exist")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    return sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def fingerprint(paths: Iterable[str | os.PathLike]) -> str:
    """sha256 over the sorted content hashes of the files: identifies a training set by content."""
    digests = sorted(sha256_file(p) for p in paths)
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _as_hwc(image: np.ndarray) -> np.ndarray:
    return image[:, :, None] if image.ndim == 2 else image
