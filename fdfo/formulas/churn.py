"""Churn schedules: the strength γ of the initial perturbation and of every step of a pair's trajectories.

The three schedules of the published FDFO code (NVlabs/finite-difference-flow-optimization,
fdfo/noise_schedules.py and fdfo/sampling.py), written from its formulas. Each gives a vector p over the
sampler's noise levels σ_0 … σ_{T−1}; with a 0 appended, entry 0 is the initial perturbation's γ and entry
i + 1 that of step i (σ_i → σ_{i+1}), so the last step never churns.

- raw (the paper's): γ = churn_weight everywhere.
- interval: per pair, a centre c = μ + σ·z₁ in logit space and a weight w = exp(z₂·σ_w + log churn_weight);
  p = exp(w·q) − 1, q the logit-normal density around c of width soft_sigma, normalised over the levels.
- prior: per pair a weight w = exp(z·σ_w + log churn_weight), all of it at σ = 1: p = exp(w·δ) − 1.

z₁, z₂, z are standard normal draws of the pair's own generator.
"""

from __future__ import annotations

import math

import torch

CLAMP = 1e-6  # noise levels are clamped to [CLAMP, 1 − CLAMP] before the density (published: 1e-6, then 1e-7)
LOGIT_CLAMP = 1e-7


def raw_gammas(num_steps: int, churn_weight: float) -> list[float]:
    """γ of the initial perturbation, then of steps 0 … T−1: churn_weight everywhere but the last step."""
    return [churn_weight] + [churn_weight] * (num_steps - 1) + [0.0]


def logit_normal_density(t: torch.Tensor, mu: float, sigma: float) -> torch.Tensor:
    """The density at t ∈ (0, 1) of sigmoid(N(mu, sigma²)): exp(−(logit t − mu)²/(2σ²)) / (√(2π)·σ·t·(1 − t)),
    its factors in the published order (so that float32 rounds as there)."""
    t = t.clamp(LOGIT_CLAMP, 1 - LOGIT_CLAMP)
    logit = torch.log(t / (1 - t))
    return 1 / (math.sqrt(2 * math.pi) * sigma * t * (1 - t)) * torch.exp(-(logit - mu) ** 2 / (2 * sigma**2))


def interval_density(levels: torch.Tensor, centre: float, soft_sigma: float) -> torch.Tensor:
    """The logit-normal density around `centre` at each noise level, normalised to sum 1: (T,) → (T,).

    Non-finite values and the levels 0 and 1 exactly get 0; if almost nothing is left (sum ≤ 1e-6, a centre far
    outside the grid), every level gets 1/T, as published.
    """
    levels = levels.float()
    density = logit_normal_density(levels.clamp(CLAMP, 1 - CLAMP), centre, soft_sigma)
    density = torch.where(torch.isfinite(density) & (levels != 0) & (levels != 1), density, torch.zeros_like(density))
    total = density.sum()
    return density / total if total > CLAMP else torch.full_like(density, 1 / len(density))


def with_last_step(p: torch.Tensor) -> torch.Tensor:
    """(T,) strengths at σ_0 … σ_{T−1} → (T + 1,): γ of the initial perturbation, then of steps 0 … T−1."""
    return torch.cat([p, p.new_zeros(1)])


def interval_gammas(levels: torch.Tensor, z: torch.Tensor, mu: float, sigma: float, churn_weight: float,
                    churn_weight_sigma: float, soft_sigma: float) -> torch.Tensor:
    """The interval schedule of one pair from its two normal draws z: (T,) levels → (T + 1,) γ."""
    centre = (z[0] * sigma + mu).item()
    weight = torch.exp(z[1] * churn_weight_sigma + math.log(churn_weight)).item()
    return with_last_step(torch.exp(interval_density(levels, centre, soft_sigma) * weight) - 1)


def prior_gammas(levels: torch.Tensor, z: torch.Tensor, churn_weight: float, churn_weight_sigma: float
                 ) -> torch.Tensor:
    """The prior schedule of one pair from its normal draw z[0]: churn only at the level nearest σ = 1."""
    weight = torch.exp(z[0] * churn_weight_sigma + math.log(churn_weight)).item()
    dirac = torch.zeros_like(levels, dtype=torch.float32)
    dirac[torch.argmin((levels.float() - 1).abs())] = 1.0
    return with_last_step(torch.exp(dirac * weight) - 1)
