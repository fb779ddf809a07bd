"""ONNX export of engine models, and parity checks of the exported graph against torch.

Small steps that compose (as polygraphy's loaders do):
- `export_onnx(model, path)`: torch.onnx.export (the dynamo exporter, torch 2.13's default; needs onnxscript)
  with the model's dynamic axes, validated by onnx.checker and by checking that every declared dynamic axis
  really is symbolic in the graph.
- `cached_onnx(model, folder)`: the same, keyed by the model's content, so a second `mcihn build` reuses it.
- `check_parity(model, onnx_path)`: torch and onnxruntime on the same inputs (the example inputs and a second
  batch size, which proves the dynamic batch); `ParityError` above tolerance.
- `mcihn_engine_model(model)`: the fusion model's (MCIHN's or MCN-CL's) inference forward as an EngineModel, so
  it goes through the same machinery as the extractors.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engines.runtime import Backend, EngineModel, OnnxRuntimeBackend, TorchBackend, require
from mcihn.checkpoint import model_type_of
from mcihn.mcn_cl import MCNCL
from mcihn.model import MCIHN
from mcihn.spec import MODALITIES

DEFAULT_OPSET = 18  # parsed by TensorRT 10 and onnxruntime >= 1.14; the dynamo exporter converts down to it
EXPORT_VERSION = 1  # bump when export settings change, so cached ONNX files are made again
MCIHN_MAX_BATCH = 32


class ExportError(RuntimeError):
    """An engine model could not be exported to a valid ONNX graph with its dynamic axes."""


class ParityError(AssertionError):
    """The exported graph's outputs differ from torch's by more than the tolerance. `.report` has the numbers."""

    def __init__(self, report: ParityReport):
        super().__init__(report.summary())
        self.report = report


# ---------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------


def _dynamic_axes_of(model: EngineModel, name: str) -> dict[int, str]:
    return dict(model.dynamic_axes.get(name) or {})


def export_inputs(model: EngineModel) -> dict[str, np.ndarray]:
    """The example inputs with every dynamic axis of size 1 repeated to 2.

    torch.export specialises a size-1 axis to the constant 1 (broadcasting semantics), which would silently make
    a batch-1 example export a batch-1-only graph.
    """
    inputs = {}
    for name, array in model.example_inputs.items():
        for axis in _dynamic_axes_of(model, name):
            if array.shape[axis] == 1:
                array = np.repeat(array, 2, axis=axis)
        inputs[name] = np.ascontiguousarray(array)
    return inputs


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's chatter that is not about our model (torchvision ops not registered, constants the
    optimiser could not fold, shared axis names, pytree deprecations); real problems still raise."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx._internal.exporter._registration", "onnxscript.optimizer")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*axis name.*will not be used.*")
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def export_onnx(model: EngineModel, path: str | Path, opset: int = DEFAULT_OPSET) -> Path:
    """Export `model` to one self-contained ONNX file at `path` (written atomically). Returns the path.

    Inputs and outputs keep the model's names; the axes in `model.dynamic_axes` are symbolic (named as there).
    The module is put in eval mode (engines are for inference). Raises ExportError when the graph is invalid or
    a dynamic axis came out static.
    """
    onnx = require("onnx", "ONNX export")
    require("onnxscript", "ONNX export (torch's dynamo exporter)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = model.module.eval()
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    args = tuple(torch.from_numpy(a).to(device) for a in export_inputs(model).values())
    # Positional, in example_inputs order; a string names the axis in the graph (torch makes it Dim.DYNAMIC).
    dynamic_shapes = tuple(_dynamic_axes_of(model, n) or None for n in model.input_names)
    tmp = path.with_name(path.stem + ".tmp.onnx")
    try:
        with _quiet_exporter(), torch.inference_mode(False), torch.no_grad():
            torch.onnx.export(module, args, str(tmp), input_names=list(model.input_names),
                              output_names=list(model.output_names), dynamic_shapes=dynamic_shapes,
                              opset_version=opset, dynamo=True, external_data=False, verbose=False)
        graph = onnx.load(str(tmp))
        onnx.checker.check_model(graph)
        _check_dynamic_axes(model, graph)
    except Exception as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, ExportError):
            raise
        raise ExportError(f"cannot export {model.name} to ONNX: {type(err).__name__}: {err}") from err
    os.replace(tmp, path)
    return path


def _check_dynamic_axes(model: EngineModel, graph) -> None:
    """Every declared dynamic axis must be symbolic (dim_param) in the exported graph's inputs and outputs."""
    values = {v.name: v for v in list(graph.graph.input) + list(graph.graph.output)}
    missing = [n for n in model.output_names if n not in values]
    if missing:
        raise ExportError(f"{model.name}: the exported graph has no output {missing}; outputs are {list(values)}")
    for name, axes in model.dynamic_axes.items():
        if name not in values:  # an input the graph does not use was dropped by the exporter
            continue
        dims = values[name].type.tensor_type.shape.dim
        static = [axis for axis in axes if axis < len(dims) and not dims[axis].dim_param]
        if static:
            shape = [d.dim_param or d.dim_value for d in dims]
            raise ExportError(f"{model.name}: axes {static} of {name!r} were declared dynamic but exported static "
                              f"(shape {shape}); the model's code fixes their size")


def model_fingerprint(model: EngineModel, opset: int = DEFAULT_OPSET) -> str:
    """sha256 of everything an export depends on: weights and buffers, the interface (names, example shapes and
    dtypes, dynamic axes), the opset and torch version, and torch's outputs on the example inputs (these catch
    behaviour that is not in the weights, such as which layer a wrapper returns)."""
    digest = hashlib.sha256()
    interface = {
        "name": model.name, "class": f"{type(model.module).__module__}.{type(model.module).__qualname__}",
        "inputs": {n: [list(a.shape), a.dtype.str] for n, a in model.example_inputs.items()},
        "outputs": list(model.output_names), "dynamic_axes": {n: {str(k): v for k, v in a.items()}
                                                              for n, a in model.dynamic_axes.items()},
        "opset": opset, "torch": torch.__version__, "export_version": EXPORT_VERSION,
    }
    digest.update(json.dumps(interface, sort_keys=True).encode())
    for name, tensor in model.module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    for name, out in TorchBackend(model).run(model.example_inputs).items():
        # Rounded to fp16 so last-bit differences (thread counts) do not force a new export.
        digest.update(name.encode() + np.asarray(out, dtype=np.float16).tobytes())
    return digest.hexdigest()


def cached_onnx(model: EngineModel, folder: str | Path, opset: int = DEFAULT_OPSET) -> tuple[Path, bool]:
    """(path, True when reused): `folder`/<name>-<fingerprint[:16]>.onnx, exported when not there yet."""
    path = Path(folder).expanduser() / f"{model.name}-{model_fingerprint(model, opset)[:16]}.onnx"
    if path.is_file():
        return path, True
    return export_onnx(model, path, opset), False


def quantized_onnx(path: str | Path) -> Path:
    """`path` with int8 weights for its MatMul and Gemm ops (onnxruntime's dynamic quantization: activations are
    quantized per call), cached beside it as <stem>.int8.onnx. Convolutions stay fp32: onnxruntime's ConvInteger
    is slower than its fp32 convolution on CPUs (Wav2Vec2's conv encoder: 178 -> 597 ms), while a ViT's matrix
    products run ~3x faster (CLIP ViT-B/32: 122 -> 43 ms on one core, docs/benchmarks.md)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = Path(path)
    out = path.with_name(f"{path.stem}.int8.onnx")
    if not out.is_file():
        partial = out.with_name(f"{out.stem}.partial.onnx")
        quantize_dynamic(str(path), str(partial), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
        partial.replace(out)  # whole or not at all: an interrupted run leaves no half-written cache entry
    return out


# ---------------------------------------------------------------------------------------------------------
# Parity
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ParityReport:
    """Largest |torch - other| per output over all input cases; `passed` when all are within tolerance."""

    model: str
    backend: str
    max_abs_diff: dict[str, float]
    tolerance: float
    cases: list[str] = field(default_factory=list)
    passed: bool = field(init=False)

    def __post_init__(self) -> None:
        self.passed = self.worst <= self.tolerance

    @property
    def worst(self) -> float:
        return max(self.max_abs_diff.values(), default=0.0)

    def summary(self) -> str:
        diffs = ", ".join(f"{n} {d:.2e}" for n, d in self.max_abs_diff.items())
        verdict = "within" if self.passed else "ABOVE"
        return (f"{self.model}: {self.backend} vs torch max |diff| {diffs} over {', '.join(self.cases)} "
                f"({verdict} tolerance {self.tolerance:.0e})")


def batch_variant(model: EngineModel, batch: int = 3, seed: int = 0) -> dict[str, np.ndarray] | None:
    """The example inputs at another batch size (axes named "batch"), or None when nothing is batched.

    Floating inputs get noise on top of the repeated example, so rows differ (a graph that mixed up rows would
    show); integer inputs (token ids, masks, lengths) are repeated as they are, since only valid values make sense.
    """
    rng = np.random.default_rng(seed)
    inputs, batched = {}, False
    for name, array in model.example_inputs.items():
        for axis, axis_name in _dynamic_axes_of(model, name).items():
            if axis_name == "batch":
                reps = -(-batch // array.shape[axis])
                array = np.take(np.repeat(array, reps, axis=axis), range(batch), axis=axis)
                batched = True
        if np.issubdtype(array.dtype, np.floating):
            scale = float(np.std(array)) or 1.0
            array = (array + 0.1 * scale * rng.standard_normal(array.shape)).astype(array.dtype)
        inputs[name] = array
    return inputs if batched else None


def compare(model: EngineModel, backend: Backend, cases: Sequence[Mapping[str, np.ndarray]]) -> dict[str, float]:
    """Largest |torch fp32 CPU - backend| per output over `cases`. NaN or inf differences count as inf."""
    reference = TorchBackend(model)
    worst: dict[str, float] = {n: 0.0 for n in model.output_names}
    for inputs in cases:
        expected, got = reference.run(dict(inputs)), backend.run(dict(inputs))
        for name in model.output_names:
            a = np.asarray(expected[name], dtype=np.float64)
            b = np.asarray(got[name], dtype=np.float64)
            if a.shape != b.shape:
                raise ParityError(ParityReport(model.name, backend.name, {name: float("inf")}, 0.0,
                                               [f"shape torch {a.shape} vs {backend.name} {b.shape}"]))
            diff = float(np.max(np.abs(a - b))) if a.size else 0.0
            worst[name] = max(worst[name], diff if np.isfinite(diff) else float("inf"))
    return worst


def _describe(inputs: Mapping[str, np.ndarray]) -> str:
    first = next(iter(inputs.values()), None)
    return f"batch {first.shape[0]}" if first is not None and first.ndim else "scalar inputs"


def check_parity(model: EngineModel, onnx_path: str | Path,
                 inputs: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]] | None = None,
                 tolerance: float = 1e-3, *, raise_on_failure: bool = True, threads: int | None = None) -> ParityReport:
    """Run torch (fp32, CPU) and onnxruntime (CPU) on the same inputs and report the largest differences.

    inputs: one dict, a list of dicts, or None for the example inputs plus a second batch size. Raises
    ParityError with the numbers when a difference is above `tolerance` (unless raise_on_failure=False).
    """
    if inputs is None:
        cases = [model.example_inputs] + [v for v in [batch_variant(model)] if v is not None]
    elif isinstance(inputs, Mapping):
        cases = [inputs]
    else:
        cases = list(inputs)
    backend = OnnxRuntimeBackend(onnx_path, model, providers=["CPUExecutionProvider"], threads=threads)
    report = ParityReport(model.name, backend.name, compare(model, backend, cases), tolerance,
                          [_describe(c) for c in cases])
    if raise_on_failure and not report.passed:
        raise ParityError(report)
    return report


# ---------------------------------------------------------------------------------------------------------
# The fusion model (MCIHN or MCN-CL) as an engine model
# ---------------------------------------------------------------------------------------------------------


def mcihn_engine_model(model: MCIHN | MCNCL, batch: int = 1, seed: int = 0) -> EngineModel:
    """MCIHN.forward (or MCNCL.forward: the same signature) as an EngineModel named by its checkpoint model_type
    ("mcihn", "mcn-cl"; cached ONNX files and engines are named after it): inputs vision (B, T_v, D_v),
    text (B, T_t, D_t), audio (B, T_a, D_a) float32 and lengths (B, 3) int64 in MODALITIES order; output "scores":
    (B,) for regression, (B, C) softmax scores for classification. The batch axis is dynamic (1..32 in the TensorRT
    profile, `batch` optimal).

    The example features are seeded random values with three quarters of each sequence valid, so exports and
    parity checks go through the padding masks too. An ablation's unused modality is still an input (zeros do).
    """
    config = model.config
    rng = np.random.default_rng(seed)
    example: dict[str, np.ndarray] = {
        m: rng.standard_normal((batch, config.seq_lens[m], config.input_dims[m])).astype(np.float32)
        for m in MODALITIES
    }
    example["lengths"] = np.array([[max(1, config.seq_lens[m] - config.seq_lens[m] // 4) for m in MODALITIES]] * batch,
                                  dtype=np.int64)
    max_batch = max(batch, MCIHN_MAX_BATCH)
    return EngineModel(
        name=model_type_of(model),
        module=model.eval(),
        example_inputs=example,
        output_names=("scores",),
        dynamic_axes={**{n: {0: "batch"} for n in example}, "scores": {0: "batch"}},
        shape_profile={n: ((1, *a.shape[1:]), a.shape, (max_batch, *a.shape[1:])) for n, a in example.items()},
    )
