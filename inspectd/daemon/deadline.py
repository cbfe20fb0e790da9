"""Every frame is resolved exactly once: by its inference result or, failing that, at its deadline.

The keeper runs its own thread so the deadline fires even while the inference call is blocked;
`claim()` is the single atomic decision point both sides go through.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from typing import Callable

from inspectd.daemon.frame import Frame

log = logging.getLogger("inspectd.deadline")

# on_miss(frame, reason): publish the fail-safe verdict for a frame whose deadline passed.
MissCallback = Callable[[Frame, str], None]


class DeadlineKeeper:
    """One thread with a heap of (deadline_mono, frame). First of result / timeout wins."""

    def __init__(self, on_miss: MissCallback, name: str = "deadline") -> None:
        self._on_miss = on_miss
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, int]] = []  # (deadline_mono, tie-break, frame_id)
        self._pending: dict[int, Frame] = {}
        self._tie = itertools.count()
        self._stopping = False
        self.misses = 0          # frames resolved by the deadline
        self.late_results = 0    # results that arrived after their frame was resolved
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> "DeadlineKeeper":
        self._thread.start()
        return self

    def register(self, frame: Frame, deadline_mono: float, key: int | None = None) -> int:
        """Start the clock for `frame` (call at acquisition). `key` (default: frame_id) is what
        `claim` takes; the pipeline passes its own counter so a camera that restarts its frame
        ids after a reconnect cannot collide with frames still in flight."""
        key = frame.frame_id if key is None else key
        with self._cond:
            stopping = self._stopping
            if not stopping and key in self._pending:
                raise ValueError(f"frame key {key} is already registered")
            if not stopping:
                self._pending[key] = frame
                heapq.heappush(self._heap, (deadline_mono, next(self._tie), key))
                # Wake the thread only if this deadline is now the earliest one.
                if self._heap[0][2] == key:
                    self._cond.notify()
        if stopping:
            # Registered after stop() (a read that ended during shutdown): resolve it now, so
            # that no frame is left without a verdict.
            self._fire(frame, "shutdown before a result")
        return key

    def claim(self, frame_id: int, result: bool = True) -> bool:
        """True if the caller now owns the verdict for `frame_id` (the key given to `register`);
        False if it was already resolved (by the deadline): the caller must not publish.
        `result=False` for a fail-safe claim (a drop, an error): losing it is no late result."""
        with self._cond:
            if self._pending.pop(frame_id, None) is not None:
                # The heap entry stays; the thread skips keys that are no longer pending.
                if not self._pending:
                    self._cond.notify_all()  # wake wait_idle()
                return True
            if result:
                self.late_results += 1
            return False

    def is_pending(self, frame_id: int) -> bool:
        """Still waiting for a result (lets a backlogged worker skip frames already resolved)."""
        with self._cond:
            return frame_id in self._pending

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no frame is pending (each gets its result or its deadline). True if idle."""
        end = time.monotonic() + timeout_s
        with self._cond:
            while self._pending:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
            return True

    def stop(self, timeout_s: float = 2.0) -> None:
        """Let pending frames resolve (up to `timeout_s`), fail-safe the rest, end the thread."""
        self.wait_idle(timeout_s)
        with self._cond:
            self._stopping = True
            leftovers = list(self._pending.values())
            self._pending.clear()
            self._heap.clear()
            self._cond.notify_all()
        for frame in leftovers:
            self._fire(frame, "shutdown before a result")
        if self._thread.is_alive():
            self._thread.join(timeout=1.0)

    def _run(self) -> None:
        while True:
            due: list[Frame] = []
            with self._cond:
                while not self._stopping:
                    # Drop heap entries already claimed by a result.
                    while self._heap and self._heap[0][2] not in self._pending:
                        heapq.heappop(self._heap)
                    if not self._heap:
                        self._cond.wait()
                        continue
                    left = self._heap[0][0] - time.monotonic()
                    if left > 0:
                        self._cond.wait(left)
                        continue
                    now = time.monotonic()
                    while self._heap and self._heap[0][0] <= now:
                        _, _, frame_id = heapq.heappop(self._heap)
                        frame = self._pending.pop(frame_id, None)
                        if frame is not None:
                            due.append(frame)
                    if due:
                        self._cond.notify_all()  # wait_idle() may be watching
                        break
                if self._stopping and not due:
                    return
            for frame in due:
                self.misses += 1
                self._fire(frame, "deadline")

    def _fire(self, frame: Frame, reason: str) -> None:
        try:
            self._on_miss(frame, reason)
        except Exception:  # a failing callback must not stop the clock for later frames
            log.exception("line %s: fail-safe verdict for frame %s failed", frame.line, frame.frame_id)
