"""The vision worker: frames -> the VisionWindow, each frame analysed once, as it enters the window.

Its analyser is the face expert (the starter: seven expression probabilities and the face box, engines/face.py via
realtime/starter.py `FaceScores`) or a checkpoint's vision extractor (face crop + CLIP: an embedding (D,) and the
box); both have `embed_frames([frame]) -> FrameEmbeddings`. The window's `seq_len` frames span `window_s`, so one
frame is analysed every window_s / seq_len seconds (0.256 s), the newest one: the CPU is not spent on frames that
would fall out of the window unseen (docs/live.md, "Vision rate").

Live, the tick drives it: at the start of each tick `begin` hands the newest frame to the analysis thread, the tick
computes the audio meanwhile, and `wait` joins the two before fusing (docs/live.md, "Vision rate"). The frame
fused is then at most a camera frame old when its analysis starts, instead of anywhere up to an interval old
plus its analysis, and vision and audio use the two cores side by side. A thread follows the LatestFrame the
camera (or file, or host) fills, for the overlay. Offline, the replay loop offers each decoded frame itself
(realtime/replay.py) on a grid of media time, paced by the session's clock (realtime/clock.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np

from engines.window import FrameGrid
from realtime.buffers import LatestFrame
from realtime.remote import ServerError
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
        # Offline, frames are analysed on this grid of media time, as `mcihn extract` picks a clip's frames.
        self._grid = FrameGrid(self.interval, start=clock.now())
        self.latest_frame: np.ndarray | None = None  # the newest frame the live thread took (the overlay draws it)
        self._thread: threading.Thread | None = None
        # Live (tick-driven): the analysis thread, the analysis in flight, and what was analysed last.
        self._frames: LatestFrame | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._analysed_seq = 0
        self._analysed_at = -float("inf")

    def offer(self, frame: np.ndarray, t_capture: float) -> None:
        """A new frame: analysed when one is due. Due times are a grid of `interval` from the start: after a gap
        (or a slow analysis) the next frame is analysed at once and the grid resumes past now, never a burst."""
        if self._grid.due(self.clock.now()):
            self.analyse(frame, t_capture)

    def analyse(self, frame: np.ndarray, t_capture: float) -> None:
        """Analyse one frame (BGR uint8 (H, W, 3)) into the window."""
        start = time.perf_counter()
        try:
            result = self.analyser.embed_frames([frame])
        except ServerError:  # the inference server is down: reported once by realtime/remote.py, vision absent
            return
        except Exception as err:  # noqa: BLE001 - one bad frame must not end vision
            self._report(f"vision extraction failed on a frame: {err}")
            return
        embedding = result.embeddings[0] if result.present[0] else None
        self.window.add(EmbeddedFrame(t_capture, embedding, result.boxes[0], (time.perf_counter() - start) * 1e3))

    # -- live: driven by the tick ---------------------------------------------------------------------------------

    @property
    def tick_driven(self) -> bool:
        return self._pool is not None

    def start(self, frames: LatestFrame, stop: threading.Event) -> VisionWorker:
        self._frames = frames
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="mcihn-vision")
        self._thread = threading.Thread(target=self._follow, args=(frames, stop), name="mcihn-frames", daemon=True)
        self._thread.start()
        return self

    def begin(self) -> Future | None:
        """The tick starts: the newest frame not yet analysed goes to the analysis thread, at most one per
        0.9 `interval` (a tick faster than the vision rate analyses on every few ticks, never more often) and one
        at a time. Returns the analysis in flight, if any, for `wait`."""
        if self._pool is None or self._frames is None:
            return None
        if self._pending is not None and not self._pending.done():
            return self._pending
        now = self.clock.now()
        if now - self._analysed_at < 0.9 * self.interval:
            return None
        item = self._frames.get_new(self._analysed_seq)
        if item is None:
            return None
        self._analysed_seq, self._analysed_at = item.seq, now
        self._pending = self._pool.submit(self.analyse, item.frame_bgr, item.t_capture)
        return self._pending

    @staticmethod
    def wait(pending: Future | None, timeout: float) -> None:
        """Wait up to `timeout` s for an analysis `begin` started (a slower one enters the window when it ends)."""
        if pending is not None:
            try:
                pending.result(timeout)
            except FutureTimeout:
                pass

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _follow(self, frames: LatestFrame, stop: threading.Event) -> None:
        """Keep `latest_frame` current for the overlay (no analysis here)."""
        seen = 0
        while not stop.is_set():
            item = frames.wait_new(seen, timeout=0.1)
            if item is not None:
                seen = item.seq
                self.latest_frame = item.frame_bgr
