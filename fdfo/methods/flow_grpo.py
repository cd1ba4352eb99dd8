"""Flow-GRPO (Liu et al., 2025, arXiv 2505.05470) in the harness: SDE rollouts with their step log-densities,
per-prompt advantages, items (image, step) of the first int(T · timestep_fraction) steps, and the clipped policy
loss with the KL to the LoRA-free model. Its formulas: fdfo/formulas/flow_grpo.py."""

from __future__ import annotations

from functools import partial

import torch

from fdfo import distributed
from fdfo.config import FlowGrpoConfig
from fdfo.formulas.flow_grpo import clipped_policy_loss, group_advantages, kl_penalty, sde_step, step_log_prob
from fdfo.harness.learner import Learner
from fdfo.harness.optimise import TrainingItems, split_items
from fdfo.methods.base import Epoch, EpochScores
from fdfo.methods.groups import GroupMethod, GroupSignal, sample_groups


class FlowGrpo(GroupMethod):
    section = "grpo"
    positive = ("noise_level", "clip_range", "adv_clip_max")

    def epoch(self, learner: Learner, epoch: Epoch) -> tuple[EpochScores, TrainingItems]:
        grpo, K = self.settings, self.items_per_sample
        groups = sample_groups(learner, epoch, self.sample, self.seed, grpo.group_size, grpo.noise_level)
        with epoch.timer("share"):
            rewards = distributed.all_gather_tensor(groups.scores.total)
            rollouts = groups.rollouts
            signal = GroupSignal(groups.cond, groups.group, group_advantages(rewards, groups.group, grpo.global_std),
                                 rollouts.sigmas, rollouts.sigmas[1].item(), K, self.sample.guidance_scale)
            after = torch.cat([rollouts.inputs[:, 1:], rollouts.final_latents[:, None]], dim=1)  # x_{i+1} of step i
            local = [rollouts.inputs[:, :K].flatten(0, 1), after[:, :K].flatten(0, 1),
                     rollouts.log_probs[:, :K].flatten()]
            items = TrainingItems.shuffled(local, self.seed, epoch.index, epoch.plan.world_size,
                                           partial(micro_batch_loss, learner, signal=signal, grpo=grpo))
        return groups.record(), items


def micro_batch_loss(learner: Learner, rows: list[torch.Tensor], items: torch.Tensor, signal: GroupSignal,
                     grpo: FlowGrpoConfig) -> dict[str, torch.Tensor]:
    """Flow-GRPO's loss of a micro-batch: each step's log-density under v_θ against the one sampled."""
    x, x_next, old_log_prob = rows
    image, t = split_items(items, signal.items_per_image)
    sigmas, guidance = signal.sigmas, signal.guidance_scale
    cond = signal.cond.take(signal.group[image])

    def transition(v: torch.Tensor):
        return sde_step(x, v, sigmas[t], sigmas[t + 1], grpo.noise_level, torch.zeros_like(x),
                        sigma_max=signal.sigma_max)
    # As published, no gradient through the empty prompt's velocity under CFG.
    step = transition(learner.backbone.velocity(learner.model, x, sigmas[t], cond, guidance, detach_uncond=True))
    policy_loss, ratio, clipfrac = clipped_policy_loss(step_log_prob(x_next, step.mean, step.std), old_log_prob,
                                                       signal.weight[image], grpo.clip_range, grpo.adv_clip_max)
    kl = torch.zeros((), device=x.device)
    if grpo.kl_weight > 0:
        reference = transition(learner.reference_velocity(x, sigmas[t], cond, guidance))
        kl = kl_penalty(step.mean, reference.mean, step.sigma_t)  # as published: σ_t, not the transition's std
    return {"loss": policy_loss + grpo.kl_weight * kl, "policy_loss": policy_loss.detach(), "kl": kl.detach(),
            "clipfrac": clipfrac, "ratio_dev": (ratio - 1).abs().mean()}
