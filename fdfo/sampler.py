"""Paired trajectories of the flow ODE with churn (paper §2; SD3 convention x_t = (1 − t) x_data + t ε).

Rows 2k and 2k+1 of every tensor are the two branches of pair k: they start from the same base
noise and differ only through the fresh churn noise each branch receives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

from fdfo.flow_grpo import sde_step, step_log_prob
from fdfo.sd3 import PromptEmbeds, decode_latents, latent_shape, predict_velocity


@dataclass
class Trajectories:
    """What training needs of a batch of 2P sampled trajectories (float32 unless stated)."""

    inputs: torch.Tensor  # x_i fed to the model at step i: (2P, T, C, h, w)
    velocities: torch.Tensor  # v_i the model produced at step i: (2P, T, C, h, w)
    sigmas: torch.Tensor  # noise levels σ_0 > … > σ_T = 0: (T + 1,)
    final_latents: torch.Tensor  # x_T: (2P, C, h, w)
    images: torch.Tensor  # decoded x_T in [0, 1]: (2P, 3, H, W)


def flow_sigmas(scheduler: FlowMatchEulerDiscreteScheduler, num_steps: int, device: torch.device) -> torch.Tensor:
    """σ_0 … σ_T = 0 of SD3's flow-match Euler scheduler (with its shift), float32."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)  # leave the pipeline's own untouched
    scheduler.set_timesteps(num_steps, device=device)
    return scheduler.sigmas.to(device=device, dtype=torch.float32)


def churn_schedule(num_steps: int, churn_weight: float) -> list[float]:
    """γ of the initial perturbation, then of steps 0 … T−1 ("raw" schedule: γ everywhere but the last step)."""
    return [churn_weight] + [churn_weight] * (num_steps - 1) + [0.0]


def perturb_initial(x: torch.Tensor, gamma: float, noise: torch.Tensor) -> torch.Tensor:
    """Mix fresh noise into the starting noise, keeping unit variance."""
    return x / (1 + gamma) + math.sqrt((1 + gamma) ** 2 - 1) / (1 + gamma) * noise


def churned_euler_step(x: torch.Tensor, v: torch.Tensor, t: torch.Tensor, s: torch.Tensor, gamma: float,
                       noise: torch.Tensor | None) -> torch.Tensor:
    """One step from noise level t to s: Euler past s to r = s/(1+γ−γs), then re-noise back to exactly s."""
    if gamma == 0:
        return x + (s - t) * v
    r = s / (1 + gamma - gamma * s)
    x_overshoot = x + (r - t) * v
    return x_overshoot / (1 + gamma * r) + r * math.sqrt((1 + gamma) ** 2 - 1) / (1 + gamma * r) * noise


def branch_noise(generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Fresh N(0, I) for both branches of every pair, each pair from its own generator: (2P, *shape)."""
    return torch.stack([torch.randn(shape, generator=g, device=device) for g in generators for _ in range(2)])


@torch.no_grad()
def sample_pairs(pipe: StableDiffusion3Pipeline, cond: PromptEmbeds, generators: list[torch.Generator],
                 num_steps: int = 40, churn_weight: float = 0.0025, guidance_scale: float = 1.0,
                 resolution: int | None = None) -> Trajectories:
    """Sample the pairs of one batch: `cond` holds one row per pair, `generators` one generator per pair.

    A pair's noise comes only from its own generator (base noise, then churn of branch a and b at
    every step), so a pair is the same whatever batch or rank it is sampled in.
    """
    if len(generators) != cond.embeds.shape[0]:
        raise ValueError(f"Need one generator per pair: {len(generators)} generators, {cond.embeds.shape[0]} prompts.")
    device = cond.embeds.device
    shape = latent_shape(pipe, resolution)
    sigmas = flow_sigmas(pipe.scheduler, num_steps, device)
    gammas = churn_schedule(num_steps, churn_weight)
    cond = cond.repeat_interleave(2)

    base = torch.stack([torch.randn(shape, generator=g, device=device) for g in generators])
    x = base.repeat_interleave(2, dim=0)
    if gammas[0] > 0:
        x = perturb_initial(x, gammas[0], branch_noise(generators, shape, device))
    inputs, velocities = [], []
    for i in range(num_steps):
        v = predict_velocity(pipe.transformer, x, sigmas[i], cond, guidance_scale)
        inputs.append(x)
        velocities.append(v)
        gamma = gammas[i + 1]
        noise = branch_noise(generators, shape, device) if gamma > 0 else None
        x = churned_euler_step(x, v, sigmas[i], sigmas[i + 1], gamma, noise)
    return Trajectories(
        inputs=torch.stack(inputs, dim=1), velocities=torch.stack(velocities, dim=1), sigmas=sigmas,
        final_latents=x, images=decode_latents(pipe, x, cond.embeds.dtype),
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
def sample_rollouts(pipe: StableDiffusion3Pipeline, cond: PromptEmbeds, generators: list[torch.Generator],
                    num_steps: int, noise_level: float, guidance_scale: float = 1.0,
                    resolution: int | None = None) -> Rollouts:
    """One trajectory per row of `cond`, each from its own generator: Flow-GRPO's marginal-preserving SDE with
    `noise_level` a > 0 (with the log-density of every step), or the Euler ODE with a = 0."""
    device = cond.embeds.device
    shape = latent_shape(pipe, resolution)
    sigmas = flow_sigmas(pipe.scheduler, num_steps, device)
    sigma_max = sigmas[1].item()  # Flow-GRPO's stand-in for σ = 1 in the SDE's coefficient
    x = torch.stack([torch.randn(shape, generator=g, device=device) for g in generators])
    inputs, log_probs = [], []
    for i in range(num_steps):
        v = predict_velocity(pipe.transformer, x, sigmas[i], cond, guidance_scale)
        inputs.append(x)
        if noise_level == 0:
            x = x + (sigmas[i + 1] - sigmas[i]) * v
            continue
        noise = torch.stack([torch.randn(shape, generator=g, device=device) for g in generators])
        step = sde_step(x, v, sigmas[i], sigmas[i + 1], noise_level, noise, sigma_max=sigma_max)
        log_probs.append(step_log_prob(step.next, step.mean, step.std))
        x = step.next
    return Rollouts(inputs=torch.stack(inputs, dim=1), log_probs=torch.stack(log_probs, dim=1) if log_probs else None,
                    sigmas=sigmas, final_latents=x, images=decode_latents(pipe, x, cond.embeds.dtype))
