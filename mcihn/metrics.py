"""Evaluation metrics, identical to the MMSA toolkit's (thuiar/MMSA, `utils/metricsTop.py`).

Three families:

* "mosi" (CMU-MOSI / CMU-MOSEI regression on [-3, 3]): binary accuracy and weighted F1 with and without
  the neutral (label == 0) samples, 5- and 7-class accuracy of rounded clipped values, MAE, Pearson r.
* "sims" (CH-SIMS regression on [-1, 1]): 2/3/5-class accuracy of binned values, weighted F1, MAE, r.
* "classification" (e.g. MELD): accuracy, weighted and macro F1 of predicted class indices.

Values are returned unrounded (MMSA rounds the MOSI family to 4 decimals; `format_table` rounds for display).
F1 scores follow scikit-learn's `f1_score` (classes = union of those seen in labels and predictions,
zero_division -> 0) without depending on scikit-learn.
"""

from __future__ import annotations

import numpy as np

METRIC_KEYS: dict[str, list[str]] = {
    "mosi": ["Acc-2 (has0)", "F1 (has0)", "Acc-2 (non0)", "F1 (non0)", "Acc-7", "Acc-5", "MAE", "Corr"],
    "sims": ["Acc-2", "Acc-3", "Acc-5", "F1", "MAE", "Corr"],
    "classification": ["Acc", "F1 (weighted)", "F1 (macro)"],
}
# Every other metric is higher-is-better.
LOWER_IS_BETTER: frozenset[str] = frozenset({"MAE"})

# CH-SIMS class edges; a value x is in class i when edges[i] < x <= edges[i + 1] (MMSA's loop).
SIMS_EDGES_2 = (-1.01, 0.0, 1.01)
SIMS_EDGES_3 = (-1.01, -0.1, 0.1, 1.01)
SIMS_EDGES_5 = (-1.01, -0.7, -0.1, 0.1, 0.7, 1.01)


def _check_inputs(preds: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flatten (N,) or (N, 1) inputs to (N,) and reject empty, mismatched or non-finite ones."""
    preds, labels = np.asarray(preds).reshape(-1), np.asarray(labels).reshape(-1)
    if preds.size == 0 or labels.size == 0:
        raise ValueError(
            f"cannot compute metrics on empty inputs ({preds.size} predictions, {labels.size} labels)"
        )
    if preds.size != labels.size:
        raise ValueError(f"got {preds.size} predictions for {labels.size} labels; they must match one to one")
    if np.issubdtype(preds.dtype, np.floating) and not np.all(np.isfinite(preds)):
        bad = int(np.sum(~np.isfinite(preds)))
        raise ValueError(f"{bad} of {preds.size} predictions are NaN or infinite; check the model's outputs")
    if np.issubdtype(labels.dtype, np.floating) and not np.all(np.isfinite(labels)):
        raise ValueError(f"{int(np.sum(~np.isfinite(labels)))} labels are NaN or infinite; check the dataset")
    return preds, labels


def _per_class_f1(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class F1 and support (count in y_true), over the sorted union of classes in both (K,), (K,)."""
    classes = np.union1d(y_true, y_pred)
    t = y_true[:, None] == classes[None, :]  # (N, K) one-hot of truth
    p = y_pred[:, None] == classes[None, :]  # (N, K) one-hot of prediction
    tp = np.sum(t & p, axis=0)
    denom = t.sum(axis=0) + p.sum(axis=0)  # 2tp + fp + fn
    # F1 = 2tp / (2tp + fp + fn); a class with no true and no predicted samples cannot occur here.
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return f1, t.sum(axis=0)


def weighted_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """sklearn `f1_score(y_true, y_pred, average="weighted")` for (N,) label arrays of any comparable dtype.

    Per-class F1 over the union of classes in y_true and y_pred, averaged with weights = support in y_true,
    so a class that only appears in predictions has weight 0 (it still costs the other classes precision).
    """
    y_true, y_pred = np.asarray(y_true).reshape(-1), np.asarray(y_pred).reshape(-1)
    if y_true.size == 0 or y_true.size != y_pred.size:
        raise ValueError(
            f"weighted_f1 needs two equal, non-empty arrays (got {y_true.size} and {y_pred.size})"
        )
    f1, support = _per_class_f1(y_true, y_pred)
    return float(np.sum(f1 * support) / np.sum(support))


def _macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """sklearn `f1_score(average="macro")`: unweighted mean over the classes seen in either array."""
    f1, _ = _per_class_f1(y_true, y_pred)
    return float(np.mean(f1))


def _accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(y_true == y_pred))


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """np.corrcoef(x, y)[0, 1], but 0.0 (not nan) when either side is constant or there is one sample."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


def mosi_regression_metrics(preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """MOSI/MOSEI metrics of (N,) sentiment predictions against (N,) labels in [-3, 3].

    MAE and Corr use the unclipped values. Acc-7 / Acc-5 compare np.round (half to even: 2.5 -> 2,
    -0.5 -> -0) of values clipped to [-3, 3] / [-2, 2]. "non0" drops samples whose label is exactly 0 and
    compares pred > 0 with label > 0; "has0" keeps all and compares >= 0. "Acc-2 (non0)" / "F1 (non0)" are
    nan when every label is 0. Corr is 0.0 when predictions or labels are constant (np.corrcoef gives nan).
    """
    preds, labels = _check_inputs(preds, labels)
    p, y = preds.astype(np.float64), labels.astype(np.float64)  # exact for float32 inputs
    out: dict[str, float] = {}
    nonzero = y != 0
    if nonzero.any():
        out["Acc-2 (non0)"] = _accuracy(y[nonzero] > 0, p[nonzero] > 0)
        out["F1 (non0)"] = weighted_f1(y[nonzero] > 0, p[nonzero] > 0)
    else:
        out["Acc-2 (non0)"] = out["F1 (non0)"] = float("nan")
    out["Acc-2 (has0)"] = _accuracy(y >= 0, p >= 0)
    out["F1 (has0)"] = weighted_f1(y >= 0, p >= 0)
    out["Acc-7"] = _accuracy(np.round(np.clip(y, -3.0, 3.0)), np.round(np.clip(p, -3.0, 3.0)))
    out["Acc-5"] = _accuracy(np.round(np.clip(y, -2.0, 2.0)), np.round(np.clip(p, -2.0, 2.0)))
    out["MAE"] = float(np.mean(np.abs(p - y)))
    out["Corr"] = _pearson(p, y)
    return {k: out[k] for k in METRIC_KEYS["mosi"]}


def _sims_bins(x: np.ndarray, edges: tuple[float, ...]) -> np.ndarray:
    """(N,) class index i with edges[i] < x <= edges[i + 1], for x already clipped to [-1, 1].

    Compared in float32, as MMSA does on float32 tensors: CH-SIMS labels are multiples of 0.1 stored as
    float32, and float32(0.1) > 0.1 in float64, so a float64 comparison would move them to the next bin.
    """
    x32 = x.astype(np.float32)
    edges32 = np.asarray(edges, dtype=np.float32)
    # side="left" counts edges strictly below x, i.e. the first edge >= x is the right end of x's bin.
    return np.searchsorted(edges32, x32, side="left") - 1


def sims_regression_metrics(preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """CH-SIMS metrics of (N,) predictions against (N,) labels, both clipped to [-1, 1] first.

    MAE and Corr are on the clipped values (as MMSA). Classes are left-open, right-closed bins:
    Acc-2 (-1.01, 0], (0, 1.01]; Acc-3 edges -0.1, 0.1; Acc-5 edges -0.7, -0.1, 0.1, 0.7.
    F1 is the weighted F1 of the Acc-2 classes. Corr is 0.0 when either side is constant.
    """
    preds, labels = _check_inputs(preds, labels)
    # Clip in the input dtype so float32 labels keep their float32 values for the bin comparisons.
    p, y = np.clip(preds, -1.0, 1.0), np.clip(labels, -1.0, 1.0)
    p2, y2 = _sims_bins(p, SIMS_EDGES_2), _sims_bins(y, SIMS_EDGES_2)
    return {
        "Acc-2": _accuracy(y2, p2),
        "Acc-3": _accuracy(_sims_bins(y, SIMS_EDGES_3), _sims_bins(p, SIMS_EDGES_3)),
        "Acc-5": _accuracy(_sims_bins(y, SIMS_EDGES_5), _sims_bins(p, SIMS_EDGES_5)),
        "F1": weighted_f1(y2, p2),
        "MAE": float(np.mean(np.abs(p.astype(np.float64) - y.astype(np.float64)))),
        "Corr": _pearson(p, y),
    }


def classification_metrics(
    pred_indices: np.ndarray, labels: np.ndarray, num_classes: int | None = None
) -> dict[str, float]:
    """Accuracy, weighted F1 and macro F1 of (N,) predicted class indices against (N,) integer labels.

    F1 averages run over the classes seen in labels or predictions (sklearn's default); `num_classes`
    (inferred as max index + 1 when None) only checks that every index is in range.
    """
    if np.ndim(pred_indices) > 1 and np.shape(pred_indices)[-1] > 1:
        raise ValueError("classification predictions must be (N,) class indices; take argmax over the logits")
    preds, labels = _check_inputs(pred_indices, labels)
    if np.any(preds != np.round(preds)):
        raise ValueError("classification predictions must be integer class indices, not scores")
    preds, labels = preds.astype(np.int64), labels.astype(np.int64)
    if num_classes is None:
        num_classes = int(max(preds.max(), labels.max())) + 1
    for name, arr in (("predictions", preds), ("labels", labels)):
        if arr.min() < 0 or arr.max() >= num_classes:
            raise ValueError(f"{name} contain class indices outside [0, {num_classes - 1}]")
    return {
        "Acc": _accuracy(labels, preds),
        "F1 (weighted)": weighted_f1(labels, preds),
        "F1 (macro)": _macro_f1(labels, preds),
    }


def compute_metrics(
    task: str, family: str, preds: np.ndarray, labels: np.ndarray, num_classes: int | None = None
) -> dict[str, float]:
    """Dispatch on task ("regression" / "classification") and, for regression, family ("mosi" / "sims").

    preds: (N,) regression values, or (N,) class indices for classification (family is then ignored).
    """
    if task == "classification":
        return classification_metrics(preds, labels, num_classes)
    if task != "regression":
        raise ValueError(f"unknown task {task!r}; expected 'regression' or 'classification'")
    if family == "mosi":
        return mosi_regression_metrics(preds, labels)
    if family == "sims":
        return sims_regression_metrics(preds, labels)
    raise ValueError(f"unknown metric family {family!r}; expected 'mosi' or 'sims'")


def aggregate(runs: list[dict[str, float]]) -> dict[str, tuple[float, float]]:
    """Mean and sample std (ddof=1; 0.0 for a single run) of each metric over runs (e.g. 5 seeds)."""
    if not runs:
        raise ValueError("aggregate needs at least one run")
    keys = list(runs[0])
    for i, run in enumerate(runs[1:], start=1):
        if set(run) != set(keys):
            raise ValueError(f"run {i} has metrics {sorted(run)} but run 0 has {sorted(keys)}")
    out: dict[str, tuple[float, float]] = {}
    for key in keys:
        values = np.array([run[key] for run in runs], dtype=np.float64)
        std = float(np.std(values, ddof=1)) if values.size > 1 else 0.0
        out[key] = (float(np.mean(values)), std)
    return out


def _format_value(value: float | tuple[float, float] | None, decimals: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, tuple):
        return f"{value[0]:.{decimals}f} ± {value[1]:.{decimals}f}"
    return f"{value:.{decimals}f}"


def format_table(
    rows: dict[str, dict[str, float | tuple[float, float]]], keys: list[str] | None = None, decimals: int = 3
) -> str:
    """A plain-text table: one row per model name, one column per metric ("-" where a row lacks it).

    Values print with `decimals` places (accuracies and F1 as fractions); a (mean, std) tuple prints as
    "0.812 ± 0.010". keys: column order; default is every key in first-seen order (METRIC_KEYS gives the
    conventional order per family).
    """
    if keys is None:
        keys = list(dict.fromkeys(k for metrics in rows.values() for k in metrics))
    header = ["model", *keys]
    body = [
        [name, *(_format_value(metrics.get(k), decimals) for k in keys)] for name, metrics in rows.items()
    ]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        # Model names left-aligned, numbers right-aligned so decimals line up.
        parts = [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in body)])
