"""Method "inpaint" (paper 004): fuzzy-mask inpainting generator, weighted SSIM, dynamic inference.

    images uint8 N x H x W x C (grey or rgb)
      -> tiles (tile_images), the tile's own channels scaled to [0, 1], resized to `size` x `size`
      -> generator G: a light encoder-decoder (NOT the paper's ResNet34: 4 stride-2 stages of two
         3x3 convolutions, widths 16/32/64/64, nearest upsampling + a 3x3 convolution per decoder
         stage, sigmoid output) with channel-concatenation skips from encoder stages 2 and 3
         (1/4 and 1/8 resolution) into the decoder; `skips=false` is the plain CAE baseline
      -> dynamic inference (below, inside the ONNX graph as a Loop with early exit)
      -> per-pixel difference D(a, b) = (1 - SSIM map) + squared error (channel mean)
      -> MapHead (one source): pooled to the map grid, stitched over tiles, smoothed, reduced

Training (Eq. 5): L = [MSE(I, G(I)) + L(I, G(I))] + 0.1 [MSE(I, G(M(I))) + L(I, G(M(I)))], where
L = 1 - mean([Lum^a * Con * Str^b]^(1/g)) is the weighted SSIM with the paper's class exponents
(I: 0.2/0.5/2.3, II: 0.1/0.8/2.1, III: 0.3/0.6/2.1) and C1 = 0.01^2, C2 = 0.03^2, C3 = 0.015^2. The
structure term is the STANDARD one, Str = (s_xy + C3) / (s_x s_y + C3) (the paper prints a typo).
Lum, Con and Str are clamped to [1e-6, 1] before the fractional powers (Str can be negative).
SSIM window: Gaussian, sigma 1.5, 11 taps, replicate padding. `wssim=false`: MSE terms only.
`fuzzy=false`: the second (repair) term is dropped, G only reconstructs.

Fuzzy masking M(I) on a k x k grid of cells (k = `grid`; the paper's 16-pixel cells at 256 px are
the same 16 x 16 grid): within a batch, images are paired; image 2j masks a random half of the
cells, image 2j+1 exactly the complement (an odd last image gets its own random half). A masked
pixel becomes w * I + (1 - w) * n, with n ~ U(0, 1) interference noise and the weight a tent
w = 0.5 (1 - |u|)(1 - |v|), (u, v) in (-1, 1) the pixel's position in its cell: half the original
is kept at the cell centre, none at its border. At inference the noise is a fixed U(0, 1) pattern
drawn from the seed (a buffer, so the graph stays deterministic).

Dynamic inference (our coherent reading of the paper's Algorithm 1, which is inconsistent):
  R1 = G(I); R(i+1) = G(R(i)) until successive outputs agree, i.e. the largest k x k cell mean of
  (R(i+1) - R(i))^2 is <= m, or `max_iterations` generator passes in all. Per image: an image that
  has converged is frozen (later passes do not change it), so results never depend on the batch.
  m = 1.05 x the 95 % quantile of that quantity for the first pair (R2 vs R1) over held-out good
  tiles (so most good parts converge after 2 passes; a defect still being "repaired" keeps moving).
  Converged branch: map = relu(D(I, R_n) - D(R_{n-1}, R_n)): the distance to the converged,
    most-normal reconstruction minus the generator's own residual per-pass loss at that fixed point
    (the "feature loss" the paper removes; its second "background" term D(I, R1) would cancel the
    anomaly itself, so the background is left to the head's standardisation instead).
  Not converged (repair branch): cells whose mean D(I, R1) exceeds t (1.05 x the 99 % quantile of
    held-out good cell means) are fuzzy-masked (as in training, fixed noise), G repairs the masked
    image once, map = D(I, G(M_t(I))).
  Each branch's map is standardised by its own mean/std on training tiles before the per-image
  selection, so both branches speak the same units; MapHead then reduces the one map.
The loop is a TorchScript `while` (scripted only at export) that becomes an ONNX Loop whose
condition is "some image has not converged and passes < max_iterations": early exit in every
backend. Passes per tile: 1..max_iterations, plus one repair pass (always computed, selected per
image with Where). `dynamic=false`: map = D(I, G(I)) (one pass). The weighted exponents are used
in the map's SSIM too when `wssim` is on (the paper's "anomaly evaluation function"), else plain SSIM.

Latency per iteration count: `export_fixed_iterations(model, path, n)` writes an engine that
never converges early (threshold -1), i.e. exactly n passes + the repair pass, for benchmarks.
"""

from __future__ import annotations

import copy
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from inspectd.engines.bundle import INPUT_NAME, OUTPUT_NAMES
from inspectd.engines.export import OPSET, export_onnx
from inspectd.engines.fitting import ScheduledSteps, batches, select_reduction
from inspectd.engines.methods.base import FitData, Fitted, MethodBase
from inspectd.engines.model import MapHead, gaussian_kernel1d, tile_images
from inspectd.engines.model_config import ModelConfig

SSIM_CLASSES = {"I": (0.2, 0.5, 2.3), "II": (0.1, 0.8, 2.1), "III": (0.3, 0.6, 2.1)}
C1, C2, C3 = 0.01 ** 2, 0.03 ** 2, 0.015 ** 2
LAMBDA = 0.1
WIDTHS = (16, 32, 64, 64)
CONVERGENCE_QUANTILE = 0.95
CELL_QUANTILE = 0.99
MIN_STEPS_PER_EPOCH = 16
MARGIN = 1.05  # keeps calibrated thresholds off the held-out (golden) images' own values


@dataclass
class InpaintOptions:
    epochs: int = 25  # MTD (685 images, 128 px): ~0.375 s per step of 8, 85 steps per epoch -> ~13 min on 2 cores
    size: int = 128
    grid: int = 16
    ssim_class: str = "III"
    skips: bool = True
    fuzzy: bool = True
    wssim: bool = True
    dynamic: bool = True
    max_iterations: int = 10

    def check(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"option epochs={self.epochs}: must be >= 1")
        if self.size < 32 or self.size % 16:
            raise ValueError(f"option size={self.size}: a multiple of 16, at least 32 (4 stride-2 stages)")
        if self.grid < 2 or self.size % self.grid:
            raise ValueError(f"option grid={self.grid}: at least 2 and must divide size {self.size}")
        if self.ssim_class not in SSIM_CLASSES:
            raise ValueError(f"option ssim-class={self.ssim_class!r}: choose I, II or III")
        if not 1 <= self.max_iterations <= 50:
            raise ValueError(f"option max-iterations={self.max_iterations}: must be 1..50")


# --------------------------------------------------------------------------------------------- SSIM

def _blur(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    c, r = int(x.shape[1]), kernel.numel() // 2
    x = F.pad(x, (r, r, r, r), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def ssim_map(x: torch.Tensor, y: torch.Tensor, kernel: torch.Tensor,
             exponents: tuple[float, float, float] | None = None) -> torch.Tensor:
    """Per-pixel (weighted) SSIM of [0, 1] images (N, C, H, W) -> (N, C, H, W). exponents None: the
    standard SSIM Lum * Con * Str; else [Lum^a * Con * Str^b]^(1/g) (terms clamped to [1e-6, 1])."""
    mx, my = _blur(x, kernel), _blur(y, kernel)
    vx = (_blur(x * x, kernel) - mx * mx).clamp_min(0)
    vy = (_blur(y * y, kernel) - my * my).clamp_min(0)
    cxy = _blur(x * y, kernel) - mx * my
    sx, sy = torch.sqrt(vx + 1e-12), torch.sqrt(vy + 1e-12)
    lum = (2 * mx * my + C1) / (mx * mx + my * my + C1)
    con = (2 * sx * sy + C2) / (vx + vy + C2)
    st = (cxy + C3) / (sx * sy + C3)
    if exponents is None:
        return lum * con * st
    a, b, g = exponents
    p = lum.clamp(1e-6, 1.0) ** a * con.clamp(1e-6, 1.0) * st.clamp(1e-6, 1.0) ** b
    return p ** (1.0 / g)


def ssim_kernel() -> torch.Tensor:
    return gaussian_kernel1d(1.5)[1:-1]  # radius 5: the classic 11-tap window


# ---------------------------------------------------------------------------------------- fuzzy masks

def fuzzy_cell_masks(n: int, grid: int, gen: torch.Generator) -> torch.Tensor:
    """(n, grid, grid) bool: images paired (0,1), (2,3) ...; the second of a pair masks exactly the
    cells the first leaves (complementary); an odd last image gets its own random half."""
    out = torch.zeros(n, grid, grid, dtype=torch.bool)
    for i in range(0, n, 2):
        cells = torch.rand(grid, grid, generator=gen) < 0.5
        out[i] = cells
        if i + 1 < n:
            out[i + 1] = ~cells
    return out


def cell_weight(size: int, grid: int) -> torch.Tensor:
    """(1, 1, size, size): the share of the original a masked pixel keeps, 0.5 (1-|u|)(1-|v|)."""
    cell = size // grid
    u = (torch.arange(cell, dtype=torch.float32) + 0.5) / cell * 2 - 1
    tent = (1 - u.abs())
    w = 0.5 * tent[:, None] * tent[None, :]
    return w.repeat(grid, grid)[None, None]


def apply_fuzzy(x: torch.Tensor, cells: torch.Tensor, weight: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x (N, C, S, S) in [0, 1]; cells (N, 1, k, k) float 0/1 -> fuzzy-masked x."""
    size = int(x.shape[-1])
    m = F.interpolate(cells, size=(size, size), mode="nearest")
    return x * (1 - m) + m * (weight * x + (1 - weight) * noise)


# ------------------------------------------------------------------------------------------ generator

def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.LeakyReLU(0.2),
                         nn.Conv2d(cout, cout, 3, 1, 1), nn.LeakyReLU(0.2))


class Generator(nn.Module):
    """Light encoder-decoder (see the module docstring); skips from encoder stages 2 and 3."""

    __constants__ = ["skips"]

    def __init__(self, channels: int, skips: bool) -> None:
        super().__init__()
        w1, w2, w3, w4 = WIDTHS
        self.skips = skips
        self.e1, self.e2, self.e3, self.e4 = (_block(channels, w1, 2), _block(w1, w2, 2), _block(w2, w3, 2),
                                              _block(w3, w4, 2))
        self.d3 = nn.Sequential(nn.Conv2d(w4 + (w3 if skips else 0), w3, 3, 1, 1), nn.LeakyReLU(0.2))
        self.d2 = nn.Sequential(nn.Conv2d(w3 + (w2 if skips else 0), w2, 3, 1, 1), nn.LeakyReLU(0.2))
        self.d1 = nn.Sequential(nn.Conv2d(w2, w1, 3, 1, 1), nn.LeakyReLU(0.2))
        self.d0 = nn.Conv2d(w1, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.e1(x)
        e2 = self.e2(e1)
        e3 = self.e3(e2)
        e4 = self.e4(e3)
        h = F.interpolate(e4, scale_factor=2.0, mode="nearest")
        if self.skips:
            h = torch.cat([h, e3], dim=1)
        h = F.interpolate(self.d3(h), scale_factor=2.0, mode="nearest")
        if self.skips:
            h = torch.cat([h, e2], dim=1)
        h = F.interpolate(self.d2(h), scale_factor=2.0, mode="nearest")
        h = F.interpolate(self.d1(h), scale_factor=2.0, mode="nearest")
        return torch.sigmoid(self.d0(h))


class Dynamic(nn.Module):
    """R1 = G(x), then R(i+1) = G(R(i)) until every image's successive outputs agree within m (the
    largest cell mean of the squared change) or max_iterations passes. Scripted at export: a Loop.
    Returns R1, R_{n-1}, R_n, converged (N,) bool, passes (N,) float."""

    __constants__ = ["max_iterations", "cell"]

    def __init__(self, gen: Generator, max_iterations: int, cell: int) -> None:
        super().__init__()
        self.gen = gen
        self.max_iterations = max_iterations
        self.cell = cell

    def forward(self, x: torch.Tensor, m: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                  torch.Tensor, torch.Tensor]:
        r1 = self.gen(x)
        prev = x
        cur = r1
        converged = x[:, 0, 0, 0] < -1.0  # all False, batch-sized
        passes = torch.ones_like(x[:, 0, 0, 0])
        i = 1
        while i < self.max_iterations and not bool(converged.all()):
            nxt = self.gen(cur)
            change = F.avg_pool2d(((nxt - cur) ** 2).mean(dim=1, keepdim=True), self.cell)
            active = ~converged
            keep = active.view(-1, 1, 1, 1)
            prev = torch.where(keep, cur, prev)
            cur = torch.where(keep, nxt, cur)
            passes = passes + active.to(passes.dtype)
            converged = converged | (change.flatten(1).max(dim=1)[0] <= m)
            i += 1
        return r1, prev, cur, converged, passes


# ------------------------------------------------------------------------------------------- engine

class InpaintModel(nn.Module):
    """The inpainting engine: uint8 images -> (raw score, anomaly map); see the module docstring."""

    def __init__(self, config: ModelConfig, options: InpaintOptions) -> None:
        super().__init__()
        config.check()
        self.config = config
        self.options = options
        self.size = options.size
        self.channels = 1 if config.color_mode == "gray" else 3
        self.cell = options.size // options.grid
        self.exponents = SSIM_CLASSES[options.ssim_class] if options.wssim else None
        self.dyn = Dynamic(Generator(self.channels, options.skips), options.max_iterations, self.cell)
        self.register_buffer("threshold", torch.tensor(0.0))         # m (convergence)
        self.register_buffer("cell_threshold", torch.tensor(0.0))    # t (repair-branch cells)
        self.register_buffer("branch_stats", torch.tensor([0.0, 1.0, 0.0, 1.0]))  # conv mean/std, repair mean/std
        g = torch.Generator().manual_seed(config.seed + 4004)
        self.register_buffer("interference", torch.rand(1, self.channels, self.size, self.size, generator=g))
        self.register_buffer("weight", cell_weight(self.size, options.grid), persistent=False)
        self.register_buffer("kernel", ssim_kernel(), persistent=False)
        self.head = MapHead(config, 1)

    @property
    def gen(self) -> Generator:
        return self.dyn.gen

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 N x H x W x C canvas -> tiles as float (N*T, C, size, size) in [0, 1]."""
        x = tile_images(images, self.config).permute(0, 3, 1, 2).float() / 255.0
        h, w = int(x.shape[-2]), int(x.shape[-1])
        if (h, w) == (self.size, self.size):
            return x
        if h % self.size == 0 and w % self.size == 0:
            return F.avg_pool2d(x, (h // self.size, w // self.size))
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)

    def difference(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(N, S, S): (1 - SSIM) + squared error, channel means."""
        sim = ssim_map(a, b, self.kernel, self.exponents)
        return (1 - sim).mean(dim=1) + ((a - b) ** 2).mean(dim=1)

    def repair(self, x: torch.Tensor, r1: torch.Tensor) -> torch.Tensor:
        """The repair branch: suspicious cells of D(x, R1) fuzzy-masked, repaired once by G."""
        cells = F.avg_pool2d(self.difference(x, r1)[:, None], self.cell)
        suspicious = (cells > self.cell_threshold).to(x.dtype)
        return self.gen(apply_fuzzy(x, suspicious, self.weight, self.interference))

    def branch_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(converged-branch map, repair-branch map, converged, passes), unstandardised."""
        r1, prev, cur, converged, passes = self.dyn(x, self.threshold)
        conv_map = F.relu(self.difference(x, cur) - self.difference(prev, cur))
        rep_map = self.difference(x, self.repair(x, r1))
        return conv_map, rep_map, converged, passes

    def tile_map(self, x: torch.Tensor) -> torch.Tensor:
        if not self.options.dynamic:
            return self.difference(x, self.gen(x))
        conv_map, rep_map, converged, _ = self.branch_maps(x)
        s = self.branch_stats
        return torch.where(converged.view(-1, 1, 1), (conv_map - s[0]) / s[1], (rep_map - s[2]) / s[3])

    def _to_grid(self, m: torch.Tensor) -> torch.Tensor:
        th, tw = self.head.tile_map
        m = m[:, None]
        if self.size % th == 0 and self.size % tw == 0:
            return F.avg_pool2d(m, (self.size // th, self.size // tw))[:, 0]
        return F.interpolate(m, size=(th, tw), mode="bilinear", align_corners=False)[:, 0]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head([self._to_grid(self.tile_map(self.prepare(images)))])

    @torch.no_grad()
    def iterations(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per tile: generator passes the dynamic loop ran and whether it converged (torch side)."""
        _, _, _, converged, passes = self.dyn(self.prepare(images), self.threshold)
        return passes, converged


def export_engine(model: InpaintModel, path: Path) -> None:
    """model.onnx. With dynamic inference, the loop is scripted (TorchScript `while` -> ONNX Loop with
    early exit) inside a traced copy of the engine; the ONNX exporter's own tracer cannot call a
    scripted submodule, so the copy is traced with torch.jit.trace first and that graph exported."""
    model = model.eval().cpu()
    if not model.options.dynamic:
        export_onnx(model, path)
        return
    cfg = model.config
    example = torch.zeros(1, cfg.input_height, cfg.input_width, model.channels, dtype=torch.uint8)
    work = copy.deepcopy(model)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer notes about static sizes (fixed per bundle); jit deprecation
        work.dyn = torch.jit.script(work.dyn)
        traced = torch.jit.trace(work, (example,), check_trace=False)
        torch.onnx.export(traced, (example,), buf, dynamo=False, opset_version=OPSET,
                          input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAMES[0]: {0: "batch"},
                                        OUTPUT_NAMES[1]: {0: "batch"}})
    path.write_bytes(buf.getvalue())


def export_fixed_iterations(model: InpaintModel, path: Path, iterations: int) -> None:
    """Benchmark engine: exactly `iterations` generator passes (never converges early) + repair."""
    fixed = copy.deepcopy(model).eval()
    fixed.dyn.max_iterations = iterations
    fixed.threshold.fill_(-1.0)
    export_engine(fixed, path)


# -------------------------------------------------------------------------------------------- fitting

def _tiles(model: InpaintModel, images: list[np.ndarray], device: torch.device) -> torch.Tensor:
    out = [model.prepare(torch.from_numpy(np.stack(images[sl])).to(device)) for sl in batches(len(images), 16)]
    return torch.cat(out)


def _loss(model: InpaintModel, target: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    loss = F.mse_loss(out, target)
    if model.options.wssim:
        loss = loss + (1 - ssim_map(target, out, model.kernel, model.exponents).mean())
    return loss


def train_generator(model: InpaintModel, x: torch.Tensor, options: InpaintOptions, cfg: Any,
                    device: torch.device) -> float:
    gen = torch.Generator().manual_seed(cfg.seed)
    n = x.shape[0]
    bs = max(2, cfg.batch_size)
    steps_per_epoch = max(MIN_STEPS_PER_EPOCH, n // bs)  # small folders: an epoch is at least this many steps
    total = steps_per_epoch * options.epochs
    opt = torch.optim.Adam(model.gen.parameters(), lr=cfg.lr_max)
    steps = ScheduledSteps(opt, total, cfg, "train")
    model.gen.train()
    for _ in range(options.epochs):
        order = torch.cat([torch.randperm(n, generator=gen) for _ in range(-(-steps_per_epoch * bs // n))])
        for b in range(steps_per_epoch):
            batch = x[order[b * bs:(b + 1) * bs]].to(device)
            loss = _loss(model, batch, model.gen(batch))
            if options.fuzzy:
                cells = fuzzy_cell_masks(batch.shape[0], options.grid, gen)[:, None].float().to(device)
                noise = torch.rand(batch.shape, generator=gen).to(device)
                masked = apply_fuzzy(batch, cells, model.weight, noise)
                loss = loss + LAMBDA * _loss(model, batch, model.gen(masked))
            steps.step(loss)
    model.gen.eval()
    return steps.close()


@torch.no_grad()
def calibrate(model: InpaintModel, train_x: torch.Tensor, hold_x: torch.Tensor) -> dict[str, Any]:
    """Thresholds m and t from held-out good tiles; branch and head statistics from training tiles."""
    facts: dict[str, Any] = {}
    sub = train_x[torch.linspace(0, train_x.shape[0] - 1, min(64, train_x.shape[0])).long()]
    if model.options.dynamic:
        change, cells = [], []
        for sl in batches(hold_x.shape[0], 16):
            x = hold_x[sl]
            r1 = model.gen(x)
            r2 = model.gen(r1)
            change.append(F.avg_pool2d(((r2 - r1) ** 2).mean(1, keepdim=True), model.cell).flatten(1).max(1)[0])
            cells.append(F.avg_pool2d(model.difference(x, r1)[:, None], model.cell).flatten())
        change_t, cells_t = torch.cat(change), torch.cat(cells)
        model.threshold.fill_(MARGIN * float(torch.quantile(change_t, CONVERGENCE_QUANTILE)))
        model.cell_threshold.fill_(MARGIN * float(torch.quantile(cells_t, CELL_QUANTILE)))
        if model.options.max_iterations < 2:
            model.threshold.fill_(-1.0)  # one pass: nothing to compare, always the repair branch
        conv, rep = [], []
        for sl in batches(sub.shape[0], 16):
            c, r, _, _ = model.branch_maps(sub[sl])
            conv.append(c.flatten())
            rep.append(r.flatten())
        c, r = torch.cat(conv), torch.cat(rep)
        model.branch_stats.copy_(torch.tensor([c.mean(), c.std().clamp_min(1e-6), r.mean(), r.std().clamp_min(1e-6)]))
        passes, converged = [], []
        for sl in batches(hold_x.shape[0], 16):
            out = model.dyn(hold_x[sl], model.threshold)
            converged.append(out[3])
            passes.append(out[4])
        facts = {"threshold_m": float(model.threshold), "cell_threshold": float(model.cell_threshold),
                 "holdout_converged_fraction": round(float(torch.cat(converged).float().mean()), 4),
                 "holdout_mean_passes": round(float(torch.cat(passes).mean()), 3)}
    maps = torch.cat([model._to_grid(model.tile_map(sub[sl])).flatten() for sl in batches(sub.shape[0], 16)])
    model.head.nll_mean[0] = maps.mean()
    model.head.nll_std[0] = maps.std().clamp_min(1e-6)
    return facts


class InpaintMethod(MethodBase):
    name = "inpaint"
    train_flags = frozenset({"reduction"})  # a pixel generator: no backbone
    summary = "fuzzy-mask inpainting autoencoder, weighted SSIM, dynamic inference (paper 004)"
    options_cls = InpaintOptions
    default_epochs = InpaintOptions.epochs

    def fit(self, data: FitData) -> Fitted:
        cfg, options, device = data.cfg, data.options, data.device
        torch.manual_seed(cfg.seed)
        model = InpaintModel(cfg.model, options).to(device)
        train_x = _tiles(model, data.train, device).cpu()
        hold_x = _tiles(model, data.holdout, device)
        loss = train_generator(model, train_x, options, cfg, device)
        model.eval()
        facts = calibrate(model, train_x.to(device), hold_x)
        selection = select_reduction(model, cfg, data.holdout, device) if cfg.select else {"enabled": False}
        details = {"generator": f"encoder-decoder widths {list(WIDTHS)}, "
                                f"{'skips from encoder stages 2+3' if options.skips else 'no skips (CAE)'}",
                   "size": options.size, "grid": options.grid,
                   "ssim_class": options.ssim_class if options.wssim else None,
                   "parameters": sum(p.numel() for p in model.gen.parameters()), **facts}
        return Fitted(model, loss, selection, details)

    def build(self, model_config: ModelConfig, options: dict[str, Any]) -> nn.Module:
        return InpaintModel(model_config, self.parse_options(options))

    def export(self, model: nn.Module, path: Path) -> None:
        export_engine(model, path)  # the dynamic-inference Loop needs its own export


METHOD = InpaintMethod()

__all__ = ["METHOD", "InpaintModel", "InpaintOptions", "export_engine", "export_fixed_iterations", "fuzzy_cell_masks",
           "ssim_map", "apply_fuzzy", "cell_weight"]
