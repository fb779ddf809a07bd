"""What a live session is told: `LiveConfig` (everything `mcihn-live` can be told, checked as it is made) and
`ConfigError` (a configuration that cannot run as given). Re-exported by realtime.recognizer, where hosts import
them from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from realtime.asr import AsrOptions

DEFAULT_CACHE = Path.home() / ".cache" / "mcihn-live"
DEFAULT_WINDOW_S = 2.56  # the window of checkpoints that record none (realtime/stack.py live_window)


class ConfigError(ValueError):
    """The configuration cannot run as given; the message says what to pass instead."""


@dataclass
class LiveConfig:
    """Everything `mcihn-live` can be told. Defaults run on a desktop with a camera and a microphone.

    Models: `checkpoint` (a folder written by `mcihn train`: its MCIHN or MCN-CL fuses); else `standins` ("tiny" or
    "base": random stand-ins of the paper's extractors and an untrained MCIHN, marked untrained: tests and `mcihn
    bench`); else the starter recognizer (real face, speech and text models; realtime/starter.py). `demo`: the bundled
    clip as source.
    source: "devices" (camera + microphone), "push" (the host feeds frames and audio: Recognizer.push_*), or a
    video file / a folder written by `record`; None: the bundled clip with `demo`, else "devices". speed: a file
    source's replay speed (1: live pace); 0: as fast as possible, stepping by media time, never skipping a tick
    (offline scoring of a recording: capture_to_emit then measures in media time, without processing time).
    hop_s: one update per hop (0.25 s: 4 updates/s, the CPU budget
    of docs/design.md). window_s: the span of the vision window's frames and of the audio window (rounded up to
    whole Wav2Vec2 frames) for checkpoints that record no window; None: the checkpoint's window (mcihn/spec.py
    WindowSpec), else 2.56 s (128 Wav2Vec2 frames); a value other than a recorded window's is refused.
    vision_model/text_model/audio_model: where to load the checkpoint's extractors from when
    not from its model ids (a local folder holding the same model).
    threads: CPU threads for each busy worker's own backends (onnxruntime sessions, CTranslate2): per object, so
    they touch nothing else in the host's process. limit_process_threads: also cap torch's and OpenCV's
    process-wide thread pools at `threads` (realtime/stack.py `cpu_thread_budget`). Off by default: those pools
    belong to the whole process, and a host program that embeds the recognizer did not ask for its own torch or
    OpenCV code to be slowed down; `mcihn-live` and `mcihn bench` own their process and turn it on.
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
    window_s: float | None = None
    backend: str = "auto"
    device: str | None = None
    # The extractors' precision: None = fp16 on a GPU, fp32 on a CPU; "int8": onnxruntime's int8 matrix products
    # on the CPU (the vision and text transformers ~3x faster; MCIHN's fusion stays fp32).
    precision: str | None = None
    # CPU: compute only the audio window's new frames each tick (~6x cheaper), not the whole window; approximate
    # (docs/live.md, "Incremental audio features"), so off unless asked for.
    incremental_audio: bool = False
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
    limit_process_threads: bool = False  # set torch's and OpenCV's process-wide thread counts (see above)
    trim_memory_s: float = 60.0  # hand malloc's free memory back every this many seconds (realtime/memory.py); 0: never
    # At most this many glibc malloc arenas in the process, set at start() before any model thread exists
    # (realtime/memory.py limit_malloc_arenas; process-wide). 1: every thread allocates from the main arena, the
    # only one whose free top the periodic trim can return. 0: glibc's default, 8 per core.
    malloc_arenas: int = 1
    # An inference server (`mcihn serve`, realtime/remote.py) that runs the extractors and the fusion: "HOST:PORT";
    # capture, windows, VAD and ASR stay here. A request unanswered after server_timeout_s is a fault (modality absent).
    server: str | None = None
    server_timeout_s: float = 2.0

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
        if self.hop_s <= 0 or (self.window_s is not None and self.window_s <= 0):
            raise ConfigError(f"hop and window must be positive (got hop {self.hop_s} s, window {self.window_s} s)")
        if self.malloc_arenas < 0:
            raise ConfigError(f"malloc_arenas must be 0 (glibc's default) or more (got {self.malloc_arenas})")
        if self.text_horizon_s is not None and self.text_horizon_s <= 0:
            raise ConfigError(f"the text horizon must be positive seconds (got {self.text_horizon_s})")
