"""Bounded buffers between the capture threads and the workers (docs/design.md: bounded buffers everywhere).

- LatestFrame: one video slot; a new frame overwrites the old one (latest frame wins) and an overwritten frame
  that no consumer took is counted in `dropped`.
- AudioRing: a preallocated ring of 16 kHz mono float32 samples; overflow keeps the newest. Writers only copy,
  under a lock held for two slice assignments, so an audio thread never waits on a slow reader.
- StreamResampler: any input rate to 16 kHz, block by block, with the filter state carried between blocks, so
  the output equals `scipy.signal.resample_poly` of the whole stream (no clicks at block edges).

Every timestamp is `time.monotonic()` seconds (the one clock of the live pipeline).
"""

from __future__ import annotations

import math
import threading
from typing import NamedTuple

import numpy as np

from engines.audio import to_mono_float32  # noqa: F401 - re-exported: the sources convert every block with it

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

    def read_last(self, seconds: float, out: np.ndarray | None = None,
                  now: float | None = None) -> tuple[np.ndarray, float | None]:
        samples, t_end, _ = self.read_last_indexed(seconds, out, now)
        return samples, t_end

    def read_last_indexed(self, seconds: float, out: np.ndarray | None = None,
                          now: float | None = None) -> tuple[np.ndarray, float | None, int]:
        """(a copy of the newest `seconds` of audio, or less when the ring holds less; time of its last sample).
        `now`: keep only samples captured within `seconds` before `now`, so audio that stopped arriving (a
        microphone unplugged, a stream that ended) ages out of the window instead of being read for ever.
        `out`: a float32 array of at least that many samples to copy into (a view of it is returned).
        `read_last_indexed` also returns the absolute index just after the last sample (`written` then): where
        the window sits in the stream, for features computed incrementally."""
        with self._lock:
            n = min(max(0, int(round(seconds * self.rate))), self.available)
            if now is not None and self.t_end is not None:
                n = min(n, max(0, int(round((seconds - (now - self.t_end)) * self.rate))))
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


class StreamResampler:
    """Resample a block stream from `in_rate` to `out_rate` (16 kHz), carrying the filter state across blocks.

    The same polyphase low-pass FIR as `scipy.signal.resample_poly` (Kaiser window, beta 5, 10 zero crossings per
    side), evaluated only at the output instants, so the concatenated output equals `resample_poly` of the whole
    stream. Output lags the input by half the filter (10 input samples of the slower side, under 1 ms), which
    `process` reflects in the time it returns. Not thread-safe: one resampler per stream.
    """

    _CHUNK = 4096  # outputs per vectorised step: bounds the (outputs x taps) gather for long pushed blocks

    def __init__(self, in_rate: float, out_rate: int = SAMPLE_RATE):
        if not in_rate or in_rate <= 0 or in_rate != int(in_rate):
            raise ValueError(f"the input sample rate must be a positive whole number of Hz, got {in_rate}")
        from scipy.signal import firwin

        self.in_rate, self.out_rate = int(in_rate), int(out_rate)
        g = math.gcd(self.in_rate, self.out_rate)
        self.up, self.down = self.out_rate // g, self.in_rate // g
        self._n_in = 0  # input samples consumed
        self._k = 0  # next output sample index
        if self.up == self.down == 1:
            return
        max_rate = max(self.up, self.down)
        self._delay = 10 * max_rate  # half the filter, in upsampled samples
        h = firwin(2 * self._delay + 1, 1.0 / max_rate, window=("kaiser", 5.0)) * self.up
        self._taps = -(-h.shape[0] // self.up)  # input samples under the filter for each output
        h = np.concatenate([h, np.zeros(self._taps * self.up - h.shape[0])])
        self._phases = h.reshape(self._taps, self.up).T.copy()  # [phase, m] = h[phase + m * up]
        self._hist = np.zeros(self._taps - 1)  # the last inputs (zeros before the stream, as resample_poly pads)

    @property
    def passthrough(self) -> bool:
        return self.up == self.down == 1

    def process(self, block: np.ndarray, t_end: float | None = None) -> tuple[np.ndarray, float | None]:
        """Resample one mono block; returns (output samples, monotonic time of the last output sample).

        `t_end` is the time of the block's last input sample; the output's last sample is a little older (the
        filter's lag). Returns None as the time when `t_end` is None or no output is ready yet.
        """
        x = np.asarray(block, dtype=np.float64).reshape(-1)
        if self.passthrough:
            self._n_in += x.shape[0]
            return x.astype(np.float32), t_end
        buf = np.concatenate([self._hist, x])  # buf[0] is input index n_in - (taps - 1)
        n_total = self._n_in + x.shape[0]
        # Output k needs inputs up to floor((k * down + delay) / up); emit every k whose inputs have arrived.
        k_end = max(self._k, (n_total * self.up - self._delay - 1) // self.down + 1)
        out = np.empty(k_end - self._k, np.float32)
        back = np.arange(self._taps)
        for c in range(self._k, k_end, self._CHUNK):
            p = np.arange(c, min(c + self._CHUNK, k_end)) * self.down + self._delay
            newest = p // self.up
            local = (newest - self._n_in + self._taps - 1)[:, None] - back[None, :]
            out[c - self._k:c - self._k + p.shape[0]] = np.einsum(
                "kt,kt->k", self._phases[p - newest * self.up], buf[local])
        self._hist = buf[buf.shape[0] - (self._taps - 1):]
        self._n_in, self._k = n_total, k_end
        if t_end is None or out.shape[0] == 0:
            return out, None
        # The last output sits at input position (k_end - 1) * down / up.
        lag = (n_total - 1 - (k_end - 1) * self.down / self.up) / self.in_rate
        return out, t_end - lag
