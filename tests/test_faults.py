"""Fault injection outside the recognizer's tick: damaged checkpoints, bugs that must keep their traceback, `--ws 0`,
a full disk, Ctrl+C during start-up, a host that never calls stop(), the recorder's threads and timing, and the
engines' imports. Each fault is provoked for real (a truncated file, /dev/full, a file-size limit, SIGINT, a
child interpreter that just ends) and checked by what a user sees: the one line, the exit code, and that what
was written before the fault is whole.
"""

from __future__ import annotations

import ast
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from realtime.events import SCHEMA_NAME, EmotionEvent

ROOT = Path(__file__).resolve().parents[1]
MOSI = ROOT.parent / "shared/data/cmu-mosi/mosi_utterance_features.npz"
DEMO = ("--demo", "--standins", "tiny")  # the bundled clip through tiny random stand-ins


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """Tiny stand-in extractors, a tiny Whisper and an untrained MCIHN checkpoint (as tests/test_live.py)."""
    from realtime.demo import prepare_demo

    folder = tmp_path_factory.mktemp("cache")
    prepare_demo(folder / "demo")
    return folder


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DISPLAY"}  # headless
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **extra})
    return env


def run(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=child_env(), **kw)


def live(cache: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    return run("-m", "realtime", "--cache-dir", str(cache), "--no-overlay", "--quiet", *args, **kw)


def assert_one_line(result: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    assert all(n in lines[0] for n in needles), lines[0]
    return lines[0]


# -- damaged checkpoints: one line in both commands, exit 2 ---------------------------------------------------


def _truncate_weights(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _edit_config(change):
    def edit(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        change(config)
        (folder / "config.json").write_text(json.dumps(config))
    return edit


DAMAGES = {
    # what, how, the words the line must hold
    "weights for another config": (_edit_config(lambda c: c["model"].update(latent_dim=64)),
                                   ("model.safetensors does not fit its config.json", "[8, 32] in the weights",
                                    "[8, 64] in the config", "more)", "retrain")),
    "truncated weights": (_truncate_weights, ("model.safetensors is damaged or truncated", "retrain")),
    "config without model": (_edit_config(lambda c: c.pop("model")),
                             ("config.json has no model config", "retrain", "copy the folder again")),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_checkpoint_is_one_line_in_both_commands(cache, tmp_path, damage):
    from mcihn.checkpoint import CheckpointError, load_checkpoint

    corrupt, needles = DAMAGES[damage]
    folder = tmp_path / "ckpt"
    shutil.copytree(cache / "demo" / "checkpoint", folder)
    corrupt(folder)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(folder)
    assert "\n" not in str(err.value) and str(folder) in str(err.value)

    line = assert_one_line(live(cache, "--checkpoint", str(folder), "--no-asr"), 2, "mcihn-live: error:", *needles)
    assert len(line) < 400, line  # one readable line, not 175
    if MOSI.is_file():
        assert_one_line(run("-m", "tools.cli", "eval", "--checkpoint", str(folder), "--data", str(MOSI)), 2,
                        "mcihn eval: error:", *needles)


# -- expected faults are one line; a bug keeps its traceback --------------------------------------------------


@pytest.mark.parametrize(("args", "needle"), [
    (("--asr-device", "tpu"), "ASR device must be one of"),  # AsrOptions' ValueError, as a ConfigError
    (("--threads", "0"), "--threads must be at least 1"),
    (("--device", "gpu9"), "unknown device 'gpu9'"),
    (("--ws", "localhost:http"), "bad address"),
])
def test_user_errors_are_one_line(cache, args, needle):
    assert_one_line(live(cache, *DEMO, "--no-asr", *args), 2, "mcihn-live: error:", needle)


BUG = "raise {kind}('a bug, not the user: 42')"


def test_a_bug_in_mcihn_live_keeps_its_traceback(cache):
    """A bare ValueError is not an expected fault: traceback, exit 1, and the recognizer was still stopped."""
    code = ("import sys, realtime.cli as cli\n"
            "def run_session(*a, **k):\n    " + BUG.format(kind="ValueError") + "\n"
            "cli.run_session = run_session\n"
            f"sys.exit(cli.main({[*DEMO, '--cache-dir', str(cache), '--no-asr', '--no-overlay', '--quiet']!r}))\n")
    result = run("-c", code)
    assert result.returncode == 1, result.stderr
    assert "Traceback" in result.stderr and "ValueError: a bug, not the user: 42" in result.stderr
    assert "mcihn-live: error:" not in result.stderr


@pytest.mark.parametrize("kind", ["ValueError", "TypeError", "KeyError"])
def test_a_bug_in_mcihn_keeps_its_traceback(kind):
    code = ("import sys, tools.cli as cli\n"
            "def cmd_baseline(args):\n    " + BUG.format(kind=kind) + "\n"
            "cli.cmd_baseline = cmd_baseline\n"
            "sys.exit(cli.main(['baseline', '--data', 'nowhere.npz']))\n")
    result = run("-c", code)
    assert result.returncode == 1, result.stderr
    assert "Traceback" in result.stderr and f"{kind}: " in result.stderr and "error:" not in result.stderr


def test_mcihn_expected_error_is_still_one_line(tmp_path):
    assert_one_line(run("-m", "tools.cli", "eval", "--checkpoint", str(tmp_path / "none"), "--data",
                        str(tmp_path / "none.npz")), 2, "mcihn eval: error:", "not found")


# -- --ws 0 says which port it serves on ----------------------------------------------------------------------


def test_ws_0_reports_the_port_it_serves_on(cache):
    from websockets.sync.client import connect

    proc = subprocess.Popen([sys.executable, "-m", "realtime", *DEMO, "--cache-dir", str(cache), "--no-asr",
                             "--no-overlay", "--quiet", "--loop", "--ws", "0", "--duration", "30"],
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=child_env())
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "WebSocket on" in line:
                break
        match = re.fullmatch(r"mcihn-live: WebSocket on ws://127\.0\.0\.1:(\d+)\n", lines[-1])
        assert match and int(match[1]) > 0, lines
        with connect(f"ws://127.0.0.1:{match[1]}", open_timeout=10) as ws:
            event = json.loads(ws.recv(timeout=20))
        assert event["schema"] == SCHEMA_NAME
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    assert proc.returncode == 0


# -- a full disk: the fault said once, the loss at the end, exit 1, what was written is whole ----------------


def test_full_disk_dev_full(cache):
    result = live(cache, *DEMO, "--no-asr", "--duration", "3", "--jsonl", "/dev/full")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    faults = [line for line in result.stderr.splitlines() if "failed and is disabled" in line]
    assert len(faults) == 1 and "No space left on device" in faults[0], result.stderr
    last = result.stderr.strip().splitlines()[-1]
    match = re.fullmatch(r"mcihn-live: error: events could not be written to /dev/full \(No space left on device\); "
                         r"(\d+) events lost", last)
    updates = re.search(r"mcihn-live: (\d+) updates", result.stderr)
    assert match and updates and int(match[1]) == int(updates[1]) > 0, result.stderr  # none of them was written


def _no_bigger_than(limit: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # writes past it: EFBIG


def test_disk_full_mid_session_keeps_every_event_written_before(cache, tmp_path):
    """A file that may not grow past 6000 bytes: the event that does not fit is written in part, then fails; the
    part is cut off, so the file holds whole events, the ones before the fault, and says how many were lost."""
    jsonl = tmp_path / "events.jsonl"
    result = live(cache, *DEMO, "--no-asr", "--duration", "4", "--jsonl", str(jsonl),
                  preexec_fn=_no_bigger_than(6000))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    text = jsonl.read_text()
    assert text.endswith("\n") and 0 < len(text) <= 6000
    written = [json.loads(line) for line in text.splitlines()]  # every line a whole event
    assert [e["seq"] for e in written] == list(range(len(written)))  # none missing before the fault
    updates = int(re.search(r"mcihn-live: (\d+) updates", result.stderr)[1])
    assert result.stderr.strip().splitlines()[-1] == (
        f"mcihn-live: error: events could not be written to {jsonl} (File too large); "
        f"{updates - len(written)} events lost")


def make_event(seq: int) -> EmotionEvent:
    from realtime.events import Presence

    return EmotionEvent(seq=seq, t_media=seq * 0.25, t_wall=time.time(), t_mono=time.monotonic(),
                        head="classification", scores={"joy": 0.5, "neutral": 0.5}, presence=Presence(),
                        latency_ms={"capture_to_emit": 10.0}, untrained=True)


def test_sink_group_counts_what_a_failed_sink_lost(tmp_path):
    from realtime.sinks import CallbackSink, JsonlSink, SinkGroup, WebSocketSink

    reports: list[str] = []
    got: list[int] = []
    group = SinkGroup([JsonlSink("/dev/full"), CallbackSink(lambda e: got.append(e.seq)),
                       WebSocketSink(port=0)], report=reports.append).open()
    try:
        assert group.find(WebSocketSink).port > 0  # the port picked, after open
        for seq in range(7):
            group.send(make_event(seq))
    finally:
        group.close()
    assert len(reports) == 1 and "No space left on device" in reports[0]
    assert got == list(range(7))  # the other outputs go on
    [failure] = group.failures
    assert failure.lost == 7
    assert failure.line() == "events could not be written to /dev/full (No space left on device); 7 events lost"


# -- Ctrl+C during start-up ------------------------------------------------------------------------------------


@pytest.mark.parametrize("after_s", [0.5, 1.0, 1.5])
def test_ctrl_c_during_start_up_is_one_line(cache, after_s):
    proc = subprocess.Popen([sys.executable, "-m", "realtime", *DEMO, "--cache-dir", str(cache), "--no-asr",
                             "--no-overlay", "--quiet"], stderr=subprocess.PIPE, text=True, cwd=ROOT, env=child_env())
    time.sleep(after_s)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert "Traceback" not in stderr and "mcihn-live: stopping" in stderr, stderr
    running = "updates" in stderr  # a fast machine may have started already: then Ctrl+C ends a session
    assert proc.returncode == (0 if running else 130), stderr


# -- a host that ends without stop() ---------------------------------------------------------------------------

HOST = """
import time
from realtime import lifecycle
from realtime.recognizer import LiveConfig, Recognizer

rec = Recognizer(LiveConfig(demo=True, standins="tiny", cache_dir={cache!r}, backend="torch"))
rec.start()
lifecycle.register(rec)  # what Recognizer.start() does
time.sleep(2)
print("leaving without stop()", flush=True)
"""


def test_host_that_never_calls_stop_exits_cleanly(cache):
    """Without the exit hook this aborted (exit 134, "terminate called without an active exception") in 4 of 6."""
    for attempt in range(6):
        result = run("-c", HOST.format(cache=str(cache)))
        assert result.returncode == 0, (attempt, result.returncode, result.stderr[-2000:])
        assert "leaving without stop()" in result.stdout
        assert not re.search(r"Abort|Fatal|terminate called", result.stderr), result.stderr[-2000:]


def test_lifecycle_unregisters_on_stop():
    from realtime import lifecycle

    class Fake:
        stopped = 0

        def stop(self):
            self.stopped += 1

    a, b = Fake(), Fake()
    lifecycle.register(a)
    lifecycle.register(b)
    lifecycle.unregister(a)
    assert b in lifecycle.running() and a not in lifecycle.running()
    lifecycle._at_exit(timeout=0.1)
    assert (a.stopped, b.stopped) == (0, 1) and lifecycle.running() == []


# -- the recorder: its own thread owns the files; replay keeps the audio/video offset --------------------------


class _ContainerSpy:
    """av.open's container, recording the thread of every call that writes or closes it."""

    def __init__(self, container, calls: list):
        self._container, self._calls = container, calls

    def __getattr__(self, name):
        attr = getattr(self._container, name)
        if name in ("mux", "close"):
            def call(*a, **k):
                self._calls.append((name, threading.current_thread().name))
                return attr(*a, **k)
            return call
        return attr


@pytest.mark.parametrize("offset_s", [0.4, -0.3])
def test_recording_replays_with_the_audio_video_offset(cache, tmp_path, monkeypatch, offset_s):
    """A push session whose audio starts `offset_s` after the first frame (before it when negative), recorded and
    replayed: the replayed audio starts within one video frame of that offset."""
    import av

    from realtime.file_source import media_items
    from realtime.recognizer import LiveConfig, Recognizer

    calls: list[tuple[str, str]] = []
    real_open = av.open
    monkeypatch.setattr(av, "open", lambda *a, **k: _ContainerSpy(real_open(*a, **k), calls))
    folder, fps, rate, block = tmp_path / "session", 15, 16_000, 320
    config = LiveConfig(source="push", standins="tiny", cache_dir=str(cache), backend="torch", use_asr=False,
                        record=str(folder))
    rec = Recognizer(config).start()
    try:
        frame = np.full((64, 64, 3), 128, np.uint8)
        t0 = time.monotonic() + 0.1
        items = sorted([(t0 + i / fps, "video") for i in range(24)]
                       + [(t0 + offset_s + (k + 1) * block / rate, "audio") for k in range(80)])
        for t, kind in items:
            time.sleep(max(0.0, t - time.monotonic()))  # at live pace
            if kind == "video":
                written = rec.recorder.video_frames
                rec.push_frame(frame, t)
                # The recorder polls the newest frame, as the tick does, so a thread starved of CPU (a loaded
                # machine) would skip some: wait until it has this one, whatever the load.
                deadline = time.monotonic() + 5.0
                while rec.recorder.video_frames == written and time.monotonic() < deadline:
                    time.sleep(0.002)
            else:
                rec.push_audio(np.zeros(block, np.int16), rate, t)
        time.sleep(0.1)
    finally:
        rec.stop()
        monkeypatch.setattr(av, "open", real_open)
    recorder = rec.recorder
    assert recorder.error is None and recorder.video_frames == 24
    assert abs(recorder.audio_offset_s - offset_s) < 0.01
    assert calls and {thread for _, thread in calls} == {"mcihn-record"}, set(calls)  # never the caller's thread
    assert calls[-1][0] == "close"

    first: dict[str, float] = {}
    for t, kind, data in media_items(folder):
        first.setdefault(kind, t - (len(data) / rate if kind == "audio" else 0.0))  # audio: stamped at its end
    assert min(first.values()) == pytest.approx(0.0, abs=1e-3)
    assert abs((first["audio"] - first["video"]) - offset_s) < 1 / fps, first


# -- engines: imports go one way -------------------------------------------------------------------------------

ENGINES = sorted(p.stem for p in (ROOT / "engines").glob("*.py") if p.stem != "__init__")


def engines_imports() -> dict[str, set[str]]:
    """engines module -> the engines modules it imports, at the top or inside a function."""
    graph = {}
    for name in ENGINES:
        deps = set()
        for node in ast.walk(ast.parse((ROOT / "engines" / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "engines":
                deps.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("engines."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps.update(a.name.split(".")[1] for a in node.names if a.name.startswith("engines."))
        graph[name] = deps - {name}
    return graph


def test_engines_import_one_way():
    graph = engines_imports()

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for dep in graph.get(todo.pop(), ()):
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        return seen

    assert [m for m in ENGINES if m in reachable(m)] == []
    assert graph["runtime"] == set()  # the bottom
    assert {"backends", "export", "tensorrt"}.isdisjoint(graph["extractor"] | graph["runtime"])
    assert "backends" not in graph["export"] | graph["tensorrt"]


def test_each_engines_module_imports_alone():
    """`import engines.X` in a fresh interpreter, for every X (two at a time): a circle would fail here."""
    failed = {}
    for pair in (ENGINES[i:i + 2] for i in range(0, len(ENGINES), 2)):
        procs = {m: subprocess.Popen([sys.executable, "-c", f"import engines.{m}"], stderr=subprocess.PIPE, text=True,
                                     cwd=ROOT, env=child_env()) for m in pair}
        failed.update({m: p.communicate(timeout=120)[1][-500:] for m, p in procs.items() if p.wait() != 0})
    assert failed == {}
