"""ONNX Runtime backend: the reference (CPU) and the default on machines without TensorRT.

With onnxruntime-gpu installed it uses the TensorRT / CUDA execution providers, with their
engine and timing caches stored next to the bundle. With `precision="int8"` it runs the bundle's
cached INT8 model (ort_int8.py, built by `inspectd build-engine --backend onnxruntime --precision
int8`); it never builds one, and a missing, stale or corrupt one is refused (BackendUnavailable).
Only FP32 on CPU is the reference: every other configuration passes the parity gate before a
line uses it (`is_reference`).

Threads (the documented default, `thread_budget`): the daemon's own threads (acquisition, deadline,
publisher, replay decoding) need a core too. With 3 or more usable CPUs (os.sched_getaffinity:
taskset, cgroup cpusets, systemd CPUAffinity=) the engines share usable - 1 of them; with 1 or 2,
all of them. Lines running ONNX Runtime split the engine share evenly (at least one thread each);
`backend_options.onnxruntime.intra_op_threads` sets a line's own.

Spinning (`spin`, off unless a line asks): inside one call the pool threads spin between operators
instead of sleeping, and stop spinning when the call returns (`session.force_spinning_stop`), so
they hold no core between parts. Waking a sleeping thread for each of the graph's few hundred
operators made a call 11-61 % longer on the 2-core development VM, most at a slow line's pace
(benchmarks/RESULTS.md §22). But it pays only while every engine thread has a CPU nobody else wants:
one busy process beside a spinning line engine on 2 CPUs (an operator's recalibration) gave most
parts the fail-safe verdict, a sleeping engine none (§23). A line PC runs other work, so engines
sleep; `spin: true` is for a box that runs nothing but the line.
"""

from __future__ import annotations

import hashlib
import numbers
import os
from typing import Any

import numpy as np

from inspectd.engines.bundle import Bundle
from inspectd.engines.runtime.base import Backend
from inspectd.errors import BackendUnavailable, BundleError, ConfigError

NAME = "onnxruntime"


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: taskset, cgroup cpusets, systemd
    CPUAffinity=), not every CPU of the machine."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity API on this platform
        return max(1, os.cpu_count() or 1)


# Usable CPUs from which one is left to the daemon's own threads (acquisition, deadline, publisher,
# replay decoding); below this, the engine takes every usable CPU (it is the bottleneck anyway).
RESERVE_CORE_FROM = 3


def thread_budget(usable: int, lines_sharing: int = 1) -> int:
    """Engine intra-op threads per line for `usable` CPUs: usable - 1 when usable >= 3 (one core for
    the daemon's threads), else all usable; split evenly between the ONNX Runtime lines, >= 1 each."""
    usable = max(1, int(usable))
    engines = usable - 1 if usable >= RESERVE_CORE_FROM else usable
    return max(1, engines // max(1, int(lines_sharing)))


def session_options(ort: Any, intra_op_threads: int, spin: bool = False) -> Any:
    """The session options of every CPU session the product times or scores with: batch 1 on a line
    PC, one operator at a time with all `intra_op_threads` inside it; pool threads spin between the
    operators of a call only when `spin`, and never after it returns."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    opts.add_session_config_entry("session.force_spinning_stop", "1")
    opts.log_severity_level = 3
    return opts


def default_intra_op_threads(lines_sharing: int = 1) -> int:
    """The documented default (thread_budget) for the CPUs this process may use."""
    return thread_budget(usable_cpus(), lines_sharing)


def unavailable_reason() -> str | None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        return f"onnxruntime is not installed ({exc})"
    return None


def _verified_model_bytes(bundle: Bundle) -> bytes:
    try:
        data = bundle.model_path.read_bytes()
    except OSError as exc:
        raise BundleError(f"{bundle.model_path}: cannot read the model ({exc.strerror or exc})") from None
    if hashlib.sha256(data).hexdigest() != bundle.manifest.model.sha256:
        raise BundleError(f"{bundle.model_path}: model.onnx changed on disk since bundle {bundle.bundle_id} was "
                          f"loaded (its sha256 is not the manifest's): restart the daemon to load the new bundle")
    return data


class OnnxRuntimeBackend(Backend):
    name = NAME

    def __init__(self, bundle: Bundle, threads: int = 0, device: str = "cpu", fp16: bool = False,
                 intra_op_threads: int | None = None, precision: str = "fp32",
                 int8_recipe: str | None = None, spin: bool = False) -> None:
        """`intra_op_threads` (alias `threads`, kept for the CLIs): threads inside one operator;
        0 / None = the documented default for the CPUs this process may use (thread_budget).
        `spin`: pool threads spin between the operators of a call (only on a box that runs nothing
        else: see the module docstring).
        `precision`: fp32 (model.onnx) or int8 (the cached INT8 model, CPU only)."""
        super().__init__(bundle)
        reason = unavailable_reason()
        if reason:
            raise BackendUnavailable(reason)
        import onnxruntime as ort

        if precision not in ("fp32", "int8"):
            raise ConfigError(f"onnxruntime precision must be fp32 or int8, got {precision!r}")
        if precision == "int8" and device != "cpu":
            raise ConfigError("onnxruntime precision int8 runs on device cpu only")
        self._precision = precision
        model_path = bundle.model_path
        if precision == "int8":
            from inspectd.engines.runtime import ort_int8

            model_path = ort_int8.cached_int8(bundle, int8_recipe or ort_int8.DEFAULT_RECIPE)
        self._model_path = model_path
        # A subclass (a test double, a wrapper) is never the reference: it is gated like any backend.
        self.is_reference = type(self).name == NAME and device == "cpu" and precision == "fp32" and not fp16

        given = intra_op_threads or threads or 0
        if isinstance(given, bool) or not isinstance(given, numbers.Integral) or given < 0:
            raise ConfigError(f"onnxruntime intra_op_threads (threads) must be an integer >= 0, got {given!r}")
        if not isinstance(spin, bool):
            raise ConfigError(f"onnxruntime spin must be true or false, got {spin!r}")
        opts = session_options(ort, int(given) or default_intra_op_threads(), spin)
        self._spin = opts.get_session_config_entry("session.intra_op.allow_spinning") == "1"
        providers = self._providers(ort, device, fp16)
        # FP32: the bytes the manifest vouches for, checked and loaded in one read. A bundle folder
        # overwritten in place since it was loaded (train --force, an rsync) would otherwise be
        # scored with the old manifest's normalisation and threshold under the old bundle id.
        # (The INT8 model's cache entry carries its own key and hash.)
        model: str | bytes = str(model_path) if precision == "int8" else _verified_model_bytes(bundle)
        try:
            self._session = ort.InferenceSession(model, sess_options=opts, providers=providers)
        except Exception as exc:  # ORT raises its own exception types for bad models
            if precision == "int8":  # a cached engine that does not load: the line falls back
                raise BackendUnavailable(f"{bundle.path}: ONNX Runtime cannot load the INT8 model {model_path.name}: "
                                         f"{str(exc).splitlines()[0]}") from None
            raise BundleError(f"{bundle.path}: ONNX Runtime cannot load {bundle.model_path.name}: "
                              f"{str(exc).splitlines()[0]}") from None
        self._input = bundle.manifest.model.input_name
        self._outputs = list(bundle.manifest.model.output_names)
        self._threads = opts.intra_op_num_threads

    def _providers(self, ort: Any, device: str, fp16: bool) -> list[Any]:
        available = ort.get_available_providers()
        if device == "cpu":
            return ["CPUExecutionProvider"]
        cache = str(self.bundle.path / "cache" / "ort")
        chosen: list[Any] = []
        if "TensorrtExecutionProvider" in available:
            os.makedirs(cache, exist_ok=True)
            chosen.append(("TensorrtExecutionProvider", {
                "trt_fp16_enable": bool(fp16),
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": cache,
                "trt_timing_cache_enable": True,
                "trt_timing_cache_path": cache,
            }))
        if "CUDAExecutionProvider" in available:
            # FP32 without TF32 (on by default): TF32's 10-bit mantissa moved MTD scores past the
            # parity gate's tolerance (precision.py). The TensorRT provider above has no per-layer
            # precision: its FP16 engines meet the gate or the line falls back (the tensorrt backend
            # keeps the first layers FP32).
            chosen.append(("CUDAExecutionProvider", {"use_tf32": "0"}))
        if not chosen:
            raise BackendUnavailable(f"onnxruntime has no GPU execution provider (has {', '.join(available)})")
        return chosen + ["CPUExecutionProvider"]

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.check_batch(batch)
        scores, maps = self._session.run(self._outputs, {self._input: batch})
        return np.asarray(scores, dtype=np.float32).reshape(-1), np.asarray(maps, dtype=np.float32)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "providers": self._session.get_providers(),
                "intra_op_threads": self._threads, "spin": self._spin, "precision": self._precision,
                "model": self._model_path.name}

    def close(self) -> None:
        self._session = None  # type: ignore[assignment]  # ORT frees the session with its last reference
