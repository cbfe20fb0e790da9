"""Is a line failing its parts safe? A sliding window over the outcomes of its verdicts.

A line whose camera and engine are up can still give many of its parts the fail-safe verdict:
deadlines missed (an overloaded box), the queue full (a camera faster than the engine), frames the
bundle cannot judge (a camera reconfigured to another size or to mono). Those parts are rejected, not inspected. The
heartbeat then says "failing_safe" (with why), so a reject gate stops trusting the line as a whole
instead of reading "ok" while it scraps every part; the counters and alerts say how many.

Entering takes a quarter of the last 5 s of parts, and at least 5 (a late part now and then is not a
failing line; a camera faster than the engine that loses 40 % of its parts is); leaving takes the
share back to a twentieth, or no fail-safe verdict for a whole window (a triggered line that went
quiet), so the state does not flap at a share near the threshold.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable

log = logging.getLogger("inspectd.pipeline")

WINDOW_S = 5.0
MIN_FAILED = 5          # fewer fail-safe verdicts than this in the window never make a failing line
ENTER_SHARE = 0.25      # at least this share of the window's verdicts failed safe: failing
LEAVE_SHARE = 0.05      # at most this share (or none in the window): no longer failing
MAX_EVENTS = 100_000    # bounds the window at absurd frame rates (20 kHz for 5 s)


class FailSafeRate:
    """`record()` every verdict (any thread); `reason()` is None while the line is not failing safe.
    Each change is one log line (entering: an error naming why; leaving: info)."""

    def __init__(self, line: str, window_s: float = WINDOW_S, min_failed: int = MIN_FAILED,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._line = line
        self._window_s = window_s
        self._min_failed = min_failed
        self._clock = clock
        self._events: collections.deque[tuple[float, bool]] = collections.deque(maxlen=MAX_EVENTS)
        self._failed = 0            # fail-safe verdicts among self._events
        self._last_why: str | None = None
        self._failing = False
        self._lock = threading.Lock()

    def record(self, failed: bool, why: str | None = None) -> None:
        """One verdict's outcome."""
        now = self._clock()
        with self._lock:
            if len(self._events) == self._events.maxlen and self._events[0][1]:
                self._failed -= 1  # about to fall out of the bounded window
            self._events.append((now, failed))
            if failed:
                self._failed += 1
                self._last_why = why
            self._prune(now)
            self._update()

    def reason(self) -> str | None:
        """Why the line is failing its parts safe, in one line that stays the same while the cause
        does (a reject gate acts on a change); None when it is not failing."""
        now = self._clock()
        with self._lock:
            self._prune(now)
            self._update(may_enter=False)  # entering is record()'s: a verdict does it
            if not self._failing:
                return None
            return self._last_why or "fail-safe verdicts"  # the last part's reason

    def _counts(self) -> str:
        why = f" (last: {self._last_why})" if self._last_why else ""
        return (f"{self._failed} of the last {len(self._events)} parts ({self._window_s:g} s) got the "
                f"fail-safe verdict{why}")

    def _update(self, may_enter: bool = True) -> None:
        if self._failing and self._failed <= LEAVE_SHARE * len(self._events):
            self._failing = False
            log.info("line %s judges its parts again (no longer failing safe)", self._line)
        elif (not self._failing and may_enter and self._failed >= self._min_failed
              and self._failed >= ENTER_SHARE * len(self._events)):
            self._failing = True
            log.error("line %s is failing its parts safe: %s; its heartbeat says failing_safe until they are "
                      "judged again", self._line, self._counts())

    def _prune(self, now: float) -> None:
        while self._events and now - self._events[0][0] > self._window_s:
            if self._events.popleft()[1]:
                self._failed -= 1
