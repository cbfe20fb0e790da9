"""The one small interface every runtime backend implements."""

from __future__ import annotations

import abc
from typing import Any

import numpy as np

from inspectd.engines.bundle import Bundle
from inspectd.errors import InspectdError


class InputShapeError(InspectdError):
    """A batch whose shape or dtype is not what the engine was built for."""


class Backend(abc.ABC):
    """Loads a bundle; `infer(batch_uint8) -> (raw_scores[N], maps[N, Hm, Wm])`.

    A backend is used from one thread (the line's inference worker) and released with
    `close()` (or as a context manager), never by garbage collection.
    """

    name: str = "?"
    # True only for the configuration the thresholds were calibrated with (ONNX Runtime, FP32, CPU):
    # every other backend or configuration passes the parity gate before it serves a line.
    is_reference: bool = False

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle

    @abc.abstractmethod
    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw image scores (float32, N) and anomaly maps (float32, N x Hm x Wm)."""

    def close(self) -> None:  # noqa: B027 - optional for backends without resources
        """Release device memory, sessions, contexts. Idempotent."""

    def describe(self) -> dict[str, Any]:
        """Facts for `engine_info` (device, precision, providers, ...)."""
        return {"backend": self.name}

    def check_batch(self, batch: np.ndarray) -> None:
        expected = self.bundle.input_spec.shape
        if not isinstance(batch, np.ndarray):
            raise InputShapeError(f"{self.name}: expected a numpy uint8 array, got {type(batch).__name__}")
        if batch.dtype != np.uint8:
            raise InputShapeError(f"{self.name}: expected dtype uint8, got {batch.dtype}")
        if batch.ndim != 4 or tuple(batch.shape[1:]) != expected or batch.shape[0] < 1:
            raise InputShapeError(f"{self.name}: expected input N x {expected[0]} x {expected[1]} x "
                                  f"{expected[2]} (NHWC), got {' x '.join(map(str, batch.shape))}")

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
