"""The ridge early-fusion baseline on small synthetic feature sets."""

from __future__ import annotations

import numpy as np
import pytest

from mcihn.baseline import DEFAULT_ALPHAS, RidgeBaseline, early_fusion_features, run_baseline
from mcihn.data import FeatureSet, FeatureSplit, spec_from_split
from mcihn.metrics import METRIC_KEYS, compute_metrics
from mcihn.spec import MODALITIES

SHAPES = {"vision": (4, 3), "text": (5, 4), "audio": (3, 2)}  # modality -> (T, D)


def random_split(rng: np.random.Generator, n: int, labels: np.ndarray | None = None) -> FeatureSplit:
    """Random features with random lengths (some 0 = absent) and garbage in the padding."""
    features, lengths = {}, {}
    for m, (t, d) in SHAPES.items():
        features[m] = rng.normal(size=(n, t, d)).astype(np.float32)
        lengths[m] = rng.integers(0, t + 1, size=n).astype(np.int64)
    labels = np.zeros(n, dtype=np.float32) if labels is None else labels
    return FeatureSplit(features=features, lengths=lengths, labels=labels, ids=[str(i) for i in range(n)])


def manual_pool(split: FeatureSplit) -> np.ndarray:
    """Reference pooling, one sample at a time: mean over the first lengths[m] steps, zeros if absent."""
    rows = []
    for i in range(len(split)):
        parts = []
        for m in MODALITIES:
            n_valid = split.lengths[m][i]
            x = split.features[m][i, :n_valid]
            parts.append(x.mean(axis=0) if n_valid else np.zeros(x.shape[1]))
        rows.append(np.concatenate(parts))
    return np.array(rows)


def linear_feature_set(seed: int = 0, noise: float = 0.05) -> tuple[FeatureSet, np.ndarray]:
    """A regression set whose labels are a known linear function of the pooled features plus noise."""
    rng = np.random.default_rng(seed)
    n_features = sum(d for _, d in SHAPES.values())
    w = rng.normal(size=n_features)
    splits = {}
    for name, n in (("train", 400), ("valid", 100), ("test", 100)):
        split = random_split(rng, n)
        split.labels = (manual_pool(split) @ w + 0.3 + noise * rng.normal(size=n)).astype(np.float32)
        splits[name] = split
    return FeatureSet(name="synthetic", splits=splits, spec=spec_from_split(splits["train"])), w


def test_early_fusion_features_pool_valid_steps_only() -> None:
    split = random_split(np.random.default_rng(1), 20)
    fused = early_fusion_features(split)
    assert fused.shape == (20, 3 + 4 + 2)
    np.testing.assert_allclose(fused, manual_pool(split), rtol=1e-6, atol=1e-6)


def test_absent_modality_contributes_zeros() -> None:
    split = random_split(np.random.default_rng(2), 3)
    split.lengths["text"][:] = [0, 2, 0]
    split.features["text"][:] = 7.0  # garbage: must not leak into absent samples
    fused = early_fusion_features(split)
    text_cols = slice(3, 7)  # vision (D=3) comes first, then text (D=4)
    np.testing.assert_array_equal(fused[[0, 2], text_cols], 0.0)
    np.testing.assert_array_equal(fused[1, text_cols], 7.0)
    # A subset of modalities keeps only their columns, in the order given.
    assert early_fusion_features(split, ("audio",)).shape == (3, 2)


def test_ridge_recovers_linear_function() -> None:
    feature_set, _ = linear_feature_set()
    model = RidgeBaseline().fit(feature_set)
    assert model.alpha in DEFAULT_ALPHAS
    test = feature_set["test"]
    m = compute_metrics("regression", "mosi", model.predict(test), test.labels)
    assert m["MAE"] < 0.1  # noise std 0.05 -> MAE ~ 0.04
    assert m["Corr"] > 0.95


def test_alpha_is_the_one_with_the_best_valid_mae() -> None:
    feature_set, _ = linear_feature_set(seed=3, noise=1.0)
    valid = feature_set["valid"]

    def valid_mae(alpha: float) -> float:
        pred = RidgeBaseline(alphas=(alpha,)).fit(feature_set).predict(valid)
        return float(np.mean(np.abs(pred - valid.labels)))

    chosen = RidgeBaseline().fit(feature_set).alpha
    assert valid_mae(chosen) == pytest.approx(min(valid_mae(a) for a in DEFAULT_ALPHAS))


def test_constant_features_do_not_break_standardisation() -> None:
    feature_set, _ = linear_feature_set(seed=4)
    # Audio absent from every train sample: its columns are constant zero (std 0) in train.
    feature_set["train"].lengths["audio"][:] = 0
    pred = RidgeBaseline().fit(feature_set).predict(feature_set["test"])
    assert np.all(np.isfinite(pred))


def test_classification_on_separable_data() -> None:
    rng = np.random.default_rng(5)
    centres = rng.normal(scale=5.0, size=(3, SHAPES["text"][1]))
    splits = {}
    for name, n in (("train", 150), ("valid", 60), ("test", 60)):
        labels = rng.integers(0, 3, size=n).astype(np.int64)
        split = random_split(rng, n, labels)
        # Text carries the class (always present); the other modalities are noise.
        split.features["text"] = (centres[labels][:, None, :] + 0.3 * split.features["text"]).astype(
            np.float32
        )
        split.lengths["text"][:] = np.maximum(split.lengths["text"], 1)
        splits[name] = split
    feature_set = FeatureSet(
        name="synthetic-cls",
        splits=splits,
        spec=spec_from_split(splits["train"]),
        task="classification",
        label_names=["neg", "neu", "pos"],
    )
    model = RidgeBaseline().fit(feature_set)
    pred = model.predict(feature_set["test"])
    assert pred.dtype == np.int64 and pred.shape == (60,)
    results = run_baseline(feature_set)
    assert list(results["test"]) == METRIC_KEYS["classification"]
    assert results["test"]["Acc"] == 1.0


def test_run_baseline_reports_every_split() -> None:
    feature_set, _ = linear_feature_set(seed=6)
    results = run_baseline(feature_set)
    assert set(results) == {"train", "valid", "test"}
    assert all(list(r) == METRIC_KEYS["mosi"] for r in results.values())
    feature_set.metric_family = "sims"
    assert list(run_baseline(feature_set)["test"]) == METRIC_KEYS["sims"]


def test_predict_before_fit_raises() -> None:
    with pytest.raises(RuntimeError, match="before fit"):
        RidgeBaseline().predict(random_split(np.random.default_rng(7), 2))
