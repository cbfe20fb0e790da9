"""ONNX Runtime backend: the reference (CPU) and the default on machines without TensorRT.

With onnxruntime-gpu installed it uses the TensorRT / CUDA execution providers, with their
engine and timing caches stored next to the bundle.
"""

from __future__ import annotations

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


def default_intra_op_threads(lines_sharing: int = 1) -> int:
    """The documented default: the usable CPUs split evenly between the lines that run ONNX
    Runtime in this process (at least 1 each), so lines do not oversubscribe the cores."""
    return max(1, usable_cpus() // max(1, int(lines_sharing)))


def unavailable_reason() -> str | None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        return f"onnxruntime is not installed ({exc})"
    return None


class OnnxRuntimeBackend(Backend):
    name = NAME

    def __init__(self, bundle: Bundle, threads: int = 0, device: str = "cpu", fp16: bool = False,
                 intra_op_threads: int | None = None) -> None:
        """`intra_op_threads` (alias `threads`, kept for the CLIs): threads inside one operator;
        0 / None = every CPU this process may use (os.sched_getaffinity)."""
        super().__init__(bundle)
        reason = unavailable_reason()
        if reason:
            raise BackendUnavailable(reason)
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Batch 1 on a line PC: one op at a time, all threads inside the op, no thread spinning
        # that would steal cores from acquisition and publishing.
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        wanted = int(intra_op_threads or threads or 0)
        if wanted < 0:
            raise ConfigError(f"onnxruntime intra_op_threads must be >= 0, got {wanted}")
        opts.intra_op_num_threads = wanted or usable_cpus()
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        providers = self._providers(ort, device, fp16)
        try:
            self._session = ort.InferenceSession(str(bundle.model_path), sess_options=opts, providers=providers)
        except Exception as exc:  # ORT raises its own exception types for bad models
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
            chosen.append("CUDAExecutionProvider")
        if not chosen:
            raise BackendUnavailable(f"onnxruntime has no GPU execution provider (has {', '.join(available)})")
        return chosen + ["CPUExecutionProvider"]

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.check_batch(batch)
        scores, maps = self._session.run(self._outputs, {self._input: batch})
        return np.asarray(scores, dtype=np.float32).reshape(-1), np.asarray(maps, dtype=np.float32)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "providers": self._session.get_providers(),
                "intra_op_threads": self._threads}

    def close(self) -> None:
        self._session = None  # type: ignore[assignment]  # ORT frees the session with its last reference
