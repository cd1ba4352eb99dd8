"""The FDFO paper's gradient ablations (Fig. 8, rows I and J): the exact reward gradient in place of the finite
difference, through FDFO's own formulas, and Reward Score Matching's time weights of that gradient.

FDFO's finite difference of a pair (fdfo/formulas/estimator.py) gives each sample d = dx / mean(dx²) and
dR = (R_a − R_b)/2 ≈ ∇R·dx. The gradient variants keep the pair's displacement size and turn it towards the
gradient: a virtual pair displaced by dx = s·g/rms(g), s the rms of the real pair's dx, whose reward
difference is, to first order, ∇R·dx — the same two formulas, the direction exact.
"""

from __future__ import annotations

from typing import Literal

import torch

from fdfo.formulas.estimator import normalise

TimeWeight = Literal["constant", "linear", "quadratic"]


def rms(x: torch.Tensor) -> torch.Tensor:
    """√mean(x²) over each sample's elements: (B, ...) → (B,)."""
    return x.pow(2).flatten(1).mean(dim=1).sqrt()


def virtual_pair(gradient: torch.Tensor, displacement_rms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d, dR) of a virtual pair displaced along `gradient` by `displacement_rms` per sample: dx = s·g/rms(g),
    d = normalise(dx), dR = Σ g·dx = s·D·rms(g) ≥ 0. A zero gradient gives d = 0 and dR = 0."""
    shape = (-1, *[1] * (gradient.dim() - 1))
    unit = gradient / rms(gradient).clamp_min(torch.finfo(gradient.dtype).tiny).view(shape)
    dx = displacement_rms.view(shape) * unit
    return normalise(dx), (gradient * dx).flatten(1).sum(dim=1)


def time_weight(sigma: torch.Tensor, kind: TimeWeight) -> torch.Tensor:
    """η(σ) of Reward Score Matching's first-order targets v_ref − η(σ)·λ·∇R: 1 (FDFO's), 1 − σ (RSM's own,
    `eta_mode` linear) or (1 − σ)² (its baseline's, quad)."""
    if kind == "constant":
        return torch.ones_like(sigma)
    return (1 - sigma) if kind == "linear" else (1 - sigma) ** 2
