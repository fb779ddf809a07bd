"""Offline replay (speed 0): a file as fast as it decodes, stepped by media time, so no tick is skipped and the
scores do not depend on the machine's speed (offline scoring of a recording).

One thread does, in media-time order, what the live threads do concurrently: it reads the file (what FileSource
does live), offers each frame to the same VisionWorker, writes the audio into the same AudioRing and steps the same
ASR worker, and calls the same tick at every hop of media time. The MediaClock it advances is the session's "now"
(realtime/clock.py), so the stages apply the same rules as live; `capture_to_emit` is then in media time and
excludes processing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from realtime.buffers import AudioRing
from realtime.clock import MediaClock
from realtime.faults import Faults
from realtime.vision_worker import VisionWorker


class OfflineReplay:
    """Replays `source` through the stages on its own thread; `done` is set at the end of the file or on an error
    (which ends the session with its one line, as a broken file does live)."""

    def __init__(self, source: str, hop_s: float, clock: MediaClock, ring: AudioRing, vision: VisionWorker | None,
                 asr, tick: Callable[[float], None], faults: Faults, stop: threading.Event, done: threading.Event):
        self.source, self.hop_s, self.clock, self.ring = source, hop_s, clock, ring
        self.vision, self.asr, self.tick, self.faults = vision, asr, tick, faults
        self._stop, self._done = stop, done
        self.latest_frame: np.ndarray | None = None  # the newest frame read (the overlay draws it)
        self._thread = threading.Thread(target=self._run, name="mcihn-offline", daemon=True)

    def start(self) -> OfflineReplay:
        self._thread.start()
        return self

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        from realtime.file_source import media_items

        next_tick = self.hop_s
        try:
            for t, kind, data in media_items(self.source):
                if self._stop.is_set():
                    return
                self.clock.advance(t)
                if kind == "video":
                    self.latest_frame = data
                    if self.vision is not None:
                        self.vision.offer(data, t)
                else:
                    self.ring.write(data, t)
                    self._step_asr()
                while self.clock.now() >= next_tick:
                    self.tick(next_tick)
                    next_tick += self.hop_s
        except Exception as err:  # noqa: BLE001 - reported like the tick thread's errors
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            self.faults.end_with_error(f"{reason}; the replay ended early" if str(self.source) in reason
                                       else f"{self.source}: {reason}; the replay ended early")
        finally:
            self._done.set()

    def _step_asr(self) -> None:
        """What the ASR worker's thread does live, once per audio block; a failure is reported as it is there, and
        the replay goes on without text."""
        if self.asr is None or self.asr.error is not None:
            return
        try:
            self.asr.step()
        except Exception as err:  # noqa: BLE001 - as the ASR thread: go on without text
            self.asr.error = err
            self.faults.asr_failed(err)
