"""DeadlineKeeper: exactly-once resolution, firing while the result side is blocked."""

from __future__ import annotations

import threading
import time

import numpy as np

from inspectd.daemon.deadline import DeadlineKeeper
from inspectd.daemon.frame import Frame


def _frame(frame_id: int) -> Frame:
    return Frame(line="L", frame_id=frame_id, acquired_ns=time.time_ns(), acquired_mono=time.monotonic(),
                 image=np.zeros((4, 4), np.uint8))


class _Recorder:
    def __init__(self) -> None:
        self.fired: list[tuple[int, str, float]] = []
        self.event = threading.Event()

    def __call__(self, frame: Frame, reason: str) -> None:
        self.fired.append((frame.frame_id, reason, time.monotonic()))
        self.event.set()


def test_deadline_fires_while_result_side_is_blocked() -> None:
    rec = _Recorder()
    keeper = DeadlineKeeper(rec).start()
    try:
        frame = _frame(1)
        deadline = time.monotonic() + 0.1
        keeper.register(frame, deadline)
        blocker = threading.Event()
        # The "inference" thread is stuck; the keeper must not depend on it.
        worker = threading.Thread(target=blocker.wait, args=(2.0,), daemon=True)
        worker.start()
        assert rec.event.wait(2.0), "deadline never fired"
        frame_id, reason, fired_at = rec.fired[0]
        assert (frame_id, reason) == (1, "deadline")
        assert deadline <= fired_at < deadline + 0.3
        blocker.set()
        # The late result loses and is counted, not published.
        assert keeper.claim(1) is False
        assert keeper.late_results == 1 and keeper.misses == 1
    finally:
        keeper.stop()


def test_result_before_deadline_wins_and_deadline_never_fires() -> None:
    rec = _Recorder()
    keeper = DeadlineKeeper(rec).start()
    try:
        keeper.register(_frame(7), time.monotonic() + 0.15)
        assert keeper.claim(7) is True
        assert keeper.claim(7) is False  # a second claimant never wins
        time.sleep(0.3)
        assert rec.fired == []
        assert keeper.misses == 0 and keeper.pending == 0
    finally:
        keeper.stop()


def test_out_of_order_deadlines_fire_in_deadline_order() -> None:
    rec = _Recorder()
    keeper = DeadlineKeeper(rec).start()
    try:
        now = time.monotonic()
        keeper.register(_frame(1), now + 0.30)
        keeper.register(_frame(2), now + 0.05)  # earlier deadline registered later: must wake the thread
        keeper.register(_frame(3), now + 0.15)
        assert keeper.wait_idle(2.0)
        assert [f[0] for f in rec.fired] == [2, 3, 1]
        assert rec.fired[0][2] < now + 0.05 + 0.3
    finally:
        keeper.stop()


def test_race_between_result_and_deadline_resolves_each_frame_once() -> None:
    rec = _Recorder()
    keeper = DeadlineKeeper(rec).start()
    won: list[int] = []
    try:
        base = time.monotonic()
        n = 300
        for i in range(n):
            keeper.register(_frame(i), base + 0.02 + (i % 10) * 0.002)

        def claimer() -> None:
            for i in range(n):
                time.sleep(0.0002)
                if keeper.claim(i):
                    won.append(i)

        t = threading.Thread(target=claimer)
        t.start()
        t.join(10)
        assert keeper.wait_idle(2.0)
        fired = [f[0] for f in rec.fired]
        assert sorted(won + fired) == list(range(n))  # every frame exactly once
        assert not set(won) & set(fired)
    finally:
        keeper.stop()


def test_stop_resolves_leftovers_and_callback_errors_do_not_stop_the_clock() -> None:
    calls: list[int] = []

    def flaky(frame: Frame, reason: str) -> None:
        calls.append(frame.frame_id)
        if frame.frame_id == 1:
            raise RuntimeError("publisher hiccup")

    keeper = DeadlineKeeper(flaky).start()
    now = time.monotonic()
    keeper.register(_frame(1), now + 0.02)
    keeper.register(_frame(2), now + 0.05)
    keeper.register(_frame(3), now + 60.0)  # far away: stop() must resolve it, not wait for it
    time.sleep(0.3)
    t0 = time.monotonic()
    keeper.stop(timeout_s=0.2)
    assert time.monotonic() - t0 < 2.0
    assert sorted(calls) == [1, 2, 3]
    assert keeper.pending == 0


def test_a_frame_registered_after_stop_still_gets_its_verdict_at_once() -> None:
    """A read that ends during shutdown registers its frame after the keeper stopped: it is
    resolved right away ("shutdown before a result"), never left without a verdict."""
    rec = _Recorder()
    keeper = DeadlineKeeper(rec).start()
    keeper.register(_frame(1), time.monotonic() + 10.0)
    keeper.stop(timeout_s=0.05)
    assert [(f, r) for f, r, _ in rec.fired] == [(1, "shutdown before a result")]
    t0 = time.monotonic()
    keeper.register(_frame(2), time.monotonic() + 10.0)
    assert [(f, r) for f, r, _ in rec.fired][1:] == [(2, "shutdown before a result")]
    assert rec.fired[1][2] - t0 < 0.5 and keeper.pending == 0
    assert keeper.claim(2) is False  # nobody can publish it a second time
