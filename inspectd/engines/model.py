"""The whole engine as one torch module: uint8 image batch -> (raw image score, anomaly map).

    images uint8 N x H x W x C
      -> float, grey replicated to 3 channels, backbone normalisation      (InputAdapter)
      -> EfficientNet feature taps (frozen, ImageNet weights)               (backbone.py)
      -> per-channel standardisation of each tap (training statistics)
      -> one normalizing flow per tap -> per-position NLL                  (flow.py)
      -> per-tap NLL standardised, upsampled, averaged, Gaussian-smoothed   (MapHead)
      -> image score = max (or top-k mean) of the map

Every constant lives in the graph, so the exported ONNX model needs nothing but the uint8 image.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from inspectd.engines.backbone import EfficientNetFeatures, load_backbone
from inspectd.engines.flow import ScaleFlow


@dataclass
class ModelConfig:
    backbone: str = "efficientnet-lite0"
    taps: list[int] = field(default_factory=lambda: [4, 10, 15])
    image_size: int = 256
    color_mode: str = "gray"
    # "separate": one flow per tap at its own resolution. "fused": every tap average-pooled (or
    # upsampled) to fused_size x fused_size and concatenated, one flow over the joint embedding.
    # Defaults from the MTD design study (benchmarks/RESULTS.md): fused 8x8, 3x3 subnets, |z|^2, mean.
    fusion: str = "fused"
    fused_size: int = 8
    steps: int = 4
    hidden_ratio: float = 0.4
    kernel_size: int = 3
    clamp: float = 2.0
    map_size: int = 64
    smoothing_sigma: float = 1.0   # in map pixels
    # Per-position anomaly: "nll" = 0.5|z|^2 - log|det J| (the training loss), or "z2" = 0.5|z|^2
    # alone (DifferNet / CS-Flow score with the Jacobian term dropped).
    score_term: str = "z2"
    reduction: str = "mean"        # "max" | "topk" | "mean" (of the map)
    topk: int = 10
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


class InputAdapter(nn.Module):
    """uint8 NHWC (1 or 3 channels) -> normalised float NCHW with 3 channels."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], channels: int) -> None:
        super().__init__()
        self.grey = channels == 1
        self.register_buffer("scale", (1.0 / (255.0 * torch.tensor(std))).view(1, 3, 1, 1))
        self.register_buffer("offset", (-torch.tensor(mean) / torch.tensor(std)).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float()
        if self.grey:
            x = x.expand(-1, 3, -1, -1)  # grey cameras: explicit replication to the 3 backbone channels
        return x * self.scale + self.offset


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


class MapHead(nn.Module):
    """Per-tap NLL maps -> one smoothed anomaly map at a fixed resolution -> image score."""

    def __init__(self, n_taps: int, map_size: int, sigma: float, reduction: str, topk: int) -> None:
        super().__init__()
        self.map_size = map_size
        self.reduction = reduction
        self.topk = topk
        self.register_buffer("nll_mean", torch.zeros(n_taps))
        self.register_buffer("nll_std", torch.ones(n_taps))
        self.register_buffer("kernel", gaussian_kernel1d(sigma) if sigma > 0 else torch.ones(1))

    def forward(self, nlls: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        acc = None
        for i, nll in enumerate(nlls):
            m = (nll.unsqueeze(1) - self.nll_mean[i]) / self.nll_std[i]
            m = F.interpolate(m, size=(self.map_size, self.map_size), mode="bilinear", align_corners=False)
            acc = m if acc is None else acc + m
        amap = acc / len(nlls)
        r = self.kernel.numel() // 2
        if r > 0:
            amap = F.pad(amap, (r, r, r, r), mode="replicate")
            amap = F.conv2d(amap, self.kernel.view(1, 1, 1, -1))
            amap = F.conv2d(amap, self.kernel.view(1, 1, -1, 1))
        amap = amap[:, 0]
        flat = amap.flatten(1)
        if self.reduction == "topk":
            score = flat.topk(self.topk, dim=1).values.mean(dim=1)
        elif self.reduction == "mean":
            score = flat.mean(dim=1)
        else:
            score = flat.max(dim=1).values
        return score, amap


def _resample(f: torch.Tensor, size: int) -> torch.Tensor:
    h = int(f.shape[-1])  # static: input sizes are fixed per bundle
    if h > size:
        k = h // size
        return F.avg_pool2d(f, kernel_size=k, stride=k)  # local aggregation, like patch pooling
    if h < size:
        return F.interpolate(f, size=(size, size), mode="bilinear", align_corners=False)
    return f


class AnomalyModel(nn.Module):
    def __init__(self, config: ModelConfig, backbone: EfficientNetFeatures) -> None:
        super().__init__()
        if config.fusion not in ("separate", "fused"):
            raise ValueError(f"fusion must be 'separate' or 'fused', not {config.fusion!r}")
        self.config = config
        self.adapter = InputAdapter(*backbone.norm, channels=1 if config.color_mode == "gray" else 3)
        self.backbone = backbone
        channels = (backbone.tap_channels if config.fusion == "separate" else [sum(backbone.tap_channels)])
        self.feat_mean = nn.ParameterList(nn.Parameter(torch.zeros(1, c, 1, 1), requires_grad=False)
                                          for c in channels)
        self.feat_std = nn.ParameterList(nn.Parameter(torch.ones(1, c, 1, 1), requires_grad=False)
                                         for c in channels)
        self.flows = nn.ModuleList(
            ScaleFlow(c, config.steps, config.hidden_ratio, config.kernel_size, config.clamp, config.seed * 10 + i)
            for i, c in enumerate(channels))
        self.head = MapHead(len(channels), config.map_size, config.smoothing_sigma, config.reduction, config.topk)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Raw backbone taps."""
        return self.backbone(self.adapter(images))

    def embed(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Taps -> what the flows model (before standardisation): what training caches."""
        if self.config.fusion == "separate":
            return feats
        size = self.config.fused_size
        return [torch.cat([_resample(f, size) for f in feats], dim=1)]

    def nll_maps(self, embedded: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-position anomaly maps, one per flow (see ModelConfig.score_term)."""
        out = []
        for f, m, s, flow in zip(embedded, self.feat_mean, self.feat_std, self.flows):
            half_z2, logdet = flow.transform((f - m) / s)
            out.append(half_z2 if self.config.score_term == "z2" else half_z2 - logdet)
        return out

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.nll_maps(self.embed(self.features(images))))


def build_model(config: ModelConfig, weights: str | None = None) -> AnomalyModel:
    backbone = load_backbone(config.backbone, config.taps, weights)
    return AnomalyModel(config, backbone)


WEIGHTS_FILE = "weights.npz"


def save_weights(model: AnomalyModel, path: Path) -> None:
    """All tensors as a plain .npz (no pickle): what the torch backend rebuilds the model from."""
    arrays = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def build_from_bundle(bundle: Any, device: str = "cpu") -> AnomalyModel:
    """The bundle's model in PyTorch (for the torch backend), from manifest config + weights.npz."""
    config = ModelConfig.from_dict(bundle.manifest.training.config["model"])
    backbone = EfficientNetFeatures(config.backbone, config.taps)
    model = AnomalyModel(config, backbone)
    with np.load(bundle.path / WEIGHTS_FILE, allow_pickle=False) as data:
        state = {k: torch.from_numpy(data[k]) for k in data.files}
    model.load_state_dict(state, strict=True)
    return model.eval().to(device)
