"""Rebuild realtime/assets/demo.mp4, the clip `mcihn-live --demo` replays (kept in the repository, ~0.2 MB).

Picture: NASA's public-domain portrait of astronaut Eileen Collins (scikit-image's `astronaut`), 320 x 320,
with a slow zoom so the face box moves; speech: espeak-ng (Debian package espeak-ng); then two seconds of an
empty frame and silence, so the demo also shows vision and audio going absent.

    .venv/bin/python -m tools.make_demo_clip            # needs scikit-image (dev extra) and espeak-ng
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

SPEECH = ("Hello! I am really happy to see you today. This is a demo of live emotion recognition, "
          "with my face, my voice and my words.")
FPS = 15
SIZE = 320
BLANK_S = 2.0


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


def frames(n_face: int, n_blank: int) -> list[np.ndarray]:
    from skimage.data import astronaut

    image = cv2.cvtColor(astronaut(), cv2.COLOR_RGB2BGR)
    out = []
    for i in range(n_face):
        zoom = 1.0 + 0.25 * i / max(n_face - 1, 1)  # 1.0 -> 1.25, centred on the face
        crop = int(image.shape[0] / zoom)
        x0 = int((image.shape[1] - crop) * 0.4)
        out.append(cv2.resize(image[:crop, x0 : x0 + crop], (SIZE, SIZE), interpolation=cv2.INTER_AREA))
    out += [np.full((SIZE, SIZE, 3), 24, np.uint8)] * n_blank
    return out


def main(out: str | Path | None = None) -> Path:
    from engines.media import write_clip
    from realtime.demo import DEMO_CLIP

    out = out or DEMO_CLIP
    audio, rate = speech(SPEECH)
    audio = np.concatenate([audio, np.zeros(int(BLANK_S * rate), np.float32)])
    n_face = int(round((len(audio) / rate - BLANK_S) * FPS))
    path = write_clip(out, frames(n_face, int(BLANK_S * FPS)), FPS, audio=audio, sample_rate=rate, codec="libx264",
                      bit_rate=300_000)
    print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB, {len(audio) / rate:.1f} s)", file=sys.stderr)
    return path


if __name__ == "__main__":
    main()
