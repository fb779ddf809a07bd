"""Reading and writing audio-video files with PyAV: a whole clip for dataset extraction, or a stream of
timestamped video frames and audio blocks for a file source.

`decode_clip` reads a clip in one demux pass: the audio track is decoded in full (mono float32 at its native
rate), and of the video frames only those in the window at the clip's end (engines/window.py: the frames the live
pipeline would have analysed, replaying the clip) are converted to BGR arrays (the conversion, not the decoding,
is what costs). `write_clip` writes an mp4 with an AAC audio track, which
cv2.VideoWriter cannot do. Unreadable files raise `MediaError` with one line naming the file and the reason.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from mcihn.spec import WindowSpec


class MediaError(ValueError):
    """A media file that cannot be read (missing, corrupt, no streams); one line: the file and why."""


@dataclass
class Clip:
    """A decoded clip. frames: BGR uint8 (H, W, 3) arrays at `times` (media seconds), the frames of the window at
    the clip's end (oldest first); empty when the file has no video stream (or no decodable frame). audio: (n,)
    float32 mono in [-1, 1] at `sample_rate`, from media time `audio_start`, None when the file has no audio
    track (sample_rate is then 0). end: the media time of its newest frame or audio sample, where a live replay
    of the clip ends (the window's end)."""

    path: str
    frames: list[np.ndarray] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    audio: np.ndarray | None = None
    sample_rate: int = 0
    duration: float = 0.0
    has_video: bool = False  # a video stream exists (it may still have yielded no frame)
    audio_start: float = 0.0
    end: float = 0.0

    @property
    def has_audio(self) -> bool:
        return self.audio is not None


def _first_line(err: BaseException) -> str:
    """The reason alone: FFmpeg's message without PyAV's "[Errno N]" prefix and the repeated file name."""
    text = getattr(err, "strerror", None) or str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def open_media(path: str | os.PathLike):
    """av.open for reading, with MediaError (one line) instead of PyAV's and the OS's exceptions."""
    import av

    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{path}: no such file")
    try:
        return av.open(str(path))
    except (av.error.FFmpegError, OSError) as err:
        raise MediaError(f"{path}: cannot open as audio/video ({_first_line(err)})") from None


def _decoded(container, streams: list) -> Iterator:
    """Decoded frames of `streams` in demux order (av.VideoFrame / av.AudioFrame), with MediaError on failure."""
    import av

    try:
        for packet in container.demux(*streams):
            yield from packet.decode()
    except av.error.FFmpegError as err:
        raise MediaError(f"{container.name}: decoding failed ({_first_line(err)})") from None


class _MonoFloat:
    """Audio frames of any sample format/layout -> mono float32 blocks in [-1, 1] at the native rate."""

    def __init__(self, rate: int | None = None):
        import av

        # Planar float keeps channels apart, so mono is their plain mean (swresample's downmix scales by -3 dB).
        self.resampler = av.AudioResampler(format="fltp", rate=rate)

    def __call__(self, frame) -> list[np.ndarray]:
        """One frame's samples (frame None: flush)."""
        return [out.to_ndarray().mean(axis=0, dtype=np.float32) for out in self.resampler.resample(frame)]


class _AudioCollector:
    """A whole audio track as one mono float32 array."""

    def __init__(self, rate: int):
        self.rate = rate
        self.to_mono = _MonoFloat()
        self.blocks: list[np.ndarray] = []
        self.start: float | None = None  # media time of the first sample

    def add(self, frame) -> None:
        if self.start is None:
            self.start = float(frame.time) if frame.time is not None else 0.0
        self.blocks.extend(self.to_mono(frame))

    def finish(self) -> np.ndarray:
        self.blocks.extend(self.to_mono(None))
        return np.concatenate(self.blocks).astype(np.float32) if self.blocks else np.zeros(0, np.float32)


def decode_clip(path: str | os.PathLike, window: WindowSpec | None = None) -> Clip:
    """Decode `path` once: the video frames in `window` (default WindowSpec()) at the clip's end, picked as the live
    pipeline picks them (engines/window.py), and the whole audio track. Raises MediaError when the file cannot be
    opened or decoded, or has neither a video nor an audio stream."""
    import av

    window = window or WindowSpec()
    with open_media(path) as container:
        video = container.streams.video[0] if container.streams.video else None
        audio = container.streams.audio[0] if container.streams.audio else None
        if video is None and audio is None:
            raise MediaError(f"{path}: no video or audio stream")
        clip = Clip(path=str(path), has_video=video is not None)
        collector = _AudioCollector(audio.rate) if audio is not None and audio.rate else None
        picker = _WindowPicker(window) if video is not None else None
        if video is not None:
            video.thread_type = "AUTO"
        streams = [s for s in (video, audio) if s is not None]
        for frame in _decoded(container, streams):
            if isinstance(frame, av.VideoFrame):
                picker.add(frame)
            elif collector is not None:
                collector.add(frame)
        if collector is not None:
            clip.audio, clip.sample_rate = collector.finish(), collector.rate
            clip.audio_start = collector.start or 0.0
        video_end = picker.end if picker is not None else 0.0
        audio_end = clip.audio_start + len(clip.audio) / clip.sample_rate if clip.audio is not None else 0.0
        clip.end = max(video_end, audio_end)
        if picker is not None:
            clip.frames, clip.times = picker.finish(clip.end)
        clip.duration = max(container.duration / 1_000_000 if container.duration else 0.0, video_end, audio_end)
    return clip


class _WindowPicker:
    """Keeps, while frames stream past, the frames the live vision worker would analyse (engines/window.py
    `FrameGrid`), the newest `vision_frames` only, and converts at the end those in the window at the clip's end."""

    def __init__(self, window: WindowSpec):
        from engines.window import FrameGrid

        self.window = window
        self.grid = FrameGrid(window.frame_interval_s)
        self.kept: deque[tuple[float, object]] = deque(maxlen=window.vision_frames)
        self.prev_t: float | None = None
        self.end = 0.0

    def add(self, frame) -> None:
        # Frames without a timestamp: assume 25 fps after the previous one.
        t = float(frame.time) if frame.time is not None else (self.prev_t + 0.04 if self.prev_t is not None else 0.0)
        self.prev_t, self.end = t, max(self.end, t)
        if self.grid.due(t):
            self.kept.append((t, frame))

    def finish(self, t_end: float) -> tuple[list[np.ndarray], list[float]]:
        from engines.window import frames_in_window

        times = [t for t, _ in self.kept]
        chosen = [self.kept[i] for i in frames_in_window(times, t_end, self.window.vision_span_s,
                                                         self.window.vision_frames)]
        return [f.to_ndarray(format="bgr24") for _, f in chosen], [t for t, _ in chosen]


def iter_av(path: str | os.PathLike, video: bool = True, audio: bool = True,
            audio_rate: int | None = None) -> Iterator[tuple[float, str, np.ndarray]]:
    """(media time, "video" | "audio", data) in demux order: BGR uint8 frames at their presentation time, mono
    float32 audio blocks at `audio_rate` (default: the native rate), stamped with the time of their first
    sample; with `audio_rate`, resampled by engines/audio.py `StreamResampler` (flushed at the end: the blocks
    together are `to_16k_mono` of the whole track, what `mcihn extract` uses). For streaming consumers (the live
    file source); MediaError as decode_clip."""
    import av

    from engines.audio import StreamResampler

    with open_media(path) as container:
        streams = []
        if video and container.streams.video:
            streams.append(container.streams.video[0])
            streams[-1].thread_type = "AUTO"
        if audio and container.streams.audio:
            streams.append(container.streams.audio[0])
        if not streams:
            raise MediaError(f"{path}: no {'video or audio' if video and audio else 'video' if video else 'audio'} "
                             f"stream")
        to_mono = _MonoFloat()
        resampler: StreamResampler | None = None
        t = 0.0
        for frame in _decoded(container, streams):
            t = float(frame.time) if frame.time is not None else 0.0
            if isinstance(frame, av.VideoFrame):
                yield t, "video", frame.to_ndarray(format="bgr24")
                continue
            if resampler is None and audio_rate:
                resampler = StreamResampler(frame.sample_rate, audio_rate)
            for block in to_mono(frame):
                yield t, "audio", block if resampler is None else resampler.process(block)[0]
        if audio and container.streams.audio:  # the end of the track: what the converters still hold
            tail = to_mono(None)
            if resampler is not None:
                tail = [resampler.process(b)[0] for b in tail] + [resampler.flush()]
            for block in tail:
                yield t, "audio", block


def write_clip(path: str | os.PathLike, frames_bgr: Iterable[np.ndarray], fps: float,
               audio: np.ndarray | None = None, sample_rate: int = 16000, codec: str = "mpeg4",
               bit_rate: int = 4_000_000) -> Path:
    """Write BGR uint8 frames (all one even-sized H x W) and optional mono audio (float in [-1, 1], or int16)
    as a video file; the container follows the extension (.mp4: `codec` video + AAC audio). No frames and
    some audio: an audio-only file."""
    import av

    frames = [np.asarray(f) for f in frames_bgr]
    if not frames and audio is None:
        raise ValueError("write_clip needs frames, audio or both")
    h, w = frames[0].shape[:2] if frames else (0, 0)
    if any(f.shape != (h, w, 3) or f.dtype != np.uint8 for f in frames):
        raise ValueError(f"write_clip needs uint8 BGR frames of one shape (H, W, 3); the first is {frames[0].shape}")
    if h % 2 or w % 2:
        raise ValueError(f"frame size {w}x{h} must be even in both dimensions (yuv420p); crop or pad the frames")
    path = Path(path)
    with av.open(str(path), "w") as out:
        vstream = astream = None
        if frames:
            vstream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
            vstream.width, vstream.height, vstream.pix_fmt = w, h, "yuv420p"
            vstream.bit_rate = bit_rate  # the encoder default (~200 kb/s) blurs faces beyond detection
        if audio is not None:
            astream = out.add_stream("aac", rate=sample_rate, layout="mono")
        for i, frame in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(frame, format="bgr24")
            vf.pts = i
            out.mux(vstream.encode(vf))
        if vstream is not None:
            out.mux(vstream.encode(None))
        if astream is not None:
            samples = np.asarray(audio)
            if samples.dtype == np.int16:
                samples = samples.astype(np.float32) / 32768.0
            samples = np.ascontiguousarray(samples.reshape(-1), dtype=np.float32)
            step = astream.codec_context.frame_size or 1024  # AAC takes exactly frame_size samples per frame
            for start in range(0, len(samples), step):
                af = av.AudioFrame.from_ndarray(samples[None, start:start + step], format="fltp", layout="mono")
                af.sample_rate, af.pts = sample_rate, start
                out.mux(astream.encode(af))
            out.mux(astream.encode(None))
    return path
