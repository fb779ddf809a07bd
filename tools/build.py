"""`mcihn build`: prepare every engine a checkpoint needs before going live, and say what was done.

For the checkpoint's MCIHN and each extractor its feature spec names (model ids or folders), in order:
export to ONNX (cached by content), check the ONNX against torch (fp32, max abs difference; fails above the
tolerance), and with the TensorRT backend compile an engine (cached under its EngineKey, engines/tensorrt.py).
One line per engine: name, backend, cached or built, seconds, parity, path. An extractor whose model cannot be
loaded here is reported in one line and skipped.

Exit status: 0 when every engine is ready, 1 when one failed (export, parity or build), 2 when the backend is
unavailable.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tools import UsageError

if TYPE_CHECKING:
    from engines.extractor import EngineModel

# Same as engines.backends.DEFAULT_CACHE_DIR, written out so that building the CLI parser does not import torch.
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "mcihn-live" / "engines"

EXAMPLES = """examples:
  mcihn build --checkpoint runs/mosi/seed_0                      # auto: TensorRT on a GPU, else onnxruntime
  mcihn build --checkpoint runs/mosi/seed_0 --backend onnxruntime --cache-dir /tmp/engines
  mcihn build --checkpoint runs/mosi/seed_0 --backend tensorrt --precision fp16
"""


@dataclass
class BuildResult:
    """One engine: what it is, where it went, how long it took, and how close it is to torch."""

    name: str
    backend: str
    path: Path
    seconds: float
    cached: bool
    parity: float  # ONNX vs torch, max abs difference (fp32)
    engine_parity: float | None = None  # TensorRT engine vs torch (in the engine's precision), when built

    def line(self) -> str:
        status = "cached" if self.cached else "built"
        parity = f"onnx {self.parity:.1e}"
        if self.engine_parity is not None:
            parity += f", engine {self.engine_parity:.1e}"
        return f"{self.name:16s} {self.backend:11s} {status:6s} {self.seconds:7.1f} s  {parity:26s} {self.path}"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("build", help="export, check and compile the engines a checkpoint needs",
                              description=__doc__, epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (config.json + model.safetensors)")
    p.add_argument("--backend", default="auto", choices=("auto", "onnxruntime", "tensorrt"),
                   help="auto: tensorrt on a machine with a GPU and TensorRT, onnxruntime otherwise")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR), help="where ONNX files and engines are kept")
    p.add_argument("--precision", choices=("fp32", "fp16"), default=None,
                   help="engine precision (default: fp16 for TensorRT; onnxruntime runs the fp32 ONNX)")
    p.add_argument("--tolerance", type=float, default=1e-3, help="largest ONNX vs torch difference accepted (fp32)")


def resolve_build_backend(backend: str) -> str:
    """"auto" -> tensorrt where it can run (TensorRT and a GPU), else onnxruntime. Checks the packages."""
    from engines.backends import BackendUnavailableError, cuda_available, is_available, require

    if backend == "auto":
        backend = "tensorrt" if is_available("tensorrt") and cuda_available() else "onnxruntime"
    for package in ("onnx", "onnxscript", "onnxruntime"):  # export and parity need them for either backend
        require(package, f"mcihn build --backend {backend}")
    if backend == "tensorrt":
        from engines.tensorrt import require_tensorrt

        require_tensorrt()
        if not cuda_available():
            raise BackendUnavailableError("TensorRT engines are built on the GPU they run on, and torch sees no "
                                          "CUDA GPU here; use --backend onnxruntime")
    return backend


def engine_models(checkpoint, out=None) -> list[EngineModel]:
    """MCIHN's engine model, then one per extractor the checkpoint's modalities need that can be loaded here."""
    out = out if out is not None else sys.stdout  # looked up now: a default bound at import misses redirection
    from engines.export import mcihn_engine_model
    from engines.extractors import ExtractorOptions, build_extractor
    from engines.hub import ModelNotAvailableError

    models = [mcihn_engine_model(checkpoint.model)]
    options = ExtractorOptions.from_spec(checkpoint.spec)
    for modality in checkpoint.config.modalities:
        model_id = checkpoint.spec[modality].extractor
        try:
            models.append(build_extractor(modality, options).engine_model())
        except ModelNotAvailableError as err:
            print(f"skipped {modality} extractor {model_id!r}: {str(err).splitlines()[0]}", file=out)
        except ModuleNotFoundError as err:
            if not (err.name or "").startswith("engines."):
                raise
            print(f"skipped {modality} extractor {model_id!r}: {err.name} is not part of this install", file=out)
    return models


def build_one(model: EngineModel, backend: str, cache_dir: Path, precision: str, tolerance: float) -> BuildResult:
    """Export (or reuse) the ONNX, check it against torch, and compile (or reuse) the TensorRT engine."""
    from engines.export import cached_onnx, check_parity, compare

    start = time.perf_counter()
    onnx_path, onnx_cached = cached_onnx(model, cache_dir / "onnx")
    parity = check_parity(model, onnx_path, tolerance=tolerance)
    if backend == "onnxruntime":
        return BuildResult(model.name, backend, onnx_path, time.perf_counter() - start, onnx_cached, parity.worst)

    from engines.tensorrt import EngineCache, TensorRTBackend, find_or_build_engine

    engine_path, cached, _ = find_or_build_engine(model, onnx_path, EngineCache(cache_dir / "tensorrt"), precision)
    engine_diff = compare(model, TensorRTBackend(engine_path, model), [model.example_inputs])
    return BuildResult(model.name, backend, engine_path, time.perf_counter() - start, cached, parity.worst,
                       max(engine_diff.values(), default=0.0))


def run(args) -> int:
    from engines.backends import BackendUnavailableError
    from engines.export import ExportError, ParityError
    from mcihn.checkpoint import load_checkpoint

    try:
        backend = resolve_build_backend(args.backend)
    except BackendUnavailableError as err:
        print(f"mcihn build: error: {err}", file=sys.stderr)
        return 2
    precision = args.precision or ("fp16" if backend == "tensorrt" else "fp32")
    if backend == "onnxruntime" and precision != "fp32":
        raise UsageError("--precision fp16 applies to TensorRT engines; onnxruntime runs the fp32 ONNX "
                         "(use --backend tensorrt on a GPU machine)")
    cache_dir = Path(args.cache_dir).expanduser()
    checkpoint = load_checkpoint(args.checkpoint)
    print(f"mcihn build: engines for {args.checkpoint} with {backend} ({precision}), cache {cache_dir}")
    models = engine_models(checkpoint)
    print(f"{'engine':16s} {'backend':11s} {'status':6s} {'seconds':>9s}  {'parity max |diff|':26s} path")
    results, failures = [], 0
    for model in models:
        try:
            result = build_one(model, backend, cache_dir, precision, args.tolerance)
        except ParityError as err:
            print(f"{model.name:16s} {backend:11s} FAILED parity: {err}")
            failures += 1
            continue
        except (ExportError, RuntimeError, ValueError) as err:  # export or TensorRT build: report, go on
            print(f"{model.name:16s} {backend:11s} FAILED: {type(err).__name__}: {str(err).splitlines()[0]}")
            failures += 1
            continue
        results.append(result)
        print(result.line(), flush=True)
    built = sum(not r.cached for r in results)
    print(f"{len(results)} engines ready ({built} built, {len(results) - built} cached), "
          f"{sum(r.seconds for r in results):.1f} s" + (f"; {failures} failed" if failures else ""))
    return 1 if failures else 0
