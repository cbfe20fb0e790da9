"""Where a finished Verdict goes. The pipeline's worker and its deadline keeper both hand each
verdict, exactly once, to one `VerdictSink`; `run.py` wires the line's sinks (publisher,
metrics, archive, drift) into a `Sinks` fan-out in one place.

A sink's `accept()` is called from the worker or the deadline thread and must be quick (hand
slow work to its own thread, as the publisher and the archive do). `Sinks` isolates failures:
a sink that raises is logged (once per run of failures) and counted, and the others still get
the verdict.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any, Callable, Protocol, runtime_checkable

from inspectd.daemon.frame import Verdict

log = logging.getLogger("inspectd.sinks")

__all__ = ["VerdictSink", "Sinks", "CallbackSink", "PublisherSink", "MetricsSink", "ArchiveSink",
           "DriftSink", "as_sink"]


@runtime_checkable
class VerdictSink(Protocol):
    def accept(self, verdict: Verdict) -> None:
        """Take one finished verdict (never called twice for a frame)."""


class CallbackSink:
    """A plain callable `f(verdict)` as a sink (tests, embedding programs)."""

    def __init__(self, fn: Callable[[Verdict], None]) -> None:
        self.fn = fn

    def accept(self, verdict: Verdict) -> None:
        self.fn(verdict)


def as_sink(target: VerdictSink | Callable[[Verdict], None]) -> VerdictSink:
    if isinstance(target, VerdictSink):
        return target
    if callable(target):
        return CallbackSink(target)
    raise TypeError(f"expected a VerdictSink or a callable, got {type(target).__name__}")


class Sinks:
    """Fan-out to named sinks; one failing sink never keeps a verdict from the others."""

    def __init__(self, sinks: list[tuple[str, VerdictSink]] | None = None) -> None:
        self._sinks: list[tuple[str, VerdictSink]] = list(sinks or [])
        self.failures: dict[str, int] = {name: 0 for name, _ in self._sinks}
        self._failing: set[str] = set()
        self._lock = threading.Lock()  # failure bookkeeping from two threads

    def add(self, name: str, sink: VerdictSink | Callable[[Verdict], None]) -> "Sinks":
        self._sinks.append((name, as_sink(sink)))
        self.failures.setdefault(name, 0)
        return self

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self._sinks]

    def accept(self, verdict: Verdict) -> None:
        for name, sink in self._sinks:
            try:
                sink.accept(verdict)
            except Exception:
                with self._lock:
                    self.failures[name] += 1
                    first = name not in self._failing
                    self._failing.add(name)
                if first:  # log the first of a run of failures, not every frame
                    log.exception("line %s: verdict sink %s failed (frame %s)", verdict.line, name,
                                  verdict.frame_id)
                continue
            if name in self._failing:
                with self._lock:
                    self._failing.discard(name)
                log.info("line %s: verdict sink %s works again", verdict.line, name)


class PublisherSink:
    """Verdicts (and heatmaps, per the line's `heatmap.publish`) to the ZeroMQ publisher."""

    def __init__(self, publisher: Any, mode: str, encoding: str, size: tuple[int, int]) -> None:
        self.publisher, self.mode, self.encoding, self.size = publisher, mode, encoding, size

    def accept(self, verdict: Verdict) -> None:
        # Without the frame: the publisher's queue may hold thousands of verdicts, not their images.
        verdict = dataclasses.replace(verdict, frame=None, anomaly_map=None)
        self.publisher.publish_verdict(verdict)
        # The pipeline may make a heatmap for the archive only: publish per the line's setting.
        if verdict.heatmap is not None and (self.mode == "all" or (self.mode == "ng" and verdict.verdict == "NG")):
            self.publisher.publish_heatmap(verdict, encoding=self.encoding, size=self.size)


class MetricsSink:
    """inspectd_frames_total, deadline misses and the score histogram. (End-to-end latency is
    observed by the publisher when the message is really sent.)"""

    def __init__(self, metrics: Any) -> None:
        self.metrics = metrics

    def accept(self, verdict: Verdict) -> None:
        self.metrics.observe_verdict(verdict.line, verdict.verdict, verdict.score, verdict.deadline_missed)


class ArchiveSink:
    """NG parts (or all, per `archive.save`) to the NG archive; needs `verdict.frame`."""

    def __init__(self, archive: Any, save: str) -> None:
        self.archive, self.save = archive, save

    def accept(self, verdict: Verdict) -> None:
        if verdict.frame is not None and (verdict.verdict == "NG" or self.save == "all"):
            self.archive.submit(verdict.frame, verdict)


class DriftSink:
    """OK scores to the drift watch (compared with the calibration's good scores)."""

    def __init__(self, drift: Any, metrics: Any | None = None) -> None:
        """`drift`: a DriftWatch, or a callable giving the one for a verdict (or None: no drift
        reference for it), so that each recipe's scores meet their own calibration."""
        self._drift, self.metrics = drift, metrics

    def accept(self, verdict: Verdict) -> None:
        if verdict.verdict != "OK" or verdict.score is None:
            return
        drift = self._drift(verdict) if callable(self._drift) else self._drift
        if drift is None:
            return
        drift.update(verdict.score)
        value = drift.value()
        if value is not None and self.metrics is not None:
            self.metrics.score_drift.labels(line=verdict.line).set(value)
