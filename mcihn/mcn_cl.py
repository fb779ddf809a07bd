"""MCN-CL: Multimodal Cross-Attention Network and Contrastive Learning (Li, Wu, Li; arXiv 2511.10892).

Only the abstract is available (MCN-CL (arXiv 2511.10892), abstract): a PSA-enhanced visual encoder for the
temporal dynamics of facial features, a layered bidirectional cross-attention network with a "triple query
mechanism" (each of text, audio and vision in turn queries the other two), a modality-specific supervised
contrastive loss with hard-negative mining against class imbalance, and a classification head. Every size,
formula and hyper-parameter below is ours; docs/mcn_cl.md gives each reading and its reason.

Read top to bottom: the config, masked attention, the per-modality input (standardisation, projection,
masking, missing token), pyramid squeeze attention over the visual steps, the triple-query layers, and the
model (masked mean pooling, classification head, contrastive projection heads). Shapes: B batch, T_m / D_m a
modality's sequence length and feature dim, d = d_model, C classes, P contrastive embedding dim.

`MCNCL.forward` is the inference path (MCIHN's signature; softmax scores, ONNX-exportable);
`MCNCL.forward_train` also returns the per-modality embeddings the contrastive loss needs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mcihn.contrastive import supervised_contrastive_loss
from mcihn.emotions import EMOTIONS
from mcihn.spec import MODALITIES

# ---------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------

# Ablations by name (`mcihn train --model mcn-cl --ablation NAME`): each turns off one of the parts the abstract
# names. Ours: the paper's ablation table is not available.
ABLATIONS: dict[str, dict] = {
    "full": {},
    "no-psa": {"use_psa": False},  # vision gets only projection + positions
    "no-contrastive": {"use_contrastive": False},  # cross-entropy alone, no projection heads
    "no-mining": {"hard_negative_mining": False},  # SupCon over every negative
}


@dataclass
class MCNCLConfig:
    """Everything needed to rebuild an MCN-CL model; saved in checkpoints as JSON. All defaults are ours.

    Input sizes default to MCIHNConfig's (the same extractors feed both models); labels to MELD's seven
    emotions (one of the paper's two datasets, and the live recognizer's vocabulary).
    """

    input_dims: dict[str, int] = field(default_factory=lambda: {"vision": 512, "text": 768, "audio": 512})
    seq_lens: dict[str, int] = field(default_factory=lambda: {"vision": 10, "text": 36, "audio": 128})
    d_model: int = 128
    num_heads: int = 4
    num_layers: int = 2
    ffn_mult: int = 2
    dropout: float = 0.3
    labels: list[str] = field(default_factory=lambda: list(EMOTIONS))
    # Pyramid squeeze attention over the visual steps: one temporal convolution per (odd) kernel size.
    psa_kernels: tuple[int, ...] = (1, 3, 5, 7)
    psa_reduction: int = 4
    # Supervised contrastive loss with hard-negative mining.
    projection_dim: int = 64
    temperature: float = 0.1
    hard_negatives: int = 8
    contrastive_weight: float = 0.1
    # Ablation switches.
    use_psa: bool = True
    use_contrastive: bool = True
    hard_negative_mining: bool = True
    # Training-time robustness, as MCIHN's: probability of hiding each present modality of a sample.
    modality_dropout: float = 0.15

    def __post_init__(self) -> None:
        self.psa_kernels = tuple(self.psa_kernels)
        self.labels = list(self.labels)
        if len(self.labels) < 2:
            raise ValueError("MCN-CL classifies: it needs at least two label names (labels=[...])")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model {self.d_model} must be divisible by num_heads {self.num_heads}")
        if not self.psa_kernels or any(k < 1 or k % 2 == 0 for k in self.psa_kernels):
            raise ValueError(f"psa_kernels must be odd sizes >= 1 (same-length convolutions), got {self.psa_kernels}")
        if self.d_model % len(self.psa_kernels):
            raise ValueError(f"d_model {self.d_model} must be divisible by the {len(self.psa_kernels)} PSA scales")
        if self.temperature <= 0 or self.hard_negatives < 1 or self.num_layers < 1:
            raise ValueError("temperature must be > 0, hard_negatives and num_layers >= 1")
        for m in MODALITIES:
            if self.input_dims.get(m, 0) <= 0 or self.seq_lens.get(m, 0) <= 0:
                raise ValueError(f"input_dims and seq_lens need a positive entry for {m}")

    # What code written for MCIHNConfig reads (checkpoints, the live stack): MCN-CL always classifies and
    # always takes all three modalities (an absent one is masked, not removed).
    @property
    def head(self) -> str:
        return "classification"

    @property
    def modalities(self) -> tuple[str, ...]:
        return MODALITIES

    @property
    def num_outputs(self) -> int:
        return len(self.labels)

    @classmethod
    def for_ablation(cls, name: str, **overrides) -> MCNCLConfig:
        if name not in ABLATIONS:
            raise ValueError(f"unknown MCN-CL ablation {name!r}; choose one of {', '.join(ABLATIONS)}")
        return cls(**{**ABLATIONS[name], **overrides})

    def to_dict(self) -> dict:
        data = asdict(self)
        data["psa_kernels"] = list(self.psa_kernels)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> MCNCLConfig:
        """Missing fields take their defaults (configs written before a field existed); unknown ones are refused."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown MCN-CL config fields {unknown}; was the checkpoint made by a newer version?")
        return cls(**data)


# ---------------------------------------------------------------------------------------------------------
# Masked multi-head attention
# ---------------------------------------------------------------------------------------------------------


class MaskedAttention(nn.Module):
    """softmax(Q K^T / sqrt(d/h)) V per head, heads concatenated and projected.

    query (B, Lq, d), key_value (B, Lk, d), key_mask (B, Lk) bool (True = may be attended) -> (B, Lq, d).
    A row with no allowed key attends everywhere instead of producing NaN (cannot happen inside MCNCL, where
    every modality keeps at least one valid step, but keeps the module safe on its own).
    """

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def _split(self, x: Tensor) -> Tensor:  # (B, L, d) -> (B, h, L, d/h)
        return x.reshape(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, query: Tensor, key_value: Tensor, key_mask: Tensor) -> Tensor:
        q = self._split(self.q_proj(query))
        k, v = self._split(self.k_proj(key_value)), self._split(self.v_proj(key_value))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)  # (B, h, Lq, Lk)
        keep = key_mask[:, None, None, :]
        keep = keep | ~keep.any(dim=-1, keepdim=True)
        weights = self.dropout(torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1))
        return self.out_proj((weights @ v).transpose(1, 2).flatten(2))


# ---------------------------------------------------------------------------------------------------------
# Per-modality input and the PSA-enhanced visual encoder
# ---------------------------------------------------------------------------------------------------------


class PyramidSqueezeAttention(nn.Module):
    """PSA (EPSANet's pyramid squeeze attention) along the time axis of a (B, T, d) step sequence.

    For each scale s with odd kernel k_s: F_s = Conv1d_{k_s}(X) (B, d/S, T), zeroed at invalid steps;
    squeeze: z_s = masked mean of F_s over the valid steps (B, d/S); excitation: w_s = FC(GELU(FC(z_s)))
    (B, d/S, bottleneck d/S/reduction); the S scales compete per channel: a = softmax_s(w_1..w_S) (B, S, d/S)
    (softmax of the logits, not of sigmoid outputs as in EPSANet, which would bound the weight ratio by e);
    the output concatenates a_s * F_s over scales to (B, T, d), added to X (residual) and layer-normalised.
    Invalid steps are zero in the output. Padding is zero at the input, so a valid step near the end sees
    zeros as "same" padding would: the result does not depend on what was in the padded steps, nor on T.
    """

    def __init__(self, dim: int, kernels: tuple[int, ...], reduction: int, dropout: float):
        super().__init__()
        channels = dim // len(kernels)
        hidden = max(1, channels // reduction)
        self.convs = nn.ModuleList(nn.Conv1d(dim, channels, k, padding=k // 2) for k in kernels)
        self.excite = nn.ModuleList(
            nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, channels)) for _ in kernels
        )
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        """x (B, T, d) with invalid steps zero, valid (B, T) bool -> (B, T, d)."""
        steps = x.transpose(1, 2)  # (B, d, T)
        keep = valid[:, None, :]
        count = valid.sum(dim=1, keepdim=True).clamp_min(1).to(x.dtype)  # (B, 1)
        scales, logits = [], []
        for conv, excite in zip(self.convs, self.excite, strict=True):
            f = conv(steps)
            f = torch.where(keep, f, torch.zeros_like(f))  # (B, d/S, T); bias must not leak into padding
            scales.append(f)
            logits.append(excite(f.sum(dim=-1) / count))  # (B, d/S)
        weights = torch.softmax(torch.stack(logits, dim=1), dim=1)  # (B, S, d/S): scales compete per channel
        mixed = torch.cat([f * weights[:, s, :, None] for s, f in enumerate(scales)], dim=1).transpose(1, 2)
        out = self.norm(x + self.dropout(mixed))
        return torch.where(valid[..., None], out, torch.zeros_like(out))


class ModalityInput(nn.Module):
    """One modality's raw features -> d-dim steps and the mask of steps that may be attended and pooled.

    Standardise (buffers feature_mean / feature_std, so checkpoints carry the training split's statistics),
    zero every step beyond the length with a `where` (so NaN/inf there is inert), project to d, add a learned
    position embedding, and (vision only) apply PSA. A sample where the modality is absent (length 0) gets the
    learned `missing_token` as its only valid step, so it still has one key and one pooled vector, and nothing
    of its input reaches the output. x (B, T, D), valid (B, T) -> steps (B, T, d), mask (B, T).
    """

    def __init__(self, modality: str, config: MCNCLConfig):
        super().__init__()
        dim, seq_len, d = config.input_dims[modality], config.seq_lens[modality], config.d_model
        self.register_buffer("feature_mean", torch.zeros(dim))
        self.register_buffer("feature_std", torch.ones(dim))
        self.project = nn.Sequential(nn.Linear(dim, d), nn.GELU(), nn.Dropout(config.dropout))
        self.position = nn.Parameter(torch.randn(seq_len, d) * 0.02)
        self.missing_token = nn.Parameter(torch.randn(d) * 0.02)
        use_psa = modality == "vision" and config.use_psa
        self.temporal = (PyramidSqueezeAttention(d, config.psa_kernels, config.psa_reduction, config.dropout)
                         if use_psa else None)

    def normalise(self, x: Tensor, valid: Tensor) -> Tensor:
        """Standardise and zero every invalid step, so padding or an absent modality (even NaN) is inert."""
        x = torch.where(valid[..., None], x, torch.zeros_like(x))
        return torch.where(valid[..., None], (x - self.feature_mean) / self.feature_std, torch.zeros_like(x))

    def forward(self, x: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        steps = self.project(self.normalise(x, valid)) + self.position  # (B, T, d)
        steps = torch.where(valid[..., None], steps, torch.zeros_like(steps))
        if self.temporal is not None:
            steps = self.temporal(steps, valid)
        present = valid.any(dim=1, keepdim=True)  # (B, 1)
        first = torch.arange(valid.shape[1], device=valid.device)[None, :] == 0  # (1, T)
        missing = torch.where(first[..., None], self.missing_token, torch.zeros_like(steps))  # (B, T, d)
        steps = torch.where(present[..., None], steps, missing)
        # Boolean logic, not a `where`: onnxruntime has no Where kernel for bool tensors.
        return steps, (valid & present) | (first & ~present)


# ---------------------------------------------------------------------------------------------------------
# Triple-query cross-attention
# ---------------------------------------------------------------------------------------------------------


class TripleQueryLayer(nn.Module):
    """One layer of the bidirectional cross-attention network: every modality m queries the other two.

    For each m (in parallel, all from the layer's input states H):
        K_m = V_m = [H_o1 ; H_o2]                     (B, T_o1 + T_o2, d), concatenated along steps, with masks
        H'_m  = LayerNorm(H_m + Dropout(MHA(H_m, K_m, V_m)))
        H''_m = LayerNorm(H'_m + FFN(H'_m))            FFN: d -> ffn_mult*d -> d, GELU
    Invalid steps of H''_m are zeroed. Each modality has its own attention, norms and FFN.
    """

    def __init__(self, config: MCNCLConfig):
        super().__init__()
        d, hidden = config.d_model, config.ffn_mult * config.d_model
        self.attention = nn.ModuleDict({m: MaskedAttention(d, config.num_heads, config.dropout) for m in MODALITIES})
        self.norm_attn = nn.ModuleDict({m: nn.LayerNorm(d) for m in MODALITIES})
        self.ffn = nn.ModuleDict({m: nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Dropout(config.dropout),
                                                   nn.Linear(hidden, d), nn.Dropout(config.dropout))
                                  for m in MODALITIES})
        self.norm_ffn = nn.ModuleDict({m: nn.LayerNorm(d) for m in MODALITIES})
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, states: dict[str, Tensor], masks: dict[str, Tensor]) -> dict[str, Tensor]:
        """states: modality -> (B, T_m, d); masks: modality -> (B, T_m) bool. Returns the new states."""
        new = {}
        for m in MODALITIES:
            others = [o for o in MODALITIES if o != m]
            context = torch.cat([states[o] for o in others], dim=1)
            context_mask = torch.cat([masks[o] for o in others], dim=1)
            h = self.norm_attn[m](states[m] + self.dropout(self.attention[m](states[m], context, context_mask)))
            h = self.norm_ffn[m](h + self.ffn[m](h))
            new[m] = torch.where(masks[m][..., None], h, torch.zeros_like(h))
        return new


# ---------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------


@dataclass
class MCNCLOutput:
    """What one training forward returns. logits (B, C); embeddings: modality -> (B, P) L2-normalised
    contrastive embeddings; pooled: modality -> (B, d); present: modality -> (B,) bool."""

    logits: Tensor
    embeddings: dict[str, Tensor]
    pooled: dict[str, Tensor]
    present: dict[str, Tensor]


class MCNCL(nn.Module):
    """The full model. Inputs are raw feature sequences with per-modality lengths (0 = modality absent)."""

    def __init__(self, config: MCNCLConfig):
        super().__init__()
        self.config = config
        self.modalities = MODALITIES
        d = config.d_model
        self.inputs = nn.ModuleDict({m: ModalityInput(m, config) for m in MODALITIES})
        self.layers = nn.ModuleList(TripleQueryLayer(config) for _ in range(config.num_layers))
        self.head = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(len(MODALITIES) * d, d), nn.GELU(),
                                  nn.Dropout(config.dropout), nn.Linear(d, config.num_outputs))
        # SupCon-style projection heads: the contrastive loss shapes a projection of each pooled vector, not
        # the vector the classifier reads. Absent with use_contrastive=False (they would get no gradient).
        self.projections = nn.ModuleDict(
            {m: nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, config.projection_dim)) for m in MODALITIES}
        ) if config.use_contrastive else None

    def valid_steps(self, modality: str, lengths: Tensor) -> Tensor:
        """lengths (B, 3) in MODALITIES order -> (B, T_m) bool mask of valid steps."""
        steps = torch.arange(self.config.seq_lens[modality], device=lengths.device)
        return steps[None, :] < lengths[:, MODALITIES.index(modality), None]

    def forward_train(self, features: dict[str, Tensor], lengths: Tensor) -> MCNCLOutput:
        """features: modality -> (B, T_m, D_m); lengths (B, 3) int in MODALITIES order."""
        states, masks, present = {}, {}, {}
        for m in MODALITIES:
            valid = self.valid_steps(m, lengths)
            states[m], masks[m] = self.inputs[m](features[m], valid)
            present[m] = valid.any(dim=1)
        for layer in self.layers:
            states = layer(states, masks)
        pooled = {}
        for m in MODALITIES:  # masked mean over the valid steps (the missing token for an absent modality)
            weight = masks[m][..., None].to(states[m].dtype)
            pooled[m] = (states[m] * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1.0)  # (B, d)
        logits = self.head(torch.cat([pooled[m] for m in MODALITIES], dim=-1))  # (B, C)
        embeddings = {} if self.projections is None else {
            m: F.normalize(self.projections[m](pooled[m]), dim=-1) for m in MODALITIES
        }
        return MCNCLOutput(logits, embeddings, pooled, present)

    def forward(self, vision: Tensor, text: Tensor, audio: Tensor, lengths: Tensor) -> Tensor:
        """Inference: vision (B, T_v, D_v), text (B, T_t, D_t), audio (B, T_a, D_a), lengths (B, 3) int64
        -> (B, C) softmax scores over `config.labels`."""
        out = self.forward_train({"vision": vision, "text": text, "audio": audio}, lengths)
        return torch.softmax(out.logits, dim=-1)

    # -- losses ---------------------------------------------------------------------------------------------

    def contrastive_loss(self, out: MCNCLOutput, labels: Tensor) -> Tensor:
        """The modality-specific supervised contrastive loss, averaged over the three modalities. Each
        modality's loss sees only the samples where that modality is present (an absent one's embedding is the
        missing token's, which says nothing about the class)."""
        k = self.config.hard_negatives if self.config.hard_negative_mining else None
        losses = [supervised_contrastive_loss(out.embeddings[m], labels, self.config.temperature, k,
                                              valid=out.present[m]) for m in MODALITIES]
        return torch.stack(losses).mean()

    def training_loss(self, out: MCNCLOutput, labels: Tensor,
                      class_weight: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
        """Cross-entropy (optionally class-weighted) + contrastive_weight * contrastive loss. labels (B,) int.
        Returns the total and its parts as floats for logging."""
        task = F.cross_entropy(out.logits, labels.long(), weight=class_weight)
        if not self.config.use_contrastive:
            return task, {"task": task.item(), "contrastive": 0.0}
        contrastive = self.contrastive_loss(out, labels.long())
        total = task + self.config.contrastive_weight * contrastive
        return total, {"task": task.item(), "contrastive": contrastive.item()}

    def set_feature_stats(self, modality: str, mean: Tensor, std: Tensor) -> None:
        self.inputs[modality].feature_mean.copy_(mean)
        self.inputs[modality].feature_std.copy_(std.clamp_min(1e-6))
