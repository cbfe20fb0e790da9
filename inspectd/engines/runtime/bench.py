"""Latency benchmark: every available backend side by side in one run, at batch 1 and batch K
(ONNX Runtime FP32 and, when the bundle has a verified cached INT8 engine, ONNX Runtime INT8 rows),
warm-up excluded; preprocessing timed separately; the plain backbone too when the bundle
carries a backbone-only ONNX (`backbone.onnx`), so the cost of the flow head is visible.

Each timed call is the whole `Backend.infer` (host -> device copies, inference, device -> host
copies and synchronisation included), measured with time.perf_counter.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import numpy as np

from inspectd.engines.bundle import Bundle
from inspectd.engines.preprocess import load_stored, prepare, read_image
from inspectd.engines.runtime import BACKENDS, backend_class
from inspectd.errors import ConfigError, InspectdError

BACKBONE_FILE = "backbone.onnx"
DEFAULT_FRAME = (1280, 1024)  # width, height: a common GenICam sensor size


@dataclass
class LatencyStats:
    name: str  # backend, "preprocess ..." or "backbone-only ..."
    batch: int
    iterations: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    images_per_s: float

    @classmethod
    def from_seconds(cls, name: str, batch: int, seconds: Sequence[float]) -> "LatencyStats":
        s = np.asarray(seconds, dtype=np.float64)
        if s.size == 0:
            raise ValueError("no timings")
        ms = s * 1e3
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        return cls(name=name, batch=batch, iterations=int(s.size), p50_ms=float(p50), p90_ms=float(p90),
                   p99_ms=float(p99), max_ms=float(ms.max()), mean_ms=float(ms.mean()),
                   images_per_s=float(batch * s.size / s.sum()) if s.sum() > 0 else float("inf"))


@dataclass
class BenchResult:
    bundle_id: str
    input_shape: tuple[int, int, int]
    rows: list[LatencyStats] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    engines: dict[str, dict[str, Any]] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"bundle_id": self.bundle_id, "input_shape": list(self.input_shape),
                "rows": [asdict(r) for r in self.rows], "skipped": dict(self.skipped),
                "engines": self.engines, "environment": self.environment}

    def row(self, name: str, batch: int) -> LatencyStats | None:
        return next((r for r in self.rows if r.name == name and r.batch == batch), None)

    def table(self) -> str:
        h, w, c = self.input_shape
        lines = [f"bundle {self.bundle_id}, input {h}x{w}x{c} uint8; latency per call in ms (warm-up excluded)",
                 f"{'what':<38} {'batch':>5} {'n':>6} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8} {'img/s':>9}"]
        for r in self.rows:
            lines.append(f"{r.name:<38} {r.batch:>5} {r.iterations:>6} {r.p50_ms:>8.3f} {r.p90_ms:>8.3f} "
                         f"{r.p99_ms:>8.3f} {r.max_ms:>8.3f} {r.images_per_s:>9.1f}")
        ratio = self.head_cost_ratio()
        if ratio is not None:
            lines.append(f"whole engine / backbone only (onnxruntime, batch 1, p50): {ratio:.2f}x")
        for name, reason in self.skipped.items():
            lines.append(f"skipped {name}: {reason}")
        return "\n".join(lines)

    def head_cost_ratio(self) -> float | None:
        whole, backbone = self.row("onnxruntime", 1), self.row("backbone-only (onnxruntime)", 1)
        if whole is None or backbone is None or backbone.p50_ms <= 0:
            return None
        return whole.p50_ms / backbone.p50_ms


def time_calls(fn: Callable[[], Any], iterations: int, warmup: int) -> list[float]:
    """Seconds per call for `iterations` back-to-back calls after `warmup` untimed ones."""
    return time_paced(fn, iterations, warmup, 0.0)


def time_paced(fn: Callable[[], Any], iterations: int, warmup: int, period_s: float) -> list[float]:
    """Seconds per call when calls start `period_s` apart, as a line's frames arrive, after `warmup`
    back-to-back untimed calls. A CPU left idle between calls may answer slower than back to back."""
    for _ in range(warmup):
        fn()
    out = []
    next_start = time.perf_counter()
    for _ in range(iterations):
        wait = next_start - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
        next_start = t0 + period_s  # a call longer than the period: the next one starts at once
    return out


def time_interleaved(fns: dict[str, Callable[[], Any]], iterations: int, warmup: int) -> dict[str, list[float]]:
    """Like time_calls for several functions, called in turn (a, b, a, b, ...)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out: dict[str, list[float]] = {label: [] for label in fns}
    for _ in range(iterations):
        for label, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            out[label].append(time.perf_counter() - t0)
    return out


def sample_inputs(bundle: Bundle, n: int) -> np.ndarray:
    """n prepared golden images (cycled), or seeded noise when the bundle has none."""
    good, bad = bundle.golden_images()
    paths = good + bad
    if paths:
        images = [load_stored(p, bundle.input_spec) for p in paths]  # stored already prepared
        return np.stack([images[i % len(images)] for i in range(n)])
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(n, *bundle.input_spec.shape), dtype=np.uint8)


def sample_frame(bundle: Bundle, size: tuple[int, int] = DEFAULT_FRAME) -> np.ndarray:
    """A decoded camera-like frame of `size` (width, height): a golden image scaled up (real
    content for the resize), mono as H x W like a Mono8 camera, else H x W x 3 RGB. With a bundle
    ROI the frame is the golden image pasted into it at the ROI (so prepare crops real content)."""
    width, height = size
    if width < 1 or height < 1:
        raise ConfigError(f"frame size {width}x{height} must be positive")
    roi = bundle.input_spec.roi
    if roi is not None:  # grown to hold the ROI: the camera's frame always does
        width, height = max(width, roi[0] + roi[2]), max(height, roi[1] + roi[3])
    good, bad = bundle.golden_images()
    rgb = bundle.input_spec.color_mode == "rgb"
    if good or bad:
        image = read_image((good + bad)[0], "rgb" if rgb else "gray")
        if roi is None:
            frame = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
        else:
            x, y, w, h = roi
            frame = np.zeros((height, width, image.shape[2]), np.uint8)
            frame[y:y + h, x:x + w] = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR).reshape(h, w, -1)
    else:
        frame = np.random.default_rng(1).integers(0, 256, size=(height, width, 3 if rgb else 1), dtype=np.uint8)
    return np.ascontiguousarray(frame if rgb else frame.reshape(height, width))


def run_bench(bundle: Bundle, backends: Sequence[str] | None = None, iterations: int = 200, batch: int = 8,
              warmup: int = 20, options: dict[str, dict[str, Any]] | None = None,
              frame_size: tuple[int, int] | None = None, backbone_onnx: os.PathLike | None = None,
              rate: float | None = None) -> BenchResult:
    """Benchmark each requested backend (default: all known) that can run here. The backbone
    alone is timed from `backbone_onnx` (default: `backbone.onnx` in the bundle, if present).
    `rate`: also time each backend's batch-1 calls started `rate` times a second (a row of its own).
    `frame_size` (width, height) of the frame whose preprocessing is timed: default the size the
    bundle was trained on when it records one (it refuses any other), else DEFAULT_FRAME."""
    if iterations < 1 or warmup < 0 or batch < 1:
        raise ConfigError(f"iterations ({iterations}) and batch ({batch}) must be >= 1, warmup ({warmup}) >= 0")
    if rate is not None and not (0 < rate < float("inf")):
        raise ConfigError(f"rate ({rate}) must be a positive number of calls per second")
    names = list(backends) if backends else list(BACKENDS)
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise ConfigError(f"unknown backend(s) {', '.join(unknown)} (known: {', '.join(BACKENDS)})")
    options = options or {}
    result = BenchResult(bundle_id=bundle.bundle_id, input_shape=bundle.input_spec.shape,
                         environment=environment())
    batch_sizes = sorted({1, batch})
    inputs = sample_inputs(bundle, max(batch_sizes))

    trained = bundle.input_spec.frame_size  # (height, width)
    if trained is not None and frame_size is not None and tuple(frame_size) != (trained[1], trained[0]):
        raise ConfigError(f"frame size {frame_size[0]}x{frame_size[1]}: this bundle takes only the "
                          f"{trained[1]}x{trained[0]} frames it was trained on")
    if frame_size is None:
        frame_size = (trained[1], trained[0]) if trained is not None else DEFAULT_FRAME
    frame = sample_frame(bundle, frame_size)
    fh, fw = frame.shape[:2]
    result.rows.append(LatencyStats.from_seconds(
        f"preprocess (prepare {fw}x{fh} frame)", 1,
        time_calls(lambda: prepare(frame, bundle.input_spec), iterations, warmup)))
    good, bad = bundle.golden_images()
    if good or bad:
        path = (good + bad)[0]
        result.rows.append(LatencyStats.from_seconds(
            "preprocess (load_prepared file)", 1,  # name kept for existing reports; reads a stored image
            time_calls(lambda: load_stored(path, bundle.input_spec), iterations, warmup)))

    backbone = Path(backbone_onnx) if backbone_onnx is not None else bundle.path / BACKBONE_FILE
    for name in names:
        try:
            backend = backend_class(name)(bundle, **options.get(name, {}))
        except InspectdError as exc:
            result.skipped[name] = str(exc)
            continue
        extra_backends: list[Any] = []
        try:
            result.engines[name] = backend.describe()
            timed: dict[str, Callable[[np.ndarray], Any]] = {name: backend.infer}
            if name == "onnxruntime" and options.get(name, {}).get("precision", "fp32") == "fp32":
                # An INT8 engine cached for this bundle, ORT and CPU: its rows beside FP32, interleaved.
                int8 = _int8_backend(bundle, options.get(name, {}), result)
                if int8 is not None:
                    extra_backends.append(int8)
                    result.engines[INT8_ROW] = int8.describe()
                    timed[INT8_ROW] = int8.infer
            if name == "onnxruntime" and backbone.is_file():
                # Timed interleaved with the whole engine, so the engine/backbone ratio is not
                # skewed by load changing between two separate runs.
                timed["backbone-only (onnxruntime)"] = _ort_runner(
                    backbone, int(options.get("onnxruntime", {}).get("threads", 0)))
            for k in batch_sizes:
                x = np.ascontiguousarray(inputs[:k])
                times = time_interleaved({label: (lambda fn=fn: fn(x)) for label, fn in timed.items()},
                                         iterations, warmup)
                result.rows.extend(LatencyStats.from_seconds(label, k, t) for label, t in times.items())
            if rate is not None:
                x1 = np.ascontiguousarray(inputs[:1])
                result.rows.append(LatencyStats.from_seconds(
                    paced_row(name, rate), 1, time_paced(lambda: backend.infer(x1), iterations, warmup, 1.0 / rate)))
        finally:
            backend.close()
            for extra in extra_backends:
                extra.close()
    return result


INT8_ROW = "onnxruntime int8"


def paced_row(backend: str, rate: float) -> str:
    return f"{backend} @ {rate:g} calls/s"


def _int8_backend(bundle: Bundle, ort_options: dict[str, Any], result: BenchResult) -> Any:
    """The ONNX Runtime INT8 backend when a verified INT8 engine is cached, else None (with the
    reason in result.skipped when the cache holds INT8 engines that do not fit)."""
    from inspectd.engines.runtime import ort_int8
    from inspectd.engines.runtime.onnxruntime_backend import OnnxRuntimeBackend

    if not ort_int8.engine_cache(bundle).known_keys():
        return None
    opts = {k: v for k, v in ort_options.items() if k != "precision"}
    try:
        return OnnxRuntimeBackend(bundle, precision="int8", **opts)
    except InspectdError as exc:
        result.skipped[INT8_ROW] = str(exc)
        return None


def _ort_runner(path: os.PathLike, threads: int) -> Callable[[np.ndarray], Any]:
    """The backbone-only graph with the same session options as the reference backend."""
    import onnxruntime as ort

    from inspectd.engines.runtime.onnxruntime_backend import default_intra_op_threads, session_options

    # The backend's own default threads and session options, not every CPU of the machine.
    opts = session_options(ort, threads or default_intra_op_threads())
    try:
        session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT's own exception types
        raise InspectdError(f"{path}: ONNX Runtime cannot load it: {str(exc).splitlines()[0]}") from None
    input_name = session.get_inputs()[0].name
    return lambda x: session.run(None, {input_name: x})


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine(),
                           "cpu_count": os.cpu_count(), "cpu": _cpu_model()}
    try:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return env


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
