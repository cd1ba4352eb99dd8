"""Reward Score Matching, zeroth order (Lee, Chang, Kim, Ye, "Reward Score Matching: Unifying Reward-based
Fine-tuning for Flow and Diffusion Models", arXiv 2604.17415), its SD3.5 recipe (`--sampler branch --loss matching
--reweight fairclip2 --profile lowsnr2`). Written from the formulas of the authors' code (github.com/jaylee2000/rsm
@ e8be3df, sd35_zeroth_order/): scripts/train_sd3_pr.py (the loss, inline in `main`), flow_grpo/sd3_train_shared.py
(the weights), flow_grpo/diffusers_patch/ (the branch sampler).

A branch of step i leaves the ODE state x_i by one of Flow-GRPO's SDE steps, x' = μ_old + s·ε with s = σ̃·√Δt,
Δt = σ_i − σ_{i+1} and σ̃ = a·√(σ/(1 − σ)) (fdfo/formulas/flow_grpo.py); its reward is that of x' carried to σ = 0
by the ODE. The k_i branches of one (seed, step) form a group.
"""

from __future__ import annotations

import torch


def mean_active_branches(branches: tuple[int, ...]) -> float:
    """k̄: the mean branch count of the steps that branch (7.5 for the recipe's 6, 6, 8, 10): a step's rows are
    weighted by k̄/k_i, so every branching step weighs the same per seed."""
    active = [k for k in branches if k > 0]
    return sum(active) / len(active)


def matching_weight(sigma: torch.Tensor, dt: torch.Tensor, tilde_sigma: torch.Tensor) -> torch.Tensor:
    """w = √Δt/σ̃ · (1 + (1 − σ)/(2σ)·σ̃²): the SDE mean's change per unit velocity, over the step's std
    (`compute_base_reweight_factor`), per row (B,)."""
    return torch.sqrt(dt) / tilde_sigma * (1 + (1 - sigma) / (2 * sigma) * tilde_sigma.pow(2))


def _rows(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.view(-1, *[1] * (like.dim() - 1))


def hinge_matching_loss(v_theta: torch.Tensor, v_old: torch.Tensor, noise: torch.Tensor, advantages: torch.Tensor,
                        sigma: torch.Tensor, dt: torch.Tensor, tilde_sigma: torch.Tensor, clip_range: float
                        ) -> torch.Tensor:
    """Per row (B,): max(c·|A| + A·m, 0) with m = (½·mean((w·δ)²) + mean(w·δ·ε))·σ̃²Δt, δ = v_θ − v_old, then
    the `fair_clip2` end scale 1/(σ̃²Δt) · σ̃/√Δt. m is −σ̃²Δt times the mean log-ratio of the new and old
    Gaussian steps at the branch x', so the hinge stops a row once its log-ratio has moved by c·|A|/(σ̃²Δt)."""
    w = _rows(matching_weight(sigma, dt, tilde_sigma), v_theta).to(v_theta.dtype)
    delta = v_theta - v_old
    term_1 = 0.5 * (delta * w).pow(2).mean(dim=(1, 2, 3), dtype=torch.float32)
    term_2 = ((w * delta) * noise).mean(dim=(1, 2, 3), dtype=torch.float32)
    matching = (term_1 + term_2) * (tilde_sigma ** 2 * dt)
    per_row = torch.maximum(clip_range * advantages.abs() + advantages * matching, torch.zeros_like(advantages))
    return per_row / (tilde_sigma ** 2 * dt) * (tilde_sigma / torch.sqrt(dt))


def step_kl(mean_theta: torch.Tensor, mean_ref: torch.Tensor, tilde_sigma: torch.Tensor, dt: torch.Tensor
            ) -> torch.Tensor:
    """KL of the policy's SDE step from the base model's at the same x, per row (B,): mean((μ_θ − μ_ref)²)/(2σ̃²Δt)."""
    return (mean_theta - mean_ref).pow(2).mean(dim=(1, 2, 3)) / (2 * tilde_sigma ** 2 * dt)
