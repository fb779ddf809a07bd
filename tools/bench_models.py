"""`mcihn bench-models`: latency of each extractor's core and of the fusion model, per backend.

Stand-in models of the real architectures (random weights: right for timing, see engines/standins.py) are run
on fixed inputs: CLIP ViT-B/32 on 1 and 10 frames, BERT-base on 36 tokens, Wav2Vec2-base on a 2.56 s window,
MCIHN at the paper's sizes. Each (model, backend) pair is warmed up, then timed `--repeats` times; the table
gives the median and 90th percentile in ms and the ratio to the case's first backend in the same run. With
`--precision int8` (or fp16) each output's cosine to the fp32 torch output is reported too.

Two more cases, by name in `--models`: `whisper` times one pass of the real Whisper tiny.en (as the live ASR runs
it) on the bench clip's speech, encoding the buffer plus padding (the live default) and faster-whisper's whole
30 s window; `incremental-audio` streams the bench clip's audio through the Wav2Vec2 stand-in tick by tick
(`--incremental-audio`) and reports its time per tick and its cosine to the exact window. The whole live
pipeline is measured by `mcihn bench`; this isolates the neural cores.
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
  mcihn bench-models --backends onnxruntime --precision int8 --threads 1   # int8 on one core, cosine to fp32
  mcihn bench-models --models whisper,incremental-audio --threads 1        # the live ASR pass; streamed audio
"""


@dataclass
class Timing:
    model: str
    input: str
    backend: str
    median_ms: float
    p90_ms: float
    repeats: int
    ratio_to_torch: float | None = None  # the case's first backend's median / this one's (torch unless skipped)
    cosine: float | None = None  # to the fp32 torch output (int8, fp16), or to the exact window (streamed)
    note: str = ""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench-models", help="latency of the extractors and MCIHN per backend",
                              epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="base", choices=("tiny", "base"), help="stand-in model size")
    p.add_argument("--backends", default="torch,onnxruntime", help="comma list: torch, onnxruntime, tensorrt")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "int8"),
                   help="fp16 needs a GPU; int8 is onnxruntime's on the CPU (other backends are skipped)")
    p.add_argument("--cuda-graphs", action="store_true", help="torch backend: capture CUDA graphs (GPU)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch and onnxruntime (0: all)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--models", default="vision,text,audio,mcihn",
                   help="which cores to time: vision, text, audio, mcihn; and whisper, incremental-audio (see above)")
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
        first_median = None
        reference = None
        if args.precision != "fp32":
            reference = create_backend(em, "torch", device="cpu", precision="fp32").run(inputs)
        for kind in backends:
            if args.precision == "int8" and kind != "onnxruntime":
                print(f"  {model:7s} {kind}: skipped (int8 is onnxruntime's)", file=sys.stderr)
                continue
            if kind != "torch" and onnx_path is None:
                onnx_path = export_onnx(em, onnx_dir / f"{args.size}-{em.name}.onnx")
            backend = create_backend(em, kind, device=args.device, precision=args.precision,
                                     onnx_path=onnx_path, cuda_graphs=args.cuda_graphs,
                                     threads=args.threads or None, cache_dir=cache_dir / "engines")
            times = time_backend(backend.run, inputs, args.repeats, args.warmup)
            median = float(np.median(times))
            first_median = first_median or median
            results.append(Timing(model, description, f"{kind} {args.device} {args.precision}", median,
                                  float(np.percentile(times, 90)), args.repeats, first_median / median,
                                  None if reference is None else output_cosine(reference, backend.run(inputs))))
            print(f"  {model:7s} {description:22s} {kind:12s} median {median:8.1f} ms", file=sys.stderr)
    if "whisper" in models:
        results += time_whisper(cache_dir, args.threads or 1, args.repeats, args.warmup)
    if "incremental-audio" in models:
        results.append(streamed_audio(args.size, cache_dir))
    print(format_table(results))
    if args.json:
        meta = {"size": args.size, "device": args.device, "precision": args.precision,
                "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                "torch": torch.__version__}
        Path(args.json).write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=2))
    return 0


def output_cosine(reference: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> float:
    """Cosine between two runs' outputs, all outputs flattened into one vector."""
    a = np.concatenate([np.asarray(reference[k], np.float64).ravel() for k in sorted(reference)])
    b = np.concatenate([np.asarray(outputs[k], np.float64).ravel() for k in sorted(reference)])
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def bench_speech(cache_dir: Path) -> np.ndarray:
    """The bench clip's audio (16 kHz mono; nine espeak-ng sentences with pauses), built into the cache."""
    from realtime.file_source import media_items
    from tools.make_demo_clip import bench_clip

    return np.concatenate([d for _, kind, d in media_items(bench_clip(cache_dir)) if kind == "audio"])


def time_whisper(cache_dir: Path, threads: int, repeats: int, warmup: int) -> list[Timing]:
    """One live ASR pass of the real Whisper tiny.en over 2 s and 5 s of the bench clip's speech (the options of
    `StreamingTranscriber.process`), encoding the buffer plus padding vs faster-whisper's whole 30 s window."""
    from realtime.asr import MAX_TOKENS_PER_S, SAMPLE_RATE, AsrOptions, load_whisper

    speech = bench_speech(cache_dir)
    results = []
    for seconds in (2.0, 5.0):
        audio = speech[: int(seconds * SAMPLE_RATE)]
        first_median = None
        for short in (False, True):
            model = load_whisper(AsrOptions(threads=threads, short_window=short, nice=0))

            def run(_inputs, model=model, audio=audio, seconds=seconds):
                segments, _ = model.transcribe(audio, language="en", beam_size=1, word_timestamps=True,
                                               vad_filter=True, temperature=0.0, condition_on_previous_text=False,
                                               max_new_tokens=int(MAX_TOKENS_PER_S * seconds) + 16)
                return [w for s in segments for w in (s.words or ())]

            times = time_backend(run, {}, repeats, warmup)
            median = float(np.median(times))
            first_median = first_median or median
            words = " ".join(w.word.strip() for w in run({}))
            window = "buffer + padding" if short else "30 s window"
            results.append(Timing("whisper tiny.en", f"{seconds:g} s of speech", f"ctranslate2 cpu {window}", median,
                                  float(np.percentile(times, 90)), repeats, first_median / median,
                                  note=f"heard: {words}"))
            print(f"  whisper {seconds:g} s {window:18s} median {median:8.1f} ms", file=sys.stderr)
    return results


def streamed_audio(size: str, cache_dir: Path, hop_s: float = 0.25) -> Timing:
    """The bench clip's audio (plus faint noise: a microphone never gives digital silence) streamed through the
    Wav2Vec2 stand-in every `hop_s` (`AudioExtractor.extract_stream`, `--incremental-audio`) against the exact
    window: time per tick, and the per-window mean cosine over the frames (median; worst window and worst frame
    in the note)."""
    from engines.audio import SAMPLE_RATE, AudioExtractor
    from engines.standins import build_standins

    audio = AudioExtractor(str(build_standins(cache_dir / "standins", size)["audio"]))
    speech = bench_speech(cache_dir)
    x = speech + np.random.default_rng(0).normal(0, 1e-3, speech.shape).astype(np.float32)
    window, hop = audio.window_samples, int(hop_s * SAMPLE_RATE)
    out = np.zeros((audio.seq_len, audio.dim), np.float32)
    times, window_cos, worst_frame = [], [], 1.0
    for end in range(window, len(x), hop):
        start = time.perf_counter()
        got = audio.extract_stream(x[end - window: end], end, out)
        times.append((time.perf_counter() - start) * 1e3)
        f_last = (end - audio.receptive_field) // audio.hop  # the exact model on the same frame grid
        first = (f_last - got.length + 1) * audio.hop
        exact = audio.extract(x[first: f_last * audio.hop + audio.receptive_field], SAMPLE_RATE).values
        n = min(got.length, exact.shape[0])
        a, b = out[:n].astype(np.float64), exact[:n].astype(np.float64)
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
        window_cos.append(float(cos.mean()))
        worst_frame = min(worst_frame, float(cos.min()))
    ticks = np.asarray(times[1:])  # the first window is computed whole
    return Timing("audio", f"{len(window_cos)} ticks of {hop_s:g} s", "torch cpu streamed (incremental)",
                  float(np.median(ticks)), float(np.percentile(ticks, 90)), len(ticks), None,
                  float(np.median(window_cos)),
                  note=f"worst window {min(window_cos):.3f}, worst frame {worst_frame:.2f}")


def format_table(results: list[Timing]) -> str:
    extra = any(r.cosine is not None or r.note for r in results)
    header = "| model | input | backend | median ms | p90 ms | first / this |" + (" cosine | note |" if extra else "")
    rows = [f"| {r.model} | {r.input} | {r.backend} | {r.median_ms:.1f} | {r.p90_ms:.1f} | "
            f"{'' if r.ratio_to_torch is None else f'{r.ratio_to_torch:.2f}x'} |"
            + (f" {'' if r.cosine is None else f'{r.cosine:.4f}'} | {r.note} |" if extra else "") for r in results]
    return "\n".join([header, "|---" * (8 if extra else 6) + "|", *rows])
