"""The window features are cut from, as code: `mcihn extract` (tools/extract.py, engines/media.py) cuts it at a
clip's end and the live pipeline (realtime/) at every tick, both with these functions, so a checkpoint sees live
the windows it was trained on. What the window is (its spans and counts) is recorded in the feature spec
(mcihn/spec.py `WindowSpec`); docs/design.md, "One window for training and serving".

- vision: frames are analysed on a grid of `frame_interval_s` of media time from the stream's start (`FrameGrid`:
  the first frame at or after each grid time), and the window holds the newest `vision_frames` of them captured
  within `vision_span_s` of its end (`frames_in_window`).
- audio: the newest `audio_samples` samples of the 16 kHz stream, resampled by engines/audio.py
  `StreamResampler` (`audio_in_window`; live, the AudioRing's last that-many samples).
- text: the words that ended within `text_horizon_s` of the newest one (`words_in_window`), or the whole utterance.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mcihn.spec import WindowSpec


class FrameGrid:
    """Which frames are analysed: one per `interval_s` of media time, on a grid from `start`. A frame is due when
    its time has reached the next grid time; after a gap the next frame is due at once and the grid resumes past
    it, never with a burst of frames."""

    def __init__(self, interval_s: float, start: float = 0.0):
        if interval_s <= 0:
            raise ValueError(f"the frame interval must be positive, got {interval_s} s")
        self.interval_s = interval_s
        self._next_due = start

    def due(self, t: float) -> bool:
        """Whether a frame of media time `t` (times given in order) is analysed; moves the grid on when it is."""
        if t < self._next_due:
            return False
        self._next_due += self.interval_s * (int((t - self._next_due) // self.interval_s) + 1)
        return True


def frames_in_window(times: Sequence[float], t_end: float, span_s: float, count: int) -> list[int]:
    """Indices (oldest first) of the analysed frames at `times` (oldest first) that are in the window ending at
    `t_end`: captured within `span_s` before it, the newest `count` of them."""
    inside = [i for i, t in enumerate(times) if t_end - t <= span_s]
    return inside[-count:] if count > 0 else []


def audio_in_window(samples_16k: np.ndarray, window: WindowSpec) -> np.ndarray:
    """The newest `window.audio_samples` of a 16 kHz stream (all of it when shorter)."""
    return samples_16k[-window.audio_samples:]


def words_in_window(ends: Sequence[float], horizon_s: float | None) -> int:
    """Index of the first word in the window, given the words' end times (oldest first): the words that ended
    within `horizon_s` of the newest one; None (the whole utterance): all of them."""
    if horizon_s is None or not ends:
        return 0
    newest = ends[-1]
    return next(i for i, end in enumerate(ends) if newest - end <= horizon_s)


def spread_word_ends(words: Sequence[str], start: float, end: float) -> list[float]:
    """End times for a transcript's words when none are known (a dataset's gold transcript): spread evenly over
    [start, end], the words' order kept. Only a seconds text horizon needs them (an approximation: real word
    alignments, where a dataset has them, would be better)."""
    n = len(words)
    return [start + (k + 1) * (end - start) / n for k in range(n)]


def transcript_in_window(transcript: str, window: WindowSpec, start: float, end: float) -> str:
    """A clip's transcript as the window at the clip's end holds it: the whole utterance, or with a seconds horizon
    the words that ended within it of the last one (times spread over [start, end]: `spread_word_ends`)."""
    if window.text_horizon_s is None:
        return transcript.strip()
    words = transcript.split()
    first = words_in_window(spread_word_ends(words, start, end), window.text_horizon_s)
    return " ".join(words[first:])


def window_for(vision_frames: int, audio_extractor, span_s: float = 2.56,
               text_horizon_s: float | None = None) -> WindowSpec:
    """The window for these extractors: `vision_frames` frames over `span_s` seconds, the audio extractor's full
    window (`window_samples`: its receptive field plus seq_len - 1 hops, so exactly seq_len Wav2Vec2 frames;
    41,040 samples for 128 frames), and the text horizon (None: the whole utterance)."""
    return WindowSpec(vision_span_s=float(span_s), vision_frames=int(vision_frames),
                      audio_samples=int(audio_extractor.window_samples),
                      text_horizon_s=None if text_horizon_s is None else float(text_horizon_s))
