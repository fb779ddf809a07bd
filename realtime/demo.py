"""The bundled demo clip, and the random stand-in models (`--standins tiny|base`) for tests and timing.

`mcihn-live --demo` replays realtime/assets/demo.mp4 (made by tools/make_demo_clip.py: real faces with espeak-ng
sentences of clearly different emotions) through the starter recognizer's real models (realtime/starter.py).
`--standins` swaps in random stand-ins of the paper's architectures (engines/standins.py,
engines/whisper_standin.py) and an untrained MCIHN: every event is then marked untrained and its scores mean
nothing. They exercise the machinery (capture, windows, ASR, fusion, events, outputs) where real weights of
CLIP, BERT and Wav2Vec2 cannot be had, and time it at the paper's sizes (`mcihn bench --size base`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEMO_CLIP = Path(__file__).resolve().parent / "assets" / "demo.mp4"
DEMO_LABELS = ["neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"]  # MELD's seven emotions


@dataclass
class DemoAssets:
    checkpoint: Path
    whisper: Path
    models: dict[str, Path]


# Raised when the extractors' defaults change what a demo checkpoint records, so that a cached one is rebuilt:
# 2 = BlazeFace face crop (format 1 checkpoints recorded Haar, and runs with them kept timing the Haar detector).
DEMO_FORMAT = 2


def _demo_format(checkpoint: Path) -> int:
    import json

    try:
        return int(json.loads((checkpoint / "config.json").read_text()).get("metadata", {}).get("demo_format", 1))
    except (OSError, ValueError, AttributeError):
        return 0


def prepare_demo(folder: str | Path, size: str = "tiny") -> DemoAssets:
    """Build (once; reused after) stand-in extractors, a stand-in Whisper and an untrained MCIHN checkpoint.

    size "tiny": tiny models (the demo, tests). "base": the paper's architectures and MCIHN sizes with random
    weights (timing: `mcihn bench --size base`)."""
    import torch

    from engines.extractors import ExtractorOptions, build_extractors, extractors_spec
    from engines.standins import build_standins
    from engines.whisper_standin import build_tiny_whisper
    from mcihn.checkpoint import save_checkpoint
    from mcihn.config import MCIHNConfig
    from mcihn.model import MCIHN
    from mcihn.spec import MODALITIES

    folder = Path(folder)
    models = build_standins(folder / "models", size)
    whisper = build_tiny_whisper(folder / "whisper", size=size)
    checkpoint = folder / "checkpoint"
    if not (checkpoint / "config.json").is_file() or _demo_format(checkpoint) != DEMO_FORMAT:
        options = ExtractorOptions(**{m: str(models[m]) for m in MODALITIES}, face_crop=True)
        spec = extractors_spec(build_extractors(options))
        sizes = {"latent_len": 8, "latent_dim": 32, "num_heads": 2} if size == "tiny" else {}  # base: the paper's
        config = MCIHNConfig(input_dims={m: spec[m].dim for m in MODALITIES},
                             seq_lens={m: spec[m].seq_len for m in MODALITIES},
                             head="classification", labels=DEMO_LABELS, **sizes)
        torch.manual_seed(0)
        save_checkpoint(checkpoint, MCIHN(config).eval(), spec,
                        {"untrained": True, "note": "random weights for the demo: the scores mean nothing",
                         "demo_format": DEMO_FORMAT})
    return DemoAssets(checkpoint, whisper, models)
