"""The tick: one update, every hop. Reads each modality's window as fresh as its rule allows, says what is
present, runs the audio model and fusion, and hands the EmotionEvent to the emitter.

    VisionWindow (frames within the span)     -> vision features (seq_len, dim), or the face's probabilities
    AudioRing.read_last(samples, now=now)     -> Silero VAD -> Wav2Vec2 (MCIHN checkpoints) -> (seq_len, dim)
    TextWindow (committed words, on change)   -> text features (seq_len, dim), absent past the text horizon
        -> MCIHN (presence mask: lengths (1, 3)), or the starter's late fusion -> EmotionEvent -> emitter

Freshness (docs/live.md, "Freshness: stale input is absent"): vision from frames newer than the window, audio
from samples newer than the window, text within its horizon and only while the ASR runs; stale means absent.
Called by the Ticker's thread live, by the replay loop offline (realtime/replay.py): the same rules, with "now"
from the session's clock (realtime/clock.py). Nothing is allocated here that TickBuffers (realtime/stack.py)
could hold.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from engines.extractor import Features
from realtime.asr import voice_vad_options
from realtime.buffers import SAMPLE_RATE, AudioRing, LatestFrame
from realtime.events import AudioPresence, EmotionEvent, ModalityScores, Presence, TextPresence, VisionPresence
from realtime.faults import Faults
from realtime.remote import ServerError
from realtime.stack import Stack, TickBuffers
from realtime.vision_worker import VisionWorker
from realtime.windows import TextWindow

# Freshness: how old a modality's newest input may be for it to count as arriving (`fresh` in the events).
VISION_FRESH_S = 1.0  # about four analysed frames
AUDIO_FRESH_S = 0.5  # two hops of a live microphone


def _age(seconds: float | None) -> float | None:
    return None if seconds is None else round(float(max(seconds, 0.0)), 3)


class Tick:
    """One update per call: windows -> presence -> features -> fusion -> EmotionEvent -> `emit`.

    Its inputs are the session's stages: the clock, the audio ring, the vision worker (its window and interval;
    None without vision), the text window and the ASR worker (None without text), the fault record (the next event
    carries new faults), and `skipped`: the ticks the ticker skipped so far. Only one thread calls it at a time.
    """

    def __init__(self, stack: Stack, config, buffers: TickBuffers, clock, ring: AudioRing, frames: LatestFrame,
                 vision: VisionWorker | None, text_window: TextWindow | None, asr, faults: Faults,
                 emit: Callable[[EmotionEvent], None], skipped: Callable[[], int]):
        self.stack, self.config, self.buffers, self.clock = stack, config, buffers, clock
        self.ring, self.frames, self.vision, self.text_window, self.asr = ring, frames, vision, text_window, asr
        self.faults, self._emit, self._skipped = faults, emit, skipped
        self._vad = voice_vad_options()
        self.seq = 0
        self._text_version_seen = 0

    def __call__(self, t_due: float) -> None:
        """One update. Every modality is read only as fresh as its rule allows (docs/live.md, "Freshness"):
        vision from frames newer than the window, audio from samples newer than the window, text within its
        horizon; stale means absent."""
        stack, cfg = self.stack, self.config
        now = self.clock.now()
        latency: dict[str, float] = {}
        feats: dict[str, Features] = {}
        newest_capture: list[float] = []  # the newest input of each stream used: capture_to_emit is from the oldest
        presence = Presence()

        buffers = self.buffers
        # Live, the newest frame is analysed on the vision thread while this one computes the audio (joined below).
        analysing = self.vision.begin() if self.vision is not None else None

        # The window's samples (stack.window: the checkpoint's); those older than the window before now are stale,
        # with a hop's grace so that a device's block latency does not cost a Wav2Vec2 frame.
        samples, t_end, end_index = self.ring.read_last_indexed(stack.window.audio_samples / SAMPLE_RATE,
                                                                out=buffers.audio, now=now, grace_s=cfg.hop_s)
        if t_end is not None and len(samples):
            newest_capture.append(t_end)  # the audio, or the speech the text comes from
        presence.audio = self._voice_presence(samples, latency)
        presence.audio.age_s = _age(now - t_end if t_end is not None else None)
        presence.audio.fresh = bool(presence.audio.age_s is not None and presence.audio.age_s <= AUDIO_FRESH_S)
        if "audio" in stack.modalities:
            feats["audio"] = self._audio_features(samples, end_index, presence.audio, latency)
            presence.audio.fused = bool(feats["audio"].present)

        vision = None
        if self.vision is not None:
            self.vision.wait(analysing, timeout=cfg.hop_s)
            vision, newest = self.vision.window.snapshot(now, out=buffers.vision)
            if stack.face is None:
                feats["vision"] = vision  # MCIHN's input; the starter's face scores are fused late instead
            age = now - newest.t_capture if newest is not None else None
            if newest is not None:
                newest_capture.append(newest.t_capture)
                latency["vision"] = newest.extract_ms
            in_newest = bool(newest is not None and newest.face is not None and age <= 2 * self.vision.interval)
            presence.vision = VisionPresence(
                bool(vision.present), list(newest.face) if in_newest else None, int(vision.length), now=in_newest,
                fresh=bool(age is not None and age <= VISION_FRESH_S), fused=bool(vision.present), age_s=_age(age))

        if self.text_window is not None:
            feats["text"], presence.text = self._text(now, latency)

        start = time.perf_counter()
        if stack.late_fusion is None:
            try:
                scores = self._fuse(feats)
            except ServerError:  # the inference server is down (reported once): no scores, nothing fused
                scores = {}
                for part in (presence.vision, presence.text, presence.audio):
                    part.fused = False
            modalities = {m: ModalityScores(None, stack.models.get(m)) for m in ("vision", "text", "audio")}
        else:
            scores, modalities = self._late_fuse(vision, feats.get("text"))
            presence.text.fused = bool(presence.text.fused and modalities["text"].scores is not None)
            presence.audio.fused = False  # no voice model: voice presence is reported, never fused
        latency["fusion"] = (time.perf_counter() - start) * 1e3
        if stack.server is not None:  # each served model's last round trip (realtime/remote.py)
            latency.update(stack.server.latencies())
        t_emit = time.monotonic()
        latency["capture_to_emit"] = (self.clock.now() - min(newest_capture)) * 1e3 if newest_capture else 0.0
        t_media = self.clock.media_time(max(newest_capture) if newest_capture else now)
        event = EmotionEvent(
            seq=self.seq, t_media=round(t_media, 4), t_wall=time.time(), t_mono=t_emit, head=stack.head,
            scores=scores, presence=presence, latency_ms={k: round(max(v, 0.0), 3) for k, v in latency.items()},
            untrained=stack.untrained, skipped_ticks=self._skipped(), dropped_frames=self.frames.dropped,
            modalities=modalities, fusion=stack.fusion_name, faults=self.faults.take_new(),
        )
        self.seq += 1
        self._emit(event)

    def _text(self, now: float, latency: dict[str, float]) -> tuple[Features, TextPresence]:
        """The text window's features (encoded on the ASR thread when words were committed), absent when its
        newest word is older than the horizon or the ASR has stopped."""
        committed, text, version, encode_ms = self.text_window.latest()
        if version != self._text_version_seen:  # new words: report their encode once (done on the ASR thread)
            self._text_version_seen = version
            latency["text"] = encode_ms
        spoken = self.text_window.t_spoken
        age = now - spoken if spoken is not None else None
        alive = self.asr is None or self.asr.error is None
        fresh = bool(age is not None and age <= self.stack.text_horizon_s and alive)
        if not fresh:
            text = Features(text.values, 0, text.info)  # expired words, or a dead ASR: text is absent
        presence = TextPresence(bool(text.present), committed if text.present else "", int(text.length),
                                self.asr.tail if self.asr is not None else "", fresh=fresh,
                                fused=bool(text.present), age_s=_age(age))
        if self.asr is not None and self.asr.last_pass_ms is not None:
            latency["asr"] = float(self.asr.last_pass_ms)
        return text, presence

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

    def _audio_features(self, samples: np.ndarray, end_index: int, presence: AudioPresence,
                        latency: dict[str, float]) -> Features:
        """The audio window's features; absent (length 0) when there is no speech in it. Computed incrementally
        (only the frames new since the last tick, engines/audio.py `StreamingConvFeatures`) when the config asks
        for it on a CPU."""
        out = self.buffers.features("audio")
        if not presence.voiced:
            out.fill(0.0)
            return Features(out, 0)
        start = time.perf_counter()
        extractor = self.stack.extractors["audio"]
        try:
            if self.stack.incremental_audio:
                feats = extractor.extract_stream(samples, end_index, out)
            else:
                feats = extractor.extract(samples, SAMPLE_RATE, out=out)
        except ServerError:  # the inference server is down (reported once): audio absent this tick
            out.fill(0.0)
            return Features(out, 0)
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
        words = None
        if text is not None and text.present:
            try:
                words = fusion.calibrated("text", self._fuse({"text": text}))
            except ServerError:  # the inference server is down (reported once): no text scores this tick
                pass
        modalities = {"vision": ModalityScores(face, stack.models.get("vision")),
                      "text": ModalityScores(words, stack.models.get("text")),
                      "audio": ModalityScores(None, None)}  # no voice-emotion model: presence only
        return fusion.fuse({"vision": face, "text": words}) or {}, modalities

    def _fuse(self, feats: dict[str, Features]) -> dict[str, float]:
        """Run MCIHN on the features as they lie: vision and audio in the tick buffers, text in the text window's
        own array ([None] is a view, not a copy); a modality the stack lacks is its zero buffer with length 0."""
        stack, buffers = self.stack, self.buffers
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
