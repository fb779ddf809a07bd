"""`mcihn ablate`: one model's ablations (N seeds each) on one data set, as one table.

Each variant is `mcihn train --ablation VARIANT --seeds N` into OUT/VARIANT (resumed when rerun: finished seeds
are not trained again), then one row per variant: the test metrics' mean ± std over the seeds, and the
difference of each variant's mean from the first variant's (normally the full model) in units of the two
rows' pooled std, so a reader sees at once which differences are larger than the seed noise. `--jobs 2` trains
two variants at a time, one CPU thread each.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np

EXAMPLE = """examples:
  mcihn ablate --data ../shared/data/cmu-mosi/mosi_utterance_features.npz --seeds 5 --out runs/mosi-ablation
  mcihn ablate --data ../shared/data/cmu-mosi/mosi_utterance_features.npz --variants full,MCIHN-1 --seeds 2 \\
      --out runs/quick
"""
MCIHN_VARIANTS = ("full", "-VT", "-VA", "-TA", "MCIHN-1", "MCIHN-2", "literal-eq12-14")


def add_parser(subparsers) -> None:
    from tools.cli import _add_data_args, _add_model_arg

    p = subparsers.add_parser("ablate", help="a model's ablations (N seeds each) on one data set, as one table",
                              epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_data_args(p)
    _add_model_arg(p)
    p.add_argument("--out", required=True, help="run folder: OUT/VARIANT/seed_K, ablation.json, ablation.md")
    p.add_argument("--variants", default=",".join(MCIHN_VARIANTS),
                   help="comma list of --ablation names, the first being the reference (default: MCIHN's)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--preset", default="auto", help="auto | paper | utterance | small")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--patience", type=int, default=5)
    p.add_argument("--jobs", type=int, default=1, help="variants trained at once, one CPU thread each (default 1)")


@dataclass(frozen=True)
class RowRun:
    """One table row's seeds: `model` with `ablation` on `data` (binned by `target`), trained into `out`."""

    model: str
    ablation: str
    out: Path
    data: str
    target: str | None = None


def train_rows(args: argparse.Namespace, rows: list[RowRun], jobs: int = 1, loaded: dict | None = None) -> list[dict]:
    """Each row's `args.seeds` seeds (train_seeds, resumed when rerun) with the optimisation settings of `args`;
    their summaries in row order. `jobs` > 1 trains that many rows at once, one CPU thread each, every worker
    loading its data itself; else `loaded` ((data, target) -> FeatureSet) spares loading a dataset twice.
    `mcihn ablate` and `mcihn compare` both train through here."""
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            futures = [pool.submit(_train_row, args, row, 1) for row in rows]
            return [f.result() for f in futures]
    loaded = {} if loaded is None else loaded
    return [_train_row(args, row, None, loaded) for row in rows]


def _train_row(args: argparse.Namespace, row: RowRun, threads: int | None, loaded: dict | None = None) -> dict:
    """One row's seeds; returns its summary. A worker process (--jobs > 1) loads the data itself."""
    from tools.cli import _load, train_seeds

    if threads:
        import torch

        torch.set_num_threads(threads)
    loaded = {} if loaded is None else loaded
    key = (row.data, row.target)
    if key not in loaded:
        loaded[key] = _load(argparse.Namespace(**(vars(args) | {"data": row.data, "target": row.target})))
    return train_seeds(loaded[key], row.out, args.seeds, row.ablation, args.preset, args.epochs, args.patience,
                       getattr(args, "batch_size", 32), getattr(args, "lr", 1e-3), False,
                       getattr(args, "dropout", None), getattr(args, "class_weights", "none"), row.model)


def run(args) -> int:
    from mcihn.metrics import LOWER_IS_BETTER
    from tools.cli import MODEL_NAMES, _keys, _load

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    data = _load(args)  # a bad --data or --target is said before any training
    keys = _keys(data)
    rows = [RowRun(args.model, v, Path(args.out) / v, args.data, args.target) for v in variants]
    summaries = dict(zip(variants, train_rows(args, rows, args.jobs, {(args.data, args.target): data}), strict=True))
    rows = {v: {k: [r["test"][k] for r in s["runs"]] for k in keys} for v, s in summaries.items()}
    reference = rows[variants[0]]
    result = {"data": args.data, "model": MODEL_NAMES[args.model], "seeds": args.seeds,
              "date": date.today().isoformat(),
              "command": "mcihn " + shlex.join(sys.argv[1:]), "keys": keys, "variants": variants,
              "rows": {v: {k: [float(np.mean(x)), float(np.std(x, ddof=1)) if len(x) > 1 else 0.0,
                               separation(x, reference[k])] for k, x in r.items()} for v, r in rows.items()},
              "lower_is_better": [k for k in keys if k in LOWER_IS_BETTER]}
    out = Path(args.out)
    (out / "ablation.json").write_text(json.dumps(result, indent=2) + "\n")
    table = format_markdown(result)
    (out / "ablation.md").write_text(table + "\n")
    print(table)
    return 0


def separation(values: list[float], reference: list[float]) -> float:
    """(mean - reference mean) / pooled std of the two: how many seed-noise units apart two rows are (0 when
    neither varies)."""
    a, b = np.asarray(values, float), np.asarray(reference, float)
    pooled = np.sqrt((np.var(a, ddof=1) + np.var(b, ddof=1)) / 2) if min(len(a), len(b)) > 1 else 0.0
    diff = float(a.mean() - b.mean())
    return 0.0 if pooled == 0 else diff / float(pooled)


def format_markdown(result: dict) -> str:
    """One row per variant, "mean ± std (+d.d)" per metric, d being the separation from the first row."""
    keys, first = result["keys"], result["variants"][0]
    lines = [f"| {result['model']} ({result['seeds']} seeds, test) | " + " | ".join(keys) + " |",
             "|---" * (len(keys) + 1) + "|"]
    for variant in result["variants"]:
        cells = []
        for k in keys:
            mean, std, sep = result["rows"][variant][k]
            cells.append(f"{mean:.3f} ± {std:.3f}" + ("" if variant == first else f" ({sep:+.1f})"))
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
