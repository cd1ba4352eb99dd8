"""Paired trajectories of the flow ODE with churn (paper §2; convention x_t = (1 − t) x_data + t ε), and the
baselines' single trajectories, for any backbone (fdfo/model/backbone.py).

Rows 2k and 2k+1 of every tensor are the two branches of pair k: they start from the same base
noise and differ only through the fresh churn noise each branch receives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from fdfo.formulas.churn import raw_gammas
from fdfo.formulas.diffusion_nft import dpm2_step
from fdfo.formulas.flow_grpo import sde_step, step_log_prob
from fdfo.model.backbone import Backbone, PromptEmbeds

# A churn schedule drawn per pair: (the sampler's σ_0 … σ_T, the pair's generator) → γ of the initial
# perturbation and of steps 0 … T−1, (T + 1,). The interval and prior schedules (fdfo/formulas/churn.py).
ChurnDraw = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass
class Trajectories:
    """What training needs of a batch of 2P sampled trajectories (float32 unless stated)."""

    inputs: torch.Tensor  # x_i fed to the model at step i: (2P, T, C, h, w)
    velocities: torch.Tensor  # v_i the model produced at step i: (2P, T, C, h, w)
    sigmas: torch.Tensor  # noise levels σ_0 > … > σ_T = 0: (T + 1,)
    final_latents: torch.Tensor  # x_T: (2P, C, h, w)
    images: torch.Tensor  # decoded x_T in [0, 1]: (2P, 3, H, W)


def per_row(gamma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """One γ per row, float64 (as a Python float would be), shaped to broadcast against `like`."""
    return gamma.double().view(-1, *[1] * (like.dim() - 1))


def perturb_initial(x: torch.Tensor, gamma: float | torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Mix fresh noise into the starting noise, keeping unit variance; γ one float, or one per row."""
    if isinstance(gamma, torch.Tensor):
        gamma = per_row(gamma, x)
        return x * (1 / (1 + gamma)).float() + (torch.sqrt((1 + gamma) ** 2 - 1) / (1 + gamma)).float() * noise
    return x / (1 + gamma) + math.sqrt((1 + gamma) ** 2 - 1) / (1 + gamma) * noise


def churned_euler_step(x: torch.Tensor, v: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
                       gamma: float | torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    """One step from noise level t to s: Euler past s to r = s/(1+γ−γs), then re-noise back to exactly s.

    γ is one float for every row, or one per row (a row with γ = 0 takes the plain Euler step); no noise: no churn.
    """
    if noise is None or (not isinstance(gamma, torch.Tensor) and gamma == 0):
        return x + (s - t) * v
    if isinstance(gamma, torch.Tensor):
        gamma = per_row(gamma, x)
        r = s.double() / (1 + gamma - gamma * s.double())
        return ((x + (r - t.double()).float() * v) * (1 / (1 + gamma * r)).float()
                + (r * torch.sqrt((1 + gamma) ** 2 - 1) / (1 + gamma * r)).float() * noise)
    r = s / (1 + gamma - gamma * s)
    x_overshoot = x + (r - t) * v
    return x_overshoot / (1 + gamma * r) + r * math.sqrt((1 + gamma) ** 2 - 1) / (1 + gamma * r) * noise


def branch_noise(generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device,
                 draw: list[bool] | None = None) -> torch.Tensor:
    """Fresh N(0, I) for both branches of every pair, each pair from its own generator: (2P, *shape). With
    `draw`, only the pairs marked True draw (the others get zeros), so a pair's draws never depend on its batch."""
    draw = [True] * len(generators) if draw is None else draw
    return torch.stack([torch.randn(shape, generator=g, device=device) if d else torch.zeros(shape, device=device)
                        for g, d in zip(generators, draw) for _ in range(2)])


def draw_gammas(churn: float | ChurnDraw, sigmas: torch.Tensor, generators: list[torch.Generator]
                ) -> list[float] | torch.Tensor:
    """γ of the initial perturbation and of every step: one list for all pairs (a float: the raw schedule), or
    (2P, T + 1) drawn per pair from the pair's generator before its noise, the same for both branches."""
    if not callable(churn):
        return raw_gammas(len(sigmas) - 1, churn)
    return torch.stack([churn(sigmas, g).to(sigmas.device) for g in generators]).repeat_interleave(2, dim=0)


def step_noise(gamma: float | torch.Tensor, generators: list[torch.Generator], shape: tuple[int, ...],
               device: torch.device) -> torch.Tensor | None:
    """The churn noise of one step: for every pair if γ > 0, for the pairs whose own γ > 0, or None."""
    if not isinstance(gamma, torch.Tensor):
        return branch_noise(generators, shape, device) if gamma > 0 else None
    draw = (gamma[0::2] > 0).tolist()
    return branch_noise(generators, shape, device, draw) if any(draw) else None


@torch.no_grad()
def sample_pairs(backbone: Backbone, cond: PromptEmbeds, generators: list[torch.Generator],
                 num_steps: int = 40, churn: float | ChurnDraw = 0.0025, guidance_scale: float = 1.0,
                 resolution: int | None = None) -> Trajectories:
    """Sample the pairs of one batch: `cond` holds one row per pair, `generators` one generator per pair;
    `churn` is the raw schedule's γ, or a schedule drawn per pair.

    A pair's randomness comes only from its own generator (its churn schedule, base noise, then churn of
    branch a and b at every step), so a pair is the same whatever batch or rank it is sampled in.
    """
    if len(generators) != cond.embeds.shape[0]:
        raise ValueError(f"Need one generator per pair: {len(generators)} generators, {cond.embeds.shape[0]} prompts.")
    device = cond.embeds.device
    shape = backbone.latent_shape(resolution)
    sigmas = backbone.sigmas(num_steps, resolution, device)
    gammas = draw_gammas(churn, sigmas, generators)
    gamma_at = (lambda i: gammas[i]) if isinstance(gammas, list) else (lambda i: gammas[:, i])  # noqa: E731
    cond = cond.repeat_interleave(2)

    base = torch.stack([torch.randn(shape, generator=g, device=device) for g in generators])
    x = base.repeat_interleave(2, dim=0)
    noise = step_noise(gamma_at(0), generators, shape, device)
    if noise is not None:
        x = perturb_initial(x, gamma_at(0), noise)
    inputs, velocities = [], []
    for i in range(num_steps):
        v = backbone.velocity(backbone.transformer, x, sigmas[i], cond, guidance_scale)
        inputs.append(x)
        velocities.append(v)
        noise = step_noise(gamma_at(i + 1), generators, shape, device)
        x = churned_euler_step(x, v, sigmas[i], sigmas[i + 1], gamma_at(i + 1), noise)
    return Trajectories(
        inputs=torch.stack(inputs, dim=1), velocities=torch.stack(velocities, dim=1), sigmas=sigmas,
        final_latents=x, images=backbone.decode_latents(x, cond.embeds.dtype),
    )


@dataclass
class Rollouts:
    """Single trajectories of the baselines (Flow-GRPO's SDE, DiffusionNFT's ODE), one row per image."""

    inputs: torch.Tensor  # x_i fed to the model at step i: (B, T, C, h, w)
    log_probs: torch.Tensor | None  # log-density of each SDE step as sampled: (B, T); None for the ODE
    sigmas: torch.Tensor  # (T + 1,)
    final_latents: torch.Tensor  # (B, C, h, w)
    images: torch.Tensor  # (B, 3, H, W) in [0, 1]


@torch.no_grad()
def sample_rollouts(backbone: Backbone, cond: PromptEmbeds, generators: list[torch.Generator],
                    num_steps: int, noise_level: float, guidance_scale: float = 1.0,
                    resolution: int | None = None, solver: str = "euler", integer_timesteps: bool = False
                    ) -> Rollouts:
    """One trajectory per row of `cond`, each from its own generator: Flow-GRPO's marginal-preserving SDE with
    `noise_level` a > 0 (with the log-density of every step), or the ODE with a = 0, by Euler steps or by
    DiffusionNFT's `dpm2` solver. `integer_timesteps`: the transformer sees ⌊1000σ⌋, as DiffusionNFT's pipeline
    feeds it."""
    device = cond.embeds.device
    shape = backbone.latent_shape(resolution)
    sigmas = backbone.sigmas(num_steps, resolution, device)
    sigma_max = sigmas[1].item()  # Flow-GRPO's stand-in for σ = 1 in the SDE's coefficient
    x = torch.stack([torch.randn(shape, generator=g, device=device) for g in generators])
    inputs, log_probs, x0_previous = [], [], None
    for i in range(num_steps):
        v = backbone.velocity(backbone.transformer, x, sigmas[i], cond, guidance_scale, integer_timestep=integer_timesteps)
        inputs.append(x)
        if noise_level == 0 and solver == "dpm2":
            x0 = x - sigmas[i] * v
            x, x0_previous = dpm2_step(x, x0, x0_previous, sigmas, i), x0
            continue
        if noise_level == 0:
            x = x + (sigmas[i + 1] - sigmas[i]) * v
            continue
        noise = torch.stack([torch.randn(shape, generator=g, device=device) for g in generators])
        step = sde_step(x, v, sigmas[i], sigmas[i + 1], noise_level, noise, sigma_max=sigma_max)
        log_probs.append(step_log_prob(step.next, step.mean, step.std))
        x = step.next
    return Rollouts(inputs=torch.stack(inputs, dim=1), log_probs=torch.stack(log_probs, dim=1) if log_probs else None,
                    sigmas=sigmas, final_latents=x, images=backbone.decode_latents(x, cond.embeds.dtype))


@dataclass
class Branches:
    """Reward Score Matching's rollouts (fdfo/formulas/rsm.py): per seed an ODE trajectory, SDE branches off it at
    some steps, each carried to σ = 0 by the ODE. Branch rows are step-major: step i, then seed, then branch."""

    inputs: torch.Tensor  # x_i of each branch's step: (B, C, h, w)
    velocities: torch.Tensor  # v_old(x_i), the sampling policy's velocity there: (B, C, h, w)
    noise: torch.Tensor  # ε of the branch's SDE step: (B, C, h, w)
    seed: torch.Tensor  # (B,) the branch's seed, a row of the call's conditioning
    step: torch.Tensor  # (B,) its step i
    anchors: torch.Tensor  # x_i of every seed at the steps without branches below T − 1: (S·A, C, h, w), seed-major
    anchor_steps: list[int]  # those steps (A of them)
    sigmas: torch.Tensor  # (T + 1,)
    final_latents: torch.Tensor  # (B, C, h, w)
    images: torch.Tensor  # (B, 3, H, W) in [0, 1]


@torch.no_grad()
def sample_branches(backbone: Backbone, cond: PromptEmbeds, generators: list[torch.Generator],
                    num_steps: int, branches: tuple[int, ...], noise_level: float, guidance_scale: float = 1.0,
                    resolution: int | None = None) -> Branches:
    """One ODE trajectory per row of `cond` (a seed, from its own generator: its start noise, then its branches'
    noise, step by step), `branches[i]` SDE branches off state x_i for i < T − 1, all continued together by the ODE."""
    device = cond.embeds.device
    shape = backbone.latent_shape(resolution)
    sigmas = backbone.sigmas(num_steps, resolution, device)
    sigma_max = sigmas[1].item()  # Flow-GRPO's stand-in for σ = 1, as in its SDE
    seeds = len(generators)
    x = torch.stack([torch.randn(shape, generator=g, device=device) for g in generators])
    states, velocities = [], {}
    for i in range(num_steps - 1):  # the trunk: x_0 … x_{T−2}, and v where a step branches or the trunk goes on
        states.append(x)
        if branches[i] > 0 or i < num_steps - 2:
            velocities[i] = backbone.velocity(backbone.transformer, x, sigmas[i], cond, guidance_scale)
        if i < num_steps - 2:
            x = x + (sigmas[i + 1] - sigmas[i]) * velocities[i]
    rows: dict[str, list[torch.Tensor]] = {"inputs": [], "velocities": [], "noise": [], "seed": [], "step": []}
    live, live_seed = torch.empty((0, *shape), device=device), torch.empty(0, dtype=torch.long, device=device)
    for j in range(1, num_steps):  # branches of step j − 1 join at σ_j; every live branch takes the ODE step j
        k = branches[j - 1]
        if k:
            noise = torch.stack([torch.randn((k, *shape), generator=g, device=device) for g in generators]).flatten(0, 1)
            seed = torch.arange(seeds, device=device).repeat_interleave(k)
            x_i, v_i = states[j - 1][seed], velocities[j - 1][seed]
            x_next = sde_step(x_i, v_i, sigmas[j - 1], sigmas[j], noise_level, noise, sigma_max=sigma_max).next
            for name, value in zip(rows, (x_i, v_i, noise, seed, torch.full_like(seed, j - 1))):
                rows[name].append(value)
            live, live_seed = torch.cat([live, x_next]), torch.cat([live_seed, seed])
        if len(live):
            v = backbone.velocity(backbone.transformer, live, sigmas[j], cond.index(live_seed), guidance_scale)
            live = live + (sigmas[j + 1] - sigmas[j]) * v
    anchor_steps = [i for i in range(num_steps - 1) if branches[i] == 0]
    anchors = (torch.stack([states[i] for i in anchor_steps], dim=1).flatten(0, 1) if anchor_steps
               else torch.empty((0, *shape), device=device))
    joined = {name: torch.cat(values) for name, values in rows.items()}
    return Branches(**joined, anchors=anchors, anchor_steps=anchor_steps, sigmas=sigmas, final_latents=live,
                    images=backbone.decode_latents(live, cond.embeds.dtype))
