"""Late fusion of unimodal emotion experts over a shared label set, weighted by presence.

This is not MCIHN's joint fusion (which learns cross-modal interactions and needs tri-modal training data, which
cannot be had here): each expert (face expression, text) scores the same seven emotions on its own, and the fused
score is their weighted mean over the experts present this tick:

    fused = sum_m present_m * w_m * p_m / sum_m present_m * w_m

so one present expert is passed through unchanged, none gives no score, and two are mixed by their weights. A
weight is an expert's reliability on held-out data (docs/models.md says where each comes from). Each expert's
probabilities are first calibrated by a temperature fitted on its held-out data (p ** (1 / T), renormalised:
the same as dividing its logits by T), so that an over-confident expert does not drown the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Expert:
    """One unimodal expert as fusion sees it: its weight, its calibration temperature, and its model's name."""

    weight: float
    temperature: float = 1.0
    model: str = ""
    weight_source: str = ""  # where the weight comes from (held-out set and metric)

    def __post_init__(self) -> None:
        if self.weight <= 0 or self.temperature <= 0:
            raise ValueError(f"expert weight and temperature must be positive, got {self.weight}, {self.temperature}")


def calibrate(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities with their logits divided by `temperature` (p ** (1/T), renormalised)."""
    if temperature == 1.0:
        return probs / probs.sum()
    logp = np.log(np.clip(probs, 1e-12, 1.0)) / temperature
    logp -= logp.max()
    out = np.exp(logp)
    return out / out.sum()


@dataclass
class LateFusion:
    """Presence-weighted mean of calibrated expert probabilities over `labels`."""

    labels: tuple[str, ...]
    experts: dict[str, Expert] = field(default_factory=dict)

    def calibrated(self, name: str, scores: dict[str, float]) -> dict[str, float]:
        """An expert's scores after its temperature, in `labels` order."""
        probs = np.array([scores[label] for label in self.labels], dtype=np.float64)
        return dict(zip(self.labels, calibrate(probs, self.experts[name].temperature).tolist(), strict=True))

    def fuse(self, scores: dict[str, dict[str, float] | None]) -> dict[str, float] | None:
        """{expert: its calibrated scores, or None when absent} -> fused scores, or None when no expert is present."""
        total, weight = np.zeros(len(self.labels)), 0.0
        for name, s in scores.items():
            if s is None:
                continue
            w = self.experts[name].weight
            total += w * np.array([s[label] for label in self.labels])
            weight += w
        if weight == 0.0:
            return None
        return dict(zip(self.labels, (total / weight).tolist(), strict=True))

    def describe(self) -> str:
        parts = ", ".join(f"{name} {e.weight:.2f}" for name, e in self.experts.items())
        return f"late fusion: presence-weighted mean ({parts})"
