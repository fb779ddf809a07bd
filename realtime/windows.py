"""Sliding windows over the live streams, each holding work already done (docs/design.md: work is done once).

- VisionWindow: the last N frame embeddings (each frame embedded once, as it enters), with face boxes.
- TextWindow: the text features of the committed ASR words, re-encoded only when those words change.
The audio window is the AudioRing itself (realtime/buffers.py): its last W seconds are read at each tick.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from engines.extractor import Features
from engines.window import frames_in_window
from realtime.remote import ServerError


@dataclass
class EmbeddedFrame:
    """One frame after the vision extractor: embedding (D,) or None when no face was found."""

    t_capture: float
    embedding: np.ndarray | None
    face: tuple[int, int, int, int] | None
    extract_ms: float


class VisionWindow:
    """The last `seq_len` embedded frames within `span_s` seconds of the newest; thread-safe."""

    def __init__(self, seq_len: int, dim: int, span_s: float):
        self.seq_len, self.dim, self.span_s = seq_len, dim, span_s
        self._frames: deque[EmbeddedFrame] = deque(maxlen=seq_len)
        self._lock = threading.Lock()

    def add(self, frame: EmbeddedFrame) -> None:
        with self._lock:
            self._frames.append(frame)

    def snapshot(self, now: float, out: np.ndarray | None = None) -> tuple[Features, EmbeddedFrame | None]:
        """The window as MCIHN input (frames with a face, oldest first) and the newest frame seen. `out`: a
        (seq_len, dim) float32 array to fill instead of a new one."""
        with self._lock:
            held = list(self._frames)
        # The rule `mcihn extract` applies at a clip's end (engines/window.py), so the two windows agree.
        frames = [held[i] for i in frames_in_window([f.t_capture for f in held], now, self.span_s, self.seq_len)]
        faces = [f for f in frames if f.embedding is not None]
        if out is None:
            out = np.zeros((self.seq_len, self.dim), np.float32)
        for i, f in enumerate(faces):  # at most seq_len: the deque holds no more
            out[i] = f.embedding
        out[len(faces):] = 0.0
        newest = frames[-1] if frames else None
        info = {"faces": [list(f.face) for f in faces if f.face is not None], "frames": len(frames)}
        return Features(out, len(faces), info), newest


class TextWindow:
    """Text features of the committed words, encoded when the words change, by whoever changes them (the ASR
    thread), so a tick only picks up the latest features: no encoder run on the tick path."""

    def __init__(self, extractor):
        self.extractor = extractor
        self._lock = threading.Lock()
        self._text = ""
        self._features: Features = extractor.extract("")  # absent (length 0) until words are committed
        self._version = 0
        self.encode_ms = 0.0
        self.encodes = 0
        self.t_spoken: float | None = None  # when the newest committed word ended (the ASR's clock)

    def update(self, text: str, t_spoken: float | None = None) -> None:
        """Encode `text` if it differs from the current words (called on the ASR thread). `t_spoken`: the end
        time of the newest word, from which the words' age (and expiry) is counted."""
        if t_spoken is not None:
            self.t_spoken = t_spoken
        if text == self._text:
            return
        start = time.perf_counter()
        try:
            features = self.extractor.extract(text)
        except ServerError:  # the inference server is down (reported once): text absent, encoded again on change
            with self._lock:
                self._text, self._features = "", Features(np.zeros_like(self._features.values), 0)
                self._version += 1
            return
        with self._lock:
            self._text, self._features = text, features
            self._version += 1
            self.encode_ms = (time.perf_counter() - start) * 1e3
            self.encodes += 1

    def latest(self) -> tuple[str, Features, int, float]:
        """(words, their features, version: +1 per encode, ms the encode took)."""
        with self._lock:
            return self._text, self._features, self._version, self.encode_ms
