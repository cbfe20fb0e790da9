"""Subcommands of the model side: train, eval, synthesize (+ build-engine, check-engine, bench from runtime_cli)."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from inspectd.engines.methods import NAMES as METHOD_NAMES
from inspectd.engines.model_config import DEFAULT_SHORT_SIDE, ModelConfig, default_short_side
from inspectd.errors import ConfigError, DataError

_DEFAULT = ModelConfig()  # the one source of the engine's defaults
# Train flags only some methods use (each method's train_flags says which); the rest apply to all.
METHOD_SPECIFIC_FLAGS = ("augment", "views", "steps", "members", "hidden_ratio", "components", "positional",
                         "edge_pad", "pool", "fusion", "kernel_size", "score_term", "reduction", "backbone", "weights",
                         "taps")


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated block indices, got {text!r}") from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model bundle from a folder of good images",
                       description="Train an engine on good images only and write a verified bundle "
                       "(model.onnx + manifest.json). Methods: flow (EfficientNet + normalizing flow, default), "
                       "cutpaste-ae (CutPaste classifier + autoencoder), inpaint (fuzzy-mask inpainting); classifier (OK/NG "
                       "fine-tuned on good and --bad images, activation-map heatmaps).")
    p.add_argument("--good", required=True, help="folder of good images")
    p.add_argument("--out", required=True, help="bundle directory to create")
    p.add_argument("--bad", default=None,
                   help="folder of defective images, for methods that learn from defects (classifier: at "
                        "least 8); good-only methods ignore it with a warning")
    p.add_argument("--backgrounds", default=None,
                   help="folder of background images for paste augmentation (classifier; default: "
                        "generated textures); other methods ignore it with a warning")
    p.add_argument("--method", choices=list(METHOD_NAMES), default="flow",
                   help="engine method (default %(default)s); every method writes the same bundle contract")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option (repeatable), e.g. --option ssim-class=II for inpaint; "
                        "see docs/methods.md")
    p.add_argument("--image-size", default=None,
                   help="engine input per tile: S (short side S, long side from the images' aspect) or HxW "
                        f"(height x width), multiples of 32 (default: {default_short_side('flow')} for the flow, "
                        f"{DEFAULT_SHORT_SIDE} for the other methods)")
    p.add_argument("--tiles", default="1x1", help="ROWSxCOLS overlapping tiles of each frame, run as one batch "
                   "and stitched back into one map (default 1x1)")
    p.add_argument("--tile-overlap", type=int, default=_DEFAULT.tile_overlap,
                   help="pixels shared by neighbouring tiles (default %(default)s)")
    p.add_argument("--roi", default=None, metavar="X,Y,W,H",
                   help="crop of the source images (pixels) the model sees; recorded in the bundle and applied "
                        "by eval, calibrate and the daemon (default: whole frames)")
    p.add_argument("--epochs", type=_positive_int, default=None,
                   help="training epochs (flow default 20, per member; other methods: their own default)")
    p.add_argument("--no-select", action="store_true",
                   help="no label-free selection: train the flags as given (mean reduction unless set)")
    p.add_argument("--augment", default="none",
                   help="comma list of rotate,translate,scale, or 'none' (default none; turn it on when parts "
                        "move or turn in the frame)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backbone", default=_DEFAULT.backbone,
                   help="efficientnet-lite0..4 or efficientnet-b0..7 (default %(default)s)")
    p.add_argument("--weights", default=None, help="local backbone state dict (default: the installed package)")
    p.add_argument("--taps", type=_int_list, default=list(_DEFAULT.taps),
                   help=f"block indices to tap (default {','.join(map(str, _DEFAULT.taps))})")
    p.add_argument("--color", choices=["auto", "gray", "rgb"], default="auto",
                   help="colour mode of the bundle (auto: gray if the images are grey)")
    p.add_argument("--steps", type=_positive_int, default=_DEFAULT.steps,
                   help="coupling steps of the flow (default %(default)s)")
    p.add_argument("--members", type=_positive_int, default=_DEFAULT.members,
                   help="flows trained from different initialisations, their maps averaged (1 to 8; training "
                        "time and the flow's share of inference grow with it; default %(default)s)")
    p.add_argument("--hidden-ratio", type=float, default=_DEFAULT.hidden_ratio,
                   help="subnet width / channels (default %(default)s)")
    p.add_argument("--components", type=int, default=_DEFAULT.components,
                   help="principal components of the features the flow models, largest first (0: every "
                        "channel; default %(default)s)")
    p.add_argument("--positional", type=int, default=_DEFAULT.positional,
                   help="sinusoidal position channels the flow is conditioned on, a multiple of 4 (0: none, for "
                        "parts that are not fixtured; default %(default)s)")
    p.add_argument("--edge-pad", type=int, choices=[0, 32, 64], default=_DEFAULT.edge_pad,
                   help="input px of the frame mirrored below and right of it, so that cells look at "
                        "its last rows and columns (untiled engines; default %(default)s)")
    p.add_argument("--pool", choices=["avg", "avgmax"], default=_DEFAULT.pool,
                   help="how finer taps reach the fused grid: each block's mean, or its mean and its maximum "
                        "(default %(default)s)")
    p.add_argument("--fusion", choices=["fused", "separate"], default=_DEFAULT.fusion,
                   help=f"fused: taps resampled to one grid (stride {_DEFAULT.fused_stride}) and modelled jointly "
                        "(default); separate: one flow per tap")
    p.add_argument("--kernel-size", type=int, choices=[1, 3], default=_DEFAULT.kernel_size,
                   help="subnet first conv kernel (default %(default)s)")
    p.add_argument("--score-term", choices=["z2", "nll"], default=_DEFAULT.score_term,
                   help="per-position anomaly: 0.5|z|^2 (default) or the full NLL with log|det J|")
    p.add_argument("--reduction", choices=["mean", "max", "topk"], default=None,
                   help="map -> image score: mean, max, or topk (mean of the top 3%%) (default: selection "
                        "picks; with --no-select mean)")
    p.add_argument("--views", type=_positive_int, default=None,
                   help="cached views per image with --augment: the original + views-1 augmented (default 4)")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="training batch (default 8)")
    p.add_argument("--golden-bad", default=None, help="a few bad images to store as golden images (parity gate)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle")
    # what each optional flag is when not given: a flag given to a method that does not use it is named
    p.set_defaults(func=_train, flag_defaults={dest: p.get_default(dest) for dest in METHOD_SPECIFIC_FLAGS})

    e = sub.add_parser("eval", help="evaluate a bundle on good and bad images (ONNX Runtime)",
                       description="Score good and bad folders through ONNX Runtime and write image/pixel ROC AUC, "
                       "a per-image CSV, ROC and histogram PNGs and heatmap overlays.")
    e.add_argument("--bundle", required=True)
    e.add_argument("--good", required=True)
    e.add_argument("--bad", required=True)
    e.add_argument("--masks", default=None, help="folder of defect masks named like the bad images")
    e.add_argument("--out", required=True, help="report folder")
    e.add_argument("--threads", type=int, default=0)
    e.set_defaults(func=_eval)

    s = sub.add_parser("synthesize", help="more defective images: real defects' masked cut-outs blended into good images",
                       description="Write COUNT new defective images (+ masks/ and manifest.json) by blending masked, "
                       "flipped / rotated, brightness-matched cut-outs of real defects into good images; the folder "
                       "is a --bad folder for `inspectd train --method classifier`. Every input is checked first.")
    s.add_argument("--good", required=True, help="folder of good images (the destinations)")
    s.add_argument("--bad", required=True, help="folder of real defective images (at least 8), each with a mask")
    s.add_argument("--out", required=True, help="output folder (created; must be empty unless --force)")
    s.add_argument("--masks", default=None,
                   help="folder of the defects' masks named like the images (255 = defect; default: BAD/masks)")
    s.add_argument("--count", type=int, default=200, help="images to write (default %(default)s)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--dilation", type=int, default=0,
                   help="px of context kept around each defect and feathered (default 0: 2%% of the short side)")
    s.add_argument("--region", default="0,0,1,1", metavar="X0,Y0,X1,Y1",
                   help="where defects may be placed, fractions of the good image (default: anywhere, for "
                        "tightly cropped parts)")
    s.add_argument("--include-real", action="store_true",
                   help="copy the real defects (and masks) into the output too: one --bad folder for training")
    s.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    s.set_defaults(func=_synthesize)

    try:
        runtime_cli = importlib.import_module("inspectd.engines.runtime_cli")
    except ModuleNotFoundError as exc:
        if exc.name != "inspectd.engines.runtime_cli":
            raise
    else:
        runtime_cli.register(sub)


def _detect_color(folder: str) -> str:
    import numpy as np

    from inspectd.engines.preprocess import list_images, read_image

    for path in list_images(folder)[:8]:
        try:
            img = read_image(path, "rgb")
        except DataError:
            continue
        if not (np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1], img[..., 2])):
            return "rgb"
    return "gray"


def _roi_arg(text: str | None, good: str) -> tuple[int, int, int, int] | None:
    """--roi parsed (ConfigError, one line) and checked against the first training image."""
    if text is None:
        return None
    from inspectd.engines.preprocess import list_images, parse_roi, read_image

    roi = parse_roi(text, ConfigError, "--roi")
    x, y, w, h = roi
    for path in list_images(good)[:8] if Path(good).is_dir() else []:
        try:
            img = read_image(path, "gray")
        except DataError:
            continue  # unreadable files are train()'s to count and report
        if x + w > img.shape[1] or y + h > img.shape[0]:
            raise ConfigError(f"--roi {x},{y},{w},{h} lies outside the {img.shape[1]}x{img.shape[0]} "
                              f"training image {path.name}")
        break
    return roi


def _options_arg(items: list[str]) -> dict[str, str]:
    """--option KEY=VALUE items -> dict (the method validates names and values)."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--option {item!r}: expected KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def _image_size_arg(text: str, good: str, roi: tuple[int, int, int, int] | None) -> tuple[int, int]:
    """--image-size parsed (one-line ConfigError); a single number takes the training images' aspect."""
    import cv2

    from inspectd.engines.preprocess import imdecode, list_images, parse_image_size, resolve_image_size

    parsed = parse_image_size(text, ConfigError, "--image-size")
    shapes = []
    if parsed[1] is None and roi is None:
        for path in list_images(good)[:32]:
            try:
                img = imdecode(path.read_bytes(), cv2.IMREAD_GRAYSCALE)
            except OSError:
                img = None
            if img is not None:
                shapes.append(img.shape)
        if not shapes:  # empty or unreadable folder: train() names the problem
            return (parsed[0], parsed[0])
    return resolve_image_size(parsed, shapes, roi)


def ignored_flags(args: argparse.Namespace, method: str) -> list[str]:
    """The method-specific train flags given (not at their defaults) that `method` does not use."""
    from inspectd.engines import methods

    uses = methods.get(method).train_flags
    return [f"--{dest.replace('_', '-')}" for dest, default in args.flag_defaults.items()
            if dest not in uses and getattr(args, dest) != default]


def _train(args: argparse.Namespace) -> int:
    roi = _roi_arg(args.roi, args.good)  # before the slow imports
    from inspectd.engines.model import ModelConfig
    from inspectd.engines.preprocess import parse_tiles
    from inspectd.engines.train import (AUGMENTATIONS, SELECT_EPOCHS, SELECT_REDUCTIONS, TrainConfig, summary,
                                        train)

    augment = [] if args.augment.strip().lower() == "none" else [a.strip() for a in args.augment.split(",") if a.strip()]
    unknown = [a for a in augment if a not in AUGMENTATIONS]
    if unknown:
        raise ConfigError(f"--augment: unknown augmentation {unknown[0]!r} (choose from {', '.join(AUGMENTATIONS)} "
                          f"or none)")
    if not Path(args.good).is_dir():
        raise DataError(f"{args.good}: folder does not exist" if not Path(args.good).exists()
                        else f"{args.good}: not a folder")
    from inspectd.engines.bundle import refuse_existing

    refuse_existing(Path(args.out), args.force)  # before any slow work
    color = _detect_color(args.good) if args.color == "auto" else args.color
    height, width = _image_size_arg(args.image_size or str(default_short_side(args.method)), args.good, roi)
    tiles = parse_tiles(args.tiles, ConfigError, "--tiles")
    model_cfg = ModelConfig(backbone=args.backbone, taps=args.taps, image_height=height, image_width=width,
                            tiles=tiles, tile_overlap=args.tile_overlap, color_mode=color, steps=args.steps,
                            hidden_ratio=args.hidden_ratio, members=args.members, components=args.components,
                            seed=args.seed, positional=args.positional, edge_pad=args.edge_pad,
                            fusion=args.fusion, pool=args.pool,
                            kernel_size=args.kernel_size, score_term=args.score_term,
                            reduction=args.reduction or "mean")
    try:
        model_cfg.check()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    options = _options_arg(args.option)
    if args.method != "flow" and args.epochs:
        options.setdefault("epochs", str(args.epochs))
    cfg = TrainConfig(model=model_cfg, method=args.method, options=options,
                      epochs=args.epochs or TrainConfig.epochs, select=not args.no_select,
                      select_epochs=[args.epochs] if args.epochs else list(SELECT_EPOCHS),
                      select_reductions=[args.reduction] if args.reduction else list(SELECT_REDUCTIONS),
                      augment=augment, seed=args.seed, weights=args.weights, roi=roi,
                      bad=args.bad, backgrounds=args.backgrounds,
                      **{k: v for k, v in (("views", args.views), ("batch_size", args.batch_size)) if v is not None})
    ignored = ignored_flags(args, args.method)
    if ignored:
        print(f"inspectd train: method {args.method} does not use {', '.join(ignored)}: ignoring "
              f"{'it' if len(ignored) == 1 else 'them'}", file=sys.stderr)
    result = train(args.good, args.out, cfg, force=args.force, golden_bad_dir=args.golden_bad)
    print(summary(result))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from inspectd.engines.evaluate import evaluate

    report = evaluate(args.bundle, args.good, args.bad, args.out, masks_dir=args.masks, threads=args.threads)
    print(json.dumps(report, indent=2))
    print(f"report written to {args.out}", file=sys.stderr)
    return 0


def _synthesize(args: argparse.Namespace) -> int:
    from inspectd.engines.synthesize import SynthesizeConfig, parse_region, synthesize

    cfg = SynthesizeConfig(count=args.count, seed=args.seed, dilation=args.dilation,
                           region=parse_region(args.region), include_real=args.include_real)
    manifest = synthesize(args.good, args.bad, args.out, masks=args.masks, cfg=cfg, force=args.force)
    print(f"{len(manifest['items'])} synthesized defects from {manifest['bad']['n']} real ones on "
          f"{manifest['good']['n']} good images -> {args.out} (masks in {args.out}/masks, manifest.json)")
    return 0
