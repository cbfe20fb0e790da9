"""Method "flow" (paper 000): frozen EfficientNet features + a normalizing flow.

    images uint8 N x H x W x C
      -> tiles, InputAdapter, EfficientNet taps (frozen, ImageNet weights)     (model.py, backbone.py)
      -> taps fused on one grid (or one flow per tap)
      -> projected onto its top principal components (ModelConfig.components), each standardised
      -> affine coupling steps -> per-position 0.5|z|^2 (or the full NLL)       (coupling.py)
         (ModelConfig.members flows from different initialisations, their maps averaged)
      -> MapHead: standardised, stitched, smoothed map -> mean / top-k / max

The backbone is frozen, so its features are computed once per augmented view and cached
(float16); the flows then train on the cache. That is what makes a full MTD training fit in
minutes on a 2-core CPU. Label-free selection picks the epoch count and the map reduction.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from inspectd.engines.backbone import EfficientNetFeatures, load_backbone
from inspectd.engines.coupling import ScaleFlow
from inspectd.engines.fitting import ScheduledSteps, augment, batches, extract_features, validation_auroc
from inspectd.engines.methods.base import FitData, Fitted, MethodBase
from inspectd.engines.model import InputAdapter, MapHead, resample_grid, tile_images
from inspectd.engines.model_config import ModelConfig

if TYPE_CHECKING:
    from inspectd.engines.train import TrainConfig


def positional_encoding(channels: int, height: int, width: int) -> torch.Tensor:
    """2-D sinusoidal position channels (1, channels, H, W): half for rows, half for columns."""
    quarter = channels // 4
    freq = torch.exp(torch.arange(quarter, dtype=torch.float32) * (-math.log(100.0) / max(1, quarter)))
    ys = torch.arange(height, dtype=torch.float32)[:, None] / max(1, height) * 2 * math.pi * 4
    xs = torch.arange(width, dtype=torch.float32)[:, None] / max(1, width) * 2 * math.pi * 4
    py = torch.cat([torch.sin(ys * freq), torch.cos(ys * freq)], dim=1).T[:, :, None].expand(-1, height, width)
    px = torch.cat([torch.sin(xs * freq), torch.cos(xs * freq)], dim=1).T[:, None, :].expand(-1, height, width)
    return torch.cat([py, px], dim=0)[None].contiguous()


class FlowModel(nn.Module):
    """The flow engine: uint8 images -> (raw score, anomaly map); see the module docstring."""

    def __init__(self, config: ModelConfig, backbone: EfficientNetFeatures) -> None:
        super().__init__()
        config.check()
        self.config = config
        self.adapter = InputAdapter(*backbone.norm, channels=1 if config.color_mode == "gray" else 3)
        self.backbone = backbone
        th, tw = config.image_height + config.edge_pad, config.image_width + config.edge_pad
        if config.fusion == "separate":
            channels = list(backbone.tap_channels)
            self.grids = [(th // s, tw // s) for s in backbone.tap_strides]
        else:
            channels = [sum(backbone.tap_channels)]
            if config.pool == "avgmax":  # the block maxima of every tap finer than the fused grid
                channels = [channels[0] + sum(c for c, s in zip(backbone.tap_channels, backbone.tap_strides)
                                              if s < config.fused_stride)]
            self.grids = [(th // config.fused_stride, tw // config.fused_stride)]
        # The flow models each embedding's top principal components (a fixed 1x1 projection fitted
        # on the training positions): the directions good parts vary least in are left out, where
        # a flow would otherwise weigh feature noise most (RESULTS.md §6b).
        embed_channels = channels
        channels = [min(config.components, c) if config.components else c for c in channels]
        if config.components:
            for i, (c_in, k) in enumerate(zip(embed_channels, channels)):
                self.register_buffer(f"centre{i}", torch.zeros(1, c_in, 1, 1))
                self.register_buffer(f"basis{i}", torch.eye(c_in)[:k].reshape(k, c_in, 1, 1).clone())
        self.feat_mean = nn.ParameterList(nn.Parameter(torch.zeros(1, c, 1, 1), requires_grad=False)
                                          for c in channels)
        self.feat_std = nn.ParameterList(nn.Parameter(torch.ones(1, c, 1, 1), requires_grad=False)
                                         for c in channels)
        for i, (gh, gw) in enumerate(self.grids):
            pe = positional_encoding(config.positional, gh, gw) if config.positional else torch.zeros(1, 0, gh, gw)
            self.register_buffer(f"pos{i}", pe, persistent=False)
        # Member-major: flows[m * len(channels) + i] is member m's flow over embedding i (so a
        # one-member engine keeps the names bundles before ensembles had).
        self.flows = nn.ModuleList(
            ScaleFlow(c, config.steps, config.hidden_ratio, config.kernel_size, config.clamp,
                      config.seed * 10 + i + 100 * m, cond_channels=config.positional)
            for m in range(config.members) for i, c in enumerate(channels))
        self.head = MapHead(config, len(channels), source_pad=config.edge_pad)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Raw backbone taps of every tile (ModelConfig.edge_pad: the frame's last rows and columns
        mirrored below and right of it first: texture that continues)."""
        x = self.adapter(tile_images(images, self.config))
        p = self.config.edge_pad
        return self.backbone(F.pad(x, (0, p, 0, p), mode="reflect") if p else x)

    def embed(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Taps -> what the flows model (before standardisation): what training caches."""
        k = self.config.neighbourhood
        if k > 1:
            feats = [F.avg_pool2d(f, k, stride=1, padding=k // 2, count_include_pad=False) for f in feats]
        if self.config.fusion == "separate":
            return feats
        fused = [resample_grid(f, self.grids[0]) for f in feats]
        if self.config.pool == "avgmax":
            fused += [block_max(f, self.grids[0]) for f in feats if f.shape[-2] > self.grids[0][0]]
        return [torch.cat(fused, dim=1)]

    def cond(self, i: int, n: int) -> torch.Tensor | None:
        pe = getattr(self, f"pos{i}")
        return pe.expand(n, -1, -1, -1) if pe.shape[1] else None

    def project(self, i: int, f: torch.Tensor) -> torch.Tensor:
        """Embedding i -> its principal components (unchanged when ModelConfig.components is 0)."""
        if not self.config.components:
            return f
        return F.conv2d(f - getattr(self, f"centre{i}"), getattr(self, f"basis{i}"))

    def flow_input(self, i: int, f: torch.Tensor) -> torch.Tensor:
        """Embedding i (as training caches it) -> what flow i transforms: projected, standardised."""
        return (self.project(i, f) - self.feat_mean[i]) / self.feat_std[i]

    def member_flows(self, m: int) -> list[ScaleFlow]:
        """Member m's flows, one per embedding."""
        n = len(self.grids)
        return list(self.flows[m * n:(m + 1) * n])

    def nll_maps(self, embedded: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-position anomaly maps, one per embedding, averaged over the members (see
        ModelConfig.score_term and .members)."""
        out = []
        for i, f in enumerate(embedded):
            x, cond = self.flow_input(i, f), self.cond(i, f.shape[0])
            total = None
            for m in range(self.config.members):
                half_z2, logdet = self.member_flows(m)[i].transform(x, cond)
                term = half_z2 if self.config.score_term == "z2" else half_z2 - logdet
                total = term if total is None else total + term
            out.append(total / self.config.members if self.config.members > 1 else total)
        return out

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.nll_maps(self.embed(self.features(images))))


def block_max(f: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A finer feature map (N, C, h, w) onto the coarser grid `size` by each block's maximum."""
    h, w = int(f.shape[-2]), int(f.shape[-1])
    if h % size[0] or w % size[1]:
        raise ValueError(f"pool avgmax: a {h}x{w} tap does not divide onto the {size[0]}x{size[1]} grid")
    return F.max_pool2d(f, kernel_size=(h // size[0], w // size[1]))


def build_model(config: ModelConfig, weights: str | None = None) -> FlowModel:
    """A flow engine with the ImageNet backbone loaded (untrained flows)."""
    return FlowModel(config, load_backbone(config.backbone, config.taps, weights))


class FeatureGraph(torch.nn.Module):
    """images -> the embeddings the flows model (what training caches)."""

    def __init__(self, model: FlowModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.model.embed(self.model.features(images))


def train_flows(model: FlowModel, cache: list[torch.Tensor], n_images: int, cfg: "TrainConfig",
                device: torch.device) -> float:
    """Fit the flows on cached features, one member after another, each on its own batch order
    (seed + member): independent trainings, as an ensemble needs. cache[t] holds views x images
    stacked view-major. Returns the members' mean final loss."""
    losses = []
    model.flows.train()
    for m in range(model.config.members):
        label = "train" if model.config.members == 1 else f"train {m + 1}/{model.config.members}"
        losses.append(_train_member(model, model.member_flows(m), cache, n_images, cfg, cfg.seed + m, label,
                                    device))
    model.flows.eval()
    return sum(losses) / len(losses)


def _train_member(model: FlowModel, flows: list[ScaleFlow], cache: list[torch.Tensor], n_images: int,
                  cfg: "TrainConfig", seed: int, label: str, device: torch.device) -> float:
    views = cache[0].shape[0] // n_images
    params = [p for flow in flows for p in flow.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr_min, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, n_images // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    gen = torch.Generator().manual_seed(seed)
    steps = ScheduledSteps(opt, total, cfg, label, clip=5.0)
    for _epoch in range(cfg.epochs):
        order = torch.randperm(n_images, generator=gen)
        for b in range(steps_per_epoch):
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            view = torch.randint(0, views, (len(idx),), generator=gen)
            rows = view * n_images + idx
            loss = torch.zeros((), device=device)
            for t, flow in enumerate(flows):
                f = model.flow_input(t, cache[t][rows].to(device).float())
                loss = loss + flow(f, model.cond(t, f.shape[0])).mean()
            steps.step(loss / len(flows))
    return steps.close()


@torch.no_grad()
def fit_projection(model: FlowModel, cache: list[torch.Tensor], n_images: int, chunk: int = 256) -> None:
    """Each embedding's mean and top principal directions (ModelConfig.components) over the training
    positions of the original views: the eigenvectors of their covariance, largest first."""
    for t, feats in enumerate(cache):
        c = feats.shape[1]
        total, count = torch.zeros(c, dtype=torch.float64), 0
        gram = torch.zeros(c, c, dtype=torch.float64)
        for i in range(0, n_images, chunk):
            x = feats[i:min(i + chunk, n_images)].double().permute(0, 2, 3, 1).reshape(-1, c)
            total += x.sum(0)
            gram += x.T @ x
            count += x.shape[0]
        mean = total / count
        cov = (gram - count * torch.outer(mean, mean)) / max(1, count - 1)
        _, vectors = torch.linalg.eigh(cov)  # ascending eigenvalues
        k = model.feat_mean[t].shape[1]
        basis = vectors.flip(1)[:, :k].T.float()
        getattr(model, f"centre{t}").copy_(mean.float().view(1, c, 1, 1))
        getattr(model, f"basis{t}").copy_(basis.reshape(k, c, 1, 1))


@torch.no_grad()
def fit_statistics(model: FlowModel, cache: list[torch.Tensor], n_images: int, chunk: int = 256) -> None:
    """The projection (if any), then the per-channel mean/std of what each flow sees, from the
    original views (before flow training)."""
    if model.config.components:
        fit_projection(model, cache, n_images, chunk)
    for t, feats in enumerate(cache):
        device = model.feat_mean[t].device  # the cache stays on the CPU; the model may be on a GPU
        f = torch.cat([model.project(t, feats[i:min(i + chunk, n_images)].to(device).float())
                       for i in range(0, n_images, chunk)])
        model.feat_mean[t].copy_(f.mean(dim=(0, 2, 3), keepdim=True))
        model.feat_std[t].copy_(f.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-3))


@torch.no_grad()
def fit_nll_statistics(model: FlowModel, cache: list[torch.Tensor], n_images: int, device: torch.device) -> None:
    """Per-tap NLL mean/std over training positions, so taps weigh equally in the map."""
    sums = [[] for _ in cache]
    for sl in batches(n_images, 32):
        feats = [c[sl].to(device).float() for c in cache]
        for t, nll in enumerate(model.nll_maps(feats)):  # positional channels included (model.cond)
            sums[t].append(nll.flatten().cpu())
    for t, parts in enumerate(sums):
        v = torch.cat(parts)
        model.head.nll_mean[t] = v.mean()
        model.head.nll_std[t] = v.std().clamp_min(1e-6)


def _fit_candidate(cfg: "TrainConfig", cache: list[torch.Tensor], train_imgs: Sequence[np.ndarray],
                   device: torch.device) -> tuple[FlowModel, float]:
    """Train one candidate on the cached features (every view of every training image)."""
    mc = cfg.model
    model = build_model(mc, cfg.weights).to(device)
    n_rows = len(train_imgs) * mc.tiles[0] * mc.tiles[1]  # cache rows per view: every tile of every image
    fit_statistics(model, cache, n_rows)
    final_loss = train_flows(model, cache, n_rows, cfg, device)
    fit_nll_statistics(model, cache, n_rows, device)
    return model, final_loss


@torch.no_grad()
def _validation_scores(model: FlowModel, cache: list[torch.Tensor], n_tiles: int, reductions: Sequence[str],
                       device: torch.device, batch: int = 16) -> dict[str, np.ndarray]:
    """The engine's image score of every validation image under each reduction, reduced from what its
    head scores (MapHead.scored_map: every cell, before the map shift; more than the map it draws
    when ModelConfig.edge_pad)."""
    scores: dict[str, list[np.ndarray]] = {red: [] for red in reductions}
    for i in range(0, cache[0].shape[0], batch * n_tiles):
        amap = model.head.scored_map(model.nll_maps([c[i:i + batch * n_tiles].to(device).float() for c in cache]))
        for red in reductions:
            scores[red].append(model.head.reduce(amap[:, 0], red).cpu().numpy())
    return {red: np.concatenate(parts) for red, parts in scores.items()}


def selection_candidates(cfg: "TrainConfig") -> list["TrainConfig"]:
    """The predeclared trainings selection compares (each then scored with every reduction)."""
    if not cfg.select:
        return [cfg]
    return [replace(cfg, epochs=e) for e in (cfg.select_epochs or [cfg.epochs])]


def fit_selected(cfg: "TrainConfig", train_imgs: Sequence[np.ndarray], hold_imgs: Sequence[np.ndarray],
                 rng: np.random.Generator, device: torch.device) -> tuple[FlowModel, float, dict[str, Any]]:
    """Train the candidates and keep the one that best separates the held-out good images from
    synthetic defects made from them (validation.py): never a real defect, never a test image."""
    from inspectd.engines.validation import make_validation_set

    mc = cfg.model
    n_tiles = mc.tiles[0] * mc.tiles[1]
    extractor = FeatureGraph(build_model(mc, cfg.weights).to(device))
    base_cache = extract_features(extractor, train_imgs, device, "features")
    if cfg.augment and cfg.views > 1:  # once, shared by every candidate
        views = [augment(im, rng, cfg) for _ in range(cfg.views - 1) for im in train_imgs]
        extra = extract_features(extractor, views, device, "augmented features")
        base_cache = [torch.cat([b, e]) for b, e in zip(base_cache, extra)]
    reductions = list(cfg.select_reductions) if cfg.select else [mc.reduction]
    val_cache: tuple[list[torch.Tensor], int] | None = None
    if cfg.select:
        val = make_validation_set(hold_imgs, cfg.seed)
        val_cache = (extract_features(extractor, list(val.good) + list(val.bad), device, "validation features"),
                     len(val.good))
    del extractor
    best: tuple[float, int, FlowModel, float, str] | None = None
    rows = []
    for i, cand in enumerate(selection_candidates(cfg)):
        model, loss = _fit_candidate(cand, base_cache, train_imgs, device)
        if val_cache is None:
            return model, loss, {"enabled": False}
        scores = _validation_scores(model.eval(), val_cache[0], n_tiles, reductions, device)
        n_good = val_cache[1]
        for red in reductions:
            auroc = validation_auroc(scores[red], n_good)
            rows.append({"epochs": cand.epochs, "reduction": red, "validation_auroc": round(auroc, 4)})
            # Ties keep the earlier (predeclared order: fewer epochs, mean before top-k before max).
            if best is None or auroc > best[0] + 1e-9:
                best = (auroc, i, model, loss, red)
    _, index, model, loss, red = best
    chosen = selection_candidates(cfg)[index]
    model.config.reduction = red
    model.head.reduction = red
    cfg.epochs = chosen.epochs
    cfg.model.reduction = red
    print(f"inspectd train: selected {chosen.epochs} epochs, {red} reduction (validation AUROC {best[0]:.4f} on "
          f"{val_cache[1]} held-out good images vs {val_cache[0][0].shape[0] // n_tiles - val_cache[1]} "
          f"synthetic defects)", file=sys.stderr)
    return model, loss, {"enabled": True, "validation": "held-out good images + synthetic defects "
                         "(cutpaste, scar, blob, blur, crack) made from them", "candidates": rows,
                         "chosen": {"epochs": chosen.epochs, "reduction": red,
                                    "validation_auroc": round(best[0], 4)}}


@dataclass
class FlowOptions:
    """The flow's design lives in ModelConfig (steps, fusion, clamp ...): no further options."""


class FlowMethod(MethodBase):
    name = "flow"
    train_flags = frozenset({"augment", "views", "steps", "members", "hidden_ratio", "components", "positional",
                             "edge_pad", "pool", "fusion", "kernel_size", "score_term", "reduction", "backbone",
                             "weights", "taps"})
    summary = "EfficientNet features + normalizing flow (paper 000)"
    options_cls = FlowOptions
    default_epochs = 20

    def fit(self, data: FitData) -> Fitted:
        model, loss, selection = fit_selected(data.cfg, data.train, data.holdout, data.rng, data.device)
        mc = data.cfg.model
        return Fitted(model, loss, selection, details={
            "steps": mc.steps, "hidden_ratio": mc.hidden_ratio, "kernel_size": mc.kernel_size, "clamp": mc.clamp,
            "fusion": mc.fusion if mc.fusion == "separate" else f"fused at stride {mc.fused_stride}",
            "components": mc.components, "members": mc.members, "edge_pad": mc.edge_pad,
            "pool": mc.pool, "score_term": mc.score_term})

    def build(self, model_config: ModelConfig, options: dict[str, Any]) -> nn.Module:
        return FlowModel(model_config, EfficientNetFeatures(model_config.backbone, model_config.taps))


METHOD = FlowMethod()
