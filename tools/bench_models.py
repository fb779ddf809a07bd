"""`mcihn bench-models`: latency of each extractor's core and of the fusion model, per backend.

Stand-in models of the real architectures (random weights: right for timing, see engines/standins.py) are run
on fixed inputs: CLIP ViT-B/32 on 1 and 10 frames, BERT-base on 36 tokens, Wav2Vec2-base on a 2.56 s window,
MCIHN at the paper's sizes. Each (model, backend) pair is warmed up, then timed `--repeats` times; the table
gives the median and 90th percentile in ms and the ratio to torch in the same run. The whole live pipeline is
measured by `mcihn bench` (a later issue); this isolates the neural cores.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

EXAMPLE = """examples:
  mcihn bench-models                              # base sizes, torch and onnxruntime on the CPU
  mcihn bench-models --size tiny --repeats 5      # seconds, for a smoke test
  mcihn bench-models --backends torch,onnxruntime --device cuda --precision fp16 --json out.json
"""


@dataclass
class Timing:
    model: str
    input: str
    backend: str
    median_ms: float
    p90_ms: float
    repeats: int
    ratio_to_torch: float | None = None


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench-models", help="latency of the extractors and MCIHN per backend",
                              epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="base", choices=("tiny", "base"), help="stand-in model size")
    p.add_argument("--backends", default="torch,onnxruntime", help="comma list: torch, onnxruntime, tensorrt")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16"), help="fp16 needs a GPU")
    p.add_argument("--cuda-graphs", action="store_true", help="torch backend: capture CUDA graphs (GPU)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch and onnxruntime (0: all)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--models", default="vision,text,audio,mcihn", help="which cores to time")
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "mcihn-live"),
                   help="where stand-in models and ONNX files are kept between runs")
    p.add_argument("--json", help="also write the results to this JSON file")


def time_backend(run, inputs: dict[str, np.ndarray], repeats: int, warmup: int) -> np.ndarray:
    """Per-call wall times in ms of `run(inputs)`, after `warmup` untimed calls."""
    for _ in range(warmup):
        run(inputs)
    times = np.empty(repeats)
    for i in range(repeats):
        start = time.perf_counter()
        run(inputs)
        times[i] = (time.perf_counter() - start) * 1e3
    return times


def batched(example: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """The example inputs repeated along the batch axis."""
    return {k: np.repeat(v, batch, axis=0) for k, v in example.items()}


def bench_cases(size: str, cache_dir: Path, models: list[str]):
    """(model name, input description, EngineModel, inputs) for each core to time."""
    from engines.extractors import ExtractorOptions, build_extractor
    from engines.standins import build_standins

    folders = build_standins(cache_dir / "standins", size)
    options = ExtractorOptions(vision=str(folders["vision"]), text=str(folders["text"]), audio=str(folders["audio"]),
                               face_crop=False)
    rng = np.random.default_rng(0)
    if "vision" in models:
        em = build_extractor("vision", options).engine_model()
        frame = rng.standard_normal(em.example_inputs["pixel_values"].shape[1:]).astype(np.float32)[None]
        yield "vision", "1 frame 224x224", em, {"pixel_values": frame}
        yield "vision", "10 frames", em, {"pixel_values": np.repeat(frame, 10, axis=0)}
    if "text" in models:
        em = build_extractor("text", options).engine_model()
        ids = rng.integers(5, 100, em.example_inputs["input_ids"].shape).astype(np.int64)
        yield "text", f"{ids.shape[1]} tokens", em, {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if "audio" in models:
        em = build_extractor("audio", options).engine_model()
        (name, example), = em.example_inputs.items()
        wave = (0.1 * rng.standard_normal(example.shape)).astype(np.float32)
        yield "audio", f"{example.shape[-1] / 16000:.2f} s at 16 kHz", em, {name: wave}
    if "mcihn" in models:
        import torch

        from engines.export import mcihn_engine_model
        from mcihn.config import MCIHNConfig
        from mcihn.model import MCIHN

        torch.manual_seed(0)
        em = mcihn_engine_model(MCIHN(MCIHNConfig()).eval())
        inputs = {k: (rng.standard_normal(v.shape).astype(np.float32) if v.dtype == np.float32 else v)
                  for k, v in em.example_inputs.items()}
        yield "mcihn", "paper sizes, batch 1", em, inputs


def run(args) -> int:
    import torch

    from engines.backends import create_backend
    from engines.export import export_onnx

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.threads:
        torch.set_num_threads(args.threads)
    cache_dir = Path(args.cache_dir).expanduser()
    onnx_dir = Path(tempfile.mkdtemp(prefix="mcihn-bench-"))
    results: list[Timing] = []
    for model, description, em, inputs in bench_cases(args.size, cache_dir, models):
        onnx_path = None
        torch_median = None
        for kind in backends:
            if kind != "torch" and onnx_path is None:
                onnx_path = export_onnx(em, onnx_dir / f"{args.size}-{em.name}.onnx")
            backend = create_backend(em, kind, device=args.device, precision=args.precision,
                                     onnx_path=onnx_path, cuda_graphs=args.cuda_graphs,
                                     threads=args.threads or None, cache_dir=cache_dir / "engines")
            times = time_backend(backend.run, inputs, args.repeats, args.warmup)
            median = float(np.median(times))
            torch_median = median if kind == "torch" else torch_median
            results.append(Timing(model, description, f"{kind} {args.device} {args.precision}", median,
                                  float(np.percentile(times, 90)), args.repeats,
                                  None if torch_median is None else torch_median / median))
            print(f"  {model:7s} {description:22s} {kind:12s} median {median:8.1f} ms", file=sys.stderr)
    print(format_table(results))
    if args.json:
        meta = {"size": args.size, "device": args.device, "precision": args.precision,
                "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                "torch": torch.__version__}
        Path(args.json).write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=2))
    return 0


def format_table(results: list[Timing]) -> str:
    header = "| model | input | backend | median ms | p90 ms | torch / this |\n|---|---|---|---|---|---|"
    rows = [f"| {r.model} | {r.input} | {r.backend} | {r.median_ms:.1f} | {r.p90_ms:.1f} | "
            f"{'' if r.ratio_to_torch is None else f'{r.ratio_to_torch:.2f}x'} |" for r in results]
    return "\n".join([header, *rows])
