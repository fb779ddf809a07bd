"""Many streams on one inference server (docs/scaling.md): `mcihn serve` (Triton Inference Server from the
nvidia-pytriton wheel) on loopback with the tiny stand-ins, two concurrent live streams through it compared with
local mode, a server killed mid-session, no server at start, a server that never answers."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from realtime.recognizer import ConfigError, LiveConfig, Recognizer

HAVE_SERVE = all(importlib.util.find_spec(m) is not None for m in ("pytriton", "tritonclient"))
needs_serve = pytest.mark.skipif(not HAVE_SERVE, reason="the serve extra is not installed "
                                                        "(pip install 'mcihn-live[serve]'; make install)")
BIN = Path(sys.executable).parent
START_S = 240  # loading the models and starting Triton: ~20 s here, far more on a busy 2-core machine


def free_port(count: int = 1) -> int:
    """A port with `count` free ports from it (HTTP, gRPC, metrics)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + count < 65536 and all(_free(port + i) for i in range(count)):
            return port
    raise RuntimeError("no free ports")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """The stand-ins (tiny random models, made once here), read by the server and the stations alike."""
    from realtime.demo import prepare_demo

    folder = tmp_path_factory.mktemp("cache")
    prepare_demo(folder / "demo")
    return folder


class ServerProcess:
    """`mcihn serve` on loopback in its own process group (killed whole: server, Triton, its stub)."""

    def __init__(self, cache: Path, log: Path, models: tuple[str, ...] = ("--standins", "tiny")):
        from realtime.serve import prepare_stub_env

        try:
            prepare_stub_env()  # made by `make install`; from PyPI once otherwise
        except ConfigError as err:
            pytest.skip(str(err))
        self.port = free_port(3)
        self.address = f"127.0.0.1:{self.port}"
        self.log = log
        # pytriton's workspace, removed with the server even when it is killed; short: it holds unix sockets
        self.home = tempfile.mkdtemp(prefix="mcihn-pyt-", dir="/tmp")
        self.proc = subprocess.Popen(
            [str(BIN / "mcihn"), "serve", self.address, *models, "--backend", "torch", "--cache-dir",
             str(cache), "--max-batch", "8", "--queue-delay-ms", "2"],
            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTRITON_HOME": self.home})
        deadline = time.monotonic() + START_S
        while not self.ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"mcihn serve did not become ready:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)

    def ready(self) -> bool:
        """Triton answers and has loaded every model (`mcihn serve` says so once they are)."""
        if "mcihn serve: Triton serving" not in self.log.read_text(errors="replace"):
            return False
        try:
            with urllib.request.urlopen(f"http://{self.address}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def metrics(self) -> dict[tuple[str, str], float]:
        """Triton's per-model counters: (metric, model) -> value."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port + 2}/metrics", timeout=5) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line.startswith(("nv_inference_count{", "nv_inference_exec_count{")):
                name, rest = line.split("{", 1)
                model = rest.split('model="', 1)[1].split('"', 1)[0]
                out[(name, model)] = float(line.rsplit(" ", 1)[1])
        return out

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """SIGKILL: the whole process group at once (a crash); SIGINT: `mcihn serve` alone (a stop). Then whatever
        is left of the group (Triton's stub processes) is killed."""
        if self.proc.poll() is None:
            if sig == signal.SIGKILL:
                os.killpg(self.proc.pid, sig)
            else:
                self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=60)
        finally:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            shutil.rmtree(self.home, ignore_errors=True)


@pytest.fixture(scope="module")
def server(cache, tmp_path_factory):
    if not HAVE_SERVE:
        pytest.skip("the serve extra is not installed (pip install 'mcihn-live[serve]'; make install)")
    proc = ServerProcess(cache, tmp_path_factory.mktemp("serve") / "serve.log")
    yield proc
    proc.kill(signal.SIGINT)


def config(cache: Path, **kw) -> LiveConfig:
    kw.setdefault("speed", 0)
    kw.setdefault("standins", "tiny")
    return LiveConfig(demo=True, cache_dir=str(cache), backend="torch", **kw)


def events_of(cfg: LiveConfig, on_event=None) -> tuple[list, list[str]]:
    with Recognizer(cfg) as rec:
        events = []
        for event in rec:
            events.append(event)
            if on_event is not None:
                on_event(len(events))
    return events, list(rec.faults)


def assert_same_events(local: list, remote: list, tol: float = 1e-4) -> None:
    assert len(remote) == len(local) > 20
    for a, b in zip(local, remote, strict=True):
        assert b.t_media == a.t_media
        assert b.presence.text.text == a.presence.text.text
        for m in ("vision", "text", "audio"):
            assert getattr(b.presence, m).present == getattr(a.presence, m).present, (a.seq, m)
            assert getattr(b.presence, m).fused == getattr(a.presence, m).fused, (a.seq, m)
        assert b.scores.keys() == a.scores.keys()
        for k in a.scores:
            assert abs(b.scores[k] - a.scores[k]) <= tol, (a.seq, k, a.scores[k], b.scores[k])


@needs_serve
def test_two_concurrent_streams_through_the_server_equal_local_mode(cache, server):
    """Two live streams (the bundled clip, replayed as fast as possible) at once through one Triton server: each
    gives local mode's events (same count, times, presence, text; scores within 1e-4), the server round trips are
    in the latencies, and Triton's metrics count every request the streams made."""
    local, faults = events_of(config(cache))
    assert not faults and any(e.presence.text.present for e in local) and any(e.presence.vision.present for e in local)
    before = server.metrics()
    results: dict[int, tuple] = {}

    def stream(i: int) -> None:
        results[i] = events_of(config(cache, server=server.address, server_timeout_s=30))

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert sorted(results) == [0, 1]
    for remote, faults in results.values():
        assert not faults
        assert_same_events(local, remote)
        assert {"server_fusion", "server_audio", "server_vision"} <= remote[-1].latency_ms.keys()
        assert remote[-1].latency_ms["server_fusion"] > 0
    after = server.metrics()
    fused = after[("nv_inference_count", "fusion")] - before.get(("nv_inference_count", "fusion"), 0)
    assert fused == 2 * len(local)  # one fusion request per event per stream: nothing computed locally
    batches = after[("nv_inference_exec_count", "fusion")] - before.get(("nv_inference_exec_count", "fusion"), 0)
    assert 0 < batches <= fused  # batches of one or more requests, as Triton's dynamic batcher formed them


@needs_serve
def test_the_starter_through_the_server_equals_local_mode(cache, tmp_path):
    """The starter recognizer (real face, text and Whisper models) with its face expert, text encoder and text
    head on the server: the same events as local mode."""
    starter = ServerProcess(cache, tmp_path / "serve.log", models=())
    try:
        local, faults = events_of(config(cache, standins=None))
        remote, remote_faults = events_of(config(cache, standins=None, server=starter.address, server_timeout_s=30))
    finally:
        starter.kill(signal.SIGINT)
    assert not faults and not remote_faults
    assert any(e.modalities["vision"].scores for e in local) and any(e.modalities["text"].scores for e in local)
    assert_same_events(local, remote)
    for a, b in zip(local, remote, strict=True):
        assert b.presence.vision.face == a.presence.vision.face
        for m in ("vision", "text"):
            x, y = a.modalities[m].scores, b.modalities[m].scores
            assert (x is None) == (y is None) and (x is None or max(abs(x[k] - y[k]) for k in x) <= 1e-4)
    assert "server_face" in remote[-1].latency_ms


@needs_serve
def test_server_killed_mid_session_is_one_fault_and_nothing_is_lost(cache, tmp_path):
    """The server is killed (SIGKILL, with Triton) after 12 events of a live-paced replay: the session goes on to
    the clip's end (no event missing, the same last media time as local mode), the loss is reported once, and the
    events after it have the modalities the server computed unfused and no scores (fusion runs there too)."""
    doomed = ServerProcess(cache, tmp_path / "serve.log")
    local, _ = events_of(config(cache))
    killed_at: list[float] = []

    def kill_at(n: int) -> None:
        if n == 12:
            doomed.kill()
            killed_at.append(time.time())

    try:
        remote, faults = events_of(config(cache, server=doomed.address, server_timeout_s=30, speed=1.0),
                                   on_event=kill_at)
    finally:
        doomed.kill()
    assert killed_at
    assert [e.seq for e in remote] == list(range(len(remote)))  # no event lost
    assert abs(remote[-1].t_media - local[-1].t_media) < 0.6  # went on to the clip's end
    lost = [f for f in faults if "inference server" in f]
    assert len(lost) == 1 and doomed.address in lost[0] and "lost" in lost[0], faults
    assert sum("inference server" in f for e in remote for f in e.faults) == 1  # carried by one event
    late = [e for e in remote if e.t_wall > killed_at[0] + 1.0]
    assert len(late) > 20
    assert all(not e.scores for e in late)
    assert all(not e.presence.audio.fused and not e.presence.vision.fused and not e.presence.text.fused
               for e in late)
    assert any(e.scores for e in remote[:10])  # before the kill: scores from the server


@needs_serve
def test_no_server_at_start_is_one_line(cache):
    port = free_port()
    result = subprocess.run([str(BIN / "mcihn-live"), "--demo", "--standins", "tiny", "--cache-dir", str(cache),
                             "--speed", "0", "--server", f"127.0.0.1:{port}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"no inference server answers at 127.0.0.1:{port}" in lines[0] and "mcihn serve" in lines[0]


@needs_serve
def test_a_server_that_never_answers_times_out_once_then_fails_fast():
    """A slow server (here: one that accepts and never answers): at start, one clear error; mid-session, each
    request gives up after the timeout, the fault is reported once, and further requests fail at once until the
    retry time; nothing hangs."""
    import numpy as np

    from realtime.remote import Server, ServerError

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    address = f"127.0.0.1:{silent.getsockname()[1]}"
    try:
        server = Server(address, timeout_s=0.5, retry_s=30)
        start = time.monotonic()
        with pytest.raises(ConfigError, match="no inference server answers"):
            server.check(["fusion"])
        reports: list[str] = []
        server.report = reports.append
        with pytest.raises(ServerError):
            server.infer("fusion", {"x": np.zeros((1, 3), np.float32)}, ("scores",))
        with pytest.raises(ServerError, match="is down"):
            server.infer("fusion", {"x": np.zeros((1, 3), np.float32)}, ("scores",))
        assert len(reports) == 1 and "lost" in reports[0] and address in reports[0]
        assert time.monotonic() - start < 60  # bounded by the timeouts, not a hang
    finally:
        silent.close()


def test_server_address_is_checked():
    from realtime.remote import parse_address

    assert parse_address("10.0.0.2:9000") == ("10.0.0.2", 9000)
    assert parse_address("9000") == ("127.0.0.1", 9000)
    with pytest.raises(ConfigError, match="HOST:PORT"):
        parse_address("somewhere")


def test_batch_log_summary():
    from realtime.serve import BatchLog

    log = BatchLog()
    for size in (1, 2, 2):
        log.add("fusion", size)
    assert json.dumps(log.summary()) and "fusion {1: 1, 2: 2}" in log.summary()


@pytest.mark.skipif(importlib.util.find_spec("tritonclient") is None or importlib.util.find_spec("onnx") is None,
                    reason="needs tritonclient (its ModelConfig schema) and onnx: pip install 'mcihn-live[serve,onnx]'")
def test_exported_repository_matches_tritons_schema_and_the_onnx_models(cache, tmp_path):
    """`mcihn export-triton`: Triton's ONNX Runtime backend is not installed here, so the repository is checked
    as Triton would read it: every config.pbtxt parses into Triton's ModelConfig (its protobuf schema, from
    tritonclient), names the onnxruntime backend, batches dynamically, and declares exactly the ONNX file's
    inputs and outputs (names, data types, dims after the batch dimension); each ONNX model runs a batch of 2."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from tools.cli import main

    out = tmp_path / "repo"
    assert main(["export-triton", "--standins", "tiny", "--cache-dir", str(cache), "--out", str(out),
                 "--tensorrt", "fp16"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["audio", "fusion", "text", "vision"]  # the names `mcihn serve` serves
    types = {"TYPE_FP32": (1, np.float32), "TYPE_INT64": (7, np.int64)}
    for name in names:
        config = text_format.Parse((out / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert config.name == name and config.backend == "onnxruntime" and config.max_batch_size == 8
        assert config.HasField("dynamic_batching")
        accelerators = config.optimization.execution_accelerators.gpu_execution_accelerator
        assert [a.name for a in accelerators] == ["tensorrt"]
        assert accelerators[0].parameters["precision_mode"] == "FP16"
        assert "trt_profile_max_shapes" in config.parameters
        graph = onnx.load(str(out / name / "1" / "model.onnx")).graph
        for declared, actual in ((config.input, graph.input), (config.output, graph.output)):
            assert [t.name for t in declared] == [t.name for t in actual]
            for t, a in zip(declared, actual, strict=True):
                dtype = model_config_pb2.DataType.Name(t.data_type)
                assert types[dtype][0] == a.type.tensor_type.elem_type, (name, t.name)
                dims = [d.dim_value if d.HasField("dim_value") else -1 for d in a.type.tensor_type.shape.dim]
                assert dims[0] == -1 and list(t.dims) == dims[1:], (name, t.name, list(t.dims), dims)
        session = ort.InferenceSession(str(out / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        feed = {}
        for t in config.input:
            shape = [2] + [d if d > 0 else 16000 for d in t.dims]  # a variable axis: audio samples
            dtype = types[model_config_pb2.DataType.Name(t.data_type)][1]
            feed[t.name] = np.ones(shape, dtype) if dtype == np.int64 else np.zeros(shape, dtype)
        if "lengths" in feed:
            feed["lengths"][:] = 1
        for t, value in zip(config.output, session.run(None, feed), strict=True):
            assert value.shape[0] == 2 and len(value.shape) == len(t.dims) + 1, (name, t.name, value.shape)
            assert all(d in (-1, n) for d, n in zip(t.dims, value.shape[1:], strict=True)), (name, t.name)


def test_stream_bench_table_and_counts():
    """`mcihn bench --streams`: the counts it takes, and its table (a local N that did not fit says so)."""
    from tools import UsageError
    from tools.bench_streams import format_table, mean_batch, parse_counts

    assert parse_counts("1,2,4,8") == [1, 2, 4, 8]
    with pytest.raises(UsageError, match="--streams"):
        parse_counts("0,2")
    assert mean_batch({1: 2, 3: 2}) == 2.0 and mean_batch({}) is None
    stream = {"events": 30, "hz": 1.0, "p50": 100.0, "p95": 200.0, "p99": 250.0, "skipped": 2}
    table = format_table([
        {"mode": "local", "streams": 2, "per_stream": [stream, {**stream, "p95": 300.0}], "aggregate_hz": 2.0,
         "batches": {}},
        {"mode": "server", "streams": 2, "per_stream": [stream, stream], "aggregate_hz": 2.0,
         "batches": {"fusion": {1: 10, 2: 10}, "audio": {2: 5}}},
        {"mode": "local", "streams": 8, "skipped": "not run: 2000 MB of memory left"}])
    lines = table.splitlines()
    assert lines[2].startswith("| 2 | local | 100 / 300 | 1.00 | 2.00 | 4 |")
    assert "1x10 2x10; audio 2.00, fusion 1.50" in lines[3]
    assert "not run: 2000 MB" in lines[4]


def test_missing_serve_extra_is_one_line_naming_it(monkeypatch):
    from realtime import remote, serve

    for module in ("pytriton", "pytriton.server.triton_server", "tritonclient", "tritonclient.http"):
        monkeypatch.setitem(sys.modules, module, None)  # imports of them now fail
    with pytest.raises(ConfigError, match=r"pip install 'mcihn-live\[serve\]'"):
        serve._pytriton()
    with pytest.raises(ConfigError, match=r"pip install 'mcihn-live\[serve\]'"):
        remote.tritonclient_http()
