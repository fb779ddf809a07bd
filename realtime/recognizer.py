"""The Recognizer: sources -> windows -> extractors -> fusion -> EmotionEvents to every sink. The `mcihn-live`
command is a thin shell over it; whatever the command can do, the API can.

    with Recognizer(LiveConfig(checkpoint="runs/sims/seed_0")) as rec:
        for event in rec:
            print(event.seq, event.scores, event.latency_ms["capture_to_emit"])

This file only wires the stages, each in its own file with one job (docs/live.md follows one frame through them):
    capture   realtime/sources.py, realtime/file_source.py -> LatestFrame, AudioRing (realtime/buffers.py)
    workers   realtime/vision_worker.py (frames -> VisionWindow), realtime/asr.py (audio -> words -> TextWindow)
    tick      realtime/tick.py (windows -> presence -> fusion -> EmotionEvent), every hop (realtime/scheduler.py)
    emit      realtime/emitter.py (sinks, the host's queue)
    faults    realtime/faults.py (said once, in the next event; sources watched at every tick)
    what runs realtime/stack.py (models and backends), realtime/config.py (LiveConfig)
Live, each stage has its thread: one per capture source, the vision worker, the ASR worker, the tick thread and
the sinks' own. Offline (speed 0) one thread steps the same stages by media time (realtime/replay.py); the clock
(realtime/clock.py) is the only difference.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np

from realtime import lifecycle
from realtime.buffers import AudioRing, LatestFrame
from realtime.clock import MediaClock, WallClock
from realtime.config import DEFAULT_CACHE, ConfigError, LiveConfig
from realtime.emitter import Emitter, build_sinks
from realtime.events import EmotionEvent
from realtime.faults import FILE_STALL_S, Faults, SourceWatch
from realtime.scheduler import Ticker
from realtime.stack import Stack, TickBuffers, cpu_thread_budget, load_checkpoint_stack, load_stack
from realtime.tick import AUDIO_FRESH_S, VISION_FRESH_S, Tick
from realtime.vision_worker import VisionWorker
from realtime.windows import TextWindow, VisionWindow

# What hosts and tests import from here, wherever it lives now.
__all__ = ["AUDIO_FRESH_S", "DEFAULT_CACHE", "FILE_STALL_S", "VISION_FRESH_S", "ConfigError", "LiveConfig",
           "Recognizer", "RecognizerError", "Stack", "TickBuffers", "cpu_thread_budget", "load_checkpoint_stack",
           "load_stack"]


class RecognizerError(RuntimeError):
    """The session ended on an error (a file that stopped advancing, a failed tick): raised to the iterating host
    after the events emitted before it."""


class Recognizer:
    """The live recognizer. A context manager and an iterator over EmotionEvents; callbacks via `on_event`."""

    def __init__(self, config: LiveConfig, stack: Stack | None = None):
        self.config = config
        self._stack = stack
        self.frames = LatestFrame()
        self.ring = AudioRing(capacity_s=max(30.0, 2 * (config.window_s or 0.0)))
        self.sources: list = []
        self._done = threading.Event()  # the session ended: the offline replay finished, or an error ended it
        self._faults = Faults(self._done)
        self.faults: list[str] = self._faults.lines  # one line per fault met during the session (camera gone, ...)
        self._emitter = Emitter(config.queue_size)
        self._callbacks: list[Callable[[EmotionEvent], None]] = []
        self._stop = threading.Event()
        self.clock: WallClock | None = None
        self.vision_window: VisionWindow | None = None
        self.text_window: TextWindow | None = None
        self.vision: VisionWorker | None = None
        self.memory = None  # realtime.memory.MemoryTrimmer while running
        self.asr = None
        self.tick: Tick | None = None
        self.ticker: Ticker | None = None
        self._watch: SourceWatch | None = None
        self._replay = None  # realtime.replay.OfflineReplay at speed 0
        self._file = None
        self._push = None
        self.recorder = None
        self.started = False

    # -- what the stages hold, as the host sees it ----------------------------------------------------------

    @property
    def error(self) -> str | None:
        """What ended the session, when an error did (raised to iterating hosts, printed by the CLI)."""
        return self._faults.error

    @error.setter
    def error(self, line: str | None) -> None:
        self._faults.error = line

    @property
    def sinks(self):
        """The open SinkGroup (realtime/sinks.py), None before start()."""
        return self._emitter.sinks

    @property
    def latest_event(self) -> EmotionEvent | None:
        return self._emitter.latest

    @property
    def events_dropped(self) -> int:
        """Events the host's queue dropped because nobody iterated (callbacks or sinks only)."""
        return self._emitter.dropped

    @property
    def _events(self):
        return self._emitter.queue

    @property
    def _t_start(self) -> float:
        """The clock time of media time 0 (the session's start, or a file source's); `mcihn bench` lines the ASR's
        commits up with the clip's script by it."""
        return self.clock.t0 if self.clock is not None else 0.0

    @property
    def latest_frame(self) -> np.ndarray | None:
        """The newest frame read (by the vision worker live, by the replay offline): the overlay draws it."""
        reader = self._replay if self._replay is not None else self.vision
        return reader.latest_frame if reader is not None else None

    # -- lifecycle -------------------------------------------------------------------------------------------

    def on_event(self, callback: Callable[[EmotionEvent], None]) -> None:
        """Call `callback(event)` for every event (on a sink thread; exceptions are reported, not raised)."""
        if self.started:
            raise RuntimeError("register callbacks before start()")
        self._callbacks.append(callback)

    def start(self) -> Recognizer:
        lifecycle.register(self)  # stopped at interpreter exit if the host never calls stop()
        cfg = self.config
        from realtime.memory import limit_malloc_arenas

        limit_malloc_arenas(cfg.malloc_arenas)  # before this session's threads (PyAV's, the models') first allocate
        if cfg.source not in ("devices", "push"):
            from realtime.file_source import check_media

            check_media(cfg.source)  # an unreadable file is said before seconds of model loading
        self.stack = self._stack or load_stack(cfg)
        if self.stack.server is not None:  # a lost or slow inference server is a fault of this session
            self.stack.server.report = self._faults.report
        self._buffers = TickBuffers(self.stack)
        self.clock = WallClock()  # media time 0 now; a file source or the offline replay brings its own clock
        if cfg.record:
            from realtime.recorder import Recorder

            self.recorder = Recorder(cfg.record, self.frames, self.ring)
        labels = self.stack.labels if self.stack.head == "classification" else ["valence"]
        self._emitter.open(build_sinks(cfg, labels, self._callbacks), report=self._faults.report)
        try:
            self._start_sources()
            self._start_workers()
        except BaseException:
            self.stop()
            raise
        self.started = True
        if cfg.trim_memory_s > 0:
            from realtime.memory import MemoryTrimmer

            self.memory = MemoryTrimmer(cfg.trim_memory_s).start()
            if self.asr is not None:  # trim when a pass has just freed its buffers
                self.asr.after_pass = self.memory.mark_quiet
        if self._replay is not None:
            self._replay.start()
        else:
            self.ticker = Ticker(self.clock.span(cfg.hop_s), self._on_tick).start()
        return self

    def _start_sources(self) -> None:
        from realtime.sources import CameraSource, MicrophoneSource, PushSource, SourceError

        cfg = self.config
        if cfg.source == "push":
            self._push = PushSource(self.frames, self.ring).start()
            self.sources.append(self._push)
        elif cfg.source == "devices":
            if cfg.use_camera:
                try:
                    self.sources.append(CameraSource(cfg.camera, cfg.width, cfg.height, cfg.fps, self.frames).start())
                except SourceError as err:
                    self._faults.report(f"{err}; going on without vision")
            if cfg.use_mic:
                try:
                    self.sources.append(MicrophoneSource(cfg.mic, self.ring).start())
                except SourceError as err:
                    self._faults.report(f"{err}; going on without audio and speech")
            if not self.sources:
                raise SourceError("no camera and no microphone could be opened; check the devices "
                                  "(mcihn-live --list-devices) or replay a file with --source PATH")
        elif cfg.speed == 0:
            self.clock = MediaClock()  # the offline replay reads the file itself (in _start_workers)
        else:
            from realtime.file_source import FileSource

            self._file = FileSource(cfg.source, self.frames, self.ring, speed=cfg.speed, loop=cfg.loop).start()
            self.clock = WallClock(self._file.t0, rate=cfg.speed)
            self.sources.append(self._file)
        if self.recorder is not None:
            self.recorder.start()
        self._watch = SourceWatch(self.sources, self._faults, self.frames, self.ring, cfg, self._stop, self._file)

    def _start_workers(self) -> None:
        """The stages after capture: the vision worker, the text window and its ASR worker, the tick. Live they
        run on their own threads; offline the replay steps them."""
        cfg, stack = self.config, self.stack
        analyser = stack.face if stack.face is not None else stack.extractors.get("vision")
        if analyser is not None and (cfg.source != "devices" or cfg.use_camera):
            seq_len, dim = self._buffers.vision_shape
            self.vision_window = VisionWindow(seq_len, dim, stack.window.vision_span_s)
            self.vision = VisionWorker(analyser, self.vision_window, self.clock, report=self._faults.report)
        self.text_window = TextWindow(stack.extractors["text"]) if "text" in stack.modalities else None
        has_audio = cfg.source != "devices" or cfg.use_mic
        if cfg.use_asr and has_audio and self.text_window is not None:
            from realtime.asr import AsrWorker, StreamingTranscriber, ring_reader

            transcriber = StreamingTranscriber(stack.asr_options, clock=self.clock.now)
            # From the session's first sample: the sources started before this worker, and a clip's first word
            # must not be cut.
            self.asr = AsrWorker(transcriber, ring_reader(self.ring, 0), on_error=self._faults.asr_failed,
                                 on_update=self._words_committed)
        self.tick = Tick(stack, cfg, self._buffers, self.clock, self.ring, self.frames, self.vision,
                         self.text_window, self.asr, self._faults, self._emitter.emit,
                         skipped=lambda: self.ticker.skipped if self.ticker else 0)
        if isinstance(self.clock, MediaClock):
            from realtime.replay import OfflineReplay

            self._replay = OfflineReplay(cfg.source, cfg.hop_s, self.clock, self.ring, self.vision, self.asr,
                                         self._on_tick, self._faults, self._stop, self._done)
            return  # started with the ticks' place, in start()
        if self.vision is not None:
            self.vision.start(self.frames, self._stop)
        if self.asr is not None:
            self.asr.start()

    def _on_tick(self, t_due: float) -> None:
        """Every hop: the sources' health first (a fault goes into this very event), then the update."""
        self._watch.check()
        self.tick(t_due)
        if self._file is not None and self._file.finished:
            self._emitted_after_end = True

    def _words_committed(self, update) -> None:
        """On the ASR thread: re-encode the text window when words were committed."""
        if update.new_words:
            scope = self.stack.text_scope
            if scope == "utterance":
                text = self.asr.last_utterance()
            elif scope == "horizon":  # the window's seconds of words, as `mcihn extract` cut them
                text = self.asr.words_within(self.stack.window.text_horizon_s)
            else:
                text = self.asr.text_window()
            self.text_window.update(text, t_spoken=update.new_words[-1].end)

    def stop(self, timeout: float = 2.0) -> None:
        """Stop everything within about `timeout` seconds: ticks first, then workers, sources, sinks."""
        lifecycle.unregister(self)
        deadline = time.monotonic() + timeout
        self._stop.set()
        left = lambda: max(0.05, deadline - time.monotonic())  # noqa: E731
        if self.ticker is not None:
            self.ticker.stop(left() / 3)
        if self._replay is not None:
            self._replay.join(left() / 3)
        if self.asr is not None:
            self.asr.stop(left() / 3, flush=False)
        for source in self.sources:
            source.stop(left() / 4)
        if self.vision is not None:
            self.vision.join(left() / 4)
        if self.recorder is not None:
            self.recorder.stop(left() / 3)
        if self.memory is not None:
            self.memory.stop(left() / 4)
        self._emitter.close(left())

    @staticmethod
    def lingering() -> list[threading.Thread]:
        """Worker threads still running after stop(): an ASR pass cannot be interrupted, so the ASR thread may
        finish its pass (up to a few seconds on a slow CPU) after stop() has returned."""
        return [t for t in threading.enumerate() if t.name.startswith("mcihn-") and t.is_alive()]

    def join(self, timeout: float = 30.0) -> bool:
        """Wait for lingering worker threads (see `lingering`); True when none is left. Call it before the
        interpreter exits: a native library still running in a thread while Python shuts down can abort it."""
        deadline = time.monotonic() + timeout
        for thread in self.lingering():
            thread.join(max(0.0, deadline - time.monotonic()))
        return not self.lingering()

    def __enter__(self) -> Recognizer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __iter__(self) -> Iterator[EmotionEvent]:
        """Events as they are emitted, until stop() or the end of a file source. A session that ended on an error
        raises RecognizerError after the events emitted before it."""
        while True:
            try:
                event = self._events.get(timeout=0.1)
            except queue.Empty:
                if self._stop.is_set() or self.finished:
                    break
                continue
            if event is None:
                break
            yield event
        if self.ticker is not None and self.ticker.error is not None and self.error is None:
            self.error = f"an update failed: {self.ticker.error}"
        if self.error is not None:
            raise RecognizerError(self.error)

    @property
    def finished(self) -> bool:
        """A file source reached its end (and the last window was emitted), or the tick thread failed."""
        if self.ticker is not None and self.ticker.error is not None:
            return True
        if self._done.is_set():
            return True
        return self._file is not None and self._file.finished and self._emitted_after_end

    _emitted_after_end = False

    # -- push API --------------------------------------------------------------------------------------------

    def push_frame(self, frame_bgr: np.ndarray, t: float | None = None) -> None:
        if self._push is None:
            raise RuntimeError("push_frame needs LiveConfig(source='push')")
        self._push.push_frame(frame_bgr, t)

    def push_audio(self, block: np.ndarray, sample_rate: int, t: float | None = None) -> None:
        if self._push is None:
            raise RuntimeError("push_audio needs LiveConfig(source='push')")
        self._push.push_audio(block, sample_rate, t)
