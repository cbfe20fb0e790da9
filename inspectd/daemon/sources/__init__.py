"""Frame sources: `make_source` builds the one a line's config asks for. Camera drivers are
imported only when a line uses them (harvesters loads native GenTL code)."""

from __future__ import annotations

from typing import Any

from inspectd.daemon.sources.base import Source, SourceError, SourceLost, SourceStats

__all__ = ["Source", "SourceError", "SourceLost", "SourceStats", "make_source"]


def make_source(line_cfg: Any, line_id: str | None = None) -> Source:
    """A Source for a LineConfig (or a bare source config plus `line_id`), not yet opened."""
    source_cfg = getattr(line_cfg, "source", line_cfg)
    line = line_id if line_id is not None else getattr(line_cfg, "id", None)
    if line is None:
        raise SourceError("make_source needs a line id (pass a LineConfig or line_id=)")
    kind = getattr(source_cfg, "type", None)
    source: Source
    if kind == "genicam":
        from inspectd.daemon.sources.genicam import GenicamSource
        source = GenicamSource.from_config(source_cfg, line)
    elif kind == "replay":
        from inspectd.daemon.sources.replay import ReplaySource
        source = ReplaySource.from_config(source_cfg, line)
    else:
        source = None  # type: ignore[assignment]
    if source is not None:
        source.chunk_names = tuple(getattr(line_cfg, "chunks", None) or ())
        return source
    raise SourceError(f"line {line}: unknown source type {kind!r} (expected genicam or replay)")
