"""What the group methods share (Flow-GRPO, DiffusionNFT): rollouts in groups of images of one prompt, scored.

An epoch samples 2 × `total_pairs_per_epoch` images (the reward evaluations of an FDFO epoch of as many pairs),
in groups of `group_size` images of one prompt; an item is (image, noise level), K of them per image.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch

from fdfo import distributed
from fdfo.config import ConfigError, SampleConfig, TrainConfig
from fdfo.harness.batching import BatchPlan
from fdfo.harness.learner import Learner
from fdfo.harness.rollouts import SamplingCall, sample_and_score
from fdfo.harness.seeding import image_generator
from fdfo.methods.base import Epoch, EpochScores, Method
from fdfo.model.sampler import Rollouts, sample_rollouts
from fdfo.model.backbone import PromptEmbeds
from fdfo.rewards import RewardOutput


@dataclass
class Groups:
    """A rank's rollouts in groups of one prompt, and what every rank needs of every image's group."""

    rollouts: Rollouts
    scores: RewardOutput
    prompts: list[str]  # one per image of this rank
    cond: PromptEmbeds  # one row per group of every rank
    group: torch.Tensor  # (I·ranks,) every image's group: a row of `cond`

    def record(self) -> EpochScores:
        return EpochScores(self.scores.total, self.scores.terms, self.prompts, self.rollouts.images)


@dataclass
class GroupSignal:
    """What every rank needs of every image to train on any of its items: its prompt, the method's weight of it."""

    cond: PromptEmbeds  # one row per group of every rank
    group: torch.Tensor  # (images of all ranks,) each image's row of `cond`
    weight: torch.Tensor  # (images of all ranks,) Flow-GRPO's advantage, or DiffusionNFT's optimality r
    sigmas: torch.Tensor  # the sampler's noise levels, (T + 1,)
    sigma_max: float  # sigmas[1]: Flow-GRPO's stand-in for σ = 1 in the SDE's coefficient
    items_per_image: int  # K: item = image · K + k
    guidance_scale: float  # of the sampling, which training reproduces
    final_latents: torch.Tensor | None = None  # (images of all ranks, C, h, w), DiffusionNFT's x0


class GroupMethod(Method):
    """A method that samples groups of images of one prompt; its settings are the section `section` of the
    configuration (`--<section>.*`), with a group size, a timestep fraction and a KL weight."""

    section: ClassVar[str]  # "grpo", "nft"
    positive: ClassVar[tuple[str, ...]] = ()  # its settings that must be more than 0

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.settings = (cls.section,)

    def __init__(self, cfg: TrainConfig):
        self.sample, self.seed, self.settings = cfg.sample, cfg.seed, getattr(cfg, self.section)

    @property
    def items_per_sample(self) -> int:
        return int(self.sample.num_solver_steps * self.settings.timestep_fraction)

    def check(self) -> None:
        """A group compares at least two images; the fraction keeps at least one of the sampler's steps."""
        s, flag, steps = self.settings, f"--{self.section}", self.sample.num_solver_steps
        if s.group_size < 2:
            raise ConfigError(f"{flag}.group-size must be at least 2 (advantages compare the images of a prompt); got "
                              f"{s.group_size}.")
        if not (0 < s.timestep_fraction <= 1 and int(s.timestep_fraction * steps) >= 1):
            raise ConfigError(f"{flag}.timestep-fraction must be in (0, 1] and keep at least one of the {steps} steps; "
                              f"got {s.timestep_fraction}.")
        for name in self.positive:
            if not getattr(s, name) > 0:
                raise ConfigError(f"{flag}.{name.replace('_', '-')} must be more than 0; got {getattr(s, name)}.")
        if not s.kl_weight >= 0:
            raise ConfigError(f"{flag}.kl-weight must be 0 or more; got {s.kl_weight}.")

    def check_plan(self, plan: BatchPlan) -> None:
        """The images per rank must fill whole groups (a group's advantages compare its images)."""
        images, group_size = 2 * plan.pairs_per_rank, self.settings.group_size
        if images % group_size:
            raise ConfigError(f"--{self.section}.group-size {group_size} must divide the {images} images each rank "
                              f"samples per epoch (2 × {plan.pairs_per_rank} pairs); pick a divisor, or change "
                              "--total-pairs-per-epoch.")


def sample_groups(learner: Learner, epoch: Epoch, sample: SampleConfig, seed: int, group_size: int,
                  noise_level: float, **solver: Any) -> Groups:
    """This rank's images of the epoch, each from its own seeded noise: global groups rank·G_r … , one prompt each
    (the stream's prompt at the group's position), `group_size` images per group, scored; `solver`: the ODE's
    options of `sample_rollouts`."""
    plan, device = epoch.plan, learner.backbone.transformer.device
    images = 2 * plan.pairs_per_rank
    first_image, groups_per_rank = distributed.rank() * images, images // group_size
    first_group = distributed.rank() * groups_per_rank
    group_prompts = epoch.stream.prompts_for(epoch.index, range(first_group, first_group + groups_per_rank))
    local_group = torch.arange(images, device=device) // group_size
    image_prompts = [group_prompts[i // group_size] for i in range(images)]
    calls = [SamplingCall(local_group[b:b + 2 * plan.sampling_batch],
                          [image_generator(seed, epoch.index, first_image + i, device)
                           for i in range(b, b + 2 * plan.sampling_batch)],
                          image_prompts[b:b + 2 * plan.sampling_batch])
             for b in range(0, images, 2 * plan.sampling_batch)]
    sampler = partial(sample_rollouts, num_steps=sample.num_solver_steps, noise_level=noise_level,
                      guidance_scale=sample.guidance_scale, resolution=sample.resolution, **solver)
    sampled = sample_and_score(learner, group_prompts, calls, sampler, sample, plan.sampling_batch, epoch.timer,
                               f"epoch {epoch.index} sampling")
    batches, cat = sampled.batches, torch.cat
    log_probs = None if batches[0].log_probs is None else cat([r.log_probs for r in batches])
    joined = Rollouts(inputs=cat([r.inputs for r in batches]), sigmas=batches[0].sigmas, log_probs=log_probs,
                      final_latents=cat([r.final_latents for r in batches]),
                      images=sampled.first_images)  # only two are kept, for W&B
    return Groups(joined, sampled.scores, image_prompts, sampled.cond.gather(),
                  distributed.all_gather_tensor(local_group + first_group))
