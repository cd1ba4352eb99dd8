"""The baselines in fdfo's harness, Flow-GRPO and DiffusionNFT: an epoch's rollouts, rewards and training items.

Everything else is shared with FDFO: prompts, rewards, LoRA, batch plan, the exchange of items over the ranks,
logging, checkpoints and resume. Their formulas live in fdfo/flow_grpo.py and fdfo/diffusion_nft.py. An epoch
samples 2 × `total_pairs_per_epoch` images (the reward evaluations of an FDFO epoch of as many pairs), in groups of
`group_size` images of one prompt; an item is (image, noise level), int(T · timestep_fraction) of them per image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from fdfo import distributed
from fdfo.batching import BatchPlan
from fdfo.config import ConfigError, DiffusionNftConfig, FlowGrpoConfig, SampleConfig, TrainConfig
from fdfo.diffusion_nft import (forward_noise, lagged_update, nft_loss, old_policy_decay, optimality_weight,
                                train_timestep_indices)
from fdfo.ema import swapped_in, trainable
from fdfo.flow_grpo import clipped_policy_loss, group_advantages, kl_penalty, sde_step, step_log_prob
from fdfo.learner import Learner
from fdfo.optimise import TrainingItems
from fdfo.prompts import PromptStream
from fdfo.rewards import RewardOutput
from fdfo.sampler import Rollouts, sample_rollouts
from fdfo.sd3 import PromptEmbeds, predict_velocity
from fdfo.seeding import TRAINING_NOISE, image_generator, item_permutation
from fdfo.timing import PhaseTimer


@dataclass
class Scored:
    """What the epoch's record shows of a baseline's images (as FDFO's RankSamples)."""

    rewards: torch.Tensor  # (I,) this rank's images
    terms: dict[str, torch.Tensor]
    prompts: list[str]  # one per image
    first_images: torch.Tensor  # two images, for W&B


@dataclass
class Groups:
    """A rank's rollouts in groups of one prompt, and what every rank needs of every image's group."""

    rollouts: Rollouts
    scores: RewardOutput
    prompts: list[str]  # one per image of this rank
    cond: PromptEmbeds  # one row per group of every rank
    group: torch.Tensor  # (I·ranks,) every image's group: a row of `cond`


def check_groups(cfg: TrainConfig, plan: BatchPlan) -> None:
    """A baseline's images per rank must fill whole groups (a group's advantages compare its images)."""
    if cfg.method == "fdfo":
        return
    group_size = {"flow_grpo": cfg.grpo.group_size, "diffusion_nft": cfg.nft.group_size}[cfg.method]
    images = 2 * plan.pairs_per_rank
    if images % group_size:
        flag = "--grpo.group-size" if cfg.method == "flow_grpo" else "--nft.group-size"
        raise ConfigError(f"{flag} {group_size} must divide the {images} images each rank samples per epoch (2 × "
                          f"{plan.pairs_per_rank} pairs); pick a divisor, or change --total-pairs-per-epoch.")


def sample_groups(learner: Learner, stream: PromptStream, sample: SampleConfig, plan: BatchPlan, epoch: int,
                  timer: PhaseTimer, group_size: int, noise_level: float) -> Groups:
    """This rank's images of the epoch, each from its own seeded noise: global groups rank·G_r … , one prompt each
    (the stream's prompt at the group's position), `group_size` images per group, scored."""
    pipe, device = learner.pipe, learner.pipe.transformer.device
    images = 2 * plan.pairs_per_rank
    first_image, groups_per_rank = distributed.rank() * images, images // group_size
    first_group = distributed.rank() * groups_per_rank
    group_prompts = stream.prompts_for(epoch, range(first_group, first_group + groups_per_rank))
    with timer("encode"):
        cond = PromptEmbeds.cat(learner.encode([group_prompts[i:i + plan.sampling_batch]
                                                for i in range(0, groups_per_rank, plan.sampling_batch)], sample))
    pipe.transformer.eval()
    local_group = torch.arange(images, device=device) // group_size
    calls = [range(b, b + 2 * plan.sampling_batch) for b in range(0, images, 2 * plan.sampling_batch)]
    rollouts, scores = [], []
    for rows in tqdm(calls, desc=f"epoch {epoch} sampling", disable=not distributed.is_main(), leave=False):
        with timer("sample"):
            generators = [image_generator(stream.seed, epoch, first_image + i, device) for i in rows]
            rollouts.append(sample_rollouts(pipe, cond.take(local_group[rows.start:rows.stop]), generators,
                                            sample.num_solver_steps, noise_level, sample.guidance_scale,
                                            sample.resolution))
        with timer("reward"):
            scores.append(learner.reward(rollouts[-1].images, [group_prompts[i // group_size] for i in rows]))
    learner.reward_models.park()
    cat = torch.cat
    log_probs = [r.log_probs for r in rollouts]
    joined = Rollouts(inputs=cat([r.inputs for r in rollouts]), sigmas=rollouts[0].sigmas,
                      log_probs=None if log_probs[0] is None else cat(log_probs),
                      final_latents=cat([r.final_latents for r in rollouts]),
                      images=rollouts[0].images[:2].cpu())  # only two are kept, for W&B
    return Groups(joined, RewardOutput.cat(scores), [group_prompts[i // group_size] for i in range(images)], cond.gather(),
                  distributed.all_gather_tensor(local_group + first_group))


@dataclass
class GroupSignal:
    """What every rank needs of every image to train on any of its items: its prompt, the method's weight of it."""

    cond: PromptEmbeds  # one row per group of every rank
    group: torch.Tensor  # (images of all ranks,) each image's row of `cond`
    weight: torch.Tensor  # (images of all ranks,) Flow-GRPO's advantage, or DiffusionNFT's optimality r
    sigmas: torch.Tensor  # the sampler's noise levels, (T + 1,)
    sigma_max: float  # sigmas[1]: Flow-GRPO's stand-in for σ = 1 in the SDE's coefficient
    items_per_image: int  # K: item = image · K + k
    final_latents: torch.Tensor | None = None  # (images of all ranks, C, h, w), DiffusionNFT's x0


def record_of(groups: Groups) -> Scored:
    return Scored(groups.scores.total, groups.scores.terms, groups.prompts, groups.rollouts.images)


def flow_grpo_epoch(learner: Learner, stream: PromptStream, cfg: TrainConfig, plan: BatchPlan, epoch: int,
                    timer: PhaseTimer) -> tuple[Scored, TrainingItems]:
    """SDE rollouts with their step log-densities, per-prompt advantages, items (image, step) of the first
    int(T · timestep_fraction) steps, and the clipped policy loss with the KL to the LoRA-free model."""
    grpo, K = cfg.grpo, cfg.items_per_sample
    groups = sample_groups(learner, stream, cfg.sample, plan, epoch, timer, grpo.group_size, grpo.noise_level)
    with timer("share"):
        rewards = distributed.all_gather_tensor(groups.scores.total)
        sigmas = groups.rollouts.sigmas
        signal = GroupSignal(groups.cond, groups.group, group_advantages(rewards, groups.group, grpo.global_std),
                             sigmas, sigmas[1].item(), K)
        rollouts = groups.rollouts
        after = torch.cat([rollouts.inputs[:, 1:], rollouts.final_latents[:, None]], dim=1)  # x_{i+1} of step i
        local = [rollouts.inputs[:, :K].flatten(0, 1), after[:, :K].flatten(0, 1), rollouts.log_probs[:, :K].flatten()]
        order = item_permutation(cfg.seed, epoch, plan.world_size * len(local[0]))
    guidance = cfg.sample.guidance_scale
    return record_of(groups), TrainingItems(local, order, lambda rows, items: grpo_loss(learner, rows, items, signal,
                                                                                         grpo, guidance))


def grpo_loss(learner: Learner, rows: list[torch.Tensor], items: torch.Tensor, signal: GroupSignal,
              grpo: FlowGrpoConfig, guidance: float) -> dict[str, torch.Tensor]:
    """Flow-GRPO's loss of a micro-batch: each step's log-density under v_θ against the one sampled."""
    x, x_next, old_log_prob = rows
    image, t = torch.div(items, signal.items_per_image, rounding_mode="floor"), items % signal.items_per_image
    sigmas, sigma_max = signal.sigmas, signal.sigma_max
    cond = signal.cond.take(signal.group[image])

    def transition(v: torch.Tensor):
        return sde_step(x, v, sigmas[t], sigmas[t + 1], grpo.noise_level, torch.zeros_like(x), sigma_max=sigma_max)
    # As published, no gradient through the empty prompt's velocity under CFG.
    step = transition(predict_velocity(learner.model, x, sigmas[t], cond, guidance, detach_uncond=True))
    policy_loss, ratio, clipfrac = clipped_policy_loss(step_log_prob(x_next, step.mean, step.std), old_log_prob,
                                                       signal.weight[image], grpo.clip_range, grpo.adv_clip_max)
    kl = torch.zeros((), device=x.device)
    if grpo.kl_weight > 0:
        with torch.no_grad(), learner.lora.disable_adapter():
            reference = transition(predict_velocity(learner.model, x, sigmas[t], cond, guidance))
        kl = kl_penalty(step.mean, reference.mean, step.sigma_t)  # as published: σ_t, not the transition's std
    return {"loss": policy_loss + grpo.kl_weight * kl, "policy_loss": policy_loss.detach(), "kl": kl.detach(),
            "clipfrac": clipfrac, "ratio_dev": (ratio - 1).abs().mean()}


def diffusion_nft_epoch(learner: Learner, stream: PromptStream, cfg: TrainConfig, plan: BatchPlan, epoch: int,
                        timer: PhaseTimer) -> tuple[Scored, TrainingItems]:
    """The old policy moves towards the LoRA (η of the steps so far); ODE rollouts of the old policy; items
    (image, noise level) at K of the T sampler levels per image with fresh noise, the old policy's velocity at
    each; the negative-aware loss weighted by the optimality probability r."""
    nft = cfg.nft
    if learner.optimizer_steps:  # the previous epoch's update, made here so that a resume makes it too
        decay = old_policy_decay(learner.optimizer_steps, nft.decay_type)
        learner.old_policy = [lagged_update(old, p.detach(), decay)
                              for old, p in zip(learner.old_policy, trainable(learner.lora))]
    with swapped_in(learner.lora, learner.old_policy):
        groups = sample_groups(learner, stream, cfg.sample, plan, epoch, timer, nft.group_size, noise_level=0.0)
        with timer("old_policy"):
            x_t, sigma, v_old = old_policy_items(learner, groups, cfg, plan.micro_batch, epoch)
    with timer("share"):
        rewards = distributed.all_gather_tensor(groups.scores.total)
        optimality = optimality_weight(rewards, groups.group, nft.adv_clip_max, nft.global_std)
        sigmas = groups.rollouts.sigmas
        signal = GroupSignal(groups.cond, groups.group, optimality, sigmas, sigmas[1].item(), cfg.items_per_sample,
                             final_latents=distributed.all_gather_tensor(groups.rollouts.final_latents))
        order = item_permutation(cfg.seed, epoch, plan.world_size * len(x_t))
    guidance = cfg.sample.guidance_scale
    return record_of(groups), TrainingItems([x_t, sigma, v_old], order, lambda rows, items: nft_micro_batch_loss(
        learner, rows, items, signal, nft, guidance))


def nft_micro_batch_loss(learner: Learner, rows: list[torch.Tensor], items: torch.Tensor, signal: GroupSignal,
                         nft: DiffusionNftConfig, guidance: float) -> dict[str, torch.Tensor]:
    """DiffusionNFT's loss of a micro-batch: v_θ at the noised final latents against the old policy's v there."""
    x_t, sigma, v_old = rows
    image = torch.div(items, signal.items_per_image, rounding_mode="floor")
    cond = signal.cond.take(signal.group[image])
    v_theta = predict_velocity(learner.model, x_t, sigma, cond, guidance)
    v_ref = None
    if nft.kl_weight > 0:
        with torch.no_grad(), learner.lora.disable_adapter():
            v_ref = predict_velocity(learner.model, x_t, sigma, cond, guidance)
    terms = nft_loss(v_theta, v_old, signal.final_latents[image], x_t, sigma, signal.weight[image], nft.beta,
                     nft.adv_clip_max, v_ref, nft.kl_weight)
    return {"loss": terms.loss, "policy_loss": terms.policy_loss, "kl": terms.kl, "positive_loss": terms.positive_loss,
            "negative_loss": terms.negative_loss, "old_deviate": terms.old_deviate}


@torch.no_grad()
def old_policy_items(learner: Learner, groups: Groups, cfg: TrainConfig, batch: int, epoch: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, its noise level, the old policy's velocity there) of every item of this rank: K of the T sampler
    levels per image, drawn with fresh noise from the image's own generator (TRAINING_NOISE)."""
    rollouts, K = groups.rollouts, cfg.items_per_sample
    device, T = rollouts.final_latents.device, len(rollouts.sigmas) - 1
    first_image = distributed.rank() * len(rollouts.final_latents)
    x_t, sigma = [], []
    for i, x0 in enumerate(rollouts.final_latents):
        generator = image_generator(cfg.seed, epoch, first_image + i, device, TRAINING_NOISE)
        levels = rollouts.sigmas[train_timestep_indices(T, K, generator)]
        noise = torch.randn((K, *x0.shape), generator=generator, device=device)
        x_t.append(forward_noise(x0.expand(K, *x0.shape), noise, levels))
        sigma.append(levels)
    x_t, sigma = torch.cat(x_t), torch.cat(sigma)
    image = torch.arange(len(x_t), device=device) // K
    cond = groups.cond.take(groups.group[image + first_image])
    v_old = torch.cat([predict_velocity(learner.pipe.transformer, x_t[b:b + batch], sigma[b:b + batch],
                                        cond.index(slice(b, b + batch)), cfg.sample.guidance_scale)
                       for b in range(0, len(x_t), batch)])
    return x_t, sigma, v_old


BASELINES = {"flow_grpo": flow_grpo_epoch, "diffusion_nft": diffusion_nft_epoch}
