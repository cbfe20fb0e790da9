"""Calibration outputs for people: report.json, histogram.png (matplotlib, imported lazily, Agg
canvas only, no pyplot global state) and a short terminal summary."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from inspectd.fileio import atomic_write, make_dirs

log = logging.getLogger("inspectd.calibration")

REPORT_JSON = "report.json"
HISTOGRAM_PNG = "histogram.png"
# Readable by the people who look at them, whatever root's umask (nothing secret in a report).
REPORT_MODE = 0o644


def write_report(folder: str | Path, report: dict[str, Any], good_scores: Sequence[float],
                 bad_scores: Sequence[float] | None) -> dict[str, Path | None]:
    """Write report.json and (if matplotlib is installed) histogram.png into `folder`."""
    out = make_dirs(folder)
    json_path = out / REPORT_JSON
    atomic_write(json_path, (json.dumps(report, indent=2) + "\n").encode("utf-8"), mode=REPORT_MODE)
    png_path: Path | None = out / HISTOGRAM_PNG
    try:
        png = histogram_png(good_scores, bad_scores, report)
    except ImportError as exc:
        log.warning("no histogram: matplotlib is not installed (%s); pip install 'inspectd[report]'", exc)
        png_path = None
    else:
        atomic_write(png_path, png, mode=REPORT_MODE)
    return {"json": json_path, "png": png_path}


def histogram_png(good_scores: Sequence[float], bad_scores: Sequence[float] | None,
                  report: dict[str, Any]) -> bytes:
    """Good and bad normalized-score histograms with the threshold and the targets marked."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    good = np.asarray(good_scores, dtype=np.float64)
    bad = np.asarray(bad_scores if bad_scores is not None else [], dtype=np.float64)
    both = np.concatenate([good, bad])
    bins = np.linspace(both.min(), both.max(), 61) if both.max() > both.min() else 10
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.hist(good, bins=bins, alpha=0.6, color="tab:green", label=f"good (n={good.size})")
    if bad.size:
        ax.hist(bad, bins=bins, alpha=0.6, color="tab:red", label=f"bad (n={bad.size})")
    fr = report["false_reject"]
    t = report["threshold"]
    ax.axvline(t, color="black", lw=2,
               label=f"threshold {t:.3f}: false reject <= {fr['target']:.2%} @ {fr['confidence']:.0%} "
                     f"(bound {fr['bound']:.2%})")
    esc = report.get("escape_at_threshold")
    if esc:
        ax.plot([], [], " ", label=f"escape at threshold {esc['rate']:.2%} "
                                   f"[{esc['ci_low']:.2%}, {esc['ci_high']:.2%}]")
    alt = report.get("escape_target")
    if alt:
        alt_t = alt["threshold"] if alt["threshold"] is not None else alt["empirical_threshold"]
        how = "" if alt["threshold"] is not None else " (empirical, too few bad for confidence)"
        ax.axvline(alt_t, color="tab:purple", ls="--",
                   label=f"escape target {alt['target']:.2%}: threshold {alt_t:.3f}{how}")
    auc = report.get("roc_auc")
    ax.set_title(f"line {report['line']} · bundle {report['bundle_id']}"
                 + (f" · image ROC AUC {auc:.4f}" if auc is not None else ""))
    ax.set_xlabel("normalized anomaly score (NG if > threshold)")
    ax.set_ylabel("images")
    ax.set_yscale("log")
    ax.legend(fontsize=8, loc="best", framealpha=0.85)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def format_summary(report: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    fr = report["false_reject"]
    lines = [
        f"line {report['line']}: threshold {report['threshold']:.4f} (normalized score; NG if above)",
        f"  false reject: target {fr['target']:.3%} @ {fr['confidence']:.0%} confidence, upper bound "
        f"{fr['bound']:.3%}, on calibration {fr['good_above']}/{fr['n_good']} good above the threshold",
    ]
    top = sorted((report.get("images") or {}).get("good") or [], key=lambda item: -item[1])
    at = [f"{name} {score:.4g}" for name, score in top if score >= report["threshold"] - 1e-6][:5]  # stored rounded
    if at:  # the order statistic the threshold is: a defect among these would have set it at its own score
        lines.append(f"  set by the highest good scores: {', '.join(at)} (look at {'them' if len(at) > 1 else 'it'}: "
                     f"a defective part among the good images sets the threshold at its own score)")
    esc = report.get("escape_at_threshold")
    if esc:
        lines.append(f"  escape (bad passed as OK): {esc['escapes']}/{esc['n_bad']} = {esc['rate']:.2%} "
                     f"(95% CI {esc['ci_low']:.2%} .. {esc['ci_high']:.2%}); image ROC AUC "
                     f"{report['roc_auc']:.4f}")
    alt = report.get("escape_target")
    if alt:
        if alt["threshold"] is not None:
            lines.append(f"  for escape <= {alt['target']:.2%} @ {alt['confidence']:.0%}: threshold "
                         f"{alt['threshold']:.4f}, false reject on calibration "
                         f"{alt['false_reject_at_threshold']:.2%}")
        lines.append(f"  for escape <= {alt['target']:.2%} (point estimate): threshold "
                     f"{alt['empirical_threshold']:.4f}, false reject on calibration "
                     f"{alt['false_reject_at_empirical']:.2%}"
                     + ("" if alt["threshold"] is not None else
                        f" (confidence needs >= {alt['needed_bad']} bad images)"))
    if report.get("overlap", {}).get("count"):
        lines.append(f"  WARNING: {report['overlap']['count']} calibration images overlap the training set "
                     f"(forced): rates are optimistic")
    return "\n".join(lines)
