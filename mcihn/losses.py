"""MCIHN's losses: reconstruction (eq. 4), adversarial (eq. 5), MMD adaptive loss (eqs. 12-14) and the task
loss (eq. 18). Shapes: B = batch, L = latent length, d = latent dim."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mcihn.config import MCIHNConfig
from mcihn.model import pair_name


def reconstruction_loss(x: Tensor, x_hat: Tensor, valid: Tensor) -> Tensor:
    """Eq. 4, ||X - X_hat||^2, averaged over valid steps and feature dims. x, x_hat (B, T, D); valid (B, T)."""
    mask = valid[..., None].to(x.dtype)
    squared = (x - x_hat).pow(2) * mask
    return squared.sum() / (mask.sum() * x.shape[-1]).clamp_min(1.0)


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Eq. 5 as a minimisation: -log D(d) - log(1 - D(E(X))), d ~ N(0, I) (real), codes (fake)."""
    real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
    fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    return real + fake


def generator_loss(fake_logits: Tensor) -> Tensor:
    """The encoder's side of eq. 5 (non-saturating form): make codes look like prior samples."""
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def task_loss(prediction: Tensor, target: Tensor, head: str, class_weight: Tensor | None = None) -> Tensor:
    """Eq. 18: mean absolute error for the regression head; cross-entropy for the classification head
    (an L1 between softmax scores and a class index is not a proper classification loss). `class_weight` (C,)
    weighs each sample's cross-entropy by its class (the weighted mean, as torch's `weight=`)."""
    if head == "regression":
        return F.l1_loss(prediction, target.to(prediction.dtype))
    return F.cross_entropy(prediction, target.long(), weight=class_weight)


def gaussian_mmd(x: Tensor, y: Tensor, scales: tuple[float, ...]) -> Tensor:
    """Squared MMD between two sets of vectors per sample, with a sum of Gaussian kernels (eq. 12).

    x (B, n, k), y (B, m, k) -> (B,). Bandwidths are `scales` times the mean pairwise squared distance of
    each sample (detached), so the kernel follows the features' scale instead of a fixed constant.
    """
    joint = torch.cat([x, y], dim=1)  # (B, n+m, k)
    dist = torch.cdist(joint, joint).pow(2)  # (B, n+m, n+m)
    bandwidth = dist.detach().mean(dim=(1, 2), keepdim=True).clamp_min(1e-6)
    kernel = sum(torch.exp(-dist / (bandwidth * s)) for s in scales)
    n = x.shape[1]
    k_xx, k_yy, k_xy = kernel[:, :n, :n], kernel[:, n:, n:], kernel[:, :n, n:]
    return k_xx.mean(dim=(1, 2)) + k_yy.mean(dim=(1, 2)) - 2 * k_xy.mean(dim=(1, 2))


class AdaptiveLoss(nn.Module):
    """Eqs. 12-14: for each core modality m, the MMD between xi(S^m) and xi(F^{others}), where F^{others}
    is the correlation feature of the other two modalities (their pair feature; with two modalities, the
    one pair feature). Summed over cores (eq. 14's sum over v), averaged over the batch (its sum over i).

    xi is a learned fully connected layer. Trained to minimise the MMD it would collapse (a constant map
    has zero MMD), so by default (`mmd_kernel_map="adversarial"`) it is trained adversarially through a
    gradient reversal: xi seeks the features in which the distributions differ most, the encoders and the
    gate close that gap (an MMD-GAN-style learned kernel). `mmd_kernel_map="minimised"` is the paper's
    literal reading: xi descends the MMD like everything else. Samples where the core or either other
    modality is absent are left out.
    """

    def __init__(self, config: MCIHNConfig):
        super().__init__()
        self.modalities = config.modalities
        self.scales = config.mmd_kernel_scales
        self.xi = nn.Linear(config.latent_dim, config.latent_dim)
        if config.mmd_kernel_map == "adversarial":
            # Gradient reversal for xi alone: its parameters get gradient only from this loss, so negating it
            # makes the optimiser step ascend the MMD for xi while everything upstream descends.
            for parameter in self.xi.parameters():
                parameter.register_hook(torch.neg)

    def forward(self, codes: dict[str, Tensor], pair_features: dict[str, Tensor], present: dict[str, Tensor]) -> Tensor:
        total = codes[self.modalities[0]].new_zeros(())
        for core in self.modalities:
            others = [o for o in self.modalities if o != core]
            pair = (others[0], others[1]) if len(others) == 2 else (core, others[0])
            correlation = pair_features[pair_name(pair)]
            keep = present[core]
            for o in others:
                keep = keep & present[o]
            if not bool(keep.any()):
                continue
            x, y = self.xi(codes[core][keep]), self.xi(correlation[keep])
            total = total + gaussian_mmd(x, y, self.scales).mean()
        return total
