"""`mcihn bench --streams 1,2,4,8 --server auto`: many live streams at once, each a `mcihn-live` process replaying
the clip at live pace, first each with its own models (local), then all sending the models' work to one Triton
Inference Server (`mcihn serve`, realtime/serve.py); side by side per N: per-stream capture->emit percentiles,
aggregate updates/s, skipped ticks, and the batch sizes the server formed (docs/scaling.md).

Stations start one after another (each waits for the previous one's first event, so start-up peaks do not add
up), then all are measured over the same `--duration` window. A local N whose stations would not fit in the
memory left is not run, and says so.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

from tools import UsageError

STATION_MIN_FREE_MB = 2500  # a base-size local station's resident memory, with a margin


def parse_counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise UsageError(f"--streams takes stream counts like 1,2,4,8 (got {text!r})")
    return counts


def free_port(span: int = 3) -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + span < 65536:
            return port
    raise UsageError("no free port for the server")


def available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def station_command(args, jsonl: Path, server: str | None) -> list[str]:
    cmd = [_bin("mcihn-live"), "--source", args.clip, "--loop", "--speed", "1", "--hop", str(args.hop),
           "--jsonl", str(jsonl), "--cache-dir", args.cache_dir, "--threads", str(args.threads or 1),
           "--backend", args.backends.split(",")[0]]
    cmd += ["--checkpoint", args.checkpoint] if args.checkpoint else ["--standins", args.size]
    if args.no_asr:
        cmd.append("--no-asr")
    if server:
        cmd += ["--server", server, "--server-timeout", "10"]
    return cmd


def start_server(args, out: Path) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    batch_log = out / "server-batches.json"
    cmd = [_bin("mcihn"), "serve", f"127.0.0.1:{port}", "--cache-dir", args.cache_dir, "--backend",
           args.backends.split(",")[0], "--batch-log", str(batch_log), "--max-batch", str(args.max_batch),
           "--queue-delay-ms", str(args.queue_delay_ms)]
    cmd += ["--checkpoint", args.checkpoint] if args.checkpoint else ["--standins", args.size]
    log = (out / "server.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 900
    while "mcihn serve: Triton serving" not in (out / "server.log").read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise UsageError(f"mcihn serve did not start; see {out / 'server.log'}")
        time.sleep(1)
    return proc, f"127.0.0.1:{port}", batch_log


def stop(proc: subprocess.Popen, sig: int = signal.SIGINT) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # what is left of its group (Triton's stub processes)
    except (ProcessLookupError, PermissionError):
        pass


def read_events(path: Path, t0: float, t1: float) -> list[dict]:
    events = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if t0 <= e["t_wall"] <= t1:
                events.append(e)
    return events


def server_batches(path: Path | None) -> dict[str, dict[int, int]]:
    if path is None or not path.exists():
        return {}
    try:
        return {m: {int(k): v for k, v in c.items()} for m, c in json.loads(path.read_text()).items()}
    except ValueError:
        return {}


def triton_metrics(server: str) -> dict[str, tuple[float, float]]:
    """model -> (inferences, executions) from Triton's metrics (on the HTTP port + 2, `mcihn serve`'s default)."""
    host, port = server.rsplit(":", 1)
    try:
        with urllib.request.urlopen(f"http://{host}:{int(port) + 2}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    found: dict[str, list[float]] = {}
    for line in text.splitlines():
        for i, name in enumerate(("nv_inference_count{", "nv_inference_exec_count{")):
            if line.startswith(name):
                model = line.split('model="', 1)[1].split('"', 1)[0]
                found.setdefault(model, [0.0, 0.0])[i] = float(line.rsplit(" ", 1)[1])
    return {m: (v[0], v[1]) for m, v in found.items()}


def run_streams(args, n: int, out: Path, server: str | None, batch_log: Path | None) -> dict:
    """N stations at once; their events over the same window of `args.duration` seconds."""
    mode = "server" if server else "local"
    folder = out / f"{mode}-{n}"
    folder.mkdir(parents=True, exist_ok=True)
    procs, files = [], []
    try:
        for i in range(n):
            if not server and available_mb() < STATION_MIN_FREE_MB:
                return {"mode": mode, "streams": n, "skipped": f"not run: {available_mb():.0f} MB of memory "
                                                              f"left before station {i + 1} (each needs ~"
                                                              f"{STATION_MIN_FREE_MB} MB)"}
            jsonl = folder / f"stream-{i}.jsonl"
            jsonl.unlink(missing_ok=True)
            log = (folder / f"stream-{i}.log").open("w")
            procs.append(subprocess.Popen(station_command(args, jsonl, server), stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
            files.append(jsonl)
            deadline = time.monotonic() + 600
            while not (jsonl.exists() and jsonl.stat().st_size > 0):
                if procs[-1].poll() is not None or time.monotonic() > deadline:
                    raise UsageError(f"station {i} did not start; see {folder / f'stream-{i}.log'}")
                time.sleep(0.5)
        before, metrics0 = server_batches(batch_log), triton_metrics(server) if server else {}
        t0 = time.time()
        time.sleep(args.duration)
        t1 = time.time()
        after, metrics1 = server_batches(batch_log), triton_metrics(server) if server else {}
    finally:
        for p in procs:
            stop(p)
    streams = []
    for f in files:
        events = read_events(f, t0, t1)
        lat = [e["latency_ms"]["capture_to_emit"] for e in events]
        rt = [e["latency_ms"].get("server_fusion") for e in events if "server_fusion" in e["latency_ms"]]
        p50, p95, p99 = np.percentile(lat, [50, 95, 99]) if lat else (float("nan"),) * 3
        streams.append({"events": len(events), "hz": len(events) / (t1 - t0), "p50": float(p50),
                        "p95": float(p95), "p99": float(p99),
                        "skipped": (events[-1]["skipped_ticks"] - events[0]["skipped_ticks"]) if events else 0,
                        "fusion_round_trip_p50": float(np.median(rt)) if rt else None,
                        "faults": sum(len(e.get("faults", [])) for e in events)})
    formed = {}
    for model, sizes in after.items():
        delta = {k: v - before.get(model, {}).get(k, 0) for k, v in sizes.items()}
        formed[model] = {k: v for k, v in sorted(delta.items()) if v > 0}
    # Triton's own count of the same: inferences / executions = the mean batch size per model.
    triton = {m: round((c - metrics0.get(m, (0, 0))[0]) / max(e - metrics0.get(m, (0, 0))[1], 1), 3)
              for m, (c, e) in metrics1.items()}
    return {"mode": mode, "streams": n, "duration_s": t1 - t0, "per_stream": streams,
            "aggregate_hz": sum(s["events"] for s in streams) / (t1 - t0), "batches": formed,
            "triton_mean_batch": triton}


def mean_batch(sizes: dict[int, int]) -> float | None:
    total = sum(sizes.values())
    return sum(k * v for k, v in sizes.items()) / total if total else None


def format_table(results: list[dict]) -> str:
    rows = ["| N | mode | capture->emit p50 / p95 ms (worst stream) | updates/s per stream (min) | aggregate updates/s "
            "| skipped ticks | batches formed (fusion: size x count; mean per model) |",
            "|---|---|---|---|---|---|---|"]
    for r in results:
        if "skipped" in r:
            rows.append(f"| {r['streams']} | {r['mode']} | {r['skipped']} | | | | |")
            continue
        s = r["per_stream"]
        p50, p95 = max(x["p50"] for x in s), max(x["p95"] for x in s)
        batches = ""
        if r["mode"] == "server":
            fusion = r["batches"].get("fusion", {})
            means = ", ".join(f"{m} {mean_batch(v):.2f}" for m, v in sorted(r["batches"].items()) if mean_batch(v))
            batches = " ".join(f"{k}x{v}" for k, v in fusion.items()) + (f"; {means}" if means else "")
        rows.append(f"| {r['streams']} | {r['mode']} | {p50:.0f} / {p95:.0f} | {min(x['hz'] for x in s):.2f} | "
                    f"{r['aggregate_hz']:.2f} | {sum(x['skipped'] for x in s)} | {batches} |")
    return "\n".join(rows)


def run(args) -> int:
    from tools.bench import resolve_clip

    counts = parse_counts(args.streams)
    if args.duration is None:
        args.duration = 30.0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    resolve_clip(args)
    if args.clip is None:
        from realtime.demo import DEMO_CLIP

        args.clip = str(DEMO_CLIP)
    results: list[dict] = []
    for n in counts:
        print(f"mcihn bench: {n} local stream(s) ...", file=sys.stderr, flush=True)
        results.append(run_streams(args, n, out, None, None))
    proc = None
    server, batch_log = args.server, None
    if server == "auto":
        print("mcihn bench: starting mcihn serve on loopback ...", file=sys.stderr, flush=True)
        proc, server, batch_log = start_server(args, out)
    try:
        for n in counts:
            print(f"mcihn bench: {n} stream(s) through the server at {server} ...", file=sys.stderr, flush=True)
            results.append(run_streams(args, n, out, server, batch_log))
    finally:
        if proc is not None:
            stop(proc)
    order = {n: i for i, n in enumerate(counts)}
    results.sort(key=lambda r: (order[r["streams"]], r["mode"]))
    table = format_table(results)
    meta = {"command": " ".join(["mcihn", *sys.argv[1:]]) if sys.argv[0].endswith("mcihn") else None,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}",
            "size": args.size, "checkpoint": args.checkpoint, "clip": args.clip, "asr": not args.no_asr,
            "backend": args.backends.split(",")[0], "duration_s": args.duration, "hop_s": args.hop,
            "max_batch": args.max_batch, "queue_delay_ms": args.queue_delay_ms, "threads": args.threads or 1}
    (out / "streams.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    (out / "streams.md").write_text(table + "\n")
    print(table)
    print(f"mcihn bench: report in {out / 'streams.json'}", file=sys.stderr)
    return 0
