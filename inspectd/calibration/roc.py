"""Moved to `inspectd.stats` (shared with the daemon); re-exported for existing imports."""

from inspectd.stats import midranks, roc_auc, roc_curve

__all__ = ["roc_auc", "roc_curve", "midranks"]
