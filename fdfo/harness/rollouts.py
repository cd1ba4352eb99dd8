"""The sample-and-score loop of every method: encode the epoch's prompts, sample in calls, score each call.

A method says which prompts to encode, what each sampling call makes (which conditioning rows, which
generators, one prompt per image for the reward) and how it samples (FDFO's churned pairs, the baselines'
single trajectories); the loop does the rest the same way for all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from tqdm import tqdm

from fdfo import distributed
from fdfo.config import SampleConfig
from fdfo.harness.learner import Learner
from fdfo.harness.timing import PhaseTimer
from fdfo.model.backbone import PromptEmbeds
from fdfo.rewards import RewardOutput

# (backbone, conditioning rows of the call, its generators) → a batch with `.images` in [0, 1].
Sampler = Callable[[Any, PromptEmbeds, list[torch.Generator]], Any]


@dataclass
class SamplingCall:
    rows: torch.Tensor  # the call's rows of the encoded prompts (one per pair, or one per image)
    generators: list[torch.Generator]  # one per row
    image_prompts: list[str]  # one per image it makes, for the reward


@dataclass
class Sampled:
    batches: list[Any]  # the sampler's output of every call, in order
    scores: RewardOutput  # of every image, in order
    cond: PromptEmbeds  # the encoded prompts of this rank, one row each
    first_images: torch.Tensor  # the first call's first two images (one prompt's), on the CPU, for W&B


def sample_and_score(learner: Learner, prompts: list[str], calls: list[SamplingCall], sampler: Sampler,
                     sample: SampleConfig, encode_batch: int, timer: PhaseTimer, desc: str) -> Sampled:
    """Every call's samples and rewards. All prompts are encoded first (in batches of `encode_batch`), so that
    the text encoders are parked before the reward models come back to the GPU and sampling starts; the reward
    models are parked again once the last call is scored (with --memory-efficient, and unless the method's loss
    needs them: Method.needs_gradients)."""
    backbone = learner.backbone
    with timer("encode"):
        cond = PromptEmbeds.cat(learner.encode([prompts[i:i + encode_batch]
                                                for i in range(0, len(prompts), encode_batch)], sample))
    backbone.transformer.eval()
    batches, scores = [], []
    for call in tqdm(calls, desc=desc, disable=not distributed.is_main(), leave=False):
        with timer("sample"):
            batches.append(sampler(backbone, cond.take(call.rows), call.generators))
        with timer("reward"):
            scores.append(learner.reward(batches[-1].images, call.image_prompts))
    learner.reward_models.park()
    return Sampled(batches, RewardOutput.cat(scores), cond, batches[0].images[:2].cpu())
