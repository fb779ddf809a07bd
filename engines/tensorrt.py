"""TensorRT: engines compiled from the exported ONNX, cached on disk, run with torch CUDA tensors as buffers.

An engine is only valid for the exact ONNX file, TensorRT version, GPU model (name and compute capability),
precision and shape profile it was built with, so that tuple is its `EngineKey`. The cache stores each engine
next to a sidecar JSON of its key and of the engine file's hash; `lookup` trusts an engine only when the sidecar
says it is this key's engine, unchanged. Anything else (missing or unreadable sidecar, another GPU's or another
TensorRT's engine, a file changed since it was built) is a miss, and the engine is rebuilt, never loaded: a
deserialised foreign engine can crash the process or silently compute garbage.

`tensorrt` is imported inside functions only: the key and cache logic below is plain Python and is tested on
machines without TensorRT (docs/design.md: not installable here). Building follows TensorRT 10's Python API
(builder -> network from the ONNX parser -> one optimisation profile -> serialized engine).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np

from engines.runtime import PRECISIONS, Backend, BackendUnavailableError, EngineModel, require

log = logging.getLogger(__name__)

Shape = tuple[int, ...]
# Per input: (name, min shape, opt shape, max shape), sorted by name so equal profiles compare equal.
ProfileEntries = tuple[tuple[str, Shape, Shape, Shape], ...]

SIDECAR_FORMAT = "mcihn-tensorrt-engine"
SIDECAR_VERSION = 1


def require_tensorrt() -> ModuleType:
    """`import tensorrt`, or BackendUnavailableError naming the extra (NVIDIA's wheels, on a CUDA machine)."""
    return require("tensorrt", "the TensorRT backend (NVIDIA's wheels, on a machine with a CUDA GPU)")


def normalise_profile(profile: Mapping[str, tuple] | ProfileEntries) -> ProfileEntries:
    """{input: (min, opt, max)} or entries -> sorted entries of int tuples; checks min <= opt <= max."""
    items = profile.items() if isinstance(profile, Mapping) else ((e[0], e[1:]) for e in profile)
    entries = []
    for name, shapes in items:
        if len(shapes) != 3:
            raise ValueError(f"shape profile of {name!r} needs (min, opt, max) shapes, got {shapes!r}")
        lo, opt, hi = (tuple(int(d) for d in s) for s in shapes)
        if not (len(lo) == len(opt) == len(hi)) or any(a > b or b > c for a, b, c in zip(lo, opt, hi, strict=True)):
            raise ValueError(f"shape profile of {name!r} must satisfy min <= opt <= max per axis, got {shapes!r}")
        entries.append((str(name), lo, opt, hi))
    return tuple(sorted(entries))


@dataclass(frozen=True)
class EngineKey:
    """What an engine is valid for. `label` (a readable name for file names and reports) is not part of it."""

    onnx_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "8.9"
    precision: str
    shape_profile: ProfileEntries
    label: str = field(default="engine", compare=False)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        object.__setattr__(self, "shape_profile", normalise_profile(self.shape_profile))

    def identity(self) -> dict:
        """The key as JSON-ready data (what the sidecar stores and the digest hashes)."""
        data = asdict(self)
        data.pop("label")
        data["shape_profile"] = [[name, list(lo), list(opt), list(hi)] for name, lo, opt, hi in self.shape_profile]
        return data

    def digest(self) -> str:
        """sha256 of the canonical JSON of `identity()`: stable across processes, machines and Python versions."""
        canonical = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def gpu_identity(device: str | int = 0) -> tuple[str, str]:
    """(GPU name, compute capability "major.minor") of a CUDA device, from torch."""
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailableError("TensorRT needs a CUDA GPU and torch sees none")
    index = torch.device(device).index if isinstance(device, str) else device
    index = torch.cuda.current_device() if index is None else index
    major, minor = torch.cuda.get_device_capability(index)
    return torch.cuda.get_device_name(index), f"{major}.{minor}"


def engine_key(onnx_path: str | Path, model: EngineModel, precision: str, device: str | int = 0) -> EngineKey:
    """The key of the engine this machine would build for `onnx_path` (needs TensorRT and a GPU)."""
    trt = require_tensorrt()
    name, capability = gpu_identity(device)
    return EngineKey(onnx_sha256=file_sha256(onnx_path), tensorrt_version=trt.__version__, gpu_name=name,
                     compute_capability=capability, precision=precision, shape_profile=model.shape_profile,
                     label=model.name)


# ---------------------------------------------------------------------------------------------------------
# The cache (plain Python)
# ---------------------------------------------------------------------------------------------------------


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class EngineCache:
    """Engines under `root`: <label>-<digest[:20]>.engine plus a .json sidecar of the key and the engine's sha256.

    The sidecar is written after the engine, so an interrupted write leaves a miss, not a half engine that
    looks valid.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    def path_for(self, key: EngineKey) -> Path:
        label = re.sub(r"[^A-Za-z0-9_.-]+", "_", key.label) or "engine"
        return self.root / f"{label}-{key.digest()[:20]}.engine"

    def sidecar_for(self, key: EngineKey) -> Path:
        return self.path_for(key).with_suffix(".json")

    def miss_reason(self, key: EngineKey) -> str | None:
        """Why the cached engine for `key` cannot be used, or None when it can."""
        path, sidecar = self.path_for(key), self.sidecar_for(key)
        if not path.is_file():
            return "not built yet"
        if not sidecar.is_file():
            return f"{sidecar.name} is missing (an interrupted build, or an engine copied in by hand)"
        try:
            record = json.loads(sidecar.read_text())
            recorded, engine_sha = record["key"], record["engine_sha256"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            return f"{sidecar.name} is unreadable ({type(err).__name__})"
        if record.get("format") != SIDECAR_FORMAT or record.get("version") != SIDECAR_VERSION:
            return f"{sidecar.name} is not a version {SIDECAR_VERSION} {SIDECAR_FORMAT} record"
        mine = key.identity()
        if recorded != mine:
            changed = sorted(k for k in mine.keys() | recorded.keys() if recorded.get(k) != mine.get(k))
            details = ", ".join(f"{k} {recorded.get(k)!r} != {mine.get(k)!r}" for k in changed if k != "shape_profile")
            if "shape_profile" in changed:
                details = ", ".join(filter(None, [details, "shape profile differs"]))
            return f"engine was built for another key ({details})"
        if file_sha256(path) != engine_sha:
            return f"{path.name} changed since it was built (sha256 differs from its sidecar)"
        return None

    def lookup(self, key: EngineKey) -> Path | None:
        """The engine's path when the cache holds a valid engine for `key`; None (rebuild) otherwise."""
        reason = self.miss_reason(key)
        if reason is not None:
            log.info("engine cache miss for %s: %s", key.label, reason)
            return None
        return self.path_for(key)

    def store(self, key: EngineKey, engine: bytes) -> Path:
        """Write `engine` for `key` (replacing whatever was there) and its sidecar. Returns the engine path."""
        path = self.path_for(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.sidecar_for(key).unlink(missing_ok=True)  # never leave an old sidecar vouching for a new file
        _atomic_write(path, engine)
        record = {"format": SIDECAR_FORMAT, "version": SIDECAR_VERSION, "label": key.label, "key": key.identity(),
                  "engine_sha256": hashlib.sha256(engine).hexdigest(), "engine_bytes": len(engine)}
        _atomic_write(self.sidecar_for(key), (json.dumps(record, indent=2) + "\n").encode())
        return path

    def get_or_build(self, key: EngineKey, build: Callable[[], bytes]) -> tuple[Path, bool]:
        """(engine path, True when it came from the cache). `build()` returns the serialized engine."""
        path = self.lookup(key)
        if path is not None:
            return path, True
        return self.store(key, build()), False


# ---------------------------------------------------------------------------------------------------------
# Building and running (TensorRT needed from here on)
# ---------------------------------------------------------------------------------------------------------


def build_engine(onnx_path: str | Path, shape_profile: Mapping[str, tuple] | ProfileEntries, precision: str = "fp16",
                 workspace_bytes: int | None = None) -> bytes:
    """Compile an ONNX file into a serialized TensorRT engine with one optimisation profile.

    shape_profile: {input name: (min, opt, max) shape} for every input with a dynamic axis. precision "fp16"
    lets TensorRT pick half-precision kernels (TensorRT 10's weakly typed FP16 flag; TensorRT 11 removed it).
    """
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {errors}")

    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if precision == "fp16":
        if not hasattr(trt.BuilderFlag, "FP16"):
            raise BackendUnavailableError(f"TensorRT {trt.__version__} has no FP16 builder flag (strongly typed "
                                          f"networks only); build with precision fp32, or use tensorrt 10")
        config.set_flag(trt.BuilderFlag.FP16)

    profile = builder.create_optimization_profile()
    entries = {name: (lo, opt, hi) for name, lo, opt, hi in normalise_profile(shape_profile)}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if tensor.name in entries:
            profile.set_shape(tensor.name, *entries[tensor.name])
        elif any(d < 0 for d in tensor.shape):
            raise ValueError(f"input {tensor.name!r} of {onnx_path} has dynamic shape {tuple(tensor.shape)} but no "
                             f"entry in the shape profile ({', '.join(entries) or 'empty'})")
    config.add_optimization_profile(profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    return bytes(serialized)


def find_or_build_engine(model: EngineModel, onnx_path: str | Path, cache: EngineCache, precision: str = "fp16",
                         device: str | int = 0, builder: Callable[..., bytes] = build_engine
                         ) -> tuple[Path, bool, EngineKey]:
    """(engine path, True when cached, key) for `model` exported to `onnx_path`, built on this machine's GPU."""
    key = engine_key(onnx_path, model, precision, device)
    path, cached = cache.get_or_build(key, lambda: builder(onnx_path, model.shape_profile, precision))
    return path, cached, key


def _torch_dtype(trt: ModuleType, dtype):
    import torch

    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int8: torch.int8,
             trt.bool: torch.bool}
    for name, torch_dtype in (("int64", torch.int64), ("bfloat16", torch.bfloat16), ("uint8", torch.uint8)):
        if hasattr(trt, name):  # newer TensorRT types
            table[getattr(trt, name)] = torch_dtype
    if dtype not in table:
        raise TypeError(f"TensorRT tensor type {dtype} has no torch equivalent")
    return table[dtype]


class TensorRTBackend(Backend):
    """A serialized engine run with TensorRT 10's name-based API (set_input_shape, set_tensor_address,
    execute_async_v3) on a private CUDA stream, with torch tensors as device buffers.

    Load engines through EngineCache.lookup / find_or_build_engine, which refuse foreign or stale files.
    """

    name = "tensorrt"

    def __init__(self, engine_path: str | Path, model: EngineModel, device: str = "cuda"):
        import torch

        trt = require_tensorrt()
        self.model = model
        self.engine_path = Path(engine_path)
        self.device = torch.device(device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(self.device):
            self.engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
            if self.engine is None:
                raise BackendUnavailableError(f"TensorRT cannot load {self.engine_path}; delete it and run "
                                              f"`mcihn build` again")
            self.context = self.engine.create_execution_context()
            self.stream = torch.cuda.Stream(self.device)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        engine_outputs = [n for n in names if n not in self.input_names]
        self.output_names = [n for n in model.output_names if n in engine_outputs] or engine_outputs
        self._dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}

    def describe(self) -> str:
        return f"tensorrt {self.device} {self.engine_path.name}"

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            keep = []  # the buffers must outlive the asynchronous execution
            for name in self.input_names:
                tensor = torch.from_numpy(np.ascontiguousarray(inputs[name])).to(self.device, self._dtypes[name])
                keep.append(tensor)
                self.context.set_input_shape(name, tuple(tensor.shape))
                self.context.set_tensor_address(name, tensor.data_ptr())
            outputs = {}
            for name in self.output_names:
                shape = tuple(self.context.get_tensor_shape(name))
                outputs[name] = torch.empty(shape, dtype=self._dtypes[name], device=self.device)
                self.context.set_tensor_address(name, outputs[name].data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError(f"TensorRT execution of {self.engine_path.name} failed")
            result = {n: (t.float() if t.is_floating_point() else t).cpu() for n, t in outputs.items()}
        self.stream.synchronize()
        del keep
        return {n: t.numpy() for n, t in result.items()}
