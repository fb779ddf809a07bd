"""Metrics pinned by small hand-computed cases (the working is in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mcihn.metrics import (
    LOWER_IS_BETTER,
    METRIC_KEYS,
    aggregate,
    classification_metrics,
    compute_metrics,
    format_table,
    mosi_regression_metrics,
    sims_regression_metrics,
    weighted_f1,
)

# MOSI case: 2.5 and -0.5 round half to even (2, -0); label 0 at index 1 makes non0 and has0 differ.
MOSI_PREDS = [2.5, -0.5, 4.0, -2.6, 0.2, 1.4]
MOSI_LABELS = [2.0, 0.0, 2.4, -3.0, -0.4, 1.6]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_mosi_regression_hand_case(dtype: type) -> None:
    m = mosi_regression_metrics(np.array(MOSI_PREDS, dtype=dtype), np.array(MOSI_LABELS, dtype=dtype))
    assert list(m) == METRIC_KEYS["mosi"]
    # Acc-7, clip [-3, 3] then round: preds [2, -0, 3, -3, 0, 1], labels [2, 0, 2, -3, -0, 2] -> 4/6.
    # (Round-half-away would turn 2.5 into 3 and -0.5 into -1: 2/6.)
    assert m["Acc-7"] == pytest.approx(4 / 6)
    # Acc-5, clip [-2, 2]: preds [2, -0, 2, -2, 0, 1], labels [2, 0, 2, -2, -0, 2] -> 5/6.
    assert m["Acc-5"] == pytest.approx(5 / 6)
    # has0 (>= 0): truth [T T T F F T], pred [T F T F T T] -> 4/6.
    assert m["Acc-2 (has0)"] == pytest.approx(4 / 6)
    # F1: class T (support 4) tp 3 fp 1 fn 1 -> 6/8; class F (support 2) tp 1 fp 1 fn 1 -> 2/4.
    # weighted = (4 * 0.75 + 2 * 0.5) / 6 = 2/3.
    assert m["F1 (has0)"] == pytest.approx(2 / 3)
    # non0 drops index 1 (label 0): truth [T T F F T], pred [T T F T T] -> 4/5.
    assert m["Acc-2 (non0)"] == pytest.approx(4 / 5)
    # F1: class T (support 3) tp 3 fp 1 fn 0 -> 6/7; class F (support 2) tp 1 fp 0 fn 1 -> 2/3.
    # weighted = (3 * 6/7 + 2 * 2/3) / 5 = 82/105.
    assert m["F1 (non0)"] == pytest.approx(82 / 105)
    # MAE on unclipped values: (0.5 + 0.5 + 1.6 + 0.4 + 0.6 + 0.2) / 6 = 3.8 / 6.
    assert m["MAE"] == pytest.approx(3.8 / 6, abs=1e-6)
    assert m["Corr"] == pytest.approx(np.corrcoef(MOSI_PREDS, MOSI_LABELS)[0, 1], abs=1e-6)


def test_mosi_mae_and_corr_use_unclipped_values() -> None:
    # preds = 2 * labels + 1 exactly, far outside [-3, 3]: r = 1, MAE = mean(|labels + 1|) = (6 + 2 + 10) / 3.
    labels = np.array([5.0, 1.0, 9.0])
    m = mosi_regression_metrics(2 * labels + 1, labels)
    assert m["Corr"] == pytest.approx(1.0)
    assert m["MAE"] == pytest.approx(6.0)
    # Clipped: preds [3, 3, 3] vs labels [3, 1, 3] for Acc-7 -> 2/3; [2, 2, 2] vs [2, 1, 2] for Acc-5 -> 2/3.
    assert m["Acc-7"] == pytest.approx(2 / 3)
    assert m["Acc-5"] == pytest.approx(2 / 3)


def test_mosi_all_zero_labels_gives_nan_non0() -> None:
    m = mosi_regression_metrics(np.array([0.5, -0.5]), np.zeros(2))
    assert math.isnan(m["Acc-2 (non0)"]) and math.isnan(m["F1 (non0)"])
    # has0: truth [T T], pred [T F] -> 1/2; F1: class T (support 2) 2/3, class F (support 0) -> weighted 2/3.
    assert m["Acc-2 (has0)"] == 0.5
    assert m["F1 (has0)"] == pytest.approx(2 / 3)


# SIMS case: labels sit exactly on the bin edges 0.1, -0.1, -0.7, 0.7 (stored as float32, as in the dataset),
# and 1.4 is clipped to 1.0.
SIMS_LABELS = [0.1, -0.1, -0.7, 0.7, 0.0, 1.4]
SIMS_PREDS = [0.15, -0.05, -0.75, 0.75, 0.05, 0.9]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sims_regression_hand_case(dtype: type) -> None:
    m = sims_regression_metrics(np.array(SIMS_PREDS, dtype=dtype), np.array(SIMS_LABELS, dtype=dtype))
    assert list(m) == METRIC_KEYS["sims"]
    # Acc-2, bins (-1.01, 0], (0, 1.01]: labels [1 0 0 1 0 1], preds [1 0 0 1 1 1] -> 5/6.
    assert m["Acc-2"] == pytest.approx(5 / 6)
    # Acc-3, edges -0.1, 0.1 (right-closed): labels 0.1 -> 1, -0.1 -> 0: [1 0 0 2 1 2];
    # preds [2 1 0 2 1 2] -> 4/6.
    assert m["Acc-3"] == pytest.approx(4 / 6)
    # Acc-5, edges -0.7, -0.1, 0.1, 0.7: labels [2 1 0 3 2 4]; preds [3 2 0 4 2 4] -> 3/6.
    assert m["Acc-5"] == pytest.approx(3 / 6)
    # F1 on the Acc-2 classes: class 0 (support 3) tp 2 fp 0 fn 1 -> 4/5;
    # class 1 (support 3) tp 3 fp 1 fn 0 -> 6/7.
    # weighted = (4/5 + 6/7) / 2 = 29/35.
    assert m["F1"] == pytest.approx(29 / 35)
    # MAE on clipped values: 5 * 0.05 + |0.9 - 1.0| = 0.35, / 6 (unclipped would add 0.4 more).
    assert m["MAE"] == pytest.approx(0.35 / 6, abs=1e-6)
    clipped = np.clip(np.array(SIMS_LABELS), -1, 1)
    assert m["Corr"] == pytest.approx(np.corrcoef(SIMS_PREDS, clipped)[0, 1], abs=1e-6)


def test_weighted_f1_unbalanced_with_class_only_in_preds() -> None:
    y_true = np.array([0, 0, 0, 0, 1, 1])
    y_pred = np.array([0, 0, 2, 1, 1, 0])
    # class 0 (support 4): tp 2, fp 1, fn 2 -> 4/7; class 1 (support 2): tp 1, fp 1, fn 1 -> 1/2;
    # class 2 (support 0, only predicted): F1 0, weight 0. weighted = (4 * 4/7 + 2 * 1/2) / 6 = 23/42.
    assert weighted_f1(y_true, y_pred) == pytest.approx(23 / 42)
    m = classification_metrics(y_pred, y_true, num_classes=3)
    assert list(m) == METRIC_KEYS["classification"]
    assert m["Acc"] == pytest.approx(3 / 6)
    assert m["F1 (weighted)"] == pytest.approx(23 / 42)
    # macro over the 3 seen classes: (4/7 + 1/2 + 0) / 3 = 5/14.
    assert m["F1 (macro)"] == pytest.approx(5 / 14)


def test_weighted_f1_class_never_predicted_counts_zero() -> None:
    # class 1 is never predicted: its F1 is 0 (zero_division -> 0). class 0: tp 2, fp 1, fn 0 -> 4/5.
    # weighted = (2 * 4/5 + 1 * 0) / 3 = 8/15.
    assert weighted_f1([0, 0, 1], [0, 0, 0]) == pytest.approx(8 / 15)


def test_constant_prediction_corr_is_zero() -> None:
    assert mosi_regression_metrics(np.ones(4), np.array([1.0, -1.0, 2.0, 0.5]))["Corr"] == 0.0
    assert sims_regression_metrics(np.full(3, 0.3), np.array([0.1, 0.5, -0.2]))["Corr"] == 0.0


def test_compute_metrics_dispatch() -> None:
    assert list(compute_metrics("regression", "mosi", MOSI_PREDS, MOSI_LABELS)) == METRIC_KEYS["mosi"]
    assert list(compute_metrics("regression", "sims", SIMS_PREDS, SIMS_LABELS)) == METRIC_KEYS["sims"]
    m = compute_metrics("classification", "mosi", np.array([0, 1]), np.array([0, 1]), num_classes=2)
    assert m == {"Acc": 1.0, "F1 (weighted)": 1.0, "F1 (macro)": 1.0}
    # (N, 1) column vectors, as a model's regression head returns, are accepted.
    col = compute_metrics("regression", "mosi", np.array(MOSI_PREDS)[:, None], np.array(MOSI_LABELS)[:, None])
    assert col["Acc-7"] == pytest.approx(4 / 6)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("regression", "mosi", [], []), "empty"),
        (("regression", "mosi", [1.0, 2.0], [1.0]), "must match"),
        (("regression", "sims", [np.nan, 0.1], [0.0, 0.1]), "NaN"),
        (("regression", "iemocap", [0.1], [0.1]), "unknown metric family"),
        (("ranking", "mosi", [0.1], [0.1]), "unknown task"),
        (("classification", "", np.zeros((2, 3)), [0, 1]), "argmax"),
        (("classification", "", [0, 3], [0, 1], 3), "outside"),
    ],
)
def test_compute_metrics_rejects_bad_input(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compute_metrics(*args)


def test_aggregate_sample_std() -> None:
    out = aggregate([{"MAE": 1.0, "Corr": 0.5}, {"MAE": 3.0, "Corr": 0.5}])
    # MAE: mean 2, sample std sqrt(((1-2)^2 + (3-2)^2) / (2-1)) = sqrt(2).
    assert out["MAE"] == pytest.approx((2.0, math.sqrt(2)))
    assert out["Corr"] == (0.5, 0.0)
    assert aggregate([{"Acc": 0.7}]) == {"Acc": (0.7, 0.0)}
    with pytest.raises(ValueError):
        aggregate([])
    with pytest.raises(ValueError, match="run 1"):
        aggregate([{"Acc": 0.7}, {"F1": 0.7}])


def test_format_table() -> None:
    rows = {"ridge": {"Acc": (0.8123, 0.0104), "MAE": 0.5}, "mcihn-long-name": {"Acc": 0.9}}
    expected = "\n".join(
        [
            "model                      Acc    MAE",
            "---------------  -------------  -----",
            "ridge            0.812 ± 0.010  0.500",
            "mcihn-long-name          0.900      -",
        ]
    )
    assert format_table(rows) == expected
    # Explicit keys choose and order the columns.
    assert format_table(rows, keys=["MAE"]).splitlines()[2] == "ridge            0.500"


def test_metric_keys_lower_is_better() -> None:
    assert LOWER_IS_BETTER == {"MAE"}
    assert all("MAE" in METRIC_KEYS[f] for f in ("mosi", "sims"))
