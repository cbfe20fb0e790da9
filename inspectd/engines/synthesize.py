"""`inspectd synthesize`: more defective images from a few real ones, by masked cut-outs blended into good images.

Paper 002 made new defects with Stable Diffusion inpainting, which cannot run here; this blends the
real defects themselves into good images instead. For each of `count` outputs (seeded, reproducible):

  1. a real defect (in turn: every defect once per round, rounds shuffled) and a random good image;
  2. the defect's mask region, dilated by `dilation` px (a little context around the defect), cut out;
  3. scaled by the ratio of the two frame sizes (sqrt of the area ratio), so the defect keeps its size
     relative to the frame (the models resize every frame to their input) -- frames of different
     sizes are therefore fine; a cut-out larger than the placement region is shrunk to fit;
  4. a random flip and 90-degree rotation;
  5. a random position with the whole cut-out inside the placement region (`region`, fractions of
     the good image; default the whole image, for tightly cropped data);
  6. brightness / contrast matched: the ring around the defect in its source and the same ring at the
     destination are brought to the same mean and standard deviation per channel (gain clipped to
     [0.5, 2]), so the defect keeps its contrast to its surroundings;
  7. alpha-blended with a feathered edge: alpha is 1 on the defect mask and falls to 0 across the
     dilation band (distance to the band's outer edge / dilation), 0 outside it -- the output
     differs from the good image only inside the dilated mask.

Writes DIR/syn_NNNNN.png, DIR/masks/syn_NNNNN.png (the placed defect mask, 255 = defect) and
DIR/manifest.json (sources, seed, count, each output's recipe). With `include_real` the real defects
and their masks are copied in too (real_<name>), so DIR is a complete `--bad` folder for
`inspectd train --method classifier`. Every input is checked before anything is written; the folder
is built next to DIR and renamed into place.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from inspectd import __version__
from inspectd.engines.preprocess import (IMAGE_SUFFIXES, check_mask_stems, fingerprint, imdecode, list_images,
                                         sha256_file)
from inspectd.errors import ConfigError, DataError

# Fewer real defects than this and the synthesized set is a handful of defects repeated; the same
# minimum as `inspectd train --method classifier` (methods/classifier.py MIN_DEFECTS).
MIN_DEFECTS = 8
MANIFEST = "manifest.json"
MASKS = "masks"
GAIN_RANGE = (0.5, 2.0)
_LIST = 5  # names listed in an error line before "..."


@dataclass
class SynthesizeConfig:
    count: int = 200
    seed: int = 0
    dilation: int = 0                         # px at the destination; 0: 2 % of the short side, at least 2
    region: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)  # x0, y0, x1, y1 (fractions)
    include_real: bool = False


@dataclass
class Source:
    path: Path
    shape: tuple[int, int]
    gray: bool
    mask: Path | None = None


def parse_region(text: str) -> tuple[float, float, float, float]:
    try:
        x0, y0, x1, y1 = (float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--region {text!r}: expected x0,y0,x1,y1 (fractions of the good image)") from None
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise ConfigError(f"--region {text!r}: needs 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
    return (x0, y0, x1, y1)


def synthesized_names(folder: str | os.PathLike) -> set[str]:
    """Names of the images in `folder` that `inspectd synthesize` made (its manifest's items); empty
    for a folder without one. Training keeps them apart from the real defects copied in beside them."""
    return set(synthesized_sources(folder))


def synthesized_sources(folder: str | os.PathLike) -> dict[str, tuple[str, str | None]]:
    """Each image `inspectd synthesize` made in `folder` -> (the good image it was built on: its
    path as synthesize read it, its sha256 or None from a manifest older than the hash). Training
    leaves out those built on the images it holds out: they must stay unseen."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable synthesize manifest ({exc.__class__.__name__}); remove it or "
                        f"rerun inspectd synthesize") from None
    if not isinstance(manifest, dict) or manifest.get("tool") != "inspectd synthesize":
        return {}  # some other tool's manifest: every image counts as real
    items = manifest.get("items")
    if not isinstance(items, list) or not all(isinstance(i, dict) and isinstance(i.get("image"), str) for i in items):
        raise DataError(f"{path}: synthesize manifest without a list of items; rerun inspectd synthesize")
    good = manifest.get("good")
    folder_of_goods = Path(str(good.get("folder", ""))) if isinstance(good, dict) else Path()
    return {i["image"]: (str(folder_of_goods / str(i.get("good", ""))),
                         i["good_sha256"] if isinstance(i.get("good_sha256"), str) else None) for i in items}


def _names(paths: list[Path]) -> str:
    return ", ".join(p.name for p in paths[:_LIST]) + (f", ... ({len(paths)} in all)" if len(paths) > _LIST else "")


def _decode(path: Path, flag: int) -> np.ndarray | None:
    try:
        data = np.fromfile(str(path), np.uint8)
    except OSError:
        return None
    return imdecode(data, flag)


def _folder(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: {what} folder does not exist")
    if not p.is_dir():
        raise DataError(f"{p}: {what} folder is not a folder")
    return p


def _scan(folder: Path, what: str) -> list[Source]:
    """Every image of the folder decoded once (shape, greyness); any unreadable one is refused."""
    paths = list_images(folder)
    if not paths:
        raise DataError(f"{folder}: no {what} images (looked for {', '.join(IMAGE_SUFFIXES)})")
    out, bad = [], []
    for p in paths:
        img = _decode(p, cv2.IMREAD_COLOR)
        if img is None:
            bad.append(p)
            continue
        gray = bool(np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1], img[..., 2]))
        out.append(Source(p, img.shape[:2], gray))
    if bad:
        raise DataError(f"{folder}: {len(bad)} of {len(paths)} {what} images are not readable images: {_names(bad)}")
    return out


def _find_mask(masks: Path, image: Path) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        cand = masks / (image.stem + suffix)
        if cand.is_file():
            return cand
    return None


def _attach_masks(defects: list[Source], masks: Path, given: bool) -> None:
    where = f"{masks} (<image name>.png or another image suffix{'' if given else '; give --masks DIR'})"
    if not masks.is_dir():
        raise DataError(f"no masks for the {len(defects)} defective images: {where} is not a folder")
    missing, unreadable, empty = [], [], []
    for d in defects:
        d.mask = _find_mask(masks, d.path)
        if d.mask is None:
            missing.append(d.path)
            continue
        m = _decode(d.mask, cv2.IMREAD_GRAYSCALE)
        if m is None:
            unreadable.append(d.mask)
        elif not (m > 127).any():
            empty.append(d.mask)
    if missing:
        raise DataError(f"{len(missing)} of {len(defects)} defective images have no mask in {where}: "
                        f"{_names(missing)}")
    if unreadable:
        raise DataError(f"{len(unreadable)} masks are not readable images: {_names(unreadable)}")
    if empty:
        raise DataError(f"{len(empty)} masks mark no defect (no pixel > 127): {_names(empty)}")


def _check_out(out: Path, force: bool, inputs: list[Path]) -> None:
    r = out.resolve()
    for p in inputs:
        q = p.resolve()
        if r == q or r in q.parents:
            raise ConfigError(f"--out {out}: is or contains the input folder {p}; choose another folder")
    if out.exists():
        if not out.is_dir():
            raise DataError(f"--out {out}: exists and is not a folder")
        if any(out.iterdir()) and not force:
            raise DataError(f"--out {out}: folder is not empty (use --force to replace it)")


def check_inputs(good: str | os.PathLike, bad: str | os.PathLike, out: str | os.PathLike,
                 masks: str | os.PathLike | None, cfg: SynthesizeConfig,
                 force: bool) -> tuple[list[Source], list[Source], Path]:
    """Every refusal, before any work: (good sources, defect sources with masks, masks folder)."""
    if cfg.count < 1:
        raise ConfigError(f"--count {cfg.count}: must be at least 1")
    if cfg.dilation < 0:
        raise ConfigError(f"--dilation {cfg.dilation}: must be >= 0 (0: automatic)")
    gdir, bdir = _folder(good, "good"), _folder(bad, "defective")
    mdir = Path(masks) if masks is not None else bdir / MASKS
    if masks is not None:
        _folder(masks, "masks")
    _check_out(Path(out), force, [gdir, bdir, mdir])
    goods = _scan(gdir, "good")
    defects = _scan(bdir, "defective")
    check_mask_stems(bdir, [d.path for d in defects])  # and the real_ copies are named by stem too
    if len(defects) < MIN_DEFECTS:
        raise DataError(f"{bdir}: {len(defects)} defective images; synthesize needs at least {MIN_DEFECTS} real "
                        f"defects with masks")
    _attach_masks(defects, mdir, masks is not None)
    return goods, defects, mdir


# -- one synthesized defect ---------------------------------------------------------------------------
def _disk(r: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def _stats(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return pixels.mean(axis=0), pixels.std(axis=0)


def blend_defect(good: np.ndarray, defect: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
                 cfg: SynthesizeConfig) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """good H x W x C, defect h x w x C (uint8), mask h x w bool -> (new image, placed mask bool, recipe)."""
    H, W = good.shape[:2]
    h, w = defect.shape[:2]
    short = min(H, W)
    dil = cfg.dilation or max(2, int(round(0.02 * short)))
    ring = max(4, dil * 2)  # ring width for the brightness match, beyond the dilation band
    scale = float(np.sqrt((H * W) / (h * w)))
    x0, y0, x1, y1 = cfg.region
    rx0, ry0 = int(round(x0 * W)), int(round(y0 * H))
    rw, rh = max(1, int(round(x1 * W)) - rx0), max(1, int(round(y1 * H)) - ry0)
    # Bounding box of the mask, padded (in source px) for the dilation band and the ring.
    ys, xs = np.nonzero(mask)
    pad = int(np.ceil((dil + ring + 1) / scale))
    by0, by1 = max(0, ys.min() - pad), min(h, ys.max() + 1 + pad)
    bx0, bx1 = max(0, xs.min() - pad), min(w, xs.max() + 1 + pad)
    crop = defect[by0:by1, bx0:bx1]
    cmask = mask[by0:by1, bx0:bx1].astype(np.uint8)
    ph, pw = max(1, int(round(crop.shape[0] * scale))), max(1, int(round(crop.shape[1] * scale)))
    rot = int(rng.integers(4))
    flip = bool(rng.random() < 0.5)
    th, tw = (pw, ph) if rot % 2 else (ph, pw)
    fit = min(1.0, rh / th, rw / tw)  # shrink to fit the region
    if fit < 1.0:
        ph, pw = max(1, int(ph * fit)), max(1, int(pw * fit))
        scale *= fit
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    crop = cv2.resize(crop, (pw, ph), interpolation=interp).reshape(ph, pw, good.shape[2]).astype(np.float32)
    cmask = cv2.resize(cmask, (pw, ph), interpolation=cv2.INTER_NEAREST) > 0
    if not cmask.any():  # a tiny defect scaled down to nothing: keep its centre pixel
        cmask[ph // 2, pw // 2] = True
    if flip:
        crop, cmask = crop[:, ::-1], cmask[:, ::-1]
    crop, cmask = np.ascontiguousarray(np.rot90(crop, rot)), np.ascontiguousarray(np.rot90(cmask, rot))
    ph, pw = cmask.shape
    oy = ry0 + int(rng.integers(0, max(0, rh - ph) + 1))
    ox = rx0 + int(rng.integers(0, max(0, rw - pw) + 1))
    oy, ox = min(oy, H - ph), min(ox, W - pw)
    dest = good[oy:oy + ph, ox:ox + pw].astype(np.float32)
    m8 = cmask.astype(np.uint8)
    band = cv2.dilate(m8, _disk(dil)) > 0
    outer = cv2.dilate(m8, _disk(dil + ring)) > 0
    ring_px = outer & ~band
    if ring_px.sum() < 8:
        ring_px = band
    mu_s, sd_s = _stats(crop[ring_px])
    mu_d, sd_d = _stats(dest[ring_px])
    gain = np.clip(sd_d / np.maximum(sd_s, 1e-3), *GAIN_RANGE)
    matched = (crop - mu_s) * gain + mu_d
    # Feathered alpha: 1 on the mask, falling to 0 across the dilation band, 0 outside it.
    dist = cv2.distanceTransform(band.astype(np.uint8), cv2.DIST_L2, 3)
    alpha = np.clip(dist / max(1, dil), 0.0, 1.0)
    alpha[cmask] = 1.0
    alpha[~band] = 0.0
    a = alpha[..., None]
    out = good.copy()
    out[oy:oy + ph, ox:ox + pw] = np.clip(np.rint(dest * (1 - a) + matched * a), 0, 255).astype(np.uint8)
    placed = np.zeros((H, W), bool)
    placed[oy:oy + ph, ox:ox + pw] = cmask
    recipe = {"flip": flip, "rot90": rot, "scale": round(scale, 4), "x": ox, "y": oy, "width": pw, "height": ph,
              "dilation_px": dil, "gain": [round(float(g), 4) for g in np.atleast_1d(gain)],
              "offset": [round(float(v), 2) for v in np.atleast_1d(mu_d - mu_s)]}
    return out, placed, recipe


def _read(path: Path, gray: bool) -> np.ndarray:
    img = _decode(path, cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR)
    if img is None:  # checked before; a file changed under us
        raise DataError(f"{path}: not a readable image")
    return img[..., None] if img.ndim == 2 else img


def _write(path: Path, img: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise DataError(f"{path}: cannot encode PNG")
    path.write_bytes(buf.tobytes())


def synthesize(good: str | os.PathLike, bad: str | os.PathLike, out: str | os.PathLike,
               masks: str | os.PathLike | None = None, cfg: SynthesizeConfig | None = None,
               force: bool = False) -> dict[str, Any]:
    """Check every input, then write the synthesized folder (see the module docstring); its manifest."""
    cfg = cfg or SynthesizeConfig()
    goods, defects, mdir = check_inputs(good, bad, out, masks, cfg, force)
    out = Path(out)
    gray = all(s.gray for s in goods + defects)
    rng = np.random.default_rng(cfg.seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        (staging / MASKS).mkdir()
        cache: dict[Path, tuple[np.ndarray, np.ndarray]] = {}
        good_sha: dict[Path, str] = {}  # recorded per item: training leaves out those built on its held-out images
        items = []
        order: list[int] = []
        width = max(5, len(str(cfg.count - 1)))
        for i in range(cfg.count):
            if not order:
                order = list(rng.permutation(len(defects)))
            d = defects[order.pop()]
            g = goods[int(rng.integers(len(goods)))]
            if d.path not in cache:
                img = _read(d.path, gray)
                m = _decode(d.mask, cv2.IMREAD_GRAYSCALE)
                if m.shape != img.shape[:2]:
                    m = cv2.resize(m, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_NEAREST)
                cache[d.path] = (img, m > 127)
            dimg, dmask = cache[d.path]
            new, placed, recipe = blend_defect(_read(g.path, gray), dimg, dmask, rng, cfg)
            name = f"syn_{i:0{width}d}.png"
            _write(staging / name, new)
            _write(staging / MASKS / name, placed.astype(np.uint8) * 255)
            if g.path not in good_sha:
                good_sha[g.path] = sha256_file(g.path)
            items.append({"image": name, "defect": d.path.name, "mask": d.mask.name, "good": g.path.name,
                          "good_sha256": good_sha[g.path], **recipe})
        real = []
        if cfg.include_real:
            for d in defects:
                name = f"real_{d.path.stem}.png"
                img = _read(d.path, gray)
                m = _decode(d.mask, cv2.IMREAD_GRAYSCALE)
                if m.shape != img.shape[:2]:
                    m = cv2.resize(m, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_NEAREST)
                _write(staging / name, img)
                _write(staging / MASKS / name, (m > 127).astype(np.uint8) * 255)
                real.append({"image": name, "defect": d.path.name})
        manifest = {
            "tool": "inspectd synthesize", "inspectd_version": __version__,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "method": "masked cut-outs of real defects blended into good images (inspectd/engines/synthesize.py)",
            "seed": cfg.seed, "count": cfg.count, "color": "gray" if gray else "rgb",
            "dilation": cfg.dilation or "auto (2 % of the good image's short side, >= 2 px)",
            "region": list(cfg.region), "include_real": cfg.include_real,
            "good": {"folder": str(Path(good).resolve()), "n": len(goods),
                     "fingerprint": fingerprint(s.path for s in goods)},
            "bad": {"folder": str(Path(bad).resolve()), "masks": str(mdir.resolve()), "n": len(defects),
                    "fingerprint": fingerprint(s.path for s in defects), "names": [s.path.name for s in defects]},
            "items": items, "real": real,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():  # empty, or --force: swap, then remove the old one
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(staging, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, out)
    except OSError as exc:  # a full disk, a folder taken away: nothing half-written is left
        shutil.rmtree(staging, ignore_errors=True)
        raise DataError(f"{out}: cannot write the synthesized images: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest
