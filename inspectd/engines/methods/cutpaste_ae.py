"""Method "cutpaste-ae" (paper 003): a CutPaste classifier and a reconstruction autoencoder.

    images uint8 N x H x W x C
      -> tiles (tile_images); each tile goes two ways:
      CutPaste  InputAdapter -> frozen EfficientNet taps, resampled to one grid (stride `grid_stride`),
                per-channel standardised -> per-position projection (1x1 MLP) = patch embeddings
                -> map:   Mahalanobis distance of every patch embedding to one Gaussian of good patches
                -> score: Mahalanobis distance of the mean-pooled embedding to a Gaussian of good
                          images (max over a frame's tiles)
      AE        pixels / 255, average-pooled by `ae_scale` -> small conv autoencoder (no skips;
                `ae_levels` stride-2 levels down to a bottleneck of `ae_latent` channels, as many up)
                -> map:   squared reconstruction error, averaged over channels, pooled to the map grid,
                          standardised per position by the good training tiles (`ae_per_position`)
                -> score: the map's reduction (`ae_reduction`: top-k mean by default)
      -> each map standardised (MapHead buffers, statistics of held-out good positions), stitched,
         smoothed; each image score standardised by held-out good images (score_mean / score_std)
      -> score rule (`score` option): cutpaste = z_cutpaste, ae = z_ae, combined = w_cutpaste z_cutpaste
         + w_ae z_ae; map: the rule's map, or for combined the mean of the two standardised maps.
         Weights (`combine` option): `validation` (default) the ratio w_ae / w_cutpaste of RATIOS
         (1/16 .. 16, both sources always count) whose weighted sum has the highest AUROC on the
         label-free validation set (the first, i.e. smallest, of equal ones), scaled to sum to 2;
         `equal` = 1 + 1 (also what `--no-select` uses: nothing is chosen on validation then). The
         weights are folded into score_std (the engine graph is unchanged).
         (Before: w_k = max(AUROC_k - 0.5, 0.05), which validation itself ranked below the best
         ratio on MTD and KSDD: benchmarks/RESULTS.md section 10.)

Training (good images only, plus synthetic defects made from them by validation.synthesize):
  - the projection and a 3-way linear classifier (normal / cutpaste / scar) on the mean-pooled
    embedding learn to tell good tiles from CutPaste and CutPaste-scar copies. The backbone is
    frozen, so its features are cached once: the good tiles and `pool_cycles` fixed pools of one
    cutpaste and one scar copy per tile (epoch e trains on pool e mod pool_cycles).
  - then the Gaussians: mean and Ledoit-Wolf shrinkage covariance of the good training tiles'
    pooled embeddings (image score) and of all their patch embeddings (map).
  - the autoencoder learns to reconstruct the clean tile from the clean tile or (with probability
    `ae_defect_fraction`) a cutpaste / scar copy of it (denoising): MSE to the clean tile. It draws
    from random streams of its own (seed + AE_SEED), so the CutPaste head's options never change it.
  - held-out good images give the map and score standardisation; label-free validation (held-out
    good + make_validation_set synthetic defects) reports each rule's AUROC in the manifest.
The paper gives no architecture, combination or hyperparameters: everything above is our choice.
Defaults are sized for a 2-core CPU (full MTD at 256 px: ~5 min). embed_dim 256 was chosen on label-free
validation over 64 / 128 / 256 / 512 (mean CutPaste validation AUROC of MTD and KSDD; benchmarks/RESULTS.md
section 10): a narrow projection discards the frozen features' directions that the pasted patches
do not exercise, and real defects need them. ae_scale 4 (the AE works
at the map resolution) for time; ae_levels 3 and ae_per_position on were chosen on MTD's label-free
validation (AE AUROC 0.61, vs 0.50 with 4 levels and 0.52 without per-position statistics).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from inspectd.engines.backbone import EfficientNetFeatures, load_backbone
from inspectd.engines.fitting import (PartGraph, ScheduledSteps, batches, extract_features, one_thread,
                                      validation_auroc)
from inspectd.engines.methods.base import FitData, Fitted, MethodBase
from inspectd.engines.model import InputAdapter, MapHead, resample_grid, tile_images
from inspectd.engines.model_config import ModelConfig
from inspectd.engines.validation import make_validation_set, synthesize

NAME = "cutpaste-ae"
SCORE_RULES = ("combined", "cutpaste", "ae")
COMBINE_RULES = ("validation", "equal")
RATIOS = tuple(2.0 ** k for k in range(-4, 5))  # w_ae / w_cutpaste tried on validation: 1/16 .. 16
CLASSES = ("normal", "cutpaste", "scar")
AE_SEED = 4004  # offset of the autoencoder's own random streams from the training seed


@dataclass
class CutPasteAEOptions:
    epochs: int = 20              # autoencoder passes over the good tiles
    classifier_epochs: int = 20   # CutPaste classifier passes over the cached good tiles and pool
    score: str = "combined"       # image score / map rule: combined, cutpaste or ae
    combine: str = "validation"   # combined: weights from label-free validation AUROCs, or equal
    embed_dim: int = 256          # width of the projection (patch / image embedding); chosen on validation
    grid_stride: int = 16         # input pixels per patch embedding (taps resampled to this grid)
    pool_cycles: int = 1          # fixed pools of synthetic defects the classifier cycles through
    ae_width: int = 16            # autoencoder channels at its first level (x2, x4, x4 deeper)
    ae_latent: int = 32           # autoencoder bottleneck channels (at 1/2^ae_levels of its input resolution)
    ae_levels: int = 3            # stride-2 levels of the autoencoder (fewer where its input size does not divide)
    ae_scale: int = 4             # the autoencoder sees the tile average-pooled by this factor
    ae_defect_fraction: float = 0.5  # share of autoencoder inputs given a synthetic defect
    ae_reduction: str = "topk"    # AE map -> AE image score: mean, max or topk (ModelConfig.topk_fraction)
    ae_per_position: bool = True  # AE error standardised per map position (good training tiles' mean / std)

    def check(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"option {name.replace('_', '-')}={getattr(self, name)!r}: {why} for method {NAME}")

        if not 1 <= self.epochs <= 1000:
            raise bad("epochs", "must be 1..1000")
        if not 1 <= self.classifier_epochs <= 1000:
            raise bad("classifier_epochs", "must be 1..1000")
        if self.score not in SCORE_RULES:
            raise bad("score", f"choose from {', '.join(SCORE_RULES)}")
        if self.combine not in COMBINE_RULES:
            raise bad("combine", f"choose from {', '.join(COMBINE_RULES)}")
        if not 4 <= self.embed_dim <= 512:
            raise bad("embed_dim", "must be 4..512")
        if self.grid_stride not in (8, 16, 32):
            raise bad("grid_stride", "choose 8, 16 or 32")
        if not 1 <= self.pool_cycles <= 32:
            raise bad("pool_cycles", "must be 1..32")
        if not 2 <= self.ae_width <= 128:
            raise bad("ae_width", "must be 2..128")
        if not 1 <= self.ae_latent <= 512:
            raise bad("ae_latent", "must be 1..512")
        if not 1 <= self.ae_levels <= 4:
            raise bad("ae_levels", "must be 1..4")
        if self.ae_scale not in (1, 2, 4):
            raise bad("ae_scale", "choose 1, 2 or 4")
        if not 0.0 <= self.ae_defect_fraction <= 1.0:
            raise bad("ae_defect_fraction", "must be in [0, 1]")
        if self.ae_reduction not in ("mean", "max", "topk"):
            raise bad("ae_reduction", "choose mean, max or topk")


def _mahalanobis(x: torch.Tensor, mean: torch.Tensor, prec: torch.Tensor) -> torch.Tensor:
    """(B, D) -> (B,) distances sqrt((x - mean)^T prec (x - mean))."""
    d = x - mean
    return ((d @ prec) * d).sum(-1).clamp_min(0).sqrt()


def _mahalanobis_map(x: torch.Tensor, mean: torch.Tensor, prec: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) -> (B, h, w) per-position distances (the precision as a 1x1 convolution)."""
    dim = mean.shape[0]
    d = x - mean.view(1, dim, 1, 1)
    return (F.conv2d(d, prec.view(dim, dim, 1, 1)) * d).sum(1).clamp_min(0).sqrt()


def ledoit_wolf(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and Ledoit-Wolf shrinkage covariance of samples x (n, d), in float64."""
    x = x.double()
    n, d = x.shape
    mean = x.mean(0)
    xc = x - mean
    cov = xc.T @ xc / n
    mu = torch.trace(cov) / d
    delta = ((cov - mu * torch.eye(d, dtype=x.dtype)) ** 2).sum() / d
    # beta = sum_i ||x_i x_i^T - cov||_F^2 / (d n^2); expanding the square with sum_i x_i x_i^T = n cov
    # gives sum_i ||x_i||^4 - n ||cov||_F^2: O(n d) instead of O(n d^2) (exact, not an approximation)
    beta = ((xc * xc).sum(1) ** 2).sum() - n * (cov ** 2).sum()
    beta = torch.minimum(beta.clamp_min(0) / (d * n ** 2), delta)
    shrink = float(beta / delta) if float(delta) > 0 else 1.0
    return mean, (1 - shrink) * cov + shrink * mu * torch.eye(d, dtype=x.dtype)


def ae_levels(height: int, width: int, most: int = 4) -> int:
    """Stride-2 levels of the autoencoder for an input of height x width: up to `most`, as many as divide."""
    levels = 0
    while levels < most and height % (2 ** (levels + 1)) == 0 and width % (2 ** (levels + 1)) == 0:
        levels += 1
    return levels


class ConvAutoencoder(nn.Module):
    """`levels` stride-2 convolutions down (width, 2w, 4w, 4w), a 1x1 bottleneck of `latent` channels,
    `levels` stride-2 transposed convolutions (kernel 2: cheap on a CPU) back up, sigmoid output."""

    def __init__(self, channels: int, width: int, latent: int, levels: int = 4) -> None:
        super().__init__()
        w = width
        widths = [w, 2 * w, 4 * w, 4 * w][:levels]
        enc: list[nn.Module] = []
        c = channels
        for out in widths:
            enc += [nn.Conv2d(c, out, 3, stride=2, padding=1), nn.ReLU()]
            c = out
        enc += [nn.Conv2d(c, latent, 1)]
        dec: list[nn.Module] = [nn.Conv2d(latent, c, 1), nn.ReLU()]
        for out in reversed([w] + widths[:-1]):
            dec += [nn.ConvTranspose2d(c, out, 2, stride=2), nn.ReLU()]
            c = out
        dec += [nn.Conv2d(c, channels, 3, padding=1), nn.Sigmoid()]
        self.encoder = nn.Sequential(*enc)
        self.decoder = nn.Sequential(*dec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class CutPasteAEModel(nn.Module):
    """The cutpaste-ae engine: uint8 images -> (raw score, anomaly map); see the module docstring."""

    def __init__(self, config: ModelConfig, backbone: EfficientNetFeatures, options: CutPasteAEOptions) -> None:
        super().__init__()
        config.check()
        self.config = config
        self.score_rule = options.score
        channels = 1 if config.color_mode == "gray" else 3
        self.adapter = InputAdapter(*backbone.norm, channels=channels)
        self.backbone = backbone
        gs = options.grid_stride
        self.grid = (config.image_height // gs, config.image_width // gs)
        in_ch = sum(backbone.tap_channels)
        dim = options.embed_dim
        self.register_buffer("feat_mean", torch.zeros(1, in_ch, 1, 1))
        self.register_buffer("feat_std", torch.ones(1, in_ch, 1, 1))
        self.projection = nn.Sequential(nn.Conv2d(in_ch, dim, 1), nn.ReLU(), nn.Conv2d(dim, dim, 1))
        self.classifier = nn.Linear(dim, len(CLASSES))
        self.register_buffer("image_mean", torch.zeros(dim))
        self.register_buffer("image_prec", torch.eye(dim))
        self.register_buffer("patch_mean", torch.zeros(dim))
        self.register_buffer("patch_prec", torch.eye(dim))
        self.ae_scale = options.ae_scale
        levels = ae_levels(config.image_height // options.ae_scale, config.image_width // options.ae_scale,
                           options.ae_levels)
        self.autoencoder = ConvAutoencoder(channels, options.ae_width, options.ae_latent, levels)
        self.cutpaste_head = MapHead(config, 1)
        self.ae_head = MapHead(replace(config, reduction=options.ae_reduction), 1)
        self.ae_per_position = options.ae_per_position
        self.register_buffer("ae_pos_mean", torch.zeros(1, *self.ae_head.tile_map))
        self.register_buffer("ae_pos_std", torch.ones(1, *self.ae_head.tile_map))
        # image scores (cutpaste, ae) standardised by held-out good images
        self.register_buffer("score_mean", torch.zeros(2))
        self.register_buffer("score_std", torch.ones(2))

    # -- CutPaste side -------------------------------------------------------------------------
    def grid_features(self, tiles: torch.Tensor) -> torch.Tensor:
        """Tiles uint8 -> backbone taps resampled to the patch grid and concatenated (what training caches)."""
        return torch.cat([resample_grid(f, self.grid) for f in self.backbone(self.adapter(tiles))], dim=1)

    def embed(self, feats: torch.Tensor) -> torch.Tensor:
        """Cached grid features -> patch embeddings (B, D, gh, gw)."""
        return self.projection((feats - self.feat_mean) / self.feat_std)

    def logits(self, emb: torch.Tensor) -> torch.Tensor:
        return self.classifier(emb.mean(dim=(2, 3)))

    def cutpaste_parts(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Grid features -> (per-tile image distance (B,), patch distance map (B, gh, gw))."""
        emb = self.embed(feats)
        return (_mahalanobis(emb.mean(dim=(2, 3)), self.image_mean, self.image_prec),
                _mahalanobis_map(emb, self.patch_mean, self.patch_prec))

    # -- autoencoder side ----------------------------------------------------------------------
    def ae_input(self, tiles: torch.Tensor) -> torch.Tensor:
        x = tiles.permute(0, 3, 1, 2).float() * (1.0 / 255.0)
        return F.avg_pool2d(x, self.ae_scale) if self.ae_scale > 1 else x

    def ae_error(self, tiles: torch.Tensor, per_position: bool = True) -> torch.Tensor:
        """Tiles uint8 -> squared reconstruction error on the map grid (B, h, w), per position
        standardised (ae_per_position)."""
        x = self.ae_input(tiles)
        err = resample_grid(((self.autoencoder(x) - x) ** 2).mean(dim=1, keepdim=True), self.ae_head.tile_map)[:, 0]
        if self.ae_per_position and per_position:
            err = (err - self.ae_pos_mean) / self.ae_pos_std
        return err

    # -- both ----------------------------------------------------------------------------------
    def components(self, images: torch.Tensor, rule: str = "combined") -> dict[str, torch.Tensor]:
        """Standardised image scores and maps of the sources the rule needs (frame level)."""
        tiles = tile_images(images, self.config)
        n_tiles = self.config.tiles[0] * self.config.tiles[1]
        out: dict[str, torch.Tensor] = {}
        if rule in ("combined", "cutpaste"):
            image_d, patch_map = self.cutpaste_parts(self.grid_features(tiles))
            _, out["cutpaste_map"] = self.cutpaste_head([patch_map])
            score = image_d.reshape(-1, n_tiles).max(dim=1).values
            out["cutpaste"] = (score - self.score_mean[0]) / self.score_std[0]
        if rule in ("combined", "ae"):
            score, out["ae_map"] = self.ae_head([self.ae_error(tiles)])
            out["ae"] = (score - self.score_mean[1]) / self.score_std[1]
        return out

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rule = self.score_rule
        c = self.components(images, rule)
        if rule == "cutpaste":
            return c["cutpaste"], c["cutpaste_map"]
        if rule == "ae":
            return c["ae"], c["ae_map"]
        return c["cutpaste"] + c["ae"], 0.5 * (c["cutpaste_map"] + c["ae_map"])


def _tiles(images: Sequence[np.ndarray], config: ModelConfig) -> list[np.ndarray]:
    if config.tiles == (1, 1):
        return list(images)
    return list(tile_images(torch.from_numpy(np.stack(images)), config).numpy())


def _defect(tile: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return synthesize(tile, "cutpaste" if rng.random() < 0.5 else "scar", rng)


def train_classifier(model: CutPasteAEModel, normal: torch.Tensor, pools: list[tuple[torch.Tensor, torch.Tensor]],
                     opts: CutPasteAEOptions, cfg: Any, gen: torch.Generator) -> float:
    """Projection + classifier on cached features: normal / cutpaste / scar, cross-entropy."""
    n = normal.shape[0]
    params = list(model.projection.parameters()) + list(model.classifier.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr_max, weight_decay=cfg.weight_decay)
    batch = max(1, cfg.batch_size)
    steps_per_epoch = max(1, math.ceil(n / batch))
    total = steps_per_epoch * opts.classifier_epochs
    labels = torch.arange(len(CLASSES)).repeat_interleave(batch)
    steps = ScheduledSteps(opt, total, cfg, "classifier")
    for epoch in range(opts.classifier_epochs):
        cp, scar = pools[epoch % len(pools)]
        order = torch.randperm(n, generator=gen)
        for b in range(steps_per_epoch):
            idx = order[b * batch:(b + 1) * batch]
            x = torch.cat([normal[idx], cp[idx], scar[idx]]).float()
            y = labels.view(len(CLASSES), batch)[:, :len(idx)].reshape(-1)
            steps.step(F.cross_entropy(model.logits(model.embed(x)), y))
    return steps.close()


def train_autoencoder(model: CutPasteAEModel, tiles: list[np.ndarray], opts: CutPasteAEOptions, cfg: Any,
                      rng: np.random.Generator, gen: torch.Generator) -> float:
    """Denoising reconstruction: input = clean or synthetic-defect tile, target = the clean tile."""
    ae = model.autoencoder
    ae.train()
    opt = torch.optim.Adam(ae.parameters(), lr=cfg.lr_max, weight_decay=cfg.weight_decay)
    n = len(tiles)
    batch = max(1, cfg.batch_size)
    steps_per_epoch = max(1, math.ceil(n / batch))
    total = steps_per_epoch * opts.epochs
    steps = ScheduledSteps(opt, total, cfg, "autoencoder")
    for _epoch in range(opts.epochs):
        order = torch.randperm(n, generator=gen).tolist()
        for b in range(steps_per_epoch):
            idx = order[b * batch:(b + 1) * batch]
            clean = np.stack([tiles[i] for i in idx])
            noisy = np.stack([_defect(tiles[i], rng) if rng.random() < opts.ae_defect_fraction else tiles[i]
                              for i in idx])
            target = model.ae_input(torch.from_numpy(clean))
            x = model.ae_input(torch.from_numpy(noisy))
            steps.step(F.mse_loss(ae(x), target))
    ae.eval()
    return steps.close()


@torch.no_grad()
def fit_gaussians(model: CutPasteAEModel, normal: torch.Tensor) -> None:
    """Image and patch Gaussians of the good training tiles' embeddings (Ledoit-Wolf shrinkage)."""
    embs = [model.embed(normal[sl].float()) for sl in batches(normal.shape[0], 64)]
    pooled = torch.cat([e.mean(dim=(2, 3)) for e in embs])
    patches = torch.cat([e.permute(0, 2, 3, 1).reshape(-1, e.shape[1]) for e in embs])
    for (mean_buf, prec_buf), x in (((model.image_mean, model.image_prec), pooled),
                                    ((model.patch_mean, model.patch_prec), patches)):
        mean, cov = ledoit_wolf(x)
        mean_buf.copy_(mean.float())
        prec_buf.copy_(torch.linalg.inv(cov).float())


@torch.no_grad()
def fit_ae_positions(model: CutPasteAEModel, tiles: Sequence[np.ndarray], batch: int = 16) -> None:
    """Per-position mean / std of the AE error on the good training tiles (std floored at a tenth of
    its median, so a position that always reconstructs perfectly cannot blow up)."""
    errs = torch.cat([model.ae_error(torch.from_numpy(np.stack(tiles[sl])), per_position=False)
                      for sl in batches(len(tiles), batch)])
    std = errs.std(dim=0, keepdim=True)
    model.ae_pos_mean.copy_(errs.mean(dim=0, keepdim=True))
    model.ae_pos_std.copy_(std.clamp_min(float(std.median()) * 0.1 + 1e-8))


@torch.no_grad()
def _raw_sources(model: CutPasteAEModel, images: Sequence[np.ndarray], batch: int = 8
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Unstandardised tile source maps (cutpaste patch distances, AE errors) for images."""
    cps, aes = [], []
    for sl in batches(len(images), batch):
        tiles = tile_images(torch.from_numpy(np.stack(images[sl])), model.config)
        cps.append(model.cutpaste_parts(model.grid_features(tiles))[1])
        aes.append(model.ae_error(tiles))
    return torch.cat(cps), torch.cat(aes)


@torch.no_grad()
def component_scores(model: CutPasteAEModel, images: Sequence[np.ndarray], batch: int = 8
                     ) -> dict[str, np.ndarray]:
    """Standardised image scores of both sources (and their sum) for images, eager PyTorch."""
    cp, ae = [], []
    for sl in batches(len(images), batch):
        c = model.components(torch.from_numpy(np.stack(images[sl])))
        cp.append(c["cutpaste"])
        ae.append(c["ae"])
    cp_s, ae_s = torch.cat(cp).numpy(), torch.cat(ae).numpy()
    return {"cutpaste": cp_s, "ae": ae_s, "combined": cp_s + ae_s}


@torch.no_grad()
def standardise(model: CutPasteAEModel, holdout: Sequence[np.ndarray]) -> dict[str, Any]:
    """Map and score standardisation from held-out good images (never trained on)."""
    cp_map, ae_map = _raw_sources(model, holdout)
    for head, m in ((model.cutpaste_head, cp_map), (model.ae_head, ae_map)):
        head.nll_mean[0] = m.mean()
        head.nll_std[0] = m.std().clamp_min(1e-6)
    model.score_mean.zero_()
    model.score_std.fill_(1.0)
    raw = component_scores(model, holdout)
    for i, key in enumerate(("cutpaste", "ae")):
        v = raw[key].astype(np.float64)
        model.score_mean[i] = float(v.mean())
        model.score_std[i] = float(max(v.std(ddof=1) if len(v) > 1 else 0.0, 1e-6))
    return {"source": f"{len(holdout)} held-out good images",
            "map_mean": {"cutpaste": float(model.cutpaste_head.nll_mean[0]), "ae": float(model.ae_head.nll_mean[0])},
            "map_std": {"cutpaste": float(model.cutpaste_head.nll_std[0]), "ae": float(model.ae_head.nll_std[0])},
            "score_mean": {"cutpaste": float(model.score_mean[0]), "ae": float(model.score_mean[1])},
            "score_std": {"cutpaste": float(model.score_std[0]), "ae": float(model.score_std[1])}}


def combination_weights(scores: dict[str, np.ndarray], n_good: int, rule: str) -> dict[str, float]:
    """Weights of the two standardised image scores in the combined rule (see the module docstring):
    `scores` are both sources' standardised validation scores, the first n_good of good images."""
    if rule == "equal":
        return {"cutpaste": 1.0, "ae": 1.0}
    aurocs = [validation_auroc(scores["cutpaste"] + r * scores["ae"], n_good) for r in RATIOS]
    r = RATIOS[int(np.argmax(aurocs))]
    return {"cutpaste": 2.0 / (1.0 + r), "ae": 2.0 * r / (1.0 + r)}


def apply_weights(model: CutPasteAEModel, weights: dict[str, float]) -> None:
    """Fold the weights into the score standardisation: z_k * w_k = (s_k - mean_k) / (std_k / w_k)."""
    for i, key in enumerate(("cutpaste", "ae")):
        model.score_std[i] = model.score_std[i] / weights[key]


def _score_rule(options: CutPasteAEOptions, model_config: ModelConfig) -> str:
    ae_red = (f"top{model_config.topk_fraction:g}-mean" if options.ae_reduction == "topk" else options.ae_reduction)
    parts = {"cutpaste": "z(Mahalanobis of pooled CutPaste embedding, max over tiles)",
             "ae": f"z({ae_red} of AE squared-error map)"}
    if options.score == "combined":
        return f"w_cutpaste {parts['cutpaste']} + w_ae {parts['ae']} (weights: {options.combine})"
    return parts[options.score]


class CutPasteAEMethod(MethodBase):
    name = NAME
    summary = "CutPaste classifier + reconstruction autoencoder (paper 003)"
    train_flags = frozenset({"backbone", "weights", "taps"})  # its reductions are its options
    options_cls = CutPasteAEOptions
    default_epochs = CutPasteAEOptions.epochs

    def fit(self, data: FitData) -> Fitted:
        with one_thread():
            return self._fit(data)

    def _fit(self, data: FitData) -> Fitted:
        # Small heads: fitted on the CPU throughout (the frozen backbone's features through ONNX Runtime).
        cfg, opts, device = data.cfg, data.options, torch.device("cpu")
        mc = cfg.model
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed + 3003)
        model = CutPasteAEModel(mc, load_backbone(mc.backbone, mc.taps, cfg.weights), opts)
        tiles = _tiles(data.train, mc)

        graph = PartGraph(model, "grid_features")
        normal = extract_features(graph, tiles, device, "features")[0]
        pools = []
        for c in range(opts.pool_cycles):
            cp = [synthesize(t, "cutpaste", rng)
                  for t in tiles]
            scar = [synthesize(t, "scar", rng)
                    for t in tiles]
            feats = extract_features(graph, cp + scar, device, f"synthetic pool {c + 1}/{opts.pool_cycles}")[0]
            pools.append((feats[:len(tiles)], feats[len(tiles):]))
        del graph
        f = normal.float()
        model.feat_mean.copy_(f.mean(dim=(0, 2, 3), keepdim=True))
        model.feat_std.copy_(f.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-3))
        del f
        cls_loss = train_classifier(model, normal, pools, opts, cfg, gen)
        model.eval()
        fit_gaussians(model, normal)
        del pools, normal
        # The autoencoder draws from streams of its own (initial weights, order, synthetic defects),
        # so an option of the CutPaste head never changes the autoencoder it gets.
        ae_gen = torch.Generator().manual_seed(cfg.seed + AE_SEED)
        ae_rng = np.random.default_rng(cfg.seed + AE_SEED)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + AE_SEED)
            for m in model.autoencoder.modules():
                if m is not model.autoencoder and hasattr(m, "reset_parameters"):
                    m.reset_parameters()
        ae_loss = train_autoencoder(model, tiles, opts, cfg, ae_rng, ae_gen)
        model.eval()
        if opts.ae_per_position:
            fit_ae_positions(model, tiles)
        stats = standardise(model, data.holdout)

        val = make_validation_set(data.holdout, cfg.seed)
        scores = component_scores(model, list(val.good) + list(val.bad))
        validation = {"images": f"{len(val.good)} held-out good + {len(val.bad)} synthetic defects "
                                f"({', '.join(sorted(set(val.kinds)))})",
                      "note": "the same held-out good images also set the standardisation",
                      **{f"{k}_auroc": round(validation_auroc(v, len(val.good)), 4) for k, v in scores.items()}}
        # --no-select: nothing chosen on validation, the weights included (equal)
        combine = opts.combine if cfg.select else "equal"
        weights = combination_weights(scores, len(val.good), combine)
        apply_weights(model, weights)
        # The combined rule as the engine now computes it (the weighted sum), on the same images.
        validation["combined_auroc"] = round(validation_auroc(
            weights["cutpaste"] * scores["cutpaste"] + weights["ae"] * scores["ae"], len(val.good)), 4)
        validation["unweighted_sum_auroc"] = round(validation_auroc(scores["combined"], len(val.good)), 4)
        details = {"score_rule": _score_rule(replace(opts, combine=combine), mc), "score": opts.score,
                   "combination_weights": {k: round(v, 4) for k, v in weights.items()},
                   "classifier": {"classes": list(CLASSES), "final_loss": cls_loss, "embed_dim": opts.embed_dim,
                                  "grid_stride": opts.grid_stride, "pool_cycles": opts.pool_cycles},
                   "autoencoder": {"final_mse": ae_loss, "width": opts.ae_width, "latent": opts.ae_latent,
                                   "scale": opts.ae_scale, "defect_fraction": opts.ae_defect_fraction,
                                   "reduction": opts.ae_reduction,
                                   "per_position": opts.ae_per_position},
                   "map": ("mean of the standardised CutPaste patch-distance and AE error maps"
                           if opts.score == "combined" else f"standardised {opts.score} map"),
                   "standardisation": stats, "validation": validation}
        return Fitted(model, ae_loss + cls_loss, {"enabled": False}, details)

    def build(self, model_config: ModelConfig, options: dict[str, Any]) -> nn.Module:
        opts = self.parse_options(options)
        return CutPasteAEModel(model_config, EfficientNetFeatures(model_config.backbone, model_config.taps), opts)


METHOD = CutPasteAEMethod()
