"""The one small interface every engine method implements (one method, one file beside this one).

A method turns prepared good images into a torch module with the bundle contract
    forward(images uint8 N x H x W x C) -> (raw score (N,), anomaly map (N, h, w))
and a `.config` (ModelConfig: input geometry, backbone, map head). train.py does everything else
the same way for every method: reading and splitting images, export, golden images, manifest.
eval, calibrate, the parity gate and the daemon only ever see model.onnx.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:  # torch stays out of this module's import: the CLI lists methods without it
    import torch
    from torch import nn

    from inspectd.engines.model_config import ModelConfig
    from inspectd.engines.train import TrainConfig


@dataclass
class FitData:
    """What a method fits on: prepared images at the bundle input size, never a test image."""

    train: list[np.ndarray]
    holdout: list[np.ndarray]  # held-out good images: validation and standardisation, never trained on
    cfg: "TrainConfig"
    options: Any               # the method's own options (its `parse_options` result)
    rng: np.random.Generator
    device: "torch.device"
    # Defective images (--bad), prepared like the good ones; empty for good-only methods, which
    # train() never gives them to. Only methods with `needs_defects = True` receive them.
    bad: list[np.ndarray] = field(default_factory=list)
    # Background images (--backgrounds) at the input size, for methods with `uses_backgrounds = True`
    # (empty: none given; such a method generates its own).
    backgrounds: list[np.ndarray] = field(default_factory=list)


@dataclass
class Fitted:
    model: "nn.Module"
    final_loss: float
    selection: dict[str, Any] = field(default_factory=lambda: {"enabled": False})
    details: dict[str, Any] = field(default_factory=dict)  # method facts for the manifest (method.details)


class Method(Protocol):
    name: str
    summary: str
    default_epochs: int
    # Optional (train() reads them with getattr, default False / 0): a method that learns from
    # defective images declares `needs_defects = True` and `min_defects` (train() refuses fewer, in
    # one line); `uses_backgrounds = True` to receive --backgrounds. Good-only methods ignore --bad
    # and --backgrounds with a one-line warning.

    def parse_options(self, raw: dict[str, Any]) -> Any:
        """Validated options (unknown keys and bad values: ValueError naming the option)."""

    def options_dict(self, options: Any) -> dict[str, Any]:
        """Options as plain JSON data (what the manifest records and `build` reads back)."""

    def fit(self, data: FitData) -> Fitted:
        """Train on data.train, choose with data.holdout; return the engine ready to export."""

    def build(self, model_config: "ModelConfig", options: dict[str, Any]) -> "nn.Module":
        """An untrained engine of the same shape (the torch backend loads weights.npz into it)."""

    def export(self, model: "nn.Module", path: Path) -> None:
        """Write model.onnx (the shared traced export unless the method needs more, e.g. a Loop)."""
