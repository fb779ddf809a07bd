"""Sliding windows over the live streams, each holding work already done (DESIGN.md: work is done once).

- VisionWindow: the last N frame embeddings (each frame embedded once, as it enters), with face boxes.
- TextWindow: the text features of the committed ASR words, re-encoded only when those words change.
The audio window is the AudioRing itself (realtime/buffers.py): its last W seconds are read at each tick.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import numpy as np

from engines.extractor import Features, pack_window


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

    def snapshot(self, now: float) -> tuple[Features, EmbeddedFrame | None]:
        """The window as MCIHN input (frames with a face, oldest first) and the newest frame seen."""
        with self._lock:
            frames = [f for f in self._frames if now - f.t_capture <= self.span_s]
        faces = [f for f in frames if f.embedding is not None]
        steps = np.stack([f.embedding for f in faces]) if faces else np.zeros((0, self.dim), np.float32)
        values, length = pack_window(steps, self.seq_len)
        newest = frames[-1] if frames else None
        info = {"faces": [list(f.face) for f in faces if f.face is not None], "frames": len(frames)}
        return Features(values, length, info), newest


class TextWindow:
    """Text features of the committed words; the encoder runs only when the words change."""

    def __init__(self, extractor):
        self.extractor = extractor
        self._text: str | None = None
        self._features: Features | None = None
        self.encode_ms = 0.0
        self.encodes = 0

    def features(self, text: str) -> tuple[Features, float]:
        """(features, milliseconds spent now: 0 when cached)."""
        import time

        if text == self._text and self._features is not None:
            return self._features, 0.0
        start = time.perf_counter()
        self._features = self.extractor.extract(text)
        self._text = text
        self.encode_ms = (time.perf_counter() - start) * 1e3
        self.encodes += 1
        return self._features, self.encode_ms
