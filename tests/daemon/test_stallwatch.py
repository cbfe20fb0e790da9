"""StallWatch sees the time no Python thread could run: a C call that keeps the GIL (here a builtin
summing in C, as a camera SDK blocking in its driver does), and nothing much while threads sleep."""

from __future__ import annotations

import time

from inspectd.daemon.stallwatch import StallWatch


def _held_gil_for_s(n: int) -> float:
    start = time.monotonic()
    sum(range(n))  # a C loop that never gives the GIL up
    return time.monotonic() - start


def test_a_call_that_keeps_the_gil_is_seen_and_quiet_time_is_not() -> None:
    n = 1_000_000
    while _held_gil_for_s(n) < 0.2:  # about 0.2 s of GIL held, whatever this CPU's speed
        n *= 2
    quiet: list[float] = []
    with StallWatch(quiet.append, interval_s=0.005):
        time.sleep(0.3)
    stalled: list[float] = []
    with StallWatch(stalled.append, interval_s=0.005):
        time.sleep(0.05)
        held = _held_gil_for_s(n)
        time.sleep(0.05)
    assert len(quiet) > 20 and sorted(quiet)[len(quiet) // 2] < 0.005, quiet
    assert max(stalled) > 0.8 * held, (max(stalled), held)


def test_stop_is_prompt_and_a_watch_never_started_stops_cleanly() -> None:
    StallWatch(lambda late: None).stop()
    watch = StallWatch(lambda late: None, interval_s=10.0).start()
    start = time.monotonic()
    watch.stop()
    assert time.monotonic() - start < 1.0
