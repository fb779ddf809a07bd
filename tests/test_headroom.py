"""The CPU headroom of the live path (issue 12): incremental Wav2Vec2 conv features, int8 extractors, and the
vision analysis driven by the tick. Real tiny stand-in models, saved and loaded like real ones."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from engines.audio import SAMPLE_RATE, AudioExtractor, StreamingConvFeatures


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


@pytest.fixture(scope="module")
def audio(standin_models):
    return AudioExtractor(str(standin_models["audio"]))


def _stream(seconds: float, seed: int = 0, loudness=None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    gain = np.full(n, 0.1, np.float32) if loudness is None else loudness(np.arange(n) / SAMPLE_RATE)
    return (rng.standard_normal(n) * gain).astype(np.float32)


def _exact(audio: AudioExtractor, x: np.ndarray, end: int, frames: int) -> np.ndarray:
    """The exact model on the grid-aligned window the incremental path uses (its last `frames` frames)."""
    f_last = (end - audio.receptive_field) // audio.hop
    start = (f_last - frames + 1) * audio.hop
    ref = audio.extract(x[start: f_last * audio.hop + audio.receptive_field], SAMPLE_RATE)
    assert ref.length == frames
    return ref.values[:frames]


def test_incremental_features_start_exact_and_compute_only_new_frames(audio):
    assert audio.can_stream  # wav2vec2-base's kind: GroupNorm first layer, no conv bias
    x = _stream(8.0)
    window, hop = int(2.56 * SAMPLE_RATE), SAMPLE_RATE // 4
    out = np.zeros((audio.seq_len, audio.dim), np.float32)
    first = audio.extract_stream(x[:window], window, out)
    assert first.length == 127 and not out[127:].any()  # as `extract` packs 2.56 s: 127 frames, zero rows after
    np.testing.assert_allclose(out[:127], _exact(audio, x, window, 127), atol=1e-4)
    streaming = audio._streaming
    computed = streaming.computed
    for end in range(window + hop, len(x), hop):
        got = audio.extract_stream(x[end - window: end], end, out)
        cos = _cosines(out[: got.length], _exact(audio, x, end, got.length))
        assert cos.min() > 0.995, cos.min()  # steady loudness: the window's statistics hardly move
    calls = len(range(window + hop, len(x), hop))
    assert streaming.computed - computed <= calls * 14  # ~12.5 new frames a call, not 127


def test_incremental_features_recompute_frames_whose_statistics_drifted(audio):
    """Speech starting after near-silence changes the window's statistics: frames normalised with the old ones are
    recomputed, a bounded block a call, so the window comes back close to the exact features."""
    x = _stream(10.0, loudness=lambda t: np.where(t < 4.0, 0.005, 0.3).astype(np.float32))
    window, hop = int(2.56 * SAMPLE_RATE), SAMPLE_RATE // 4
    fresh = StreamingConvFeatures(audio.model, audio.seq_len, audio.do_normalize, refresh_frames=0)
    refreshing = StreamingConvFeatures(audio.model, audio.seq_len, audio.do_normalize, refresh_frames=16)
    a, b = (np.zeros((audio.seq_len, audio.dim), np.float32) for _ in range(2))
    worst = {"stale": 1.0, "refreshed": 1.0}
    for end in range(window, len(x), hop):
        n = fresh(x[end - window: end], end, a)
        refreshing(x[end - window: end], end, b)
        exact = _exact(audio, x, end, n)
        if end / SAMPLE_RATE > 4.0 + 2.56:  # the onset has left the window: only the stale statistics differ
            worst["stale"] = min(worst["stale"], float(_cosines(a[:n], exact).mean()))
            worst["refreshed"] = min(worst["refreshed"], float(_cosines(b[:n], exact).mean()))
    # Frames whose statistics moved less than the threshold (0.2) keep them, so the refreshed window is close, not
    # exact; without refreshing, the frames computed during the onset keep its statistics until they leave.
    assert worst["refreshed"] > 0.98, worst
    assert worst["stale"] < worst["refreshed"] - 0.02, worst


def test_incremental_features_start_over_after_a_gap(audio):
    x = _stream(12.0)
    window = int(2.56 * SAMPLE_RATE)
    out = np.zeros((audio.seq_len, audio.dim), np.float32)
    audio.extract_stream(x[:window], window, out)
    end = window + 5 * SAMPLE_RATE  # no call for 5 s (silence skips the audio stage): nothing is reusable
    got = audio.extract_stream(x[end - window: end], end, out)
    np.testing.assert_allclose(out[: got.length], _exact(audio, x, end, got.length), atol=1e-4)


def test_int8_runs_the_extractors_close_to_fp32_and_is_refused_off_onnxruntime(standin_models, tmp_path):
    from engines.backends import BackendChoiceError, create_backend
    from engines.vision import VisionExtractor

    vision = VisionExtractor(str(standin_models["vision"]), face_crop=False)
    model = vision.engine_model()
    pixels = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    fp32 = create_backend(model, "onnxruntime", "cpu", "fp32", cache_dir=tmp_path, threads=1)
    int8 = create_backend(model, "onnxruntime", "cpu", "int8", cache_dir=tmp_path, threads=1)
    assert int8.onnx_path.name.endswith(".int8.onnx") and int8.onnx_path.is_file()
    assert "MatMulInteger" in int8.onnx_path.read_bytes().decode("latin-1")  # the matrix products are int8
    a = fp32.run({"pixel_values": pixels})["image_embeds"]
    b = int8.run({"pixel_values": pixels})["image_embeds"]
    assert not np.array_equal(a, b) and _cosines(a, b).min() > 0.98
    with pytest.raises(BackendChoiceError, match="int8"):
        create_backend(model, "torch", "cpu", "int8", cache_dir=tmp_path)


class _Clock:
    def __init__(self):
        self.t = 0.0

    def now(self) -> float:
        return self.t

    @staticmethod
    def span(seconds: float) -> float:
        return seconds


class _SlowAnalyser:
    """Records the frames it is given (their first pixel carries the frame's number) and takes `seconds`."""

    def __init__(self, seconds: float):
        from engines.vision import FrameEmbeddings

        self.seconds, self.seen, self._result = seconds, [], FrameEmbeddings
        self.threads: set[str] = set()

    def embed_frames(self, frames):
        self.seen.append(int(frames[0][0, 0, 0]))
        self.threads.add(threading.current_thread().name)
        time.sleep(self.seconds)
        return self._result(np.ones((1, 4), np.float32), [None], np.array([True]))


def test_the_tick_has_the_newest_frame_analysed_beside_it():
    from realtime.buffers import LatestFrame
    from realtime.vision_worker import VisionWorker
    from realtime.windows import VisionWindow

    clock, frames, stop = _Clock(), LatestFrame(), threading.Event()
    analyser = _SlowAnalyser(0.05)
    worker = VisionWorker(analyser, VisionWindow(10, 4, 2.56), clock, report=lambda message: None)
    assert worker.begin() is None  # not started: the replay loop offers frames itself
    worker.start(frames, stop)
    try:
        for i in range(1, 4):
            frames.put(np.full((8, 8, 3), i, np.uint8), float(i))
        pending = worker.begin()  # the tick starts: the newest frame (3) goes to the vision thread
        assert worker.begin() is pending  # one analysis at a time: a second tick joins the same one
        worker.wait(pending, timeout=1.0)
        assert analyser.seen == [3] and analyser.threads == {"mcihn-vision_0"}
        assert worker.window.snapshot(3.0)[1].t_capture == 3.0
        frames.put(np.full((8, 8, 3), 4, np.uint8), 4.0)
        assert worker.begin() is None  # 0.9 of the vision interval has not passed on the clock yet
        clock.t = 0.9 * worker.interval
        worker.wait(worker.begin(), timeout=1.0)
        assert analyser.seen == [3, 4]
        clock.t = 2 * worker.interval
        assert worker.begin() is None  # no frame newer than the last analysed
    finally:
        stop.set()
        worker.join(1.0)


def test_memory_trimmer_hands_free_memory_back_until_stopped():
    import sys

    from realtime.memory import MemoryTrimmer, release_free_memory

    assert release_free_memory() == sys.platform.startswith("linux")  # glibc here
    trimmer = MemoryTrimmer(0.02, quiet_wait_s=0.0).start()
    deadline = time.monotonic() + 5.0
    while trimmer.trims < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    trimmer.stop()
    assert trimmer.trims >= 3 and trimmer.last_ms is not None
    # the resident size read right after each trim, in time order
    assert len(trimmer.after_trim) == trimmer.trims
    times = [t for t, _, _ in trimmer.after_trim]
    assert times == sorted(times) and all(total > anon > 1.0 for _, total, anon in trimmer.after_trim)
    # and every arena's size at those moments (glibc: the main arena first)
    assert len(trimmer.arenas_after_trim) == trimmer.trims and all(a and a[0] > 0 for a in trimmer.arenas_after_trim)
    assert not trimmer._thread.is_alive()
    with pytest.raises(ValueError):
        MemoryTrimmer(0)


def test_due_trim_waits_for_a_quiet_moment():
    """A due trim runs when mark_quiet() says an ASR pass has just freed its buffers, not in the middle of one."""
    from realtime.memory import MemoryTrimmer

    trimmer = MemoryTrimmer(0.01, quiet_wait_s=30.0).start()
    time.sleep(0.3)
    assert trimmer.trims == 0  # due many times over, but no quiet moment yet (the wait is 30 s)
    deadline = time.monotonic() + 5.0
    while trimmer.trims < 2 and time.monotonic() < deadline:
        trimmer.mark_quiet()
        time.sleep(0.02)
    assert trimmer.trims >= 2 and trimmer.quiet_trims == trimmer.trims
    trimmer.stop(timeout=5.0)  # ends at once, though it was waiting for quiet
    assert not trimmer._thread.is_alive()
    impatient = MemoryTrimmer(0.01, quiet_wait_s=0.01).start()  # nothing marks quiet: trims anyway
    while impatient.trims < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    impatient.stop()
    assert impatient.trims >= 2 and impatient.quiet_trims == 0


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc's malloc arenas")
@pytest.mark.parametrize("arenas", [0, 1])
def test_the_trim_returns_a_threads_freed_memory_only_when_it_shares_the_main_arena(arenas):
    """glibc's malloc_trim(0) returns the free top of the main arena, but not of a thread's own arena: the memory
    a worker thread allocated and freed stays resident there up to its high-water mark (the step growth of
    docs/benchmarks.md, "Soak: one arena"). In a fresh process, a thread allocates 40 MB in 1 MB blocks after a
    30 MB mmap'd block raised glibc's dynamic trim threshold (as model loading does), frees them all, and the
    process trims: with one arena the 40 MB go back, with glibc's default arenas they stay."""
    import subprocess
    import sys

    code = f"""
import ctypes, threading
from realtime.memory import limit_malloc_arenas, release_free_memory, resident_mb
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
limit_malloc_arenas({arenas})
def work():
    big = libc.malloc(30 << 20)  # mmap'd; freeing it raises the mmap and trim thresholds (30 / 60 MB)
    ctypes.memset(big, 1, 30 << 20)
    libc.free(big)
    blocks = [libc.malloc(1 << 20) for _ in range(40)]  # now from the thread's arena's heap, touched
    for b in blocks: ctypes.memset(b, 1, 1 << 20)
    for b in blocks: libc.free(b)  # they merge into the arena's free top
before = resident_mb()
t = threading.Thread(target=work)
t.start()
t.join()
assert release_free_memory()
print(resident_mb() - before)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    kept_mb = float(out.stdout.split()[-1])
    if arenas == 1:
        assert kept_mb < 10, f"{kept_mb:.0f} MB of the thread's freed 40 MB still resident after the trim"
    else:
        assert kept_mb > 30, f"glibc now returns a thread arena's free top ({kept_mb:.0f} MB kept): revisit memory.py"


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc's malloc arenas")
@pytest.mark.parametrize("arenas", [0, 1])
def test_malloc_arena_limit_makes_new_threads_share_arenas(arenas):
    """In a fresh process (the setting is process-wide): four threads allocating at once get arenas of their own,
    unless limit_malloc_arenas(1) came first (malloc_arenas_mb: one entry per arena, from glibc's malloc_info)."""
    import subprocess
    import sys

    code = f"""
import threading
from realtime.memory import limit_malloc_arenas, malloc_arenas_mb
assert limit_malloc_arenas({arenas}) == ({arenas} > 0)
barrier = threading.Barrier(4)
def work():
    blocks = [bytearray(65536) for _ in range(4)]  # below the mmap threshold: from the thread's arena
    barrier.wait()
threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
print(len(malloc_arenas_mb()))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    count = int(out.stdout.split()[-1])
    assert count == 1 if arenas == 1 else count >= 3, out.stdout
