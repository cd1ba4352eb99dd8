"""From rewards to a training signal (paper §3): finite differences within a pair, SPO-style surrogate.

Tensors of samples are interleaved by pair: rows 2k and 2k+1 are the two branches of pair k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def reward_differences(rewards: torch.Tensor) -> torch.Tensor:
    """dR_a = (R_a − R_b)/2 and dR_b = −dR_a for every pair: (2P,) → (2P,)."""
    pairs = rewards.view(-1, 2)
    half = (pairs[:, 0] - pairs[:, 1]) / 2
    return torch.stack([half, -half], dim=1).view(-1)


def endpoint_differences(final_latents: torch.Tensor) -> torch.Tensor:
    """dx_a = x_a − (x_a + x_b)/2 = (x_a − x_b)/2 and dx_b = −dx_a: (2P, ...) → (2P, ...)."""
    pairs = final_latents.view(-1, 2, *final_latents.shape[1:])
    half = (pairs[:, 0] - pairs[:, 1]) / 2
    return torch.stack([half, -half], dim=1).view_as(final_latents)


def normalise(dx: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """d = dx / (mean(dx²) + eps), the mean over all latent elements of each sample."""
    m = dx.pow(2).flatten(1).mean(dim=1)
    return dx / (m + eps).view(-1, *[1] * (dx.dim() - 1))


def target_velocity(v_ref: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """v_tgt = v_ref − d: sampling integrates towards decreasing t, so −d moves the endpoint by +dx."""
    return v_ref - d


@dataclass
class LossTerms:
    loss: torch.Tensor  # scalar to back-propagate: mean policy loss (+ KL term)
    policy_loss: torch.Tensor  # scalar, mean of the surrogate L
    kl: torch.Tensor  # scalar, mean((v_θ − v_base)²), 0 without a base prediction
    ratio: torch.Tensor  # (B,) ρ per item, detached
    clipfrac: torch.Tensor  # scalar, fraction of items with |ρ − 1| > ε


def log_ratio(v_theta: torch.Tensor, v_ref: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """log ρ = ℓ − ℓ_ref with ℓ = −mean((v_θ − v_tgt)²) and ℓ_ref = −mean(d²), per item.

    Written as −mean(δ·(δ + 2d)) with δ = v_θ − v_ref: the same number, but it does not subtract
    two large values (mean(d²) ≈ 1/mean(dx²)), so ρ is exactly 1 at v_θ = v_ref in any precision.
    """
    delta = v_theta - v_ref
    return -(delta * (delta + 2 * d)).flatten(1).mean(dim=1)


def surrogate_loss(v_theta: torch.Tensor, v_ref: torch.Tensor, d: torch.Tensor, dR: torch.Tensor,
                   clip_range: float, kl_weight: float = 0.0, v_base: torch.Tensor | None = None) -> LossTerms:
    """Mean over the items of L = −dR·ρ + |dR|/(2ε)·(ρ − 1)², plus kl_weight·mean((v_θ − v_base)²)."""
    ratio = log_ratio(v_theta.float(), v_ref, d).exp()
    per_item = -dR * ratio + dR.abs() / (2 * clip_range) * (ratio - 1) ** 2
    policy_loss = per_item.mean()
    kl = (v_theta - v_base).pow(2).mean() if v_base is not None else torch.zeros((), device=v_theta.device)
    loss = policy_loss + kl_weight * kl if v_base is not None else policy_loss
    return LossTerms(loss=loss, policy_loss=policy_loss.detach(), kl=kl.detach(), ratio=ratio.detach(),
                     clipfrac=((ratio.detach() - 1).abs() > clip_range).float().mean())
