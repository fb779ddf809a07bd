"""Capture sources and their buffers, without hardware (docs/design.md).

The camera is a video file written by cv2.VideoWriter; the microphone is captured end to end (PortAudio, ALSA,
the callback, the worker, the resampler, the ring) from ALSA's file plugin over the null device, in a child
process whose $HOME holds the .asoundrc (ALSA reads its configuration when PortAudio initialises).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from scipy.signal import resample_poly

from realtime.buffers import AudioRing, FrameItem, LatestFrame, StreamResampler, to_mono_float32
from realtime.sources import (
    NO_MICROPHONE,
    PORTAUDIO_MISSING,
    CameraSource,
    MicrophoneSource,
    PushSource,
    SourceError,
    list_devices,
    resolve_microphone,
)

REPO = Path(__file__).resolve().parents[1]


def peak_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[np.argmax(spectrum)])


def sine(freq: float, seconds: float, rate: int, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


# ------------------------------------------------------------------------------------------------ LatestFrame


def test_latest_frame_wins_and_counts_drops():
    slot = LatestFrame()
    assert slot.get_new(0) is None and slot.dropped == 0
    for i in range(3):
        slot.put(np.full((2, 2, 3), i, np.uint8), t=10.0 + i)
    assert slot.dropped == 2  # frames 1 and 2 were overwritten before anyone took them
    item = slot.get_new(0)
    assert isinstance(item, FrameItem) and item.seq == 3 and item.t_capture == 12.0 and item.frame_bgr[0, 0, 0] == 2
    frame, t, seq = item  # also a plain (frame, t, seq) tuple
    assert slot.get_new(seq) is None  # nothing newer
    slot.put(np.zeros((2, 2, 3), np.uint8), t=13.0)
    assert slot.dropped == 2  # the previous frame had been taken: not a drop
    assert slot.get_new(seq).seq == 4


def test_latest_frame_wait_new():
    slot = LatestFrame()
    assert slot.wait_new(0, timeout=0.01) is None
    threading.Timer(0.05, lambda: slot.put(np.zeros((1, 1, 3), np.uint8), 1.0)).start()
    item = slot.wait_new(0, timeout=5.0)
    assert item is not None and item.seq == 1


# -------------------------------------------------------------------------------------------------- AudioRing


def test_audio_ring_wraparound_and_overflow_keeps_newest():
    ring = AudioRing(capacity_s=1.0, rate=10)  # 10 samples: small enough to follow by hand
    empty, t_none = ring.read_last(1.0)
    assert empty.shape == (0,) and t_none is None
    ring.write(np.arange(7, dtype=np.float32), t_end=1.0)
    ring.write(np.arange(7, 13, dtype=np.float32), t_end=1.6)  # wraps around the end of the buffer
    samples, t_end = ring.read_last(1.0)
    np.testing.assert_array_equal(samples, np.arange(3, 13))
    assert t_end == 1.6 and ring.written == 13 and ring.available == 10
    np.testing.assert_array_equal(ring.read_last(0.4)[0], [9, 10, 11, 12])
    np.testing.assert_array_equal(ring.read_last(100.0)[0], np.arange(3, 13))  # capped at what is held
    ring.write(np.arange(100, 125, dtype=np.float32), t_end=4.1)  # a block longer than the ring
    np.testing.assert_array_equal(ring.read_last(1.0)[0], np.arange(115, 125))
    assert ring.written == 38
    ring.write(np.arange(3, dtype=np.float32), t_end=3.0)  # a stamp from the past never moves time backwards
    assert ring.t_end == 4.1


def test_audio_ring_reads_into_a_given_buffer_without_a_new_array():
    ring = AudioRing(capacity_s=1.0, rate=10)
    ring.write(np.arange(13, dtype=np.float32), t_end=1.3)  # wrapped
    buf = np.full(8, -1.0, np.float32)
    samples, _ = ring.read_last(0.5, out=buf)
    np.testing.assert_array_equal(samples, np.arange(8, 13))
    assert np.shares_memory(samples, buf)  # the tick's buffer, filled in place (no allocation on the tick path)


def test_media_items_come_in_media_time_order():
    # The bundled clip's MP4 holds 0.6 s of video before its first audio packet: replayed in demux order the
    # audio stalled for that long at the start and at every loop (a latency spike the pipeline did not cause).
    from realtime.file_source import media_items

    items = list(media_items(Path(__file__).parents[1] / "realtime" / "assets" / "demo.mp4"))
    times = np.array([t for t, _, _ in items])
    assert np.all(np.diff(times) >= 0)
    audio = times[[kind == "audio" for _, kind, _ in items]]
    assert audio[0] < 0.1 and np.diff(audio).max() < 0.1  # audio blocks follow each other without a gap


def test_in_time_order_merges_streams_and_bounds_what_it_holds():
    from realtime.file_source import in_time_order

    demux = [(0.0, "video"), (0.5, "video"), (1.0, "video"), (0.1, "audio"), (0.6, "audio"), (1.5, "video"),
             (4.0, "video"), (5.0, "video"), (7.0, "video"), (1.1, "audio")]
    out = [(t, kind) for t, kind, _ in in_time_order((t, k, np.zeros(1)) for t, k in demux)]
    # Interleaved by time while both streams advance; video running over 2 s ahead of a silent audio stream is
    # released without waiting for audio that may never come, so the late 1.1 comes after 4.0 and 5.0.
    assert out == [(0.0, "video"), (0.1, "audio"), (0.5, "video"), (0.6, "audio"), (1.0, "video"), (1.5, "video"),
                   (4.0, "video"), (5.0, "video"), (1.1, "audio"), (7.0, "video")]


def test_audio_ring_read_since_and_read_from():
    ring = AudioRing(capacity_s=2.0)
    first = sine(440, 1.0, 16_000)
    ring.write(first, t_end=100.0)
    samples, t_end = ring.read_since(99.5)  # samples captured after t: the newest 0.5 s
    assert t_end == 100.0 and samples.shape == (8000,)
    np.testing.assert_array_equal(samples, first[-8000:])
    assert ring.read_since(100.0)[0].shape == (0,)  # nothing after the newest sample
    assert ring.read_since(0.0)[0].shape == (16_000,)  # everything still held
    second = sine(220, 0.25, 16_000)
    ring.write(second, t_end=100.25)  # contiguous: 4000 samples later
    np.testing.assert_array_equal(ring.read_since(100.0)[0], second)  # exactly the new block, no overlap
    assert ring.time_of(ring.written - 1) == 100.25
    assert ring.time_of(ring.written - 16_000) == pytest.approx(100.25 - 15_999 / 16_000)
    # Index-based reading: each sample once, whatever the stamps' jitter.
    chunk, nxt, _ = ring.read_from(0)
    assert chunk.shape == (20_000,) and nxt == 20_000
    ring.write(first, t_end=101.25)  # 36 000 written, the ring holds the newest 32 000
    chunk, nxt, _ = ring.read_from(nxt)
    np.testing.assert_array_equal(chunk, first)
    assert nxt == 36_000
    assert ring.read_from(0)[0].shape == (32_000,)  # overwritten samples are skipped


def test_audio_ring_rejects_bad_capacity():
    with pytest.raises(ValueError, match="capacity"):
        AudioRing(capacity_s=0)


# --------------------------------------------------------------------------------------------- StreamResampler


@pytest.mark.parametrize("rate", [48_000, 44_100, 8_000])
def test_stream_resampler_equals_resample_poly_over_blocks(rate):
    x = np.random.default_rng(0).standard_normal(rate).astype(np.float32)
    resampler, out, i = StreamResampler(rate), [], 0
    for n in [1, 7, 960, 333, 4000, 50_000]:
        out.append(resampler.process(x[i:i + n])[0])
        i += n
    out.append(resampler.process(x[i:])[0])
    y = np.concatenate(out)
    reference = resample_poly(x.astype(np.float64), 16_000, rate)
    assert len(reference) - 20 <= len(y) <= len(reference)  # only the filter's half-length is held back
    np.testing.assert_allclose(y, reference[:len(y)], atol=1e-5)  # no block-edge artefacts


def test_stream_resampler_48k_keeps_frequency_length_and_time():
    x = sine(440, 2.0, 48_000)
    resampler, out, stamps = StreamResampler(48_000), [], []
    for k in range(0, len(x), 960):  # 20 ms blocks, the last sample of block k at 10 + k/48k
        y, t = resampler.process(x[k:k + 960], t_end=10.0 + (k + 959) / 48_000)
        out.append(y)
        stamps.append(t)
    y = np.concatenate(out)
    assert abs(len(y) - 32_000) <= 16  # 2 s at 16 kHz, minus the filter lag
    assert peak_hz(y, 16_000) == pytest.approx(440, abs=1.0)
    assert np.all(np.diff(stamps) > 0)
    assert stamps[-1] == pytest.approx(10.0 + (len(y) - 1) / 16_000, abs=1e-9)  # output times on the input clock


def test_stream_resampler_passthrough_and_bad_rate():
    resampler = StreamResampler(16_000)
    x = sine(1000, 0.1, 16_000)
    y, t = resampler.process(x, 5.0)
    np.testing.assert_array_equal(y, x)
    assert t == 5.0 and resampler.passthrough
    for bad in (0, -8000, 44_100.5):
        with pytest.raises(ValueError, match="sample rate"):
            StreamResampler(bad)


def test_to_mono_float32():
    stereo = np.stack([np.full(4, 16384, np.int16), np.full(4, -16384, np.int16)], axis=1)
    np.testing.assert_array_equal(to_mono_float32(stereo), np.zeros(4, np.float32))
    np.testing.assert_array_equal(to_mono_float32(np.full(3, 16384, np.int16)), np.full(3, 0.5, np.float32))
    assert to_mono_float32(np.zeros((5, 1), np.float64)).dtype == np.float32
    np.testing.assert_array_equal(to_mono_float32(np.full(2, 192, np.uint8)), np.full(2, 0.5, np.float32))
    with pytest.raises(ValueError, match="integers or floats"):
        to_mono_float32(np.zeros(4, np.complex64))


# ----------------------------------------------------------------------------------------------------- camera


@pytest.fixture(scope="module")
def video_file(tmp_path_factory) -> Path:
    """30 frames of 64x48 at 30 fps; frame i is filled with gray level 8 * i."""
    import cv2

    path = tmp_path_factory.mktemp("camera") / "camera.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30.0, (64, 48))
    assert writer.isOpened()
    for i in range(30):
        writer.write(np.full((48, 64, 3), 8 * i, np.uint8))
    writer.release()
    return path


def collect(source: CameraSource, delay_s: float = 0.0, timeout_s: float = 30.0) -> list[FrameItem]:
    """Take frames until the source ends (and the last frame is taken), sleeping `delay_s` after each."""
    items, seen, deadline = [], 0, time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        item = source.ring.wait_new(seen, timeout=0.05)
        if item is not None:
            items.append(item)
            seen = item.seq
            time.sleep(delay_s)
        elif not source.alive and source.ring.seq == seen:
            break
    return items


def test_camera_from_a_file_stamps_frames_and_reports_the_end(video_file):
    source = CameraSource(str(video_file), width=64, height=48, fps=30).start()
    assert source.actual[:2] == (64, 48)
    items = collect(source)
    source.stop()
    assert not source.alive
    assert source.frames == 30
    assert source.error == f"camera {video_file} stopped delivering frames (end of the stream?)"
    stamps = [item.t_capture for item in items]
    assert np.all(np.diff(stamps) > 0) and stamps[-1] <= time.monotonic()
    assert [item.seq for item in items] == sorted({item.seq for item in items})
    assert items[-1].seq == 30 and items[-1].frame_bgr.shape == (48, 64, 3)
    assert abs(int(items[-1].frame_bgr.mean()) - 8 * 29) <= 3  # the last frame written, through mp4v
    assert len(items) + source.ring.dropped == 30  # every frame was either taken or counted as dropped


def test_camera_slow_consumer_drops_are_counted(video_file):
    source = CameraSource(video_file.as_posix()).start()
    items = collect(source, delay_s=0.02)  # the file decodes far faster than 50 frames/s
    source.stop()
    assert source.ring.dropped > 0
    assert len(items) + source.ring.dropped == source.frames == 30
    assert items[-1].seq == 30  # the newest frame is never the one dropped


class _UnpluggedCapture:
    """A VideoCapture whose camera delivers 3 frames and then is pulled out."""

    def __init__(self):
        self.reads, self.released = 0, False

    def read(self):
        self.reads += 1
        return (True, np.zeros((4, 4, 3), np.uint8)) if self.reads <= 3 else (False, None)

    def release(self):
        self.released = True


def test_camera_unplugged_mid_session_ends_cleanly(monkeypatch):
    camera = CameraSource(0, max_failures=5)
    capture = _UnpluggedCapture()
    monkeypatch.setattr(camera, "_open", lambda: setattr(camera, "_cap", capture))
    camera.start()
    assert wait_until(lambda: not camera.alive)
    assert camera.error == "camera 0 stopped delivering frames (unplugged?)"
    assert camera.frames == 3 and capture.reads == 8 and capture.released
    assert camera.ring.get_new(0).seq == 3  # the last frame stays readable


def test_missing_camera_is_one_clear_line(tmp_path):
    with pytest.raises(SourceError) as info:
        CameraSource(7).start()
    assert str(info.value) == ("camera 7 could not be opened: no such device; "
                               "list devices with mcihn-live --list-devices")
    with pytest.raises(SourceError, match=r"^camera 3 could not be opened"):
        CameraSource("3").start()  # digits from the command line are an index
    with pytest.raises(SourceError, match="no such file"):
        CameraSource(str(tmp_path / "missing.mp4")).start()
    (tmp_path / "junk.mp4").write_bytes(b"not a video")
    with pytest.raises(SourceError, match="unreadable or unsupported") as info:
        CameraSource(str(tmp_path / "junk.mp4")).start()
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError):
        CameraSource(1.5)


# ------------------------------------------------------------------------------------- microphone (ALSA file)

ASOUNDRC = """\
pcm.!default {{ type plug  slave {{ pcm "filecap"  format S16_LE  rate {rate}  channels 1 }} }}
pcm.filecap {{ type file  slave.pcm "null"  file "/dev/null"  infile "{infile}"  format "raw" }}
"""

# Runs in a child process (HOME holds the .asoundrc). The ALSA file plugin is not paced: it delivers as fast as
# it is read, so the child keeps the first `want` samples the worker writes into the ring, in order, and stops.
CHILD = r"""
import json, sys, time
import numpy as np
from realtime.buffers import AudioRing
from realtime.sources import MicrophoneSource, SourceError, list_devices, resolve_microphone

device, want, out = (None if sys.argv[1] == "-" else sys.argv[1]), int(sys.argv[2]), sys.argv[3]

class FirstSamples(AudioRing):
    def __init__(self):
        super().__init__(capacity_s=30.0)
        self.kept, self.stamps, self.n = [], [], 0
    def write(self, samples, t_end):
        super().write(samples, t_end)
        if self.n < want:
            self.kept.append(np.array(samples)); self.stamps.append(t_end); self.n += len(samples)
            self.dropped_during_capture = source.dropped_blocks

report = {"devices": list_devices(), "match": resolve_microphone("FILECAP")["name"],
          "by_index": resolve_microphone("0")["name"]}
try:
    resolve_microphone("zz-no-such-mic")
except SourceError as err:
    report["no_match"] = str(err)
ring = FirstSamples()
# A long queue: the flood must not push the file's blocks out before the worker has resampled them.
source = MicrophoneSource(device, ring=ring, block_ms=20, queue_s=200.0)
source.start()
deadline = time.monotonic() + 60
while ring.n < want and source.alive and time.monotonic() < deadline:
    time.sleep(0.002)
report.update(name=source.name, rate=source.samplerate, channels=source.channels, error=source.error)
source.stop()
last, t_last = ring.read_last(1.0)
report.update(blocks=source.blocks, dropped_during_capture=ring.dropped_during_capture, overflows=source.overflows,
              written=ring.written, last_1s=len(last), t_last=t_last, stamps=ring.stamps, alive=source.alive,
              error_after_stop=source.error)
np.save(out, np.concatenate(ring.kept)[:want])
print(json.dumps(report))
"""


def portaudio_or_skip():
    try:
        import sounddevice
    except (ImportError, OSError) as err:
        pytest.skip(f"sounddevice unusable here ({err}); install it and Debian libportaudio2")
    return sounddevice


def alsa_capture(tmp_path: Path, signal_int16: np.ndarray, rate: int, device: str | None, want: int):
    """Capture `want` samples at 16 kHz through PortAudio from an ALSA file plugin playing `signal_int16`."""
    portaudio_or_skip()
    infile = tmp_path / f"signal_{rate}.raw"
    signal_int16.astype("<i2").tofile(infile)
    (tmp_path / ".asoundrc").write_text(ASOUNDRC.format(rate=rate, infile=infile))
    env = {**os.environ, "HOME": str(tmp_path), "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get(
        "PYTHONPATH", "")])}
    out = tmp_path / "captured.npy"
    proc = subprocess.run([sys.executable, "-c", CHILD, device or "-", str(want), str(out)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"ALSA capture child failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), np.load(out)


def check_stream(report: dict, want: int) -> None:
    assert report["error"] is None and report["alive"] is False and report["error_after_stop"] is None
    assert report["channels"] == 1
    assert report["blocks"] * 320 >= want  # counted blocks (20 ms each), not wall-clock pacing
    assert report["dropped_during_capture"] == 0 and report["overflows"] == 0
    stamps = report["stamps"]
    assert len(stamps) > 10 and np.all(np.diff(stamps) >= 0) and stamps[-1] > stamps[0]
    assert report["written"] >= want and report["last_1s"] == 16_000  # the ring filled
    assert report["t_last"] >= stamps[-1]


def test_microphone_end_to_end_through_alsa_file_plugin_16k(tmp_path):
    """A 16 kHz device: the samples arrive unchanged, in order, from the first one."""
    x = np.round(sine(440, 2.0, 16_000) * 32767).astype(np.int16)
    report, captured = alsa_capture(tmp_path, x, 16_000, device=None, want=len(x))
    check_stream(report, len(x))
    assert report["name"] == "microphone 1 'default'" and report["rate"] == 16_000
    assert report["match"] == report["by_index"] == "filecap"  # name substrings are case-insensitive
    assert report["no_match"].startswith("no microphone matches 'zz-no-such-mic' (inputs: 0 'filecap', 1 'default')")
    assert "0: filecap" in report["devices"] and "1: default" in report["devices"]
    np.testing.assert_array_equal(captured, x / np.float32(32768))  # bit-exact: int16 end to end, then scaled
    assert peak_hz(captured, 16_000) == pytest.approx(440, abs=1.0)


def test_microphone_end_to_end_48k_resampled(tmp_path):
    """A 48 kHz device (by name): the worker resamples to 16 kHz exactly as resample_poly does."""
    x48 = np.round((sine(440, 2.0, 48_000, 0.4) + sine(1000, 2.0, 48_000, 0.2)) * 32767).astype(np.int16)
    report, captured = alsa_capture(tmp_path, x48, 48_000, device="DEFAULT", want=30_000)
    check_stream(report, 30_000)
    assert report["name"] == "microphone 1 'default'" and report["rate"] == 48_000
    reference = resample_poly(x48 / 32768.0, 1, 3)[:30_000]
    np.testing.assert_allclose(captured, reference, atol=1e-5)
    spectrum = np.abs(np.fft.rfft(captured))
    freqs = np.fft.rfftfreq(len(captured), 1 / 16_000)
    assert sorted(freqs[np.argsort(spectrum)[-2:]].round()) == pytest.approx([440, 1000], abs=1.0)


# ------------------------------------------------------------------------------- microphone faults (no device)


def test_no_microphone_is_one_clear_line():
    sd = portaudio_or_skip()
    has_input = any(d["max_input_channels"] > 0 for d in sd.query_devices())
    with pytest.raises(SourceError) as info:
        MicrophoneSource("zz-no-such-microphone-zz").start()
    message = str(info.value)
    assert "\n" not in message
    if has_input:
        assert message.startswith("no microphone matches 'zz-no-such-microphone-zz'")
        pytest.skip("this machine has a microphone: the no-device case cannot be checked here")
    assert message == NO_MICROPHONE
    with pytest.raises(SourceError, match="no microphone found"):
        MicrophoneSource(None).start()
    with pytest.raises(SourceError, match="no microphone found"):
        resolve_microphone(3)


class _FailingFinder:
    """Makes `import sounddevice` fail as it does without libportaudio2 (OSError from its loader)."""

    def find_spec(self, name, path=None, target=None):
        if name == "sounddevice":
            raise OSError("PortAudio library not found")
        return None


def test_missing_portaudio_is_one_clear_line(monkeypatch):
    monkeypatch.delitem(sys.modules, "sounddevice", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_FailingFinder(), *sys.meta_path])
    with pytest.raises(SourceError) as info:
        MicrophoneSource().start()
    assert str(info.value) == PORTAUDIO_MISSING
    listing = list_devices()
    assert f"unavailable: {PORTAUDIO_MISSING}" in listing and "Cameras" in listing


class _StreamlessMicrophone(MicrophoneSource):
    """The real callback and worker, fed by hand: what a stream does mid-session without a device."""

    def _open(self) -> None:
        self.name, self.samplerate = "microphone 5 'test'", 48_000.0
        self._resampler = StreamResampler(48_000)
        self._last_block_t = time.monotonic()


def wait_until(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.005)
    return predicate()


def test_microphone_callback_worker_and_stream_death():
    ring = AudioRing()
    mic = _StreamlessMicrophone(ring=ring).start()
    x = np.round(sine(440, 1.0, 48_000) * 32767).astype(np.int16)
    for k in range(0, len(x), 960):  # stereo blocks, both channels alike: the mono mix is the signal
        mic._callback(np.stack([x[k:k + 960]] * 2, axis=1), 960, None, None)
    mic._callback(np.zeros((960, 2), np.int16), 960, None, "input overflow")
    assert wait_until(lambda: ring.written >= 15_990)
    assert mic.blocks == 51 and mic.overflows == 1 and mic.alive
    assert peak_hz(ring.read_last(1.0)[0], 16_000) == pytest.approx(440, abs=1.0)
    mic._finished.set()  # what PortAudio does when the device's stream dies
    assert wait_until(lambda: not mic.alive)
    assert mic.error == "microphone 5 'test' stopped: the audio stream ended (unplugged?)"


def test_microphone_stall_and_bounded_queue():
    mic = _StreamlessMicrophone(stall_s=0.2, queue_s=0.1)  # the queue holds 5 blocks of 20 ms
    for _ in range(8):  # before the worker runs: the oldest 3 are dropped, the newest kept
        mic._callback(np.zeros((960, 1), np.int16), 960, None, None)
    assert mic.dropped_blocks == 3 and len(mic._queue) == 5
    mic.start()
    assert wait_until(lambda: not mic.alive)
    assert mic.error == "microphone 5 'test' stopped delivering audio for 0.2 s (unplugged?)"
    assert mic.ring.written > 0


# ------------------------------------------------------------------------------------------------------- push


def test_push_frames():
    push = PushSource()
    assert push.start() is push and push.alive
    frame = np.zeros((48, 64, 3), np.uint8)
    seq = push.push_frame(frame, t=12.5)
    frame[:] = 255  # the host reuses its buffer: the pushed frame was copied
    item = push.frames.get_new(0)
    assert item.seq == seq == 1 and item.t_capture == 12.5 and item.frame_bgr.max() == 0
    before = time.monotonic()
    push.push_frame(frame)
    assert before <= push.frames.get_new(1).t_capture <= time.monotonic()
    for bad, match in [(np.zeros((48, 64), np.uint8), "cvtColor"), (np.zeros((48, 64, 4), np.uint8), r"\(H, W, 3\)"),
                       (np.zeros((48, 64, 3), np.float32), "uint8"), ([[0, 0, 0]], "numpy array"),
                       (np.zeros((0, 64, 3), np.uint8), r"\(H, W, 3\)")]:
        with pytest.raises(ValueError, match=match):
            push.push_frame(bad)
    for bad_t in (math.nan, math.inf, "now"):
        with pytest.raises(ValueError, match="finite"):
            push.push_frame(np.zeros((4, 4, 3), np.uint8), t=bad_t)
    push.stop()
    assert not push.alive


def test_push_audio_any_rate_channels_and_dtype():
    push = PushSource(ring=AudioRing(capacity_s=5.0))
    x = np.round(sine(440, 1.0, 48_000) * 32767).astype(np.int16)
    stereo = np.stack([x, x], axis=1)
    written = sum(push.push_audio(stereo[k:k + 4800], 48_000, t=20.0 + (k + 4799) / 48_000)
                  for k in range(0, len(x), 4800))
    assert written == push.ring.written and abs(written - 16_000) <= 16
    samples, t_end = push.ring.read_last(1.0)
    assert peak_hz(samples, 16_000) == pytest.approx(440, abs=1.0)
    assert t_end == pytest.approx(21.0, abs=1e-3)  # the block's time minus the resampler's sub-ms lag
    assert push.push_audio(sine(440, 0.1, 16_000), 16_000) == 1600  # float at 16 kHz: as is, stamped now
    assert push.ring.t_end <= time.monotonic()
    assert push.push_audio(np.zeros((441, 1), np.float64), 44_100.0) > 0  # a new rate restarts the resampler


@pytest.mark.parametrize("block, rate, match", [
    (np.zeros(100, np.int16), 0, "sample_rate"),
    (np.zeros(100, np.int16), 44_100.5, "sample_rate"),
    (np.zeros(100, np.int16), "48000", "sample_rate"),
    (np.zeros(100, np.complex64), 16_000, "integers or floats"),
    (np.zeros((2, 4800), np.int16), 48_000, "transpose"),
    (np.zeros((2, 2, 2), np.float32), 16_000, r"\(samples, channels\)"),
    (np.full(10, np.nan, np.float32), 16_000, "NaN"),
])
def test_push_audio_validation(block, rate, match):
    with pytest.raises(ValueError, match=match):
        PushSource().push_audio(block, rate)


# ------------------------------------------------------------------------------------------------ list devices


def test_list_devices_never_raises_and_says_what_it_found():
    listing = list_devices()
    lines = listing.splitlines()
    assert lines[0].startswith("Cameras") and any(line.startswith("Microphones") for line in lines)
    cameras = lines[1:next(i for i, line in enumerate(lines) if line.startswith("Microphones"))]
    assert cameras and all(line.startswith("  ") for line in cameras)
    if not Path("/dev/video0").exists():
        assert cameras == ["  none found (OpenCV opened no camera at indices 0-9)"]
    microphones = lines[lines.index(next(line for line in lines if line.startswith("Microphones"))) + 1:]
    assert microphones and ("none found" in microphones[0] or "unavailable" in microphones[0]
                            or microphones[0].strip()[0].isdigit())
