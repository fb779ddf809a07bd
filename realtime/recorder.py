"""`--record DIR`: save the session's video (video.mp4, frames at their capture times), audio (audio.wav, 16 kHz
mono int16, as fused) and events (events.jsonl), so that `--source DIR` replays the session.

The recorder reads the same LatestFrame and AudioRing the recognizer reads, on its own thread; the wav file is
valid after every block (the header is rewritten on close, and Python's wave module patches sizes as it goes),
so a crash loses at most the last fraction of a second.
"""

from __future__ import annotations

import threading
import wave
from fractions import Fraction
from pathlib import Path

import numpy as np

from realtime.buffers import SAMPLE_RATE, AudioRing, LatestFrame
from realtime.file_source import RECORD_AUDIO, RECORD_VIDEO
from realtime.sources import SourceError


class Recorder:
    """Writes new frames and audio samples to `folder` until stopped."""

    def __init__(self, folder: str | Path, frames: LatestFrame, ring: AudioRing, poll_s: float = 0.02):
        self.folder = Path(folder)
        self.frames, self.ring, self.poll_s = frames, ring, poll_s
        self.video_frames = 0
        self.audio_samples = 0
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mcihn-record", daemon=True)

    def start(self) -> Recorder:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._wav = wave.open(str(self.folder / RECORD_AUDIO), "wb")
        except OSError as err:
            raise SourceError(f"cannot record into {self.folder}: {err.strerror or err}") from None
        self._wav.setnchannels(1)
        self._wav.setsampwidth(2)
        self._wav.setframerate(SAMPLE_RATE)
        self._container = self._stream = None
        self._t0: float | None = None
        self._audio_index = self.ring.written
        self._seen = self.frames.seq
        self._thread.start()
        return self

    def _open_video(self, frame: np.ndarray) -> None:
        import av

        self._container = av.open(str(self.folder / RECORD_VIDEO), "w")
        self._stream = self._container.add_stream("mpeg4", rate=30)
        self._stream.width, self._stream.height = frame.shape[1] // 2 * 2, frame.shape[0] // 2 * 2
        self._stream.pix_fmt = "yuv420p"
        # Presentation times in ms, so frames keep their capture times (variable frame rate).
        self._stream.time_base = self._stream.codec_context.time_base = Fraction(1, 1000)
        self._stream.bit_rate = 2_000_000

    def _write_frame(self, frame: np.ndarray, t: float) -> None:
        import av

        if self._container is None:
            self._open_video(frame)
        size = (self._stream.width, self._stream.height)
        if (frame.shape[1], frame.shape[0]) != size:
            import cv2

            frame = cv2.resize(frame, size)
        video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="bgr24")
        pts = int(round((t - self._t0) * 1000))
        if pts <= self._last_pts:
            return  # two frames within a millisecond: keep the first
        video_frame.pts, self._last_pts = pts, pts
        for packet in self._stream.encode(video_frame):
            self._container.mux(packet)
        self.video_frames += 1

    _last_pts = -1

    def _drain(self) -> None:
        item = self.frames.get_new(self._seen)
        if item is not None:
            self._seen = item.seq
            if self._t0 is None:
                self._t0 = item.t_capture
            self._write_frame(item.frame_bgr, item.t_capture)
        samples, self._audio_index, _ = self.ring.read_from(self._audio_index)
        if len(samples):
            pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2")
            self._wav.writeframes(pcm.tobytes())
            self.audio_samples += len(pcm)

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.poll_s):
                self._drain()
            self._drain()
        except Exception as err:  # noqa: BLE001 - a full disk must not stop the recognizer
            self.error = f"recording stopped: {str(err).splitlines()[0] if str(err) else type(err).__name__}"

    def stop(self, timeout: float = 1.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._container is not None:
            for packet in self._stream.encode():
                self._container.mux(packet)
            self._container.close()
            self._container = None
        if getattr(self, "_wav", None) is not None:
            self._wav.close()
            self._wav = None


def recorded_seconds(folder: str | Path) -> float:
    """Audio seconds in a recording folder (for messages and tests)."""
    with wave.open(str(Path(folder) / RECORD_AUDIO), "rb") as wav:
        return wav.getnframes() / wav.getframerate()

