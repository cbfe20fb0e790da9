"""Small helpers shared by the daemon and reliability tests."""

from __future__ import annotations

import threading
import time

from inspectd.daemon.frame import Verdict


class Collector:
    """The pipeline's emit(): records each verdict with its arrival time."""

    def __init__(self) -> None:
        self.verdicts: list[Verdict] = []
        self.arrived_ns: list[int] = []
        self._cond = threading.Condition()

    def __call__(self, v: Verdict) -> None:
        with self._cond:
            self.verdicts.append(v)
            self.arrived_ns.append(time.time_ns())
            self._cond.notify_all()

    def wait_for(self, n: int, timeout_s: float = 20.0) -> list[Verdict]:
        end = time.monotonic() + timeout_s
        with self._cond:
            while len(self.verdicts) < n:
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"only {len(self.verdicts)} of {n} verdicts within {timeout_s} s")
                self._cond.wait(left)
            return list(self.verdicts)


def sample(metrics: object, name: str, **labels: str) -> float:
    """A metric's current value in the daemon's own registry (0 when the series does not exist yet)."""
    value = metrics.registry.get_sample_value(name, labels)  # type: ignore[attr-defined]
    return 0.0 if value is None else value
