"""Freshness: stale input is absent, presence "now" follows the face and the voice within half a second, and a
file that breaks part-way ends the session with its error instead of fusing its last window for ever."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import wave
from pathlib import Path

import cv2
import numpy as np
import pytest

from realtime.recognizer import LiveConfig, Recognizer, RecognizerError

ESPEAK = shutil.which("espeak-ng")
FACE_GAP = (2.0, 4.0)  # seconds of the clip without a face
SILENCE_S = 2.0  # the pause between the two sentences


def speech(text: str, folder: Path) -> np.ndarray:
    """espeak-ng speech, 16 kHz float32."""
    from scipy.signal import resample_poly

    path = folder / "speech.wav"
    subprocess.run([ESPEAK, "-w", str(path), text], check=True)
    with wave.open(str(path)) as w:
        x = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768
        return resample_poly(x, 16_000, w.getframerate()).astype(np.float32)


@pytest.fixture(scope="module")
def gaps_clip(tmp_path_factory) -> tuple[Path, tuple[float, float]]:
    """8+ s: the astronaut's face with a 2 s gap (FACE_GAP); two sentences with a 2 s pause between them."""
    if ESPEAK is None:
        pytest.skip("espeak-ng not installed (apt-get install espeak-ng)")
    from skimage.data import astronaut

    from engines.media import write_clip

    folder = tmp_path_factory.mktemp("gaps")
    first, second = speech("I am talking to you right now.", folder), speech("And now I am talking again.", folder)
    rate, fps = 16_000, 15
    audio = np.concatenate([np.zeros(rate // 2, np.float32), first, np.zeros(int(SILENCE_S * rate), np.float32),
                            second, np.zeros(rate, np.float32)])
    voice_gap = (0.5 + len(first) / rate, 0.5 + len(first) / rate + SILENCE_S)
    face = cv2.resize(cv2.cvtColor(astronaut(), cv2.COLOR_RGB2BGR), (320, 320))
    blank = np.full_like(face, 30)
    n = int(len(audio) / rate * fps)
    frames = [blank if FACE_GAP[0] <= i / fps < FACE_GAP[1] else face for i in range(n)]
    path = folder / "gaps.mp4"
    write_clip(path, frames, fps, audio=audio, sample_rate=rate)
    return path, voice_gap


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    from realtime.demo import prepare_demo

    folder = tmp_path_factory.mktemp("cache")
    prepare_demo(folder / "demo")
    return folder


def assert_follows(events, flag, gap: tuple[float, float], what: str) -> None:
    """`flag(event)` goes false within 0.5 s of the gap's start, stays false in it, and is true again within 0.5 s
    of its end (event times are media times: the clip is stepped by media time)."""
    start, end = gap
    before = [e for e in events if start - 1.0 <= e.t_media < start - 0.1]
    gone = [e for e in events if start + 0.5 <= e.t_media < end]
    back = [e for e in events if end + 0.5 <= e.t_media < end + 1.0]
    assert before and gone and back, f"{what}: no events around the gap {gap}"
    assert all(flag(e) for e in before), f"{what} not present before the gap"
    assert not any(flag(e) for e in gone), f"{what} still reported more than 0.5 s into the gap: " \
        f"{[(e.t_media, flag(e)) for e in gone]}"
    assert all(flag(e) for e in back), f"{what} not back within 0.5 s of the gap's end: " \
        f"{[(e.t_media, flag(e)) for e in back]}"


def test_face_and_voice_now_follow_the_gaps(gaps_clip, cache):
    clip, voice_gap = gaps_clip
    config = LiveConfig(demo=True, standins="tiny", cache_dir=str(cache), backend="torch", source=str(clip), speed=0,
                        use_asr=False)
    with Recognizer(config) as rec:
        events = list(rec)
    assert_follows(events, lambda e: e.presence.vision.now, FACE_GAP, "the face")
    assert_follows(events, lambda e: e.presence.audio.now, voice_gap, "the voice")
    # The overlay draws the face box only while there is a face now.
    assert all((e.presence.vision.face is not None) == e.presence.vision.now for e in events)
    # The window still fuses the frames with a face it holds: "present" lags "now" by up to the window.
    in_gap = [e for e in events if FACE_GAP[0] + 0.5 <= e.t_media < FACE_GAP[0] + 1.5]
    assert any(e.presence.vision.present for e in in_gap)
    assert all(e.presence.vision.fresh and e.presence.vision.age_s < 1.0 for e in events[8:])


def test_audio_that_stops_ages_out(cache):
    """A microphone that stops delivering: its last window is not fused for ever, and latency does not grow."""
    config = LiveConfig(demo=True, standins="tiny", cache_dir=str(cache), backend="torch", source="push", hop_s=0.1,
                        use_asr=False, window_s=1.0)
    tone = (0.3 * np.sin(np.arange(1600) / 16_000 * 2 * np.pi * 220)).astype(np.float32)
    with Recognizer(config) as rec:
        for _ in range(10):
            rec.push_audio(tone, 16_000)
            time.sleep(0.1)
        while_sound = rec.latest_event
        time.sleep(2.0)
        after = rec.latest_event
    assert while_sound.presence.audio.present and while_sound.presence.audio.fresh
    assert not after.presence.audio.present and not after.presence.audio.fresh
    assert after.presence.audio.age_s > 1.5
    assert after.latency_ms["capture_to_emit"] < 1000  # stale audio is not "the newest input used"


def corrupt_clip(path: Path) -> Path:
    """A clip that opens and plays for ~5 s, then hits garbage (a quarter of the file overwritten)."""
    from engines.media import write_clip

    frames = [np.full((240, 320, 3), (i * 7) % 255, np.uint8) for i in range(150)]
    audio = (0.3 * np.sin(np.arange(16_000 * 10) / 16_000 * 2 * np.pi * 220)).astype(np.float32)
    write_clip(path, frames, 15, audio=audio, sample_rate=16_000)
    data = bytearray(path.read_bytes())
    n = len(data)
    data[n // 2 : n // 2 + n // 4] = np.random.default_rng(0).integers(0, 256, n // 4, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("speed", ["1", "0"])
def test_file_that_breaks_part_way_ends_with_its_error(cache, tmp_path, speed):
    clip, jsonl = corrupt_clip(tmp_path / "broken.mp4"), tmp_path / "events.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "DISPLAY"}
    env["HF_HUB_OFFLINE"] = "1"
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "realtime", "--standins", "tiny", "--cache-dir", str(cache),
                             "--source", str(clip), "--speed", speed, "--no-asr", "--jsonl", str(jsonl), "--quiet"],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "broken.mp4" in errors[0] and "ended early" in errors[0], result.stderr
    assert time.monotonic() - start < 60
    events = [json.loads(line) for line in jsonl.read_text().splitlines()]  # every line a whole event
    assert events and [e["seq"] for e in events] == list(range(len(events)))
    assert any("broken.mp4" in fault for e in events for fault in e["faults"]) or speed == "0"


def test_api_consumer_sees_the_error(cache, tmp_path):
    clip = corrupt_clip(tmp_path / "broken.mp4")
    config = LiveConfig(demo=True, standins="tiny", cache_dir=str(cache), backend="torch", source=str(clip), speed=0,
                        use_asr=False)
    events = []
    with pytest.raises(RecognizerError, match="broken.mp4"), Recognizer(config) as rec:
        for event in rec:
            events.append(event)
    assert events and rec.error and rec.faults[-1] == rec.error


def test_camera_that_dies_mid_stream_is_one_fault_and_vision_goes_stale(cache, tmp_path):
    """A camera that stops delivering (here a 1 s video file opened as the camera: it ends) is reported once, in
    the fault list and in an event, and vision goes absent; the camera is retried."""
    from engines.media import write_clip

    frames = [cv2.resize(np.full((240, 320, 3), 90, np.uint8), (320, 240))] * 15
    camera = write_clip(tmp_path / "cam.avi", frames, 15)
    config = LiveConfig(demo=True, standins="tiny", cache_dir=str(cache), backend="torch", source="devices",
                        camera=str(camera), use_mic=False, hop_s=0.1)
    with Recognizer(config) as rec:
        time.sleep(4.0)
        events = []
        while not rec._events.empty():
            events.append(rec._events.get_nowait())
    died = [f for f in rec.faults if "stopped delivering frames" in f]
    assert len(died) >= 1 and "retrying the camera" in died[0], rec.faults
    assert any(died[0] in e.faults for e in events)
    # Each time it died (the retry reopens the file, which ends again) it was carried by one event only.
    assert len([f for e in events for f in e.faults if f == died[0]]) == len(died)
    stale = [e for e in events if e.presence.vision.age_s is not None and e.presence.vision.age_s > 1.0]
    assert stale and all(not e.presence.vision.fresh for e in stale)


def test_speech_recognition_that_fails_takes_its_text_with_it(cache, gaps_clip, monkeypatch):
    """An ASR worker that raises: one fault, and the words it committed are no longer fused."""
    from realtime import asr

    clip, _ = gaps_clip
    real_process, calls = asr.StreamingTranscriber.process, {"n": 0}

    def failing_process(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 6:
            raise RuntimeError("injected: the model crashed")
        return real_process(self, *args, **kwargs)

    monkeypatch.setattr(asr.StreamingTranscriber, "process", failing_process)
    config = LiveConfig(demo=True, standins="tiny", cache_dir=str(cache), backend="torch", source=str(clip),
                        speed=0)
    with Recognizer(config) as rec:
        events = list(rec)
    failed = [f for f in rec.faults if "speech recognition stopped" in f]
    assert len(failed) == 1 and "injected" in failed[0]
    at = next(i for i, e in enumerate(events) if failed[0] in e.faults)
    assert all(not e.presence.text.present and not e.presence.text.fused for e in events[at:])
