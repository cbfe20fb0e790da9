"""PyTorch backend (training extra): the same model on a CUDA GPU without TensorRT, and a GPU
reference. FP16 via autocast and a CUDA graph captured at a fixed batch on CUDA; plain FP32
eager on CPU (allowed only when asked for explicitly, e.g. by tests). Under autocast the layers up
to the first feature tap stay FP32 (backbone.full_precision; runtime/precision.py says why), and
cuDNN's TF32 is off. `fp16=True` on CPU runs the same autocast there: FP16 arithmetic without a
GPU, so `inspectd check-engine --backend torch --option device=cpu --option fp16=true` tells on
the training machine whether a bundle's FP16 engine can pass the parity gate.

The model comes from `inspectd.engines.model.build_from_bundle(bundle) -> nn.Module`, whose
forward takes the same uint8 N x H x W x C tensor as model.onnx and returns
(raw_scores[N], maps[N, Hm, Wm]). torch is imported only inside this backend.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np

from inspectd.engines.bundle import Bundle
from inspectd.engines.runtime.base import Backend
from inspectd.errors import BackendUnavailable, BundleError

NAME = "torch"


def unavailable_reason(device: str = "cuda") -> str | None:
    if importlib.util.find_spec("torch") is None:
        return "torch not installed (install inspectd[train])"
    if device == "cpu":
        return None
    import torch

    if not torch.cuda.is_available():
        return f"no CUDA device (torch {torch.__version__}: torch.cuda.is_available() is False)"
    return None


class TorchBackend(Backend):
    name = NAME

    def __init__(self, bundle: Bundle, device: str = "cuda", fp16: bool | None = None, cuda_graph: bool = True,
                 graph_batch: int = 1, threads: int = 0) -> None:
        super().__init__(bundle)
        reason = unavailable_reason(device)
        if reason:
            raise BackendUnavailable(reason)
        import torch

        try:
            from inspectd.engines.model import build_from_bundle
        except ImportError as exc:
            raise BackendUnavailable(f"torch backend needs inspectd.engines.model.build_from_bundle ({exc})") from None
        self._torch = torch
        self._device = torch.device(device)
        self._cuda = self._device.type == "cuda"
        if threads and not self._cuda:
            torch.set_num_threads(int(threads))
        if self._cuda:
            # Process-wide, and this backend is the daemon's only torch user: FP32 layers exact.
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        try:
            model = build_from_bundle(bundle)
        except (OSError, KeyError, ValueError, RuntimeError) as exc:
            raise BundleError(f"{bundle.path}: cannot build the torch model: {str(exc).splitlines()[0]}") from None
        self._model = model.eval().to(self._device)
        # By default FP16 only where it pays (tensor cores); the parity gate checks it against
        # ONNX Runtime. On CPU only when asked for: an emulation of a GPU's FP16 engine.
        self._fp16 = self._cuda if fp16 is None else bool(fp16)
        self._graph: Any = None
        self._graph_batch = int(graph_batch)
        self._static_in: Any = None
        self._static_out: tuple[Any, Any] | None = None
        if self._cuda and cuda_graph:
            self._capture()

    def _forward(self, x: Any) -> tuple[Any, Any]:
        torch = self._torch
        with torch.inference_mode(), torch.autocast(self._device.type, dtype=torch.float16, enabled=self._fp16):
            scores, maps = self._model(x)
        return scores.float(), maps.float()

    def _capture(self) -> None:
        """Capture one CUDA graph at the line's batch: replay skips per-kernel launch overhead,
        which dominates at batch 1 for a small model."""
        torch = self._torch
        self._static_in = torch.zeros((self._graph_batch, *self.bundle.input_spec.shape), dtype=torch.uint8,
                                      device=self._device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up outside the graph (cuDNN autotune, allocator)
                self._forward(self._static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._static_out = self._forward(self._static_in)
        self._graph = graph

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.check_batch(batch)
        torch = self._torch
        host = torch.from_numpy(np.ascontiguousarray(batch))
        if self._graph is not None and batch.shape[0] == self._graph_batch:
            self._static_in.copy_(host, non_blocking=False)
            self._graph.replay()
            scores, maps = self._static_out  # type: ignore[misc]
        else:
            scores, maps = self._forward(host.to(self._device))
        # .cpu() synchronises: the copies back are part of the measured latency.
        return (scores.detach().cpu().numpy().astype(np.float32).reshape(-1),
                maps.detach().cpu().numpy().astype(np.float32))

    def describe(self) -> dict[str, Any]:
        torch = self._torch
        facts: dict[str, Any] = {"backend": self.name, "device": str(self._device), "torch": torch.__version__,
                                 "precision": "fp16-autocast" if self._fp16 else "fp32",
                                 "cuda_graph_batch": self._graph_batch if self._graph is not None else None}
        if self._cuda:
            facts["gpu"] = torch.cuda.get_device_name(self._device)
        return facts

    def close(self) -> None:
        self._graph = None
        self._static_in = None
        self._static_out = None
        self._model = None
        if self._cuda:
            self._torch.cuda.empty_cache()
