"""`inspectd eval`: score good and bad folders through ONNX Runtime (the daemon's path) and write
a report: image / pixel ROC AUC, per-image CSV, ROC curve, score histogram, heatmap overlays.

Images and masks go through the bundle's InputSpec (its ROI crop, then the resize), so pixel
AUROC is computed in the model's frame, on the pixels the line inspects."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from inspectd.stats import roc_auc, roc_curve
from inspectd.engines.bundle import Bundle, load_bundle
from inspectd.engines.heatmap import overlay
from inspectd.engines.preprocess import (IMAGE_SUFFIXES, InputSpec, check_mask_stems, imdecode, list_images, prepare,
                                         prepare_mask, read_image)
from inspectd.engines.runtime.onnxruntime_backend import OnnxRuntimeBackend
from inspectd.errors import DataError
from inspectd.fileio import atomic_write
from inspectd.progress import Progress

N_OVERLAYS = 5
# Everything eval writes into --out (and only that is cleared when a run starts there).
REPORT, SCORES, PLOTS, OVERLAYS = "report.json", "scores.csv", ("roc.png", "histogram.png"), "overlays"
OVERLAY_TAGS = ("worst-good", "best-bad")
# How a later run knows --out holds an earlier eval's outputs (and not a folder of the user's).
TOOL = "inspectd eval"
# The report.json of evals from before the marker: always these keys, pixel ones with --masks.
OLD_REPORT_KEYS = frozenset({"bundle", "bundle_id", "n_good", "n_bad", "skipped", "image_auroc"})
OLD_REPORT_OPTIONAL_KEYS = frozenset({"pixel_auroc", "pixel_images"})
SCORES_HEADER = ("file", "label", "raw_score", "score")


@dataclass
class Scored:
    path: Path
    label: int            # 0 good, 1 bad
    score: float          # raw
    amap: np.ndarray
    image: np.ndarray     # prepared (model input)
    source_shape: tuple[int, int]  # height, width of the file before the ROI crop and resize


def score_folder(backend: OnnxRuntimeBackend, bundle: Bundle, paths: list[Path], label: int,
                 bar: Progress) -> tuple[list[Scored], list[str]]:
    """The scored images, and why each of the others was skipped (unreadable, or a frame size the
    bundle refuses)."""
    items: list[Scored] = []
    skipped: list[str] = []
    for p in paths:
        try:
            source = read_image(p, bundle.input_spec.color_mode)
            img = prepare(source, bundle.input_spec)
        except DataError as exc:
            skipped.append(f"{p}: {exc}" if str(p) not in str(exc) else str(exc))
            bar.update(1)
            continue
        s, m = backend.infer(img[None])
        items.append(Scored(p, label, float(s[0]), m[0], img, source.shape[:2]))
        bar.update(1)
    return items, skipped


def _mask_path(masks_dir: Path, image_path: Path) -> Path | None:
    """The image's mask file: the image's name with any image suffix, or None."""
    for suffix in IMAGE_SUFFIXES:
        cand = masks_dir / (image_path.stem + suffix)
        if cand.is_file():
            return cand
    return None


def _mask_for(masks_dir: Path, image_path: Path, spec: InputSpec,
              source_shape: tuple[int, int]) -> np.ndarray | None:
    """The image's mask in the model's frame (same ROI crop and resize as the image), or None."""
    cand = _mask_path(masks_dir, image_path)
    if cand is None:
        return None
    m = imdecode(np.fromfile(str(cand), np.uint8), cv2.IMREAD_GRAYSCALE)
    if m is None:
        raise DataError(f"{cand}: not a readable mask")
    try:
        return prepare_mask(m, spec, source_shape)
    except DataError as exc:
        raise DataError(f"{cand}: {exc}") from None


def evaluate(bundle_dir: str | os.PathLike, good_dir: str | os.PathLike, bad_dir: str | os.PathLike,
             out_dir: str | os.PathLike, masks_dir: str | os.PathLike | None = None,
             threads: int = 0) -> dict[str, Any]:
    bundle = load_bundle(bundle_dir)
    out = Path(out_dir)
    good_paths, bad_paths = list_images(good_dir), list_images(bad_dir)
    if not good_paths or not bad_paths:
        raise DataError("eval needs at least one image in each of --good and --bad")
    for flag, folder in (("--good", good_dir), ("--bad", bad_dir), ("--masks", masks_dir)):
        # eval clears its own earlier outputs in --out: never in a folder of inputs
        if folder is not None and out.resolve() == Path(folder).resolve():
            raise DataError(f"{out}: --out is the {flag} folder; give the report a folder of its own")
    if masks_dir is not None:  # before scoring: a typo must not look like "no pixel result"
        check_mask_stems(bad_dir, bad_paths)
        masks = Path(masks_dir)
        if not masks.is_dir():
            raise DataError(f"{masks}: masks folder {'is not a folder' if masks.exists() else 'does not exist'}")
        if not any(_mask_path(masks, p) is not None for p in bad_paths):
            raise DataError(f"{masks}: no mask matches a defective image's name (a mask is <image name>.png "
                            f"or another image suffix, as {bad_paths[0].stem}.png)")
    _check_outputs_are_evals(out)
    overlap = _training_overlap(bundle, good_paths, bad_paths)
    try:
        out.mkdir(parents=True, exist_ok=True)
        _clear_outputs(out)
    except OSError as exc:
        raise DataError(f"{out}: cannot write the report: {exc.strerror or exc}") from None
    bar = Progress(len(good_paths) + len(bad_paths), "eval")
    with OnnxRuntimeBackend(bundle, threads=threads) as backend:
        good, skip_g = score_folder(backend, bundle, good_paths, 0, bar)
        bad, skip_b = score_folder(backend, bundle, bad_paths, 1, bar)
    bar.close()
    for folder, scored, skipped in (("--good", good, skip_g), ("--bad", bad, skip_b)):
        if not scored:
            raise DataError(f"no usable images in {folder}" + (f" ({len(skipped)} skipped, the first: {skipped[0]})"
                                                                 if skipped else ""))
    if skip_g or skip_b:
        print(f"eval: {len(skip_g) + len(skip_b)} images skipped, the first: {(skip_g + skip_b)[0]}", file=sys.stderr)
    items = good + bad
    g = np.array([i.score for i in good])
    b = np.array([i.score for i in bad])
    report: dict[str, Any] = {
        "tool": TOOL,
        "bundle": str(bundle.path), "bundle_id": bundle.bundle_id,
        "n_good": len(good), "n_bad": len(bad), "skipped": len(skip_g) + len(skip_b),
        "training_overlap": overlap,
        "image_auroc": roc_auc(g, b),
    }
    if masks_dir is not None:
        report.update(_pixel_auroc(items, Path(masks_dir), bundle))
    try:  # a full disk, a folder taken away: say where (report.json comes last, whole or not at all)
        buf = io.StringIO(newline="")
        w = csv.writer(buf)
        w.writerow(SCORES_HEADER)
        for i in items:
            w.writerow([i.path.name, "bad" if i.label else "good", f"{i.score:.6f}",
                        f"{float(bundle.normalize(i.score)):.6f}"])
        atomic_write(out / SCORES, buf.getvalue().encode("utf-8"))
        _plots(g, b, out, report)
        _overlays(bundle, good, bad, out)
        atomic_write(out / REPORT, (json.dumps(report, indent=2) + "\n").encode("utf-8"))
    except OSError as exc:
        raise DataError(f"{out}: cannot write the report: {exc.strerror or exc}") from None
    return report


def _training_overlap(bundle: Bundle, good_paths: list[Path], bad_paths: list[Path]) -> dict[str, Any]:
    """The --good / --bad images the bundle was trained on (calibrate's check, which refuses them):
    for the report, and one warning line, since an AUROC on training images is optimistic. Not a
    refusal: evaluating on training images is sometimes what is wanted."""
    # Imported here: the calibration package is a consumer of the engine, not a dependency of it.
    from inspectd.calibration.calibrate import find_overlap

    found = find_overlap(bundle, good_paths, bad_paths).as_dict()
    del found["names"]  # a few names (examples) are enough here
    if found["count"]:
        more = ", ..." if found["count"] > len(found["examples"]) else ""
        print(f"inspectd eval: warning: {found['count']} of the --good/--bad images ({found['good']} good, "
              f"{found['bad']} bad) are in the bundle's training set (by {found['by']}: "
              f"{', '.join(found['examples'])}{more}): AUROC on them is optimistic", file=sys.stderr)
    return found


def _eval_output_names(out: Path) -> list[Path]:
    """The files of eval's output names that are in `out` (what a run there replaces)."""
    found = [out / name for name in (REPORT, SCORES, *PLOTS) if os.path.lexists(out / name)]
    folder = out / OVERLAYS
    if folder.is_dir():
        found += sorted(p for tag in OVERLAY_TAGS for p in folder.glob(f"{tag}-*.png"))
    return found


def _is_eval_report(path: Path) -> bool:
    """report.json written by eval: with the marker, or (older evals) exactly their key set."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    if not isinstance(data, dict):
        return False
    return data.get("tool") == TOOL or OLD_REPORT_KEYS <= data.keys() <= OLD_REPORT_KEYS | OLD_REPORT_OPTIONAL_KEYS


def _is_eval_scores(path: Path) -> bool:
    """scores.csv with eval's header: what a run that died before its report.json leaves."""
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            return next(csv.reader([fh.readline()]), None) == list(SCORES_HEADER)
    except (OSError, UnicodeDecodeError):
        return False


def _check_outputs_are_evals(out: Path) -> None:
    """Before scoring: a run replaces eval's output names in --out; only when they are an earlier
    eval's (its report.json, or without one the scores.csv of a run that failed partway), never
    a file of the user's that happens to have one of those names."""
    present = _eval_output_names(out)
    if not present:
        return
    report, scores = out / REPORT, out / SCORES
    if os.path.lexists(report):
        if _is_eval_report(report):
            return
        foreign = report
    elif scores in present and _is_eval_scores(scores):
        return
    else:
        foreign = present[0]
    raise DataError(f"{foreign}: not an output of an earlier inspectd eval, and eval would overwrite it: "
                    f"give another --out (a new folder)")


def _clear_outputs(out: Path) -> None:
    """Remove an earlier run's outputs (only the names eval writes): the folder then holds this
    run's files alone, and a run that fails partway leaves no report.json from before."""
    # report.json first (_eval_output_names lists it first): from here on the folder no longer
    # claims a complete earlier run.
    for path in _eval_output_names(out):
        path.unlink(missing_ok=True)


def _pixel_auroc(items: list[Scored], masks_dir: Path, bundle: Bundle) -> dict[str, Any]:
    spec = bundle.input_spec
    h, w = spec.height, spec.width
    values, labels = [], []
    for i in items:
        mask = _mask_for(masks_dir, i.path, spec, i.source_shape)
        if mask is None:
            if i.label == 1:
                continue  # a bad image without a mask says nothing about pixels
            mask = np.zeros((h, w), bool)
        values.append(cv2.resize(i.amap, (w, h), interpolation=cv2.INTER_LINEAR).ravel())
        labels.append(mask.ravel())
    if not values:
        return {"pixel_auroc": None}
    v, lab = np.concatenate(values), np.concatenate(labels)
    if not lab.any() or lab.all():
        return {"pixel_auroc": None}
    return {"pixel_auroc": roc_auc(v[~lab], v[lab]), "pixel_images": len(values)}


def _plots(g: np.ndarray, b: np.ndarray, out: Path, report: dict[str, Any]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fpr, tpr, _ = roc_curve(g, b)
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.plot(fpr, tpr, lw=2, label=f"AUROC {report['image_auroc']:.4f}")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false-reject rate (good judged NG)")
    ax.set_ylabel("detection rate (bad judged NG)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / PLOTS[0])
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    bins = np.linspace(min(g.min(), b.min()), max(g.max(), b.max()), 40)
    ax.hist(g, bins=bins, alpha=0.6, label=f"good (n={len(g)})", color="tab:green")
    ax.hist(b, bins=bins, alpha=0.6, label=f"bad (n={len(b)})", color="tab:red")
    ax.set_xlabel("raw anomaly score")
    ax.set_ylabel("images")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / PLOTS[1])
    plt.close(fig)


def _overlays(bundle: Bundle, good: list[Scored], bad: list[Scored], out: Path) -> None:
    folder = out / OVERLAYS
    folder.mkdir(exist_ok=True)
    worst_good = sorted(good, key=lambda i: -i.score)[:N_OVERLAYS]
    best_bad = sorted(bad, key=lambda i: i.score)[:N_OVERLAYS]
    for tag, chosen in zip(OVERLAY_TAGS, (worst_good, best_bad)):
        for rank, i in enumerate(chosen):
            img = overlay(i.image, bundle.heatmap_u8(i.amap))
            _write_png(folder / f"{tag}-{rank}-{i.path.stem}.png", img)
            if bundle.roi is not None:  # also at camera resolution, so the spot can be found on the part
                _write_png(folder / f"{tag}-{rank}-{i.path.stem}-frame.png", _frame_overlay(bundle, i))


def _write_png(path: Path, img: np.ndarray) -> None:
    """Encode in memory, then write: cv2.imwrite only returns False on a full disk, so a missing
    overlay went unnoticed; a plain write raises OSError, which eval reports."""
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise DataError(f"{path}: cannot encode the overlay as PNG")
    path.write_bytes(buf.tobytes())


def _frame_overlay(bundle: Bundle, item: Scored) -> np.ndarray:
    """The heatmap mapped back through the ROI onto the whole source image (ROI outlined), BGR."""
    spec = bundle.input_spec
    x, y, w, h = spec.roi
    source = read_image(item.path, spec.color_mode)
    heat = np.zeros(source.shape[:2], np.uint8)
    heat[y:y + h, x:x + w] = cv2.resize(bundle.heatmap_u8(item.amap), (w, h), interpolation=cv2.INTER_LINEAR)
    out = overlay(source, heat)
    cv2.rectangle(out, (x, y), (x + w - 1, y + h - 1), (255, 255, 255), max(1, min(out.shape[:2]) // 256))
    return out
