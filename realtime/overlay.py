"""The overlay: live video with the face box, a bar per score (or a valence gauge), the modalities present, the
caption (committed words, uncommitted tail dimmed) and a latency/fps line. `q` or Esc quits.

Drawing (`render`) is a pure function of a frame and the latest event, tested on its own; `OverlayWindow` shows
it with OpenCV's HighGUI, which aborts the whole process when there is no display, so `display_available()`
is asked first (in a child process: the abort cannot be caught).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import cv2
import numpy as np

from realtime.events import EmotionEvent

WINDOW = "mcihn-live"
GREEN, RED, WHITE, GREY, YELLOW = (80, 200, 80), (60, 60, 220), (240, 240, 240), (150, 150, 150), (0, 215, 255)
FONT = cv2.FONT_HERSHEY_SIMPLEX


def display_available() -> bool:
    """True when a window can be opened: a display is set and OpenCV can open a window on it."""
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return False
    probe = "import cv2; cv2.namedWindow('probe'); cv2.waitKey(1); cv2.destroyAllWindows()"
    try:
        result = subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def _text(img: np.ndarray, text: str, org: tuple[int, int], color=WHITE, scale: float = 0.5, thick: int = 1) -> None:
    """Text with a dark outline, readable over any video."""
    cv2.putText(img, text, org, FONT, scale, (0, 0, 0), thick + 2, cv2.LINE_AA)
    cv2.putText(img, text, org, FONT, scale, color, thick, cv2.LINE_AA)


def _panel(img: np.ndarray, x0: int, y0: int, x1: int, y1: int, alpha: float = 0.55) -> None:
    """Darken a rectangle so text and bars stand out."""
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, img.shape[1]), min(y1, img.shape[0])
    img[y0:y1, x0:x1] = (img[y0:y1, x0:x1] * (1 - alpha)).astype(img.dtype)


def draw_scores(img: np.ndarray, event: EmotionEvent, x: int, y: int, width: int = 220) -> int:
    """A bar per label (classification) or a valence gauge from -3 to 3 (regression). Returns the next y."""
    if not event.scores:
        _text(img, "no face and no words yet", (x, y + 14), GREY, 0.5)
        return y + 26
    if event.head == "regression":
        value = float(next(iter(event.scores.values())))
        _text(img, f"valence {value:+.2f}", (x, y + 14))
        y += 22
        cv2.rectangle(img, (x, y), (x + width, y + 14), GREY, 1)
        mid = x + width // 2
        end = int(mid + np.clip(value / 3.0, -1, 1) * width / 2)
        cv2.rectangle(img, (min(mid, end), y + 2), (max(mid, end), y + 12), GREEN if value >= 0 else RED, -1)
        cv2.line(img, (mid, y - 2), (mid, y + 16), WHITE, 1)
        return y + 24
    for label, score in sorted(event.scores.items(), key=lambda kv: -kv[1]):
        cv2.rectangle(img, (x + 90, y + 3), (x + 90 + int(np.clip(score, 0, 1) * (width - 90)), y + 15), GREEN, -1)
        cv2.rectangle(img, (x + 90, y + 3), (x + width, y + 15), GREY, 1)
        _text(img, f"{label[:10]}", (x, y + 14))
        y += 20
    return y + 4


def render(frame: np.ndarray | None, event: EmotionEvent | None, fps: float = 0.0,
           size: tuple[int, int] = (640, 480), min_width: int = 640) -> np.ndarray:
    """The overlay image (BGR) for the newest frame and event; a grey canvas when there is no video. Small frames
    are scaled up to `min_width` so the panel stays readable."""
    scale = 1.0
    if frame is None:
        img = np.full((size[1], size[0], 3), 40, np.uint8)
    elif frame.shape[1] < min_width:
        scale = min_width / frame.shape[1]
        img = cv2.resize(frame, (min_width, round(frame.shape[0] * scale)), interpolation=cv2.INTER_LINEAR)
    else:
        img = frame.copy()
    h, w = img.shape[:2]
    if event is None:
        _text(img, "waiting for the first update...", (10, 24))
        return img
    face = event.presence.vision.face
    if face is not None and frame is not None:
        x, y, fw, fh = (round(v * scale) for v in face)
        cv2.rectangle(img, (x, y), (x + fw, y + fh), GREEN, 2)
    own = [(name, event.modalities[m].scores) for m, name in (("vision", "face"), ("text", "text"))
           if event.modalities[m].scores]
    rows = (max(len(event.scores), 1) if event.head == "classification" else 2) + len(own)
    _panel(img, 0, 0, 250, 60 + rows * 22)
    y = 8
    if event.untrained:
        _text(img, "UNTRAINED (random stand-ins)", (10, y + 14), YELLOW, 0.5, 1)
        y += 22
    y = draw_scores(img, event, 10, y)
    for name, scores in own:  # each modality's own top emotion, under the fused bars
        label, value = max(scores.items(), key=lambda kv: kv[1])
        _text(img, f"{name}: {label} {value:.2f}", (10, y + 12), WHITE, 0.45)
        y += 20
    p = event.presence
    flags = [("face", p.vision.present), ("voice", p.audio.voiced), ("text", p.text.present)]
    x = 10
    for name, on in flags:
        _text(img, name, (x, y + 12), GREEN if on else GREY, 0.45)
        x += 62
    # Caption: committed words white, the uncommitted tail grey (shown, never fused); the last two lines.
    width = max(20, w // 11)
    lines = [(line, WHITE) for line in textwrap.wrap(p.text.text, width)]
    lines += [(line, GREY) for line in textwrap.wrap(p.text.tail, width)]
    lines = lines[-2:]
    if lines:
        _panel(img, 0, h - 26 * len(lines) - 30, w, h - 22)
        for i, (line, color) in enumerate(lines):
            _text(img, line, (10, h - 26 * (len(lines) - i) - 8), color, 0.55)
    latency = event.latency_ms.get("capture_to_emit", 0.0)
    _panel(img, 0, h - 22, w, h)
    _text(img, f"#{event.seq}  latency {latency:.0f} ms  {fps:.1f} updates/s  skipped {event.skipped_ticks}",
          (10, h - 7), WHITE, 0.45)
    return img


class OverlayWindow:
    """An OpenCV window; call `show` from the thread that created it (HighGUI is not thread-safe)."""

    def __init__(self, title: str = WINDOW):
        self.title = title
        cv2.namedWindow(self.title, cv2.WINDOW_NORMAL)

    def show(self, img: np.ndarray, wait_ms: int = 1) -> bool:
        """Show `img`; False when the user pressed q or Esc, or closed the window."""
        cv2.imshow(self.title, img)
        key = cv2.waitKey(wait_ms) & 0xFF
        closed = cv2.getWindowProperty(self.title, cv2.WND_PROP_VISIBLE) < 1
        return not (key in (ord("q"), 27) or closed)

    def close(self) -> None:
        cv2.destroyWindow(self.title)
        cv2.waitKey(1)
