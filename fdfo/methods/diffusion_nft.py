"""DiffusionNFT (Zheng et al., 2025, arXiv 2509.16117) in the harness: ODE rollouts of a lagged old policy, its
final latents noised again at K of the sampler's levels, and the negative-aware loss weighted by the optimality
probability r. Its formulas: fdfo/formulas/diffusion_nft.py."""

from __future__ import annotations

from functools import partial

import torch

from fdfo import distributed
from fdfo.config import DiffusionNftConfig
from fdfo.formulas.diffusion_nft import (forward_noise, lagged_update, nft_loss, old_policy_decay, optimality_weight,
                                         train_timestep_indices)
from fdfo.harness.learner import Learner
from fdfo.harness.optimise import TrainingItems, split_items
from fdfo.harness.seeding import TRAINING_NOISE, image_generator
from fdfo.methods.base import Epoch, EpochScores
from fdfo.methods.groups import GroupMethod, GroupSignal, Groups, sample_groups
from fdfo.model.lora import swapped_in, trainable

OLD_POLICY = "old_policy"  # the lagged LoRA that samples: learner.copies[OLD_POLICY], <checkpoint>/old_policy/


class DiffusionNft(GroupMethod):
    section = "nft"
    positive = ("beta", "adv_clip_max")
    lora_copies = (OLD_POLICY,)

    def epoch(self, learner: Learner, epoch: Epoch) -> tuple[EpochScores, TrainingItems]:
        """The old policy moves towards the LoRA (η of the steps so far); ODE rollouts of the old policy; items
        (image, noise level) at K of the T sampler levels per image with fresh noise, the old policy's velocity at
        each; the negative-aware loss weighted by the optimality probability r."""
        nft = self.settings
        if learner.optimizer_steps:  # the previous epoch's update, made here so that a resume makes it too
            decay = old_policy_decay(learner.optimizer_steps, nft.decay_type)
            learner.copies[OLD_POLICY] = [lagged_update(old, p.detach(), decay)
                                          for old, p in zip(learner.copies[OLD_POLICY], trainable(learner.lora))]
        with swapped_in(learner.lora, learner.copies[OLD_POLICY]):
            groups = sample_groups(learner, epoch, self.sample, self.seed, nft.group_size, noise_level=0.0,
                                   solver=nft.solver, integer_timesteps=nft.integer_timesteps)
            with epoch.timer("old_policy"):
                x_t, sigma, v_old = self.old_policy_items(learner, groups, epoch.plan.micro_batch, epoch.index)
        with epoch.timer("share"):
            rewards = distributed.all_gather_tensor(groups.scores.total)
            optimality = optimality_weight(rewards, groups.group, nft.adv_clip_max, nft.global_std)
            sigmas = groups.rollouts.sigmas
            signal = GroupSignal(groups.cond, groups.group, optimality, sigmas, sigmas[1].item(), self.items_per_sample,
                                 self.sample.guidance_scale,
                                 final_latents=distributed.all_gather_tensor(groups.rollouts.final_latents))
            items = TrainingItems.shuffled([x_t, sigma, v_old], self.seed, epoch.index, epoch.plan.world_size,
                                           partial(micro_batch_loss, learner, signal=signal, nft=nft))
        return groups.record(), items

    @torch.no_grad()
    def old_policy_items(self, learner: Learner, groups: Groups, batch: int, epoch: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, its noise level, the old policy's velocity there) of every item of this rank: K of the T sampler
        levels per image, drawn with fresh noise from the image's own generator (TRAINING_NOISE)."""
        rollouts, K = groups.rollouts, self.items_per_sample
        device, T = rollouts.final_latents.device, len(rollouts.sigmas) - 1
        first_image = distributed.rank() * len(rollouts.final_latents)
        x_t, sigma = [], []
        for i, x0 in enumerate(rollouts.final_latents):
            generator = image_generator(self.seed, epoch, first_image + i, device, TRAINING_NOISE)
            levels = rollouts.sigmas[train_timestep_indices(T, K, generator)]
            noise = torch.randn((K, *x0.shape), generator=generator, device=device)
            x_t.append(forward_noise(x0.expand(K, *x0.shape), noise, levels))
            sigma.append(levels)
        x_t, sigma = torch.cat(x_t), torch.cat(sigma)
        image = torch.arange(len(x_t), device=device) // K
        cond = groups.cond.take(groups.group[image + first_image])
        v_old = torch.cat([learner.backbone.velocity(learner.backbone.transformer, x_t[b:b + batch], sigma[b:b + batch],
                                            cond.index(slice(b, b + batch)), self.sample.guidance_scale)
                           for b in range(0, len(x_t), batch)])
        return x_t, sigma, v_old


def micro_batch_loss(learner: Learner, rows: list[torch.Tensor], items: torch.Tensor, signal: GroupSignal,
                     nft: DiffusionNftConfig) -> dict[str, torch.Tensor]:
    """DiffusionNFT's loss of a micro-batch: v_θ at the noised final latents against the old policy's v there."""
    x_t, sigma, v_old = rows
    image, _ = split_items(items, signal.items_per_image)
    cond = signal.cond.take(signal.group[image])
    v_theta = learner.backbone.velocity(learner.model, x_t, sigma, cond, signal.guidance_scale)
    v_ref = learner.reference_velocity(x_t, sigma, cond, signal.guidance_scale) if nft.kl_weight > 0 else None
    terms = nft_loss(v_theta, v_old, signal.final_latents[image], x_t, sigma, signal.weight[image], nft.beta,
                     nft.adv_clip_max, v_ref, nft.kl_weight)
    return {"loss": terms.loss, "policy_loss": terms.policy_loss, "kl": terms.kl, "positive_loss": terms.positive_loss,
            "negative_loss": terms.negative_loss, "old_deviate": terms.old_deviate}
