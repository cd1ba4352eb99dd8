"""Reward Score Matching, zeroth order (Lee, Chang, Kim, Ye, arXiv 2604.17415), its SD3.5-M recipe in the harness:
per seed an ODE trajectory with SDE branches off its first states, each branch carried to σ = 0 and scored;
advantages within the branches of one (seed, step); the hinge matching loss with `fair_clip2`, and the KL to the
base model on the branch rows and at the ODE states of the steps without branches (the anchors).
Formulas: fdfo/formulas/rsm.py; the sampler: fdfo/model/sampler.py `sample_branches`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch

from fdfo import distributed
from fdfo.config import ConfigError, RsmConfig, TrainConfig
from fdfo.formulas.flow_grpo import diffusion_coefficient, group_advantages, sde_step
from fdfo.formulas.rsm import hinge_matching_loss, mean_active_branches, step_kl
from fdfo.harness.batching import BatchPlan
from fdfo.harness.learner import Learner
from fdfo.harness.optimise import TrainingItems, step_sums
from fdfo.harness.rollouts import SamplingCall, sample_and_score
from fdfo.harness.seeding import image_generator, item_permutation
from fdfo.methods.base import Epoch, EpochScores, Method
from fdfo.model.sampler import sample_branches
from fdfo.model.backbone import PromptEmbeds


@dataclass
class RsmSignal:
    """What every rank needs to train on any branch row: the prompts, the noise levels, the settings."""

    cond: PromptEmbeds  # one row per prompt of every rank
    sigmas: torch.Tensor  # (T + 1,)
    sigma_max: float  # sigmas[1]: Flow-GRPO's stand-in for σ = 1 in the SDE's coefficient
    guidance_scale: float  # of the sampling, which training reproduces (CFG in both, as published)
    settings: RsmConfig
    k_mean: float  # k̄, the mean branch count of the branching steps


class Rsm(Method):
    settings = ("rsm",)

    def __init__(self, cfg: TrainConfig):
        self.sample, self.rsm, self.seed = cfg.sample, cfg.rsm, cfg.seed

    @property
    def items_per_sample(self) -> int:
        return 1  # a branch image: its row is the SDE step it left the trunk by

    @property
    def branches_per_seed(self) -> int:
        return sum(self.rsm.branches)

    def check(self) -> None:
        r, steps = self.rsm, self.sample.num_solver_steps
        if len(r.branches) != steps - 1 or any(k < 0 or k == 1 for k in r.branches) or not any(r.branches):
            raise ConfigError(f"--rsm.branches needs a branch count for each of the steps 0 … T − 2 ({steps - 1} for "
                              f"--sample.num-solver-steps {steps}): 0, or 2 or more (advantages compare a step's "
                              f"branches), at least one above 0; got {' '.join(map(str, r.branches))}.")
        anchors = r.branches.count(0)
        if r.kl_anchor and r.kl_weight > 0 and anchors > self.branches_per_seed:
            raise ConfigError(f"--rsm.branches has {anchors} steps without branches (KL anchors) and "
                              f"{self.branches_per_seed} branches per seed; each anchor rides on a branch row of its "
                              "seed: branch more, or --rsm.no-kl-anchor.")
        for flag, value in [("--rsm.seeds-per-prompt", r.seeds_per_prompt), ("--rsm.noise-level", r.noise_level),
                            ("--rsm.clip-range", r.clip_range), ("--rsm.adv-clip-max", r.adv_clip_max)]:
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"{flag} must be a finite number more than 0; got {value}.")
        if not (r.kl_weight >= 0 and math.isfinite(r.kl_weight)):
            raise ConfigError(f"--rsm.kl-weight must be a finite number, 0 or more; got {r.kl_weight}.")

    def check_plan(self, plan: BatchPlan) -> None:
        """A rank's images must be whole prompts: seeds_per_prompt seeds of branches_per_seed branches."""
        images, per_prompt = 2 * plan.pairs_per_rank, self.branches_per_seed * self.rsm.seeds_per_prompt
        if images % per_prompt:
            raise ConfigError(f"Each rank samples {images} images per epoch (2 × {plan.pairs_per_rank} pairs); that "
                              f"must be whole prompts of --rsm.seeds-per-prompt {self.rsm.seeds_per_prompt} seeds × "
                              f"{self.branches_per_seed} branches (--rsm.branches) = {per_prompt} images: change "
                              "--total-pairs-per-epoch.")

    def epoch(self, learner: Learner, epoch: Epoch) -> tuple[EpochScores, TrainingItems]:
        """This rank's seeds (global seeds rank·S … , each from its own seeded noise, `seeds_per_prompt` per prompt),
        their branches scored; a training row per branch, carrying one of its seed's anchors."""
        plan, r, device = epoch.plan, self.rsm, learner.backbone.transformer.device
        seeds = 2 * plan.pairs_per_rank // self.branches_per_seed
        first_seed, prompts_per_rank = distributed.rank() * seeds, seeds // r.seeds_per_prompt
        first_prompt = distributed.rank() * prompts_per_rank
        prompts = epoch.stream.prompts_for(epoch.index, range(first_prompt, first_prompt + prompts_per_rank))
        per_call = max(n for n in range(1, seeds + 1) if seeds % n == 0 and (
            n == 1 or n * self.branches_per_seed <= 2 * plan.sampling_batch))
        calls = [self.call(range(c, c + per_call), first_seed, prompts, epoch.index, device)
                 for c in range(0, seeds, per_call)]
        sampler = partial(sample_branches, num_steps=self.sample.num_solver_steps, branches=r.branches,
                          noise_level=r.noise_level, guidance_scale=self.sample.guidance_scale,
                          resolution=self.sample.resolution)
        sampled = sample_and_score(learner, prompts, calls, sampler, self.sample, plan.sampling_batch, epoch.timer,
                                   f"epoch {epoch.index} sampling")
        with epoch.timer("share"):
            batches, T = sampled.batches, self.sample.num_solver_steps
            seed = torch.cat([b.seed + c * per_call for c, b in enumerate(batches)])  # this rank's seed of each row
            step = torch.cat([b.step for b in batches])
            canonical = torch.argsort(seed * T + step, stable=True)  # rows by seed, step, branch: on any rank count
            seed, step = seed[canonical], step[canonical]
            rewards = sampled.scores.total[canonical]
            advantages = group_advantages(rewards, (first_seed + seed) * T + step, global_std=False).clamp(
                -r.adv_clip_max, r.adv_clip_max)  # within each (seed, step)
            signal_rows = advantages != 0
            if distributed.all_reduce_sum(signal_rows.sum().view(1)).item() == 0:  # nothing to learn: the KL on all
                signal_rows = torch.ones_like(signal_rows)
            k_mean = mean_active_branches(r.branches)
            weight = k_mean / torch.tensor(r.branches, device=device, dtype=torch.float32)[step]
            inputs, velocities, noise = (torch.cat([getattr(b, name) for b in batches])[canonical]
                                         for name in ("inputs", "velocities", "noise"))
            anchor_x, anchor_step = self.anchors(batches, seeds, torch.zeros_like(inputs))
            order = item_permutation(self.seed, epoch.index, plan.world_size * len(inputs))
            policy_scale, anchor_scale = (per_step_mean(order, rows, plan) for rows in (signal_rows, anchor_step >= 0))
            rows = [inputs, velocities, noise, advantages, weight, first_prompt + seed // r.seeds_per_prompt, step,
                    anchor_x, anchor_step, policy_scale, anchor_scale]
            sigmas = batches[0].sigmas
            signal = RsmSignal(sampled.cond.gather(), sigmas, sigmas[1].item(), self.sample.guidance_scale, r, k_mean)
            items = TrainingItems(rows, order, partial(micro_batch_loss, learner, signal=signal))
        image_prompts = [p for call in calls for p in call.image_prompts]
        return EpochScores(rewards, {k: v[canonical] for k, v in sampled.scores.terms.items()},
                           [image_prompts[i] for i in canonical.tolist()], sampled.first_images), items

    def call(self, seeds: range, first_seed: int, prompts: list[str], epoch: int, device: torch.device
             ) -> SamplingCall:
        """A sampling call of some of this rank's seeds; its images' prompts in the sampler's row order (step,
        then seed, then branch)."""
        prompt_of = [s // self.rsm.seeds_per_prompt for s in seeds]
        image_prompts = [prompts[prompt_of[s]] for k in self.rsm.branches for s in range(len(seeds)) for _ in range(k)]
        return SamplingCall(torch.tensor(prompt_of), [image_generator(self.seed, epoch, first_seed + s, device)
                                                      for s in seeds], image_prompts)

    def anchors(self, batches: list, seeds: int, anchor_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each seed's anchor states ride on its first branch rows (rows by seed; anchor step −1: a row without)."""
        anchor_step = torch.full((len(anchor_x),), -1, device=anchor_x.device)
        steps = batches[0].anchor_steps
        if not (self.rsm.kl_anchor and self.rsm.kl_weight > 0 and steps):
            return anchor_x, anchor_step
        rows = (torch.arange(seeds, device=anchor_x.device)[:, None] * self.branches_per_seed
                + torch.arange(len(steps), device=anchor_x.device)).flatten()
        anchor_x[rows] = torch.cat([b.anchors for b in batches])  # seed-major in every call
        anchor_step[rows] = torch.tensor(steps, device=anchor_x.device).repeat(seeds)
        return anchor_x, anchor_step


def per_step_mean(order: torch.Tensor, selected: torch.Tensor, plan: BatchPlan) -> torch.Tensor:
    """Per local row, the factor that makes Σ(value·factor) over a micro-batch, averaged by the harness over
    micro-batches and ranks, the mean of `value` over the selected rows of the whole optimiser step (the published
    code means over each micro-batch of one GPU: the same where every row is selected, as with continuous rewards)."""
    chosen = distributed.all_gather_tensor(selected.float())
    first = distributed.rank() * len(selected)
    factor = plan.world_size * plan.micro_batches_per_step * chosen / step_sums(order, chosen,
                                                                                plan.gradient_steps_per_epoch).clamp(min=1)
    return factor[first:first + len(selected)]


def sde_means(learner: Learner, x: torch.Tensor, v_theta: torch.Tensor, step: torch.Tensor, cond: PromptEmbeds,
              signal: RsmSignal) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SDE step's mean under the policy and under the base model at x, σ̃ and Δt: what the KL compares."""
    sigmas, a, sigma_max = signal.sigmas, signal.settings.noise_level, signal.sigma_max
    sigma, sigma_next = sigmas[step], sigmas[step + 1]
    v_ref = learner.reference_velocity(x, sigma, cond, signal.guidance_scale)
    zeros = torch.zeros_like(x)
    mean_theta = sde_step(x, v_theta, sigma, sigma_next, a, zeros, sigma_max=sigma_max).mean
    mean_ref = sde_step(x, v_ref, sigma, sigma_next, a, zeros, sigma_max=sigma_max).mean
    return mean_theta, mean_ref, diffusion_coefficient(sigma, a, sigma_max), sigma - sigma_next


def micro_batch_loss(learner: Learner, rows: list[torch.Tensor], items: torch.Tensor, signal: RsmSignal
                     ) -> dict[str, torch.Tensor]:
    """policy + β·(KL on the branch rows + KL at the anchors): the hinge and the branch KL averaged over the
    step's rows with a signal (A ≠ 0), each weighted by k̄/k_i; the anchors' KL, weighted by k̄, over its anchors."""
    x, v_old, noise, advantages, weight, prompt, step, anchor_x, anchor_step, policy_scale, anchor_scale = rows
    r, sigmas = signal.settings, signal.sigmas
    cond = signal.cond.take(prompt)
    v_theta = learner.backbone.velocity(learner.model, x, sigmas[step], cond, signal.guidance_scale)
    sigma, dt = sigmas[step], sigmas[step] - sigmas[step + 1]
    tilde_sigma = diffusion_coefficient(sigma, r.noise_level, signal.sigma_max)
    policy_rows = hinge_matching_loss(v_theta, v_old, noise, advantages, sigma, dt, tilde_sigma, r.clip_range) * weight
    policy = (policy_rows * policy_scale).sum()
    kl = torch.zeros((), device=x.device)
    if r.kl_weight > 0:
        kl = (step_kl(*sde_means(learner, x, v_theta, step, cond, signal)) * weight * policy_scale).sum()
        held = anchor_step >= 0
        if held.any():
            xa, sa, ca = anchor_x[held], anchor_step[held], signal.cond.take(prompt[held])
            va = learner.backbone.velocity(learner.model, xa, sigmas[sa], ca, signal.guidance_scale)
            kl = kl + (signal.k_mean * step_kl(*sde_means(learner, xa, va, sa, ca, signal)) * anchor_scale[held]).sum()
    return {"loss": policy + r.kl_weight * kl, "policy_loss": policy.detach(), "kl": kl.detach(),
            "clipfrac": ((policy_rows == 0).float() * policy_scale).sum()}  # stopped by the hinge, of the step's rows
