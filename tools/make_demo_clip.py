"""Rebuild realtime/assets/demo.mp4, the clip `mcihn-live --demo` replays (kept in the repository, ~0.45 MB).

Three scenes, each a real face and an espeak-ng sentence of a clearly different emotion, with a pause between:
a smiling face (NASA's public-domain portrait of astronaut Eileen Collins, scikit-image's `astronaut`) saying a
joyful sentence; a neutral face (the U.S. Navy's public-domain portrait of Grace Hopper, matplotlib's sample
data) saying an angry one, then a sad one; then 3.5 seconds of an empty frame and silence (longer than the 2.56 s
window), so the demo also shows the face and the voice going absent. A slow zoom keeps the face box moving.

    .venv/bin/python -m tools.make_demo_clip            # needs scikit-image, matplotlib (dev extra), espeak-ng
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import wave
from pathlib import Path

import cv2
import numpy as np

# (face, sentence): the emotion each sentence is meant to show is in docs/models.md.
SCENES = (
    ("astronaut", "I am so happy today! This is wonderful news, I love it!"),
    ("hopper", "Stop it! This is outrageous. I am so mad at you!"),
    ("hopper", "I am so sad. I miss her terribly, and I cannot stop crying."),
)
FPS = 15
SIZE = 320
PAUSE_S = 1.5
BLANK_S = 3.5


def speech(text: str) -> tuple[np.ndarray, int]:
    """espeak-ng speech as float32 mono and its sample rate."""
    if shutil.which("espeak-ng") is None:
        raise SystemExit("make_demo_clip: espeak-ng is not installed (apt-get install espeak-ng)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "speech.wav"
        subprocess.run(["espeak-ng", "-s", "150", "-w", str(path), text], check=True)
        with wave.open(str(path)) as w:
            rate = w.getframerate()
            samples = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768
    return samples, rate


def face_image(name: str) -> tuple[np.ndarray, float]:
    """A real face photo (BGR) and where its face lies across the width (fraction of the free margin)."""
    if name == "astronaut":
        from skimage.data import astronaut

        return cv2.cvtColor(astronaut(), cv2.COLOR_RGB2BGR), 0.4
    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        data = np.frombuffer(f.read(), np.uint8)
    return cv2.imdecode(data, cv2.IMREAD_COLOR), 0.5


def frames(name: str, n: int) -> list[np.ndarray]:
    """n frames of a face with a slow zoom (1.0 -> 1.25) centred on it."""
    image, across = face_image(name)
    side = min(image.shape[:2])
    out = []
    for i in range(n):
        zoom = 1.0 + 0.25 * i / max(n - 1, 1)
        crop = int(side / zoom)
        x0 = int((image.shape[1] - crop) * across)
        out.append(cv2.resize(image[:crop, x0 : x0 + crop], (SIZE, SIZE), interpolation=cv2.INTER_AREA))
    return out


def main(out: str | Path | None = None) -> Path:
    from engines.media import write_clip
    from realtime.demo import DEMO_CLIP

    out = out or DEMO_CLIP
    audio, video, rate = [], [], 22050
    for face, sentence in SCENES:
        said, rate = speech(sentence)
        said = np.concatenate([said, np.zeros(int(PAUSE_S * rate), np.float32)])
        audio.append(said)
        video += frames(face, int(round(len(said) / rate * FPS)))
    audio.append(np.zeros(int(BLANK_S * rate), np.float32))
    video += [np.full((SIZE, SIZE, 3), 24, np.uint8)] * int(BLANK_S * FPS)
    audio = np.concatenate(audio)
    path = write_clip(out, video, FPS, audio=audio, sample_rate=rate, codec="libx264", bit_rate=150_000)
    print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB, {len(audio) / rate:.1f} s)", file=sys.stderr)
    return path


# `mcihn bench`'s script: nine everyday sentences (56 words) that Whisper tiny.en hears right whole when espeak-ng
# says them (checked one by one; "The train leaves at seven tonight" and "Can you help me carry these boxes?"
# were not), so its word error rate measures the streaming, not espeak's accent.
BENCH_SCRIPT = (
    "The sun is shining this morning.", "Please open the window for me.", "We will meet again next week.",
    "My brother bought a new car.", "This coffee is much too cold.", "I am so happy to see you again.",
    "I cannot believe you lied to me.", "Thank you for the lovely dinner.", "The meeting was moved to Friday.",
)
BENCH_FORMAT = 1  # in the cached file's name: raise it when the clip changes


def bench_clip(folder: str | Path) -> Path:
    """The clip `mcihn bench` replays (built once into `folder`, ~45 s): BENCH_SCRIPT spoken by espeak-ng with
    PAUSE_S between sentences, over the demo clip's two faces (one per sentence, in turn)."""
    from engines.media import write_clip
    from realtime.demo import DEMO_CLIP
    from realtime.file_source import media_items

    path = Path(folder).expanduser() / f"bench-v{BENCH_FORMAT}.mp4"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    faces = [d for _, kind, d in media_items(DEMO_CLIP) if kind == "video"]
    faces = faces[: len(faces) - int(BLANK_S * FPS)]  # the demo's talking part, without its empty end
    audio, video, rate = [], [], 22050
    for i, sentence in enumerate(BENCH_SCRIPT):
        said, rate = speech(sentence)
        said = np.concatenate([said, np.zeros(int(PAUSE_S * rate), np.float32)])
        audio.append(said)
        n = int(round(len(said) / rate * FPS))
        start = 0 if i % 2 == 0 else len(faces) // 2  # the demo's first face, then its second
        video += [faces[(start + j) % len(faces)] for j in range(n)]
    partial = path.with_name(f"{path.stem}.partial.mp4")
    write_clip(partial, video, FPS, audio=np.concatenate(audio), sample_rate=rate, codec="libx264",
               bit_rate=150_000)
    return partial.replace(path)


if __name__ == "__main__":
    main()
