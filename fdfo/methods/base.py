"""What a method tells the harness, and what its epoch hands back.

A method is one class in this folder, registered in fdfo/methods/__init__.py. The harness (fdfo/harness/)
calls `epoch` once per epoch and optimises the LoRA on what it returns; it knows nothing else of the method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from fdfo.harness.batching import BatchPlan
from fdfo.harness.learner import Learner
from fdfo.harness.optimise import TrainingItems
from fdfo.harness.prompts import PromptStream
from fdfo.harness.timing import PhaseTimer


@dataclass
class EpochScores:
    """What the epoch's record shows of this rank's images, whatever the method."""

    rewards: torch.Tensor  # (I,) total reward of each image
    terms: dict[str, torch.Tensor]  # term → (I,)
    prompts: list[str]  # one per image
    first_images: torch.Tensor  # two images of one prompt in [0, 1] (a pair, or two of a group), for W&B


@dataclass
class Epoch:
    """Where an epoch stands: what every method's epoch reads besides the learner."""

    index: int  # the epoch, from 0
    stream: PromptStream  # the run's prompts
    plan: BatchPlan  # per-rank sizes
    timer: PhaseTimer  # time and memory per phase


class Method:
    """A training method in the harness. A subclass takes its settings from the run's configuration in
    `__init__` (only what it uses) and declares:"""

    lora_copies: ClassVar[tuple[str, ...]] = ()  # extra copies of the LoRA weights it keeps, by name (saved as
    # <checkpoint>/<name>/ and restored on resume; learner.copies[name], starting at the LoRA's initial weights)
    needs_gradients: ClassVar[bool] = False  # its loss back-propagates through the sampler or the reward, so the
    # reward models stay on the GPU while it trains
    settings: ClassVar[tuple[str, ...]] = ()  # the settings only it reads (dotted names or sections): given by the
    # user for another method, they are refused

    @property
    def items_per_sample(self) -> int:
        """Training items (noise levels) per sampled image: the batch plan splits a step's items by it."""
        raise NotImplementedError

    def check(self) -> None:
        """Refuse the method's own settings that cannot work (a ConfigError naming the flag), before the plan."""

    def check_plan(self, plan: BatchPlan) -> None:
        """Refuse a batch plan the method cannot use (e.g. groups that do not fill a rank's images)."""

    def epoch(self, learner: Learner, epoch: Epoch) -> tuple[EpochScores, TrainingItems]:
        """Sample this rank's images, score them, and say what the optimiser trains on."""
        raise NotImplementedError
