"""Method "vae" (paper 002): a small convolutional VAE, trained with decoupled gradients (or jointly).

    images uint8 N x H x W x C (grey or rgb)
      -> tiles (tile_images), channels scaled to [0, 1], resampled to the working size h x w (the
         tile's short side -> `size`, aspect kept, both sides rounded to a multiple of 16)
      -> encoder: 4 stride-2 3x3 convolutions (widths w, 2w, 4w, 4w; w = `width`), each with batch
         normalisation and LeakyReLU 0.2, flattened -> one linear layer -> mu and log sigma^2 (`latent`
         units each; log sigma^2 clamped to [-12, 6])
      -> decoder (of the posterior MEAN at inference: no sampling in the graph): one linear layer back
         to 4w x h/16 x w/16, 4 stages of nearest x2 upsampling + 3x3 convolution (widths 4w, 2w, w with
         batch normalisation + LeakyReLU, then the image channels), sigmoid output. Batch normalisation
         is ours: without it the same network (even as a plain autoencoder) stayed at the mean image's
         error for ~500 steps on the generated parts; with it, it fell to a quarter of that.
      -> map = squared reconstruction error (channel mean), resampled to the map grid (resample_grid)
      -> MapHead (the shared path): standardised by held-out good positions, stitched over tiles,
         smoothed, reduced to the score (the reduction chosen label-free like every method's)

Losses (paper 002's definitions): KLD = -1/2 sum_u (1 + log s_u^2 - mu_u^2 - s_u^2), summed over the
latent units, mean over the batch (nats per image); MSE = ||x - x_hat||^2 with x_hat decoded from a
sampled z = mu + s * eps. We report MSE per pixel (mean over pixels and channels, [0, 1] units) and
write P for the pixels x channels of the working size, so ||x - x_hat||^2 = P * MSE.

`training=joint` (the conventional way): one Adam on all weights, loss KLD + P * MSE (the paper's sum
of the two losses as defined, ||.||^2 summed; with unit weights, no annealing); `joint_mse=mean`
uses KLD + MSE instead (the per-pixel mean, a common implementation that weighs the KLD P times more).

`training=decoupled` (the paper's Fig. 1): three gradients, each from ONE loss by autograd,
    E1 = dKLD/d(encoder)   E2 = dMSE/d(encoder)   D = dMSE/d(decoder)
each applied by its own Adam (its own moment estimates), so that neither loss's scale sets the
other's step size (the KLD gradient never reaches the decoder: it does not depend on it; the MSE
gradient reaches both). Each loss is steered toward its own target by the size and sign of its
steps, from the batch's value at that step (a proportional controller with a saturating gain):
    gain_KLD = clip(4 (KLD / kld_target - 1), -1, 1)    E1 steps at lr * |gain|, descending KLD above its
                                                   target and ASCENDING it below (so the posterior
                                                   cannot collapse onto the prior: KLD -> 0)
    gain_MSE = clip(4 (MSE / mse_target - 1), 0, 1)     E2 and D step at lr * gain: reconstruction improves
                                                   until MSE reaches its target, then rests (never
                                                   made worse on purpose)
lr is the shared warm-up + cosine schedule (fitting.ScheduledSteps). kld_target is in nats per image;
mse_target is a FRACTION of the baseline MSE, the per-pixel variance of the training tiles around
their mean tile (what a collapsed VAE, which reconstructs every image as the mean, would score):
0.25 = the reconstruction explains 75 % of the pixel variance. Targets are recorded in absolute units.
The defaults (32 nats: 1 per unit of the 32-unit latent; 0.25) are a priori choices, not tuned.

What the paper leaves open, and what we chose: the architecture, latent size, image size, learning
rates and the loss targets are not given (all ours, above; defaults sized for a shared 2-core CPU).
How a loss is "independently controlled" toward its target is not described beyond the three
gradients: the per-gradient Adam states, the saturating proportional gains and the one-sided MSE
control are our reading. Whether the three updates ran in one step or in turns is not said: here
every step computes all three gradients on the same batch and z, then applies E1, E2 (encoder) and
D (decoder) with their own optimisers. The scaling of ||x - x_hat||^2 (sum vs mean) is not given:
joint uses the sum as printed, which weights reconstruction by P against the KLD.

Recorded in method.details: both losses at the end of training (on all training tiles, z sampled
with a fixed seed, and on the held-out tiles) against their targets, a per-epoch history, and the
active latent units (Burda et al. 2016: units u with Cov_x(E_q[z_u | x]) = Var_x(mu_u) > 0.01,
computed on the held-out good tiles, sample variance with n - 1).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from inspectd.engines.fitting import ScheduledSteps, batches, one_thread, select_reduction
from inspectd.engines.methods.base import FitData, Fitted, MethodBase
from inspectd.engines.model import MapHead, resample_grid, tile_images
from inspectd.engines.model_config import ModelConfig

NAME = "vae"
TRAININGS = ("decoupled", "joint")
# joint: the reconstruction term summed over the P pixels (as paper 002 prints it) or averaged (a
# common implementation, which weighs the KLD P times more: the setting where joint VAEs collapse).
JOINT_MSE = ("sum", "mean")
LEVELS = 4                 # stride-2 stages: the working size is a multiple of 2**LEVELS
LOGVAR_RANGE = (-12.0, 6.0)
ACTIVE_THRESHOLD = 0.01    # Burda et al.: Cov_x(E_q[z_u|x]) above this = an active unit
MIN_STEPS_PER_EPOCH = 16   # small folders: an epoch is at least this many steps
GAIN = 4.0                 # decoupled steering: full-size steps until a loss is within 25 % of its target
HISTORY_MAX = 100          # per-epoch loss history kept in the manifest (evenly thinned beyond)


@dataclass
class VAEOptions:
    epochs: int = 25               # passes over the good tiles (MTD: 685 images, 85 steps of 8 at 128 px per epoch)
    size: int = 128                # working size of the tile's short side (multiple of 16)
    latent: int = 32               # latent units
    width: int = 16                # encoder channels at its first stage (x2, x4, x4 deeper)
    training: str = "decoupled"    # decoupled (paper 002's three gradients) or joint (KLD + ||x - x_hat||^2)
    kld_target: float = 32.0       # decoupled: KLD target, nats per image (1 nat per unit of the default latent)
    mse_target: float = 0.25       # decoupled: MSE target as a fraction of the baseline (mean-tile) MSE
    joint_mse: str = "sum"         # joint: ||x - x_hat||^2 summed over pixels (the paper) or their mean

    def check(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"option {name.replace('_', '-')}={getattr(self, name)!r}: {why} for method {NAME}")

        if not 1 <= self.epochs <= 1000:
            raise bad("epochs", "must be 1..1000")
        if not 32 <= self.size <= 512 or self.size % 16:
            raise bad("size", "a multiple of 16 in 32..512 (4 stride-2 stages)")
        if not 1 <= self.latent <= 512:
            raise bad("latent", "must be 1..512")
        if not 2 <= self.width <= 128:
            raise bad("width", "must be 2..128")
        if self.training not in TRAININGS:
            raise bad("training", f"choose from {', '.join(TRAININGS)}")
        if not (math.isfinite(self.kld_target) and self.kld_target > 0):
            raise bad("kld_target", "must be > 0 (nats per image)")
        if not (math.isfinite(self.mse_target) and 0 < self.mse_target < 1):
            raise bad("mse_target", "must be in (0, 1) (a fraction of the mean-tile MSE)")
        if self.joint_mse not in JOINT_MSE:
            raise bad("joint_mse", f"choose from {', '.join(JOINT_MSE)}")


def working_size(height: int, width: int, size: int) -> tuple[int, int]:
    """The tile's working resolution: short side -> size, aspect kept, each side a multiple of 16."""
    short = min(height, width)
    step = 2 ** LEVELS

    def side(v: int) -> int:
        return max(step, int(round(v * size / short / step)) * step)

    return side(height), side(width)


# ------------------------------------------------------------------------------------------- network

class ConvVAE(nn.Module):
    """Encoder (convolutions -> linear -> mu, log sigma^2) and decoder (linear -> upsampling convolutions
    -> sigmoid) for images (N, C, h, w) in [0, 1], h and w multiples of 16. Usable on its own (e.g. for
    generating content): sample() decodes z ~ N(0, I)."""

    def __init__(self, channels: int, shape: tuple[int, int], latent: int, width: int) -> None:
        super().__init__()
        widths = [width, 2 * width, 4 * width, 4 * width][:LEVELS]
        self.latent = latent
        self.bottom = (widths[-1], shape[0] // 2 ** LEVELS, shape[1] // 2 ** LEVELS)
        flat = self.bottom[0] * self.bottom[1] * self.bottom[2]
        enc: list[nn.Module] = []
        c = channels
        for w in widths:
            enc += [nn.Conv2d(c, w, 3, stride=2, padding=1), nn.BatchNorm2d(w), nn.LeakyReLU(0.2)]
            c = w
        self.features = nn.Sequential(*enc, nn.Flatten())
        self.posterior = nn.Linear(flat, 2 * latent)
        self.expand = nn.Sequential(nn.Linear(latent, flat), nn.LeakyReLU(0.2))
        dec: list[nn.Module] = []
        for w in reversed(widths[:-1]):
            dec += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w),
                    nn.LeakyReLU(0.2)]
            c = w
        dec += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(c, channels, 3, padding=1), nn.Sigmoid()]
        self.upsample = nn.Sequential(*dec)

    def encoder_parameters(self) -> list[nn.Parameter]:
        return list(self.features.parameters()) + list(self.posterior.parameters())

    def decoder_parameters(self) -> list[nn.Parameter]:
        return list(self.expand.parameters()) + list(self.upsample.parameters())

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.posterior(self.features(x))
        mu, logvar = h[:, :self.latent], h[:, self.latent:]
        return mu, logvar.clamp(*LOGVAR_RANGE)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.upsample(self.expand(z).view(-1, *self.bottom))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction from the posterior mean (deterministic: what the engine scores)."""
        return self.decode(self.encode(x)[0])

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        z = torch.randn(n, self.latent, generator=generator).to(self.posterior.weight.device)
        return self.decode(z)


def kld(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) per image, summed over units: (N,)."""
    return -0.5 * (1 + logvar - mu * mu - logvar.exp()).sum(dim=1)


def losses(vae: ConvVAE, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(KLD nats per image, MSE per pixel), batch means, with z = mu + sigma * eps."""
    mu, logvar = vae.encode(x)
    z = mu + (0.5 * logvar).exp() * eps
    return kld(mu, logvar).mean(), F.mse_loss(vae.decode(z), x)


# -------------------------------------------------------------------------------------------- engine

class VAEModel(nn.Module):
    """The vae engine: uint8 images -> (raw score, anomaly map); see the module docstring."""

    def __init__(self, config: ModelConfig, options: VAEOptions) -> None:
        super().__init__()
        config.check()
        self.config = config
        self.options = options
        self.channels = 1 if config.color_mode == "gray" else 3
        self.shape = working_size(config.image_height, config.image_width, options.size)
        self.vae = ConvVAE(self.channels, self.shape, options.latent, options.width)
        self.head = MapHead(config, 1)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 N x H x W x C canvas -> tiles as float (N*T, C, h, w) in [0, 1] at the working size."""
        x = tile_images(images, self.config).permute(0, 3, 1, 2).float() * (1.0 / 255.0)
        return resample_grid(x, self.shape)

    def error(self, x: torch.Tensor) -> torch.Tensor:
        """Prepared tiles -> squared reconstruction error (posterior mean) on the map grid (N*T, h, w)."""
        err = ((self.vae(x) - x) ** 2).mean(dim=1, keepdim=True)
        return resample_grid(err, self.head.tile_map)[:, 0]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head([self.error(self.prepare(images))])


# ------------------------------------------------------------------------------------------- training

def decoupled_gradients(vae: ConvVAE, x: torch.Tensor, eps: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, dict[str, tuple[torch.Tensor, ...]]]:
    """The paper's three gradients on one batch: E1 = dKLD/d(encoder), E2 = dMSE/d(encoder),
    D = dMSE/d(decoder), each by autograd of that loss alone. Returns (KLD, MSE, {"E1", "E2", "D"})."""
    enc, dec = vae.encoder_parameters(), vae.decoder_parameters()
    k, m = losses(vae, x, eps)
    e1 = torch.autograd.grad(k, enc, retain_graph=True)
    e2d = torch.autograd.grad(m, enc + dec)
    return k, m, {"E1": e1, "E2": e2d[:len(enc)], "D": e2d[len(enc):]}


def steering_gains(kld_value: float, mse_value: float, kld_target: float, mse_target: float) -> tuple[float, float]:
    """(gain of E1, gain of E2 and D): saturating proportional control toward each loss's target
    (KLD both ways, MSE only downward)."""
    g_kld = max(-1.0, min(1.0, GAIN * (kld_value / kld_target - 1.0)))
    g_mse = max(0.0, min(1.0, GAIN * (mse_value / mse_target - 1.0)))
    return g_kld, g_mse


class DecoupledUpdate:
    """Applies E1, E2 and D with three Adam optimisers (own moment estimates each); a gradient whose
    gain is negative is applied as ascent, one whose gain is 0 is not applied (its state untouched)."""

    def __init__(self, vae: ConvVAE, lr: float) -> None:
        self.params = {"E1": vae.encoder_parameters(), "E2": vae.encoder_parameters(), "D": vae.decoder_parameters()}
        self.opts = {k: torch.optim.Adam(p, lr=lr) for k, p in self.params.items()}

    def apply(self, grads: dict[str, tuple[torch.Tensor, ...]], gains: dict[str, float], lr: float) -> None:
        for key in ("E1", "E2", "D"):
            gain = gains[key]
            if gain == 0.0:
                continue
            sign = 1.0 if gain > 0 else -1.0
            for p, g in zip(self.params[key], grads[key]):
                p.grad = g if sign > 0 else -g
            opt = self.opts[key]
            for group in opt.param_groups:
                group["lr"] = lr * abs(gain)
            opt.step()
            for p in self.params[key]:
                p.grad = None


def baseline_mse(x: torch.Tensor) -> float:
    """Per-pixel MSE of reconstructing every tile by the mean tile (a collapsed VAE's error)."""
    return float(((x - x.mean(dim=0, keepdim=True)) ** 2).mean())


def train_vae(vae: ConvVAE, x: torch.Tensor, options: VAEOptions, cfg: Any, device: torch.device,
              mse_target_abs: float) -> tuple[float, list[dict[str, float]]]:
    """Trains vae on tiles x (N, C, h, w) in [0, 1] (on the CPU; batches moved to device) the
    options' way. Returns (the averaged final training loss, per-epoch mean KLD / MSE / gains)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    n = x.shape[0]
    bs = max(2, cfg.batch_size)
    steps_per_epoch = max(MIN_STEPS_PER_EPOCH, n // bs)
    total = steps_per_epoch * options.epochs
    pixels = float(x[0].numel())
    joint = options.training == "joint"
    joint_weight = pixels if options.joint_mse == "sum" else 1.0
    if joint:
        opt: torch.optim.Optimizer | None = torch.optim.Adam(vae.parameters(), lr=cfg.lr_max)
        update = None
    else:
        opt, update = None, DecoupledUpdate(vae, cfg.lr_max)
    steps = ScheduledSteps(opt, total, cfg, f"vae {options.training}")
    history: list[dict[str, float]] = []
    vae.train()
    for epoch in range(options.epochs):
        order = torch.cat([torch.randperm(n, generator=gen) for _ in range(-(-steps_per_epoch * bs // n))])
        sums = {"kld": 0.0, "mse": 0.0, "gain_kld": 0.0, "gain_mse": 0.0}
        for b in range(steps_per_epoch):
            batch = x[order[b * bs:(b + 1) * bs]].to(device)
            eps = torch.randn(batch.shape[0], vae.latent, generator=gen).to(device)
            if joint:
                k, m = losses(vae, batch, eps)
                steps.step(k + joint_weight * m)
                g_k = g_m = 1.0
            else:
                k, m, grads = decoupled_gradients(vae, batch, eps)
                g_k, g_m = steering_gains(k.item(), m.item(), options.kld_target, mse_target_abs)
                gains = {"E1": g_k, "E2": g_m, "D": g_m}
                steps.step(k + pixels * m, lambda lr: update.apply(grads, gains, lr))  # type: ignore[union-attr]
            for key, v in (("kld", k.item()), ("mse", m.item()), ("gain_kld", g_k), ("gain_mse", g_m)):
                sums[key] += v
        row = {"epoch": epoch + 1, **{k: v / steps_per_epoch for k, v in sums.items()}}
        history.append({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()})
    vae.eval()
    return steps.close(), history


@torch.no_grad()
def evaluate_losses(vae: ConvVAE, x: torch.Tensor, device: torch.device, seed: int) -> dict[str, float]:
    """Mean KLD (nats per image) and MSE (per pixel, z sampled with a fixed seed) over tiles x."""
    gen = torch.Generator().manual_seed(seed)
    k_sum = m_sum = 0.0
    for sl in batches(x.shape[0], 32):
        batch = x[sl].to(device)
        eps = torch.randn(batch.shape[0], vae.latent, generator=gen).to(device)
        k, m = losses(vae, batch, eps)
        k_sum += float(k) * batch.shape[0]
        m_sum += float(m) * batch.shape[0]
    return {"kld": k_sum / x.shape[0], "mse": m_sum / x.shape[0]}


@torch.no_grad()
def latent_means(vae: ConvVAE, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """E_q[z | x] = mu for every tile: (N, latent)."""
    return torch.cat([vae.encode(x[sl].to(device))[0].cpu() for sl in batches(x.shape[0], 32)])


def active_units(mu: torch.Tensor, threshold: float = ACTIVE_THRESHOLD) -> tuple[int, list[float]]:
    """Burda et al.: the number of units whose Var_x(E_q[z_u|x]) exceeds threshold, and every unit's variance."""
    if mu.shape[0] < 2:
        raise ValueError("active units need at least 2 images")
    var = mu.double().var(dim=0, unbiased=True)
    return int((var > threshold).sum()), [float(v) for v in var]


def _tiles(model: VAEModel, images: Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
    out = [model.prepare(torch.from_numpy(np.stack(images[sl])).to(device)).cpu() for sl in batches(len(images), 16)]
    return torch.cat(out)


def _thin(rows: list[dict[str, float]]) -> list[dict[str, float]]:
    if len(rows) <= HISTORY_MAX:
        return rows
    keep = sorted({int(round(i)) for i in np.linspace(0, len(rows) - 1, HISTORY_MAX)})
    return [rows[i] for i in keep]


class VAEMethod(MethodBase):
    name = NAME
    train_flags = frozenset({"reduction"})  # a pixel VAE: no backbone
    summary = "convolutional VAE, decoupled KLD / MSE gradients, reconstruction error (paper 002)"
    options_cls = VAEOptions
    default_epochs = VAEOptions.epochs

    def fit(self, data: FitData) -> Fitted:
        with one_thread():
            return self._fit(data)

    def _fit(self, data: FitData) -> Fitted:
        cfg, opts, device = data.cfg, data.options, data.device
        torch.manual_seed(cfg.seed)
        model = VAEModel(cfg.model, opts).to(device)
        train_x = _tiles(model, data.train, device)
        hold_x = _tiles(model, data.holdout, device)
        baseline = baseline_mse(train_x)
        mse_target_abs = opts.mse_target * baseline
        print(f"inspectd train: vae {opts.training} at {model.shape[0]}x{model.shape[1]}, latent {opts.latent}; "
              f"baseline (mean-tile) MSE {baseline:.5f}"
              + (f", targets KLD {opts.kld_target:g} nats, MSE {mse_target_abs:.5f}" if opts.training == "decoupled"
                 else ""), file=sys.stderr)
        loss, history = train_vae(model.vae, train_x, opts, cfg, device, mse_target_abs)
        model.eval()
        final = {"train": evaluate_losses(model.vae, train_x, device, cfg.seed + 2002),
                 "holdout": evaluate_losses(model.vae, hold_x, device, cfg.seed + 2003)}
        n_active, unit_var = active_units(latent_means(model.vae, hold_x, device))
        with torch.no_grad():
            maps = torch.cat([model.error(hold_x[sl].to(device)).flatten().cpu() for sl in batches(hold_x.shape[0], 16)])
        model.head.nll_mean[0] = maps.mean()
        model.head.nll_std[0] = maps.std().clamp_min(1e-12)
        selection = select_reduction(model, cfg, data.holdout, device) if cfg.select else {"enabled": False}
        details = {
            "training": opts.training,
            "network": f"conv encoder widths {[opts.width, 2 * opts.width, 4 * opts.width, 4 * opts.width]}, "
                       f"dense latent {opts.latent}, upsampling decoder",
            "working_size": list(model.shape), "parameters": sum(p.numel() for p in model.vae.parameters()),
            "losses": "KLD nats per image (sum over units); MSE per pixel in [0, 1] units, z sampled",
            "final_kld": round(final["train"]["kld"], 4), "final_mse": round(final["train"]["mse"], 6),
            "kld_target": opts.kld_target, "mse_target": round(mse_target_abs, 6),
            "mse_target_fraction": opts.mse_target, "baseline_mse": round(baseline, 6),
            "targets_drive_training": opts.training == "decoupled",
            "final": {k: {"kld": round(v["kld"], 4), "mse": round(v["mse"], 6)} for k, v in final.items()},
            "active_units": n_active, "latent": opts.latent,
            "active_units_rule": f"Var over {hold_x.shape[0]} held-out good tiles of E_q[z_u|x] > {ACTIVE_THRESHOLD}",
            "unit_variances": [round(v, 5) for v in unit_var],
            "history": _thin(history),
        }
        print(f"inspectd train: vae final KLD {final['train']['kld']:.3f} nats (target {opts.kld_target:g}), "
              f"MSE {final['train']['mse']:.5f} (target {mse_target_abs:.5f}), active units {n_active}/{opts.latent}",
              file=sys.stderr)
        return Fitted(model, loss, selection, details)

    def build(self, model_config: ModelConfig, options: dict[str, Any]) -> nn.Module:
        return VAEModel(model_config, self.parse_options(options))


METHOD = VAEMethod()

__all__ = ["METHOD", "ConvVAE", "DecoupledUpdate", "VAEModel", "VAEOptions", "active_units", "baseline_mse",
           "decoupled_gradients", "kld", "latent_means", "losses", "steering_gains", "train_vae", "working_size"]
