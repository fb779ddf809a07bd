"""The file source: a video file with its audio track (PyAV), or a folder written by `--record`, replayed into the
same LatestFrame and AudioRing the camera and microphone fill.

Media time t maps onto the monotonic clock as t0 + t / speed: at speed 1 frames and audio arrive as a live
device would deliver them (the benchmark's "paced like a live camera"); a higher speed replays faster.
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
import time
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from realtime.buffers import SAMPLE_RATE, AudioRing, LatestFrame
from realtime.sources import Source, SourceError

RECORD_VIDEO, RECORD_AUDIO, RECORD_EVENTS = "video.mp4", "audio.wav", "events.jsonl"
RECORD_TIMING, RECORD_FORMAT = "recording.json", "mcihn-recording"  # how audio.wav and video.mp4 line up


def _container_items(path: Path, video: bool = True, audio: bool = True) -> Iterator[tuple[float, str, np.ndarray]]:
    """(media time, "video"|"audio", data) in media-time order: BGR frames at their presentation time, 16 kHz
    mono float32 audio blocks at the time of their last sample (what a live microphone's block stamp means),
    resampled by the one StreamResampler (engines/media.py `iter_av`), so the ring ends up holding what
    `mcihn extract` cuts from the same file."""
    from engines.media import MediaError, iter_av

    def stamped() -> Iterator[tuple[float, str, np.ndarray]]:
        audio_t = None
        for t, kind, data in iter_av(path, video=video, audio=audio, audio_rate=SAMPLE_RATE):
            if kind == "video":
                yield t, kind, data
                continue
            audio_t = (t if audio_t is None else audio_t) + len(data) / SAMPLE_RATE  # counted: no drift
            yield audio_t, kind, data

    try:
        yield from in_time_order(stamped())
    except MediaError as err:
        raise SourceError(f"cannot read {err}") from None


def in_time_order(items: Iterator[tuple[float, str, np.ndarray]],
                  max_lead_s: float = 2.0) -> Iterator[tuple[float, str, np.ndarray]]:
    """Demux order -> media-time order. Containers interleave streams loosely (an MP4 may hold the first 0.6 s
    of video before any audio): replayed in demux order, the audio would stall for that long, which a live
    device never does. Each stream is in order by itself, so an item is released once every stream has shown
    a later time; a stream that runs more than `max_lead_s` ahead (the other one sparse or ended) releases
    anyway, which bounds the frames held."""
    heap: list[tuple[float, int, str, np.ndarray]] = []
    newest: dict[str, float] = {}
    for n, (t, kind, data) in enumerate(items):
        heapq.heappush(heap, (t, n, kind, data))  # n: ties keep demux order and never compare arrays
        newest[kind] = max(t, newest.get(kind, t))
        horizon = min(newest.values()) if len(newest) > 1 else -np.inf
        lead = max(newest.values()) - max_lead_s
        while heap and heap[0][0] <= max(horizon, lead):
            t0, _, k0, d0 = heapq.heappop(heap)
            yield t0, k0, d0
    while heap:
        t0, _, k0, d0 = heapq.heappop(heap)
        yield t0, k0, d0


def _wav_items(path: Path, block_s: float = 0.02) -> Iterator[tuple[float, str, np.ndarray]]:
    """A 16-bit mono wav (written by --record) in blocks, at the time of each block's last sample."""
    from realtime.buffers import StreamResampler, to_mono_float32

    with wave.open(str(path), "rb") as wav:
        rate, channels = wav.getframerate(), wav.getnchannels()
        resampler = StreamResampler(rate)
        step, t = int(rate * block_s), 0.0
        while chunk := wav.readframes(step):
            block = np.frombuffer(chunk, dtype=np.int16).reshape(-1, channels)
            t += len(block) / rate
            samples, _ = resampler.process(to_mono_float32(block))
            yield t, "audio", samples
        yield t, "audio", resampler.flush()  # the file's end: the whole file resampled, as `mcihn extract` does


def recording_offsets(folder: str | Path) -> tuple[float, float]:
    """(video, audio) start times of a --record folder on one media timeline that starts at 0: the recorder
    saves when the first audio sample came relative to the first frame (recording.json, realtime/recorder.py).
    A folder without it (an older recording, or only one of the two streams) starts both at 0."""
    path = Path(folder) / RECORD_TIMING
    if not path.is_file():
        return 0.0, 0.0
    try:
        timing = json.loads(path.read_text())
        offset = float(timing["audio_offset_s"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SourceError(f"{path} is unreadable ({err}); delete it to replay audio and video unaligned") from None
    if not math.isfinite(offset):
        raise SourceError(f"{path} has an invalid audio_offset_s {offset}; delete it to replay unaligned")
    return max(0.0, -offset), max(0.0, offset)


def _shifted(items: Iterator[tuple[float, str, np.ndarray]], by: float) -> Iterator[tuple[float, str, np.ndarray]]:
    return ((t + by, kind, data) for t, kind, data in items) if by else items


def media_items(path: str | Path) -> Iterator[tuple[float, str, np.ndarray]]:
    """Items of a video file, or of a recording folder (video.mp4 + audio.wav, aligned by recording.json), in
    media-time order."""
    path = Path(path)
    if path.is_dir():
        video, audio = path / RECORD_VIDEO, path / RECORD_AUDIO
        if not video.is_file() and not audio.is_file():
            raise SourceError(f"{path} is a folder without {RECORD_VIDEO} or {RECORD_AUDIO}; pass a video file or a "
                              f"folder written by --record")
        video_start, audio_start = recording_offsets(path)
        parts = []
        if video.is_file():
            parts.append(_shifted(_container_items(video, audio=False), video_start))
        if audio.is_file():
            parts.append(_shifted(_wav_items(audio), audio_start))
        return heapq.merge(*parts, key=lambda item: item[0])
    if not path.is_file():
        raise SourceError(f"video file {path} does not exist")
    return _container_items(path)


def check_media(path: str | Path) -> None:
    """Raise SourceError (one line) unless `path` can be opened and yields at least one frame or audio block."""
    items = media_items(path)
    if next(iter(items), None) is None:
        raise SourceError(f"{path} holds no frames and no audio")
    if hasattr(items, "close"):
        items.close()


class FileSource(Source):
    """Replays a file into `frames` and `ring` on its own thread, paced at `speed` x real time.

    `t0` is the monotonic time of media time 0 (set at start); `media_time(t_mono)` maps back. `finished` is set
    at the end of the file (or `loop` starts it over, shifted to continue the timeline).
    """

    kind = "file"

    def __init__(self, path: str | Path, frames: LatestFrame | None = None, ring: AudioRing | None = None,
                 speed: float = 1.0, loop: bool = False):
        super().__init__(f"file {path}")
        if speed <= 0:
            raise ValueError(f"replay speed must be positive, got {speed}")
        self.path, self.speed, self.loop = Path(path), speed, loop
        self.frames = frames if frames is not None else LatestFrame()
        self.ring = ring if ring is not None else AudioRing()
        self.t0 = 0.0
        self.duration = 0.0  # media seconds replayed so far
        self.finished = False
        self.video_frames = 0
        self._items: Iterator | None = None

    def _open(self) -> None:
        self._items = media_items(self.path)  # raises SourceError for a missing or unreadable file
        self._first = next(self._items, None)  # decode errors in the header show up here, before the thread
        if self._first is None:
            raise SourceError(f"{self.path} holds no frames and no audio")
        self.t0 = time.monotonic()

    def media_time(self, t_mono: float) -> float:
        return (t_mono - self.t0) * self.speed

    # A looped file up to this size is kept decoded in memory: reopening it stalls delivery for a moment, which a
    # benchmark would count as pipeline latency at every loop.
    LOOP_CACHE_BYTES = 512 * 2**20

    def _run(self) -> None:
        offset = 0.0
        items = itertools.chain([self._first], self._items)
        cache: list | None = [] if self.loop else None  # filled on the first pass only
        recording, cached_bytes = self.loop, 0
        while True:
            for t_media, kind, data in items:
                if self._stop.is_set():
                    return
                self._deliver(offset + t_media, kind, data)
                if recording and cache is not None:
                    cache.append((t_media, kind, data))
                    cached_bytes += data.nbytes
                    if cached_bytes > self.LOOP_CACHE_BYTES:
                        cache = None  # too big to keep: reopen the file at each loop instead
            if not self.loop or self._stop.is_set():
                break
            recording = False
            offset = self.duration
            items = iter(cache) if cache is not None else media_items(self.path)
        self.finished = True

    def _deliver(self, t_media: float, kind: str, data: np.ndarray) -> None:
        t_mono = self.t0 + t_media / self.speed
        wait = t_mono - time.monotonic()
        if wait > 0 and self._stop.wait(wait):
            return
        if kind == "video":
            self.frames.put(data, t_mono)
            self.video_frames += 1
        else:
            self.ring.write(data, t_mono)
        self.duration = max(self.duration, t_media)
