"""Moved to `inspectd.stats` (shared with the daemon); re-exported for existing imports."""

from inspectd.stats import DriftWatch, ks_statistic

__all__ = ["DriftWatch", "ks_statistic"]
