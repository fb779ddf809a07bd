"""`mcihn serve`: the models of a live session on NVIDIA's Triton Inference Server, for many stations at once
(`mcihn-live --server HOST:PORT`, realtime/remote.py).

Triton itself is the `tritonserver` of the nvidia-pytriton wheel (Triton 2.51, its Python backend). PyTriton binds a
Python callable per model; each runs the project's own backend (onnxruntime or torch, engines/backends.py) on the
requests Triton's dynamic batcher put together from all streams:

    vision, text, audio   the extractors' neural cores (EngineModel inputs -> features), batch = dimension 0
    fusion                MCIHN's (or MCN-CL's) inference forward (features + lengths -> scores)
    face                  the starter's face expert: a BGR frame -> its face box, expression probabilities, score

Health, readiness and metrics are Triton's own (/v2/health/ready, /v2/models/NAME/ready, :METRICS/metrics; the
batches formed are nv_inference_count / nv_inference_exec_count per model). Each callable also counts the batch
sizes it was given; `mcihn serve` prints them when it stops.

Two things make the wheel's server run in this project's environment (docs/scaling.md):
- Its Python-backend stub links libpython3.X.so.1.0 and finds the system's (Debian's 3.11.2) before ours, then
  loads our interpreter's standard library with it and fails (`'_thread.RLock' object has no attribute
  '_recursion_count'`). The directory of the running interpreter's own libpython (sysconfig LIBDIR) goes first on
  the server's LD_LIBRARY_PATH.
- The stub's compiled numpy interface predates numpy 2 (numpy 2 arrays come back empty), while this project runs
  numpy 2. The stub runs in a small environment of its own, STUB_ENV: a venv of the same interpreter with numpy<2,
  which sees the rest (pytriton, pyzmq) in ours through a .pth file. `mcihn serve --prepare` (run by `make
  install`) makes it; the models themselves run in this process, with our numpy.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import subprocess
import sys
import sysconfig
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np

from realtime.config import ConfigError, LiveConfig
from realtime.remote import SERVE_EXTRA

log = logging.getLogger("mcihn.serve")

STUB_NUMPY = "numpy>=1.21,<2"
STUB_MARKER = ".mcihn-stub-env"


def stub_env() -> Path:
    """Where the Python-backend stub's environment lives: $MCIHN_TRITON_STUB_ENV, else beside this interpreter's
    environment (sys.prefix/triton-stub: `make clean` removes it with the venv)."""
    return Path(os.environ.get("MCIHN_TRITON_STUB_ENV") or Path(sys.prefix) / "triton-stub")


def prepare_stub_env(path: Path | None = None, quiet: bool = True) -> Path:
    """Make the stub's environment (a venv of this interpreter, numpy<2 from PyPI, ours on its path) unless it is
    there. ConfigError, one line, when it cannot be made (offline, say)."""
    import site

    path = path or stub_env()
    if (path / STUB_MARKER).is_file():
        return path
    base = getattr(sys, "_base_executable", sys.executable)
    try:
        subprocess.run([base, "-m", "venv", "--clear", str(path)], check=True, capture_output=True, text=True)
        pip = [str(path / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check"]
        subprocess.run([*pip, *(["-q"] if quiet else []), STUB_NUMPY], check=True, capture_output=quiet, text=True)
    except subprocess.CalledProcessError as err:
        why = (err.stderr or "").strip().splitlines()[-1:] or [f"exit {err.returncode}"]
        raise ConfigError(f"cannot make the Triton stub's environment at {path} ({why[0][:160]}); it needs "
                          f"`{STUB_NUMPY}` from PyPI once: run `mcihn serve --prepare` where PyPI can be reached"
                          ) from None
    ours = [p for p in site.getsitepackages() if Path(p).is_dir()]
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    # Appended to its path: the stub finds its own numpy first, then pytriton and pyzmq in ours.
    (path / "lib" / version / "site-packages" / "zz-mcihn-live.pth").write_text("\n".join(ours) + "\n")
    (path / STUB_MARKER).write_text(f"{STUB_NUMPY}\n")
    return path


def libpython_dir() -> str | None:
    """The directory of this interpreter's shared libpython, if it has one (sysconfig LIBDIR / INSTSONAME)."""
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if libdir and soname and (Path(libdir) / soname).exists():
        return libdir
    return None


def _pytriton():
    try:
        import pytriton.server.triton_server as triton_server
        from pytriton.decorators import batch
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig
    except ImportError as err:
        raise ConfigError(f"the inference server (nvidia-pytriton) cannot be imported ({err}); {SERVE_EXTRA} "
                          f"and `pip install --no-deps nvidia-pytriton==0.7.0` (`make install` does both)") from None
    return triton_server, batch, DynamicBatcher, ModelConfig, Tensor, Triton, TritonConfig


class BatchLog:
    """The batch sizes each model's callable was given (Triton's dynamic batcher formed them). Thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self.sizes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

    def add(self, model: str, size: int) -> None:
        with self._lock:
            self.sizes[model][size] += 1

    def write(self, path: Path) -> None:
        """{model: {size: batches}} as JSON, replaced whole (readers never see half a file)."""
        import json

        with self._lock:
            data = {m: {str(k): v for k, v in sorted(c.items())} for m, c in self.sizes.items()}
        tmp = Path(path).with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)

    def summary(self) -> str:
        with self._lock:
            parts = [f"{m} {dict(sorted(c.items()))}" for m, c in sorted(self.sizes.items())]
        return "batch sizes formed (size: batches): " + ("; ".join(parts) if parts else "none")


def model_specs(engine_model, backend) -> tuple[list[tuple[str, np.dtype, tuple]], list[tuple[str, np.dtype, tuple]]]:
    """(inputs, outputs) as (name, dtype, shape without the batch dimension, -1 where it varies) of an extractor's
    or the fusion's EngineModel; the outputs' from one run of `backend` on the example inputs (which warms it up)."""
    def shape(name: str, full: tuple) -> tuple:
        dynamic = engine_model.dynamic_axes.get(name, {})
        return tuple(-1 if axis in dynamic else int(n) for axis, n in enumerate(full) if axis > 0)

    inputs = [(n, a.dtype, shape(n, a.shape)) for n, a in engine_model.example_inputs.items()]
    example = backend.run(dict(engine_model.example_inputs))
    outputs = [(n, example[n].dtype, shape(n, example[n].shape)) for n in engine_model.output_names]
    return inputs, outputs


def served_models(stack) -> dict[str, tuple]:
    """name -> (callable(**batched inputs) -> outputs, inputs, outputs) for every model of the stack."""
    from mcihn.emotions import EMOTIONS

    models = {}
    for m, extractor in stack.extractors.items():
        inputs, outputs = model_specs(extractor.engine_model(), extractor.backend)
        models[m] = (extractor.backend.run, inputs, outputs)
    models["fusion"] = (stack.fusion.run, *model_specs(stack.fusion_model, stack.fusion))
    if stack.face is not None:
        expert = stack.face.expert

        def face(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            frame = inputs["frame"]
            n = len(frame)
            box, probs, score = np.zeros((n, 4), np.int32), np.zeros((n, 7), np.float32), np.full((n, 1), -1.0,
                                                                                                   np.float32)
            for i in range(n):
                result = expert.analyze(frame[i])
                if result is not None:
                    box[i], score[i, 0] = result.box, result.detector_score
                    probs[i] = [result.scores[label] for label in EMOTIONS]
            return {"box": box, "probs": probs, "score": score}

        models["face"] = (face, [("frame", np.dtype(np.uint8), (-1, -1, 3))],
                          [("box", np.dtype(np.int32), (4,)), ("probs", np.dtype(np.float32), (7,)),
                           ("score", np.dtype(np.float32), (1,))])
    return models


def serve(config: LiveConfig, host: str = "127.0.0.1", port: int = 8000, grpc_port: int | None = None,
          metrics_port: int | None = None, max_batch: int = 8, queue_delay_us: int = 1000,
          stop: threading.Event | None = None, on_ready=None, batch_log: Path | None = None) -> BatchLog:
    """Serve the models of `config` (a checkpoint, stand-ins, or the starter) until `stop` is set (SIGINT and SIGTERM
    set it when this runs on the main thread). `on_ready(urls)` is called once Triton answers. `batch_log`: a JSON
    file rewritten every half second with the batch sizes formed so far ({model: {size: batches}}). Returns the
    batch log."""
    triton_server, batch, DynamicBatcher, ModelConfig, Tensor, Triton, TritonConfig = _pytriton()
    stub = prepare_stub_env()
    # The stub's interpreter: pytriton puts this environment's bin/ first on the server's PATH, where the embedded
    # Python finds its prefix; ours (numpy 2) would break the stub's numpy interface, so it gets its own.
    triton_server.get_triton_python_backend_python_env = lambda: stub
    libdir = libpython_dir()
    if libdir is not None:  # the stub must link our libpython, not the system's (module docstring)
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH")) if p)

    from realtime.stack import load_stack

    stack = load_stack(replace(config, server=None))
    models = served_models(stack)
    batches = BatchLog()
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    grpc_port = grpc_port if grpc_port is not None else port + 1
    metrics_port = metrics_port if metrics_port is not None else port + 2
    triton_config = TritonConfig(http_address=host, http_port=port, grpc_address=host, grpc_port=grpc_port,
                                 metrics_address=host, metrics_port=metrics_port, exit_timeout_secs=5,
                                 log_verbose=0)
    triton = Triton(config=triton_config)
    try:
        for name, (run, inputs, outputs) in models.items():
            triton.bind(model_name=name, infer_func=_batched(batch, run, name, batches),
                        inputs=[Tensor(name=n, dtype=d.type, shape=s) for n, d, s in inputs],
                        outputs=[Tensor(name=n, dtype=d.type, shape=s) for n, d, s in outputs],
                        config=ModelConfig(max_batch_size=max_batch,
                                           batcher=DynamicBatcher(max_queue_delay_microseconds=queue_delay_us)),
                        strict=True)
        try:
            triton.run()
        except Exception as err:  # noqa: BLE001 - a port in use, a server that did not start: one line
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"Triton did not start on {host}:{port} (grpc {grpc_port}, metrics {metrics_port}): "
                              f"{reason[:300]}") from None
        urls = {"http": f"{host}:{port}", "grpc": f"{host}:{grpc_port}",
                "metrics": f"http://{host}:{metrics_port}/metrics", "models": sorted(models)}
        if on_ready is not None:
            on_ready(urls)
        while not stop.wait(0.5):
            if batch_log is not None:
                batches.write(batch_log)
            if not triton.is_alive():
                raise ConfigError(f"Triton on {host}:{port} stopped; see the log above")
    finally:
        workspace = str(getattr(getattr(triton, "_workspace", None), "path", "") or "")
        triton.stop()
        _kill_leftover_stubs(workspace)
    return batches


def _kill_leftover_stubs(workspace: str) -> None:
    """Triton's Python-backend stubs that outlived the server (it exits before they do when unloading takes
    longer than its exit timeout), found by the workspace path in their command line: this server's only."""
    if not workspace:
        return
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if workspace in cmdline and "triton_python_backend_stub" in cmdline:
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _batched(batch, run, name: str, batches: BatchLog):
    """The callable Triton calls with a batch of requests (stacked on dimension 0 by pytriton's @batch)."""

    @batch
    def infer(**inputs):
        batches.add(name, len(next(iter(inputs.values()))))
        return run(inputs)

    return infer
