"""`inspectd calibrate`: score held-out images through the daemon's runtime path (ONNX Runtime,
shared preprocessing), pick the line threshold, report, and write the line's threshold file.

Everything that can be checked before scoring is checked first (targets, config + line, the
threshold file's folder, folders, images the bundle was trained on, enough good images, bundle, the
report folder), and the threshold file (or, the first time, the config pointing at it) is the last
thing written, so any error leaves the line's threshold untouched. Reports go under the config's
`state_dir` (<state_dir>/<line>/calibration/<UTC time>/), never next to the config in /etc.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence, TextIO

import numpy as np

from inspectd.calibration import threshold as th
from inspectd.calibration.config_update import (ConfigUpdate, check_line, check_threshold_folder, state_dir,
                                               update_line_threshold, utc_stamp)
from inspectd.calibration.report import REPORT_JSON, format_summary, write_report
from inspectd.engines.bundle import Bundle, load_bundle
from inspectd.engines.preprocess import (IMAGE_SUFFIXES, fingerprint, list_images, load_prepared, load_stored,
                                          sha256_file)
from inspectd.errors import BundleError, ConfigError, DataError
from inspectd.progress import Progress

log = logging.getLogger("inspectd.calibration")

# Golden images must score like they did at export time (same ORT CPU path), in normalized units.
GOLDEN_TOLERANCE = 0.05
# check_shift: how far (in normalized units, i.e. held-out standard deviations) above the bundle's
# highest held-out good score the calibration's median may lie. The held-out scores have mean 0, so
# their highest is >= 0 and good images of the bundle's own setup (median near 0) never get there,
# however few images were held out (as few as 2, where "above the highest" alone is a coin toss).
SHIFT_MARGIN = 3.0
# check_outliers: Tukey's "far out" fence on the calibration's own good scores.
OUTLIER_IQR = 3.0


@dataclass
class CalibrationRequest:
    bundle: Path
    good: Path
    line: str
    config: Path
    target_false_reject: float
    bad: Path | None = None
    target_escape: float | None = None
    force_overlap: bool = False
    skip_overlap: bool = False      # leave out the images the bundle was trained on
    report_dir: Path | None = None
    confidence: float = th.DEFAULT_CONFIDENCE
    batch_size: int = 8
    threads: int = 0
    write_config: bool = True
    accept_shift: bool = False      # calibrate on good images unlike the bundle's own (check_shift)
    accept_outliers: bool = False   # keep good images that score like defects (check_outliers)


@dataclass
class CalibrationResult:
    report: dict[str, Any]
    report_files: dict[str, Path | None]
    update: ConfigUpdate | None
    good_scores: np.ndarray
    bad_scores: np.ndarray | None
    summary: str = field(default="")


def calibrate(req: CalibrationRequest, progress_stream: TextIO | None = None) -> CalibrationResult:
    th.check_rate(req.target_false_reject, "--target-false-reject")
    if req.target_escape is not None:
        th.check_rate(req.target_escape, "--target-escape", upper=1.0)
    if req.target_escape is not None and req.bad is None:
        raise DataError("--target-escape needs --bad images")
    if req.skip_overlap and req.force_overlap:
        raise ConfigError("--skip-overlap leaves the training images out and --force-overlap keeps them in: "
                          "give one of them")
    bundle = load_bundle(req.bundle)
    if req.write_config:
        check_line(req.config, req.line, bundle.bundle_id)
        check_threshold_folder(req.config, req.line)  # a missing folder fails now, not after scoring
    report_dir = req.report_dir or (state_dir(req.config) / req.line / "calibration" / utc_stamp())
    _check_report_dir(report_dir, default=req.report_dir is None)
    good_paths = _images(req.good, "good")
    bad_paths = _images(req.bad, "bad") if req.bad is not None else None
    found = find_overlap(bundle, good_paths, bad_paths or [])
    left_out: dict[str, Any] | None = None
    if req.skip_overlap and found.count:
        # The sample-size rule below then counts only the images the bundle never saw.
        left_out = found.as_dict()
        trained = set(found.good) | set(found.bad)
        good_paths = [p for p in good_paths if p not in trained]
        if bad_paths is not None:
            bad_paths = [p for p in bad_paths if p not in trained]
            if not bad_paths:
                raise DataError(f"{req.bad}: every bad image is one the bundle learned from (--skip-overlap left "
                                f"out all {len(found.bad)}); give defects it never saw")
        found = Overlap([], [], found.by)
    needed = th.needed_samples(req.target_false_reject, req.confidence)
    if len(good_paths) < needed:
        skipped = f" ({len(left_out['names'])} left out: the bundle was trained on them)" if left_out else ""
        raise DataError(f"{req.good}: {len(good_paths)} good images cannot support a false-reject target of "
                        f"{req.target_false_reject:.3%} at {req.confidence:.0%} confidence: need at least "
                        f"{needed} good images not used in training{skipped}")
    overlap = found.as_dict()
    if overlap["count"]:
        what = (f"{overlap['count']} calibration images are in the bundle's training set "
                f"(by {overlap['by']}: {', '.join(overlap['examples'])})")
        if not req.force_overlap:
            raise DataError(what + "; use images the bundle never saw, --skip-overlap to leave these out, "
                                   "or --force-overlap to keep them (optimistic rates)")
        log.warning("%s; continuing (--force-overlap): rates will be optimistic", what)
    overlap["left_out"] = left_out

    from inspectd.engines.runtime.onnxruntime_backend import OnnxRuntimeBackend

    with OnnxRuntimeBackend(bundle, threads=req.threads) as backend:
        check_golden(bundle, backend)
        good_raw = score_images(backend, bundle, good_paths, req.batch_size, "good", progress_stream)
        bad_raw = (score_images(backend, bundle, bad_paths, req.batch_size, "bad", progress_stream)
                   if bad_paths is not None else None)
    good = np.asarray(bundle.normalize(good_raw), dtype=np.float64)
    bad = np.asarray(bundle.normalize(bad_raw), dtype=np.float64) if bad_raw is not None else None
    shift = check_shift(bundle, req.good, good, req.accept_shift)
    outliers = check_outliers(bundle, req.good, good_paths, good, req.accept_outliers, shifted=shift["accepted"])

    report = build_report(req, bundle, good_paths, good, bad_paths, bad, overlap)
    report["shift"] = shift
    report["outliers"] = outliers
    files = write_report(report_dir, report, good, bad)
    update = None
    if req.write_config:
        update = update_line_threshold(req.config, req.line, calibration_record(report, report_dir),
                                       history_dir=report_dir)
    return CalibrationResult(report=report, report_files=files, update=update, good_scores=good,
                             bad_scores=bad, summary=format_summary(report))


def _check_report_dir(folder: Path, default: bool) -> None:
    """Before any scoring, without creating anything: the report folder (or the nearest existing
    folder above it) must be writable, so a state dir we cannot write fails in a second. A folder
    holding an earlier report is refused: a shadow or promoted recipe may judge with its report.json,
    and replacing it would change a running line's threshold outside the audit log."""
    if (folder / REPORT_JSON).exists():
        raise ConfigError(f"{folder}: holds the report.json of an earlier calibration (a shadow or promoted "
                          f"recipe may judge with it); give a new --report folder")
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if existing.is_dir() and os.access(existing, os.W_OK | os.X_OK):
        return
    hint = "; set state_dir in the config or give --report DIR" if default else ""
    why = "not a folder" if existing.exists() and not existing.is_dir() else "permission denied"
    raise ConfigError(f"{folder}: cannot create the report folder ({existing}: {why}){hint}")


def _images(folder: Path, what: str) -> list[Path]:
    paths = list_images(folder)
    if not paths:
        raise DataError(f"{folder}: no {what} images (looked for {', '.join(IMAGE_SUFFIXES)})")
    return paths


def trained_images(bundle: Bundle, paths: Sequence[Path]) -> tuple[list[Path], str]:
    """The images of `paths` the bundle was trained on, and by what they were recognised: its good
    images and, for methods that learn from them, its defects (real and synthesized). Exact by
    content when the manifest lists per-file hashes (`image_sha256`); otherwise by file name, plus
    the aggregate content fingerprint (which catches the whole training folder under other names).
    A file that cannot be read is not known as trained (its reader reports it)."""
    training = bundle.manifest.training
    learned = [r for r in (training.defects, training.synthetic_defects) if r]
    hashes = getattr(training, "image_sha256", None)
    if hashes:
        known = set(hashes).union(*(r.get("image_sha256") or () for r in learned))
        known_names = {Path(n).name for r in learned if not r.get("image_sha256") for n in r.get("image_names", ())}
        hits = [p for p in paths if p.name in known_names or _sha256_or_none(p) in known]
        by = "content hash" if not known_names else "content hash and defect file name"
    else:
        names = {Path(n).name for n in training.image_names}
        hits = [p for p in paths if p.name in names]
        by = "file name"
        if not hits and paths and _fingerprint_or_none(paths) == training.fingerprint:
            hits, by = list(paths), "training fingerprint"
    return hits, by


def _sha256_or_none(path: Path) -> str | None:
    try:
        return sha256_file(path)
    except OSError:
        return None


def _fingerprint_or_none(paths: Sequence[Path]) -> str | None:
    try:
        return fingerprint(paths)
    except OSError:
        return None


def training_overlap(bundle: Bundle, paths: Sequence[Path]) -> dict[str, Any]:
    """`trained_images` of `paths` as a report entry: count, by what, a few names, all names."""
    hits, by = trained_images(bundle, paths)
    names = [p.name for p in hits]
    return {"count": len(names), "by": by, "examples": names[:3], "names": names}


@dataclass
class Overlap:
    """The good and the bad images of a run (calibrate, eval) that the bundle was trained on."""
    good: list[Path]
    bad: list[Path]
    by: str

    @property
    def count(self) -> int:
        return len(self.good) + len(self.bad)

    def as_dict(self) -> dict[str, Any]:
        names = [p.name for p in self.good + self.bad]
        return {"count": len(names), "good": len(self.good), "bad": len(self.bad), "by": self.by,
                "examples": names[:3], "names": names}


def find_overlap(bundle: Bundle, good_paths: Sequence[Path], bad_paths: Sequence[Path]) -> Overlap:
    """Good and bad folders looked at apart: the training fingerprint is that of a good folder alone."""
    good, by_good = trained_images(bundle, good_paths)
    bad, by_bad = trained_images(bundle, bad_paths)
    if good and bad and by_good != by_bad:
        by = f"{by_good} (good), {by_bad} (bad)"
    else:
        by = by_bad if bad and not good else by_good
    return Overlap(good, bad, by)


def check_golden(bundle: Bundle, backend: Any) -> None:
    """The bundle's golden images must reproduce their export-time scores on this runtime."""
    good, bad = bundle.golden_images()
    g = bundle.manifest.golden
    pairs = list(zip(good, g.good_scores)) + list(zip(bad, g.bad_scores))
    if not pairs:
        return
    # Stored already prepared (ROI cropped, resized): loaded as they are.
    batch = np.stack([load_stored(p, bundle.input_spec) for p, _ in pairs])
    raw, _ = backend.infer(batch)
    std = bundle.manifest.score.good_std
    diffs = np.abs(raw.astype(np.float64) - np.asarray([s for _, s in pairs])) / std
    worst = int(np.argmax(diffs))
    if not np.isfinite(diffs).all() or diffs[worst] > GOLDEN_TOLERANCE:
        raise BundleError(f"{bundle.path}: golden image {pairs[worst][0].name} scores {raw[worst]:.6g}, "
                          f"export recorded {pairs[worst][1]:.6g} ({diffs[worst]:.3g} normalized units > "
                          f"{GOLDEN_TOLERANCE}): the bundle fails its checks on this runtime")


def score_images(backend: Any, bundle: Bundle, paths: Sequence[Path], batch_size: int, label: str,
                 stream: TextIO | None = None) -> np.ndarray:
    """Raw scores of `paths` (same preprocessing as the daemon), with a progress bar."""
    bar = Progress(len(paths), label=f"scoring {label}", stream=stream or sys.stderr)
    out = np.empty(len(paths), dtype=np.float64)
    try:
        for start in range(0, len(paths), max(1, batch_size)):
            chunk = paths[start:start + max(1, batch_size)]
            batch = np.stack([load_prepared(p, bundle.input_spec) for p in chunk])
            raw, _ = backend.infer(batch)
            bad = ~np.isfinite(raw)
            if bad.any():
                raise DataError(f"{chunk[int(np.argmax(bad))]}: the model gives a non-finite score")
            out[start:start + len(chunk)] = raw
            bar.update(len(chunk))
    finally:
        bar.close()
    return out


def _held_out_max(bundle: Bundle) -> float | None:
    """The highest normalized score among the good images the bundle held out from training (None for a
    bundle without held-out quantiles)."""
    top = (bundle.manifest.score.good_quantiles or {}).get("1.0")
    return float(bundle.normalize(float(top))) if top is not None else None


def check_outliers(bundle: Bundle, folder: Path, good_paths: Sequence[Path], good: np.ndarray,
                   accept: bool, shifted: bool) -> dict[str, Any]:
    """A defective part among the good images sets the threshold at its own score: the threshold is an
    upper order statistic of the good scores (often the highest), so every defect scoring less would
    pass. Good images far out on both counts — SHIFT_MARGIN above every held-out good image of the
    bundle, and beyond Tukey's far-out fence of the calibration set itself (Q3 + OUTLIER_IQR x IQR: a
    bundle that held out few images knows its good tail poorly) — are named and refused (DataError,
    nothing written) unless `accept`. Not checked when the whole set shifted (`shifted`: check_shift's
    case, accepted there), where the held-out scores no longer describe them. Returns what the report
    records."""
    held_out_max = _held_out_max(bundle)
    info: dict[str, Any] = {"limit": None, "images": [], "accepted": False, "checked": False}
    if held_out_max is None or shifted:
        return info
    q1, q3 = (float(v) for v in np.quantile(good, [0.25, 0.75]))
    limit = max(held_out_max + SHIFT_MARGIN, q3 + OUTLIER_IQR * (q3 - q1))
    order = [int(i) for i in np.argsort(-good) if good[i] > limit]
    info.update(limit=limit, checked=True, images=[[good_paths[i].name, float(good[i])] for i in order])
    if not order:
        return info
    if not accept:
        named = ", ".join(f"{good_paths[i].name} {good[i]:.3g}" for i in order[:5])
        more = f" and {len(order) - 5} more" if len(order) > 5 else ""
        raise DataError(f"{folder}: {len(order)} of {good.size} good images score like defects, more than "
                        f"{SHIFT_MARGIN:g} above every good image bundle {bundle.bundle_id} was validated on "
                        f"(normalized: {named}{more}; its held-out highest {held_out_max:.3g}, and beyond "
                        f"{OUTLIER_IQR:g} interquartile ranges of these images): one defective part among them would "
                        f"set the threshold at its own score and pass every defect scoring less; look at them and "
                        f"remove any that is not good, or --accept-outliers to calibrate with them")
    info["accepted"] = True
    return info


def check_shift(bundle: Bundle, folder: Path, good: np.ndarray, accept: bool) -> dict[str, Any]:
    """The calibration's good images must be good parts as the bundle knows them. When their median
    scores SHIFT_MARGIN above every held-out good image the bundle was validated on (its manifest's
    highest), the parts, camera or light differ from what it learned, and a threshold set above them
    would pass defects the bundle could still see: refused (DataError, nothing written) unless
    `accept`. Returns what the report records."""
    held_out_max = _held_out_max(bundle)
    median = float(np.median(good))
    info: dict[str, Any] = {"median": median, "held_out_max": None, "above_held_out": None, "accepted": False}
    if held_out_max is None:  # a bundle without held-out quantiles: nothing to compare with
        return info
    above = int((good > held_out_max).sum())
    info.update(held_out_max=held_out_max, above_held_out=above)
    if median <= held_out_max + SHIFT_MARGIN:
        return info
    if not accept:
        raise DataError(f"{folder}: {above} of {good.size} good images score above every good image the bundle was "
                        f"validated on (median normalized score {median:.4g}, the bundle's held-out highest "
                        f"{held_out_max:.4g}, margin {SHIFT_MARGIN:g}): the parts, camera or light differ from "
                        f"what bundle {bundle.bundle_id} learned, and a threshold above them would pass defects; "
                        f"retrain on images of the line as it is now (inspectd train), or --accept-shift to "
                        f"calibrate anyway")
    info["accepted"] = True  # the CLI says so beside the summary; the report keeps it
    return info


def build_report(req: CalibrationRequest, bundle: Bundle, good_paths: Sequence[Path], good: np.ndarray,
                 bad_paths: Sequence[Path] | None, bad: np.ndarray | None,
                 overlap: dict[str, Any]) -> dict[str, Any]:
    fr = th.false_reject_threshold(good, req.target_false_reject, req.confidence)
    report: dict[str, Any] = {
        "schema": 1,
        "kind": "inspectd.calibration",
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "line": req.line,
        "bundle": str(req.bundle),
        "bundle_id": bundle.bundle_id,
        "score": "normalized",
        "decision": "NG if score > threshold",
        "threshold": fr.threshold,
        "false_reject": {**fr.as_dict(), "empirical_rate": fr.good_above / fr.n_good},
        "good_dir": str(req.good),
        "bad_dir": str(req.bad) if req.bad is not None else None,
        "n_good": int(good.size),
        "n_bad": int(bad.size) if bad is not None else 0,
        "overlap": {**overlap, "forced": bool(req.force_overlap and overlap["count"])},
        "escape_at_threshold": None,
        "roc_auc": None,
        "escape_target": None,
    }
    if bad is not None:
        report["escape_at_threshold"] = th.escape_rate(bad, fr.threshold, req.confidence).as_dict()
        report["roc_auc"] = th.roc_auc(good, bad)
        if req.target_escape is not None:
            report["escape_target"] = th.escape_threshold(bad, req.target_escape, good, req.confidence).as_dict()
    report["images"] = {
        "good": [[p.name, round(float(s), 6)] for p, s in zip(good_paths, good)],
        "bad": [[p.name, round(float(s), 6)] for p, s in zip(bad_paths or [], bad if bad is not None else [])],
    }
    return report


def calibration_record(report: dict[str, Any], report_dir: Path) -> dict[str, Any]:
    """What the daemon reads (`threshold`, `bundle_id`) + the summary kept with it: counts,
    target, bound, and the good scores for the drift watch."""
    fr = report["false_reject"]
    esc = report.get("escape_at_threshold")
    return {
        "threshold": report["threshold"],
        "bundle_id": report["bundle_id"],
        "line": report["line"],
        "created_utc": report["created_utc"],
        "score": "normalized",
        "decision": report["decision"],
        "target_false_reject": fr["target"],
        "confidence": fr["confidence"],
        "false_reject_bound": fr["bound"],
        "k": fr["k"],
        "n_good": report["n_good"],
        "n_bad": report["n_bad"],
        "escape_rate": esc["rate"] if esc else None,
        "escape_ci": [esc["ci_low"], esc["ci_high"]] if esc else None,
        "roc_auc": report["roc_auc"],
        "overlap_forced": report["overlap"]["forced"],
        "overlap_skipped": (report["overlap"].get("left_out") or {}).get("count", 0),
        "report": os.fspath(report_dir),
        "good_scores": [s for _, s in report["images"]["good"]],
    }
