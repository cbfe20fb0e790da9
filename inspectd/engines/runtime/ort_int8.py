"""INT8 engines for ONNX Runtime on CPU: static quantisation (QDQ, per-channel weights) of the
bundle's model.onnx, calibrated on good images, cached in the bundle's engine folder.

`inspectd build-engine --bundle B --backend onnxruntime --precision int8 [--calibration DIR]`
builds it; the ONNX Runtime backend with `precision: int8` loads it (never builds it) and, like any
non-reference engine, serves a line only after the parity gate passes on the golden images.

What is quantised (recipe "backbone-late", the default): the backbone blocks after the first
feature tap (flow: blocks 5-15), their convolutions with their ReLU6 (Clip), residual Adds and the
other operators in BACKBONE_OPS (top-level nodes named `/backbone/_blocks.N/...`), so activations
stay INT8 between those convolutions. FP32 stays: the stem and the blocks up to the first tap
(measured on MTD: 1 % noise at the stem output costs 0.22 image AUROC, 5 % at the last tap
nothing; quantising stem + blocks 0-1 costs 0.04, blocks 5-15 nothing), everything after the
backbone (flow coupling steps, exp/tanh clamps, score reduction, map smoothing and resize:
MapHead; quantising the flow's convolutions too gives AUROC 0.50) and every node inside an ONNX
Loop. A bundle without such convolutions outside a Loop (inpaint: its generator runs inside the
Loop) is refused in one line. Other recipes (backbone, backbone-conv, all-conv, all) exist to
measure what quantising more costs (benchmarks/int8.py).

Cache key: ONNX sha256, precision, ONNX Runtime version, the CPU's integer/bfloat16 dot-product
features (AVX-512 VNNI, AVX-VNNI, AVX-512 BF16, AMX), the input shape and the quantisation
recipe. A cached file is used only when its sidecar names exactly this key and its bytes still have
the recorded sha256 (engine_cache.EngineCache): a changed model or runtime means a rebuild, a
corrupt file is refused (by the backend) or rebuilt (by build-engine), never loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from inspectd.engines.bundle import Bundle
from inspectd.engines.preprocess import fingerprint, list_images, load_prepared, load_stored
from inspectd.engines.runtime.engine_cache import EngineCache, StaleEngine
from inspectd.engines.runtime.precision import block_index, first_tap
from inspectd.errors import BackendUnavailable, DataError, InspectdError

log = logging.getLogger("inspectd.runtime.ort_int8")

INT8_SUFFIX = ".onnx"
# The CPU flags that change which INT8/BF16 kernels ONNX Runtime (MLAS) runs, hence its numbers.
CPU_FEATURE_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
# Quantisation recipes: which nodes become INT8. "backbone" is the default (accuracy kept, see the
# module docstring); the others exist to measure what the rest would cost (benchmarks/int8.py).
RECIPES = ("backbone-late", "backbone", "backbone-conv", "all-conv", "all")
DEFAULT_RECIPE = "backbone-late"
MAX_CALIBRATION_IMAGES = 256


class Int8Unavailable(BackendUnavailable):
    """No INT8 engine can be built or loaded for this bundle (the reason is one line)."""


def cpu_features() -> str:
    """The relevant /proc/cpuinfo flags present on this CPU, sorted, comma-separated ("" if none or
    unknown, e.g. not Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return ",".join(f for f in CPU_FEATURE_FLAGS if f in flags)
    except OSError:
        pass
    return ""


def ort_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


@dataclass(frozen=True)
class OrtEngineKey:
    """Everything a cached ONNX Runtime INT8 model depends on."""

    onnx_sha256: str
    precision: str
    onnxruntime_version: str
    cpu_features: str
    input_shape: tuple[int, ...]  # (H, W, C), NHWC uint8
    recipe: str = DEFAULT_RECIPE

    def __post_init__(self) -> None:
        if self.precision != "int8":
            raise ValueError(f"precision {self.precision!r}: ONNX Runtime engines are cached for int8 only")
        if not re.fullmatch(r"[0-9a-f]{64}", self.onnx_sha256):
            raise ValueError(f"onnx_sha256 {self.onnx_sha256!r} is not a sha256 hex digest")
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe {self.recipe!r} is not one of {', '.join(RECIPES)}")
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        d["runtime"] = "onnxruntime"
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "OrtEngineKey":
        if d.get("runtime") != "onnxruntime":
            raise KeyError("runtime")
        return cls(onnx_sha256=str(d["onnx_sha256"]), precision=str(d["precision"]),
                   onnxruntime_version=str(d["onnxruntime_version"]), cpu_features=str(d["cpu_features"]),
                   input_shape=tuple(int(v) for v in d["input_shape"]), recipe=str(d.get("recipe", DEFAULT_RECIPE)))

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def file_stem(self) -> str:
        h, w, c = self.input_shape
        return f"ort{self.onnxruntime_version}_cpu_{self.precision}_{self.recipe}_{h}x{w}x{c}_{self.digest()[:16]}"

    def describe(self) -> str:
        h, w, c = self.input_shape
        return (f"ONNX Runtime {self.onnxruntime_version} CPU [{self.cpu_features or 'no VNNI/AMX'}], {self.precision} "
                f"({self.recipe}), input {h}x{w}x{c}, onnx {self.onnx_sha256[:12]}")


def engine_key(bundle: Bundle, recipe: str = DEFAULT_RECIPE) -> OrtEngineKey:
    return OrtEngineKey(onnx_sha256=bundle.manifest.model.sha256, precision="int8",
                        onnxruntime_version=ort_version(), cpu_features=cpu_features(),
                        input_shape=bundle.input_spec.shape, recipe=recipe)


def engine_cache(bundle: Bundle) -> EngineCache:
    return EngineCache.for_bundle(bundle.path, key_type=OrtEngineKey, suffix=INT8_SUFFIX)


def cached_int8(bundle: Bundle, recipe: str = DEFAULT_RECIPE) -> Path:
    """The verified cached INT8 model for this bundle, ONNX Runtime and CPU; StaleEngine (a
    BackendUnavailable) saying why not. Never builds; checks the model file's own hash first."""
    _check_model_hash(bundle)
    try:
        return engine_cache(bundle).lookup(engine_key(bundle, recipe))
    except StaleEngine as exc:
        raise StaleEngine(f"onnxruntime int8: {exc} (run `inspectd build-engine --bundle {bundle.path} "
                          f"--backend onnxruntime --precision int8`)") from None


def _check_model_hash(bundle: Bundle) -> None:
    from inspectd.engines.preprocess import sha256_file

    actual = sha256_file(bundle.model_path)
    if actual != bundle.manifest.model.sha256:
        raise Int8Unavailable(f"{bundle.model_path}: sha256 {actual[:12]}… is not the manifest's "
                              f"{bundle.manifest.model.sha256[:12]}…: model.onnx changed")


# --------------------------------------------------------------------------- which nodes


# Operators of the backbone quantised with its convolutions: quantising the ReLU6 (Clip), the
# residual Adds and the squeeze/excite Muls too lets ONNX Runtime keep activations in INT8 between
# convolutions (QLinearConv chains) instead of dequantising around every Conv; convolutions alone
# were measured no faster than FP32 (the Q/DQ pairs cost what the INT8 Conv saves).
BACKBONE_OPS = ("Conv", "Clip", "Relu", "Add", "Mul", "Sigmoid", "GlobalAveragePool", "AveragePool",
                "MaxPool", "Concat")


def select_nodes(model: Any, recipe: str = DEFAULT_RECIPE,
                 first_tap: int | None = None) -> tuple[list[str] | None, list[str] | None]:
    """(op types, top-level node names) to quantise for `recipe`; (None, None) = ONNX Runtime's own
    default (everything it can, recipe "all"). Nodes inside subgraphs (Loop, If, Scan bodies)
    are never listed by the other recipes: they stay FP32. `first_tap`: the backbone block of the
    first feature tap; "backbone-late" quantises only the blocks after it (the stem and the blocks
    up to the first tap stay FP32: noise there reads as texture to the method)."""
    if recipe not in RECIPES:
        raise InspectdError(f"int8 recipe {recipe!r} is not one of {', '.join(RECIPES)}")
    if recipe == "all":
        return None, None
    nodes = [n for n in model.graph.node if n.name]
    backbone = [n for n in nodes if n.name.startswith("/backbone/")]
    if recipe == "backbone-late":
        start = -1 if first_tap is None else int(first_tap)
        backbone = [n for n in backbone if block_index(n.name) > start]
    if recipe == "backbone-conv":
        return ["Conv"], [n.name for n in backbone if n.op_type == "Conv"]
    chosen = [n for n in backbone if n.op_type in BACKBONE_OPS]
    if recipe == "all-conv":  # + every top-level convolution after the backbone (the flow's subnets, head)
        chosen += [n for n in nodes if n.op_type == "Conv" and not n.name.startswith("/backbone/")]
    if not any(n.op_type == "Conv" for n in chosen):
        return ["Conv"], []
    return sorted({n.op_type for n in chosen}), [n.name for n in chosen]


# --------------------------------------------------------------------------- calibration


def calibration_images(bundle: Bundle, folder: str | os.PathLike | None = None,
                       limit: int = MAX_CALIBRATION_IMAGES) -> list[np.ndarray]:
    """Prepared uint8 H x W x C images: the bundle's stored calibration images (already prepared),
    or good images from `folder` (camera frames: ROI crop + resize). DataError if none."""
    if folder is not None:
        paths = list_images(folder)[:limit]
        load = load_prepared
    else:
        paths = [bundle.path / p for p in bundle.manifest.calibration_images][:limit]
        load = load_stored
    if not paths:
        where = f"folder {folder}" if folder is not None else f"bundle {bundle.path} (manifest calibration_images)"
        raise DataError(f"INT8 calibration needs good images; none in {where}")
    return [load(p, bundle.input_spec) for p in paths]


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over prepared images, one per batch."""

    def __init__(self, input_name: str, images: Sequence[np.ndarray]) -> None:
        self.input_name = input_name
        self.images = list(images)
        self._it: Iterator[np.ndarray] = iter(self.images)

    def get_next(self) -> dict[str, np.ndarray] | None:
        image = next(self._it, None)
        return None if image is None else {self.input_name: np.ascontiguousarray(image[None])}

    def rewind(self) -> None:
        self._it = iter(self.images)


# --------------------------------------------------------------------------- build


def quantize(bundle: Bundle, out_path: str | os.PathLike, images: Sequence[np.ndarray],
             recipe: str = DEFAULT_RECIPE) -> dict[str, Any]:
    """Write the INT8 (QDQ) model for `bundle` to `out_path`; return what was done (for the sidecar).
    Int8Unavailable with a one-line reason if the recipe finds nothing to quantise."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    model = onnx.load(str(bundle.model_path))
    ops, names = select_nodes(model, recipe, first_tap(bundle))
    has_loop = any(n.op_type in ("Loop", "Scan", "If") for n in model.graph.node)
    if names is not None and not names:
        raise Int8Unavailable(
            f"bundle {bundle.bundle_id} (method {_method(bundle)}): no {'backbone ' if recipe.startswith('backbone') else ''}"
            f"convolutions outside a Loop to quantise with recipe {recipe!r}"
            + (" (its network runs inside an ONNX Loop, which stays FP32)" if has_loop else "")
            + "; use the FP32 engine")
    with tempfile.TemporaryDirectory(prefix="inspectd-int8-") as tmp:
        tmp_out = Path(tmp) / "model.int8.onnx"
        # The quantiser writes a shape-inferred copy beside the model it reads: give it a copy in
        # the temporary folder, so that the bundle's folder is never written to (nor can a full
        # disk there turn into a confusing quantiser error).
        source = Path(tmp) / "model.onnx"
        shutil.copyfile(bundle.model_path, source)
        try:
            quantize_static(
                str(source), str(tmp_out), _Reader(bundle.manifest.model.input_name, images),
                quant_format=QuantFormat.QDQ, op_types_to_quantize=ops, nodes_to_quantize=names,
                per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={"CalibTensorRangeSymmetric": False, "WeightSymmetric": True})
        except Int8Unavailable:
            raise
        except Exception as exc:  # ORT's quantiser raises plain exceptions of many kinds
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise Int8Unavailable(f"bundle {bundle.bundle_id}: ONNX Runtime quantisation failed: {msg}") from None
        data = tmp_out.read_bytes()
    Path(out_path).write_bytes(data)
    return {"recipe": recipe, "op_types": ops, "quantized_nodes": None if names is None else len(names), "calibration_images": len(images),
            "has_loop": has_loop}


def build_int8(bundle: Bundle, calibration: str | os.PathLike | None = None, recipe: str = DEFAULT_RECIPE,
               force: bool = False) -> tuple[Path, str | None]:
    """Build (when missing, stale, corrupt or `force`) and cache the INT8 model; return
    (path, why it was built or None when the cached one was verified and kept). model.onnx is
    never touched. A different calibration folder than the cached model's forces a rebuild."""
    from inspectd.engines.runtime.onnxruntime_backend import unavailable_reason

    reason = unavailable_reason()
    if reason:
        raise Int8Unavailable(reason)
    _check_model_hash(bundle)
    cache, key = engine_cache(bundle), engine_key(bundle, recipe)
    images_paths = (list_images(calibration)[:MAX_CALIBRATION_IMAGES] if calibration is not None
                    else [bundle.path / p for p in bundle.manifest.calibration_images][:MAX_CALIBRATION_IMAGES])
    calib_id = fingerprint(images_paths) if images_paths else ""
    if not force:
        try:
            path = cache.lookup(key)
            meta = json.loads(cache.sidecar_path(key).read_text(encoding="utf-8"))
            if meta.get("extra", {}).get("calibration_fingerprint") == calib_id:
                return path, None
            why = "calibrated on other images"
        except StaleEngine as exc:
            why = str(exc)
    else:
        why = "forced"
    images = calibration_images(bundle, calibration)
    with tempfile.TemporaryDirectory(prefix="inspectd-int8-") as tmp:
        out = Path(tmp) / "int8.onnx"
        extra = quantize(bundle, out, images, recipe)
        data = out.read_bytes()
    extra.update({"calibration_fingerprint": calib_id,
                  "calibration": str(calibration) if calibration is not None else "bundle calibration_images"})
    path = cache.store(key, data, extra=extra)
    log.info("int8 engine for bundle %s written to %s (%s)", bundle.bundle_id, path, why)
    return path, why


def _method(bundle: Bundle) -> str:
    method = getattr(bundle.manifest, "method", None)
    return str(getattr(method, "name", None) or "flow")
