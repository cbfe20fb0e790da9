"""Parts every engine method shares: uint8 image batch in, (raw image score, anomaly map) out.

    images uint8 N x H x W x C (the bundle input: one frame, or the canvas its tiles cover)
      -> overlapping tiles, tile-major per frame                          (tile_images)
      -> float, grey replicated to 3 channels, backbone normalisation      (InputAdapter)
      -> the method's per-position maps (methods/<name>.py)
      -> each map standardised, upsampled, averaged, stitched, smoothed    (MapHead)
      -> image score = mean, top-k mean or max of the map; then the map is drawn where its cells
         look (the shift), which moves border cells partly out of the frame: hence score first

Every constant lives in the graph, so the exported ONNX model needs nothing but the uint8 image.
build_from_bundle rebuilds any bundle's engine in PyTorch (the torch backend) through its method.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from inspectd.engines.model_config import ModelConfig

__all__ = ["InputAdapter", "MapHead", "ModelConfig", "build_from_bundle", "map_heads", "place_maps", "resample_grid",
           "save_weights", "tile_images"]


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


def tile_images(images: torch.Tensor, c: ModelConfig) -> torch.Tensor:
    """N x H x W x C canvas -> (N*T) x th x tw x C overlapping tiles, tile-major per frame."""
    if c.tiles == (1, 1):
        return images
    parts = [images[:, y0:y0 + c.image_height, x0:x0 + c.image_width]
             for y0 in range(0, c.tiles[0] * c.tile_stride[0], c.tile_stride[0])
             for x0 in range(0, c.tiles[1] * c.tile_stride[1], c.tile_stride[1])]
    return torch.stack(parts, dim=1).reshape(-1, c.image_height, c.image_width, images.shape[-1])


def resample_grid(f: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A feature map (N, C, h, w) onto a coarser grid by average pooling (local aggregation, like patch
    pooling) where the sizes divide, else (a finer grid, or one that does not divide) bilinearly."""
    h, w = int(f.shape[-2]), int(f.shape[-1])  # static: input sizes are fixed per bundle
    if (h, w) == size:
        return f
    if h >= size[0] and w >= size[1] and h % size[0] == 0 and w % size[1] == 0:
        return F.avg_pool2d(f, kernel_size=(h // size[0], w // size[1]))  # local aggregation, like patch pooling
    return F.interpolate(f, size=size, mode="bilinear", align_corners=False)


def shift_map(amap: torch.Tensor, shift: tuple[int, int]) -> torch.Tensor:
    """(..., H, W) maps drawn `shift` = (down, right) pixels further (negative: up / left), the
    borders replicated: where a feature cell looks is not the centre of its block (RESULTS.md §17)."""
    dy, dx = shift
    if dy == 0 and dx == 0:
        return amap
    h, w = amap.shape[-2:]
    p = max(abs(dy), abs(dx))
    padded = F.pad(amap, (p, p, p, p), mode="replicate")
    return padded[..., p - dy:p - dy + h, p - dx:p - dx + w]


class MapHead(nn.Module):
    """The method's per-tile maps (one or more sources) -> one stitched, smoothed anomaly map of the
    frame -> image score. Each source is standardised by its statistics on good training positions
    (nll_mean / nll_std: the names of the first method's buffers, kept so older bundles load)."""

    def __init__(self, config: ModelConfig, n_maps: int, source_pad: int = 0) -> None:
        """`source_pad`: input pixels the sources' grids extend below and right of the tile
        (ModelConfig.edge_pad of an engine that pads its input; untiled engines only)."""
        super().__init__()
        c = config
        self.tile_map = (c.image_height // c.map_stride, c.image_width // c.map_stride)
        self.pad = source_pad // c.map_stride  # map pixels past the tile's bottom and right edges
        if self.pad and tuple(c.tiles) != (1, 1):
            raise ValueError("a map head with padded sources takes untiled engines only")
        self.frame_map = (c.input_height // c.map_stride, c.input_width // c.map_stride)
        self.tiles = tuple(c.tiles)
        self.stride = (c.tile_stride[0] // c.map_stride, c.tile_stride[1] // c.map_stride)
        self.reduction = c.reduction
        self.shift = tuple(int(v) for v in c.map_shift)  # (down, right) in map pixels
        self.score_before_shift = c.score_before_shift  # the score sees every cell at its full value
        self.topk = max(1, int(round(c.topk_fraction * self.frame_map[0] * self.frame_map[1])))
        self.register_buffer("nll_mean", torch.zeros(n_maps))
        self.register_buffer("nll_std", torch.ones(n_maps))
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

    def stitched(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """maps: per source (N*T, h, w) at any resolution -> standardised, upsampled, averaged and
        stitched (N, 1, H, W); past the frame's bottom and right edges by the padded sources, if any."""
        acc = None
        size = (self.tile_map[0] + self.pad, self.tile_map[1] + self.pad)
        for i, source in enumerate(maps):
            m = (source.unsqueeze(1) - self.nll_mean[i]) / self.nll_std[i]
            if tuple(m.shape[-2:]) != size:
                m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
            acc = m if acc is None else acc + m
        return self.stitch((acc / len(maps))[:, 0])[:, None]

    def scored_map(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """What the image score reduces (ModelConfig.score_before_shift): the smoothed stitched map
        before it is drawn where its cells look, every cell at its full value, the padded ones too
        (they look inside the frame). (N, 1, H, W)."""
        return self.smooth(self.stitched(maps))

    def forward(self, maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """maps: per source (N*T, h, w) at any resolution -> (image score, the frame's map)."""
        if not self.score_before_shift:  # bundles before: the score of the shifted map (no padded sources)
            amap = self.smooth(shift_map(self.stitched(maps), self.shift))[:, 0]
            return self.reduce(amap), amap
        amap = self.scored_map(maps)
        h, w = self.frame_map  # the drawn map, cut back to the frame
        return self.reduce(amap[:, 0]), shift_map(amap, self.shift)[:, 0, :h, :w]

    def smooth(self, amap: torch.Tensor) -> torch.Tensor:
        r = self.kernel.numel() // 2
        if r > 0:
            amap = F.pad(amap, (r, r, r, r), mode="replicate")
            amap = F.conv2d(amap, self.kernel.view(1, 1, 1, -1))
            amap = F.conv2d(amap, self.kernel.view(1, 1, -1, 1))
        return amap

    def reduce(self, amap: torch.Tensor, reduction: str | None = None) -> torch.Tensor:
        """(N, H, W) maps -> image scores by `reduction` (default: the configured one)."""
        return reduce_flat(amap.flatten(1), reduction or self.reduction, self.topk)


def reduce_flat(flat: torch.Tensor, reduction: str, k: int) -> torch.Tensor:
    """(N, P) flattened maps -> image scores: the mean of the top `k` values ("topk"), the mean or the
    max. The engine's head and label-free selection reduce with this one rule."""
    if reduction == "topk":
        return flat.topk(k, dim=1).values.mean(dim=1)
    if reduction == "mean":
        return flat.mean(dim=1)
    return flat.max(dim=1).values


def map_heads(model: nn.Module) -> dict[str, MapHead]:
    """The engine's map heads by module name (the keys of ModelConfig.head_shifts)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MapHead)}


def place_maps(model: nn.Module, config: ModelConfig) -> None:
    """Draw every map head's map where the config says (ModelConfig.shift_of)."""
    for name, head in map_heads(model).items():
        head.shift = config.shift_of(name)


WEIGHTS_FILE = "weights.npz"


def save_weights(model: nn.Module, path: Path) -> None:
    """All tensors as a plain .npz (no pickle): what the torch backend rebuilds the model from."""
    arrays = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def build_from_bundle(bundle: Any, device: str = "cpu") -> nn.Module:
    """The bundle's engine in PyTorch (for the torch backend), from its method, the manifest config
    and weights.npz."""
    from inspectd.engines import methods

    config = bundle.manifest.training.config
    method = methods.get(bundle.manifest.method.name)
    model_config = ModelConfig.from_dict(config["model"])
    model = method.build(model_config, config.get("options", {}))
    place_maps(model, model_config)
    with np.load(bundle.path / WEIGHTS_FILE, allow_pickle=False) as data:
        state = {k: torch.from_numpy(data[k]) for k in data.files}
    model.load_state_dict(state, strict=True)
    return model.eval().to(device)
