"""How long the daemon's Python threads could not run.

A thread sleeps `interval_s` in a loop and reports how late it woke. A C call that keeps the GIL
while it blocks (a camera SDK waiting inside its driver: genicam's GenTL calls do) or a CPU taken by
other processes delays every thread of the daemon, the inference worker and the deadline thread
included. Exported as `inspectd_interpreter_stall_seconds`, such stalls are seen as what they are
instead of only as deadline misses and a slow engine.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

INTERVAL_S = 0.01  # 100 wake-ups a second: stalls of a few ms and up are what cost deadlines


class StallWatch:
    """`observe(late_s)` is called from the watch's own thread after every wake-up."""

    def __init__(self, observe: Callable[[float], None], interval_s: float = INTERVAL_S) -> None:
        self._observe = observe
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stall-watch", daemon=True)

    def start(self) -> "StallWatch":
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 1.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def __enter__(self) -> "StallWatch":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while True:
            asleep = time.monotonic()
            if self._stop.wait(self._interval_s):
                return
            self._observe(max(time.monotonic() - asleep - self._interval_s, 0.0))
