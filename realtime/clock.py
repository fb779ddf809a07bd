"""The session's clock: where "now" comes from, and how it maps to media time (the events' `t_media`).

Live (a camera, a microphone, pushed input, or a file replayed at a positive speed) the clock is
`time.monotonic()`, with which every source stamps what it captures; a file source at speed s delivers media time
t at t0 + t / s, so one clock second is s media seconds. Offline (speed 0) the replay loop is the clock: "now" is
the media time of the newest item it read, so a slow machine gives the same events as a fast one.

This is the one difference between live and offline replay: the stages (vision worker, ASR, tick) read the same
windows by the same rules and ask the clock for "now", never `time.monotonic()` themselves.
"""

from __future__ import annotations

import time


class WallClock:
    """`time.monotonic()`; media time 0 at `t0` (the session's start, or a file source's), `rate` media seconds per
    clock second (a file's replay speed; 1 for devices)."""

    def __init__(self, t0: float | None = None, rate: float = 1.0):
        self.t0 = time.monotonic() if t0 is None else t0
        self.rate = rate

    def now(self) -> float:
        return time.monotonic()

    def media_time(self, t: float) -> float:
        """The media time of clock time `t`."""
        return (t - self.t0) * self.rate

    def span(self, media_s: float) -> float:
        """How many clock seconds `media_s` seconds of media take (a hop, the vision worker's interval)."""
        return media_s / self.rate


class MediaClock(WallClock):
    """Offline replay: now is the newest media time read so far (moved by `advance`), and media time is clock time."""

    def __init__(self) -> None:
        super().__init__(t0=0.0, rate=1.0)
        self._now = 0.0

    def now(self) -> float:
        return self._now

    def advance(self, t: float) -> None:
        """An item of media time `t` was read (items come in time order, give or take: now never goes back)."""
        self._now = max(self._now, t)
