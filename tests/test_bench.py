"""`mcihn bench`: its statistics on synthetic timings, and one short end-to-end run on tiny models (no timed
assertions: only that everything is measured and reported)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tools.bench import LatencyStats, Slope, format_report, summarize


def synthetic_events(n: int, hop: float = 0.25, growth_ms_per_s: float = 0.0) -> list[dict]:
    rng = np.random.default_rng(0)
    events = []
    for i in range(n):
        t = 1000.0 + i * hop
        events.append({
            "seq": i, "t_mono": t, "skipped_ticks": i // 10, "dropped_frames": i // 4,
            "latency_ms": {"capture_to_emit": 50.0 + growth_ms_per_s * i * hop + rng.uniform(0, 1),
                           "fusion": float(i % 100), **({"asr": 400.0} if i % 2 else {})},
        })
    return events


def test_latency_percentiles_hand_case():
    stats = LatencyStats.of(range(1, 101))  # 1..100 ms
    assert (stats.count, stats.p50, stats.max, stats.mean) == (100, 50.5, 100.0, 50.5)
    assert stats.p95 == pytest.approx(95.05) and stats.p99 == pytest.approx(99.01)
    empty = LatencyStats.of([])
    assert empty.count == 0 and math.isnan(empty.p50)


def test_slope_per_minute():
    t = np.arange(0, 600, 1.0)
    slope = Slope.of(t, 100 + 0.5 * t)  # +0.5 MB/s = +30 MB/min
    assert slope.per_min == pytest.approx(30.0) and slope.start == pytest.approx(100) and slope.end > 399
    assert Slope.of([0.0], [5.0]).per_min == 0.0


def test_summarize_rates_stages_and_slopes():
    events = synthetic_events(401, growth_ms_per_s=0.1)  # 100 s at 4/s, latency growing 6 ms/min
    report = summarize(events, duration_s=100.0, hop_s=0.25, commit_lags_s=[0.5, 1.0, 1.5], backend="x",
                       cpu_s=50.0, peak_rss_mb=700.0, rss_samples=[(t, 600.0 + 0.01 * t) for t in range(100)],
                       heap_samples=[(t, 120.0 + (t % 2)) for t in range(100)])  # a flat heap with jitter
    assert report.requested_hz == 4.0 and report.achieved_hz == pytest.approx(4.0)
    assert report.events == 401 and report.skipped_ticks == 40 and report.dropped_frames == 100
    assert report.stages["fusion"].max == 99.0 and report.stages["asr"].count == 200
    assert report.stages["vision"].count == 0  # a stage that never ran
    assert report.asr_commit_lag_ms.p50 == pytest.approx(1000.0)
    assert report.cpu_percent == pytest.approx(50.0)
    assert report.latency_slope.per_min == pytest.approx(6.0, abs=0.3)
    assert report.rss_slope.per_min == pytest.approx(0.6)
    assert report.rss_floor_slope is None  # under three minutes
    assert report.heap_slope.per_min == pytest.approx(0.0, abs=0.05) and report.timeline["heap_mb"][1] == 121.0
    table = format_report([report, summarize(synthetic_events(41), 10.0, 0.25, [], "y")])
    assert "updates/s (requested)" in table and "4.00 (4.00)" in table and "1.00x" in table
    assert "Python heap slope MB/min" in table


def test_rss_floor_slope_ignores_peaks_and_warm_up():
    from tools.bench import floor_slope

    # 10 minutes: 2700 MB in the first minute (warm-up), then a flat 2950 MB floor with 100 MB peaks.
    samples = [(t, (2700.0 if t < 60 else 2950.0) + (100.0 if t % 30 == 0 else 0.0)) for t in range(600)]
    assert floor_slope(samples).per_min == pytest.approx(0.0)
    growing = [(t, 1000.0 + t / 60) for t in range(600)]  # a real leak: 1 MB/min
    assert floor_slope(growing).per_min == pytest.approx(1.0)
    # 30 minutes, flat, with a once-a-minute low point that lands anywhere in a 0-50 MB swing (the trim during or
    # between ASR passes): the 1-minute floors scatter, the 5-minute floors find the level the process returns to.
    rng = np.random.default_rng(0)
    lows = {m: 2300.0 + rng.uniform(0, 50) for m in range(30)}
    trimmed = [(t, lows[t // 60] + (0.0 if t % 60 == 30 else 60.0)) for t in range(1800)]
    assert abs(floor_slope(trimmed, 300.0).per_min) < abs(floor_slope(trimmed).per_min) + 1e-9
    assert abs(floor_slope(trimmed, 300.0).per_min) < 0.5
    assert floor_slope([(t, 1000.0 + t / 60) for t in range(1800)], 300.0).per_min == pytest.approx(1.0)


def test_bench_tiny_end_to_end(tmp_path, capsys):
    from tools.cli import main

    out = tmp_path / "bench"
    assert main(["bench", "--size", "tiny", "--duration", "4", "--backends", "torch,onnxruntime",
                 "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    runs = {r["backend"]: r for r in report["runs"]}
    assert set(runs) == {"torch", "onnxruntime"}
    for r in runs.values():
        # several updates, however loaded the machine (a count near 16 would be a timing assertion)
        assert r["events"] >= 3 and r["stages"]["capture_to_emit"]["count"] == r["events"]
        assert r["stages"]["fusion"]["count"] == r["events"] and r["peak_rss_mb"] > 0 and r["cpu_percent"] > 0
    assert (out / "latency.png").stat().st_size > 10_000
    assert "p50 capture->emit ratio" in capsys.readouterr().out


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc's malloc arenas")
def test_bench_process_ends_with_one_malloc_arena(tmp_path):
    """A fresh `mcihn bench` process: every thread it ran (stand-in building, the workers, onnxruntime's and
    CTranslate2's pools) allocated from the main arena, the only one whose free top the trim returns. Fails if the
    arena limit is set after some thread has run (glibc hands exited threads' arenas on whatever the limit)."""
    import subprocess
    import sys

    out = tmp_path / "bench"
    code = "import sys; from tools.cli import main; sys.exit(main(sys.argv[1:]))"
    subprocess.run([sys.executable, "-c", code, "bench", "--size", "tiny", "--duration", "3", "--backends",
                    "onnxruntime", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)],
                   check=True, capture_output=True)
    report = json.loads((out / "report.json").read_text())
    assert report["meta"]["malloc_arenas"] == 1
    assert len(report["runs"][0]["malloc_arenas_mb"]) == 1, report["runs"][0]["malloc_arenas_mb"]


def test_arena_growth_reads_past_the_warm_up():
    from tools.bench import arena_growth

    assert arena_growth([[500.0, 30.0], [505.0, 38.0], [508.0, 40.2], [509.0, 48.0], [510.4, 55.1]]) == \
        "508/40 -> 510/55"
    assert arena_growth([[500.0], [505.0]]) == "-"


def test_after_trim_slope_skips_warm_up_and_needs_three_trims():
    from tools.bench import AFTER_TRIM_WARMUP_S, after_trim_slope

    warm = [(t, 2000.0 + t) for t in range(0, int(AFTER_TRIM_WARMUP_S), 30)]  # steep first-use growth: ignored
    flat = [(AFTER_TRIM_WARMUP_S + 60.0 * i, 2300.0 + (-1) ** i) for i in range(20)]
    assert after_trim_slope(warm + flat).per_min == pytest.approx(0.0, abs=0.1)
    rising = [(AFTER_TRIM_WARMUP_S + 60.0 * i, 2300.0 + 2 * i) for i in range(20)]
    assert after_trim_slope(warm + rising).per_min == pytest.approx(2.0)
    assert after_trim_slope(flat[:2]) is None


def test_event_log_keeps_what_summarize_reads():
    """The soak's compact event record gives the same report as the events themselves, missing stages included."""
    from types import SimpleNamespace

    from tools.bench import EventLog

    events = synthetic_events(200)
    log = EventLog()
    for e in events:
        log.append(SimpleNamespace(t_mono=e["t_mono"], skipped_ticks=e["skipped_ticks"],
                                   dropped_frames=e["dropped_frames"], latency_ms={**e["latency_ms"], "other": 1.0}))
    assert len(log) == 200 and "asr" not in log.as_dicts()[0]["latency_ms"]
    assert asdict_without_timeline(summarize(log.as_dicts(), 50.0, 0.25, [])) == \
        asdict_without_timeline(summarize(events, 50.0, 0.25, []))


def asdict_without_timeline(report) -> str:
    from dataclasses import asdict

    return json.dumps({k: v for k, v in asdict(report).items() if k != "timeline"}, sort_keys=True, default=str)


def test_anonymous_memory_slopes_apart_from_mapped_files():
    """Total RSS rising 1 MB/min from library pages paged in, malloc's part flat: the anon slopes say so."""
    events = synthetic_events(10 * 240 + 1)  # 10 minutes at 4/s
    total = [(t, 2300.0 + t / 60) for t in range(600)]
    anon = [(t, 1800.0 + (30.0 if t % 60 == 59 else 0.0)) for t in range(600)]  # flat, with a swing before trims
    after_trim = [(60.0 * m, 2300.0 + m, 1800.0) for m in range(1, 10)]
    report = summarize(events, 600.0, 0.25, [], rss_samples=total, after_trim=after_trim, anon_samples=anon)
    assert report.rss_floor_slope.per_min == pytest.approx(1.0) and report.rss_after_trim_slope.per_min == \
        pytest.approx(1.0)
    assert report.anon_floor_slope.per_min == pytest.approx(0.0) and report.anon_after_trim_slope.per_min == \
        pytest.approx(0.0)
    assert report.anon_floor_slope_5min is None  # under 20 minutes
    assert report.timeline["after_trim_anon_mb"][0] == 1800.0
    table = format_report([report])
    assert "anon RSS floor slope MB/min" in table and "anon after each trim MB/min" in table
