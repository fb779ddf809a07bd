"""`mcihn bench`: the full live pipeline (the same Recognizer as `mcihn-live`) replaying a fixed clip paced like
a live camera and microphone, measured the way a researcher would: per-stage latency percentiles, updates per
second achieved against requested, skipped ticks, dropped frames, ASR commit lag, CPU use, memory.

Several backends run one after the other in the same invocation and are compared side by side (ratios of
p50 capture->emit). `--soak` runs 10 minutes and reports the slope of latency and memory over time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import tracemalloc
from array import array
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from realtime.memory import peak_resident_mb, resident_mb
from tools import UsageError

EXAMPLE = """examples:
  mcihn bench --size tiny --duration 20                      # seconds, after `make demo`
  mcihn bench --size base --backends torch,onnxruntime --duration 60 --out runs/bench-base
  mcihn bench --size base --backends onnxruntime --soak --out runs/soak
  mcihn bench --size base --duration 300 --trace-heap          # is memory growth Python's or native?
  mcihn bench --checkpoint runs/sims/seed_0 --clip interview.mp4
"""

STAGES = ("capture_to_emit", "vision", "vad", "audio", "text", "fusion", "asr")


@dataclass
class LatencyStats:
    """Percentiles of one stage's latencies in ms (NaN when the stage never ran)."""

    count: int
    p50: float
    p95: float
    p99: float
    max: float
    mean: float

    @classmethod
    def of(cls, values) -> LatencyStats:
        x = np.asarray(list(values), dtype=np.float64)
        if x.size == 0:
            return cls(0, *([float("nan")] * 5))
        p50, p95, p99 = np.percentile(x, [50, 95, 99])
        return cls(int(x.size), float(p50), float(p95), float(p99), float(x.max()), float(x.mean()))


@dataclass
class Slope:
    """A least-squares line over time: `per_min` units per minute, and the total change it implies."""

    per_min: float
    start: float
    end: float

    @classmethod
    def of(cls, t_s, values) -> Slope:
        t, v = np.asarray(t_s, np.float64), np.asarray(values, np.float64)
        if t.size < 2 or np.ptp(t) == 0:
            return cls(0.0, float(v[0]) if v.size else float("nan"), float(v[-1]) if v.size else float("nan"))
        slope, intercept = np.polyfit(t, v, 1)
        return cls(float(slope * 60), float(intercept + slope * t[0]), float(intercept + slope * t[-1]))


@dataclass
class RunReport:
    backend: str
    duration_s: float
    requested_hz: float
    achieved_hz: float
    events: int
    skipped_ticks: int
    dropped_frames: int
    stages: dict[str, LatencyStats]
    asr_commit_lag_ms: LatencyStats
    cpu_percent: float  # process CPU time / wall time (200 % = both cores busy)
    peak_rss_mb: float
    gpu_peak_mb: float | None
    latency_slope: Slope | None = None  # capture_to_emit ms over time (soak)
    rss_slope: Slope | None = None  # RSS MB over time (soak)
    # The same over the per-minute minima after the first minute: transient peaks (an ASR pass's buffers) and
    # warm-up (allocator arenas, lazily built kernels) do not pass for a leak.
    rss_floor_slope: Slope | None = None
    # The same over 5-minute minima (runs of 20 minutes or more): each window holds five of the session's
    # once-a-minute trims (realtime/memory.py), so its minimum is the RSS the process returns to. A 1-minute
    # window holds one trim, landing anywhere in an ASR pass's cycle, whose live buffers swing it by ~50 MB.
    rss_floor_slope_5min: Slope | None = None
    # --trace-heap: the Python heap traced by tracemalloc over time. Flat while RSS grows: the growth is in
    # native allocations (onnxruntime, CTranslate2, the C allocator), not in Python objects.
    heap_slope: Slope | None = None
    # The RSS right after each of the session's trims (realtime/memory.py MemoryTrimmer.after_trim), from the
    # third minute: what the process cannot hand back, without the free memory malloc keeps between trims.
    rss_after_trim_slope: Slope | None = None
    # The same three slopes (1- and 5-minute floors, after each trim) of the anonymous part of the RSS: what
    # malloc holds. The rest is mapped files (the libraries' code pages: MKL's and onnxruntime's kernels are paged
    # in as new shapes first run them), which the kernel drops under memory pressure and no leak can grow.
    anon_floor_slope: Slope | None = None
    anon_floor_slope_5min: Slope | None = None
    anon_after_trim_slope: Slope | None = None
    timeline: dict[str, list[float]] = field(default_factory=dict)  # t_s, capture_to_emit, rss_mb
    # Speech recognition on the clip's known script (first pass through the clip): word error rate, and per
    # utterance the time from its speech starting to its first committed word.
    asr_wer: float | None = None
    asr_heard: str = ""  # the words committed for the clip's first pass (what the WER is of)
    # RSS at the end of the run, and after glibc's malloc_trim(0) handed its free memory back to the system: what
    # the difference is, is allocator retention (fragmentation, per-thread arenas), not live objects.
    rss_end_mb: float | None = None
    rss_after_trim_mb: float | None = None
    # What each glibc malloc arena holds from the system after that trim (realtime/memory.py malloc_arenas_mb):
    # one entry when every thread shares the main arena, whose free memory the trim reaches entirely.
    malloc_arenas_mb: list[float] = field(default_factory=list)
    first_word_s: list[float] = field(default_factory=list)


class EventLog:
    """What summarize() reads of each event, in typed arrays: 80 bytes an update rather than the ~1 KB of a dict
    holding the event's latency dict, so that a soak's own bookkeeping (~0.16 MB/min at 4 updates/s as dicts) does
    not pass for the pipeline's memory growth."""

    def __init__(self):
        self.t_mono, self.skipped, self.dropped = array("d"), array("q"), array("q")
        self.latency_ms = {s: array("d") for s in STAGES}  # NaN: the stage did not run for that update

    def append(self, event) -> None:
        self.t_mono.append(event.t_mono)
        self.skipped.append(event.skipped_ticks)
        self.dropped.append(event.dropped_frames)
        for stage, values in self.latency_ms.items():
            values.append(event.latency_ms.get(stage, math.nan))

    def __len__(self) -> int:
        return len(self.t_mono)

    def as_dicts(self) -> list[dict]:
        return [{"t_mono": self.t_mono[i], "skipped_ticks": self.skipped[i], "dropped_frames": self.dropped[i],
                 "latency_ms": {s: v[i] for s, v in self.latency_ms.items() if not math.isnan(v[i])}}
                for i in range(len(self))]


def summarize(events: list[dict], duration_s: float, hop_s: float, commit_lags_s: list[float],
              backend: str = "", cpu_s: float = 0.0, peak_rss_mb: float = 0.0, gpu_peak_mb: float | None = None,
              rss_samples: list[tuple[float, float]] | None = None,
              heap_samples: list[tuple[float, float]] | None = None,
              after_trim: list[tuple[float, float, float]] | None = None,
              anon_samples: list[tuple[float, float]] | None = None) -> RunReport:
    """Statistics of one run from its events (dicts as in docs/events.md), wall duration and side samples."""
    values = {s: [e["latency_ms"][s] for e in events if s in e["latency_ms"]] for s in STAGES}
    stages = {s: LatencyStats.of(v) for s, v in values.items()}
    t0 = events[0]["t_mono"] if events else 0.0
    t = [e["t_mono"] - t0 for e in events]
    c2e = [e["latency_ms"]["capture_to_emit"] for e in events]
    rss_samples, heap_samples = rss_samples or [], heap_samples or []
    after_trim, anon_samples = after_trim or [], anon_samples or []
    span = (events[-1]["t_mono"] - t0) if len(events) > 1 else 0.0
    return RunReport(
        backend=backend, duration_s=duration_s, requested_hz=1.0 / hop_s,
        achieved_hz=(len(events) - 1) / span if span > 0 else 0.0, events=len(events),
        skipped_ticks=events[-1]["skipped_ticks"] if events else 0,
        dropped_frames=events[-1]["dropped_frames"] if events else 0,
        stages=stages, asr_commit_lag_ms=LatencyStats.of(1e3 * x for x in commit_lags_s),
        cpu_percent=100.0 * cpu_s / duration_s if duration_s > 0 else 0.0, peak_rss_mb=peak_rss_mb,
        gpu_peak_mb=gpu_peak_mb,
        latency_slope=Slope.of(t, c2e) if events else None,
        rss_slope=Slope.of(*np.asarray(rss_samples).T) if rss_samples else None,
        rss_floor_slope=floor_slope(rss_samples),
        rss_floor_slope_5min=floor_slope(rss_samples, 300.0) if duration_s >= 1200 else None,
        heap_slope=Slope.of(*np.asarray(heap_samples).T) if heap_samples else None,
        rss_after_trim_slope=after_trim_slope([(a[0], a[1]) for a in after_trim]),
        anon_floor_slope=floor_slope(anon_samples),
        anon_floor_slope_5min=floor_slope(anon_samples, 300.0) if duration_s >= 1200 else None,
        anon_after_trim_slope=after_trim_slope([(a[0], a[2]) for a in after_trim]),
        timeline={"t_s": t, "capture_to_emit_ms": c2e, "rss_t_s": [s[0] for s in rss_samples],
                  "rss_mb": [s[1] for s in rss_samples], "heap_mb": [s[1] for s in heap_samples],
                  "anon_mb": [s[1] for s in anon_samples], "after_trim_t_s": [a[0] for a in after_trim],
                  "after_trim_mb": [a[1] for a in after_trim], "after_trim_anon_mb": [a[2] for a in after_trim],
                  **{f"stage:{s}": v for s, v in values.items()}},
    )


def floor_slope(samples: list[tuple[float, float]], window_s: float = 60.0) -> Slope | None:
    """Slope of the per-window minima of (t, value) samples, skipping the first window; None under 3 windows."""
    if not samples or samples[-1][0] < 3 * window_s:
        return None
    t, v = np.asarray(samples, np.float64).T
    k = (t // window_s).astype(int)
    keys = [i for i in np.unique(k) if i > 0]
    return Slope.of([i * window_s + window_s / 2 for i in keys], [v[k == i].min() for i in keys])


AFTER_TRIM_WARMUP_S = 120.0  # the first trims still see models' first-use allocations


def after_trim_slope(samples: list[tuple[float, float]]) -> Slope | None:
    """Slope of the (t, MB) read right after each trim, past the warm-up; None under 3 such trims."""
    kept = [s for s in samples if s[0] >= AFTER_TRIM_WARMUP_S]
    return Slope.of(*np.asarray(kept).T) if len(kept) >= 3 else None


def arena_growth(arenas_after_trim: list[list[float]]) -> str:
    """"508/40 -> 510/55": each malloc arena's MB after the third trim (past the warm-up) and after the last."""
    if len(arenas_after_trim) < 3:
        return "-"
    return " -> ".join("/".join(f"{mb:.0f}" for mb in a) for a in (arenas_after_trim[2], arenas_after_trim[-1]))


def add_parser(subparsers) -> None:
    from realtime.asr import AsrOptions
    from realtime.config import LiveConfig

    p = subparsers.add_parser("bench", help="latency of the whole live pipeline on a replayed clip",
                              epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny", choices=("tiny", "base"),
                   help="stand-in models: tiny (tests) or base (the paper's architectures, random weights)")
    p.add_argument("--checkpoint", help="a real checkpoint instead of stand-ins (its extractors must be cached)")
    p.add_argument("--clip", help="the clip to replay (default: the bundled demo clip, looped)")
    p.add_argument("--script", help="a text file with what the clip says (default: the demo clip's sentences): the "
                                    "ASR word error rate is measured against it")
    p.add_argument("--backends", default="onnxruntime", help="comma list: torch, onnxruntime, tensorrt, auto")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is a GPU)")
    p.add_argument("--precision", default=None, choices=("fp32", "fp16", "int8"),
                   help="the extractors' (default: fp16 on a GPU, fp32 on the CPU; int8: onnxruntime, CPU)")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds per backend (default 30; 600 with --soak)")
    p.add_argument("--soak", action="store_true",
                   help="a long run (10 minutes per backend unless --duration says otherwise); reports latency and "
                        "memory slopes")
    p.add_argument("--trace-heap", action="store_true",
                   help="also trace the Python heap (tracemalloc; slows the run a little) to tell Python from native "
                        "memory growth")
    p.add_argument("--hop", type=float, default=0.25, help="seconds between updates (0.25: 4 updates/s)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per worker (default: half the cores)")
    p.add_argument("--incremental-audio", action="store_true",
                   help="CPU: compute only the audio window's new frames each update (approximate; docs/live.md)")
    p.add_argument("--trim-memory-s", type=float, default=LiveConfig.trim_memory_s,
                   help=f"seconds between the session's malloc trims (default {LiveConfig.trim_memory_s:g}; 0: none)")
    p.add_argument("--malloc-arenas", type=int, default=LiveConfig.malloc_arenas,
                   help=f"glibc malloc arenas for the process (default {LiveConfig.malloc_arenas}; 0: glibc's own, "
                        "8 per core)")
    p.add_argument("--asr-model", default=None, help="faster-whisper model (default: Whisper tiny.en, real weights; "
                                                 "--size tiny: a tiny random stand-in)")
    p.add_argument("--no-asr", action="store_true")
    p.add_argument("--asr-nice", type=int, default=AsrOptions.nice,
                   help=f"the ASR threads' niceness on Linux (default {AsrOptions.nice}; 0: normal priority)")
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "mcihn-live"))
    p.add_argument("--out", default="runs/bench", help="folder for report.json and latency.png")
    streams = p.add_argument_group("many streams (tools/bench_streams.py, docs/scaling.md)")
    streams.add_argument("--streams", help="stream counts, e.g. 1,2,4,8: N local processes, then N through --server")
    streams.add_argument("--server", default="auto", help="with --streams: HOST:PORT of `mcihn serve`, or auto "
                                                          "(start one on loopback)")
    streams.add_argument("--max-batch", type=int, default=8, help="with --server auto: the batcher's largest batch")
    streams.add_argument("--queue-delay-ms", type=float, default=2.0, help="with --server auto: its queue delay")


def run_one(args, backend: str, duration: float, progress) -> RunReport:
    """One pipeline run with `backend` for `duration` seconds of live-paced replay."""
    from realtime.asr import AsrOptions
    from realtime.recognizer import LiveConfig, Recognizer

    asr = AsrOptions(nice=args.asr_nice, **({"model": args.asr_model} if args.asr_model else {}))
    config = LiveConfig(checkpoint=args.checkpoint, demo=args.checkpoint is None,
                        standins=args.size if args.checkpoint is None else None,
                        source=args.clip, loop=True, hop_s=args.hop, backend=backend, device=args.device,
                        precision=args.precision, incremental_audio=args.incremental_audio,
                        threads=args.threads, limit_process_threads=True,  # bench owns its process
                        malloc_arenas=args.malloc_arenas, trim_memory_s=args.trim_memory_s,
                        use_asr=not args.no_asr, asr=asr, cache_dir=args.cache_dir)
    events = EventLog()
    rec = Recognizer(config)
    rec.on_event(events.append)
    rec.start()  # loading and engine building happen here, outside the measured time
    rss_samples: list[tuple[float, float]] = []
    anon_samples: list[tuple[float, float]] = []
    heap_samples: list[tuple[float, float]] = []
    if args.trace_heap:
        tracemalloc.start(1)
    try:
        cpu0, t0 = time.process_time(), time.monotonic()
        while (elapsed := time.monotonic() - t0) < duration:
            rss_samples.append((elapsed, resident_mb()))
            anon_samples.append((elapsed, resident_mb("anon")))
            if args.trace_heap:
                heap_samples.append((elapsed, tracemalloc.get_traced_memory()[0] / 2**20))
            progress(backend, elapsed, duration, rec.latest_event)
            time.sleep(min(1.0, duration - elapsed) if duration - elapsed > 0 else 0)
            if rec.ticker.error is not None:
                raise rec.ticker.error
        cpu_s, wall = time.process_time() - cpu0, time.monotonic() - t0
        from realtime.memory import malloc_arenas_mb, release_free_memory

        trim = resident_mb(), release_free_memory(), resident_mb()  # how much of the RSS is free memory malloc kept
        arenas = malloc_arenas_mb()
    finally:
        rec.stop()
        rec.join(60)  # let a running ASR pass end: the next backend's run must not share the CPU with it
        tracemalloc.stop()
    lags = [c.lag_s for c in rec.asr.commit_events()] if rec.asr is not None else []
    script = clip_script(args)
    accuracy = asr_accuracy(rec.asr.commit_events(), rec._t_start, args.clip, script) if rec.asr and script else None
    gpu = None
    if (args.device or "").startswith("cuda") or _cuda():
        import torch

        gpu = torch.cuda.max_memory_allocated() / 2**20
    after_trim = [(t - t0, *mb) for t, *mb in rec.memory.after_trim] if rec.memory is not None else []
    report = summarize(events.as_dicts(), wall, args.hop, lags, backend, cpu_s, peak_resident_mb(), gpu, rss_samples,
                       heap_samples, after_trim, anon_samples)
    if rec.memory is not None:
        report.timeline["after_trim_arenas_mb"] = [[round(mb, 1) for mb in a] for a in rec.memory.arenas_after_trim]
    if trim[1]:
        report.rss_end_mb, report.rss_after_trim_mb = round(trim[0], 1), round(trim[2], 1)
        report.malloc_arenas_mb = [round(mb, 1) for mb in arenas]
    if accuracy is not None:
        report.asr_wer, report.first_word_s, report.asr_heard = accuracy
    return report


def clip_script(args) -> str | None:
    """What the clip says: --script FILE, or the bench clip's sentences (`resolve_clip`)."""
    if args.script:
        return Path(args.script).read_text()
    from realtime.demo import DEMO_CLIP
    from tools.make_demo_clip import BENCH_SCRIPT, SCENES

    if args.clip is None or Path(args.clip).name.startswith("bench-v"):
        return " ".join(BENCH_SCRIPT)
    if Path(args.clip) == Path(DEMO_CLIP):
        return " ".join(sentence for _, sentence in SCENES)
    return None


def resolve_clip(args) -> None:
    """No --clip: the bench clip (nine sentences over the demo's faces, built once into the cache with espeak-ng),
    or the bundled demo clip when espeak-ng is missing (then no WER is measured)."""
    import shutil

    if args.clip is not None or args.checkpoint is not None:
        return
    if shutil.which("espeak-ng") is None:
        print("mcihn bench: espeak-ng is not installed, so the bundled demo clip is replayed and no word error rate "
              "is measured (apt-get install espeak-ng for the bench clip)", file=sys.stderr)
        from realtime.demo import DEMO_CLIP

        args.clip = str(DEMO_CLIP)
        return
    from tools.make_demo_clip import bench_clip

    args.clip = str(bench_clip(Path(args.cache_dir)))


def speech_spans(clip: str | None) -> tuple[list[tuple[float, float]], float]:
    """The utterances of a clip's audio ((start, end) seconds, Silero VAD, pauses of 1 s or more between them)
    and the audio's length. Unpadded (Silero pads by 0.4 s by default): a start is where speech is heard."""
    from faster_whisper.vad import VadOptions, get_speech_timestamps

    from realtime.buffers import SAMPLE_RATE
    from realtime.demo import DEMO_CLIP
    from realtime.file_source import media_items

    audio = np.concatenate([d for _, kind, d in media_items(clip or DEMO_CLIP) if kind == "audio"])
    spans = get_speech_timestamps(audio, VadOptions(min_silence_duration_ms=1000, speech_pad_ms=0))
    return [(x["start"] / SAMPLE_RATE, x["end"] / SAMPLE_RATE) for x in spans], len(audio) / SAMPLE_RATE


def asr_accuracy(commits, t0: float, clip: str | None, script: str) -> tuple[float, list[float], str] | None:
    """(WER of the words committed for the clip's first pass against its script, seconds from each utterance's
    speech start to its first committed word, the words heard)."""
    from realtime.asr import word_error_rate

    spans, length = speech_spans(clip)
    if not commits or (spans and commits[0].t_word_end - t0 > spans[0][1]):
        return None  # the worker keeps a bounded history: a long run no longer holds its first pass's words
    first_pass = [c for c in commits if c.t_word_end - t0 <= length]
    if not first_pass:
        return None
    heard = " ".join(c.text for c in first_pass)
    firsts = []
    for start, end in spans:
        words = [c for c in first_pass if start - 0.3 <= c.t_word_end - t0 <= end + 0.3]
        if words:
            firsts.append(round(words[0].t_commit - (t0 + start), 3))
    return word_error_rate(script, heard), firsts, heard


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def format_report(reports: list[RunReport]) -> str:
    """The terminal table: one column per backend, ratios of p50 capture->emit against the first."""
    lines = []
    head = f"{'':28s}" + "".join(f"{r.backend:>26s}" for r in reports)
    lines.append(head)
    base = reports[0].stages["capture_to_emit"].p50 if reports else float("nan")

    def row(label: str, cells: list[str]) -> None:
        lines.append(f"{label:28s}" + "".join(f"{c:>26s}" for c in cells))

    row("updates/s (requested)", [f"{r.achieved_hz:.2f} ({r.requested_hz:.2f})" for r in reports])
    row("events / skipped ticks", [f"{r.events} / {r.skipped_ticks}" for r in reports])
    row("frames dropped", [f"{r.dropped_frames}" for r in reports])
    for stage in STAGES:
        row(f"{stage} ms p50/p95/p99/max", [
            "-" if r.stages[stage].count == 0 else
            f"{r.stages[stage].p50:.0f}/{r.stages[stage].p95:.0f}/{r.stages[stage].p99:.0f}/{r.stages[stage].max:.0f}"
            for r in reports])
    row("ASR commit lag ms p50/p95", ["-" if r.asr_commit_lag_ms.count == 0 else
                                      f"{r.asr_commit_lag_ms.p50:.0f}/{r.asr_commit_lag_ms.p95:.0f}" for r in reports])
    if any(r.asr_wer is not None for r in reports):
        row("ASR WER (first pass)", ["-" if r.asr_wer is None else f"{100 * r.asr_wer:.1f} %" for r in reports])
        row("first word s p50/max", ["-" if not r.first_word_s else
                                     f"{np.median(r.first_word_s):.2f}/{max(r.first_word_s):.2f}" for r in reports])
    row("CPU % (2 cores = 200)", [f"{r.cpu_percent:.0f}" for r in reports])
    row("peak RSS MB", [f"{r.peak_rss_mb:.0f}" for r in reports])
    if any(r.rss_after_trim_mb is not None for r in reports):
        row("RSS at end / after malloc_trim MB", ["-" if r.rss_after_trim_mb is None else
                                                  f"{r.rss_end_mb:.0f} / {r.rss_after_trim_mb:.0f}" for r in reports])
    if any(r.malloc_arenas_mb for r in reports):
        row("malloc arenas after it, MB each", ["/".join(f"{mb:.0f}" for mb in r.malloc_arenas_mb) or "-"
                                                for r in reports])
    if any(r.gpu_peak_mb is not None for r in reports):
        row("GPU peak MB", ["-" if r.gpu_peak_mb is None else f"{r.gpu_peak_mb:.0f}" for r in reports])
    if any(r.duration_s >= 120 for r in reports):
        row("latency slope ms/min", [f"{r.latency_slope.per_min:+.2f}" if r.latency_slope else "-" for r in reports])
        row("RSS slope MB/min", [f"{r.rss_slope.per_min:+.2f}" if r.rss_slope else "-" for r in reports])
        row("RSS floor slope MB/min", [f"{r.rss_floor_slope.per_min:+.2f}" if r.rss_floor_slope else "-"
                                       for r in reports])
        if any(r.rss_floor_slope_5min for r in reports):
            row("  over 5-min floors MB/min", [f"{r.rss_floor_slope_5min.per_min:+.2f}" if r.rss_floor_slope_5min
                                               else "-" for r in reports])
        slopes = {"RSS after each trim slope MB/min": "rss_after_trim_slope",
                  "anon RSS floor slope MB/min": "anon_floor_slope",
                  "anon over 5-min floors MB/min": "anon_floor_slope_5min",
                  "anon after each trim MB/min": "anon_after_trim_slope"}
        for label, name in slopes.items():
            if any(getattr(r, name) for r in reports):
                row(label, [f"{getattr(r, name).per_min:+.2f}" if getattr(r, name) else "-" for r in reports])
        if any(len(r.timeline.get("after_trim_arenas_mb", [])) >= 3 for r in reports):
            # each arena's size after the third trim and after the last: a thread arena that only grew is
            # memory the trim cannot reach (realtime/memory.py limit_malloc_arenas)
            row("malloc arenas MB, 3rd -> last trim", [arena_growth(r.timeline.get("after_trim_arenas_mb", []))
                                                       for r in reports])
    if any(r.heap_slope for r in reports):
        row("Python heap slope MB/min", [f"{r.heap_slope.per_min:+.2f}" if r.heap_slope else "-" for r in reports])
    row("p50 capture->emit ratio", [f"{r.stages['capture_to_emit'].p50 / base:.2f}x" for r in reports])
    return "\n".join(lines)


def plot(reports: list[RunReport], path: Path) -> Path | None:
    """latency.png: per-stage distributions (box plots) and capture->emit over time, one colour per backend."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("mcihn bench: no PNG (matplotlib missing: pip install 'mcihn-live[bench]')", file=sys.stderr)
        return None
    fig, (ax_box, ax_time) = plt.subplots(1, 2, figsize=(13, 4.8))
    stages = [s for s in STAGES if any(r.stages[s].count for r in reports)]
    width = 0.8 / max(len(reports), 1)
    for i, r in enumerate(reports):
        data = [r.timeline.get(f"stage:{s}") or [np.nan] for s in stages]
        pos = np.arange(len(stages)) + (i - (len(reports) - 1) / 2) * width
        box = ax_box.boxplot(data, positions=pos, widths=width * 0.9, showfliers=False, patch_artist=True)
        for patch in box["boxes"]:
            patch.set_facecolor(f"C{i}")
            patch.set_alpha(0.6)
        ax_time.plot(r.timeline["t_s"], r.timeline["capture_to_emit_ms"], color=f"C{i}", lw=0.8, label=r.backend)
    ax_box.set_xticks(range(len(stages)), stages, rotation=30)
    ax_box.set_ylabel("ms")
    ax_box.set_yscale("log")
    ax_box.set_title("latency per stage (box: p25-p75, whiskers 1.5 IQR)")
    ax_time.set_xlabel("seconds")
    ax_time.set_ylabel("capture -> emit, ms")
    ax_time.set_title("latency over time")
    ax_time.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(args) -> int:
    from tqdm.auto import tqdm

    from realtime.memory import limit_malloc_arenas

    # Before anything starts a thread (building the clip, the stand-ins, tqdm's monitor): glibc reuses the arena of
    # an exited thread whatever the limit, so a limit set later, at Recognizer.start(), leaves those in play.
    limit_malloc_arenas(args.malloc_arenas)
    if args.streams:
        from tools.bench_streams import run as run_streams

        return run_streams(args)

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    duration = args.duration if args.duration is not None else (600.0 if args.soak else 30.0)
    if duration <= 0:
        raise UsageError("--duration must be positive")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    resolve_clip(args)
    bar = tqdm(total=duration * len(backends), unit="s", desc="bench", bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s")
    done = {"s": 0.0}

    def progress(backend: str, elapsed: float, total: float, event) -> None:
        bar.set_description(f"bench {backend}")
        bar.update(max(0.0, elapsed - done["s"]))
        done["s"] = elapsed
        if event is not None:
            bar.set_postfix(latency=f"{event.latency_ms['capture_to_emit']:.0f}ms", seq=event.seq)

    reports: list[RunReport] = []
    for backend in backends:
        done["s"] = 0.0
        reports.append(run_one(args, backend, duration, progress))
    bar.close()
    text = format_report(reports)
    print(text)
    meta = {"size": args.size, "precision": args.precision, "incremental_audio": args.incremental_audio,
            "asr_nice": args.asr_nice, "malloc_arenas": args.malloc_arenas, "trim_memory_s": args.trim_memory_s,
            "checkpoint": args.checkpoint, "clip": args.clip or "realtime/assets/demo.mp4",
            "hop_s": args.hop, "duration_s": duration, "machine": platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version()}
    report_path = out / "report.json"
    report_path.write_text(json.dumps({"meta": meta, "runs": [asdict(r) for r in reports]}, indent=1))
    png = plot(reports, out / "latency.png")
    print(f"mcihn bench: wrote {report_path}" + (f" and {png}" if png else ""), file=sys.stderr)
    return 0

