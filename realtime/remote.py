"""The station's side of an inference server (`mcihn-live --server HOST:PORT`): the models' work goes to a Triton
Inference Server started by `mcihn serve` (realtime/serve.py); capture, windows, VAD and ASR stay local.

    Server        one per session: the address, a client per thread (HTTP), the state of the connection (up, or
                  down since when: a request that failed or timed out marks it down, requests then fail at once
                  until a retry every RETRY_S), and each model's last round trip (the events' `server_*` latencies)
    RemoteBackend an engines Backend (run({name: array}) -> {name: array}) whose model runs on the server: the
                  extractors' cores and the fusion model are given one instead of a local backend
    RemoteFace    the starter's face expert (detector + expression model) on the server, frame in, face out

Faults (docs/scaling.md): no server at start is one line and a non-zero exit (ConfigError); a server that goes away
or answers slower than the timeout mid-session is reported once (`Faults`), the modalities it computes are absent
(fusion on the server: no scores) while it is down, and the session goes on; it is retried every RETRY_S and its
return is reported too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from engines.runtime import Backend
from realtime.config import ConfigError

log = logging.getLogger("mcihn.live")

SERVE_EXTRA = "pip install 'mcihn-live[serve]'"
RETRY_S = 2.0
DEFAULT_PORT = 8000
# Triton's datatypes <-> numpy
TRITON_DTYPES = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32,
                 "INT8": np.int8, "UINT8": np.uint8, "BOOL": np.bool_}


class ServerError(RuntimeError):
    """A request the inference server did not answer (gone, too slow, or down since an earlier failure): the
    modality it was for is absent this time. Already reported (once) when this is raised."""


def parse_address(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """"HOST:PORT", ":PORT" or "PORT" -> (host, port); ConfigError naming the form otherwise."""
    host, _, port = str(text).rpartition(":")
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not 0 < number < 65536:
        raise ConfigError(f"server address {text!r} is not HOST:PORT (e.g. 127.0.0.1:{DEFAULT_PORT})")
    return host or default_host, number


def tritonclient_http():
    """tritonclient.http, or ConfigError naming the extra that installs it."""
    try:
        import tritonclient.http as client
    except ImportError as err:
        raise ConfigError(f"the inference-server client (tritonclient) cannot be imported ({err}); "
                          f"{SERVE_EXTRA}") from None
    return client


class Server:
    """The inference server one session talks to. Thread-safe: each thread gets its own HTTP client."""

    def __init__(self, address: str, timeout_s: float = 2.0, retry_s: float = RETRY_S):
        self.host, self.port = parse_address(address)
        self.url = f"{self.host}:{self.port}"
        self.timeout_s, self.retry_s = float(timeout_s), float(retry_s)
        self._http = tritonclient_http()
        self._local = threading.local()
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._next_try = 0.0
        self.report: Callable[[str], None] = log.warning  # the session's Faults.report, once it has one
        self.round_trip_ms: dict[str, float] = {}  # model -> its last round trip (request, queue, batch, answer)
        self.failures = 0

    def client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._http.InferenceServerClient(self.url, connection_timeout=self.timeout_s,
                                                      network_timeout=self.timeout_s)
            self._local.client = client
        return client

    def _drop_client(self) -> None:
        client = getattr(self._local, "client", None)
        self._local.client = None
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - a broken connection may not close cleanly; it is dropped anyway
                pass

    # -- at start --------------------------------------------------------------------------------------------------

    def check(self, models: Sequence[str]) -> dict[str, dict]:
        """At session start: the server answers and serves `models` (their metadata: inputs, outputs). ConfigError,
        one line, otherwise: nothing else can start without them."""
        try:
            live = self.client().is_server_live()
        except Exception as err:  # noqa: BLE001 - refused, unreachable, timed out: all mean no server
            raise ConfigError(f"no inference server answers at {self.url} ({_reason(err)}); start one with "
                              f"`mcihn serve {self.url}` (same checkpoint), or drop --server") from None
        if not live:
            raise ConfigError(f"the inference server at {self.url} is not live; see its log")
        metadata = {}
        for name in models:
            try:
                ready = self.client().is_model_ready(name)
                metadata[name] = self.client().get_model_metadata(name) if ready else None
            except Exception as err:  # noqa: BLE001
                raise ConfigError(f"the inference server at {self.url} failed while asked for model {name!r} "
                                  f"({_reason(err)})") from None
            if metadata[name] is None:
                raise ConfigError(f"the inference server at {self.url} does not serve model {name!r}; start it with "
                                  f"the same checkpoint (or the starter) as this station: `mcihn serve "
                                  f"{self.url} [--checkpoint DIR]`")
        return metadata

    # -- per request -------------------------------------------------------------------------------------------------

    def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """Run `model` on the server. ServerError when it does not answer in time or is down (reported once)."""
        with self._lock:
            if self._down_since is not None and time.monotonic() < self._next_try:
                raise ServerError(f"the inference server at {self.url} is down")
        http = self._http
        request = []
        for name, array in inputs.items():
            array = np.ascontiguousarray(array)
            item = http.InferInput(name, list(array.shape), _triton_dtype(array.dtype))
            item.set_data_from_numpy(array, binary_data=True)
            request.append(item)
        wanted = [http.InferRequestedOutput(n, binary_data=True) for n in outputs]
        start = time.perf_counter()
        try:
            result = self.client().infer(model, request, outputs=wanted)
            answer = {n: _as_float32(result.as_numpy(n)) for n in outputs}
        except Exception as err:  # noqa: BLE001 - refused, reset, timed out, or the server's own error
            self._drop_client()
            self._went_down(err, model)
            raise ServerError(f"the inference server at {self.url} did not answer ({_reason(err)})") from None
        self.round_trip_ms[model] = (time.perf_counter() - start) * 1e3
        self._came_back()
        return answer

    def _went_down(self, err: BaseException, model: str) -> None:
        with self._lock:
            self.failures += 1
            first = self._down_since is None
            if first:
                self._down_since = time.monotonic()
            self._next_try = time.monotonic() + self.retry_s
        if first:
            # An HTTP status: the server answered, with an error of its model; none: it did not answer.
            status = err.status() if callable(getattr(err, "status", None)) else None
            what = f"failed on model {model!r}" if status else "lost"
            self.report(f"inference server at {self.url} {what} ({_reason(err)}); the modalities it computes are "
                        f"absent until it answers again (retried every {self.retry_s:g} s)")

    def _came_back(self) -> None:
        if self._down_since is None:
            return
        with self._lock:
            down, self._down_since = self._down_since, None
        if down is not None:
            self.report(f"inference server at {self.url} answers again after {time.monotonic() - down:.1f} s; "
                        f"its modalities resume")

    def latencies(self) -> dict[str, float]:
        """The last round trip to each model, as the events' per-stage latencies (`server_<model>`)."""
        return {f"server_{m}": ms for m, ms in list(self.round_trip_ms.items())}


class RemoteBackend(Backend):
    """A model served by the inference server, behind the engines Backend interface: the extractors and the fusion
    run it exactly as a local backend. Inputs are cast to the dtypes the server declares."""

    name = "triton"

    def __init__(self, server: Server, model: str, output_names: Sequence[str], metadata: dict):
        self.server, self.model = server, model
        self.output_names = tuple(output_names)
        self._inputs = {i["name"]: TRITON_DTYPES[i["datatype"]] for i in metadata["inputs"]}
        served = {o["name"] for o in metadata["outputs"]}
        if not set(self.output_names) <= served:
            raise ConfigError(f"model {model!r} on the server at {server.url} has outputs {sorted(served)}, this "
                              f"station needs {list(self.output_names)}: start the server with the same checkpoint")

    def describe(self) -> str:
        return f"triton model {self.model} at {self.server.url}"

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {n: np.asarray(inputs[n], dtype=t) for n, t in self._inputs.items()}
        return self.server.infer(self.model, feed, self.output_names)


class RemoteFace:
    """The starter's face expert (engines.face.FaceExpert) on the server: `analyze(frame)` -> FaceResult or None."""

    def __init__(self, server: Server, model: str = "face"):
        from engines.face import DEFAULT_DETECTOR, DETECTOR_MODELS, FER_MODEL

        self.server, self.name = server, model
        self.model = f"{DETECTOR_MODELS[DEFAULT_DETECTOR]}+{FER_MODEL}"

    def analyze(self, frame_bgr: np.ndarray):
        from engines.face import FaceResult
        from mcihn.emotions import EMOTIONS

        out = self.server.infer(self.name, {"frame": np.ascontiguousarray(frame_bgr, np.uint8)[None]},
                                ("box", "probs", "score"))
        score = float(out["score"][0, 0])
        if score < 0:
            return None
        box = tuple(int(v) for v in out["box"][0])
        return FaceResult(box, dict(zip(EMOTIONS, out["probs"][0].tolist(), strict=True)), score)


def _triton_dtype(dtype: np.dtype) -> str:
    for name, np_type in TRITON_DTYPES.items():
        if np.dtype(np_type) == dtype:
            return name
    raise TypeError(f"no Triton datatype for {dtype}")


def _as_float32(array: np.ndarray) -> np.ndarray:
    return array.astype(np.float32, copy=False) if np.issubdtype(array.dtype, np.floating) else array


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text[:160]
