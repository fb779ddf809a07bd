"""Running a model's core: `EngineModel` (what is run), the `Backend` interface (how), and the two runtimes every
install has: `TorchBackend` (eager PyTorch on the CPU or a GPU; fp16 and CUDA graphs on a GPU) and
`OnnxRuntimeBackend` (an exported ONNX file in onnxruntime).

The bottom of engines/: it imports no other engines module. Above it: engines/extractor.py (extractors run their
core through a backend), engines/export.py (ONNX export and parity), engines/tensorrt.py (the TensorRT
backend), and engines/backends.py, which picks one (`create_backend`). Optional packages (onnxruntime, onnx,
tensorrt) are imported only when asked for (`require`); a missing one raises `BackendUnavailableError`
naming the extra to install.
"""

from __future__ import annotations

import copy
import importlib
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from ctypes.util import find_library
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

PRECISIONS = ("fp32", "fp16")

# The extra of pyproject.toml that brings each optional package.
EXTRAS = {"onnxruntime": "onnx", "onnx": "onnx", "onnxscript": "onnx", "tensorrt": "tensorrt"}


@dataclass
class EngineModel:
    """A neural core with named inputs and outputs.

    module.forward takes the inputs positionally in `example_inputs` order and returns a tensor or a tuple in
    `output_names` order. `dynamic_axes` names the axes that may vary (ONNX export, TensorRT profiles):
    {input or output name: {axis: axis name}}. `shape_profile` gives, per input, the (min, opt, max) shapes
    a compiled engine must accept (TensorRT optimisation profiles).
    """

    name: str
    module: torch.nn.Module
    example_inputs: dict[str, np.ndarray]
    output_names: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    shape_profile: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(self.example_inputs)


class BackendUnavailableError(RuntimeError):
    """A backend was asked for whose package (or hardware) this machine does not have."""


def require(package: str, purpose: str = "") -> ModuleType:
    """`import package`, or BackendUnavailableError naming the extra that installs it."""
    try:
        return importlib.import_module(package)
    except ImportError as err:
        extra = EXTRAS.get(package)
        fix = f"pip install 'mcihn-live[{extra}]'" if extra else f"pip install {package}"
        for_what = f" for {purpose}" if purpose else ""
        raise BackendUnavailableError(f"{package} is needed{for_what} but cannot be imported ({err}); {fix}") from None


def is_available(package: str) -> bool:
    """Whether `package` imports (without raising); the import is cached by Python afterwards."""
    try:
        importlib.import_module(package)
    except ImportError:
        return False
    return True


def cuda_available() -> bool:
    return torch.cuda.is_available()


class Backend(ABC):
    """run({input name: array}) -> {output name: array}; floating outputs come back as float32.

    Backends are not thread-safe: give each thread its own (they keep static buffers between calls).
    """

    name: str

    @abstractmethod
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def describe(self) -> str:
        """One line for logs and reports: which backend, on what, in which precision."""
        return self.name


def _as_float32(array: np.ndarray) -> np.ndarray:
    return array.astype(np.float32, copy=False) if np.issubdtype(array.dtype, np.floating) else array


# ---------------------------------------------------------------------------------------------------------
# torch
# ---------------------------------------------------------------------------------------------------------


@dataclass
class _CapturedGraph:
    """One CUDA graph for one input signature: inputs are copied into `inputs`, `replay()` fills `outputs`."""

    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]
    outputs: tuple[torch.Tensor, ...]


class TorchBackend(Backend):
    """PyTorch, eager or replaying CUDA graphs.

    precision "fp16" casts the weights and the floating inputs to half precision and is only offered on CUDA (CPU
    half-precision kernels are slow or missing). With `cuda_graphs`, the first call for each input signature
    (shapes and dtypes) warms up and captures a graph over static input/output tensors; later calls with that
    signature copy the inputs into the static tensors and replay it, which removes the per-kernel launch cost
    that dominates small models. Live windows are padded to fixed lengths, so a handful of signatures covers a
    session; past `max_graphs` signatures (shapes vary too much) new ones run eagerly. A model that cannot be
    captured (host syncs, data-dependent shapes) falls back to eager with one warning.

    The backend works on its own copy of the module when it changes device or dtype, so the EngineModel's
    module stays fp32 on the CPU for ONNX export and the other backends.
    """

    name = "torch"

    def __init__(self, model: EngineModel, device: str | torch.device = "cpu", precision: str = "fp32",
                 cuda_graphs: bool = False, max_graphs: int = 8, warmup: int = 2):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.model = model
        self.device = torch.device(device)
        on_cuda = self.device.type == "cuda"
        if precision == "fp16" and not on_cuda:
            raise ValueError(f"fp16 needs a CUDA device (got device {str(self.device)!r}); use precision='fp32' on "
                             f"the CPU")
        if cuda_graphs and not on_cuda:
            raise ValueError(f"CUDA graphs need a CUDA device (got device {str(self.device)!r})")
        self.precision = precision
        self.float_dtype = torch.float16 if precision == "fp16" else torch.float32
        module = model.module
        if self.device.type != "cpu" or precision != "fp32":
            module = copy.deepcopy(module)
        module = module.to(self.device)
        self.module = (module.half() if precision == "fp16" else module).eval()
        self.cuda_graphs = cuda_graphs
        self.max_graphs = max_graphs
        self.warmup = warmup
        self._graphs: dict[tuple, _CapturedGraph] = {}
        self._eager: set[tuple] = set()  # signatures that run eagerly (too many shapes, or capture failed)
        self._warned_shapes = False
        self._pool = torch.cuda.graph_pool_handle() if cuda_graphs else None

    def describe(self) -> str:
        graphs = f", CUDA graphs ({len(self._graphs)} captured)" if self.cuda_graphs else ""
        return f"torch {self.device} {self.precision}{graphs}"

    def _to_device(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        tensors = []
        for a in arrays:
            t = torch.from_numpy(a).to(self.device)
            tensors.append(t.to(self.float_dtype) if t.is_floating_point() else t)
        return tensors

    def _forward(self, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        out = self.module(*tensors)
        return out if isinstance(out, tuple) else (out,)

    @torch.inference_mode()
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = [np.ascontiguousarray(inputs[n]) for n in self.model.input_names]
        outputs = self._run_graph(arrays) if self.cuda_graphs else self._forward(self._to_device(arrays))
        # .float() then .cpu() copies, so a graph's static outputs are never handed out (the next replay rewrites them).
        return {n: _as_float32(o.float().cpu().numpy() if o.is_floating_point() else o.cpu().numpy())
                for n, o in zip(self.model.output_names, outputs, strict=True)}

    # -- CUDA graphs -----------------------------------------------------------------------------------------

    def _run_graph(self, arrays: list[np.ndarray]) -> tuple[torch.Tensor, ...]:
        signature = tuple((a.shape, a.dtype.str) for a in arrays)
        captured = self._graphs.get(signature)
        if captured is None and signature not in self._eager:
            if len(self._graphs) >= self.max_graphs:
                if not self._warned_shapes:
                    self._warned_shapes = True
                    warnings.warn(f"{self.model.name}: more than {self.max_graphs} input shapes; new shapes run "
                                  f"without CUDA graphs", RuntimeWarning, stacklevel=3)
                self._eager.add(signature)
            else:
                captured = self._capture(arrays, signature)
        if captured is None:
            return self._forward(self._to_device(arrays))
        for static, a in zip(captured.inputs, arrays, strict=True):
            static.copy_(torch.from_numpy(a))  # host -> device and dtype cast into the captured address
        captured.graph.replay()
        return captured.outputs

    def _capture(self, arrays: list[np.ndarray], signature: tuple) -> _CapturedGraph | None:
        static_inputs = self._to_device(arrays)
        # Warm up on a side stream (lazy initialisation, cuBLAS workspaces, autotuning) before capturing.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self._forward(static_inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: CUDA work on other threads (the other extractors of a live session) must not abort it.
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                static_outputs = self._forward(static_inputs)
        except Exception as err:  # noqa: BLE001 - any capture failure: this signature runs eagerly instead
            warnings.warn(f"{self.model.name}: CUDA graph capture failed for shapes {[a.shape for a in arrays]} "
                          f"({type(err).__name__}: {err}); running eagerly", RuntimeWarning, stacklevel=4)
            self._eager.add(signature)
            return None
        captured = _CapturedGraph(graph, static_inputs, static_outputs)
        self._graphs[signature] = captured
        return captured


# ---------------------------------------------------------------------------------------------------------
# onnxruntime
# ---------------------------------------------------------------------------------------------------------

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
              "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}


def default_providers(precision: str = "fp32", cache_dir: str | Path | None = None) -> list:
    """The execution providers to ask onnxruntime for, fastest first: TensorRT, CUDA, then always the CPU.

    Only providers this onnxruntime build has are listed (the CPU wheel has just the CPU one). The TensorRT
    provider gets fp16 when asked and an engine cache under `cache_dir` (it compiles at session start otherwise).
    """
    ort = require("onnxruntime", "the onnxruntime backend")
    available = ort.get_available_providers()
    providers: list = []
    # onnxruntime-gpu lists the TensorRT provider whether or not TensorRT's libraries are there; without them
    # every session start would print a failure and retry, so it is only asked for when TensorRT is installed.
    if "TensorrtExecutionProvider" in available and (is_available("tensorrt") or find_library("nvinfer")):
        options: dict[str, Any] = {"trt_fp16_enable": precision == "fp16"}
        if cache_dir is not None:
            options.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(Path(cache_dir) / "ort-tensorrt"))
        providers.append(("TensorrtExecutionProvider", options))
    if "CUDAExecutionProvider" in available:
        providers.append("CUDAExecutionProvider")
    providers.append("CPUExecutionProvider")
    return providers


class OnnxRuntimeBackend(Backend):
    """An ONNX file in an onnxruntime InferenceSession.

    `model_or_names` gives the output names and their order: an EngineModel, a sequence of names, or None for
    the file's own outputs. Inputs are fed by name, cast to the dtypes the file declares; names the graph does
    not use are ignored. `threads` sets onnxruntime's intra-op threads (default: all cores).
    """

    name = "onnxruntime"

    def __init__(self, onnx_path: str | Path, model_or_names: EngineModel | Sequence[str] | None = None,
                 providers: Sequence | None = None, threads: int | None = None, precision: str = "fp32",
                 cache_dir: str | Path | None = None):
        ort = require("onnxruntime", "the onnxruntime backend")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            # A thread budget means the CPU is shared with other workers (the live pipeline): idle pool threads
            # must sleep, not spin-wait on cores that the ASR or the other extractors need.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # errors only; provider fallbacks are reported by describe()
        self.onnx_path = Path(onnx_path)
        self.session = ort.InferenceSession(str(self.onnx_path), sess_options=options,
                                            providers=list(providers or default_providers(precision, cache_dir)))
        self._input_types = {i.name: _ORT_TYPES.get(i.type) for i in self.session.get_inputs()}
        if isinstance(model_or_names, EngineModel):
            self.output_names = tuple(model_or_names.output_names)
        elif model_or_names is not None:
            self.output_names = tuple(model_or_names)
        else:
            self.output_names = tuple(o.name for o in self.session.get_outputs())

    def describe(self) -> str:
        return f"onnxruntime ({', '.join(self.session.get_providers())}) {self.onnx_path.name}"

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self._input_types if n not in inputs]
        if missing:
            raise KeyError(f"{self.onnx_path.name} needs inputs {missing}; got {sorted(inputs)}")
        feed = {n: np.ascontiguousarray(inputs[n], dtype=t) for n, t in self._input_types.items()}
        outputs = self.session.run(list(self.output_names), feed)
        return {n: _as_float32(np.asarray(o)) for n, o in zip(self.output_names, outputs, strict=True)}
