"""Linear early-fusion baselines: mean-pooled modality features, concatenated, fed to closed-form ridge
(regression, or one-hot classes) or to multinomial logistic regression (classification).

It gives a floor that any fusion model must beat on the same features, and a quick sanity check that the
features carry signal at all (a useless feature set gives Corr ~ 0 here too).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mcihn.data import DataError, FeatureSet, FeatureSplit
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
            raise DataError(f"dataset {feature_set.name!r} has an empty train split")
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


def run_baseline(feature_set: FeatureSet, model: str = "ridge", **kwargs) -> dict[str, dict[str, float]]:
    """Fit a baseline ("ridge": RidgeBaseline, "logreg": LogisticBaseline; kwargs go to it) and return
    compute_metrics for every split, keyed by split."""
    if model not in BASELINES:
        raise DataError(f"unknown baseline {model!r}; use one of {', '.join(BASELINES)}")
    model = BASELINES[model](**kwargs).fit(feature_set)
    return {
        name: compute_metrics(
            feature_set.task, feature_set.metric_family, model.predict(split), split.labels, model.num_classes
        )
        for name, split in feature_set.splits.items()
        if len(split) > 0
    }


# ----------------------------------------------------------------------------------------------------
# Multinomial logistic regression (classification): the linear floor for emotion classes.

DEFAULT_PENALTIES: tuple[float, ...] = tuple(float(p) for p in 10.0 ** np.arange(0.0, -6.5, -0.5))


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(C,) float64 weights n / (C * count_c) (scikit-learn's "balanced"); a class absent from `labels` gets 0."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    return np.where(counts > 0, counts.sum() / (num_classes * np.maximum(counts, 1)), 0.0)


@dataclass
class LogisticBaseline:
    """Multinomial softmax regression with intercept and an L2 penalty on the weights, on standardised
    early-fusion features (each modality mean-pooled over its valid steps, as for the ridge).

    Minimises mean_i w_i CE_i / mean_i w_i + penalty / 2 * ||W||^2 (the intercept is not penalised) with
    full-batch L-BFGS (scipy) in float64, from the strongest penalty to the weakest, each fit warm-started from the
    previous one. The penalty is chosen on the valid split by weighted F1 (ties keep the stronger penalty).
    `class_weight` is None (every sample 1) or "balanced" (w_i = n / (C * count of i's class) on train).
    """

    penalties: tuple[float, ...] = DEFAULT_PENALTIES
    modalities: tuple[str, ...] = MODALITIES
    class_weight: str | None = None
    max_iter: int = 500
    penalty: float | None = None
    num_classes: int | None = None
    valid_scores: dict[float, float] = field(default_factory=dict, repr=False)  # penalty -> valid weighted F1
    mean_: np.ndarray | None = field(default=None, repr=False)  # (F,)
    scale_: np.ndarray | None = field(default=None, repr=False)  # (F,)
    coef_: np.ndarray | None = field(default=None, repr=False)  # (F, C)
    intercept_: np.ndarray | None = field(default=None, repr=False)  # (C,)

    task = "classification"

    def _design(self, split: FeatureSplit) -> np.ndarray:
        return (early_fusion_features(split, self.modalities) - self.mean_) / self.scale_

    def _solve(self, x: np.ndarray, onehot: np.ndarray, weights: np.ndarray, penalty: float,
               init: np.ndarray | None) -> np.ndarray:
        """One L-BFGS fit from `init`; returns the parameters flattened: (F + 1, C) weights with the intercept
        as the last row."""
        from scipy.optimize import minimize

        n_features, n_classes = x.shape[1], onehot.shape[1]
        w = weights / weights.sum()  # (N,) sample weights summing to 1

        def loss_and_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
            params = theta.reshape(n_features + 1, n_classes)
            coef, bias = params[:-1], params[-1]
            logits = x @ coef + bias
            logits -= logits.max(axis=1, keepdims=True)
            log_norm = np.log(np.exp(logits).sum(axis=1, keepdims=True))
            log_p = logits - log_norm
            loss = -float(np.sum(w * np.sum(onehot * log_p, axis=1))) + 0.5 * penalty * float(np.sum(coef * coef))
            residual = (np.exp(log_p) - onehot) * w[:, None]  # (N, C): d loss / d logits
            grad = np.vstack([x.T @ residual + penalty * coef, residual.sum(axis=0)[None]])
            return loss, grad.ravel()

        start = np.zeros((n_features + 1) * n_classes) if init is None else init
        result = minimize(loss_and_grad, start, jac=True, method="L-BFGS-B",
                          options={"maxiter": self.max_iter, "gtol": 1e-7, "ftol": 1e-12})
        return result.x

    def fit(self, feature_set: FeatureSet) -> LogisticBaseline:
        """Fit on feature_set["train"], choosing the penalty on feature_set["valid"] (unless only one)."""
        from mcihn.metrics import weighted_f1

        if feature_set.task != "classification":
            raise DataError(f"LogisticBaseline needs a classification dataset; {feature_set.name!r} is "
                             f"{feature_set.task} (use the ridge)")
        if self.class_weight not in (None, "balanced"):
            raise ValueError(f"class_weight must be None or 'balanced', got {self.class_weight!r}")
        penalties = sorted((float(p) for p in self.penalties), reverse=True)
        if not penalties:
            raise ValueError("LogisticBaseline needs at least one penalty")
        train = feature_set["train"]
        labels = np.asarray(train.labels, dtype=np.int64)
        self.num_classes = len(feature_set.label_names or []) or int(labels.max()) + 1
        raw = early_fusion_features(train, self.modalities)
        self.mean_ = raw.mean(axis=0)
        std = raw.std(axis=0)
        self.scale_ = np.where(std < _MIN_STD, 1.0, std)
        x = (raw - self.mean_) / self.scale_
        onehot = np.eye(self.num_classes)[labels]
        per_class = (balanced_class_weights(labels, self.num_classes) if self.class_weight == "balanced"
                     else np.ones(self.num_classes))
        x_valid = valid_labels = None
        if len(penalties) > 1:
            valid = feature_set["valid"]
            if len(valid) == 0:
                raise DataError(f"dataset {feature_set.name!r} has an empty valid split; cannot choose the penalty")
            x_valid, valid_labels = self._design(valid), np.asarray(valid.labels)
        best_score, theta, self.valid_scores = -np.inf, None, {}
        for penalty in penalties:
            theta = self._solve(x, onehot, per_class[labels], penalty, theta)
            params = theta.reshape(-1, self.num_classes)
            if x_valid is None:
                self.penalty, self.coef_, self.intercept_ = penalty, params[:-1], params[-1]
                break
            score = weighted_f1(valid_labels, (x_valid @ params[:-1] + params[-1]).argmax(axis=1))
            self.valid_scores[penalty] = score
            if score > best_score:  # strict: ties keep the stronger penalty (tried first)
                best_score = score
                self.penalty, self.coef_, self.intercept_ = penalty, params[:-1], params[-1]
        return self

    def predict_proba(self, split: FeatureSplit) -> np.ndarray:
        """(N, C) float64 class probabilities."""
        if self.coef_ is None:
            raise RuntimeError("LogisticBaseline.predict_proba called before fit")
        logits = self._design(split) @ self.coef_ + self.intercept_
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, split: FeatureSplit) -> np.ndarray:
        """(N,) int64 class indices."""
        return self.predict_proba(split).argmax(axis=1)


BASELINES: dict[str, type] = {"ridge": RidgeBaseline, "logreg": LogisticBaseline}
