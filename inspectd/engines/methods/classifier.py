"""Method "classifier" (paper 001): a supervised OK/NG classifier with class-activation-map heatmaps.

    images uint8 N x H x W x C (whole frames: tiles are refused)
      -> InputAdapter -> EfficientNet stem and early stages (frozen, ImageNet weights)
      -> the last `train_stages` stages (fine-tuned) -> last feature maps A (N, K, h, w), stride 32
         (16 with `cam_stride` 16: make_atrous)
      -> CAM  m(x, y) = sum_k (w_NG - w_OK)_k A_k(x, y) + (b_NG - b_OK)     (a 1x1 convolution)
      -> score = mean of m over positions = z_NG - z_OK, the NG log-odds (logit of the NG probability):
                 exactly the head's output, since the head is global average pooling + one linear layer
      -> map:   m, placed on the map grid where each cell looks (`cam_to_map`), in log-odds units;
                not smoothed (below)

Where the map is drawn: every stride-2 layer (3x3 / 5x5, padding k // 2) centres its output j on input
pixel 2j, so CAM cell (i, j) is centred on input pixel (32 i, 32 j): the top-left corner of the
32 x 32 block a plain resize assigns it, not its centre. `cam_to_map` resamples the CAM bilinearly
at those centres (fixed matrices in the graph; clamped past the last row / column), so the map's
peak sits over the part of the image the peak cell sees, instead of half a cell (16 px) down-right.
The bilinear resampling is the map's only interpolation, as in paper 001's Grad-CAM: the model
config's `smoothing_sigma` is not applied to it. Smoothing a piecewise-linear CAM lowers an
isolated peak (one cell far above its neighbours: a small defect) more than a broad one, so the
smoothed map's maximum left the CAM's strongest cell - the cell that drives the NG decision - for
5 of the 56 MTD training defects at the default sigma (1 map pixel); unsmoothed, 55 of 56 stay
(the other: two cells' shares of one map pixel). MapHead stays as a submodule only so bundles'
weights load as before.

For global average pooling + one linear layer, Grad-CAM of the score equals the CAM: dScore/dA_k(x,y)
= (w_NG - w_OK)_k / (h w) at every position, so Grad-CAM = ReLU(sum_k alpha_k A_k) = ReLU(m - b)/(h w)
(tests/engines/test_method_classifier.py checks it against autograd on random inputs). The map is
thus computed forward-only, inside the exported graph.

Training (good images and >= MIN_DEFECTS defective ones, --bad):
  - the training set: good + defective images (+ their horizontal flips, `flip`), then by
    `placement` the paper's background-paste sets: A none; B each image's cut-out (the whole image,
    or the `box`) scaled by `part-scale` and pasted at the centre of a random background; C the same
    at a random offset (the paper's "every offset", sampled), `pastes` copies per image, both classes.
    Backgrounds: --backgrounds (resized to the input), else generated textures (noise, gradients,
    stripes). The original images are always kept.
  - the frozen early stages' features are computed once (ONNX Runtime) and cached; the late stages
    (BatchNorm statistics kept from ImageNet: batches are small) and the head train with Adam at the
    paper's learning rates (1e-4 backbone, 1e-3 head), constant, on class-balanced batches (half
    good, half defective), cross-entropy, `epochs` passes over the good set.
  - defects made by `inspectd synthesize` (named in the --bad folder's manifest) are kept apart
    from the real ones: `real_share` of each batch's defective half comes from the real defects, the
    rest from the synthesized ones, however many of those there are.
The paper's InceptionV3, 300 px and stopping at 100 % training accuracy are replaced by Lite0,
the bundle's input size and a predeclared number of epochs (sized for a 2-core CPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from inspectd.engines.backbone import (STAGES, VARIANTS, EfficientNetFeatures, block_specs, full_precision,
                                       load_backbone)
from inspectd.engines.fitting import PartGraph, batches, extract_features, one_thread
from inspectd.engines.methods.base import FitData, Fitted, MethodBase
from inspectd.engines.model import InputAdapter, MapHead, tile_images
from inspectd.engines.model_config import ModelConfig
from inspectd.errors import ConfigError, DataError
from inspectd.progress import Progress

NAME = "classifier"
MIN_DEFECTS = 8
PLACEMENTS = ("A", "B", "C")
CLASSES = ("OK", "NG")


@dataclass
class ClassifierOptions:
    epochs: int = 8               # passes over the (augmented) good set, class-balanced batches
    placement: str = "C"          # background paste: A none, B centred, C random offsets (paper 001 sets)
    pastes: int = 2               # pasted copies per image (B, C)
    part_scale: float = 0.75      # the cut-out is scaled by this before pasting (< 1 so background shows)
    box: str = ""                 # cut-out box "x0,y0,x1,y1" as fractions of the image; empty: whole image
    flip: bool = True             # add horizontally flipped copies of the defects
    train_stages: int = 2         # last EfficientNet stages fine-tuned (earlier ones frozen, cached)
    cam_stride: int = 32          # 16: the last stride-2 block keeps its resolution (atrous), CAM twice as fine
    lr_backbone: float = 1e-4     # Adam, fine-tuned stages (paper)
    lr_head: float = 1e-3         # Adam, OK/NG linear head (paper)
    # With synthesized defects in --bad (an `inspectd synthesize` folder): the share of each batch's
    # defective half drawn from the real defects (and their flips / pastes), so that many synthesized
    # defects add variety without crowding out the few real ones. Without synthesized ones: all real.
    real_share: float = 0.5

    def check(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"option {name.replace('_', '-')}={getattr(self, name)!r}: {why} for method {NAME}")

        if not 1 <= self.epochs <= 1000:
            raise bad("epochs", "must be 1..1000")
        if str(self.placement).upper() not in PLACEMENTS:
            raise bad("placement", "choose A (none), B (centred) or C (every offset)")
        self.placement = str(self.placement).upper()
        if not 1 <= self.pastes <= 32:
            raise bad("pastes", "must be 1..32")
        if not 0.1 <= self.part_scale <= 1.0:
            raise bad("part_scale", "must be in [0.1, 1]")
        if self.box:
            try:
                x0, y0, x1, y1 = (float(v) for v in self.box.split(","))
            except ValueError:
                raise bad("box", "expected x0,y0,x1,y1 (fractions of the image)") from None
            if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
                raise bad("box", "needs 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
        if not 1 <= self.train_stages <= len(STAGES) - 1:
            raise bad("train_stages", f"must be 1..{len(STAGES) - 1}")
        if self.cam_stride not in (16, 32):
            raise bad("cam_stride", "choose 32 (the backbone's own) or 16 (last stride-2 block made atrous)")
        if not 0 <= self.lr_backbone <= 1:
            raise bad("lr_backbone", "must be in [0, 1] (0: backbone frozen)")
        if not 0 < self.lr_head <= 1:
            raise bad("lr_head", "must be in (0, 1]")
        if not 0 < self.real_share <= 1:
            raise bad("real_share", "must be in (0, 1]")


def stage_starts(variant: str) -> list[int]:
    """Index of the first block of each stage of `variant` (as block_specs builds them)."""
    block_specs(variant)  # unknown variants: the backbone's own error
    _, depth, _ = VARIANTS[variant]
    lite = "lite" in variant
    starts, i = [], 0
    for s, (repeats, *_rest) in enumerate(STAGES):
        starts.append(i)
        i += repeats if lite and s in (0, len(STAGES) - 1) else int(math.ceil(depth * repeats))
    return starts


class ClassifierModel(nn.Module):
    """The classifier engine: uint8 images -> (NG log-odds, class activation map); module docstring."""

    def __init__(self, config: ModelConfig, backbone: EfficientNetFeatures, options: ClassifierOptions) -> None:
        super().__init__()
        config.check()
        self.config = config
        channels = 1 if config.color_mode == "gray" else 3
        self.adapter = InputAdapter(*backbone.norm, channels=channels)
        self.backbone = backbone
        self.split = stage_starts(backbone.variant)[len(STAGES) - options.train_stages]
        self.head = nn.Linear(backbone.tap_channels[-1], len(CLASSES))
        self.map_head = MapHead(config, 1)  # not used by forward (module docstring); its buffers stay in bundles
        stride = backbone.tap_strides[-1]
        if options.cam_stride < stride:
            stride = make_atrous(backbone, self.split)
        rows = cam_resampler(config.image_height, stride, config.map_stride)
        cols = cam_resampler(config.image_width, stride, config.map_stride)
        self.register_buffer("map_rows", rows, persistent=False)     # (map h, CAM h): fixed by the config
        self.register_buffer("map_cols_t", cols.t().contiguous(), persistent=False)  # (CAM w, map w)

    def early(self, tiles: torch.Tensor) -> torch.Tensor:
        """Frozen part: uint8 -> features at the input of the first fine-tuned block (what is cached)."""
        bb = self.backbone
        x = self.adapter(tiles)
        with full_precision(x):  # its one feature tap is the last block: the backbone stays FP32
            x = bb.act(bb._bn0(bb._conv_stem(x)))
            for block in bb._blocks[: self.split]:
                x = block(x)
        return x

    def late(self, x: torch.Tensor) -> torch.Tensor:
        """Fine-tuned part: cached features -> last feature maps A (N, K, h, w)."""
        with full_precision(x):
            for block in self.backbone._blocks[self.split:]:
                x = block(x)
        return x

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        """Last feature maps -> (N, 2) OK / NG logits: global average pooling + one linear layer."""
        return self.head(feats.mean(dim=(2, 3)))

    def cam(self, feats: torch.Tensor) -> torch.Tensor:
        """Last feature maps -> NG-vs-OK class activation map (N, h, w); its mean is the NG log-odds."""
        w = (self.head.weight[1] - self.head.weight[0]).view(1, -1, 1, 1)
        b = self.head.bias[1] - self.head.bias[0]
        return F.conv2d(feats, w)[:, 0] + b

    def cam_to_map(self, m: torch.Tensor) -> torch.Tensor:
        """CAM (N, h, w) -> (N, H / map_stride, W / map_stride), each map cell read at its own centre
        from the CAM cells' receptive-field centres (module docstring)."""
        return torch.matmul(torch.matmul(self.map_rows, m), self.map_cols_t)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.cam(self.late(self.early(tile_images(images, self.config))))
        score = m.mean(dim=(1, 2))  # = logits[:, 1] - logits[:, 0]
        return score, self.cam_to_map(m)


def make_atrous(backbone: EfficientNetFeatures, first_tuned: int) -> int:
    """The last stride-2 depthwise convolution keeps its input's resolution and every later one is
    dilated by 2 (DeepLab's atrous conversion): on the even output positions the pretrained network
    computes exactly what it did, the odd ones fill in between, so the last feature maps (and the
    CAM) are twice as fine. Only fine-tuned blocks may change (the cached early features stay as
    they are). Returns the new output stride."""
    blocks = list(backbone._blocks)
    last = max(i for i, b in enumerate(blocks) if b.spec.stride == 2)
    if last < first_tuned:
        raise ConfigError(f"method {NAME}: cam-stride 16 needs the last stride-2 block ({last}) among the "
                          f"fine-tuned ones (from block {first_tuned}): raise train-stages")
    blocks[last]._depthwise_conv.stride = (1, 1)
    for b in blocks[last + 1:]:
        conv = b._depthwise_conv
        conv.dilation = (2, 2)
        conv.padding = (2 * (conv.kernel_size[0] // 2), 2 * (conv.kernel_size[1] // 2))
    return backbone.tap_strides[-1] // 2


def feature_size(size: int, stride: int) -> int:
    """Output length of `size` input pixels after log2(stride) stride-2 layers with padding k // 2."""
    while stride > 1:
        size, stride = (size + 1) // 2, stride // 2
    return size


def cam_resampler(size: int, stride: int, map_stride: int) -> torch.Tensor:
    """(size // map_stride, feature_size) bilinear weights: map cell u (input pixels map_stride u ..
    map_stride (u + 1) - 1, centre map_stride u + (map_stride - 1) / 2) read from CAM cells centred on
    input pixels stride j; clamped to the first / last cell beyond them."""
    n = feature_size(size, stride)
    out = torch.zeros(size // map_stride, n)
    for u in range(out.shape[0]):
        t = min(max((map_stride * u + (map_stride - 1) / 2) / stride, 0.0), n - 1.0)
        j0 = int(math.floor(t))
        j1 = min(j0 + 1, n - 1)
        out[u, j0] += 1.0 - (t - j0)
        out[u, j1] += t - j0
    return out


# -- augmentation ------------------------------------------------------------------------------
def texture(rng: np.random.Generator, height: int, width: int, channels: int) -> np.ndarray:
    """A generated background: smooth noise, a linear gradient or stripes, with sensor noise."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    yy, xx = yy / height, xx / width
    theta = rng.uniform(0, np.pi)
    along = np.cos(theta) * xx + np.sin(theta) * yy
    base = rng.uniform(20, 230)
    kind = rng.integers(3)
    if kind == 0:
        sigma = rng.uniform(1.0, max(1.5, height / 8))
        n = cv2.GaussianBlur(rng.normal(0, 1, (height, width)).astype(np.float32), (0, 0), sigma)
        img = base + rng.uniform(10, 60) * n / max(float(n.std()), 1e-6)
    elif kind == 1:
        img = base + rng.uniform(-120, 120) * (along - 0.5)
    else:
        img = base + rng.uniform(15, 80) * np.sin(2 * np.pi * rng.uniform(2, 20) * along + rng.uniform(0, 2 * np.pi))
    img = img[..., None] + rng.normal(0, 3, (height, width, 1))
    if channels == 3:
        img = img * rng.uniform(0.8, 1.2, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def cut_box(shape: tuple[int, ...], box: str) -> tuple[int, int, int, int]:
    """Pixel box (y0, y1, x0, x1) of the cut-out: the `box` option, or the whole image."""
    h, w = shape[:2]
    if not box:
        return 0, h, 0, w
    x0, y0, x1, y1 = (float(v) for v in box.split(","))
    ya, xa = int(round(y0 * h)), int(round(x0 * w))
    return ya, max(ya + 1, int(round(y1 * h))), xa, max(xa + 1, int(round(x1 * w)))


def paste(image: np.ndarray, background: np.ndarray, opts: ClassifierOptions, rng: np.random.Generator,
          centred: bool) -> np.ndarray:
    """The image's cut-out, scaled by part_scale, pasted onto the background: centred (B) or at a
    random offset (C)."""
    y0, y1, x0, x1 = cut_box(image.shape, opts.box)
    part = image[y0:y1, x0:x1]
    h, w = image.shape[:2]
    ph = max(1, min(h, int(round(part.shape[0] * opts.part_scale))))
    pw = max(1, min(w, int(round(part.shape[1] * opts.part_scale))))
    part = cv2.resize(part, (pw, ph), interpolation=cv2.INTER_AREA).reshape(ph, pw, image.shape[2])
    if centred:
        oy, ox = (h - ph) // 2, (w - pw) // 2
    else:
        oy, ox = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    out = background.copy()
    out[oy:oy + ph, ox:ox + pw] = part
    return out


GOOD, REAL, SYNTHESIZED = 0, 1, 2  # kinds of training image; the label is NG for REAL and SYNTHESIZED


def training_set(good: Sequence[np.ndarray], bad: Sequence[np.ndarray], backgrounds: Sequence[np.ndarray],
                 opts: ClassifierOptions, rng: np.random.Generator,
                 synthetic: Sequence[np.ndarray] = ()) -> tuple[list[np.ndarray], np.ndarray]:
    """Images and their kinds (GOOD, REAL, SYNTHESIZED): originals, flipped defects, and the placement's
    pasted copies (a copy keeps its source's kind)."""
    images: list[np.ndarray] = list(good)
    kinds = [GOOD] * len(good)
    for kind, defects in ((REAL, list(bad)), (SYNTHESIZED, list(synthetic))):
        defects += [np.ascontiguousarray(b[:, ::-1]) for b in defects] if opts.flip else []
        images += defects
        kinds += [kind] * len(defects)
    if opts.placement != "A":
        h, w, c = images[0].shape
        for img, kind in list(zip(images, kinds)):
            for _ in range(opts.pastes):
                if backgrounds:
                    bg = backgrounds[int(rng.integers(len(backgrounds)))]
                    bg = np.ascontiguousarray(bg[:, ::-1]) if rng.random() < 0.5 else bg
                else:
                    bg = texture(rng, h, w, c)
                images.append(paste(img, bg, opts, rng, centred=opts.placement == "B"))
                kinds.append(kind)
    return images, np.asarray(kinds, dtype=np.int64)


# -- training ------------------------------------------------------------------------------------
def fine_tune(model: ClassifierModel, feats: torch.Tensor, kinds: np.ndarray, opts: ClassifierOptions,
              batch: int, gen: torch.Generator) -> tuple[float, float]:
    """Late stages + head on cached early features, class-balanced batches; (final loss, last-epoch
    training accuracy)."""
    late = [p for p in model.backbone._blocks[model.split:].parameters()]
    for p in late:
        p.requires_grad_(opts.lr_backbone > 0)
    groups = [{"params": list(model.head.parameters()), "lr": opts.lr_head}]
    if opts.lr_backbone > 0:
        groups.append({"params": late, "lr": opts.lr_backbone})
    opt = torch.optim.Adam(groups)
    model.eval()  # BatchNorm keeps its ImageNet statistics (small batches); only weights move
    good_idx = torch.from_numpy(np.flatnonzero(kinds == GOOD))
    real_idx = torch.from_numpy(np.flatnonzero(kinds == REAL))
    syn_idx = torch.from_numpy(np.flatnonzero(kinds == SYNTHESIZED))
    targets = (kinds != GOOD).astype(np.int64)  # 0 OK, 1 NG
    half = max(1, batch // 2)
    steps_per_epoch = max(1, math.ceil(len(good_idx) / half))
    bar = Progress(steps_per_epoch * opts.epochs, "classifier")
    ema, acc = None, 0.0
    for _epoch in range(opts.epochs):
        order = good_idx[torch.randperm(len(good_idx), generator=gen)]
        right = seen = 0
        for b in range(steps_per_epoch):
            g = order[b * half:(b + 1) * half]
            d = defect_draw(real_idx, syn_idx, len(g), opts.real_share, gen)
            idx = torch.cat([g, d])
            y = torch.from_numpy(targets[idx.numpy()])
            logits = model.logits(model.late(feats[idx].float()))
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if not torch.isfinite(loss):
                raise DataError("training diverged (classifier: the loss is not finite); try lower learning rates")
            right += int((logits.argmax(1) == y).sum())
            seen += len(y)
            ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
            bar.update(1, loss=ema)
        acc = right / max(1, seen)
    bar.close()
    for p in model.parameters():
        p.requires_grad_(False)
    return float(ema if ema is not None else float("nan")), acc


def defect_draw(real: torch.Tensor, synthesized: torch.Tensor, n: int, real_share: float,
                gen: torch.Generator) -> torch.Tensor:
    """n defective training indices: each from the real pool with probability real_share, else from
    the synthesized pool (all real when there are no synthesized ones)."""
    pick = real[torch.randint(len(real), (n,), generator=gen)]
    if len(synthesized) == 0:
        return pick
    syn = synthesized[torch.randint(len(synthesized), (n,), generator=gen)]
    return torch.where(torch.rand(n, generator=gen) < real_share, pick, syn)


@torch.no_grad()
def ng_scores(model: ClassifierModel, images: Sequence[np.ndarray], batch: int = 16) -> np.ndarray:
    return np.concatenate([model(torch.from_numpy(np.stack(images[sl])))[0].numpy()
                           for sl in batches(len(images), batch)]) if len(images) else np.zeros(0)


class ClassifierMethod(MethodBase):
    name = NAME
    summary = "supervised OK/NG classifier, class-activation-map heatmaps (paper 001)"
    train_flags = frozenset({"backbone", "weights"})  # its CAM reads the last block: no --taps
    options_cls = ClassifierOptions
    default_epochs = ClassifierOptions.epochs
    map_shift_selection = False  # the CAM is drawn at its cells' own centres (cam_to_map)
    needs_defects = True
    min_defects = MIN_DEFECTS
    uses_backgrounds = True

    def fit(self, data: FitData) -> Fitted:
        with one_thread():
            return self._fit(data)

    def _fit(self, data: FitData) -> Fitted:
        cfg, opts = data.cfg, data.options
        mc = cfg.model
        if tuple(mc.tiles) != (1, 1):
            raise ConfigError(f"method {NAME} classifies whole frames: use --tiles 1x1")
        if len(data.bad) < MIN_DEFECTS:
            raise DataError(f"method {NAME} needs at least {MIN_DEFECTS} defective images (--bad), got {len(data.bad)}")
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed + 1001)
        n_blocks = len(block_specs(mc.backbone))
        model = ClassifierModel(mc, load_backbone(mc.backbone, [n_blocks - 1], cfg.weights), opts)
        images, kinds = training_set(data.train, data.bad, data.backgrounds, opts, rng, data.synthetic)
        feats = extract_features(PartGraph(model, "early"), images, torch.device("cpu"), "features")[0]
        batch = max(2, cfg.batch_size + cfg.batch_size % 2)
        loss, acc = fine_tune(model, feats, kinds, opts, batch, gen)
        del feats
        model.eval()
        hold = ng_scores(model, data.holdout)
        details = {
            "score_rule": "NG log-odds (z_NG - z_OK: GAP + linear head = mean of the class activation map)",
            "map": "NG-vs-OK class activation map (= Grad-CAM before its ReLU, up to 1/(h w) and the bias), "
                   "log-odds units",
            "fine_tuned_blocks": f"{model.split}..{n_blocks - 1} (last {opts.train_stages} stages)",
            "training_set": {"good": int((kinds == GOOD).sum()), "defective": int((kinds != GOOD).sum()),
                             "real_good": len(data.train), "real_defects": len(data.bad),
                             "synthesized_defects": len(data.synthetic),
                             "real_share": opts.real_share if data.synthetic else 1.0,
                             "placement": opts.placement,
                             "backgrounds": (f"{len(data.backgrounds)} from --backgrounds" if data.backgrounds
                                             else "generated textures")},
            "final_loss": loss, "train_accuracy_last_epoch": round(acc, 4),
            "holdout_good": {"n": len(hold), "mean_log_odds": float(hold.mean()) if len(hold) else None,
                             "predicted_ng": int((hold > 0).sum())},
        }
        return Fitted(model, loss, {"enabled": False}, details)

    def build(self, model_config: ModelConfig, options: dict[str, Any]) -> nn.Module:
        opts = self.parse_options(options)
        n_blocks = len(block_specs(model_config.backbone))
        return ClassifierModel(model_config, EfficientNetFeatures(model_config.backbone, [n_blocks - 1]), opts)


METHOD = ClassifierMethod()
