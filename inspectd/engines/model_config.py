"""The engine's design as plain data: the one source of its defaults (no torch, so the CLI can
show them without loading the training stack)."""

from __future__ import annotations

import math

from dataclasses import asdict, dataclass, field
from typing import Any


# The largest map shift tried or allowed, in input pixels: the deepest backbone tap's stride.
MAX_MAP_SHIFT_PX = 32

# Short side of the engine input (per tile) when `inspectd train` is not given --image-size. The
# flow's 384 beat 256 and 320 on label-free validation on MTD and KSDD, and 480 on KSDD (RESULTS.md
# §6c); the other methods were sized for this CPU at 256 and not studied larger.
DEFAULT_SHORT_SIDE = 256
METHOD_SHORT_SIDE = {"flow": 384}


def default_short_side(method: str) -> int:
    """The short side `inspectd train --method METHOD` uses without --image-size."""
    return METHOD_SHORT_SIDE.get(method, DEFAULT_SHORT_SIDE)


@dataclass
class ModelConfig:
    backbone: str = "efficientnet-lite0"
    taps: list[int] = field(default_factory=lambda: [4, 10, 15])
    # The engine's input per tile (height x width). With tiles (rows x cols), the bundle input is
    # the canvas those overlapping tiles cover (input_height x input_width): the graph cuts it.
    # `inspectd train` sets both from --image-size or default_short_side(method) and the images' aspect.
    image_height: int = DEFAULT_SHORT_SIDE
    image_width: int = DEFAULT_SHORT_SIDE
    color_mode: str = "gray"
    tiles: tuple[int, int] = (1, 1)
    tile_overlap: int = 32          # pixels shared by neighbouring tiles (a multiple of 32)
    # "separate": one flow per tap at its own resolution. "fused": every tap resampled to the grid
    # of `fused_stride` (input pixels per position) and concatenated, one flow over the joint embedding.
    fusion: str = "fused"
    fused_stride: int = 32
    neighbourhood: int = 1          # k x k average of each tap before fusion (local context)
    # How a finer tap reaches the fused grid: "avg" pools each block to its mean; "avgmax" adds the
    # block's maximum as further channels (a defect smaller than the block is averaged away by the
    # mean but keeps its strongest response in the max).
    pool: str = "avg"
    positional: int = 0             # sinusoidal position channels given to every subnet (0: none)
    # Input pixels of mirrored image added below and right of the frame before the backbone (the
    # flow; untiled engines). A stride-2 layer centres its output j on input pixel 2j, so cell i of a
    # stride-32 grid looks at the top-left of its block and no cell looks at the frame's last ~30 px
    # rows and columns: one more row and column of cells do (RESULTS.md §28). 0: as bundles before.
    edge_pad: int = 0
    # The flow models each embedding's top `components` principal components (0: every channel,
    # standardised, as bundles before it). 256 of Lite0's 472 fused channels won label-free
    # validation on MTD and KSDD (RESULTS.md §6b).
    components: int = 256
    steps: int = 8                  # coupling steps (8 beat 4 on label-free validation, RESULTS.md §6)
    # Flows trained per embedding from different initialisations, their maps averaged: one flow's
    # figures move by up to 0.025 AUROC between initialisations; three averaged beat the mean single
    # flow on label-free validation on MTD and KSDD (RESULTS.md §6d).
    members: int = 3
    hidden_ratio: float = 0.4
    kernel_size: int = 3
    clamp: float = 2.0
    map_stride: int = 4             # input pixels per anomaly-map pixel
    smoothing_sigma: float = 1.0    # in map pixels
    # Map pixels the stitched map is drawn further down / right (negative: up / left), so each cell
    # sits where its features look: chosen label-free by `inspectd train` (fitting.select_map_shift).
    map_shift: tuple[int, int] = (0, 0)
    # Per-map-head shifts by module name (e.g. cutpaste_head / ae_head), overriding map_shift for
    # engines whose sources look in different places; empty: every head at map_shift.
    head_shifts: dict[str, tuple[int, int]] = field(default_factory=dict)
    # The image score reduces the map before it is shifted: a shift moves the cells at one edge of
    # the frame partly out of it, and a defect there lost up to a third of its score (RESULTS.md
    # §28). False: bundles written before, whose graphs score the shifted map.
    score_before_shift: bool = True
    # Per-position anomaly: "nll" = 0.5|z|^2 - log|det J| (the training loss), or "z2" = 0.5|z|^2
    # alone (DifferNet / CS-Flow score with the Jacobian term dropped).
    score_term: str = "z2"
    reduction: str = "mean"         # "max" | "topk" (mean of the top `topk_fraction` of the map) | "mean"
    topk_fraction: float = 0.03
    seed: int = 0

    @property
    def tile_stride(self) -> tuple[int, int]:
        return (self.image_height - self.tile_overlap, self.image_width - self.tile_overlap)

    @property
    def input_height(self) -> int:
        return self.image_height + (self.tiles[0] - 1) * self.tile_stride[0]

    @property
    def input_width(self) -> int:
        return self.image_width + (self.tiles[1] - 1) * self.tile_stride[1]

    def shift_of(self, head: str) -> tuple[int, int]:
        """Where the map head named `head` (its module name in the engine) draws its map."""
        return tuple(int(v) for v in self.head_shifts.get(head, self.map_shift))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tiles"] = list(self.tiles)
        d["map_shift"] = list(self.map_shift)
        d["head_shifts"] = {k: list(v) for k, v in self.head_shifts.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        if "image_size" in d:  # bundles written before non-square inputs
            d.setdefault("image_height", d["image_size"])
            d.setdefault("image_width", d["image_size"])
        if "fused_size" in d and "fused_stride" not in d:
            d["fused_stride"] = max(1, d.get("image_height", 256) // d["fused_size"])
        if "tiles" in d:
            d["tiles"] = tuple(d["tiles"])
        if "map_shift" in d:
            d["map_shift"] = tuple(d["map_shift"])
        d.setdefault("components", 0)  # bundles written before the projection model every channel
        d.setdefault("positional", 0)  # bundles written before position channels existed have none
        d.setdefault("members", 1)  # bundles written before ensembles have one flow per embedding
        d.setdefault("score_before_shift", False)  # bundles written before score their shifted map
        if "head_shifts" in d:
            d["head_shifts"] = {str(k): tuple(v) for k, v in d["head_shifts"].items()}
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    def check(self) -> None:
        """Raises ValueError naming the first setting that cannot work."""
        for name in ("image_height", "image_width"):
            v = getattr(self, name)
            if v < 32 or v % 32:
                raise ValueError(f"{name} {v}: must be a positive multiple of 32 (the backbone's stride)")
        if not (1 <= self.tiles[0] <= 8 and 1 <= self.tiles[1] <= 8):
            raise ValueError(f"tiles {self.tiles[0]}x{self.tiles[1]}: rows and columns must be 1..8")
        tiled = self.tiles != (1, 1)
        if tiled and (self.tile_overlap < 0 or self.tile_overlap % 32
                      or self.tile_overlap > min(self.image_height, self.image_width) // 2):
            raise ValueError(f"tile_overlap {self.tile_overlap}: a multiple of 32, at most half the tile size")
        if self.fusion not in ("separate", "fused"):
            raise ValueError(f"fusion must be 'separate' or 'fused', not {self.fusion!r}")
        if self.fused_stride not in (8, 16, 32):
            raise ValueError(f"fused_stride {self.fused_stride}: choose 8, 16 or 32")
        if self.edge_pad not in (0, 32, 64) or self.edge_pad >= min(self.image_height, self.image_width):
            raise ValueError(f"edge_pad {self.edge_pad}: 0, 32 or 64 input pixels, less than the input's "
                             f"short side")
        if self.edge_pad and tiled:
            raise ValueError(f"edge_pad {self.edge_pad}: only for untiled engines (tiles 1x1); neighbouring "
                             f"tiles already overlap")
        if self.pool not in ("avg", "avgmax"):
            raise ValueError(f"pool must be 'avg' or 'avgmax', not {self.pool!r}")
        if self.neighbourhood < 1 or self.neighbourhood % 2 == 0:
            raise ValueError(f"neighbourhood {self.neighbourhood}: an odd size >= 1")
        for name, shift in [("map_shift", self.map_shift)] + [(f"head_shifts.{k}", v) for k, v in self.head_shifts.items()]:
            if len(shift) != 2 or any(abs(int(v)) > MAX_MAP_SHIFT_PX // self.map_stride for v in shift):
                raise ValueError(f"{name} {tuple(shift)}: two map-pixel shifts of at most "
                                 f"{MAX_MAP_SHIFT_PX} input pixels each")
        if self.reduction not in ("mean", "max", "topk"):
            raise ValueError(f"reduction must be mean, max or topk, not {self.reduction!r}")
        if not 0 < self.topk_fraction <= 1:
            raise ValueError(f"topk_fraction {self.topk_fraction}: must be in (0, 1]")
        if self.components < 0 or self.components == 1:
            raise ValueError(f"components {self.components}: at least 2 (the flow splits its channels), or 0")
        if not 1 <= self.members <= 8:
            raise ValueError(f"members {self.members}: 1 to 8 flows per embedding")
        if self.positional < 0 or self.positional % 4:
            raise ValueError(f"positional {self.positional}: a multiple of 4 (sin/cos per axis), or 0")
        if not (math.isfinite(self.hidden_ratio) and self.hidden_ratio > 0):
            raise ValueError(f"hidden_ratio {self.hidden_ratio}: a finite number > 0 (the flow's hidden width "
                             f"per input channel)")
