"""The one small interface every engine method implements (one method, one file beside this one).

A method turns prepared good images into a torch module with the bundle contract
    forward(images uint8 N x H x W x C) -> (raw score (N,), anomaly map (N, h, w))
and a `.config` (ModelConfig: input geometry, backbone, map head). train.py does everything else
the same way for every method: reading and splitting images, export, golden images, manifest.
eval, calibrate, the parity gate and the daemon only ever see model.onnx.
"""

from __future__ import annotations

import dataclasses
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
    # Defects made by `inspectd synthesize` found in the --bad folder (named in its manifest), kept
    # apart from the real ones so a method can weigh them (classifier: `real_share`).
    synthetic: list[np.ndarray] = field(default_factory=list)
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
    train_flags: frozenset[str]  # the method-specific `inspectd train` flags it uses (MethodBase)
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


def options_from(cls: type, raw: dict[str, Any], method: str) -> Any:
    """A method's options dataclass from raw values (CLI strings or manifest JSON): unknown keys
    and values of the wrong type are a ValueError naming the option."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in fields:
            raise ValueError(f"option {key!r} is not an option of method {method} "
                             f"(options: {', '.join(f.replace('_', '-') for f in fields) or 'none'})")
        default = fields[name].default
        kind = type(default) if default is not dataclasses.MISSING else str
        try:
            if kind is bool and isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise ValueError(value)
                value = value.lower() in ("true", "1", "yes", "on")
            elif kind in (int, float, str):
                if kind is int and isinstance(value, float) and not value.is_integer():
                    raise ValueError(value)
                value = kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"option {key}={value!r}: expected {kind.__name__} for method {method}") from None
        kwargs[name] = value
    options = cls(**kwargs)
    check = getattr(options, "check", None)
    if check is not None:
        check()
    return options


def options_to_dict(options: Any) -> dict[str, Any]:
    return dataclasses.asdict(options) if dataclasses.is_dataclass(options) else {}


class MethodBase:
    """What the methods share: options parsed from plain data into the method's `options_cls`
    dataclass and written back, and the traced ONNX export (a method overrides what it must)."""

    name: str
    options_cls: type
    # Whether the engine's map goes through MapHead, so `inspectd train` chooses where it is drawn
    # (fitting.select_map_shift); a method placing its own map (the classifier's CAM) says False.
    map_shift_selection: bool = True
    # The optional `inspectd train` flags (argparse dests) that change what this method trains; any
    # other one given is named in a one-line "ignoring" warning instead of recorded as if it counted.
    # (--good/--out/--image-size/--tiles/--roi/--epochs/--seed/--color/--batch-size/--no-select and
    # --option apply to every method.)
    train_flags: frozenset[str] = frozenset()

    def parse_options(self, raw: dict[str, Any]) -> Any:
        return options_from(self.options_cls, raw, self.name)

    def options_dict(self, options: Any) -> dict[str, Any]:
        return options_to_dict(options)

    def export(self, model: "nn.Module", path: Path) -> None:
        from inspectd.engines.export import export_onnx

        export_onnx(model, path)
