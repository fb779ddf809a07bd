"""The tick clock: call `tick()` every hop on one thread; a tick due while the previous one still runs is skipped.

Skipped ticks are counted, never queued, so when inference is slower than the hop the update rate drops but
latency cannot grow over a long session (docs/design.md, data flow).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable


class Ticker:
    """Runs `tick(t_due)` at t0 + k * hop for k = 0, 1, 2, ... until stopped.

    When a tick returns after the next ticks were due, those are skipped (counted in `skipped`) and the clock
    resumes at the next due time still in the future: a tick never starts late by more than one hop's worth of
    stale work, and work never piles up.
    """

    def __init__(self, hop_s: float, tick: Callable[[float], None], clock: Callable[[], float] = time.monotonic,
                 name: str = "mcihn-tick"):
        if hop_s <= 0:
            raise ValueError(f"the hop must be positive, got {hop_s} s")
        self.hop_s = hop_s
        self._tick = tick
        self._clock = clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.ticks = 0
        self.skipped = 0
        self.error: BaseException | None = None

    def start(self) -> Ticker:
        self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def next_due(self, last_due: float, now: float) -> tuple[float, int]:
        """The first due time after `last_due` still in the future at `now`, and how many were skipped."""
        missed = max(0, math.floor((now - last_due) / self.hop_s))
        return last_due + (missed + 1) * self.hop_s, missed

    def _run(self) -> None:
        due = self._clock()
        while not self._stop.is_set():
            wait = due - self._clock()
            if wait > 0 and self._stop.wait(wait):
                break
            try:
                self._tick(due)
            except BaseException as err:  # noqa: BLE001 - reported by the owner, which decides to stop
                self.error = err
                break
            self.ticks += 1
            due, skipped = self.next_due(due, self._clock())
            self.skipped += skipped
