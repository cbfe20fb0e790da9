"""FailSafeRate: when a line counts as failing its parts safe, and when it stops. The clock is a
plain counter the test advances (the window is wall time in the daemon)."""

from __future__ import annotations

import pytest

from inspectd.daemon.failsafe_rate import FailSafeRate


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _feed(rate: FailSafeRate, clock: Clock, outcomes: str, step_s: float = 0.05) -> list[bool]:
    """'x' = a fail-safe verdict, '.' = a judged part, one every `step_s`. Returns, after each,
    whether the line counts as failing safe."""
    failing = []
    for c in outcomes:
        clock.t += step_s
        rate.record(c == "x", "no result within 50 ms" if c == "x" else None)
        failing.append(rate.reason() is not None)
    return failing


def _changes(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "inspectd.pipeline"]


def test_a_late_part_now_and_then_is_not_a_failing_line(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    rate = FailSafeRate("l1", clock=clock)
    failing = _feed(rate, clock, ("." * 9 + "x") * 20)  # 10 % of 200 parts, 10 in every 5 s window
    assert not any(failing)
    failing = _feed(rate, clock, ("." * 4 + "x") * 40)  # 20 %
    assert not any(failing)
    # Four in a row are not enough either (fewer than five in the window).
    assert not any(_feed(rate, clock, "xxxx")) and not _changes(caplog)


def test_a_quarter_of_the_parts_failing_safe_enters_once_and_says_why(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    rate = FailSafeRate("l1", clock=clock)
    failing = _feed(rate, clock, "." * 15 + "x" * 5)
    assert failing == [False] * 19 + [True]  # the fifth fail-safe verdict, a quarter of the window
    reason = rate.reason()
    assert reason == "no result within 50 ms"  # the last fail-safe verdict's reason
    # A share between the thresholds does not flap: a tenth failing keeps the line failing, and the
    # reason stays the same line (a reject gate acts on each change).
    assert all(_feed(rate, clock, ("." * 9 + "x") * 20)) and rate.reason() == reason
    said = _changes(caplog)
    assert len(said) == 1 and said[0].startswith("line l1 is failing its parts safe: 5 of the last 20 parts"), said


def test_judged_parts_again_leave_it_and_a_quiet_line_leaves_it_after_one_window(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="inspectd.pipeline")
    clock = Clock()
    rate = FailSafeRate("l1", clock=clock)
    _feed(rate, clock, "x" * 20)
    failing = _feed(rate, clock, "." * 200)  # 10 s of judged parts
    assert failing[0] and not failing[-1]
    # Left when the 20 have fallen to a twentieth of the window (100 parts in 5 s).
    assert 90 <= failing.index(False) <= 100
    # Failing again after a pause, then the parts stop coming (a triggered line): over after one window.
    clock.t += 6.0
    assert all(_feed(rate, clock, "x" * 10)[4:])
    clock.t += 5.1
    assert rate.reason() is None
    said = _changes(caplog)
    assert [m.split(":")[0].split(" (")[0] for m in said] == [
        "line l1 is failing its parts safe", "line l1 judges its parts again",
        "line l1 is failing its parts safe", "line l1 judges its parts again"], said
