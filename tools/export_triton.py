"""`mcihn export-triton`: a Triton Inference Server model repository of a checkpoint's (or the stand-ins', or the
starter's) models, for NVIDIA's Triton containers on GPU servers with the ONNX Runtime backend (optionally
TensorRT through it): one folder per model, `<name>/1/model.onnx` and `<name>/config.pbtxt` with dynamic batching,
the batch limit and the shape limits (TensorRT optimisation profiles) of each input (docs/scaling.md).

    vision   the vision extractor's core (pixel values -> image embeddings)
    text     the text extractor's core (token ids, mask -> token features)
    audio    the audio extractor's core (16 kHz samples -> Wav2Vec2 features)
    fusion   MCIHN's (or MCN-CL's) inference forward (features + lengths -> scores)

The names, inputs and outputs are those `mcihn serve` serves, so `mcihn-live --server` talks to either. The
preprocessing (face crop, tokenizer, resampling), the windows and the ASR stay on the station; the starter's face
expert is TFLite and is not exported (serve it with `mcihn serve`). No ensemble is written: the fusion's inputs are
windows of features computed at different moments (frames as they arrive, text when the words change), so an
ensemble that ran the extractors before the fusion at every tick would redo work the station's windows keep.
"""

from __future__ import annotations

import argparse
from pathlib import Path

EXAMPLES = """examples:
  mcihn export-triton --checkpoint runs/meld/seed_0 --out triton-models
  mcihn export-triton --standins base --out triton-models --max-batch 16 --tensorrt fp16
  docker run --gpus all -p8000:8000 -p8001:8001 -p8002:8002 -v $PWD/triton-models:/models \\
      nvcr.io/nvidia/tritonserver:24.10-py3 tritonserver --model-repository=/models
"""

# ONNX element types -> Triton's
ONNX_TO_TRITON = {1: "TYPE_FP32", 10: "TYPE_FP16", 11: "TYPE_FP64", 7: "TYPE_INT64", 6: "TYPE_INT32",
                  3: "TYPE_INT8", 2: "TYPE_UINT8", 9: "TYPE_BOOL"}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("export-triton", help="write a Triton model repository (ONNX + config.pbtxt)",
                              description=__doc__, epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the model repository folder to write (made if missing)")
    p.add_argument("--checkpoint", help="a checkpoint folder written by `mcihn train` (default: the starter)")
    p.add_argument("--standins", choices=("tiny", "base"), help="random stand-in models (untrained)")
    p.add_argument("--max-batch", type=int, default=8, help="max_batch_size of every model (8)")
    p.add_argument("--queue-delay-us", type=int, default=1000, help="dynamic batching's max queue delay (1000)")
    p.add_argument("--tensorrt", choices=("off", "fp32", "fp16"), default="off",
                   help="ask the ONNX Runtime backend for its TensorRT accelerator at this precision (GPU servers)")
    p.add_argument("--cache-dir", default=None, help="models (~/.cache/mcihn-live)")


def run(args) -> int:
    from realtime.config import DEFAULT_CACHE, ConfigError, LiveConfig
    from realtime.stack import load_stack

    if args.max_batch < 1:
        raise ConfigError("--max-batch must be 1 or more")
    config = LiveConfig(checkpoint=args.checkpoint, standins=args.standins, source="push", backend="torch",
                        device="cpu", use_camera=False, cache_dir=args.cache_dir or str(DEFAULT_CACHE))
    stack = load_stack(config)
    models = {m: e.engine_model() for m, e in stack.extractors.items()}
    models["fusion"] = stack.fusion_model
    written = export_repository(models, Path(args.out), args.max_batch, args.queue_delay_us, args.tensorrt)
    print(f"mcihn export-triton: wrote {', '.join(written)} to {args.out} (ONNX Runtime backend, dynamic batching up "
          f"to {args.max_batch}{'' if args.tensorrt == 'off' else f', TensorRT {args.tensorrt}'}); serve it with "
          f"`tritonserver --model-repository={args.out}` (docs/scaling.md)")
    return 0


def export_repository(models: dict, out: Path, max_batch: int = 8, queue_delay_us: int = 1000,
                      tensorrt: str = "off") -> list[str]:
    """Export each EngineModel to `out`/<name>/1/model.onnx and write its config.pbtxt; returns the names."""
    from engines.export import export_onnx

    for name, model in models.items():
        onnx_path = export_onnx(model, out / name / "1" / "model.onnx")
        (out / name / "config.pbtxt").write_text(model_config(name, model, onnx_path, max_batch, queue_delay_us,
                                                              tensorrt))
    return list(models)


def onnx_signature(onnx_path: Path) -> tuple[list, list]:
    """(inputs, outputs) of an ONNX file as (name, Triton data type, full dims with -1 where symbolic)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph

    def describe(values) -> list:
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
            out.append((v.name, ONNX_TO_TRITON[t.elem_type], dims))
        return out

    initializers = {i.name for i in graph.initializer}
    return describe([i for i in graph.input if i.name not in initializers]), describe(graph.output)


def model_config(name: str, model, onnx_path: Path, max_batch: int, queue_delay_us: int, tensorrt: str) -> str:
    """config.pbtxt for one ONNX model: inputs and outputs as the file declares them, without the batch
    dimension (dimension 0, which every model here batches on), dynamic batching, and the shape limits of each
    input from the EngineModel's shape profile (TensorRT optimisation profiles, used when TensorRT is asked for)."""
    from tools import UsageError

    inputs, outputs = onnx_signature(onnx_path)
    for tensor, _, dims in inputs + outputs:
        if not dims or dims[0] != -1:
            raise UsageError(f"{name}: {tensor} has no dynamic batch dimension ({dims}); cannot batch it")

    def tensors(items: list) -> str:
        return ",\n".join(f'  {{ name: "{n}" data_type: {t} dims: [ {", ".join(str(d) for d in dims[1:])} ] }}'
                          for n, t, dims in items)

    lines = [f'name: "{name}"', 'backend: "onnxruntime"', f"max_batch_size: {max_batch}",
             f"input [\n{tensors(inputs)}\n]", f"output [\n{tensors(outputs)}\n]",
             f"dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}",
             "instance_group [ { count: 1 kind: KIND_AUTO } ]"]
    profile = getattr(model, "shape_profile", {}) or {}
    limits = {}
    for key, index in (("trt_profile_min_shapes", 0), ("trt_profile_opt_shapes", 1), ("trt_profile_max_shapes", 2)):
        shapes = []
        for n, _, _dims in inputs:
            if n in profile:
                shape = list(profile[n][index])
                shape[0] = (1, min(max(shape[0], 1), max_batch), max_batch)[index]
                shapes.append(f"{n}:{'x'.join(str(s) for s in shape)}")
        limits[key] = ",".join(shapes)
    # The shape limits, for anyone reading the repository, and for TensorRT's profiles below.
    lines.append("parameters [\n" + ",\n".join(
        f'  {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in limits.items() if v) + "\n]"
        if any(limits.values()) else "")
    if tensorrt != "off":
        params = [("precision_mode", tensorrt.upper()), ("max_workspace_size_bytes", str(1 << 30)),
                  *((k, v) for k, v in limits.items() if v)]
        accel = " ".join(f'parameters {{ key: "{k}" value: "{v}" }}' for k, v in params)
        lines.append(f'optimization {{ execution_accelerators {{ gpu_execution_accelerator: [ {{ name: "tensorrt" '
                     f'{accel} }} ] }} }}')
    return "\n".join(line for line in lines if line) + "\n"
