"""Choosing a backend: `create_backend(model, "auto")` picks the fastest the machine has: TensorRT, else torch fp16
with CUDA graphs on a GPU; onnxruntime, else torch on the CPU (onnxruntime runs BERT about twice as fast on our
CPUs, docs/design.md).

The backends themselves: `TorchBackend` and `OnnxRuntimeBackend` (engines/runtime.py, with the `Backend`
interface and `EngineModel`), `TensorRTBackend` (engines/tensorrt.py: an engine compiled from the ONNX file,
cached on disk). Imports go one way: runtime.py is imported by extractor.py, export.py and tensorrt.py; this
module (the choice) imports export.py and tensorrt.py; nothing imports back. The runtime's public names are
re-exported here, where callers have always found them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from engines import tensorrt as trt_backend
from engines.export import cached_onnx
from engines.runtime import (  # noqa: F401 - re-exported: the public names of the backends
    EXTRAS,
    PRECISIONS,
    Backend,
    BackendUnavailableError,
    EngineModel,
    OnnxRuntimeBackend,
    TorchBackend,
    cuda_available,
    default_providers,
    is_available,
    require,
)

log = logging.getLogger(__name__)

KINDS = ("auto", "torch", "onnxruntime", "tensorrt")
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "mcihn-live" / "engines"


class BackendChoiceError(BackendUnavailableError, ValueError):
    """An unknown backend, device or precision was asked for (a user's choice, not a bug): one clear line."""


def _device(device: str) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise BackendChoiceError(f"unknown device {device!r}; use cpu, cuda or cuda:N ({str(err)[:80]})") from None


def resolve_kind(kind: str, device: str) -> str:
    """"auto" -> the fastest backend this machine has for `device`; other kinds as they are."""
    if kind not in KINDS:
        raise BackendChoiceError(f"unknown backend {kind!r}; choose one of {', '.join(KINDS)}")
    if kind != "auto":
        return kind
    if _device(device).type == "cuda":
        return "tensorrt" if is_available("tensorrt") else "torch"
    return "onnxruntime" if all(is_available(p) for p in ("onnxruntime", "onnx", "onnxscript")) else "torch"


def create_backend(model: EngineModel, kind: str = "auto", device: str | None = None, precision: str | None = None,
                   cache_dir: str | Path | None = None, *, onnx_path: str | Path | None = None,
                   cuda_graphs: bool | None = None, threads: int | None = None) -> Backend:
    """A backend running `model`.

    device: "cpu", "cuda" or "cuda:N" (default: cuda when there is a GPU). precision: fp32 or fp16 (default:
    fp16 on a GPU, fp32 on the CPU; fp16 on the CPU is refused), or int8 (onnxruntime on the CPU: int8 weights
    for the matrix products, engines/export.py `quantized_onnx`). cache_dir holds exported ONNX files and
    TensorRT engines (default ~/.cache/mcihn-live/engines); `onnx_path` skips the export with a file already
    made from this model. cuda_graphs (torch on a GPU) defaults to on. threads: CPU threads for onnxruntime.
    """
    device = device or ("cuda" if cuda_available() else "cpu")
    on_cuda = _device(device).type == "cuda"
    precision = precision or ("fp16" if on_cuda else "fp32")
    if precision not in (*PRECISIONS, "int8"):
        raise BackendChoiceError(f"precision must be one of {', '.join(PRECISIONS)} or int8, got {precision!r}")
    requested_kind = kind
    if precision == "int8" and (on_cuda or resolve_kind(kind, device) != "onnxruntime"):
        raise BackendChoiceError(f"int8 is onnxruntime's on the CPU (dynamic quantization); got backend "
                                 f"{requested_kind!r} on {device!r}: use --backend onnxruntime --device cpu")
    if precision == "fp16" and not on_cuda:
        raise BackendChoiceError(f"fp16 needs a CUDA device (got device {device!r}); use precision='fp32' on the "
                                 f"CPU")
    requested, kind = kind, resolve_kind(kind, device)
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else DEFAULT_CACHE_DIR

    if kind == "torch":
        graphs = on_cuda if cuda_graphs is None else cuda_graphs
        return TorchBackend(model, device, precision, cuda_graphs=graphs)

    if kind == "onnxruntime":
        for package in ("onnxruntime", "onnx", "onnxscript"):
            require(package, "the onnxruntime backend")
        try:
            path = Path(onnx_path) if onnx_path is not None else _cached_onnx(model, cache_dir)
        except Exception as err:  # noqa: BLE001 - "auto" must still give a working backend
            if requested != "auto":
                raise
            log.warning("%s: ONNX export failed (%s); using torch", model.name, err)
            return TorchBackend(model, device, precision)
        if precision == "int8":
            from engines.export import quantized_onnx

            return OnnxRuntimeBackend(quantized_onnx(path), model, threads=threads, cache_dir=cache_dir)
        return OnnxRuntimeBackend(path, model, threads=threads, precision=precision, cache_dir=cache_dir)

    # TensorRT: checked first, so a machine without it learns which extra to install before anything is exported.
    trt_backend.require_tensorrt()
    if not on_cuda:
        raise BackendUnavailableError(f"TensorRT needs a CUDA GPU (got device {device!r}); use the onnxruntime or "
                                      f"torch backend on the CPU")
    path = Path(onnx_path) if onnx_path is not None else _cached_onnx(model, cache_dir)
    engine_path, _, _ = trt_backend.find_or_build_engine(model, path, trt_backend.EngineCache(cache_dir / "tensorrt"),
                                                         precision, device=device)
    return trt_backend.TensorRTBackend(engine_path, model, device=device)


def _cached_onnx(model: EngineModel, cache_dir: Path) -> Path:
    path, _ = cached_onnx(model, cache_dir / "onnx")
    return path
