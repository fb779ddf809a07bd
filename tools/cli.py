"""`mcihn`: offline commands (train, eval, baseline, extract, extract-text, build, bench, bench-models, compare,
ablate, finetune-text, download, demo).
Expected faults print one line and exit 2."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from tools import (
    UsageError,
    ablate,
    bench,
    bench_models,
    build,
    compare,
    download,
    export_triton,
    extract,
    extract_text,
    finetune,
    serve,
)

EXAMPLES = """examples:
  mcihn train --data ../shared/data/cmu-mosi/mosi_utterance_features.npz --out runs/mosi --seeds 5
  mcihn eval --checkpoint runs/mosi --data ../shared/data/cmu-mosi/mosi_utterance_features.npz --json
  mcihn baseline --data ../shared/data/cmu-mosi/mosi_utterance_features.npz
  mcihn train --data MOSI/Processed/unaligned_50.pkl --allow-pickle --out runs/mmsa   # runs pickle code!
  mcihn train --model mcn-cl --data runs/meld-features --out runs/meld-mcn-cl --seeds 5
  mcihn train --model mcn-cl --target acc7 --data ../shared/data/cmu-mosi/mosi_utterance_features.npz --out runs/mosi7
  mcihn demo
"""

# Settings for features with one vector per utterance (sequence length 1): a smaller latent code, since
# there is no temporal structure to spread over 32 positions; see docs/model.md and docs/results.md.
UTTERANCE_PRESET = {"latent_len": 4, "latent_dim": 128, "num_heads": 4}
# A small model for shipping (~0.35M parameters, < 2 MB as safetensors): the starter's text emotion expert.
SMALL_PRESET = {"latent_len": 8, "latent_dim": 64, "num_heads": 4}
PRESETS = {"paper": {}, "utterance": UTTERANCE_PRESET, "small": SMALL_PRESET}
# MCN-CL's: the paper gives no sizes, so "paper" and "utterance" are MCNCLConfig's defaults (already small:
# d_model 128, ~1.2 M parameters); "small" halves d_model for shipping.
MCN_CL_PRESETS = {"paper": {}, "utterance": {}, "small": {"d_model": 64, "num_heads": 4, "projection_dim": 32}}
# --model -> the name tables and summaries give it.
MODEL_NAMES = {"mcihn": "MCIHN", "mcn-cl": "MCN-CL"}


def _add_data_args(p: argparse.ArgumentParser, several: bool = False) -> None:
    """--data, --format, --allow-pickle, --target; `several`: --data and --target take comma lists (the columns
    of `mcihn compare`'s table), each item checked when the data is loaded."""
    p.add_argument("--data", required=True,
                   help="dataset: a .npz (CMU-MOSI utterance), an MMSA .pkl, or a feature store"
                        + ("; a comma list gives one column per dataset" if several else ""))
    p.add_argument("--format", default="auto", help="auto | mosi-npz | mmsa-pickle | store")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow loading MMSA pickles (unpickling runs code from the file: only for files you trust)")
    p.add_argument("--target", default=None, choices=None if several else ("acc2-non0", "acc2-has0", "acc7"),
                   help="MOSI-family sentiment as classes: acc2-non0 (negative/positive, label-0 samples dropped), "
                        "acc2-has0 (negative/non-negative), acc7 (round(clip(y, -3, 3))); needed by --model mcn-cl "
                        "on CMU-MOSI/MOSEI. eval takes a checkpoint's own target when not given"
                        + ("; a comma list gives one column per target" if several else ""))


def _add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="mcihn", choices=list(MODEL_NAMES),
                   help="the fusion model: mcihn (default) | mcn-cl (classification data only; docs/mcn_cl.md)")


def build_parser() -> argparse.ArgumentParser:
    from mcihn.config import ABLATIONS
    from mcihn.mcn_cl import ABLATIONS as MCN_CL_ABLATIONS

    ablations = list(ABLATIONS) + [a for a in MCN_CL_ABLATIONS if a not in ABLATIONS]
    parser = argparse.ArgumentParser(prog="mcihn", description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train MCIHN or MCN-CL (one or more seeds)", epilog=EXAMPLES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_data_args(train)
    _add_model_arg(train)
    train.add_argument("--out", default="runs/mcihn", help="run folder (resumed if it exists)")
    train.add_argument("--seeds", type=int, default=1, help="number of seeds (0..N-1); reports mean and std")
    train.add_argument("--ablation", default="full", choices=ablations,
                       help="MCIHN: " + " | ".join(ABLATIONS) + " (literal-eq12-14: the paper's literal eqs. 12-14 "
                            "and 19, docs/model.md); MCN-CL: " + " | ".join(MCN_CL_ABLATIONS))
    train.add_argument("--epochs", type=int, default=30)
    train.add_argument("--patience", type=int, default=5)
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--preset", default="auto", choices=("auto", *PRESETS),
                       help="auto | paper | utterance | small (auto: utterance when all T=1, else paper)")
    train.add_argument("--dropout", type=float, default=None,
                       help="model dropout (default: the model config's, MCIHN 0.5, MCN-CL 0.3)")
    train.add_argument("--class-weights", default="none", choices=("none", "balanced"),
                       help="classification: none | balanced (cross-entropy weighted by inverse class frequency)")
    train.add_argument("--fresh", action="store_true", help="ignore an existing run folder's state")
    train.add_argument("--json", action="store_true", help="print the summary as JSON")

    ev = sub.add_parser("eval", help="evaluate a checkpoint or a run folder")
    _add_data_args(ev)
    ev.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run folder of several seeds")
    ev.add_argument("--split", default="test")
    ev.add_argument("--json", action="store_true")

    base = sub.add_parser("baseline", help="ridge or logistic-regression early-fusion baseline on the same split")
    _add_data_args(base)
    base.add_argument("--model", default="ridge", help="ridge | logreg (multinomial logistic regression, classes)")
    base.add_argument("--json", action="store_true")

    extract.add_parser(sub)
    extract_text.add_parser(sub)
    bench.add_parser(sub)
    bench_models.add_parser(sub)
    build.add_parser(sub)
    download.add_parser(sub)
    compare.add_parser(sub)
    ablate.add_parser(sub)
    finetune.add_parser(sub)
    serve.add_parser(sub)
    export_triton.add_parser(sub)

    demo = sub.add_parser("demo", help="train MCIHN (5 seeds) and the ridge baseline on CMU-MOSI, print both")
    demo.add_argument("--data", default="../shared/data/cmu-mosi/mosi_utterance_features.npz")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--seeds", type=int, default=5)
    return parser


def _load(args, target: str | None = None):
    """The dataset of --data, its sentiment binned into classes when --target (or `target`) says so."""
    from mcihn.data import load_dataset, sentiment_classes

    data = load_dataset(args.data, args.format, allow_pickle=args.allow_pickle)
    target = getattr(args, "target", None) or target
    return sentiment_classes(data, target) if target else data


def _model_config(data, ablation: str, preset: str, dropout: float | None = None, model: str = "mcihn"):
    from mcihn.config import ABLATIONS, MCIHNConfig
    from mcihn.mcn_cl import ABLATIONS as MCN_CL_ABLATIONS
    from mcihn.mcn_cl import MCNCLConfig
    from mcihn.spec import MODALITIES
    from mcihn.train import config_for_data

    if model not in MODEL_NAMES:
        raise UsageError(f"unknown --model {model!r}; use {' or '.join(MODEL_NAMES)}")
    config_class, ablations, presets = ((MCNCLConfig, MCN_CL_ABLATIONS, MCN_CL_PRESETS) if model == "mcn-cl"
                                        else (MCIHNConfig, ABLATIONS, PRESETS))
    if ablation not in ablations:  # argparse offers both models' names; each model has its own
        raise UsageError(f"--ablation {ablation} is not one of {MODEL_NAMES[model]}'s: {', '.join(ablations)}")
    if preset == "auto":
        preset = "utterance" if all(data.spec[m].seq_len == 1 for m in MODALITIES) else "paper"
    if preset not in presets:
        raise ValueError(f"unknown --preset {preset!r}; use auto, {', '.join(presets)}")
    overrides = dict(presets[preset]) | ({} if dropout is None else {"dropout": dropout})
    return config_for_data(data, config_class.for_ablation(ablation), **overrides)


def train_seeds(data, out: Path, seeds: int, ablation: str = "full", preset: str = "auto", epochs: int = 30,
                patience: int = 5, batch_size: int = 32, lr: float = 1e-3, fresh: bool = False,
                dropout: float | None = None, class_weights: str = "none", model: str = "mcihn") -> dict:
    """Train `seeds` models of `model` ("mcihn" or "mcn-cl"); each seed's best checkpoint goes to out/seed_K.
    Returns the summary."""
    from mcihn.metrics import aggregate
    from mcihn.train import TrainConfig, Trainer, evaluate

    cfg = _model_config(data, ablation, preset, dropout, model)
    key = "F1 (weighted)" if data.task == "classification" else "MAE"
    if fresh and out.exists():
        shutil.rmtree(out)
    runs = []
    for seed in range(seeds):
        seed_dir = out / f"seed_{seed}"
        trainer = Trainer(data, cfg, TrainConfig(seed=seed, epochs=epochs, patience=patience, batch_size=batch_size,
                                                 lr=lr, class_weights=class_weights), seed_dir / "state")
        trained = trainer.fit(resume=True)
        metrics = {s: evaluate(trained, data, s) for s in ("valid", "test")}
        trainer.save(seed_dir, metrics)
        runs.append({"seed": seed, "best_epoch": trainer.best_epoch, "seconds": trainer.train_seconds, **metrics})
        print(f"seed {seed}: best epoch {trainer.best_epoch}, test {key} {metrics['test'][key]:.3f}, "
              f"{runs[-1]['seconds']:.0f} s", file=sys.stderr)
    summary = {"model_type": model, "ablation": ablation, "dataset": data.name, "model": cfg.to_dict(), "runs": runs,
               "test": {k: list(v) for k, v in aggregate([r["test"] for r in runs]).items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _keys(data):
    from mcihn.metrics import METRIC_KEYS

    return METRIC_KEYS["classification" if data.task == "classification" else data.metric_family]


def cmd_train(args) -> int:
    from mcihn.metrics import format_table

    data = _load(args)
    summary = train_seeds(data, Path(args.out), args.seeds, args.ablation, args.preset, args.epochs, args.patience,
                          args.batch_size, args.lr, args.fresh, args.dropout, args.class_weights, args.model)
    if args.json:
        print(json.dumps(summary["test"], indent=2))
    else:
        row = {k: tuple(v) for k, v in summary["test"].items()}
        title = f"{MODEL_NAMES[args.model]} {args.ablation} ({args.seeds} seeds, test)"
        print(format_table({title: row}, _keys(data)))
    return 0


def cmd_eval(args) -> int:
    from mcihn.checkpoint import load_checkpoint, model_type_of
    from mcihn.metrics import aggregate, format_table
    from mcihn.train import evaluate

    root = Path(args.checkpoint)
    folders = sorted(p for p in root.glob("seed_*") if (p / "config.json").exists()) or [root]
    checkpoints = [load_checkpoint(folder) for folder in folders]  # each builds its own model class
    # A checkpoint trained on sentiment classes (--target) is evaluated on the same classes.
    data = _load(args, checkpoints[0].metadata.get("target"))
    results = []
    for ckpt in checkpoints:
        ckpt.check_features(data.spec, what=f"dataset {args.data}", structural_only=True)
        _check_head(ckpt, data, args.data)
        results.append(evaluate(ckpt.model, data, args.split))
    agg = aggregate(results)
    names = sorted({MODEL_NAMES[model_type_of(c.model)] for c in checkpoints})
    if args.json:
        print(json.dumps({"split": args.split, "checkpoints": [str(f) for f in folders], "models": names,
                          "runs": results, "mean_std": {k: list(v) for k, v in agg.items()}}, indent=2))
    else:
        title = f"{'/'.join(names)} {root.name} ({len(results)} ckpt, {args.split})"
        print(format_table({title: agg}, _keys(data)))
    return 0


def _check_head(ckpt, data, where: str) -> None:
    """A classifier cannot be scored on regression data (or the other way round), nor on another number of
    classes. Names may differ (scores are by class index)."""
    head, labels = ckpt.config.head, list(ckpt.config.labels)
    if head != data.task or (head == "classification" and len(labels) != len(data.label_names or [])):
        wanted = f"classes {labels}" if head == "classification" else "regression values"
        found = f"classes {data.label_names}" if data.task == "classification" else "regression values"
        raise UsageError(f"{ckpt.path} predicts {wanted} but {where} has {found}; pass the --target it was "
                         f"trained with, or another checkpoint")


def cmd_baseline(args) -> int:
    from mcihn.baseline import run_baseline
    from mcihn.metrics import format_table

    data = _load(args)
    metrics = run_baseline(data, args.model)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(format_table({f"{args.model} ({s})": m for s, m in metrics.items()}, _keys(data)))
    return 0


def cmd_demo(args) -> int:
    from mcihn.baseline import run_baseline
    from mcihn.data import load_dataset
    from mcihn.metrics import format_table

    data = load_dataset(args.data)
    start = time.perf_counter()
    summary = train_seeds(data, Path(args.out), args.seeds)
    elapsed = time.perf_counter() - start
    baseline = run_baseline(data)["test"]
    mcihn_row = {k: tuple(v) for k, v in summary["test"].items()}
    rows = {f"MCIHN ({args.seeds} seeds)": mcihn_row, "ridge baseline": baseline}
    print(f"CMU-MOSI test split ({len(data['test'])} utterances); MCIHN trained in {elapsed:.0f} s; "
          f"checkpoints in {args.out}/seed_*")
    print(format_table(rows, _keys(data)))
    return 0


# The faults a user can meet (bad arguments or data, damaged checkpoints, models not cached, missing packages or
# hardware), by the module that defines them: one `mcihn CMD: error:` line and exit 2. Any other exception is
# a bug and keeps its traceback (exit 1). Looked up among the modules already imported (only those can have
# raised), so a command does not import torch or the live pipeline just to name their errors.
EXPECTED_ERRORS = {
    "mcihn.data": ("DataError",), "mcihn.checkpoint": ("CheckpointError",), "mcihn.spec": ("SpecMismatchError",),
    "engines.hub": ("ModelNotAvailableError",), "engines.backends": ("BackendUnavailableError",),
    "engines.media": ("MediaError",), "engines.face": ("FaceModelsMissingError",),
    "engines.export": ("ExportError",), "tools.download": ("DownloadError",), "tools.extract": ("ExtractError",),
    "tools": ("UsageError",),
    "realtime.recognizer": ("ConfigError",), "realtime.config": ("ConfigError",),
    "realtime.sources": ("SourceError",), "realtime.sinks": ("SinkError",),
}


def expected_errors() -> tuple[type[BaseException], ...]:
    found = [getattr(sys.modules[module], name) for module, names in EXPECTED_ERRORS.items()
             if module in sys.modules for name in names]
    return (*found, FileNotFoundError)  # a --data, --labels or --root path that does not exist


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"train": cmd_train, "eval": cmd_eval, "baseline": cmd_baseline, "demo": cmd_demo,
                "extract-text": extract_text.run, "bench-models": bench_models.run,
                "build": build.run, "download": download.run, "extract": extract.run, "bench": bench.run,
                "compare": compare.run, "ablate": ablate.run,
                "finetune-text": finetune.run, "serve": serve.run, "export-triton": export_triton.run}
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        print(f"mcihn {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as err:
        if not isinstance(err, expected_errors()):
            raise  # a bug: its traceback, exit 1
        print(f"mcihn {args.command}: error: {str(err).splitlines()[0] if str(err) else type(err).__name__}",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    sys.exit(main())
