"""`--record DIR`: save the session's video (video.mp4, frames at their capture times), audio (audio.wav, 16 kHz
mono int16, as fused), the timing that aligns them (recording.json) and events (events.jsonl), so that
`--source DIR` replays the session.

The recorder reads the same LatestFrame and AudioRing the recognizer reads, on its own thread, and that thread
owns the files: it opens the video container, writes, flushes the encoder and closes everything (PyAV objects
are not to be used from two threads). The wav file is valid after every block (Python's wave module patches
its sizes as it goes), so a crash loses at most the last fraction of a second.

Timing: video.mp4's presentation times count from the first frame's capture time; the first audio sample was
captured `audio_offset_s` seconds after that frame (negative: before it). recording.json keeps that offset and
the file source applies it on replay (realtime/file_source.py, `recording_offsets`), so the audio and the video
stay as far apart as they were live.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import wave
from fractions import Fraction
from pathlib import Path

import numpy as np

from realtime.buffers import SAMPLE_RATE, AudioRing, LatestFrame
from realtime.file_source import RECORD_AUDIO, RECORD_FORMAT, RECORD_TIMING, RECORD_VIDEO
from realtime.sources import SourceError


class Recorder:
    """Writes new frames and audio samples to `folder` until stopped. `error` is one line when writing failed
    (the recording then stops; the recognizer goes on)."""

    def __init__(self, folder: str | Path, frames: LatestFrame, ring: AudioRing, poll_s: float = 0.02):
        self.folder = Path(folder)
        self.frames, self.ring, self.poll_s = frames, ring, poll_s
        self.video_frames = 0
        self.audio_samples = 0
        self.error: str | None = None
        self.t_video: float | None = None  # capture time of the first frame written (video time 0)
        self.t_audio: float | None = None  # capture time of the first audio sample written
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mcihn-record", daemon=True)
        self._wav: wave.Wave_write | None = None
        self._container = self._stream = None
        self._timing_written = False
        self._last_pts = -1

    @property
    def audio_offset_s(self) -> float | None:
        """When the first audio sample was captured, in seconds after the first frame (None: not both yet)."""
        if self.t_video is None or self.t_audio is None:
            return None
        return self.t_audio - self.t_video

    def start(self) -> Recorder:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._wav = wave.open(str(self.folder / RECORD_AUDIO), "wb")
        except OSError as err:
            raise SourceError(f"cannot record into {self.folder}: {err.strerror or err}") from None
        self._wav.setnchannels(1)
        self._wav.setsampwidth(2)
        self._wav.setframerate(SAMPLE_RATE)
        self._audio_index = self.ring.written
        self._seen = self.frames.seq
        self._thread.start()
        return self

    def stop(self, timeout: float = 1.0) -> None:
        """Ask the thread to write what is left and close the files; wait up to `timeout` s for it."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive() and self.error is None:
                self.error = (f"recording did not finish within {timeout:.1f} s; its files are closed when the "
                              "encoder is done")
        elif self._thread.ident is None and self._wav is not None:  # never started: nothing else touched it
            self._wav.close()
            self._wav = None

    # Everything below runs on the recorder's thread.

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.poll_s):
                self._drain()
            self._drain()
        except Exception as err:  # noqa: BLE001 - a full disk must not stop the recognizer
            self.error = f"recording stopped: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        finally:
            self._close()

    def _drain(self) -> None:
        item = self.frames.get_new(self._seen)
        if item is not None:
            self._seen = item.seq
            if self.t_video is None:
                self.t_video = item.t_capture
            self._write_frame(item.frame_bgr, item.t_capture)
        samples, self._audio_index, t_end = self.ring.read_from(self._audio_index)
        if len(samples):
            if self.t_audio is None and t_end is not None:  # t_end: the capture time of the last sample read
                self.t_audio = t_end - (len(samples) - 1) / SAMPLE_RATE
            pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2")
            self._wav.writeframes(pcm.tobytes())
            self.audio_samples += len(pcm)
        if not self._timing_written and self.audio_offset_s is not None:
            self._write_timing()

    def _write_timing(self) -> None:
        timing = {"format": RECORD_FORMAT, "version": 1, "audio_offset_s": round(self.audio_offset_s, 6)}
        path = self.folder / RECORD_TIMING
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(timing) + "\n")
        os.replace(tmp, path)
        self._timing_written = True

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
        pts = int(round((t - self.t_video) * 1000))
        if pts <= self._last_pts:
            return  # two frames within a millisecond: keep the first
        video_frame.pts, self._last_pts = pts, pts
        for packet in self._stream.encode(video_frame):
            self._container.mux(packet)
        self.video_frames += 1

    def _close(self) -> None:
        """Flush the encoder and close the files (on this thread, which made them). A failure here is kept as
        `error` unless an earlier one explains it."""
        container, self._container = self._container, None
        wav, self._wav = self._wav, None
        try:
            if container is not None:
                try:
                    for packet in self._stream.encode():
                        container.mux(packet)
                finally:
                    container.close()
            if wav is not None:
                wav.close()
        except Exception as err:  # noqa: BLE001 - as in _run: reported, never raised into the recognizer
            if self.error is None:
                self.error = f"recording stopped: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
            if wav is not None:
                with contextlib.suppress(Exception):
                    wav.close()


def recorded_seconds(folder: str | Path) -> float:
    """Audio seconds in a recording folder (for messages and tests)."""
    with wave.open(str(Path(folder) / RECORD_AUDIO), "rb") as wav:
        return wav.getnframes() / wav.getframerate()
