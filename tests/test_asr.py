"""Streaming ASR: LocalAgreement on hand-made hypotheses, the transcriber's buffer policy on a scripted stand-in
model, and the real faster-whisper code path on the tiny converted Whisper with espeak-ng speech."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from engines.hub import ModelNotAvailableError
from realtime.asr import (
    SAMPLE_RATE,
    AsrOptions,
    AsrWorker,
    LocalAgreement,
    StreamingTranscriber,
    Word,
    join_words,
    normalize,
    resolve_whisper_model,
)


def words(*spec: tuple[float, float, str]) -> list[Word]:
    return [Word(a, b, t) for a, b, t in spec]


# --- LocalAgreement ---------------------------------------------------------------------------------------------

def test_commits_only_what_two_hypotheses_agree_on():
    la = LocalAgreement()
    assert la.insert(words((0.0, 0.4, " Hello"), (0.5, 0.9, " word"))) == []  # one hypothesis: nothing agreed
    assert join_words(la.tail) == "Hello word"
    new = la.insert(words((0.0, 0.4, " hello,"), (0.5, 0.9, " world"), (1.0, 1.3, " this")))
    assert join_words(new) == "hello,"  # case and punctuation do not matter; "word" != "world" stops the prefix
    assert join_words(la.tail) == "world this"
    new = la.insert(words((0.0, 0.4, " Hello"), (0.5, 0.9, " World."), (1.0, 1.3, " this"), (1.4, 1.6, " is")))
    assert join_words(new) == "World. this"
    assert join_words(la.committed) == "hello, World. this" and join_words(la.tail) == "is"


def test_no_double_commit_when_committed_words_are_transcribed_again():
    la = LocalAgreement()
    la.insert(words((0.0, 0.4, " one"), (0.5, 0.9, " two")))
    la.insert(words((0.0, 0.4, " one"), (0.5, 0.9, " two")))
    assert join_words(la.committed) == "one two"
    # The same words again with jittered times (the second starts after the committed end - 0.1), then new ones.
    hyp = words((0.02, 0.41, " One"), (0.85, 0.95, " two"), (1.0, 1.4, " three"))
    assert la.insert(hyp) == []
    assert join_words(la.insert(hyp)) == "three"
    assert join_words(la.committed) == "one two three" and la.tail == []
    assert la.insert(hyp) == [] and la.tail == []  # agreement on old words commits nothing twice


def test_trimming_offsets_keep_absolute_times():
    la = LocalAgreement()
    hyp = words((0.0, 0.5, " a."), (0.6, 1.0, " b"))
    la.insert(hyp, offset=10.0)
    assert [w.start for w in la.insert(hyp, offset=10.0)] == [10.0, 10.6]  # times are absolute
    la.trim(10.5)  # the audio up to the end of "a." left the buffer; the next pass sees it relative to 10.5
    new = la.insert(words((0.1, 0.5, " b"), (0.6, 0.9, " c")), offset=10.5)
    assert new == []
    new = la.insert(words((0.1, 0.5, " b"), (0.6, 0.9, " c"), (1.0, 1.2, " d")), offset=10.5)
    assert [(w.start, w.text) for w in new] == [(11.1, " c")]
    assert join_words(la.committed) == "a. b c"
    assert [w.text for w in la.finish()] == [" d"] and la.tail == []


def test_chinese_words_compare_and_join_without_spaces():
    assert normalize("你好，") == normalize("你好") and normalize(" Hello!") == "hello"
    la = LocalAgreement()
    la.insert(words((0.0, 0.3, "你好"), (0.3, 0.6, "世界")))
    assert join_words(la.insert(words((0.0, 0.3, "你好"), (0.3, 0.6, "世界。")))) == "你好世界。"  # newest spelling
    # A Chinese full stop ends a sentence: the transcriber trims its buffer there.
    script = [Word(0.2 + 0.3 * i, 0.45 + 0.3 * i, c) for i, c in enumerate("你好世界。我很高兴")]
    tr = StreamingTranscriber(AsrOptions(model="scripted", language="zh"), model=ScriptedWhisper(script))
    list(stream(tr, 3.0))
    assert join_words(tr.committed).startswith("你好世界。") and tr.buffer_t0 >= script[4].end - 1e-6


# --- StreamingTranscriber on a scripted model -------------------------------------------------------------------

class ScriptedWhisper:
    """A perfect, stable recogniser: the audio samples carry their absolute sample index, so each pass knows where
    its buffer starts and returns the script's words that lie wholly inside it (times relative to the buffer)."""

    def __init__(self, script: list[Word]):
        self.script = script
        self.model = SimpleNamespace(is_multilingual=True)
        self.calls: list[dict] = []

    def transcribe(self, audio: np.ndarray, **kwargs):
        self.calls.append(dict(kwargs, audio_s=len(audio) / SAMPLE_RATE))
        t0, t1 = audio[0] / SAMPLE_RATE, (audio[-1] + 1) / SAMPLE_RATE
        ws = [SimpleNamespace(start=w.start - t0, end=w.end - t0, word=w.text) for w in self.script
              if w.start >= t0 - 1e-6 and w.end <= t1]
        return iter([SimpleNamespace(words=ws)]), SimpleNamespace(language=kwargs.get("language"))


def stream(transcriber: StreamingTranscriber, seconds: float, block_s: float = 0.5):
    """Feed `seconds` of index-carrying audio in blocks, one pass per block; yields each update."""
    n, step = int(seconds * SAMPLE_RATE), int(block_s * SAMPLE_RATE)
    for i in range(0, n, step):
        block = np.arange(i, min(i + step, n), dtype=np.float32)
        transcriber.insert_audio(block)
        yield transcriber.process()


def test_transcriber_commits_each_word_once_and_trims_at_sentence_ends():
    text = "Hello world. This is a test. How are you today? Fine!"
    script = [Word(0.3 + 0.45 * i, 0.3 + 0.45 * i + 0.35, " " + t) for i, t in enumerate(text.split())]
    model = ScriptedWhisper(script)
    tr = StreamingTranscriber(AsrOptions(model="scripted", max_buffer_s=10.0), model=model)
    updates = list(stream(tr, 6.0))
    tr.finish()
    assert join_words(tr.committed) == text  # every word, exactly once, across the trims
    assert [w.start for w in tr.committed] == pytest.approx([w.start for w in script])
    assert max(c["audio_s"] for c in model.calls) < 3.0  # trimmed at each sentence end, never near 10 s
    assert min(u.buffer_s for u in updates) < 1.0
    # The prompt is the committed text that left the buffer: the last pass was prompted with earlier sentences.
    assert model.calls[-1]["initial_prompt"].startswith("Hello world.")
    assert all(c["word_timestamps"] and c["vad_filter"] and c["beam_size"] == 1 for c in model.calls)


def test_undecodable_bytes_are_never_shown_or_committed():
    # Whisper writes U+FFFD where a token sequence is not UTF-8 (a character cut between tokens, an untrained
    # model): the character is dropped, and a word made only of it is no word.
    script = [Word(0.3, 0.6, " caf\ufffd"), Word(0.7, 0.9, " \ufffd\ufffd"), Word(1.0, 1.3, " ok.")]
    tr = StreamingTranscriber(AsrOptions(model="scripted"), model=ScriptedWhisper(script))
    updates = list(stream(tr, 2.0))
    tr.finish()
    assert join_words(tr.committed) == "caf ok."
    assert not any("\ufffd" in w.text for u in updates for w in u.tail)


def test_transcriber_buffer_is_bounded_without_sentence_ends():
    script = [Word(0.2 + 0.4 * i, 0.5 + 0.4 * i, f" w{i}") for i in range(200)]  # 80 s, no punctuation
    tr = StreamingTranscriber(AsrOptions(model="scripted", max_buffer_s=4.0), model=ScriptedWhisper(script))
    updates = list(stream(tr, 60.0))
    assert max(u.audio_s for u in updates) <= 4.0 + 0.5  # cut at the last committed word past max_buffer_s
    got = [w.text for w in tr.committed]
    assert got == [w.text for w in script[:len(got)]] and len(got) > 140  # nothing lost, nothing doubled
    assert all(lag >= 0 for u in updates for lag in u.lags_s)


def test_transcriber_drops_silence_and_fills_lost_audio():
    tr = StreamingTranscriber(AsrOptions(model="scripted"), model=ScriptedWhisper([]))
    updates = list(stream(tr, 10.0))
    assert max(u.buffer_s for u in updates) <= 2.0 + 1e-6  # no words heard: keep only the last 2 s
    t_end = tr.buffer_t_end
    tr.insert_audio(np.zeros(SAMPLE_RATE // 2, np.float32), t_end + 1.5)  # 1 s of audio lost before this block
    assert tr.buffer_t_end == pytest.approx(t_end + 1.5)  # the timeline keeps its place


def test_options_are_validated():
    with pytest.raises(ValueError, match="max_buffer_s"):
        AsrOptions(max_buffer_s=40)
    with pytest.raises(ValueError, match="device"):
        AsrOptions(device="tpu")


# --- Models that are not there ----------------------------------------------------------------------------------

def test_uncached_model_offline_names_model_and_fix(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    fix = r"'base' \(Systran/faster-whisper-base\).*mcihn download --asr-model base"
    with pytest.raises(ModelNotAvailableError, match=fix):
        StreamingTranscriber(AsrOptions(model="base"))
    with pytest.raises(ModelNotAvailableError, match="unknown faster-whisper model 'huge'"):
        resolve_whisper_model("huge")
    with pytest.raises(ModelNotAvailableError, match="does not exist"):
        resolve_whisper_model(str(tmp_path / "nowhere"))
    with pytest.raises(ModelNotAvailableError, match="model.bin"):
        resolve_whisper_model(str(tmp_path))


# --- The real faster-whisper path: the tiny converted Whisper on espeak-ng speech ------------------------------

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory) -> str:
    from engines.whisper_standin import build_tiny_whisper

    return str(build_tiny_whisper(tmp_path_factory.mktemp("whisper") / "tiny-ct2"))


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> np.ndarray:
    """espeak-ng speech at 16 kHz float32 (about 3 s)."""
    from scipy.io import wavfile
    from scipy.signal import resample_poly

    wav = tmp_path_factory.mktemp("speech") / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), "hello world. this is a test of streaming speech."], check=True)
    rate, x = wavfile.read(wav)
    assert rate == 22050
    return resample_poly(x.astype(np.float32) / 32768.0, 320, 441).astype(np.float32)


def test_tiny_whisper_is_built_once(tiny_whisper):
    from engines.whisper_standin import build_tiny_whisper

    before = (Path(tiny_whisper) / "model.bin").stat().st_mtime_ns
    assert build_tiny_whisper(tiny_whisper) == Path(tiny_whisper)
    assert (Path(tiny_whisper) / "model.bin").stat().st_mtime_ns == before


@pytest.fixture(scope="module")
def tiny_transcriber_options(tiny_whisper) -> AsrOptions:
    return AsrOptions(model=tiny_whisper, language="zh", threads=1, min_chunk_s=1.0, max_buffer_s=8.0)


@needs_espeak
def test_tiny_whisper_commits_a_repeated_hypothesis_once(tiny_transcriber_options, speech):
    # "zh" on an English-only model is said once and transcribed as English, through the real decoding code.
    tr = StreamingTranscriber(tiny_transcriber_options)
    tr.insert_audio(np.concatenate([speech, np.zeros(SAMPLE_RATE, np.float32)]), t_end=100.0)
    first = tr.process()
    assert first.new_words == () and first.pass_ms > 0 and first.language == "en"
    assert first.tail, "the tiny stand-in transcribes this speech to at least one (gibberish) word"
    second = tr.process()  # the same audio again: the same hypothesis, so LocalAgreement commits all of it
    assert [w.text for w in second.new_words] == [w.text for w in first.tail] and second.tail == ()
    assert all(96.0 <= w.start <= w.end <= 100.0 + 1e-6 for w in second.new_words)  # absolute times
    assert tr.process().new_words == ()  # and never twice


@needs_espeak
def test_worker_over_a_long_stream_stays_bounded_and_stops_promptly(tiny_transcriber_options, speech):
    block = SAMPLE_RATE // 2
    audio = np.concatenate([speech, np.zeros(SAMPLE_RATE // 2, np.float32)])
    fed = 0  # samples handed to the worker: the stream's clock

    def get_audio(since: float):  # faster than real time: a 0.5 s block per call, stamped on the stream's clock
        nonlocal fed
        out = np.take(audio, np.arange(fed, fed + block), mode="wrap")  # the utterance, over and over
        fed += block
        return out, fed / SAMPLE_RATE

    updates = []
    options = dataclasses.replace(tiny_transcriber_options, min_chunk_s=2.0)  # 30 passes over the minute
    transcriber = StreamingTranscriber(options, clock=lambda: fed / SAMPLE_RATE)
    worker = AsrWorker(transcriber, get_audio, since=0.0, on_update=updates.append)
    worker.start()
    deadline = time.monotonic() + 50
    while fed < 60 * SAMPLE_RATE and worker.alive and time.monotonic() < deadline:
        time.sleep(0.05)
    t = time.monotonic()
    assert worker.stop(timeout=2.0)  # while the stream still flows, maybe mid-pass
    assert time.monotonic() - t < 2.0 and not worker.alive
    assert worker.error is None and fed >= 60 * SAMPLE_RATE
    passes = [u for u in updates if u.pass_ms > 0]
    assert len(passes) >= 29 and worker.passes == len(passes) and worker.last_pass_ms > 0
    # Bounded: no pass reads more than max_buffer_s plus the audio that arrived during the previous pass, and no
    # word waits longer than that to be committed (lag in stream seconds: commit time - word end).
    assert max(u.audio_s for u in passes) <= 8.0 + 2.0
    assert max(u.buffer_s for u in passes) <= 8.0
    events = worker.commit_events()
    assert all(0.0 <= e.lag_s <= 10.0 and e.lag_s == pytest.approx(e.t_commit - e.t_word_end) for e in events)
    assert len(worker.text_window(5).split()) <= 5


def test_worker_publishes_committed_text_window_and_tail():
    text = "Hello world. This is a test. How are you today? Fine!"
    script = [Word(0.3 + 0.45 * i, 0.3 + 0.45 * i + 0.35, " " + t) for i, t in enumerate(text.split())]
    n, step, fed = 6 * SAMPLE_RATE, SAMPLE_RATE // 4, 0

    def get_audio(since: float):  # index-carrying audio (see ScriptedWhisper), then nothing
        nonlocal fed
        if fed >= n:
            return np.zeros(0, np.float32), None
        fed += step
        return np.arange(fed - step, fed, dtype=np.float32), fed / SAMPLE_RATE

    # The scripted audio is sample indices, not speech: passes on a timer (the VAD policy is tested on real speech).
    tr = StreamingTranscriber(AsrOptions(model="scripted", vad_passes=False), model=ScriptedWhisper(script))
    worker = AsrWorker(tr, get_audio, since=0.0)
    ended: list[int] = []  # the session's memory trimmer listens here (realtime/memory.py)
    worker.after_pass = lambda: ended.append(worker.passes)
    worker.start()
    deadline = time.monotonic() + 5
    while (fed < n or worker.tail) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert worker.text_window() == text and worker.tail == "" and worker.version > 3
    assert ended == list(range(1, len(ended) + 1)) and len(ended) >= worker.passes - 1  # once after each pass
    assert worker.text_window(3) == "you today? Fine!"
    assert worker.stop(timeout=2.0) and worker.error is None


def test_ring_reader_reads_each_sample_once():
    from realtime.asr import ring_reader
    from realtime.buffers import AudioRing

    ring = AudioRing(capacity_s=2.0)
    ring.write(np.ones(100, np.float32), t_end=10.0)  # before the reader: not read
    read, from_first = ring_reader(ring), ring_reader(ring, 0)  # the session's worker reads from the first sample
    ring.write(np.arange(8000, dtype=np.float32), t_end=10.5)
    samples, t_end = read(0.0)
    assert len(samples) == 8000 and samples[-1] == 7999 and t_end == 10.5
    assert len(read(t_end)[0]) == 0
    assert len(from_first(0.0)[0]) == 8100
    ring.write(np.zeros(40000, np.float32), t_end=13.0)  # more than the ring holds: from the oldest still held
    assert len(from_first(0.0)[0]) == 32000


def test_worker_reports_errors_instead_of_dying_silently():
    caught = threading.Event()

    def broken(since: float):
        raise OSError("microphone unplugged")

    model = ScriptedWhisper([])
    worker = AsrWorker(StreamingTranscriber(AsrOptions(model="scripted"), model=model), broken,
                       on_error=lambda err: caught.set())
    worker.start()
    assert caught.wait(2.0)
    assert isinstance(worker.error, OSError) and "unplugged" in str(worker.error)
    assert worker.stop(timeout=2.0) and not worker.alive


def test_last_utterance_is_one_sentence_never_two_emotions():
    """The starter's text model scores one utterance: the last complete sentence until the next has 3 words."""
    from realtime.asr import AsrWorker, Word

    worker = AsrWorker(SimpleNamespace(options=AsrOptions()), lambda since: (np.zeros(0, np.float32), None))

    def say(text: str) -> str:
        worker._words.extend(Word(0.0, 0.0, " " + w) for w in text.split())
        return worker.last_utterance()

    assert say("I am so") == "I am so"  # nothing finished yet: the words so far
    assert say("happy today.") == "I am so happy today."
    assert say("I love it.") == "I love it."  # a short complete sentence stands alone
    assert say("I hate") == "I love it."  # two words of the next: the last complete sentence still
    assert say("this so much") == "I hate this so much"


def test_punctuation_alone_is_no_word_and_passes_have_a_token_budget():
    """Whisper's ". . . ." loop: punctuation alone joins the word before it once, and is never a word itself."""
    script = [Word(0.3, 0.6, " Hello"), Word(0.7, 0.8, " ."), Word(0.9, 1.0, " ."), Word(1.1, 1.4, " world.")]
    model = ScriptedWhisper(script)
    tr = StreamingTranscriber(AsrOptions(model="scripted"), model=model)
    for _ in stream(tr, 3.0):
        pass
    tr.finish()
    assert [w.text for w in tr.committed] == [" Hello.", " world."]
    assert all(c["max_new_tokens"] == int(8 * c["audio_s"]) + 16 for c in model.calls)
