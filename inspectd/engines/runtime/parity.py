"""Parity gate: a non-reference backend serves a line only if it scores the bundle's golden
images like ONNX Runtime on CPU (the reference the thresholds were calibrated with).

Tolerances (stated, and printed in every report):
- score: |normalized score difference| <= SCORE_TOLERANCE = 0.05 normalized units (5 % of the
  standard deviation of held-out good scores: far below any sensible OK/NG margin, far above
  FP16 rounding of a well-conditioned model; the flow is one only with the layers up to its first
  feature tap in FP32: runtime/precision.py);
- map: max |map difference| / (display_hi - display_lo) <= MAP_TOLERANCE = 0.02 (2 % of the
  fixed heatmap display range, i.e. about 5 grey levels in the published heatmap);
- verdict: OK/NG identical for every image at the line threshold, when one is given.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from inspectd.engines.bundle import Bundle
from inspectd.engines.preprocess import load_stored
from inspectd.engines.runtime.base import Backend
from inspectd.errors import InspectdError
from inspectd.fileio import json_value

SCORE_TOLERANCE = 0.05
MAP_TOLERANCE = 0.02
log = logging.getLogger("inspectd.runtime.parity")


class ParityError(InspectdError):
    """A backend whose scores or verdicts differ from the ONNX Runtime CPU reference."""

    def __init__(self, message: str, report: "ParityReport | None" = None) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class ParityRow:
    image: str
    kind: str  # good | bad | calibration
    reference_score: float  # normalized
    score: float  # normalized
    score_diff: float  # |score - reference_score|
    map_diff: float  # max |map diff| relative to the display range
    reference_verdict: str | None
    verdict: str | None

    @property
    def verdict_match(self) -> bool:
        return self.reference_verdict == self.verdict


@dataclass
class ParityReport:
    backend: str
    bundle_id: str
    threshold: float | None
    score_tolerance: float
    map_tolerance: float
    rows: list[ParityRow] = field(default_factory=list)

    @property
    def max_score_diff(self) -> float:
        return max((_diff(r.score_diff) for r in self.rows), default=0.0)

    @property
    def max_map_diff(self) -> float:
        return max((_diff(r.map_diff) for r in self.rows), default=0.0)

    @property
    def non_finite(self) -> list[ParityRow]:
        """Rows where either side produced a NaN/inf score or map: compared as infinitely apart."""
        return [r for r in self.rows if not (math.isfinite(r.score_diff) and math.isfinite(r.map_diff))]

    @property
    def verdict_mismatches(self) -> list[ParityRow]:
        return [r for r in self.rows if not r.verdict_match]

    @property
    def worst(self) -> ParityRow | None:
        """The row that fails worst: a verdict flip first, else the largest score excess."""
        if not self.rows:
            return None
        if self.verdict_mismatches:
            return max(self.verdict_mismatches, key=lambda r: _diff(r.score_diff))
        return max(self.rows, key=lambda r: max(_diff(r.score_diff) / self.score_tolerance,
                                                _diff(r.map_diff) / self.map_tolerance))

    @property
    def passed(self) -> bool:
        return (bool(self.rows) and self.max_score_diff <= self.score_tolerance
                and self.max_map_diff <= self.map_tolerance and not self.verdict_mismatches)

    def summary(self) -> str:
        w = self.worst
        head = (f"backend {self.backend} vs onnxruntime-cpu on {len(self.rows)} golden images of bundle "
                f"{self.bundle_id}: max score diff {self.max_score_diff:.4f} (tolerance {self.score_tolerance}), "
                f"max map diff {self.max_map_diff:.4f} (tolerance {self.map_tolerance}), "
                f"verdict mismatches {len(self.verdict_mismatches)}"
                + (f" at threshold {self.threshold:g}" if self.threshold is not None else " (no threshold given)"))
        if w is not None and not self.passed:
            head += (f"; worst: {w.image} ({w.kind}) score {w.score:.4f} vs reference {w.reference_score:.4f}"
                     + (f", verdict {w.verdict} vs {w.reference_verdict}" if not w.verdict_match else "")
                     + f", map diff {w.map_diff:.4f}")
            bad = self.non_finite
            if bad:  # a verdict flip may be "worst", but a NaN/inf reference or candidate must show too
                head += (f"; non-finite score or map on {len(bad)} image(s): "
                         + ", ".join(r.image for r in bad[:3]) + (", …" if len(bad) > 3 else ""))
        return head

    def table(self) -> str:
        lines = [f"{'image':<32} {'kind':<5} {'ref':>9} {'backend':>9} {'|diff|':>8} {'map':>7} {'verdicts':>9}"]
        for r in self.rows:
            verdicts = "-" if r.verdict is None else (f"{r.verdict}" if r.verdict_match
                                                      else f"{r.reference_verdict}!={r.verdict}")
            lines.append(f"{_clip(r.image, 32):<32} {r.kind:<5} {r.reference_score:>9.4f} {r.score:>9.4f} "
                         f"{r.score_diff:>8.4f} {r.map_diff:>7.4f} {verdicts:>9}")
        lines.append(("PASS: " if self.passed else "FAIL: ") + self.summary())
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON (`check-engine --json`): a NaN/inf difference or score is null."""
        return json_value({"backend": self.backend, "bundle_id": self.bundle_id, "threshold": self.threshold,
                           "score_tolerance": self.score_tolerance, "map_tolerance": self.map_tolerance,
                           "max_score_diff": self.max_score_diff, "max_map_diff": self.max_map_diff,
                           "passed": self.passed, "rows": [asdict(r) for r in self.rows]})


def golden_set(bundle: Bundle) -> list[tuple[Path, str]]:
    """The images the gate scores: golden good + bad; the calibration images if there are none."""
    good, bad = bundle.golden_images()
    images = [(p, "good") for p in good] + [(p, "bad") for p in bad]
    if not images:
        images = [(bundle.path / p, "calib") for p in bundle.manifest.calibration_images]
    return images


def parity_gate(backend: Backend, bundle: Bundle, threshold: float | None = None,
                tolerance: float = SCORE_TOLERANCE, map_tolerance: float = MAP_TOLERANCE,
                reference: Backend | None = None) -> ParityReport:
    """Score the golden images on `backend` and on the reference; return the report if they
    agree, else raise ParityError (naming the worst image and the numbers, report attached)."""
    images = golden_set(bundle)
    report = ParityReport(backend=backend.name, bundle_id=bundle.bundle_id, threshold=threshold,
                          score_tolerance=tolerance, map_tolerance=map_tolerance)
    if not images:
        raise ParityError(f"bundle {bundle.bundle_id} has no golden or calibration images: cannot verify "
                          f"backend {backend.name}", report)
    own_reference = reference is None
    if reference is None:
        from inspectd.engines.runtime.onnxruntime_backend import OnnxRuntimeBackend

        reference = OnnxRuntimeBackend(bundle, device="cpu")
    m = bundle.manifest.map
    display_range = max(m.display_hi - m.display_lo, 1e-12)
    try:
        for path, kind in images:
            # Golden/calibration images are stored already prepared (ROI cropped, resized).
            x = load_stored(path, bundle.input_spec)[None]
            ref_raw, ref_map = reference.infer(x)
            try:
                raw, amap = backend.infer(x)
            except Exception as exc:  # a backend that crashes on a golden image is refused, not fatal
                raise ParityError(f"backend {backend.name} failed on golden image {path.name}: "
                                  f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                                  report) from None
            ref_score, score = float(bundle.normalize(float(ref_raw[0]))), float(bundle.normalize(float(raw[0])))
            if amap.shape != ref_map.shape:
                raise ParityError(f"backend {backend.name}: anomaly map of shape {amap.shape} for {path.name}, "
                                  f"reference has {ref_map.shape}", report)
            # A NaN/inf on either side is no agreement: NaN would compare false against the tolerance
            # and vanish in max(), so it counts as an infinite difference.
            finite = math.isfinite(score) and math.isfinite(ref_score)
            diff = abs(score - ref_score) if finite else float("inf")
            # np.max propagates a NaN from either map; the check below turns it into inf.
            map_diff = float(np.max(np.abs(amap - ref_map))) / display_range if amap.size else 0.0
            if not math.isfinite(map_diff):
                map_diff = float("inf")
            report.rows.append(ParityRow(
                image=str(path.relative_to(bundle.path)) if bundle.path in path.parents else str(path),
                kind=kind, reference_score=ref_score, score=score, score_diff=diff, map_diff=map_diff,
                reference_verdict=_verdict(ref_score, threshold), verdict=_verdict(score, threshold)))
    finally:
        if own_reference:
            reference.close()
    if not report.passed:
        raise ParityError(report.summary(), report)
    log.info("parity gate passed: %s", report.summary())
    return report


def make_gate(bundle: Bundle, threshold: float | None = None, tolerance: float = SCORE_TOLERANCE,
              map_tolerance: float = MAP_TOLERANCE,
              on_report: Callable[[ParityReport], None] | None = None) -> Callable[[Backend], None]:
    """A `gate` for `open_backend`: raises ParityError (so the factory falls back) on failure."""

    def gate(backend: Backend) -> None:
        report = parity_gate(backend, bundle, threshold=threshold, tolerance=tolerance, map_tolerance=map_tolerance)
        if on_report is not None:
            on_report(report)

    return gate


def _diff(value: float) -> float:
    """A difference as the gate compares it: NaN (hand-built rows, old reports) is infinite, so
    max() over rows does not depend on where the NaN sits."""
    return float("inf") if math.isnan(value) else value


def _verdict(score: float, threshold: float | None) -> str | None:
    if threshold is None:
        return None
    # NaN scores are NG: the line fails safe (NaN > t is False, so say it explicitly).
    return "NG" if not np.isfinite(score) or score > threshold else "OK"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]
