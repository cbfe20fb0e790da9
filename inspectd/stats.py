"""Statistics shared by calibration, evaluation and the daemon (numpy only, never torch):

- rank statistics: ROC AUC in the Mann-Whitney form (ties count half), the ROC curve, mid-ranks;
- score drift: the two-sample Kolmogorov-Smirnov statistic and `DriftWatch`, the rolling KS of a
  line's OK scores against the calibration's good scores (exported as `inspectd_score_drift{line}`).
  Per-frame cost is O(1) (a ring-buffer write); the KS statistic (a sort of the window) is
  recomputed only every `every` updates.

This module is neutral ground: `inspectd.calibration` and `inspectd.daemon` both import it, and
neither imports the other for statistics.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from inspectd.errors import ConfigError, DataError

__all__ = ["roc_auc", "roc_curve", "midranks", "ks_statistic", "DriftWatch"]


def roc_auc(negatives: np.ndarray, positives: np.ndarray) -> float:
    """P(positive score > negative score) + 0.5 P(equal): the Mann-Whitney form of ROC AUC."""
    neg = np.asarray(negatives, dtype=np.float64).ravel()
    pos = np.asarray(positives, dtype=np.float64).ravel()
    if neg.size == 0 or pos.size == 0:
        raise ValueError("ROC AUC needs at least one negative and one positive score")
    ranks = midranks(np.concatenate([neg, pos]))
    r_pos = ranks[neg.size:].sum()
    return float((r_pos - pos.size * (pos.size + 1) / 2.0) / (pos.size * neg.size))


def roc_curve(negatives: np.ndarray, positives: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate, thresholds), thresholds descending."""
    scores = np.concatenate([negatives, positives]).astype(np.float64)
    labels = np.concatenate([np.zeros(len(negatives)), np.ones(len(positives))])
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    distinct = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    tps = np.cumsum(labels)[distinct]
    fps = (distinct + 1) - tps
    tpr = np.r_[0.0, tps / max(labels.sum(), 1)]
    fpr = np.r_[0.0, fps / max((1 - labels).sum(), 1)]
    return fpr, tpr, np.r_[np.inf, scores[distinct]]


def midranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    sorted_vals = values[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_vals)) + 1]
    ends = np.r_[starts[1:], values.size]
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def ks_statistic(a: Any, b: Any) -> float:
    """Two-sample KS statistic sup_x |F_a(x) - F_b(x)| (exact for ties: evaluated at every sample)."""
    a = np.sort(np.asarray(a, dtype=np.float64).reshape(-1))
    b = np.sort(np.asarray(b, dtype=np.float64).reshape(-1))
    if a.size == 0 or b.size == 0:
        raise DataError("the KS statistic needs two non-empty samples")
    return _ks_sorted(a, b)


def _ks_sorted(a: np.ndarray, b: np.ndarray) -> float:
    # Both ECDFs are right-continuous step functions that only jump at sample values, so the
    # supremum is attained at one of them.
    points = np.concatenate([a, b])
    fa = np.searchsorted(a, points, side="right") / a.size
    fb = np.searchsorted(b, points, side="right") / b.size
    return float(np.max(np.abs(fa - fb)))


class DriftWatch:
    """Rolling KS drift of one line's OK scores against the calibration good scores.

    `update(score)` is called by the line's inference worker for each OK frame; `value()` may be
    read from any thread (metrics). `value()` is None until `min_samples` scores have arrived.
    """

    def __init__(self, reference_scores: Any, window: int = 500, min_samples: int = 50,
                 every: int = 25) -> None:
        ref = np.asarray(reference_scores, dtype=np.float64).reshape(-1)
        ref = ref[np.isfinite(ref)]
        if ref.size == 0:
            raise DataError("drift watch: no finite reference scores")
        if window < 1 or not 1 <= min_samples <= window or every < 1:
            raise ConfigError(f"drift watch: need window >= min_samples >= 1 and every >= 1 "
                              f"(got window={window}, min_samples={min_samples}, every={every})")
        self._ref = np.sort(ref)
        self.window = int(window)
        self.min_samples = int(min_samples)
        self.every = int(every)
        self._buf = np.empty(self.window, dtype=np.float64)
        self._count = 0          # scores seen in total (the ring position is count % window)
        self._since = 0          # updates since the last KS computation
        self._value: float | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_calibration(cls, path: str | os.PathLike, **kwargs: Any) -> "DriftWatch":
        """From a calibration JSON written by `inspectd calibrate` (its `good_scores`). The
        window only holds OK scores, so the reference is cut at the threshold too."""
        p = Path(path)
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{p}: unreadable calibration file ({exc})") from None
        return cls.from_calibration_data(data, p, **kwargs)

    @classmethod
    def from_calibration_data(cls, data: Any, source: str | os.PathLike, **kwargs: Any) -> "DriftWatch":
        """From a calibration file's parsed JSON (`source` names it in errors); see from_calibration."""
        scores = data.get("good_scores") if isinstance(data, dict) else None
        if not isinstance(scores, list) or not scores:
            raise ConfigError(f"{source}: calibration file has no good_scores list (needed for drift)")
        ref = np.asarray(scores, dtype=np.float64)
        threshold = data.get("threshold")
        if isinstance(threshold, (int, float)):
            kept = ref[ref <= threshold]
            ref = kept if kept.size else ref
        return cls(ref, **kwargs)

    @property
    def count(self) -> int:
        return self._count

    def update(self, score: float) -> None:
        """Add one OK score (non-finite scores are ignored: they are engine errors, not drift)."""
        s = float(score)
        if not np.isfinite(s):
            return
        with self._lock:
            self._buf[self._count % self.window] = s
            self._count += 1
            self._since += 1
            n = min(self._count, self.window)
            # Recompute on the first full-enough window, then every `every` updates.
            if n >= self.min_samples and (self._value is None or self._since >= self.every):
                self._value = _ks_sorted(np.sort(self._buf[:n]), self._ref)
                self._since = 0

    def value(self) -> float | None:
        """Latest KS statistic in [0, 1], or None before `min_samples` OK scores."""
        with self._lock:
            return self._value

    def reset(self) -> None:
        """Forget the window (e.g. after a recalibration or a bundle change)."""
        with self._lock:
            self._count = 0
            self._since = 0
            self._value = None
