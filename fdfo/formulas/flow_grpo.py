"""Flow-GRPO (Liu et al., 2025, "Flow-GRPO: Training Flow Matching Models via Online RL", arXiv:2505.05470).

The ODE sampler turned into the SDE with the same marginals (§4.1, "From ODE to SDE"), the Gaussian
log-density of one step, group-relative advantages and the clipped GRPO objective with its KL penalty (§3,
§4.1). Written from the formulas of the authors' code (github.com/yifan123/flow_grpo @ ac4c86e):
flow_grpo/diffusers_patch/sd3_sde_with_logprob.py, scripts/train_sd3.py, flow_grpo/stat_tracking.py. Where the
code and the paper's text differ we follow the code (see kl_penalty and step_log_prob).

Convention: x_σ = (1 − σ)·x0 + σ·ε, v = ε − x0, σ decreasing from 1 to 0 during sampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def _per_sample(s: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A float or a (B,) tensor as float32 shaped (B, 1, …, 1) to broadcast against (B, C, h, w)."""
    s = torch.as_tensor(s, dtype=torch.float32, device=like.device)
    return s.reshape(-1, *[1] * (like.dim() - 1)) if s.dim() else s


def diffusion_coefficient(sigma: torch.Tensor, noise_level: float, sigma_max: float) -> torch.Tensor:
    """σ_t = a·sqrt(σ/(1 − σ)), with σ_max put in the denominator where σ = 1 (there it would be infinite)."""
    return noise_level * torch.sqrt(sigma / (1 - sigma.masked_fill(sigma == 1, sigma_max)))


@dataclass
class SdeStep:
    next: torch.Tensor  # x at σ_next: mean + std·noise
    mean: torch.Tensor  # mean of the Gaussian transition
    std: torch.Tensor  # its std σ_t·sqrt(σ − σ_next), (B, 1, 1, 1) or a scalar
    sigma_t: torch.Tensor  # σ_t alone (std_dev_t in their code): train_sd3.py's KL divides by it


def sde_step(x: torch.Tensor, v: torch.Tensor, sigma: float | torch.Tensor, sigma_next: float | torch.Tensor,
             noise_level: float, noise: torch.Tensor, *, sigma_max: float) -> SdeStep:
    """x' = x + [v + σ_t²/(2σ)·(x + (1 − σ)·v)]·dt + σ_t·sqrt(−dt)·noise, with dt = σ_next − σ < 0.

    sigma_max only matters at σ = 1; their code takes the schedule's second sigma (scheduler.sigmas[1]).
    """
    x, v = x.float(), v.float()  # bf16 overflows in the drift (their comment); float32 as everywhere here
    sigma, sigma_next = _per_sample(sigma, x), _per_sample(sigma_next, x)
    dt = sigma_next - sigma
    sigma_t = diffusion_coefficient(sigma, noise_level, sigma_max)
    # ∇log p(x_σ) = −(x + (1 − σ)·v)/σ: the Euler drift minus σ_t²/2 times the score keeps the marginals.
    mean = x + (v + sigma_t**2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt
    std = sigma_t * torch.sqrt(-dt)
    return SdeStep(next=mean + std * noise, mean=mean, std=std, sigma_t=sigma_t)


def step_log_prob(x_next: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Mean over elements of log N(x' | mean, std²) = −(x' − mean)²/(2·std²) − log std − log sqrt(2π): (B,).

    A mean, not the sum a full log-density would be (the code's choice; it sets the scale clip_range works on).
    x' is detached: the gradient reaches the policy through the mean only.
    """
    std = torch.as_tensor(std, dtype=torch.float32, device=mean.device)
    logp = -(x_next.detach().float() - mean) ** 2 / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return logp.flatten(1).mean(dim=1)


def group_advantages(rewards: torch.Tensor, groups: torch.Tensor, global_std: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """A_i = (R_i − mean of i's group)/(std + eps): std over the whole batch if global_std, else i's group's.

    Population stds (ddof 0) as np.std. global_std=True is the SD3.5-M recipe (config/grpo.py); the paper's
    text normalises by the group's own std (global_std=False).
    """
    rewards = rewards.float()
    _, index = torch.unique(groups, return_inverse=True)
    count = torch.bincount(index).float()
    group_mean = torch.zeros_like(count).index_add_(0, index, rewards) / count
    centred = rewards - group_mean[index]
    if global_std:
        std = rewards.std(unbiased=False)
    else:
        std = (torch.zeros_like(count).index_add_(0, index, centred**2) / count).sqrt()[index]
    return centred / (std + eps)


def clipped_policy_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                        clip_range: float, adv_clip_max: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mean of max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε)), ρ = exp(log π − log π_old), A clipped to ±adv_clip_max.

    Returns (loss, ρ detached, clipfrac = fraction of items with |ρ − 1| > ε), for one denoising step.
    """
    adv = advantages.clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob - old_log_prob)
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range)).mean()
    clipfrac = ((ratio.detach() - 1).abs() > clip_range).float().mean()
    return loss, ratio.detach(), clipfrac


def kl_penalty(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """mean over items of mean((μ_θ − μ_ref)²)/(2·std²), the KL of two Gaussians of one std (per element).

    train_sd3.py passes σ_t (SdeStep.sigma_t), not the transition std σ_t·sqrt(−dt): its value is dt times
    the exact KL that the paper writes, ‖μ_θ − μ_ref‖²/(2σ_t²·Δt). Pass SdeStep.std for the exact one.
    """
    std = torch.as_tensor(std, dtype=torch.float32, device=mean.device)
    per_item = (mean - ref_mean) ** 2 / (2 * std**2)
    return per_item.flatten(1).mean(dim=1).mean()


# The published SD3.5-M recipe: config/grpo.py pickscore_sd3() on top of config/base.py (flow_grpo @ ac4c86e).
DEFAULTS = {
    "model": "stabilityai/stable-diffusion-3.5-medium",  # config/grpo.py
    "num_steps": 10,  # config/grpo.py sample.num_steps (training rollouts)
    "eval_num_steps": 40,  # config/grpo.py sample.eval_num_steps (ODE, noise_level 0: scripts/train_sd3.py)
    "noise_level": 0.7,  # config/base.py sample.noise_level, a in σ_t = a·sqrt(σ/(1 − σ))
    "group_size": 24,  # config/grpo.py sample.num_image_per_prompt
    "groups_per_epoch": 48,  # config/grpo.py: num_batches_per_epoch = 48/(32 GPUs·9/24) = 4
    "global_std": True,  # config/grpo.py sample.global_std
    "adv_eps": 1e-4,  # flow_grpo/stat_tracking.py, added to the std
    "clip_range": 1e-4,  # config/base.py train.clip_range
    "adv_clip_max": 5.0,  # config/base.py train.adv_clip_max
    "kl_beta": 0.01,  # config/grpo.py train.beta
    "learning_rate": 3e-4,  # config/base.py train.learning_rate (AdamW)
    "adam_betas": (0.9, 0.999),  # config/base.py
    "adam_weight_decay": 1e-4,  # config/base.py
    "adam_eps": 1e-8,  # config/base.py
    "max_grad_norm": 1.0,  # config/base.py
    "timestep_fraction": 0.99,  # config/grpo.py: scripts/train_sd3.py trains steps 0…int(10·0.99) − 1 = 0…8
    "guidance_scale": 4.5,  # config/grpo.py; CFG also in training (config/base.py train.cfg), uncond detached
    "resolution": 512,  # config/grpo.py
    "lora_rank": 32,  # scripts/train_sd3.py LoraConfig(r=32)
    "lora_alpha": 64,  # scripts/train_sd3.py; on attn to_q/k/v/out.0 and add_q/k/v_proj/to_add_out
    "num_gpus": 32,  # config/grpo.py gpu_number
    "sample_batch_size": 9,  # config/grpo.py sample.train_batch_size, per GPU
    "train_batch_size": 9,  # config/grpo.py train.batch_size, per GPU
    "gradient_accumulation_steps": 2,  # config/grpo.py num_batches_per_epoch // 2: 2 optimiser steps per epoch
    "num_inner_epochs": 1,  # config/grpo.py
    "ema_decay": 0.9,  # scripts/train_sd3.py EMAModuleWrapper(decay=0.9, update_step_interval=8): eval and checkpoints
    "ema_interval": 8,  # its update_step_interval, against the optimiser step count passed to ema.step
    # ema.step runs once per sampling batch of a GPU (sample_batch_size images), with the step count of the moment:
    # each count is passed to it gradient_accumulation_steps times (after the step, and for each batch to the next)
    "ema_repeats": 2,
    "mixed_precision": "fp16",  # config/base.py
}
