"""The Source interface every frame producer implements (camera, replay), and its errors.

A Source is used by one acquisition thread only; it is not thread-safe and does not need to be.
"""

from __future__ import annotations

import logging

import abc
from dataclasses import dataclass

from inspectd.daemon.frame import Frame
from inspectd.errors import InspectdError

__all__ = ["Source", "SourceError", "SourceLost", "SourceStats"]


log = logging.getLogger("inspectd.sources")


class SourceError(InspectdError):
    """The source cannot be opened or configured (bad device, node write refused, unreadable file)."""


class SourceLost(SourceError):
    """The device went away while acquiring; the acquisition loop closes and reconnects."""


@dataclass
class SourceStats:
    """Counters since the last `open()` (they restart at zero on reopen)."""

    frames: int = 0               # frames returned by read()
    incomplete_frames: int = 0    # buffers delivered incomplete or with the wrong size, skipped
    skipped_by_camera: int = 0    # frames the camera numbered but never delivered (gaps in its frame ids)
    timeouts: int = 0             # read() calls that returned None because nothing arrived in time
    skipped_files: int = 0        # replay: files that could not be decoded, skipped


class Source(abc.ABC):
    """One frame producer for one line."""

    # A free-running camera delivers frames continuously, so a long silence without a driver error
    # means it is gone (a pulled GigE cable, a rebooted camera): the acquisition loop reconnects it.
    # A triggered camera (or a replay) may rightly be silent while no parts come.
    free_running: bool = False

    def __init__(self, line: str) -> None:
        self.line = line
        self.stats = SourceStats()
        # GenICam chunk values the line passes through (LineConfig.chunks): each frame's
        # meta["chunks"] holds every name, None when the source has no such value.
        self.chunk_names: tuple[str, ...] = ()
        self._chunks_warned: set[str] = set()

    def _chunk_missing(self, name: str, why: str) -> None:
        """Log once per chunk name that it is not delivered (its value is null in the verdicts)."""
        if name not in self._chunks_warned:
            self._chunks_warned.add(name)
            log.warning("line %s: chunk %s: %s; published as null", self.line, name, why)

    @abc.abstractmethod
    def open(self) -> None:
        """Connect and start delivering frames; SourceError with a clear message if it cannot."""

    @abc.abstractmethod
    def read(self, timeout_s: float) -> Frame | None:
        """The next frame, or None if none arrived within `timeout_s` (e.g. waiting for a trigger,
        or a replay that is exhausted). Raises SourceLost when the device is gone."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop and release everything; idempotent, safe after a failed open()."""

    @property
    def exhausted(self) -> bool:
        """True when the source will never deliver another frame (a replay at its end)."""
        return False

    def describe(self) -> str:
        """One line for logs: what this source reads from."""
        return type(self).__name__

    def __enter__(self) -> "Source":
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
