"""What a session runs: the `Stack` (extractors, fusion backend, and what the tick needs to know about them), how
it is loaded from a config (`load_stack`: a checkpoint, random stand-ins, or the starter), the CPU thread budget
of its backends, and the arrays a tick fills in place (`TickBuffers`)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from mcihn.spec import FeatureSpec, WindowSpec
from realtime.asr import AsrOptions
from realtime.buffers import SAMPLE_RATE
from realtime.config import DEFAULT_WINDOW_S, ConfigError, LiveConfig


@dataclass
class Stack:
    """What the recognizer runs: the extractors, the fusion backend and what it needs to know about them."""

    extractors: dict
    fusion: object  # engines.backends.Backend over the fusion model's (MCIHN's or MCN-CL's) inference forward
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
    # What the tick cuts: the checkpoint's recorded window, or for one without (`live_window`) LiveConfig.window_s.
    window: WindowSpec = field(default_factory=WindowSpec)
    # Which committed words are encoded: "window" the last AsrOptions.window_words (checkpoints without a recorded
    # window), "utterance" the sentence being spoken (AsrWorker.last_utterance), "horizon" the words that ended
    # within the window's text horizon of the newest (AsrWorker.words_within).
    text_scope: str = "window"
    text_horizon_s: float = 8.0  # committed words expire this long after the end of the newest one
    # Audio features computed incrementally each tick (engines/audio.py StreamingConvFeatures; CPU, GroupNorm
    # Wav2Vec2 conv features, when the config asks): several times cheaper, within the error docs/live.md
    # measures; False: the exact window.
    incremental_audio: bool = False
    server: object | None = None  # realtime.remote.Server when the models run on an inference server (--server)
    fusion_model: object | None = None  # the fusion's EngineModel (what `mcihn serve` and export-triton describe)


class TickBuffers:
    """The arrays a tick fills in place, allocated once per session (docs/design.md: no allocation on the tick path):
    the audio window read from the ring, and the fusion engine's inputs, (1, seq_len, dim) per modality plus
    the lengths. The windows and the audio extractor write straight into the fusion inputs. Only the tick
    thread touches them (the ticker never runs two ticks at once)."""

    def __init__(self, stack: Stack):
        self.audio = np.zeros(stack.window.audio_samples, np.float32)
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
        if config.standins == "tiny":  # tests: a tiny random Whisper keeps them fast
            asr_options = replace(asr_options, model=str(demo.whisper), language="en")
        # "base" (timing, `mcihn bench`): the real Whisper asked for (tiny.en by default), so ASR figures are real.
        return load_checkpoint_stack(demo.checkpoint, config, asr_options)
    from realtime.starter import load_starter

    return load_starter(config)


def load_checkpoint_stack(checkpoint_dir: Path, config: LiveConfig, asr_options: AsrOptions) -> Stack:
    """A checkpoint, its extractors (checked against its feature spec) and backends; its model (MCIHN or MCN-CL,
    as the checkpoint's model_type says) fuses."""
    from engines.backends import create_backend
    from engines.export import mcihn_engine_model
    from engines.extractors import ExtractorOptions, build_extractor
    from mcihn.checkpoint import load_checkpoint, model_type_of
    from mcihn.spec import NOT_EXTRACTED, context_turns, is_precomputed

    ckpt = load_checkpoint(checkpoint_dir)
    # Modalities the checkpoint was trained without (text-only features, say) stay absent live too.
    used = tuple(m for m in ckpt.model.config.modalities if ckpt.spec[m].extractor != NOT_EXTRACTED)
    overridden = {m: path for m in ("vision", "text", "audio") if (path := getattr(config, f"{m}_model"))}
    # A fine-tuned text encoder saved inside the checkpoint (mcihn finetune-text) is found beside it, wherever
    # the folder was moved; its spec records an absolute path.
    if "text" not in overridden and (folder := ckpt.metadata.get("text_encoder", {}).get("folder")):
        overridden["text"] = str(Path(checkpoint_dir) / folder)
    turns = context_turns(ckpt.spec.text) if "text" in used else 0
    if turns:  # live text is the words being spoken, never a dialogue's earlier turns as a second segment
        raise ConfigError(
            f"{checkpoint_dir} was trained on text conditioned on {turns} preceding utterances of its dialogue "
            f"(mcihn extract-text --context), which the live pipeline does not feed; run a checkpoint trained "
            f"without --context")
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
    model = ckpt.model
    fusion_model = mcihn_engine_model(model)
    server = None
    if config.server:  # the models run on an inference server (realtime/remote.py); the station keeps the rest
        from realtime.remote import RemoteBackend, Server

        server = Server(config.server, config.server_timeout_s)
        served = server.check([*extractors, "fusion"])
        for m, extractor in extractors.items():
            extractor.use_backend(RemoteBackend(server, m, extractor.engine_model().output_names, served[m]))
            _release_weights(extractor)
        fusion = RemoteBackend(server, "fusion", fusion_model.output_names, served["fusion"])
    else:
        for extractor in extractors.values():
            extractor.use_backend(create_backend(extractor.engine_model(), config.backend, config.device,
                                                 config.precision, cache_dir=cache,
                                                 threads=threads))
        fusion = create_backend(fusion_model, config.backend, config.device,
                                None if config.precision == "int8" else config.precision, cache_dir=cache,
                                threads=threads)
    cfg = model.config
    window, text_scope = live_window(ckpt.spec, config, extractors.get("audio"))
    horizon = window.text_horizon_s or config.text_horizon_s or ckpt.metadata.get("text_horizon_s", 8.0)
    return Stack(extractors, fusion, cfg.head, list(cfg.labels), dict(cfg.seq_lens), dict(cfg.input_dims),
                 used, bool(ckpt.metadata.get("untrained", False)), asr_options,
                 models={m: extractors[m].spec.extractor if m in extractors else None
                         for m in ("vision", "text", "audio")},
                 fusion_name=f"{model_type_of(model)}: {checkpoint_dir}", metadata=ckpt.metadata,
                 window=window, text_scope=text_scope, text_horizon_s=float(horizon),
                 incremental_audio=bool(threads is not None and config.incremental_audio and "audio" in extractors
                                        and extractors["audio"].can_stream and server is None),
                 server=server, fusion_model=fusion_model)


def live_window(spec: FeatureSpec, config: LiveConfig, audio=None) -> tuple[WindowSpec, str]:
    """(the window the tick cuts, the text scope) for a checkpoint's spec; `audio`: its audio extractor, if any.

    A checkpoint that records its window (`mcihn extract` since windows are recorded) gets exactly that window:
    a `--window` or `--text-horizon` that would cut another one is refused, naming the field. One without (older
    checkpoints, the starter's text model, the stand-in demo) gets what it got before: `config.window_s` of frames,
    the last committed words; its audio is `window_s` rounded up to whole Wav2Vec2 frames (2.56 s: 41,040 samples,
    the 128 frames `mcihn extract` always cut; before, live cut 40,960: 127 frames).
    """
    recorded = spec.window
    if recorded is None:
        span = config.window_s or DEFAULT_WINDOW_S
        samples = int(round(span * SAMPLE_RATE))
        if audio is not None and samples >= audio.receptive_field:  # rounded up to whole Wav2Vec2 frames
            frames = -(-(samples - audio.receptive_field) // audio.hop) + 1
            samples = audio.receptive_field + (frames - 1) * audio.hop
        return WindowSpec(vision_span_s=span, vision_frames=spec.vision.seq_len, audio_samples=samples), "window"
    _refuse_other_window(recorded, spec, config)
    return recorded, "utterance" if recorded.text_horizon_s is None else "horizon"


def _refuse_other_window(window: WindowSpec, spec: FeatureSpec, config: LiveConfig) -> None:
    """ConfigError (one line: the field and the fix) when the config asks for a window other than the checkpoint's."""
    if config.window_s is not None and abs(config.window_s - window.vision_span_s) > 1e-9:
        raise ConfigError(f"--window {config.window_s:g} s differs from the checkpoint's window (vision_span_s "
                          f"{window.vision_span_s:g} s, audio_samples {window.audio_samples}), which live cuts as it "
                          f"was trained; drop --window, or extract and train again with `mcihn extract --window "
                          f"{config.window_s:g}`")
    horizon = window.text_horizon_s
    if horizon is not None and config.text_horizon_s is not None and config.text_horizon_s != horizon:
        raise ConfigError(f"--text-horizon {config.text_horizon_s:g} s differs from the checkpoint's window "
                          f"(text_horizon_s: {window.describe_text()}); drop --text-horizon, or extract and train "
                          f"again with `mcihn extract --text-horizon {config.text_horizon_s:g}`")
    if window.vision_frames != spec.vision.seq_len:
        raise ConfigError(f"the checkpoint's window has vision_frames {window.vision_frames} but its vision seq_len "
                          f"is {spec.vision.seq_len}; its feature spec is inconsistent: extract and train again")


def cpu_thread_budget(config: LiveConfig) -> int | None:
    """CPU threads for each of the three busy workers (vision, tick, ASR), or None on a GPU.

    Each library defaults to all cores (CTranslate2 even to 4): three workers doing so on a 2-core machine
    oversubscribe it several times over, and every stage slows down (docs/benchmarks.md). Half the cores each
    (at least one) keeps the workers out of each other's way. The count goes to each backend object (onnxruntime
    sessions, CTranslate2's cpu_threads), which touches nothing else in the process. torch's and OpenCV's pools
    are process-wide, so they are set only when the host asked (`config.limit_process_threads`: `mcihn-live` and
    `mcihn bench`, which own their process); a host program embedding the recognizer keeps its own settings.
    """
    import os

    from engines.backends import cuda_available

    if (config.device or ("cuda" if cuda_available() else "cpu")).startswith("cuda"):
        return None
    threads = config.threads or max(1, (os.cpu_count() or 2) // 2)
    if config.limit_process_threads:
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


def _release_weights(extractor) -> None:
    """A station whose models run on a server keeps an extractor's preprocessing, not its weights: its torch
    modules move to the meta device (no storage), so the memory is given back and any local use fails loudly."""
    import torch

    for value in vars(extractor).values():
        if isinstance(value, torch.nn.Module):
            value.to("meta")
