"""The Recognizer: sources -> windows -> extractors -> MCIHN -> EmotionEvents to every sink. The `mcihn-live`
command is a thin shell over it; whatever the command can do, the API can.

    with Recognizer(LiveConfig(checkpoint="runs/sims/seed_0")) as rec:
        for event in rec:
            print(event.seq, event.scores, event.latency_ms["capture_to_emit"])

Threads: one per capture source, the vision worker (embeds each new frame once, at the window's frame rate),
the ASR worker, the tick thread (audio window + text + fusion + emit, every hop) and the sinks' own threads.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from engines.extractor import Features
from realtime import lifecycle
from realtime.asr import AsrOptions
from realtime.buffers import SAMPLE_RATE, AudioRing, LatestFrame
from realtime.events import AudioPresence, EmotionEvent, ModalityScores, Presence, TextPresence, VisionPresence
from realtime.scheduler import Ticker
from realtime.windows import EmbeddedFrame, TextWindow, VisionWindow

log = logging.getLogger("mcihn.live")

DEFAULT_CACHE = Path.home() / ".cache" / "mcihn-live"


class ConfigError(ValueError):
    """The configuration cannot run as given; the message says what to pass instead."""


@dataclass
class LiveConfig:
    """Everything `mcihn-live` can be told. Defaults run on a desktop with a camera and a microphone.

    Models: `checkpoint` (a folder written by `mcihn train`: MCIHN fuses); else `standins` ("tiny" or "base": random
    stand-ins of the paper's extractors and an untrained MCIHN, marked untrained: tests and `mcihn bench`); else the
    starter recognizer (real face, speech and text models; realtime/starter.py). `demo`: the bundled clip as source.
    source: "devices" (camera + microphone), "push" (the host feeds frames and audio: Recognizer.push_*), or a
    video file / a folder written by `record`; None: the bundled clip with `demo`, else "devices". speed: a file
    source's replay speed (1: live pace); 0: as fast as possible, stepping by media time, never skipping a tick
    (offline scoring of a recording: capture_to_emit then measures in media time, without processing time).
    hop_s: one update per hop (0.25 s: 4 updates/s, the CPU budget
    of docs/design.md). window_s: the audio window (2.56 s = Wav2Vec2's 128 frames) and the span of the vision
    window's frames. vision_model/text_model/audio_model: where to load the checkpoint's extractors from when
    not from its model ids (a local folder holding the same model).
    """

    checkpoint: str | None = None
    demo: bool = False
    standins: str | None = None  # "tiny" | "base": random stand-in models (untrained) instead of the starter
    source: str | None = None
    camera: int | str = 0
    mic: int | str | None = None
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    use_camera: bool = True
    use_mic: bool = True
    use_asr: bool = True
    speed: float = 1.0
    loop: bool = False
    hop_s: float = 0.25
    window_s: float = 2.56
    backend: str = "auto"
    device: str | None = None
    threads: int | None = None  # CPU threads per worker (vision, tick, ASR); None: half the cores, at least 1
    vision_model: str | None = None
    text_model: str | None = None
    audio_model: str | None = None
    asr: AsrOptions = field(default_factory=AsrOptions)
    jsonl: str | None = None
    ws: str | None = None
    osc: str | None = None
    lsl: bool = False
    record: str | None = None
    cache_dir: str = str(DEFAULT_CACHE)
    queue_size: int = 256
    text_horizon_s: float | None = None  # committed words older than this are not fused; None: the checkpoint's

    def __post_init__(self) -> None:
        if self.standins not in (None, "tiny", "base"):
            raise ConfigError(f"standins must be 'tiny' or 'base', got {self.standins!r}")
        if self.source is None:
            from realtime.demo import DEMO_CLIP

            self.source = str(DEMO_CLIP) if self.demo else "devices"
        if self.speed < 0:
            raise ConfigError(f"speed must be positive, or 0 for as fast as possible (got {self.speed})")
        if self.speed == 0 and self.source in ("devices", "push"):
            raise ConfigError("speed 0 (as fast as possible) is for a file source: pass --source FILE")
        if self.hop_s <= 0 or self.window_s <= 0:
            raise ConfigError(f"hop and window must be positive (got hop {self.hop_s} s, window {self.window_s} s)")
        if self.text_horizon_s is not None and self.text_horizon_s <= 0:
            raise ConfigError(f"the text horizon must be positive seconds (got {self.text_horizon_s})")


@dataclass
class Stack:
    """What the recognizer runs: the extractors, the fusion backend and what it needs to know about them."""

    extractors: dict
    fusion: object  # engines.backends.Backend over MCIHN's inference forward
    head: str
    labels: list[str]
    seq_lens: dict[str, int]
    dims: dict[str, int]
    modalities: tuple[str, ...]
    untrained: bool
    asr_options: AsrOptions
    models: dict[str, str | None] = field(default_factory=dict)  # modality -> the model behind it (events)
    fusion_name: str = ""  # how the scores are fused (events' `fusion`)
    metadata: dict = field(default_factory=dict)  # the checkpoint's
    # The starter's experts: a face-expression model instead of a vision extractor, and late fusion over the
    # modalities' own scores instead of MCIHN's joint fusion (which then scores text alone).
    face: object | None = None  # engines.face.FaceExpert
    late_fusion: object | None = None  # mcihn.late_fusion.LateFusion
    text_scope: str = "window"  # "utterance": the sentence being spoken (AsrWorker.last_utterance) is encoded
    text_horizon_s: float = 8.0  # committed words expire this long after the end of the newest one


class TickBuffers:
    """The arrays a tick fills in place, allocated once per session (docs/design.md: no allocation on the tick path):
    the audio window read from the ring, and the fusion engine's inputs, (1, seq_len, dim) per modality plus
    the lengths. The windows and the audio extractor write straight into the fusion inputs. Only the tick
    thread touches them (the ticker never runs two ticks at once)."""

    def __init__(self, stack: Stack, window_s: float):
        self.audio = np.zeros(int(round(window_s * SAMPLE_RATE)), np.float32)
        self.inputs = {m: np.zeros((1, stack.seq_lens[m], stack.dims[m]), np.float32)
                       for m in ("vision", "text", "audio")}
        self.lengths = np.zeros((1, 3), np.int64)
        # The vision window: MCIHN's vision input, or the face expert's per-frame probabilities (frames x labels).
        self.vision_shape = ((stack.face.frames, len(stack.face.labels)) if stack.face is not None
                             else (stack.seq_lens["vision"], stack.dims["vision"]))
        self.vision = (np.zeros(self.vision_shape, np.float32) if stack.face is not None
                       else self.inputs["vision"][0])

    def features(self, modality: str) -> np.ndarray:
        """The (seq_len, dim) fusion input of `modality`, to be filled."""
        return self.inputs[modality][0]


def load_stack(config: LiveConfig) -> Stack:
    """What the config asks to run: a checkpoint written by `mcihn train`, random stand-ins (`standins`), or, with
    neither, the starter recognizer (real models, realtime/starter.py)."""
    asr_options = config.asr
    if config.checkpoint:
        checkpoint_dir = Path(config.checkpoint)
        seeds = sorted(checkpoint_dir.glob("seed_*/config.json"))
        if not (checkpoint_dir / "config.json").exists() and seeds:
            checkpoint_dir = seeds[0].parent  # a run folder: its first seed
        return load_checkpoint_stack(checkpoint_dir, config, asr_options)
    if config.standins:
        from realtime.demo import prepare_demo

        folder = "demo" if config.standins == "tiny" else f"demo-{config.standins}"
        demo = prepare_demo(Path(config.cache_dir).expanduser() / folder, config.standins)
        return load_checkpoint_stack(demo.checkpoint, config, replace(asr_options, model=str(demo.whisper),
                                                                      language="en"))
    from realtime.starter import load_starter

    return load_starter(config)


def load_checkpoint_stack(checkpoint_dir: Path, config: LiveConfig, asr_options: AsrOptions) -> Stack:
    """A checkpoint, its extractors (checked against its feature spec) and backends; MCIHN fuses."""
    from engines.backends import create_backend
    from engines.export import mcihn_engine_model
    from engines.extractors import ExtractorOptions, build_extractor
    from mcihn.checkpoint import load_checkpoint
    from mcihn.spec import NOT_EXTRACTED, is_precomputed

    ckpt = load_checkpoint(checkpoint_dir)
    # Modalities the checkpoint was trained without (text-only features, say) stay absent live too.
    used = tuple(m for m in ckpt.model.config.modalities if ckpt.spec[m].extractor != NOT_EXTRACTED)
    overridden = {m: path for m in ("vision", "text", "audio") if (path := getattr(config, f"{m}_model"))}
    precomputed = [f"{m} by {ckpt.spec[m].extractor.removeprefix('precomputed:')}" for m in used
                   if is_precomputed(ckpt.spec[m].extractor) and m not in overridden]
    if precomputed:
        raise ConfigError(
            f"{checkpoint_dir} was trained on precomputed features ({', '.join(precomputed)}) whose extractors are "
            f"not published as models, so it cannot run live; run `mcihn-live` without "
            f"--checkpoint for the starter recognizer, or train MCIHN on features from `mcihn extract` (README)")
    options = ExtractorOptions.from_spec(ckpt.spec)
    options = replace(options, **overridden)
    extractors = {m: build_extractor(m, options) for m in used}
    offered = {m: extractors[m].spec if m in extractors else ckpt.spec[m] for m in ("vision", "text", "audio")}
    # Models loaded from elsewhere (a local copy): their ids and revisions cannot match, the rest must.
    ckpt.check_features(_without_identity(offered, ckpt.spec, overridden), what="the extractors given")
    cache = Path(config.cache_dir).expanduser() / "engines"
    threads = cpu_thread_budget(config)
    if threads is not None and asr_options.threads == 0:
        asr_options = replace(asr_options, threads=threads)
    for extractor in extractors.values():
        extractor.use_backend(create_backend(extractor.engine_model(), config.backend, config.device, cache_dir=cache,
                                             threads=threads))
    model = ckpt.model
    fusion = create_backend(mcihn_engine_model(model), config.backend, config.device, cache_dir=cache,
                            threads=threads)
    cfg = model.config
    return Stack(extractors, fusion, cfg.head, list(cfg.labels), dict(cfg.seq_lens), dict(cfg.input_dims),
                 used, bool(ckpt.metadata.get("untrained", False)), asr_options,
                 models={m: extractors[m].spec.extractor if m in extractors else None
                         for m in ("vision", "text", "audio")},
                 fusion_name=f"mcihn: {checkpoint_dir}", metadata=ckpt.metadata,
                 text_horizon_s=float(config.text_horizon_s or ckpt.metadata.get("text_horizon_s", 8.0)))


def cpu_thread_budget(config: LiveConfig) -> int | None:
    """CPU threads for each of the three busy workers (vision, tick, ASR), or None on a GPU.

    Each library defaults to all cores (CTranslate2 even to 4): three workers doing so on a 2-core machine
    oversubscribe it several times over, and every stage slows down (docs/benchmarks.md). Half the cores each
    (at least one) keeps the workers out of each other's way; torch and OpenCV are set process-wide.
    """
    import os

    from engines.backends import cuda_available

    if (config.device or ("cuda" if cuda_available() else "cpu")).startswith("cuda"):
        return None
    threads = config.threads or max(1, (os.cpu_count() or 2) // 2)
    import cv2
    import torch

    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)
    return threads


def _without_identity(offered: dict, reference, overridden: dict):
    """The offered specs as a FeatureSpec, with the model id and revision of overridden modalities copied from
    `reference` (the checkpoint's)."""
    from mcihn.spec import FeatureSpec

    parts = dict(offered)
    for m in overridden:
        parts[m] = replace(parts[m], extractor=reference[m].extractor, revision=reference[m].revision)
    return FeatureSpec(**parts)


def _age(seconds: float | None) -> float | None:
    return None if seconds is None else round(float(max(seconds, 0.0)), 3)


def _voice_vad():
    from faster_whisper.vad import VadOptions

    # Faster-whisper's defaults merge speech across 2 s of silence and pad it by 0.4 s (right for transcription,
    # wrong for "is someone speaking now").
    return VadOptions(min_speech_duration_ms=100, min_silence_duration_ms=100, speech_pad_ms=30)


class RecognizerError(RuntimeError):
    """The session ended on an error (a file that stopped advancing, a failed tick): raised to the iterating host
    after the events emitted before it."""


# Freshness: how old a modality's newest input may be for it to count as arriving (`fresh` in the events).
VISION_FRESH_S = 1.0  # about four analysed frames
AUDIO_FRESH_S = 0.5  # two hops of a live microphone
FILE_STALL_S = 5.0  # a file source that delivers nothing for this long (wall time) has stopped advancing


class Recognizer:
    """The live recognizer. A context manager and an iterator over EmotionEvents; callbacks via `on_event`."""

    def __init__(self, config: LiveConfig, stack: Stack | None = None):
        self.config = config
        self._stack = stack
        self.frames = LatestFrame()
        self.ring = AudioRing(capacity_s=max(30.0, 2 * config.window_s))
        self.sources: list = []
        self.faults: list[str] = []  # one line per fault met during the session (camera gone, ...)
        self.error: str | None = None  # what ended the session, when an error did (raised to iterating hosts)
        self._new_faults: list[str] = []  # not yet carried by an event
        self._fault_lock = threading.Lock()
        self._reported: set[int] = set()  # sources whose error was reported
        self._progress = (None, 0.0)  # (newest input time of a file source, wall time it was first seen)
        self.asr = None
        self.sinks = None
        self.ticker: Ticker | None = None
        self._events: queue.Queue[EmotionEvent | None] = queue.Queue(maxsize=config.queue_size)
        self._callbacks: list[Callable[[EmotionEvent], None]] = []
        self._vision_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._seq = 0
        self._t_start = 0.0
        self._file = None
        self._push = None
        self.recorder = None
        self.latest_frame: np.ndarray | None = None
        self.latest_event: EmotionEvent | None = None
        self.events_dropped = 0
        self.started = False
        self._fast = config.speed == 0  # offline stepping by media time (a file source only)
        self._media_now = 0.0
        self._now = (lambda: self._media_now) if self._fast else time.monotonic
        self._offline_thread: threading.Thread | None = None
        self._done = threading.Event()

    # -- lifecycle -------------------------------------------------------------------------------------------

    def on_event(self, callback: Callable[[EmotionEvent], None]) -> None:
        """Call `callback(event)` for every event (on a sink thread; exceptions are reported, not raised)."""
        if self.started:
            raise RuntimeError("register callbacks before start()")
        self._callbacks.append(callback)

    def start(self) -> Recognizer:
        lifecycle.register(self)  # stopped at interpreter exit if the host never calls stop()
        from realtime.sinks import SinkGroup

        cfg = self.config
        if cfg.source not in ("devices", "push"):
            from realtime.file_source import check_media

            check_media(cfg.source)  # an unreadable file is said before seconds of model loading
        self.stack = self._stack or load_stack(cfg)
        self._buffers = TickBuffers(self.stack, cfg.window_s)
        self._t_start = time.monotonic()
        self.sinks = SinkGroup(self._build_sinks(), report=self._fault).open()
        try:
            self._start_sources()
            self._start_workers()
        except BaseException:
            self.stop()
            raise
        self.started = True
        if self._fast:
            self._offline_thread = threading.Thread(target=self._offline_loop, name="mcihn-offline", daemon=True)
            self._offline_thread.start()
        else:
            self.ticker = Ticker(cfg.hop_s / cfg.speed if self._file else cfg.hop_s, self._tick).start()
        return self

    def _build_sinks(self) -> list:
        from realtime.sinks import CallbackSink, JsonlSink, LslSink, OscSink, WebSocketSink, parse_host_port

        cfg, sinks = self.config, []
        if cfg.jsonl:
            sinks.append(JsonlSink(cfg.jsonl))
        if cfg.ws:
            host, port = parse_host_port(cfg.ws)
            sinks.append(WebSocketSink(port=port, host=host))
        if cfg.osc:
            host, port = parse_host_port(cfg.osc)
            sinks.append(OscSink(host, port))
        if cfg.lsl:
            labels = self.stack.labels if self.stack.head == "classification" else ["valence"]
            sinks.append(LslSink(rate_hz=1.0 / cfg.hop_s, scores=labels))
        if cfg.record:
            from realtime.recorder import Recorder

            self.recorder = Recorder(cfg.record, self.frames, self.ring)
            sinks.append(JsonlSink(str(Path(cfg.record) / "events.jsonl")))
        sinks.extend(CallbackSink(cb) for cb in self._callbacks)
        return sinks

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
                    self._fault(f"{err}; going on without vision")
            if cfg.use_mic:
                try:
                    self.sources.append(MicrophoneSource(cfg.mic, self.ring).start())
                except SourceError as err:
                    self._fault(f"{err}; going on without audio and speech")
            if not self.sources:
                raise SourceError("no camera and no microphone could be opened; check the devices "
                                  "(mcihn-live --list-devices) or replay a file with --source PATH")
        elif self._fast:
            self._t_start = 0.0  # the offline loop reads the file itself, media time is the clock
        else:
            from realtime.file_source import FileSource

            self._file = FileSource(cfg.source, self.frames, self.ring, speed=cfg.speed, loop=cfg.loop).start()
            self._t_start = self._file.t0
            self.sources.append(self._file)
        if self.recorder is not None:
            self.recorder.start()

    def _start_workers(self) -> None:
        cfg, stack = self.config, self.stack
        self._vad = _voice_vad()
        # One analysed frame per interval (of wall time: a file replayed at `speed` runs that much faster).
        self._vision_interval = cfg.window_s / self._buffers.vision_shape[0] / (cfg.speed if self._file else 1.0)
        self._vision = stack.face if stack.face is not None else stack.extractors.get("vision")
        if self._vision is not None and (cfg.source != "devices" or cfg.use_camera):
            seq_len, dim = self._buffers.vision_shape
            self.vision_window = VisionWindow(seq_len, dim, cfg.window_s)
            if not self._fast:
                self._vision_thread = threading.Thread(target=self._vision_loop, args=(self._vision,),
                                                       name="mcihn-vision", daemon=True)
                self._vision_thread.start()
        else:
            self.vision_window = None
        self.text_window = TextWindow(stack.extractors["text"]) if "text" in stack.modalities else None
        has_audio = cfg.source != "devices" or cfg.use_mic
        if cfg.use_asr and has_audio and self.text_window is not None:
            from realtime.asr import AsrWorker, StreamingTranscriber, ring_reader

            transcriber = StreamingTranscriber(stack.asr_options, clock=self._now)
            self.asr = AsrWorker(transcriber, ring_reader(self.ring), on_error=self._asr_failed,
                                 on_update=self._words_committed)
            if not self._fast:
                self.asr.start()  # offline, the loop steps it

    def _words_committed(self, update) -> None:
        """On the ASR thread: re-encode the text window when words were committed."""
        if update.new_words:
            utterance = self.stack.text_scope == "utterance"
            self.text_window.update(self.asr.last_utterance() if utterance else self.asr.text_window(),
                                    t_spoken=update.new_words[-1].end)

    _text_version_seen = 0

    def _asr_failed(self, err: BaseException) -> None:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        self._fault(f"speech recognition stopped ({reason}); going on without text")

    def _fault(self, line: str, log_it: bool = True) -> None:
        """Report a fault once: in `faults`, in the next event's `faults`, and on the log."""
        with self._fault_lock:
            self.faults.append(line)
            self._new_faults.append(line)
        if log_it:
            log.warning(line)

    def _end_with_error(self, line: str) -> None:
        """The session cannot go on (a file that broke or stopped advancing): report it and end."""
        if self.error is None:
            self.error = line
            self._fault(line, log_it=False)  # the session's error: said once, by whoever ran it (CLI, host)
        self._done.set()

    def _check_sources(self) -> None:
        """Faults of the capture sources, each reported once (their modality then goes stale, hence absent); a
        camera is retried; a file source that broke or stopped advancing ends the session with its error."""
        for source in list(self.sources):
            if source.error is None or id(source) in self._reported:
                continue
            self._reported.add(id(source))
            if source is self._file:
                self._end_with_error(f"{source.error}; the replay ended early")
            elif getattr(source, "kind", "") == "camera":
                self._fault(f"{source.error}; going on without vision, retrying the camera every 2 s")
                threading.Thread(target=self._retry_camera, args=(source,), name="mcihn-camera-retry",
                                 daemon=True).start()
            else:
                self._fault(f"{source.error}; going on without audio and speech")
        if self._file is not None and not self._file.finished and self.error is None:
            newest = max(t for t in (self.ring.t_end, self.frames.t_newest, -1.0) if t is not None)
            seen, since = self._progress
            if newest != seen:
                self._progress = (newest, time.monotonic())
            elif time.monotonic() - since > FILE_STALL_S:
                at = self._file.media_time(newest) if newest >= 0 else 0.0
                self._end_with_error(f"{self.config.source} stopped advancing at {at:.1f} s of media time "
                                     f"(corrupt or truncated?); the replay ended early")

    def _retry_camera(self, failed) -> None:
        from realtime.sources import CameraSource, SourceError

        cfg = self.config
        while not self._stop.wait(2.0):
            try:
                camera = CameraSource(cfg.camera, cfg.width, cfg.height, cfg.fps, self.frames).start()
            except SourceError:
                continue
            self.sources[self.sources.index(failed)] = camera
            self._fault(f"{camera.name} is back; vision resumes")
            return

    def stop(self, timeout: float = 2.0) -> None:
        """Stop everything within about `timeout` seconds: ticks first, then workers, sources, sinks."""
        lifecycle.unregister(self)
        deadline = time.monotonic() + timeout
        self._stop.set()
        left = lambda: max(0.05, deadline - time.monotonic())  # noqa: E731
        if self.ticker is not None:
            self.ticker.stop(left() / 3)
        if self._offline_thread is not None:
            self._offline_thread.join(left() / 3)
        if self.asr is not None:
            self.asr.stop(left() / 3, flush=False)
        for source in self.sources:
            source.stop(left() / 4)
        if self._vision_thread is not None:
            self._vision_thread.join(left() / 4)
        if self.recorder is not None:
            self.recorder.stop(left() / 3)
        if self.sinks is not None:
            self.sinks.close(left())
        try:
            self._events.put_nowait(None)  # ends iteration
        except queue.Full:
            pass

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

    # -- work ------------------------------------------------------------------------------------------------

    def _vision_loop(self, extractor) -> None:
        """Embed the newest frame every window_s / seq_len seconds (each frame once, as it enters the window)."""
        interval = self.config.window_s / self.vision_window.seq_len / (self.config.speed if self._file else 1.0)
        seen = 0
        next_due = time.monotonic()
        while not self._stop.is_set():
            item = self.frames.wait_new(seen, timeout=0.1)
            if item is None:
                continue
            seen = item.seq
            self.latest_frame = item.frame_bgr
            if time.monotonic() < next_due:
                continue
            next_due = max(next_due + interval, time.monotonic() - interval)
            self._embed(extractor, item.frame_bgr, item.t_capture)

    def _embed(self, extractor, frame: np.ndarray, t_capture: float) -> None:
        """Embed one frame into the vision window (a failure on one frame is reported, vision goes on)."""
        start = time.perf_counter()
        try:
            emb = extractor.embed_frames([frame])
        except Exception as err:  # noqa: BLE001 - one bad frame must not end vision
            self._fault(f"vision extraction failed on a frame: {err}")
            return
        embedding = emb.embeddings[0] if emb.present[0] else None
        self.vision_window.add(EmbeddedFrame(t_capture, embedding, emb.boxes[0], (time.perf_counter() - start) * 1e3))

    def _offline_loop(self) -> None:
        """speed 0: read the file as fast as it decodes, embed a frame every window_s / seq_len of media time,
        step the ASR on the audio, and tick at every hop of media time: nothing is skipped or dropped."""
        from realtime.file_source import media_items

        cfg = self.config
        interval = cfg.window_s / self.vision_window.seq_len if self.vision_window is not None else None
        next_vision, next_tick = 0.0, cfg.hop_s
        try:
            for t, kind, data in media_items(cfg.source):
                if self._stop.is_set():
                    return
                self._media_now = max(self._media_now, t)
                if kind == "video":
                    self.latest_frame = data
                    if interval is not None and t >= next_vision:
                        self._embed(self._vision, data, t)
                        next_vision += interval * max(1, int((t - next_vision) // interval) + 1)
                else:
                    self.ring.write(data, t)
                    if self.asr is not None and self.asr.error is None:
                        try:
                            self.asr.step()
                        except Exception as err:  # noqa: BLE001 - as the ASR thread: go on without text
                            self.asr.error = err
                            self._asr_failed(err)
                while self._media_now >= next_tick:
                    self._tick(next_tick)
                    next_tick += cfg.hop_s
        except Exception as err:  # noqa: BLE001 - reported like the tick thread's errors
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            self._end_with_error(f"{reason}; the replay ended early" if str(cfg.source) in reason
                                 else f"{cfg.source}: {reason}; the replay ended early")
        finally:
            self._done.set()

    def _tick(self, t_due: float) -> None:
        """One update. Every modality is read only as fresh as its rule allows (docs/live.md, "Freshness"):
        vision from frames newer than the window, audio from samples newer than the window, text within its
        horizon; stale means absent."""
        stack, cfg = self.stack, self.config
        self._check_sources()
        now = self._now()
        latency: dict[str, float] = {}
        feats: dict[str, Features] = {}
        newest_capture: list[float] = []  # the newest input of each stream used: capture_to_emit is from the oldest
        presence = Presence()

        buffers = self._buffers
        vision = None
        if self.vision_window is not None:
            vision, newest = self.vision_window.snapshot(now, out=buffers.vision)
            if stack.face is None:
                feats["vision"] = vision  # MCIHN's input; the starter's face scores are fused late instead
            age = now - newest.t_capture if newest is not None else None
            if newest is not None:
                newest_capture.append(newest.t_capture)
                latency["vision"] = newest.extract_ms
            in_newest = bool(newest is not None and newest.face is not None and age <= 2 * self._vision_interval)
            presence.vision = VisionPresence(
                bool(vision.present), list(newest.face) if in_newest else None, int(vision.length), now=in_newest,
                fresh=bool(age is not None and age <= VISION_FRESH_S), fused=bool(vision.present), age_s=_age(age))

        samples, t_end = self.ring.read_last(cfg.window_s, out=buffers.audio, now=now)
        if t_end is not None and len(samples):
            newest_capture.append(t_end)  # the audio, or the speech the text comes from
        presence.audio = self._voice_presence(samples, latency)
        presence.audio.age_s = _age(now - t_end if t_end is not None else None)
        presence.audio.fresh = bool(presence.audio.age_s is not None and presence.audio.age_s <= AUDIO_FRESH_S)
        if "audio" in stack.modalities:
            feats["audio"] = self._audio_features(samples, presence.audio, latency)
            presence.audio.fused = bool(feats["audio"].present)

        if self.text_window is not None:
            committed, text, version, encode_ms = self.text_window.latest()
            if version != self._text_version_seen:  # new words: report their encode once (done on the ASR thread)
                self._text_version_seen = version
                latency["text"] = encode_ms
            spoken = self.text_window.t_spoken
            age = now - spoken if spoken is not None else None
            alive = self.asr is None or self.asr.error is None
            fresh = bool(age is not None and age <= stack.text_horizon_s and alive)
            if not fresh:
                text = Features(text.values, 0, text.info)  # expired words, or a dead ASR: text is absent
            feats["text"] = text
            presence.text = TextPresence(bool(text.present), committed if text.present else "", int(text.length),
                                         self.asr.tail if self.asr is not None else "", fresh=fresh,
                                         fused=bool(text.present), age_s=_age(age))
            if self.asr is not None and self.asr.last_pass_ms is not None:
                latency["asr"] = float(self.asr.last_pass_ms)

        start = time.perf_counter()
        if stack.late_fusion is None:
            scores = self._fuse(feats)
            modalities = {m: ModalityScores(None, stack.models.get(m)) for m in ("vision", "text", "audio")}
        else:
            scores, modalities = self._late_fuse(vision, feats.get("text"))
            presence.audio.fused = False  # no voice model: voice presence is reported, never fused
        latency["fusion"] = (time.perf_counter() - start) * 1e3
        t_emit = time.monotonic()
        latency["capture_to_emit"] = (self._now() - min(newest_capture)) * 1e3 if newest_capture else 0.0
        t_media = (max(newest_capture) if newest_capture else now) - self._t_start
        if self._file is not None:
            t_media *= cfg.speed
        with self._fault_lock:
            faults, self._new_faults = self._new_faults, []
        event = EmotionEvent(
            seq=self._seq, t_media=round(t_media, 4), t_wall=time.time(), t_mono=t_emit, head=stack.head,
            scores=scores, presence=presence, latency_ms={k: round(max(v, 0.0), 3) for k, v in latency.items()},
            untrained=stack.untrained, skipped_ticks=self.ticker.skipped if self.ticker else 0,
            dropped_frames=self.frames.dropped, modalities=modalities, fusion=stack.fusion_name, faults=faults,
        )
        self._seq += 1
        self._emit(event)
        if self._file is not None and self._file.finished:
            self._emitted_after_end = True

    def _voice_presence(self, samples: np.ndarray, latency: dict[str, float]) -> AudioPresence:
        """Is there audio in the window, speech in it, and speech in its last hop (Silero VAD, with short
        pauses kept as pauses: a 2 s gap in speech must show as one)?"""
        from faster_whisper.vad import get_speech_timestamps

        seconds = len(samples) / SAMPLE_RATE
        if seconds < 0.1:
            return AudioPresence(False, False, round(seconds, 3))
        start = time.perf_counter()
        speech = get_speech_timestamps(samples, self._vad)
        latency["vad"] = (time.perf_counter() - start) * 1e3
        hop_start = len(samples) - int(self.config.hop_s * SAMPLE_RATE)
        return AudioPresence(True, bool(speech), round(seconds, 3), now=any(s["end"] > hop_start for s in speech))

    def _audio_features(self, samples: np.ndarray, presence: AudioPresence, latency: dict[str, float]) -> Features:
        """The audio window's features; absent (length 0) when there is no speech in it."""
        out = self._buffers.features("audio")
        if not presence.voiced:
            out.fill(0.0)
            return Features(out, 0)
        start = time.perf_counter()
        feats = self.stack.extractors["audio"].extract(samples, SAMPLE_RATE, out=out)
        latency["audio"] = (time.perf_counter() - start) * 1e3
        return feats

    def _late_fuse(self, vision: Features | None, text: Features | None) -> tuple[dict, dict]:
        """The starter: the face expert's scores (mean over the window's faces), the text model's (MCIHN run on
        text alone), each calibrated, and their presence-weighted mean (mcihn/late_fusion.py)."""
        stack, fusion = self.stack, self.stack.late_fusion
        face = None
        if vision is not None and vision.present:
            mean = vision.values[: vision.length].mean(axis=0)
            face = fusion.calibrated("vision", dict(zip(fusion.labels, mean.tolist(), strict=True)))
        words = fusion.calibrated("text", self._fuse({"text": text})) if text is not None and text.present else None
        modalities = {"vision": ModalityScores(face, stack.models.get("vision")),
                      "text": ModalityScores(words, stack.models.get("text")),
                      "audio": ModalityScores(None, None)}  # no voice-emotion model: presence only
        return fusion.fuse({"vision": face, "text": words}) or {}, modalities

    def _fuse(self, feats: dict[str, Features]) -> dict[str, float]:
        """Run MCIHN on the features as they lie: vision and audio in the tick buffers, text in the text window's
        own array ([None] is a view, not a copy); a modality the stack lacks is its zero buffer with length 0."""
        stack, buffers = self.stack, self._buffers
        inputs = {}
        for i, m in enumerate(("vision", "text", "audio")):
            f = feats.get(m)
            inputs[m] = f.values[None] if f is not None else buffers.inputs[m]
            buffers.lengths[0, i] = f.length if f is not None else 0
        inputs["lengths"] = buffers.lengths
        out = next(iter(stack.fusion.run(inputs).values()))[0]
        if stack.head == "regression":
            return {"valence": float(out)}
        return {label: float(p) for label, p in zip(stack.labels, out, strict=True)}

    def _emit(self, event: EmotionEvent) -> None:
        self.latest_event = event
        self.sinks.send(event)
        try:
            self._events.put_nowait(event)
        except queue.Full:  # nobody iterates (callbacks or sinks only): keep the newest
            try:
                self._events.get_nowait()
                self.events_dropped += 1
            except queue.Empty:
                pass
            self._events.put_nowait(event)
