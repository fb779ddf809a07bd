"""A linear early-fusion baseline: mean-pooled modality features, concatenated, fed to closed-form ridge.

It gives a floor that any fusion model must beat on the same features, and a quick sanity check that the
features carry signal at all (a useless feature set gives Corr ~ 0 here too).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mcihn.data import FeatureSet, FeatureSplit
from mcihn.metrics import compute_metrics
from mcihn.spec import MODALITIES

DEFAULT_ALPHAS: tuple[float, ...] = tuple(float(a) for a in 10.0 ** np.arange(-3, 5))
# Features whose train std is below this are treated as constant: scaled by 1 instead of by ~0, so a
# modality that is absent (all zeros) in train cannot blow up on a test sample that has it.
_MIN_STD = 1e-8
_POOL_CHUNK = 1024  # samples per chunk when pooling, to bound the temporary (chunk, T, D) copy


def early_fusion_features(split: FeatureSplit, modalities: tuple[str, ...] = MODALITIES) -> np.ndarray:
    """(N, sum of D_m) float64: each modality's (N, T_m, D_m) features averaged over its first lengths[m]
    steps, zeros where lengths[m] == 0 (modality absent), concatenated in `modalities` order.

    Steps past a sample's length are ignored whatever they hold (padding need not be zero).
    """
    pooled = []
    for m in modalities:
        feats, lengths = split.features[m], np.asarray(split.lengths[m])
        n, t, d = feats.shape
        out = np.zeros((n, d), dtype=np.float64)
        for start in range(0, n, _POOL_CHUNK):
            stop = min(start + _POOL_CHUNK, n)
            valid = np.arange(t)[None, :] < lengths[start:stop, None]  # (chunk, T)
            summed = np.where(valid[:, :, None], feats[start:stop], 0).sum(axis=1, dtype=np.float64)
            out[start:stop] = summed / np.maximum(valid.sum(axis=1), 1)[:, None]
        pooled.append(out)
    return np.concatenate(pooled, axis=1)


@dataclass
class RidgeBaseline:
    """Ridge regression with intercept on standardised early-fusion features.

    Regression predicts the label directly; classification regresses one-hot targets and takes the argmax.
    `alpha` is chosen from `alphas` by validation MAE (regression) or accuracy (classification); ties go to
    the earlier (smaller) alpha. The weights kept are those fitted on train at that alpha.
    """

    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    modalities: tuple[str, ...] = MODALITIES
    alpha: float | None = None
    task: str = "regression"
    num_classes: int | None = None
    mean_: np.ndarray | None = field(default=None, repr=False)  # (F,) train feature means
    scale_: np.ndarray | None = field(default=None, repr=False)  # (F,) train feature stds (floored)
    coef_: np.ndarray | None = field(default=None, repr=False)  # (F, K) weights; K = 1 for regression
    intercept_: np.ndarray | None = field(default=None, repr=False)  # (K,)

    def _design(self, split: FeatureSplit) -> np.ndarray:
        """(N, F) standardised features of a split, using the train statistics."""
        return (early_fusion_features(split, self.modalities) - self.mean_) / self.scale_

    def _targets(self, labels: np.ndarray) -> np.ndarray:
        """(N, K) float64 regression targets: the label, or the one-hot class."""
        if self.task == "classification":
            return np.eye(self.num_classes)[np.asarray(labels, dtype=np.int64)]
        return np.asarray(labels, dtype=np.float64).reshape(-1, 1)

    def _decode(self, outputs: np.ndarray) -> np.ndarray:
        """(N, K) ridge outputs -> (N,) regression values or int64 class indices."""
        return outputs.argmax(axis=1) if self.task == "classification" else outputs[:, 0]

    def fit(self, feature_set: FeatureSet) -> RidgeBaseline:
        """Fit on feature_set["train"], choosing alpha on feature_set["valid"] (unless only one alpha)."""
        self.task = feature_set.task
        if self.task not in ("regression", "classification"):
            raise ValueError(f"unknown task {self.task!r}; expected 'regression' or 'classification'")
        train = feature_set["train"]
        if len(train) == 0:
            raise ValueError(f"dataset {feature_set.name!r} has an empty train split")
        if self.task == "classification":
            names = feature_set.label_names
            self.num_classes = len(names) if names else int(np.max(train.labels)) + 1

        raw = early_fusion_features(train, self.modalities)
        self.mean_ = raw.mean(axis=0)
        std = raw.std(axis=0)
        self.scale_ = np.where(std < _MIN_STD, 1.0, std)
        x = (raw - self.mean_) / self.scale_  # zero-mean columns, so the intercept is just the target mean
        y = self._targets(train.labels)
        y_mean = y.mean(axis=0)
        gram, rhs = x.T @ x, x.T @ (y - y_mean)  # normal equations, shared by every alpha

        def solve(alpha: float) -> np.ndarray:
            return np.linalg.solve(gram + alpha * np.eye(gram.shape[0]), rhs)

        alphas = [float(a) for a in self.alphas]
        if not alphas:
            raise ValueError("RidgeBaseline needs at least one alpha")
        self.intercept_ = y_mean
        best_alpha, best_coef = alphas[0], solve(alphas[0])
        if len(alphas) > 1:
            valid = feature_set["valid"]
            if len(valid) == 0:
                raise ValueError(
                    f"dataset {feature_set.name!r} has an empty valid split; cannot choose alpha"
                )
            x_valid = self._design(valid)
            best_score = -np.inf
            for alpha in alphas:
                coef = solve(alpha)
                pred = self._decode(x_valid @ coef + y_mean)
                if self.task == "classification":
                    score = float(np.mean(pred == np.asarray(valid.labels)))
                else:
                    score = -float(np.mean(np.abs(pred - np.asarray(valid.labels, dtype=np.float64))))
                if score > best_score:  # strict: ties keep the smaller alpha
                    best_alpha, best_coef, best_score = alpha, coef, score
        self.alpha, self.coef_ = best_alpha, best_coef
        return self

    def predict(self, split: FeatureSplit) -> np.ndarray:
        """(N,) float64 regression values, or (N,) int64 class indices for classification."""
        if self.coef_ is None:
            raise RuntimeError("RidgeBaseline.predict called before fit")
        return self._decode(self._design(split) @ self.coef_ + self.intercept_)


def run_baseline(feature_set: FeatureSet, **kwargs) -> dict[str, dict[str, float]]:
    """Fit a RidgeBaseline (kwargs go to it) and return compute_metrics for every split, keyed by split."""
    model = RidgeBaseline(**kwargs).fit(feature_set)
    return {
        name: compute_metrics(
            feature_set.task, feature_set.metric_family, model.predict(split), split.labels, model.num_classes
        )
        for name, split in feature_set.splits.items()
        if len(split) > 0
    }
