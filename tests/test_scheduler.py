"""The tick clock: skips (and counts) ticks that fall due while one is running, never queues them."""

from __future__ import annotations

import threading

import pytest

from realtime.scheduler import Ticker


class FakeClock:
    """A clock the test moves by hand (the ticks advance it)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(("elapsed", "due", "skipped"), [
    (0.1, 10.25, 0),   # finished within the hop: the next tick is the following slot
    (0.25, 10.5, 1),   # finished exactly at the next slot: that slot is skipped
    (0.6, 10.75, 2),   # overran two slots
    (0.0, 10.25, 0),
])
def test_next_due_skips_overrun_slots(elapsed, due, skipped):
    ticker = Ticker(0.25, lambda t: None)
    assert ticker.next_due(10.0, 10.0 + elapsed) == (pytest.approx(due), skipped)


def test_slow_ticks_are_skipped_not_queued():
    clock = FakeClock()
    dues: list[float] = []
    done = threading.Event()

    def tick(t_due: float) -> None:
        dues.append(t_due)
        clock.now = t_due + 0.6  # the wait reached t_due; the work takes 0.6 s of a 0.25 s hop
        if len(dues) == 5:
            done.set()

    ticker = Ticker(0.25, tick, clock=clock).start()
    assert done.wait(5)
    ticker.stop()
    assert not ticker.alive
    # Due times stay on the hop grid, 3 slots apart (2 skipped each time), never a backlog.
    steps = [round((b - a) / 0.25) for a, b in zip(dues, dues[1:], strict=False)]
    assert steps[:4] == [3, 3, 3, 3]
    assert ticker.skipped >= 8 and ticker.ticks >= 5


def test_tick_error_stops_and_is_reported():
    def tick(t_due: float) -> None:
        raise RuntimeError("boom")

    ticker = Ticker(0.01, tick).start()
    ticker._thread.join(2)
    assert isinstance(ticker.error, RuntimeError) and not ticker.alive


def test_bad_hop():
    with pytest.raises(ValueError, match="hop must be positive"):
        Ticker(0, lambda t: None)
