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
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from inspectd.engines.backbone import EfficientNetFeatures, load_backbone
from inspectd.engines.flow import ScaleFlow
from inspectd.engines.model_config import ModelConfig

__all__ = ["AnomalyModel", "ModelConfig", "build_from_bundle", "build_model", "save_weights"]


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


def positional_encoding(channels: int, height: int, width: int) -> torch.Tensor:
    """2-D sinusoidal position channels (1, channels, H, W): half for rows, half for columns."""
    quarter = channels // 4
    freq = torch.exp(torch.arange(quarter, dtype=torch.float32) * (-math.log(100.0) / max(1, quarter)))
    ys = torch.arange(height, dtype=torch.float32)[:, None] / max(1, height) * 2 * math.pi * 4
    xs = torch.arange(width, dtype=torch.float32)[:, None] / max(1, width) * 2 * math.pi * 4
    py = torch.cat([torch.sin(ys * freq), torch.cos(ys * freq)], dim=1).T[:, :, None].expand(-1, height, width)
    px = torch.cat([torch.sin(xs * freq), torch.cos(xs * freq)], dim=1).T[:, None, :].expand(-1, height, width)
    return torch.cat([py, px], dim=0)[None].contiguous()


class MapHead(nn.Module):
    """Per-flow maps of every tile -> one stitched, smoothed anomaly map of the frame -> image score."""

    def __init__(self, config: ModelConfig, n_flows: int) -> None:
        super().__init__()
        c = config
        self.tile_map = (c.image_height // c.map_stride, c.image_width // c.map_stride)
        self.frame_map = (c.input_height // c.map_stride, c.input_width // c.map_stride)
        self.tiles = tuple(c.tiles)
        self.stride = (c.tile_stride[0] // c.map_stride, c.tile_stride[1] // c.map_stride)
        self.reduction = c.reduction
        self.topk = max(1, int(round(c.topk_fraction * self.frame_map[0] * self.frame_map[1])))
        self.register_buffer("nll_mean", torch.zeros(n_flows))
        self.register_buffer("nll_std", torch.ones(n_flows))
        self.register_buffer("kernel", gaussian_kernel1d(c.smoothing_sigma) if c.smoothing_sigma > 0
                             else torch.ones(1))
        count = torch.zeros(self.frame_map)
        for y0, x0 in self.offsets():
            count[y0:y0 + self.tile_map[0], x0:x0 + self.tile_map[1]] += 1
        self.register_buffer("inv_count", (1.0 / count)[None], persistent=False)

    def offsets(self) -> list[tuple[int, int]]:
        return [(r * self.stride[0], k * self.stride[1]) for r in range(self.tiles[0]) for k in range(self.tiles[1])]

    def stitch(self, maps: torch.Tensor) -> torch.Tensor:
        """(N*T, h, w) tile maps, tile-major within each frame -> (N, H, W) frame maps (overlaps averaged)."""
        n_tiles = self.tiles[0] * self.tiles[1]
        if n_tiles == 1:
            return maps
        per_frame = maps.reshape(-1, n_tiles, self.tile_map[0], self.tile_map[1])
        out = None
        for t, (y0, x0) in enumerate(self.offsets()):
            pad = (x0, self.frame_map[1] - x0 - self.tile_map[1], y0, self.frame_map[0] - y0 - self.tile_map[0])
            part = F.pad(per_frame[:, t], pad)
            out = part if out is None else out + part
        return out * self.inv_count

    def forward(self, nlls: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        acc = None
        for i, nll in enumerate(nlls):
            m = (nll.unsqueeze(1) - self.nll_mean[i]) / self.nll_std[i]
            m = F.interpolate(m, size=self.tile_map, mode="bilinear", align_corners=False)
            acc = m if acc is None else acc + m
        amap = self.stitch((acc / len(nlls))[:, 0])[:, None]
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


def _resample(f: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    h, w = int(f.shape[-2]), int(f.shape[-1])  # static: input sizes are fixed per bundle
    if (h, w) == size:
        return f
    if h >= size[0] and w >= size[1]:
        return F.avg_pool2d(f, kernel_size=(h // size[0], w // size[1]))  # local aggregation, like patch pooling
    return F.interpolate(f, size=size, mode="bilinear", align_corners=False)


class AnomalyModel(nn.Module):
    def __init__(self, config: ModelConfig, backbone: EfficientNetFeatures) -> None:
        super().__init__()
        config.check()
        self.config = config
        self.adapter = InputAdapter(*backbone.norm, channels=1 if config.color_mode == "gray" else 3)
        self.backbone = backbone
        th, tw = config.image_height, config.image_width
        if config.fusion == "separate":
            channels = list(backbone.tap_channels)
            self.grids = [(th // s, tw // s) for s in backbone.tap_strides]
        else:
            channels = [sum(backbone.tap_channels)]
            self.grids = [(th // config.fused_stride, tw // config.fused_stride)]
        self.feat_mean = nn.ParameterList(nn.Parameter(torch.zeros(1, c, 1, 1), requires_grad=False)
                                          for c in channels)
        self.feat_std = nn.ParameterList(nn.Parameter(torch.ones(1, c, 1, 1), requires_grad=False)
                                         for c in channels)
        for i, (gh, gw) in enumerate(self.grids):
            pe = positional_encoding(config.positional, gh, gw) if config.positional else torch.zeros(1, 0, gh, gw)
            self.register_buffer(f"pos{i}", pe, persistent=False)
        self.flows = nn.ModuleList(
            ScaleFlow(c, config.steps, config.hidden_ratio, config.kernel_size, config.clamp, config.seed * 10 + i,
                      cond_channels=config.positional)
            for i, c in enumerate(channels))
        self.head = MapHead(config, len(channels))

    def tile(self, images: torch.Tensor) -> torch.Tensor:
        """N x H x W x C canvas -> (N*T) x th x tw x C overlapping tiles, tile-major per frame."""
        c = self.config
        if c.tiles == (1, 1):
            return images
        parts = [images[:, y0:y0 + c.image_height, x0:x0 + c.image_width]
                 for y0 in range(0, c.tiles[0] * c.tile_stride[0], c.tile_stride[0])
                 for x0 in range(0, c.tiles[1] * c.tile_stride[1], c.tile_stride[1])]
        return torch.stack(parts, dim=1).reshape(-1, c.image_height, c.image_width, images.shape[-1])

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Raw backbone taps of every tile."""
        return self.backbone(self.adapter(self.tile(images)))

    def embed(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Taps -> what the flows model (before standardisation): what training caches."""
        k = self.config.neighbourhood
        if k > 1:
            feats = [F.avg_pool2d(f, k, stride=1, padding=k // 2, count_include_pad=False) for f in feats]
        if self.config.fusion == "separate":
            return feats
        return [torch.cat([_resample(f, self.grids[0]) for f in feats], dim=1)]

    def cond(self, i: int, n: int) -> torch.Tensor | None:
        pe = getattr(self, f"pos{i}")
        return pe.expand(n, -1, -1, -1) if pe.shape[1] else None

    def nll_maps(self, embedded: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-position anomaly maps, one per flow (see ModelConfig.score_term)."""
        out = []
        for i, (f, m, s, flow) in enumerate(zip(embedded, self.feat_mean, self.feat_std, self.flows)):
            half_z2, logdet = flow.transform((f - m) / s, self.cond(i, f.shape[0]))
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
