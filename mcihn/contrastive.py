"""MCN-CL's modality-specific supervised contrastive loss with hard-negative mining.

MCN-CL (arXiv 2511.10892), abstract: "a ... hard negative mining strategy" against category imbalance. The
abstract gives no formula; the form here is SupCon's L_out (Khosla et al., 2020) with the negatives of each
anchor cut down to its k most similar other-class samples. docs/mcn_cl.md gives the reasons.
Shapes: B = batch, P = embedding dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def hard_negative_mask(similarity: Tensor, negatives: Tensor, k: int) -> Tensor:
    """Row i keeps the k entries of `negatives[i]` with the highest `similarity[i]` (all of them when row i has
    k or fewer). similarity (B, B) float, negatives (B, B) bool -> (B, B) bool, a subset of `negatives`.

    Ties are broken by torch.topk (unspecified order); selection is not differentiated through.
    """
    if k <= 0:
        return torch.zeros_like(negatives)
    k = min(k, similarity.shape[1])
    scores = similarity.detach().masked_fill(~negatives, float("-inf"))
    chosen = torch.zeros_like(negatives).scatter(1, scores.topk(k, dim=1).indices, True)
    # A row with fewer than k negatives had non-negatives (at -inf) among its top k: drop them.
    return chosen & negatives


def supervised_contrastive_loss(embeddings: Tensor, labels: Tensor, temperature: float,
                                hard_negatives: int | None = None, valid: Tensor | None = None) -> Tensor:
    """SupCon with hard-negative mining on one modality's utterance embeddings.

    embeddings (B, P) (L2-normalised here), labels (B,) int, valid (B,) bool (samples that take part at all,
    e.g. where the modality is present; default all). With z_i = e_i / ||e_i||, s_ij = z_i . z_j / tau:

        P(i)   = {p != i : y_p = y_i, valid p}                     positives
        N(i)   = {n : y_n != y_i, valid n}                          negatives
        N_k(i) = the k members of N(i) with the largest s_in        (N(i) itself when hard_negatives is None
                                                                     or |N(i)| <= k)
        A(i)   = P(i) u N_k(i)                                      the denominator's set
        L_i    = -1/|P(i)| * sum_{p in P(i)} log( exp(s_ip) / sum_{a in A(i)} exp(s_ia) )
        L      = mean of L_i over valid anchors i with |P(i)| >= 1   (0 when there is none)

    With hard_negatives=None this is exactly SupCon's L_out. Returns a scalar that stays in the autograd graph
    (also when it is 0).
    """
    batch = embeddings.shape[0]
    if valid is None:
        valid = torch.ones(batch, dtype=torch.bool, device=embeddings.device)
    z = F.normalize(embeddings, dim=-1)
    similarity = z @ z.T  # (B, B), cosine
    others = valid[:, None] & valid[None, :] & ~torch.eye(batch, dtype=torch.bool, device=z.device)
    same = labels[:, None] == labels[None, :]
    positives = same & others
    negatives = ~same & others
    if hard_negatives is not None:
        negatives = hard_negative_mask(similarity, negatives, hard_negatives)
    logits = similarity / temperature
    # A finite fill (not -inf): a row with an empty denominator must not send NaN through logsumexp's backward.
    fill = torch.finfo(logits.dtype).min
    log_denominator = torch.logsumexp(logits.masked_fill(~(positives | negatives), fill), dim=1)  # (B,)
    log_prob = logits - log_denominator[:, None]
    num_pos = positives.sum(dim=1)
    per_anchor = -log_prob.masked_fill(~positives, 0.0).sum(dim=1) / num_pos.clamp_min(1)
    anchors = (num_pos > 0) & valid
    return (per_anchor * anchors).sum() / anchors.sum().clamp_min(1)
