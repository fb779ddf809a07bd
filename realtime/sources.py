"""Capture sources: camera, microphone and push (the host application feeds its own media).

Each device source runs in its own thread and stamps every item on arrival with `time.monotonic()`, the one
clock of the live pipeline (docs/design.md). Video goes into a `LatestFrame` slot (latest frame wins, drops
counted); audio is mixed to mono, resampled to 16 kHz and written into an `AudioRing`.

Faults are one line each (`SourceError` when a device cannot be opened; `source.error` when it stops during the
session, after which its thread ends and the app goes on with the modalities it still has).
"""

from __future__ import annotations

import collections
import contextlib
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from realtime.buffers import SAMPLE_RATE, AudioRing, FrameItem, LatestFrame, StreamResampler, to_mono_float32

__all__ = ["SAMPLE_RATE", "SourceError", "Source", "FrameItem", "CameraSource", "MicrophoneSource", "PushSource",
           "list_devices", "resolve_microphone"]

LIST_HINT = "list devices with mcihn-live --list-devices"
PORTAUDIO_MISSING = "sounddevice needs the PortAudio library: apt-get install libportaudio2"
_INT16_SCALE = np.float32(1 / 32768)
NO_MICROPHONE = "no microphone found (PortAudio sees no input device); connect one or run with --no-mic"


class SourceError(RuntimeError):
    """A capture device that cannot be used; the message is one line saying what and how to fix it."""


class Source:
    """A capture source with its own daemon thread: `start()`, `stop(timeout)`, `alive`, `error`.

    `start()` opens the device in the caller's thread (so a missing device raises `SourceError` at once) and then
    runs `_run` in the thread. A fault during the session sets `error` (one line) and ends the thread.
    """

    kind = "source"

    def __init__(self, name: str):
        self.name = name
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Source:
        if self._thread is not None:
            raise RuntimeError(f"{self.name} was already started")
        self._open()
        self._thread = threading.Thread(target=self._guarded_run, name=f"mcihn-{self.kind}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        """Ask the thread to finish and wait up to `timeout` seconds for it.

        A thread stuck in a hung driver call is left behind (it is a daemon) rather than blocking the app.
        """
        self._stop.set()
        thread = self._thread
        if thread is not None and thread.is_alive() and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> Source:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _guarded_run(self) -> None:
        try:
            self._run()
        except Exception as err:  # noqa: BLE001 - a capture thread must never die silently with a traceback
            self.error = f"{self.name} failed: {type(err).__name__}: {err}".splitlines()[0]

    # Subclasses implement these.
    def _open(self) -> None:
        pass

    def _run(self) -> None:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------------- camera


@contextlib.contextmanager
def _quiet_opencv() -> Iterator[None]:
    """Silence OpenCV's own log while probing devices: our one-line error replaces its multi-line noise."""
    import cv2

    old = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        cv2.utils.logging.setLogLevel(old)


def _camera_device(device: int | str) -> int | str:
    """An index stays an int (also when given as the digits "0" from the command line); a path or URL a str."""
    if isinstance(device, str) and device.strip().isdigit():
        return int(device)
    if isinstance(device, (int, str)) and not isinstance(device, bool):
        return device
    raise ValueError(f"a camera is an index, a file path or a URL, got {device!r}")


class CameraSource(Source):
    """`cv2.VideoCapture` on a device index, a video file or a stream URL; frames go into a `LatestFrame`.

    The thread reads as fast as the device delivers and stamps each frame with `time.monotonic()` as `read()`
    returns. `width`, `height` and `fps` are requests (the driver may pick the nearest mode it has); what it
    gave is in `actual` after `start()`. After `max_failures` failed reads in a row the camera counts as gone:
    `error` says so and the thread ends (a video file ends the same way, at its end).
    """

    kind = "camera"

    def __init__(self, device: int | str = 0, width: int | None = None, height: int | None = None,
                 fps: float | None = None, ring: LatestFrame | None = None, max_failures: int = 10):
        self.device = _camera_device(device)
        super().__init__(f"camera {self.device}")
        self.width, self.height, self.fps = width, height, fps
        self.ring = ring if ring is not None else LatestFrame()
        self.max_failures = max_failures
        self.frames = 0  # frames read
        self.actual: tuple[int, int, float] | None = None  # (width, height, fps) reported by the driver
        self._cap = None

    def _open(self) -> None:
        import cv2

        if isinstance(self.device, str) and "://" not in self.device and not Path(self.device).exists():
            raise SourceError(f"{self.name} could not be opened: no such file; {LIST_HINT}")
        with _quiet_opencv():
            cap = cv2.VideoCapture(self.device)
            if not cap.isOpened():
                cap.release()
                why = "no such device" if isinstance(self.device, int) else "unreadable or unsupported stream"
                raise SourceError(f"{self.name} could not be opened: {why}; {LIST_HINT}")
            # Requests are best effort: a driver without the mode keeps its own, which `actual` reports.
            for prop, value in ((cv2.CAP_PROP_FRAME_WIDTH, self.width), (cv2.CAP_PROP_FRAME_HEIGHT, self.height),
                                (cv2.CAP_PROP_FPS, self.fps)):
                if value:
                    cap.set(prop, float(value))
        self.actual = (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
                       float(cap.get(cv2.CAP_PROP_FPS)))
        self._cap = cap

    def _run(self) -> None:
        cap, failures = self._cap, 0
        try:
            while not self._stop.is_set():
                ok, frame = cap.read()
                t = time.monotonic()
                if ok and frame is not None:
                    failures = 0
                    self.frames += 1
                    self.ring.put(frame, t)
                    continue
                failures += 1
                if failures >= self.max_failures:
                    why = "end of the stream?" if isinstance(self.device, str) else "unplugged?"
                    self.error = f"{self.name} stopped delivering frames ({why})"
                    return
                self._stop.wait(0.01)  # a transient glitch: retry without spinning
        finally:
            cap.release()  # released by the thread that reads: releasing during read() is unsafe


# ------------------------------------------------------------------------------------------------- microphone


def _sounddevice():
    """Import sounddevice lazily, turning a missing library into one line."""
    try:
        import sounddevice
    except ImportError as err:
        raise SourceError("the microphone needs the sounddevice package: pip install sounddevice") from err
    except OSError as err:  # raised by the import itself when libportaudio is missing
        raise SourceError(PORTAUDIO_MISSING) from err
    return sounddevice


def _input_devices(sd) -> list[dict]:
    return [d for d in sd.query_devices() if d["max_input_channels"] > 0]


def resolve_microphone(device: int | str | None) -> dict:
    """The PortAudio input device for an index, a case-insensitive name substring or None (the default input).

    A name matching several devices picks an exact name match if there is one, else the first match.
    """
    sd = _sounddevice()
    inputs = _input_devices(sd)
    if not inputs:
        raise SourceError(NO_MICROPHONE)
    if isinstance(device, str) and device.strip().isdigit():
        device = int(device)
    if device is None:
        index = sd.default.device[0]
        if index is None or index < 0:
            return inputs[0]  # PortAudio has inputs but no default: the first one
        return next((d for d in inputs if d["index"] == index), inputs[0])
    if isinstance(device, int):
        match = next((d for d in inputs if d["index"] == device), None)
        if match is None:
            raise SourceError(f"microphone {device} does not exist or has no input channels; {LIST_HINT}")
        return match
    wanted = device.strip().lower()
    matches = [d for d in inputs if wanted in d["name"].lower()]
    if not matches:
        names = ", ".join(f"{d['index']} {d['name']!r}" for d in inputs)
        raise SourceError(f"no microphone matches {device!r} (inputs: {names}); {LIST_HINT}")
    return next((d for d in matches if d["name"].lower() == wanted), matches[0])


class MicrophoneSource(Source):
    """A `sounddevice.InputStream` at the device's own rate, resampled to 16 kHz mono into an `AudioRing`.

    Samples are asked for as int16, what microphones deliver: PortAudio and ALSA then convert nothing (ALSA's
    conversions also garble its file plugin, which the tests capture from). The PortAudio callback only mixes the
    block to mono float32 (one small copy: PortAudio reuses its buffer), stamps it with `time.monotonic()` (the
    time of the block's last sample, to within the driver's buffering) and appends it to a bounded deque; it
    takes no lock and never waits. A worker thread polls the deque every few milliseconds (polling keeps every
    lock out of the callback), resamples (`StreamResampler`, state carried across blocks) and writes into the
    ring. If the worker falls behind by more than `queue_s` seconds the oldest blocks are dropped
    (`dropped_blocks`), since the ring keeps the newest audio anyway. Callbacks with PortAudio status flags
    (mostly input overflow: the driver lost samples before the callback ran) are counted in `overflows`.
    The device is gone when PortAudio ends the stream or no block came for `stall_s` seconds: `error` is set.
    """

    kind = "microphone"

    def __init__(self, device: int | str | None = None, ring: AudioRing | None = None, block_ms: float = 20,
                 samplerate: float | None = None, channels: int | None = None, queue_s: float = 2.0,
                 stall_s: float = 2.0):
        super().__init__("microphone" if device is None else f"microphone {device!r}")
        self.device = device
        self.ring = ring if ring is not None else AudioRing()
        self.block_ms, self.samplerate, self.channels = block_ms, samplerate, channels
        self.stall_s = stall_s  # no block for this long while running: the device is gone
        self.blocks = 0  # blocks received by the callback
        self.overflows = 0
        self.dropped_blocks = 0
        self.info: dict | None = None  # the PortAudio device in use
        self._queue_blocks = max(1, int(math.ceil(queue_s * 1000 / block_ms)))
        self._queue: collections.deque[tuple[np.ndarray, float]] = collections.deque(maxlen=self._queue_blocks)
        self._last_block_t = 0.0
        self._stream = None
        self._finished = threading.Event()

    def _open(self) -> None:
        sd = _sounddevice()
        info = resolve_microphone(self.device)
        self.name = f"microphone {info['index']} {info['name']!r}"
        rate = float(self.samplerate or info["default_samplerate"])
        # Ask for mono (PortAudio/ALSA mix down); a device that only does stereo gets 2 channels, mixed here.
        tries = [self.channels] if self.channels else [1, min(2, info["max_input_channels"])]
        last_err: Exception | None = None
        for channels in dict.fromkeys(tries):
            try:
                stream = sd.InputStream(device=info["index"], samplerate=rate, channels=channels, dtype="int16",
                                        blocksize=max(1, int(round(rate * self.block_ms / 1000))),
                                        callback=self._callback, finished_callback=self._finished.set)
                break
            except (sd.PortAudioError, ValueError) as err:
                last_err = err
        else:
            raise SourceError(f"{self.name} could not be opened: {_one_line(last_err)}; {LIST_HINT}")
        self.info, self.samplerate, self.channels = info, rate, channels
        self._resampler = StreamResampler(rate)
        self._last_block_t = time.monotonic()
        try:
            stream.start()
        except sd.PortAudioError as err:
            stream.close()
            raise SourceError(f"{self.name} could not be started: {_one_line(err)}") from err
        self._stream = stream

    def _callback(self, indata: np.ndarray, frames: int, time_info, status) -> None:
        t = time.monotonic()
        if status:
            self.overflows += 1
        if indata.shape[1] == 1:
            block = indata[:, 0].astype(np.float32)  # the one copy (PortAudio reuses indata)
        else:
            block = indata.mean(axis=1, dtype=np.float32)
        block *= _INT16_SCALE
        if len(self._queue) == self._queue_blocks:
            self.dropped_blocks += 1  # deque(maxlen) drops the oldest on append
        self._queue.append((block, t))  # deque.append is atomic: no lock shared with the worker
        self.blocks += 1
        self._last_block_t = t

    def _run(self) -> None:
        poll = min(0.005, self.block_ms / 4000)
        try:
            while True:
                self._drain()
                if self._stop.is_set():
                    return
                if self._finished.is_set():  # PortAudio ended the stream without our asking: device error
                    self.error = f"{self.name} stopped: the audio stream ended (unplugged?)"
                    return
                if time.monotonic() - self._last_block_t > self.stall_s:
                    self.error = f"{self.name} stopped delivering audio for {self.stall_s:g} s (unplugged?)"
                    return
                self._stop.wait(poll)
        finally:
            self._close_stream()
            self._drain()

    def _drain(self) -> None:
        # At most what is queued now: a device faster than real time (a file plugin) must not pin the worker here.
        for _ in range(len(self._queue)):
            block, t = self._queue.popleft()
            samples, t_end = self._resampler.process(block, t)
            if samples.shape[0]:
                self.ring.write(samples, t_end)

    def _close_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            with contextlib.suppress(Exception):  # closing a stream whose device vanished may raise too
                stream.abort()
                stream.close()


def _one_line(err: BaseException | None) -> str:
    text = str(err).strip() if err is not None else "unknown error"
    return text.splitlines()[0] if text else type(err).__name__


# ------------------------------------------------------------------------------------------------------- push


class PushSource(Source):
    """Frames and audio fed by the host application (a prototype that already owns the camera and mic).

    No thread: `push_frame` and `push_audio` do their (small) work in the caller's thread. `t` is the monotonic
    capture time (of the frame; of the block's last sample), `time.monotonic()` when left out. Audio of any rate
    and channel count is mixed to mono and resampled to 16 kHz; keep one rate per session (a new rate restarts
    the resampler). Frames are copied unless `copy=False`, because hosts often reuse their capture buffer.
    """

    kind = "push"

    def __init__(self, frames: LatestFrame | None = None, ring: AudioRing | None = None):
        super().__init__("push source")
        self.frames = frames if frames is not None else LatestFrame()
        self.ring = ring if ring is not None else AudioRing()
        self._resampler: StreamResampler | None = None
        self._audio_lock = threading.Lock()
        self._open_for_push = True  # usable from creation: start() is there for symmetry with the device sources

    def start(self) -> PushSource:
        self._open_for_push = True
        return self

    def stop(self, timeout: float = 2.0) -> None:
        self._open_for_push = False

    @property
    def alive(self) -> bool:
        return self._open_for_push

    def push_frame(self, frame_bgr: np.ndarray, t: float | None = None, copy: bool = True) -> int:
        """Feed one BGR uint8 (H, W, 3) frame; returns its sequence number."""
        if not isinstance(frame_bgr, np.ndarray):
            raise ValueError(f"push_frame needs a numpy array (H, W, 3), got {type(frame_bgr).__name__}")
        if frame_bgr.ndim != 3 or frame_bgr.shape[2] != 3 or frame_bgr.shape[0] == 0 or frame_bgr.shape[1] == 0:
            raise ValueError(f"push_frame needs a BGR frame of shape (H, W, 3), got {frame_bgr.shape}; "
                             "convert gray or BGRA frames with cv2.cvtColor")
        if frame_bgr.dtype != np.uint8:
            raise ValueError(f"push_frame needs uint8 pixels, got {frame_bgr.dtype}")
        t = _stamp(t)
        return self.frames.put(frame_bgr.copy() if copy else frame_bgr, t)

    def push_audio(self, block: np.ndarray, sample_rate: int, t: float | None = None) -> int:
        """Feed audio (frames,) or (frames, channels), int16/int32/float; returns the 16 kHz samples written."""
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)) or sample_rate <= 0 \
                or sample_rate != int(sample_rate):
            raise ValueError(f"push_audio needs a positive whole sample_rate in Hz, got {sample_rate!r}")
        x = np.asarray(block)
        if x.ndim == 2 and x.shape[1] > 64 and x.shape[0] <= 64:
            raise ValueError(f"push_audio needs (frames, channels), got {x.shape}: transpose channels-first audio")
        x = to_mono_float32(x)
        if not np.all(np.isfinite(x)):
            raise ValueError("push_audio got NaN or infinite samples")
        t = _stamp(t)
        with self._audio_lock:
            if self._resampler is None or self._resampler.in_rate != int(sample_rate):
                self._resampler = StreamResampler(int(sample_rate))
            samples, t_end = self._resampler.process(x, t)
            if samples.shape[0]:
                self.ring.write(samples, t_end)
        return int(samples.shape[0])


def _stamp(t: float | None) -> float:
    if t is None:
        return time.monotonic()
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
        raise ValueError(f"t must be a finite time.monotonic() value in seconds, got {t!r}")
    return float(t)


# ---------------------------------------------------------------------------------------------- list devices


def list_devices(max_camera_index: int = 10) -> str:
    """What `mcihn-live --list-devices` prints: cameras and microphones with the numbers to pass. Never raises."""
    lines = ["Cameras (pass the number with --camera):"]
    try:
        lines += _list_cameras(max_camera_index) or [
            f"  none found (OpenCV opened no camera at indices 0-{max_camera_index - 1})"]
    except Exception as err:  # noqa: BLE001 - a listing reports, it never fails
        lines.append(f"  unavailable: {_one_line(err)}")
    lines.append("Microphones (pass the number, or part of the name, with --mic):")
    try:
        lines += _list_microphones() or ["  none found (PortAudio sees no input device)"]
    except SourceError as err:
        lines.append(f"  unavailable: {err}")
    except Exception as err:  # noqa: BLE001
        lines.append(f"  unavailable: {_one_line(err)}")
    return "\n".join(lines)


def _list_cameras(max_index: int) -> list[str]:
    import cv2

    found = []
    with _quiet_opencv():
        for index in range(max_index):
            cap = cv2.VideoCapture(index)
            try:
                if cap.isOpened():
                    w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
                    fps = cap.get(cv2.CAP_PROP_FPS)
                    found.append(f"  {index}: {w}x{h}" + (f" @ {fps:g} fps" if fps > 0 else ""))
            finally:
                cap.release()
    return found


def _list_microphones() -> list[str]:
    sd = _sounddevice()
    default = sd.default.device[0]
    lines = []
    for d in _input_devices(sd):
        api = sd.query_hostapis(d["hostapi"])["name"]
        mark = "  [default]" if d["index"] == default else ""
        lines.append(f"  {d['index']}: {d['name']} ({api}, {d['max_input_channels']} ch, "
                     f"{d['default_samplerate']:g} Hz){mark}")
    return lines

