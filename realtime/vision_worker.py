"""The vision worker: frames -> the VisionWindow, each frame analysed once, as it enters the window.

Its analyser is the face expert (the starter: seven expression probabilities and the face box, engines/face.py via
realtime/starter.py `FaceScores`) or a checkpoint's vision extractor (face crop + CLIP: an embedding (D,) and the
box); both have `embed_frames([frame]) -> FrameEmbeddings`. The window's `seq_len` frames span `window_s`, so one
frame is analysed every window_s / seq_len seconds (0.256 s), the newest one: the CPU is not spent on frames that
would fall out of the window unseen (docs/live.md, "Vision rate").

Live, `start` runs a thread that takes the newest frame from the LatestFrame the camera (or file, or host) fills;
offline, the replay loop offers each decoded frame itself (realtime/replay.py). Both go through `offer`, paced by
the session's clock (realtime/clock.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np

from realtime.buffers import LatestFrame
from realtime.windows import EmbeddedFrame, VisionWindow


class VisionWorker:
    """Analyses one frame per `interval` (clock seconds) into `window`; a frame that fails is reported, vision goes
    on."""

    def __init__(self, analyser, window: VisionWindow, clock, report: Callable[[str], None]):
        self.analyser = analyser
        self.window = window
        self.clock = clock
        # One analysed frame per interval of media time; a file replayed at `speed` runs that much faster.
        self.interval = clock.span(window.span_s / window.seq_len)
        self._report = report
        self._next_due = clock.now()
        self.latest_frame: np.ndarray | None = None  # the newest frame the live thread took (the overlay draws it)
        self._thread: threading.Thread | None = None

    def offer(self, frame: np.ndarray, t_capture: float) -> None:
        """A new frame: analysed when one is due. Due times are a grid of `interval` from the start: after a gap
        (or a slow analysis) the next frame is analysed at once and the grid resumes past now, never a burst."""
        now = self.clock.now()
        if now < self._next_due:
            return
        self._next_due += self.interval * (int((now - self._next_due) // self.interval) + 1)
        self.analyse(frame, t_capture)

    def analyse(self, frame: np.ndarray, t_capture: float) -> None:
        """Analyse one frame (BGR uint8 (H, W, 3)) into the window."""
        start = time.perf_counter()
        try:
            result = self.analyser.embed_frames([frame])
        except Exception as err:  # noqa: BLE001 - one bad frame must not end vision
            self._report(f"vision extraction failed on a frame: {err}")
            return
        embedding = result.embeddings[0] if result.present[0] else None
        self.window.add(EmbeddedFrame(t_capture, embedding, result.boxes[0], (time.perf_counter() - start) * 1e3))

    # -- live: a thread over the LatestFrame ---------------------------------------------------------------------

    def start(self, frames: LatestFrame, stop: threading.Event) -> VisionWorker:
        self._thread = threading.Thread(target=self._run, args=(frames, stop), name="mcihn-vision", daemon=True)
        self._thread.start()
        return self

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self, frames: LatestFrame, stop: threading.Event) -> None:
        seen = 0
        while not stop.is_set():
            item = frames.wait_new(seen, timeout=0.1)
            if item is None:
                continue
            seen = item.seq
            self.latest_frame = item.frame_bgr
            self.offer(item.frame_bgr, item.t_capture)
