"""The one preprocessing path (decode -> ROI crop -> colour conversion -> resize) shared by
training, evaluation, calibration, the parity gate, the bench and the daemon, so train and deploy
cannot drift. The ROI is part of the InputSpec (recorded in the bundle), so every caller crops the
same pixels.

Everything after this (uint8 -> float, grey -> 3 channels, ImageNet normalisation, tiling of large
inputs) lives inside the ONNX graph.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np

from inspectd.errors import DataError, InspectdError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".pgm", ".ppm", ".webp")
COLOR_MODES = ("gray", "rgb")
MONO_FOR_COLOUR = ("a mono frame (one channel), but the bundle was trained on colour frames (the camera's "
                   "PixelFormat changed?); set a colour pixel format again or train on mono frames")
# Recorded in the manifest; changing it changes every score, so it is part of the bundle contract.
RESIZE_METHOD = "cv2.INTER_AREA"
# The backbone's coarsest tap has stride 32: other sizes would leave ragged feature cells.
SIZE_MULTIPLE = 32
MAX_SIDE = 4096
MAX_TILES = 8

Roi = tuple[int, int, int, int]  # x, y, w, h in source-frame pixels


@dataclass(frozen=True)
class InputSpec:
    """What the model's input tensor expects: N x height x width x channels, uint8, made from the
    `roi` (x, y, w, h in source-frame pixels; None = the whole frame) of each source image."""

    height: int
    width: int
    color_mode: str  # "gray" (1 channel) or "rgb" (3 channels)
    roi: Roi | None = None
    # (height, width) of every source frame the bundle was trained on, when they all had one size (a
    # camera's); None when they varied (a dataset) or for bundles written before it was recorded.
    frame_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.roi is not None:
            # Manifests give lists: store a tuple so specs compare and hash by value.
            object.__setattr__(self, "roi", check_roi(self.roi))

    def without_roi(self) -> "InputSpec":
        """The spec of images already prepared (golden and calibration images in a bundle)."""
        return InputSpec(self.height, self.width, self.color_mode)

    @property
    def channels(self) -> int:
        return 1 if self.color_mode == "gray" else 3

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, self.channels)


def imdecode(data: bytes | np.ndarray, flag: int) -> np.ndarray | None:
    """cv2.imdecode, None for anything it cannot decode — also where OpenCV raises instead (a header
    that claims more pixels than it allows: a damaged or crafted file)."""
    buf = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    if not buf.size:
        return None
    try:
        return cv2.imdecode(buf, flag)
    except cv2.error:
        return None


def decode_image(data: bytes, color_mode: str, name: str = "<bytes>") -> np.ndarray:
    """Decode encoded image bytes to H x W x C uint8 in `color_mode` (RGB order, never BGR)."""
    if color_mode not in COLOR_MODES:
        raise DataError(f"unknown colour mode {color_mode!r} (expected one of {COLOR_MODES})")
    # Grey: decoded as the file is (ANYCOLOR) and made grey by cv2.cvtColor, as convert_color does
    # for camera and replay frames; IMREAD_GRAYSCALE would let libpng convert colour PNGs itself,
    # truncating where cvtColor rounds (one grey level apart on about half the pixels).
    flag = cv2.IMREAD_ANYCOLOR if color_mode == "gray" else cv2.IMREAD_COLOR
    image = imdecode(data, flag)
    if image is None:
        raise DataError(f"{name}: not a readable image")
    if image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY if color_mode == "gray" else cv2.COLOR_BGR2RGB)
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

    Camera sources deliver RGB order; grey frames become 3 channels only inside the graph. A mono
    frame for an "rgb" bundle is a DataError (the daemon's fail-safe verdict): such a bundle learned
    from colour images (`inspectd train` makes a "gray" bundle of images whose channels are equal),
    so a camera switched to Mono8 would be judged by a model that never saw a grey part (measured on
    the GenTL simulator: every frame NG, median score 147 times the threshold; RESULTS.md §26).
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
            raise DataError(MONO_FOR_COLOUR)
    else:
        raise DataError(f"unknown colour mode {color_mode!r} (expected one of {COLOR_MODES})")
    raise DataError(f"cannot convert a frame with {channels} channels to {color_mode}")


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    if image.shape[0] == height and image.shape[1] == width:
        return _as_hwc(image)
    out = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    return _as_hwc(out)


def crop_roi(image: np.ndarray, roi: Sequence[int] | None) -> np.ndarray:
    """The ROI (x, y, w, h) of an H x W[ x C] array; DataError if it does not lie inside."""
    if roi is None:
        return image
    x, y, w, h = (int(v) for v in roi)
    if x < 0 or y < 0 or w <= 0 or h <= 0 or x + w > image.shape[1] or y + h > image.shape[0]:
        raise DataError(f"ROI {[x, y, w, h]} lies outside the {image.shape[1]}x{image.shape[0]} frame")
    return image[y:y + h, x:x + w]


def prepare(image: np.ndarray, spec: InputSpec, roi: Sequence[int] | None = None) -> np.ndarray:
    """Crop `spec.roi` (x, y, w, h in source pixels), colour-convert and resize to the model input.

    `roi` (a line's configured ROI, optional) is only checked: one that differs from `spec.roi`
    is a DataError, so a frame is never cut differently from what the bundle was trained on."""
    if image.dtype != np.uint8:
        raise DataError(f"frame dtype {image.dtype} is not uint8")
    if image.ndim not in (2, 3) or image.size == 0:
        raise DataError(f"frame of shape {image.shape} is not an image")
    if roi is not None and tuple(int(v) for v in roi) != spec.roi:
        trained = f"the bundle's ROI {list(spec.roi)}" if spec.roi else "a bundle trained on whole frames (no ROI)"
        raise DataError(f"ROI {[int(v) for v in roi]} differs from {trained}")
    check_frame_size(image, spec)
    image = crop_roi(image, spec.roi)
    image = convert_color(image, spec.color_mode)
    return np.ascontiguousarray(resize(image, spec.height, spec.width))


def check_frame_size(image: np.ndarray, spec: InputSpec) -> None:
    """A frame of another size than every frame the bundle learned from (the camera's Width, Height,
    binning or sensor ROI changed, or another camera) is resized to the same input all the same, at
    another scale or field of view: judged by a model that never saw such frames. A DataError instead
    (the daemon's fail-safe verdict)."""
    if spec.frame_size is None or tuple(image.shape[:2]) == tuple(spec.frame_size):
        return
    h, w = spec.frame_size
    raise DataError(f"frame of {image.shape[1]}x{image.shape[0]} px, but the bundle was trained on {w}x{h} frames "
                    f"(the camera's Width/Height, binning or ROI changed?); restore them or train anew")


def prepare_mask(mask: np.ndarray, spec: InputSpec, source_shape: tuple[int, int] | None = None) -> np.ndarray:
    """A defect mask (H x W, > 127 = defect) in the model's frame: brought to the source image's
    size if it differs, cropped by the same ROI and resized like the image -> height x width bool."""
    if mask.ndim == 3:
        mask = mask[..., 0]
    if source_shape is not None and mask.shape[:2] != tuple(source_shape):
        mask = cv2.resize(mask, (source_shape[1], source_shape[0]), interpolation=cv2.INTER_NEAREST)
    mask = crop_roi(mask, spec.roi)
    return cv2.resize(np.ascontiguousarray(mask), (spec.width, spec.height), interpolation=cv2.INTER_NEAREST) > 127


def load_prepared(path: str | os.PathLike, spec: InputSpec) -> np.ndarray:
    """Read a source image and prepare it for the model (ROI included): the path used by train,
    eval and calibrate for images as the camera sees them."""
    return prepare(read_image(path, spec.color_mode), spec)


def load_stored(path: str | os.PathLike, spec: InputSpec) -> np.ndarray:
    """Read an image a bundle stores already prepared (golden, calibration): no ROI, no resize;
    DataError if it is not exactly the model's input shape."""
    image = read_image(path, spec.color_mode)
    if image.shape != spec.shape:
        raise DataError(f"{path}: stored image is {image.shape[0]}x{image.shape[1]}x{image.shape[2]}, "
                        f"the model takes {spec.height}x{spec.width}x{spec.channels}")
    return np.ascontiguousarray(image)


# ---------------------------------------------------------------------------- resolution, tiles, ROI
def check_roi(roi: Sequence[int], error: type[InspectdError] = DataError, what: str = "ROI") -> Roi:
    """(x, y, w, h) as ints with x, y >= 0 and w, h > 0, else `error` (one line)."""
    values = tuple(roi) if isinstance(roi, (list, tuple)) else ()
    if len(values) != 4 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        raise error(f"{what}: expected x,y,w,h (4 integers), got {roi!r}")
    x, y, w, h = (int(v) for v in values)
    if x < 0 or y < 0 or w <= 0 or h <= 0:
        raise error(f"{what}: expected x,y >= 0 and w,h > 0, got {x},{y},{w},{h}")
    return (x, y, w, h)


def parse_roi(text: str, error: type[InspectdError] = DataError, what: str = "--roi") -> Roi:
    """'x,y,w,h' (source-frame pixels) -> (x, y, w, h)."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 4 or not all(re.fullmatch(r"[+-]?\d+", p) for p in parts):
        raise error(f"{what}: expected x,y,w,h (4 integers in source-frame pixels, e.g. 400,300,1600,1200), "
                    f"got {text!r}")
    return check_roi([int(p) for p in parts], error, what)


def parse_image_size(text: str, error: type[InspectdError] = DataError,
                     what: str = "--image-size") -> tuple[int, int | None]:
    """'256' -> (256, None): short side 256, long side from the images' aspect (resolve_image_size);
    '640x256' -> (640, 256): height x width."""
    m = re.fullmatch(r"\s*([+-]?\d+)\s*(?:[xX]\s*([+-]?\d+)\s*)?", str(text))
    if m is None:
        raise error(f"{what}: expected S (short side) or HxW (height x width), e.g. 256 or 640x256, got {text!r}")
    sides = [int(v) for v in m.groups() if v is not None]
    for v in sides:
        _check_side(v, error, what)
    return (sides[0], sides[1] if len(sides) == 2 else None)


def _check_side(v: int, error: type[InspectdError], what: str) -> None:
    if v <= 0:
        raise error(f"{what}: a side must be positive, got {v}")
    if v % SIZE_MULTIPLE:
        lo = v // SIZE_MULTIPLE * SIZE_MULTIPLE
        near = " or ".join(str(n) for n in (lo, lo + SIZE_MULTIPLE) if n > 0)
        raise error(f"{what}: a side must be a multiple of {SIZE_MULTIPLE} (the backbone's stride), got {v} "
                    f"(try {near})")
    if v > MAX_SIDE:
        raise error(f"{what}: a side must be at most {MAX_SIDE} px, got {v}")


def parse_tiles(text: str, error: type[InspectdError] = DataError, what: str = "--tiles") -> tuple[int, int]:
    """'2x2' -> (rows, cols), each 1..MAX_TILES."""
    m = re.fullmatch(r"\s*([+-]?\d+)\s*[xX]\s*([+-]?\d+)\s*", str(text))
    if m is None:
        raise error(f"{what}: expected ROWSxCOLS, e.g. 2x2, got {text!r}")
    rows, cols = int(m.group(1)), int(m.group(2))
    if not (1 <= rows <= MAX_TILES and 1 <= cols <= MAX_TILES):
        raise error(f"{what}: rows and columns must each be 1..{MAX_TILES}, got {rows}x{cols}")
    return (rows, cols)


def resolve_image_size(parsed: tuple[int, int | None], sample_shapes: Sequence[Sequence[int]],
                       roi: Sequence[int] | None = None) -> tuple[int, int]:
    """(H, W) of the model input. HxW is used as given; for a single S the short side is S and the
    long side S x the median aspect of `sample_shapes` ((h, w, ...) of the source images; with an
    `roi` its own aspect, since that is what gets resized), rounded to a multiple of 32. Images
    whose aspects spread widely (10th to 90th percentile > 1.25x) get S x S."""
    side, width = parsed
    if width is not None:
        return (side, width)
    if roi is not None:
        x, y, w, h = check_roi(roi)
        shapes = [(h, w)]
    else:
        shapes = [(int(s[0]), int(s[1])) for s in sample_shapes]
    if not shapes or any(h <= 0 or w <= 0 for h, w in shapes):
        raise DataError("cannot resolve the image size: no image shapes to take the aspect ratio from")
    ratios = np.array([h / w for h, w in shapes], dtype=float)
    if len(ratios) > 1 and np.quantile(ratios, 0.9) / np.quantile(ratios, 0.1) > 1.25:
        # Images of many shapes (no one camera geometry to keep): a square input treats them alike.
        return (side, side)
    aspect = float(np.median([max(h, w) / min(h, w) for h, w in shapes]))  # long / short, >= 1
    tall = float(np.median([h / w for h, w in shapes])) >= 1.0
    long = max(side, int(round(side * aspect / SIZE_MULTIPLE)) * SIZE_MULTIPLE)
    if long > MAX_SIDE:
        raise DataError(f"image size {side}: the images' aspect {aspect:.2f} gives a long side of {long} px, "
                        f"more than {MAX_SIDE}; give HxW or crop with --roi")
    return (long, side) if tall else (side, long)


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files (by suffix) directly in `folder`, sorted by name; hidden files (a Mac's ._NAME
    twins, thumbnails) are not images of the set. Errors name the folder."""
    root = Path(folder)
    if not root.exists():
        raise DataError(f"{root}: folder does not exist")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    return sorted(p for p in root.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def check_mask_stems(folder: str | os.PathLike, paths: Sequence[Path]) -> None:
    """A defect's mask is named by its image's stem (<stem>.png or another image suffix): two images
    sharing a stem would get one mask. DataError naming both (eval's pixel AUROC, synthesize)."""
    seen: dict[str, Path] = {}
    for p in paths:
        other = seen.setdefault(p.stem, p)
        if other != p:
            a, b = sorted((other.name, p.name))
            raise DataError(f"{folder}: {a} and {b} share the name {p.stem}, and a mask is named "
                            f"<image name>.png or another image suffix, so it cannot tell them apart; rename one")


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
