"""DiffusionNFT (Zheng et al., 2025, "DiffusionNFT: Online Diffusion Reinforcement with Forward Process",
arXiv:2509.16117).

Reinforcement on the forward process: clean samples of the old policy are noised again, and the policy is
trained by flow matching through two implicit policies around the old one, weighted by the optimality
probability r (paper §3, the negative-aware loss; §4 for r, the adaptive loss weighting and the soft update of
the old policy). Written from the formulas of the authors' code (github.com/NVlabs/DiffusionNFT @ 24af555):
scripts/train_nft_sd3.py, config/nft.py, config/base.py; where the code and the paper's text differ we follow
the code (see nft_loss).

Convention: x_t = (1 − t)·x0 + t·ε, v = ε − x0, so x0 = x_t − t·v.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fdfo.formulas.flow_grpo import _per_sample, group_advantages


def forward_noise(x0: torch.Tensor, noise: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """x_t = (1 − t)·x0 + t·ε, t a float or one per sample."""
    t = _per_sample(t, x0)
    return (1 - t) * x0.float() + t * noise.float()


def optimality_weight(rewards: torch.Tensor, groups: torch.Tensor, adv_clip_max: float = 5.0,
                      global_std: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """r = clip(1/2 + clip(A, ±Z)/(2Z), 0, 1), A Flow-GRPO's per-prompt advantage and Z = adv_clip_max."""
    adv = group_advantages(rewards, groups, global_std=global_std, eps=eps).clamp(-adv_clip_max, adv_clip_max)
    return (adv / adv_clip_max / 2 + 0.5).clamp(0, 1)


def implicit_policies(v_theta: torch.Tensor, v_old: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """v⁺ = (1 − β)·v_old + β·v_θ and v⁻ = (1 + β)·v_old − β·v_θ; v_old is a constant (detached)."""
    v_old = v_old.detach()
    return (1 - beta) * v_old + beta * v_theta, (1 + beta) * v_old - beta * v_theta


def adaptive_x0_loss(v: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """mean((x̂0 − x0)²)/sg(max(mean|x̂0 − x0|, 1e-5)) per sample, x̂0 = x_t − t·v: (B,).

    Since x̂0 − x0 = t·(ε − x0 − v), this is t·mean(e²)/sg(mean|e|) with e the velocity error: the weight
    cancels the scale of the error (its gradient keeps only the direction), per sample and per branch.
    """
    err = x_t - t * v - x0
    with torch.no_grad():  # float64 as the code, which then promotes the loss; we come back to float32
        weight = err.double().abs().flatten(1).mean(dim=1).clamp(min=1e-5).to(err.dtype)
    return err.pow(2).flatten(1).mean(dim=1) / weight


@dataclass
class NftLoss:
    loss: torch.Tensor  # scalar to back-propagate: policy_loss + kl_weight·kl
    policy_loss: torch.Tensor  # scalar, detached
    unweighted_policy_loss: torch.Tensor  # mean of r·L⁺/β + (1 − r)·L⁻/β, without the adv_clip_max factor
    positive_loss: torch.Tensor  # mean L⁺, detached
    negative_loss: torch.Tensor  # mean L⁻, detached
    kl: torch.Tensor  # mean((v_θ − v_ref)²), 0 without v_ref
    old_deviate: torch.Tensor  # mean((v_θ − v_old)²): how far the policy has moved from the old one


def nft_loss(v_theta: torch.Tensor, v_old: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
             t: float | torch.Tensor, r: torch.Tensor, beta: float, adv_clip_max: float = 5.0,
             v_ref: torch.Tensor | None = None, kl_weight: float = 0.0) -> NftLoss:
    """Z·mean_i[r_i·L⁺_i/β + (1 − r_i)·L⁻_i/β] + kl_weight·mean((v_θ − v_ref)²), L^± = adaptive_x0_loss(v^±).

    The paper's loss is r·‖v⁺ − v‖² + (1 − r)·‖v⁻ − v‖² with v = ε − x0; the code measures it in x0 space
    with the adaptive weight, divides by β and multiplies by Z = adv_clip_max. The noise ε is implicit in x_t.
    """
    v_theta, x0, x_t = v_theta.float(), x0.float(), x_t.float()
    t = _per_sample(t, x0)
    v_pos, v_neg = implicit_policies(v_theta, v_old.float(), beta)
    pos, neg = adaptive_x0_loss(v_pos, x0, x_t, t), adaptive_x0_loss(v_neg, x0, x_t, t)
    per_item = r * pos / beta + (1 - r) * neg / beta
    policy_loss = (per_item * adv_clip_max).mean()
    if v_ref is not None:
        kl = (v_theta - v_ref.float()).pow(2).flatten(1).mean(dim=1).mean()
        loss = policy_loss + kl_weight * kl
    else:
        kl, loss = torch.zeros((), device=x0.device), policy_loss
    return NftLoss(loss=loss, policy_loss=policy_loss.detach(), unweighted_policy_loss=per_item.mean().detach(),
                   positive_loss=pos.mean().detach(), negative_loss=neg.mean().detach(), kl=kl.detach(),
                   old_deviate=(v_theta - v_old).pow(2).mean().detach())


# decay_type → (flat, uprate, uphold) of train_nft_sd3.py's schedule; the SD3.5-M pickscore recipe uses 1.
DECAY_SCHEDULES = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}


def old_policy_decay(step: int, decay_type: int = 1) -> float:
    """η = 0 before `flat` optimiser steps, then min((step − flat)·uprate, uphold)."""
    flat, uprate, uphold = DECAY_SCHEDULES[decay_type]
    return 0.0 if step < flat else min((step - flat) * uprate, uphold)


def lagged_update(old: torch.Tensor, new: torch.Tensor, decay: float) -> torch.Tensor:
    """θ_old ← η·θ_old + (1 − η)·θ, applied to every LoRA weight after each epoch's training."""
    return decay * old + (1 - decay) * new


def train_timestep_indices(num_steps: int, num_train: int, generator: torch.Generator) -> torch.Tensor:
    """(num_train,) indices into the sampler's σ grid for one sample: a random permutation's first num_train."""
    return torch.randperm(num_steps, generator=generator, device=generator.device)[:num_train]


# The published SD3.5-M recipe: config/nft.py sd3_pickscore() → _get_config() on config/base.py (@ 24af555).
DEFAULTS = {
    "model": "stabilityai/stable-diffusion-3.5-medium",  # config/nft.py
    "num_steps": 10,  # config/nft.py sample.num_steps (rollouts of the old policy)
    "solver": "dpm2",  # config/nft.py sample.solver, sample.deterministic = True: ODE rollouts, no SDE
    "eval_num_steps": 40,  # config/nft.py; eval uses the "flow" (Euler) solver, scripts/train_nft_sd3.py
    "guidance_scale": 1.0,  # config/nft.py: CFG-free in sampling, training and eval
    "resolution": 512,  # config/nft.py
    "group_size": 24,  # config/nft.py sample.num_image_per_prompt
    "groups_per_epoch": 48,  # config/nft.py num_groups
    "beta": 1.0,  # config/nft.py config.beta, the β of the implicit policies
    "kl_weight": 1e-4,  # config/nft.py train.beta, weight of mean((v_θ − v_ref)²) to the base model
    "adv_clip_max": 5.0,  # config/base.py train.adv_clip_max, Z in r
    "global_std": True,  # config/base.py sample.global_std
    "adv_mode": "all",  # config/nft.py train.adv_mode: advantages of both signs
    "learning_rate": 3e-4,  # config/base.py train.learning_rate (AdamW)
    "adam_betas": (0.9, 0.999),  # config/base.py
    "adam_weight_decay": 1e-4,  # config/base.py
    "adam_eps": 1e-8,  # config/base.py
    "max_grad_norm": 1.0,  # config/base.py
    "timestep_fraction": 0.99,  # config/base.py: int(10·0.99) = 9 of the 10 sampler σ per sample, at random
    "decay_type": 1,  # config/nft.py: old-policy η = min(0.001·step, 0.5), scripts/train_nft_sd3.py
    "lora_rank": 32,  # scripts/train_nft_sd3.py LoraConfig(r=32); the old policy is a second adapter
    "lora_alpha": 64,  # scripts/train_nft_sd3.py
    "num_gpus": 8,  # config/nft.py sd3_pickscore n_gpus
    "sample_batch_size": 9,  # config/nft.py: largest bsz with 48·24 % (8·bsz) == 0 and 8·bsz % 24 == 0
    "train_batch_size": 9,  # config/nft.py
    "gradient_accumulation_steps": 16,  # config/nft.py: 1152/(8·9) batches, one optimiser step per epoch
    "num_inner_epochs": 1,  # config/base.py
    "ema_decay": 0.9,  # scripts/train_nft_sd3.py EMAModuleWrapper(decay=0.9, update_step_interval=1): eval and checkpoints
    "ema_interval": 1,
    "ema_repeats": 1,  # ema.step once after each optimiser step
    "mixed_precision": "fp16",  # config/base.py
}


def dpm2_step(x: torch.Tensor, x0: torch.Tensor, x0_previous: torch.Tensor | None, sigmas: torch.Tensor,
              i: int) -> torch.Tensor:
    """Step i of DiffusionNFT's rollout solver `dpm2` (its flow_grpo/diffusers_patch/solver.py `dpm_step`, order 2):
    multistep DPM-Solver++(2M) in x0 form on the levels σ_0 = 1 > … > σ_T = 0, from x̂0 = x − σ_i·v of this step
    and the last. The first and the last step are DDIM steps (η = 0): x' = (1 − t)·x̂0 + t·(x − (1 − s)·x̂0)/s;
    the others second order in λ = log((1 − σ)/σ), where step 1's λ(σ_0 = 1) = −∞ makes it first order.
    Coefficients in float64, as published; x, x̂0 float32."""
    s64, last = sigmas.to(torch.float64), len(sigmas) - 2
    if i == 0 or i == last:
        t, s = s64[i + 1], s64[i]
        noise = (x - (1 - s) * x0) / s
        return (1 - t) * x0 + t * noise  # theirs: sqrt(t² − ρ²) with ρ = η·… = 0, exactly t
    t, s0, s1 = s64[i + 1], s64[i], s64[i - 1]
    log_snr = lambda sigma: torch.log(1 - sigma) - torch.log(sigma)  # noqa: E731
    h, h_0 = log_snr(t) - log_snr(s0), log_snr(s0) - log_snr(s1)
    d1 = (1.0 / (h_0 / h)) * (x0 - x0_previous)
    return (t / s0) * x - ((1 - t) * (torch.exp(-h) - 1.0)) * x0 - 0.5 * ((1 - t) * (torch.exp(-h) - 1.0)) * d1
