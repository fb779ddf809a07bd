"""Bounded buffers between the capture threads and the workers (docs/design.md: bounded buffers everywhere).

- LatestFrame: one video slot; a new frame overwrites the old one (latest frame wins) and an overwritten frame
  that no consumer took is counted in `dropped`.
- AudioRing: a preallocated ring of 16 kHz mono float32 samples; overflow keeps the newest. Writers only copy,
  under a lock held for two slice assignments, so an audio thread never waits on a slow reader.
- StreamResampler (engines/audio.py, re-exported here): any input rate to 16 kHz, block by block, with the filter
  state carried between blocks, so the output equals `scipy.signal.resample_poly` of the whole stream. The one
  resampler of every audio path: microphone, pushed audio, file replay and `mcihn extract`.

Every timestamp is `time.monotonic()` seconds (the one clock of the live pipeline).
"""

from __future__ import annotations

import math
import threading
from typing import NamedTuple

import numpy as np

# Re-exported: the sources convert and resample every block with them.
from engines.audio import StreamResampler, to_mono_float32  # noqa: F401

SAMPLE_RATE = 16_000  # the rate of every model's audio input (Wav2Vec2, Whisper)


class FrameItem(NamedTuple):
    """A captured video frame: BGR uint8 (H, W, 3), its monotonic capture time and its sequence number (1, 2, ...).

    A NamedTuple so that `frame, t, seq = slot.get_new(seen)` also works.
    """

    frame_bgr: np.ndarray
    t_capture: float
    seq: int


class LatestFrame:
    """A thread-safe single frame slot: `put` overwrites, `get_new(seen_seq)` returns a frame newer than seen.

    A frame overwritten before any consumer took it is counted in `dropped` (the consumer was slower than the
    camera). Sequence numbers start at 1, so `get_new(0)` returns the first frame.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: FrameItem | None = None
        self._taken_seq = 0  # newest seq handed to a consumer
        self.seq = 0  # newest seq put
        self.dropped = 0

    def put(self, frame: np.ndarray, t: float) -> int:
        """Store `frame` captured at monotonic time `t`; returns its sequence number."""
        with self._cond:
            if self._item is not None and self._item.seq > self._taken_seq:
                self.dropped += 1
            self.seq += 1
            self._item = FrameItem(frame, t, self.seq)
            self._cond.notify_all()
            return self.seq

    @property
    def t_newest(self) -> float | None:
        """Capture time of the newest frame put, None before any."""
        item = self._item
        return None if item is None else item.t_capture

    def get_new(self, after_seq: int = 0) -> FrameItem | None:
        """The newest frame if its sequence number is above `after_seq`, else None (never blocks)."""
        with self._cond:
            return self._take(after_seq)

    def wait_new(self, after_seq: int = 0, timeout: float | None = None) -> FrameItem | None:
        """Like `get_new`, but waits up to `timeout` seconds for a newer frame."""
        with self._cond:
            self._cond.wait_for(lambda: self._item is not None and self._item.seq > after_seq, timeout)
            return self._take(after_seq)

    def _take(self, after_seq: int) -> FrameItem | None:
        item = self._item
        if item is None or item.seq <= after_seq:
            return None
        self._taken_seq = max(self._taken_seq, item.seq)
        return item


class AudioRing:
    """The last `capacity_s` seconds of 16 kHz mono float32 audio, stamped by the time of the newest sample.

    Only the monotonic time of the last written sample (`t_end`) is kept: sample j (counting from the first
    sample ever written) has time `t_end - (written - 1 - j) / rate`. That assumes the stream has no gaps, which
    holds for a device stream (a lost block shifts older samples' times by its length; live, only recent
    samples matter). `written` counts every sample ever written, so a reader that must see each sample once
    (the ASR worker) can use `read_from(index)` instead of times, which jitter with the callback's wake-ups.
    """

    def __init__(self, capacity_s: float = 30.0, rate: int = SAMPLE_RATE):
        if capacity_s <= 0:
            raise ValueError(f"the ring capacity must be positive, got {capacity_s} s")
        self.rate = rate
        self.capacity = int(round(capacity_s * rate))
        self._buf = np.zeros(self.capacity, np.float32)  # preallocated: writing never allocates
        self._lock = threading.Lock()
        self.written = 0  # samples written since creation (the ring holds the last min(written, capacity))
        self.t_end: float | None = None  # monotonic time of the newest sample; None before the first write

    def write(self, samples: np.ndarray, t_end: float) -> None:
        """Append mono samples whose last one was captured at monotonic time `t_end`. Copies only."""
        x = np.asarray(samples, dtype=np.float32).reshape(-1)
        n = x.shape[0]
        if n == 0:
            return
        if n > self.capacity:  # overflow keeps the newest
            x, skipped = x[n - self.capacity:], n - self.capacity
        else:
            skipped = 0
        with self._lock:
            start = (self.written + skipped) % self.capacity
            first = min(x.shape[0], self.capacity - start)
            self._buf[start:start + first] = x[:first]
            self._buf[:x.shape[0] - first] = x[first:]
            self.written += n
            # Callback wake-ups jitter; never let the newest sample's time go backwards.
            self.t_end = t_end if self.t_end is None else max(t_end, self.t_end)

    @property
    def available(self) -> int:
        """Samples currently held."""
        return min(self.written, self.capacity)

    def read_last(self, seconds: float, out: np.ndarray | None = None, now: float | None = None,
                  grace_s: float = 0.0) -> tuple[np.ndarray, float | None]:
        samples, t_end, _ = self.read_last_indexed(seconds, out, now, grace_s)
        return samples, t_end

    def read_last_indexed(self, seconds: float, out: np.ndarray | None = None, now: float | None = None,
                          grace_s: float = 0.0) -> tuple[np.ndarray, float | None, int]:
        """(a copy of the newest `seconds` of audio, or less when the ring holds less; time of its last sample).
        `now`: keep only samples captured within `seconds` before `now`, so audio that stopped arriving (a
        microphone unplugged, a stream that ended) ages out of the window instead of being read for ever;
        `grace_s`: how far the newest sample may lag `now` before that trimming starts (a device's block latency).
        `out`: a float32 array of at least that many samples to copy into (a view of it is returned).
        `read_last_indexed` also returns the absolute index just after the last sample (`written` then): where
        the window sits in the stream, for features computed incrementally."""
        with self._lock:
            n = min(max(0, int(round(seconds * self.rate))), self.available)
            if now is not None and self.t_end is not None:
                n = min(n, max(0, int(round((seconds - max(0.0, now - self.t_end - grace_s)) * self.rate))))
            return self._copy(self.written - n, self.written, out), self.t_end, self.written

    def read_since(self, t: float) -> tuple[np.ndarray, float | None]:
        """(the samples captured strictly after monotonic time `t` still held; time of the last sample)."""
        with self._lock:
            if self.t_end is None:
                return np.zeros(0, np.float32), None
            # Samples with time > t: those within (t_end - t) seconds of the newest, counting the newest.
            n = math.ceil((self.t_end - t) * self.rate - 1e-6)
            n = min(max(0, n), self.available)
            return self._copy(self.written - n, self.written), self.t_end

    def read_from(self, index: int) -> tuple[np.ndarray, int, float | None]:
        """(samples from absolute sample `index` on, the index to read from next time, time of the last sample).

        Samples already overwritten are skipped: the result starts at the oldest sample still held.
        """
        with self._lock:
            start = min(max(index, self.written - self.available), self.written)
            return self._copy(start, self.written), self.written, self.t_end

    def time_of(self, index: int) -> float | None:
        """Monotonic time of absolute sample `index` (derived from the newest sample's time)."""
        with self._lock:
            return None if self.t_end is None else self.t_end - (self.written - 1 - index) / self.rate

    def _copy(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Samples [start, stop) by absolute index, as a new array or into `out`; the caller holds the lock."""
        n = stop - start
        out = np.empty(n, np.float32) if out is None else out[:n]
        if n == 0:
            return out
        i = start % self.capacity
        first = min(n, self.capacity - i)
        out[:first] = self._buf[i:i + first]
        out[first:] = self._buf[:n - first]
        return out
