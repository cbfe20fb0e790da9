"""The model bundle: a directory with model.onnx, manifest.json and golden/calibration images.

The manifest lists every file of the bundle with its sha256; loading verifies schema and
hashes and refuses a tampered or truncated bundle. JSON only, no pickle anywhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from inspectd import __version__
from inspectd.fileio import exchange, fsync_dir, is_or_holds
from inspectd.engines.preprocess import MAX_TILES, InputSpec, check_roi, sha256_file
from inspectd.errors import BundleError, ConfigError, DataError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
INPUT_NAME = "images"
OUTPUT_NAMES = ("score", "anomaly_map")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputInfo(_Strict):
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    color_mode: Literal["gray", "rgb"]
    channels: int = Field(ge=1, le=3)
    layout: Literal["NHWC"] = "NHWC"
    dtype: Literal["uint8"] = "uint8"
    resize: str
    # Source-frame crop (x, y, w, h) applied before the resize by every caller; None = whole frame.
    # Optional: bundles written before it existed load as whole-frame bundles.
    roi: tuple[int, int, int, int] | None = None
    # Informative: the graph cuts these overlapping tiles (rows, cols) of the input itself and stitches
    # the map; tile_overlap as the engine records it (input pixels shared by neighbouring tiles).
    tiles: tuple[int, int] | None = None
    tile_overlap: float | None = Field(None, ge=0.0)
    # (height, width) of every training frame when they all had one size (a camera's): frames of another
    # size are refused (preprocess.check_frame_size). None: they varied, or an older bundle.
    frame_size: tuple[int, int] | None = None

    @field_validator("frame_size")
    @classmethod
    def _frame_size_valid(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and not all(1 <= v <= 1 << 16 for v in value):
            raise ValueError(f"height and width must each be 1..65536, got {list(value)}")
        return value

    @field_validator("roi")
    @classmethod
    def _roi_valid(cls, value: tuple[int, int, int, int] | None) -> tuple[int, int, int, int] | None:
        if value is None:
            return value
        try:
            return check_roi(value)
        except DataError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("tiles")
    @classmethod
    def _tiles_valid(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and not all(1 <= v <= MAX_TILES for v in value):
            raise ValueError(f"rows and columns must each be 1..{MAX_TILES}, got {list(value)}")
        return value


class ModelInfo(_Strict):
    file: str = MODEL_FILE
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    input_name: str = INPUT_NAME
    output_names: list[str] = list(OUTPUT_NAMES)
    opset: int


class BackboneInfo(_Strict):
    name: str
    taps: list[int]
    tap_channels: list[int]
    tap_strides: list[int]
    weights: str


class FlowInfo(_Strict):
    steps: int
    hidden_ratio: float
    kernel_size: int
    clamp: float
    fusion: str
    score_term: str
    components: int = 0  # principal components the flow models (0: every channel; older bundles)
    members: int = 1     # flows averaged per embedding (1: older bundles)
    edge_pad: int = 0    # input px mirrored below and right of the frame (ModelConfig.edge_pad; 0: older bundles)
    pool: str = "avg"    # how finer taps reach the fused grid (ModelConfig.pool; avg: older bundles)


class MethodInfo(_Strict):
    name: str
    options: dict[str, Any] = {}
    details: dict[str, Any] = {}


class MapInfo(_Strict):
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    smoothing_sigma: float
    # Fixed display range from held-out good images: heatmaps are never stretched per image.
    display_lo: float
    display_hi: float


class ScoreInfo(_Strict):
    reduction: str
    good_mean: float
    good_std: float = Field(gt=0)
    good_quantiles: dict[str, float]
    n_good: int
    source: str


class TrainingInfo(_Strict):
    fingerprint: str
    image_names: list[str]
    # Per-file content hashes, so calibration can refuse images the model was trained on.
    image_sha256: list[str]
    holdout_names: list[str]
    n_train: int
    n_holdout: int
    skipped: int
    config: dict[str, Any]
    final_loss: float
    seconds: float
    device: str
    # Methods that learn from defects / paste on backgrounds: fingerprint, count and names of those
    # folders' images (absent for good-only methods and older bundles).
    defects: dict[str, Any] | None = None
    synthetic_defects: dict[str, Any] | None = None  # made by `inspectd synthesize`, named in its manifest
    backgrounds: dict[str, Any] | None = None


class GoldenInfo(_Strict):
    good: list[str] = []
    bad: list[str] = []
    # ONNX Runtime CPU raw scores of the golden images at export time, same order.
    good_scores: list[float] = []
    bad_scores: list[float] = []


class Manifest(_Strict):
    schema_version: Literal[1]
    inspectd_version: str
    bundle_id: str
    created_utc: str
    model: ModelInfo
    # Bundles written before methods existed are all "flow" bundles.
    method: MethodInfo = MethodInfo(name="flow")
    backbone: BackboneInfo | None = None
    flow: FlowInfo | None = None
    input: InputInfo
    map: MapInfo
    score: ScoreInfo
    training: TrainingInfo
    golden: GoldenInfo = GoldenInfo()
    calibration_images: list[str] = []
    files: dict[str, str]


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk."""

    path: Path
    manifest: Manifest

    @property
    def model_path(self) -> Path:
        return self.path / self.manifest.model.file

    @property
    def bundle_id(self) -> str:
        return self.manifest.bundle_id

    @property
    def input_spec(self) -> InputSpec:
        i = self.manifest.input
        return InputSpec(height=i.height, width=i.width, color_mode=i.color_mode, roi=i.roi, frame_size=i.frame_size)

    @property
    def roi(self) -> tuple[int, int, int, int] | None:
        """The source-frame crop the bundle was trained on (None: whole frames)."""
        return self.manifest.input.roi

    @property
    def map_shape(self) -> tuple[int, int]:
        return (self.manifest.map.height, self.manifest.map.width)

    def normalize(self, raw: np.ndarray | float) -> np.ndarray | float:
        """Raw score -> standard units of the held-out good scores (0 = typical good part)."""
        s = self.manifest.score
        return (np.asarray(raw, dtype=np.float64) - s.good_mean) / s.good_std if isinstance(raw, np.ndarray) \
            else (float(raw) - s.good_mean) / s.good_std

    def heatmap_u8(self, anomaly_map: np.ndarray) -> np.ndarray:
        """Map -> uint8 with the bundle's fixed display range (never per-image min-max)."""
        m = self.manifest.map
        scaled = (anomaly_map - m.display_lo) / max(m.display_hi - m.display_lo, 1e-12)
        return (np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)

    def golden_images(self) -> tuple[list[Path], list[Path]]:
        g = self.manifest.golden
        return [self.path / p for p in g.good], [self.path / p for p in g.bad]


def check_line_roi(line_roi: Sequence[int] | None, bundle_roi: Sequence[int] | None, where: str,
                   bundle_path: str | os.PathLike) -> None:
    """A line must see the pixels its bundle was trained on: a line ROI that differs from the
    bundle's, or one on a bundle trained on whole frames, is a ConfigError (one line naming
    `where`, e.g. "lines.yaml: lines[0].roi"). No line ROI: the bundle's applies."""
    if line_roi is None:
        return
    line = [int(v) for v in line_roi]
    if bundle_roi is None:
        raise ConfigError(f"{where}: {line} but the bundle {bundle_path} was trained on whole frames (no ROI); "
                          f"retrain with --roi {','.join(map(str, line))} or remove roi from the line")
    trained = [int(v) for v in bundle_roi]
    if line != trained:
        raise ConfigError(f"{where}: {line} differs from the ROI {trained} the bundle {bundle_path} was trained "
                          f"with; remove roi from the line (the bundle's applies) or retrain with "
                          f"--roi {','.join(map(str, line))}")


def check_line_roi_at(line_roi: Sequence[int] | None, bundle_path: str | os.PathLike, where: str) -> None:
    """check_line_roi against the ROI in the manifest at `bundle_path` (read only when the line sets one)."""
    if line_roi is None:
        return
    try:
        trained = read_bundle_roi(bundle_path)
    except BundleError as exc:  # a config check: exit 2 like the other path problems it reports
        raise ConfigError(f"{where}: cannot compare with the bundle's ROI: {exc}") from None
    check_line_roi(line_roi, trained, where, bundle_path)


def _raw_manifest(path: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest in `path` as parsed JSON, without any check; None if there is none or it is unreadable."""
    try:
        raw = json.loads((Path(path) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return raw if isinstance(raw, dict) else None


def read_bundle_id(path: str | os.PathLike) -> str | None:
    """The bundle_id in a bundle's manifest without verifying its files (check-config, calibrate);
    None if unreadable (reported elsewhere; the daemon verifies the bundle at start)."""
    value = (_raw_manifest(path) or {}).get("bundle_id")
    return value if isinstance(value, str) else None


def read_bundle_roi(path: str | os.PathLike) -> tuple[int, int, int, int] | None:
    """The recorded ROI from a bundle's manifest without verifying the bundle's files (for
    check-config: fast; the daemon verifies everything with load_bundle at start)."""
    manifest_path = Path(path) / MANIFEST
    try:
        raw = json.loads(manifest_path.read_text(encoding="utf-8"))
        roi = raw["input"].get("roi") if isinstance(raw, dict) and isinstance(raw.get("input"), dict) else None
        return check_roi(roi) if roi is not None else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, DataError) as exc:
        raise BundleError(f"{manifest_path}: cannot read input.roi ({str(exc).splitlines()[0]})") from None


def read_bundle_frame_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """The (height, width) of the frames a bundle was trained on, from its manifest without verifying its
    files (check-config); None when it records none or cannot be read (the daemon verifies at start)."""
    inp = (_raw_manifest(path) or {}).get("input")
    size = inp.get("frame_size") if isinstance(inp, dict) else None
    if isinstance(size, list) and len(size) == 2 and all(type(v) is int and v > 0 for v in size):
        return size[0], size[1]
    return None


def read_bundle_color_mode(path: str | os.PathLike) -> str | None:
    """"gray" or "rgb" from a bundle's manifest without verifying its files (check-config); None when
    it cannot be read (the daemon verifies at start)."""
    inp = (_raw_manifest(path) or {}).get("input")
    mode = inp.get("color_mode") if isinstance(inp, dict) else None
    return mode if isinstance(mode, str) else None


def load_bundle(path: str | os.PathLike) -> Bundle:
    """Load and verify a bundle: schema, every listed file present with its sha256."""
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"{root}: no bundle here (not a directory)")
    manifest_path = root / MANIFEST
    try:
        raw = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{root}: no {MANIFEST} (not a bundle, or an interrupted write)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{manifest_path}: unreadable manifest ({exc})") from None
    if not isinstance(raw, dict):
        raise BundleError(f"{manifest_path}: manifest is not a JSON object")
    version = raw.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(f"{manifest_path}: schema_version {version!r} is not supported "
                          f"(this inspectd {__version__} reads version {SCHEMA_VERSION})")
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        # Keys from the file may hold newlines or spaces: quote those so the error stays one line.
        where = ".".join(str(p) if re.fullmatch(r"[A-Za-z0-9_./-]+", str(p)) else repr(str(p)[:40])
                         for p in err["loc"]) or "(root)"
        raise BundleError(f"{manifest_path}: field {where}: {err['msg']}"
                          + (f" ({len(exc.errors())} errors)" if len(exc.errors()) > 1 else "")) from None
    if manifest.files.get(manifest.model.file) != manifest.model.sha256:
        raise BundleError(f"{manifest_path}: model sha256 is not the one listed under files")
    for rel, expected in sorted(manifest.files.items()):
        try:
            target = (root / rel).resolve()
            inside = root.resolve() in target.parents
            present = inside and target.is_file()
            actual = sha256_file(target) if present else ""
        except (OSError, ValueError) as exc:  # NUL byte, name too long, unreadable: one line, not a traceback
            reason = getattr(exc, "strerror", None) or str(exc)
            raise BundleError(f"{manifest_path}: file entry {rel[:60]!r}: {reason}") from None
        if not inside:
            raise BundleError(f"{manifest_path}: file entry {rel!r} points outside the bundle")
        if not present:
            raise BundleError(f"{root}: {rel} is missing (listed in the manifest)")
        if actual != expected:
            raise BundleError(f"{root}: {rel} does not match its sha256 in the manifest "
                              f"(tampered or truncated: expected {expected[:12]}…, got {actual[:12]}…)")
    return Bundle(path=root, manifest=manifest)


def write_bundle(staging: Path, out: Path, manifest_fields: dict[str, Any], force: bool = False) -> Bundle:
    """Finish a bundle built in `staging` (same filesystem as `out`): hash files, write the
    manifest, then move it into place with a rename so `out` is never half-written."""
    files = {str(p.relative_to(staging)): sha256_file(p)
             for p in sorted(staging.rglob("*")) if p.is_file() and p.name != MANIFEST}
    fields = dict(manifest_fields)
    fields["files"] = files
    fields.setdefault("bundle_id", files[MODEL_FILE][:12])
    manifest = Manifest.model_validate(fields)
    tmp_manifest = staging / (MANIFEST + ".tmp")
    tmp_manifest.write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
    os.replace(tmp_manifest, staging / MANIFEST)
    _fsync_tree(staging)
    if out.exists():
        refuse_existing(out, force)  # again at the end: --force replaces a bundle, never anything else
        if exchange(staging, out):  # one step: a daemon's preflight or a crash never finds `out` missing
            shutil.rmtree(staging, ignore_errors=True)  # the old bundle, now at the staging path
        else:
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(staging, out)
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)
    fsync_dir(out.parent)
    return load_bundle(out)


def refuse_existing(out: Path, force: bool, inputs: Sequence[str | os.PathLike | None] = ()) -> None:
    """Refuse early (before any work) when `out` is taken: without --force always; with it, unless
    `out` holds a bundle (--force replaces bundles, never other files: the training images, say)
    and is not, and does not hold, any of the `inputs` folders."""
    for folder in inputs:
        if folder is not None and is_or_holds(out, folder):
            raise BundleError(f"{out}: is or holds the input folder {folder}; choose another --out")
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return  # new, or an empty folder made for it: nothing to lose
    if not _holds_bundle(out):
        raise BundleError(f"{out}: already holds a file or folder that is not a bundle (--force replaces "
                          f"bundles only); choose another --out")
    if not force:
        raise BundleError(f"{out}: already holds a bundle (use --force to replace it)")


def _holds_bundle(path: Path) -> bool:
    """A bundle's manifest (schema version and model) in `path`; `inspectd synthesize` writes a
    manifest.json too, and its folder is not one --force may replace."""
    raw = _raw_manifest(path)
    return raw is not None and "schema_version" in raw and isinstance(raw.get("model"), dict)


def probe_writable(out: Path) -> None:
    """Make and remove the staging folder `out` will be built in: a parent that is a file, read-only or
    full is refused before the work that would be lost."""
    try:
        staging = staging_dir(out)
    except OSError as exc:
        raise BundleError(f"{out}: cannot write the bundle here ({exc.strerror or exc}"
                          f"{': ' + str(exc.filename) if exc.filename else ''})") from None
    shutil.rmtree(staging, ignore_errors=True)


def staging_dir(out: Path) -> Path:
    """A temporary directory next to `out`, so the final rename stays on one filesystem."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
