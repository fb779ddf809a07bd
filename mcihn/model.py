"""MCIHN: a hybrid network of multi-path cross-modal interaction (Zhang et al., MMAsia 2025).

Read top to bottom: the Feature Reconstruction Module (one adversarial autoencoder per modality, eqs. 4-5),
the Cross-modal Gate Mechanism Model (eqs. 6-11, with the MMD adaptive loss of eqs. 12-14 in losses.py),
the Feature Fusion Module (eqs. 15-16) and the output layer (eq. 17). Shapes use B = batch, T_m = a
modality's sequence length, D_m its feature dim, L = latent length (32), d = latent dim (256).
Where the paper's equations are garbled, the reading chosen here is written in docs/model.md.

`MCIHN.forward` is the inference path (no losses, no discriminator, ONNX-exportable);
`MCIHN.forward_train` also returns what the training losses need.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mcihn.config import MCIHNConfig
from mcihn.spec import MODALITIES


def masked_softmax(scores: Tensor, keep: Tensor | None) -> Tensor:
    """Softmax over the last dim; `keep` (broadcastable bool) marks allowed keys. Rows with no allowed key
    fall back to attending everywhere, so an absent modality gives finite (and later replaced) values."""
    if keep is not None:
        keep = keep | ~keep.any(dim=-1, keepdim=True)
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.softmax(scores, dim=-1)


class MultiHeadAttention(nn.Module):
    """softmax(Q W_q (K W_k)^T / sqrt(d/h)) V W_v, heads concatenated and projected by W_o (eqs. 15-16).

    query (B, Lq, d), key (B, Lk, d), value (B, Lk, d), key_mask (B, Lk) bool or None -> (B, Lq, d).
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def _split(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        return x.reshape(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_mask: Tensor | None = None) -> Tensor:
        q, k, v = self._split(self.q_proj(query)), self._split(self.k_proj(key)), self._split(self.v_proj(value))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)  # (B, h, Lq, Lk)
        keep = None if key_mask is None else key_mask[:, None, None, :]
        weights = self.dropout(masked_softmax(scores, keep))
        out = (weights @ v).transpose(1, 2).flatten(2)  # (B, Lq, d)
        return self.out_proj(out)


# ---------------------------------------------------------------------------------------------------------
# Feature Reconstruction Module (section 3.3): an adversarial autoencoder per modality.
# ---------------------------------------------------------------------------------------------------------


class SequenceEncoder(nn.Module):
    """E_eps: a (T, D) feature sequence -> a (L, d) latent code S.

    Each step is projected to d, then L learned latent queries attend over the valid steps (a resampler):
    this maps any sequence length T to L positions and ignores padding. x (B, T, D), valid (B, T) -> (B, L, d).
    """

    def __init__(self, input_dim: int, seq_len: int, config: MCIHNConfig):
        super().__init__()
        d = config.latent_dim
        self.step_proj = nn.Sequential(nn.Linear(input_dim, d), nn.GELU(), nn.Dropout(config.dropout))
        self.step_pos = nn.Parameter(torch.randn(seq_len, d) * 0.02)
        self.queries = nn.Parameter(torch.randn(config.latent_len, d) * 0.02)
        self.attention = MultiHeadAttention(d, config.num_heads)
        self.norm = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Dropout(config.dropout), nn.Linear(d, d))

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        steps = self.step_proj(x) + self.step_pos  # (B, T, d)
        queries = self.queries.expand(x.shape[0], -1, -1)  # (B, L, d)
        code = self.norm(queries + self.attention(queries, steps, steps, key_mask=valid))
        return code + self.ffn(code)


class SequenceDecoder(nn.Module):
    """D_delta: a latent code (B, L, d) -> the reconstructed sequence (B, T, D): T learned position queries
    attend over the code, then each is projected back to the feature dim."""

    def __init__(self, output_dim: int, seq_len: int, config: MCIHNConfig):
        super().__init__()
        d = config.latent_dim
        self.positions = nn.Parameter(torch.randn(seq_len, d) * 0.02)
        self.attention = MultiHeadAttention(d, config.num_heads)
        self.out = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, output_dim))

    def forward(self, code: Tensor) -> Tensor:
        queries = self.positions.expand(code.shape[0], -1, -1)
        return self.out(queries + self.attention(queries, code, code))


class LatentDiscriminator(nn.Module):
    """D_omega: tells latent vectors from samples of the prior N(0, I). (B, L, d) -> logits (B, L); each of
    the L latent positions is one sample of the code distribution."""

    def __init__(self, config: MCIHNConfig):
        super().__init__()
        d = config.latent_dim
        self.net = nn.Sequential(
            nn.Linear(d, d), nn.LeakyReLU(0.2), nn.Linear(d, d), nn.LeakyReLU(0.2), nn.Linear(d, 1)
        )

    def forward(self, code: Tensor) -> Tensor:
        return self.net(code).squeeze(-1)


class ModalityAAE(nn.Module):
    """One modality's path: input normalisation, encoder, and (with the AAE on) decoder and discriminator.

    With `use_aae=False` (ablation MCIHN-1) only the encoder remains, trained by the task loss alone.
    """

    def __init__(self, modality: str, config: MCIHNConfig):
        super().__init__()
        dim, seq_len = config.input_dims[modality], config.seq_lens[modality]
        # Feature standardisation from the training split; part of the model so live inference matches.
        self.register_buffer("feature_mean", torch.zeros(dim))
        self.register_buffer("feature_std", torch.ones(dim))
        self.encoder = SequenceEncoder(dim, seq_len, config)
        self.decoder = SequenceDecoder(dim, seq_len, config) if config.use_aae else None
        self.discriminator = LatentDiscriminator(config) if config.use_aae else None
        # Stands in for the latent code when the modality is absent (no face, silence, no words yet).
        self.missing_code = nn.Parameter(torch.randn(config.latent_len, config.latent_dim) * 0.02)

    def normalise(self, x: Tensor, valid: Tensor) -> Tensor:
        """Standardise and zero every invalid step, so padding or an absent modality (even NaN) is inert."""
        x = torch.where(valid[..., None], x, torch.zeros_like(x))
        return torch.where(valid[..., None], (x - self.feature_mean) / self.feature_std, torch.zeros_like(x))

    def encode(self, x: Tensor, valid: Tensor) -> Tensor:
        """x (B, T, D) raw features, valid (B, T) -> S (B, L, d); absent samples get `missing_code`."""
        code = self.encoder(self.normalise(x, valid), valid)
        present = valid.any(dim=1)[:, None, None]
        return torch.where(present, code, self.missing_code.expand_as(code))


# ---------------------------------------------------------------------------------------------------------
# Cross-modal Gate Mechanism Model (section 3.4).
# ---------------------------------------------------------------------------------------------------------


class CrossModalGate(nn.Module):
    """Eqs. 6-11 for every core modality and every pair.

    Attention transfer (eqs. 6-8), core m, others O (the other active modalities):
        M^m = S^m W (sum_{o in O} S^o)^T / sqrt(d)      (B, L, L)   eq. 6 (W(S^a)^T + W(S^t)^T = W(S^a+S^t)^T)
        A^m = softmax_rows(M^m) (sum_{o in O} S^o)       (B, L, d)   eqs. 7-8 (values: the same sum)
    Gate and joint representation for a pair {m, n} (eqs. 9-11):
        G^{mn} = ReLU([S^m, S^n, S^m - S^n, S^m * S^n] W_{mn} + b_{mn})   W_{mn}: (4d, d)
        F^{mn} = G^{mn} * P_m([A^m, S^m]) + G^{mn} * P_n([A^n, S^n])       P_m: (2d -> d)
    """

    def __init__(self, config: MCIHNConfig):
        super().__init__()
        d = config.latent_dim
        self.modalities = config.modalities
        self.scale = 1.0 / math.sqrt(d)
        self.W = nn.Linear(d, d, bias=False)
        self.combine = nn.ModuleDict({m: nn.Linear(2 * d, d) for m in self.modalities})
        self.gates = nn.ModuleDict({pair_name(p): nn.Linear(4 * d, d) for p in pairs(self.modalities)})

    def others(self, codes: dict[str, Tensor], core: str) -> Tensor:
        """The sum of the other modalities' codes, (B, L, d): eq. 6's keys and eq. 8's values."""
        return sum(codes[o] for o in self.modalities if o != core)

    def matching(self, codes: dict[str, Tensor], core: str) -> Tensor:
        """Eq. 6: M^m = S^m W (sum_o S^o)^T / sqrt(d), (B, L, L)."""
        return self.W(codes[core]) @ self.others(codes, core).transpose(-1, -2) * self.scale

    def transfer(self, codes: dict[str, Tensor], core: str) -> Tensor:
        """Eqs. 7-8: A^m = softmax_rows(M^m) (sum_o S^o), (B, L, d)."""
        return torch.softmax(self.matching(codes, core), dim=-1) @ self.others(codes, core)

    def gate_activation(self, codes: dict[str, Tensor], pair: tuple[str, str]) -> Tensor:
        """Eqs. 9-10: G^{mn} = ReLU([S^m, S^n, S^m - S^n, S^m * S^n] W_{mn} + b_{mn}), (B, L, d)."""
        s_m, s_n = codes[pair[0]], codes[pair[1]]
        return torch.relu(self.gates[pair_name(pair)](torch.cat([s_m, s_n, s_m - s_n, s_m * s_n], dim=-1)))

    def forward(self, codes: dict[str, Tensor]) -> dict[str, Tensor]:
        """codes: modality -> S (B, L, d). Returns pair name ("vision-text", ...) -> F (B, L, d)."""
        joint = {m: self.combine[m](torch.cat([self.transfer(codes, m), codes[m]], dim=-1)) for m in self.modalities}
        features = {}
        for m, n in pairs(self.modalities):
            gate = self.gate_activation(codes, (m, n))
            features[pair_name((m, n))] = gate * joint[m] + gate * joint[n]  # eq. 11
        return features


def pairs(modalities: tuple[str, ...]) -> list[tuple[str, str]]:
    """Unordered pairs in a fixed order: (vision, text), (vision, audio), (text, audio)."""
    return [(a, b) for i, a in enumerate(modalities) for b in modalities[i + 1 :]]


def pair_name(pair: tuple[str, str]) -> str:
    a, b = sorted(pair, key=MODALITIES.index)
    return f"{a}-{b}"


# ---------------------------------------------------------------------------------------------------------
# Feature Fusion Module (section 3.5) and the model.
# ---------------------------------------------------------------------------------------------------------


@dataclass
class MCIHNOutput:
    """What one training forward returns. prediction: (B,) for regression, (B, C) logits for classification;
    codes: modality -> S (B, L, d); pair_features: pair name -> F (B, L, d); present: modality -> (B,) bool."""

    prediction: Tensor
    codes: dict[str, Tensor]
    pair_features: dict[str, Tensor]
    present: dict[str, Tensor]


class MCIHN(nn.Module):
    """The full model. Inputs are raw feature sequences with per-modality lengths (0 = modality absent)."""

    def __init__(self, config: MCIHNConfig):
        super().__init__()
        self.config = config
        self.modalities = config.modalities
        d = config.latent_dim
        self.paths = nn.ModuleDict({m: ModalityAAE(m, config) for m in self.modalities})
        self.gate = CrossModalGate(config) if config.use_cgmm else None
        # One multi-head attention per core modality: F^{m-others} (eqs. 15-16).
        attention_dropout = config.fusion_attention_dropout_rate
        self.fusion = nn.ModuleDict({m: MultiHeadAttention(d, config.num_heads, attention_dropout)
                                     for m in self.modalities})
        self.head_dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(d, config.num_outputs)  # eq. 17's Linear

    # -- pieces --------------------------------------------------------------------------------------------

    def valid_steps(self, modality: str, batch: int, lengths: Tensor) -> Tensor:
        """lengths (B, 3) in MODALITIES order -> (B, T_m) bool mask of valid steps."""
        seq_len = self.config.seq_lens[modality]
        steps = torch.arange(seq_len, device=lengths.device)
        return steps[None, :] < lengths[:, MODALITIES.index(modality), None]

    def pair_features(self, codes: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.gate is not None:
            return self.gate(codes)
        # MCIHN-2 (no CGMM): a pair is represented by the mean of its two latent codes.
        return {pair_name(p): (codes[p[0]] + codes[p[1]]) / 2 for p in pairs(self.modalities)}

    def fuse(self, codes: dict[str, Tensor], features: dict[str, Tensor]) -> Tensor:
        """F^{m-others} = MHA(Q=F^{m o1}, K=F^{m o2}, V=S^m) per core m, added (eq. 17's Add): (B, L, d).
        With two modalities o1 = o2 (the one pair)."""
        fused = 0
        for m in self.modalities:
            others = [o for o in self.modalities if o != m]
            query = features[pair_name((m, others[0]))]
            key = features[pair_name((m, others[-1]))]
            fused = fused + self.fusion[m](query, key, codes[m])
        return fused

    # -- forwards ------------------------------------------------------------------------------------------

    def forward_train(self, features: dict[str, Tensor], lengths: Tensor) -> MCIHNOutput:
        """features: modality -> (B, T_m, D_m); lengths (B, 3) int in MODALITIES order."""
        batch = lengths.shape[0]
        codes, present = {}, {}
        for m in self.modalities:
            valid = self.valid_steps(m, batch, lengths)
            codes[m] = self.paths[m].encode(features[m], valid)
            present[m] = valid.any(dim=1)
        pair_feats = self.pair_features(codes)
        pooled = self.fuse(codes, pair_feats).mean(dim=1)  # (B, d)
        prediction = self.head(self.head_dropout(pooled))
        if self.config.head == "regression":
            prediction = prediction.squeeze(-1)
        return MCIHNOutput(prediction, codes, pair_feats, present)

    def forward(self, vision: Tensor, text: Tensor, audio: Tensor, lengths: Tensor) -> Tensor:
        """Inference: vision (B, T_v, D_v), text (B, T_t, D_t), audio (B, T_a, D_a), lengths (B, 3) int64.

        Returns (B,) sentiment values for a regression head, or (B, C) softmax scores for classification.
        """
        out = self.forward_train({"vision": vision, "text": text, "audio": audio}, lengths)
        if self.config.head == "classification":
            return torch.softmax(out.prediction, dim=-1)
        return out.prediction

    def set_feature_stats(self, modality: str, mean: Tensor, std: Tensor) -> None:
        path = self.paths[modality]
        path.feature_mean.copy_(mean)
        path.feature_std.copy_(std.clamp_min(1e-6))
