"""Batch arithmetic of an epoch: how the pairs and training items split over ranks and steps."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fdfo.config import ConfigError


@dataclass(frozen=True)
class BatchPlan:
    """Per-rank sizes of one epoch, derived from the user's settings and the world size."""

    world_size: int
    pairs_per_rank: int  # pairs each rank samples per epoch
    # The paper's batch arithmetic.
    sample_batch_size: int  # pairs per sampling batch
    num_sample_batches: int  # sampling batches per epoch
    samples_per_step: int  # trajectories (2 per pair) per rank behind one optimiser step
    train_batch_size: int  # (sample, timestep) items per training micro-batch
    gradient_accumulation_steps: int  # an optimiser step every T × this many micro-batches
    gradient_steps_per_epoch: int  # optimiser steps per epoch
    # As executed (speed only; see AUTO_SAMPLE_BATCH): the sizes above unless chosen otherwise.
    sampling_batch: int  # pairs per sampling call
    micro_batch: int  # (sample, timestep) items per forward/backward
    micro_batches_per_step: int  # micro-batches of `micro_batch` items in one optimiser step
    activation_checkpointing: bool = False  # blocks recomputed in the backward pass (--max-memory-gib may choose it)

    @property
    def sampling_calls(self) -> int:
        return self.pairs_per_rank // self.sampling_batch

    @property
    def total_pairs(self) -> int:
        return self.pairs_per_rank * self.world_size


# Batch sizes as executed when no size or --max-batch-size is given: only speed and float rounding depend on them
# (every pair has its own noise; a step's gradient is the mean over its items however they are split). Measured
# on an H200 (docs/performance.md, "Second round"): 12 items per training micro-batch instead of the paper's 6
# take the 48-pair epoch's training from 79 to 50 s and keep one rank of the 4-rank default run (108 pairs)
# under 40 GiB; sampling 16 pairs at a time instead of 4–6 saves the launch overhead of small batches.
AUTO_MICRO_BATCH = 12
AUTO_SAMPLE_BATCH = 16


def largest_divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


@dataclass(frozen=True)
class BatchSizes:
    """Batch sizes the user asked for; None = derived."""

    max_batch_size: int | None = None  # --max-batch-size: caps every derived size
    sample_batch_size: int | None = None  # --sample.batch-size: pairs per sampling batch
    train_batch_size: int | None = None  # --train.batch-size: items per training batch (the paper's split)
    micro_batch: int | None = None  # --train.micro-batch: items per forward/backward


def plan_batches(total_pairs_per_epoch: int, world_size: int, gradient_steps_per_epoch: int = 4,
                 items_per_sample: int = 40, sizes: BatchSizes = BatchSizes()) -> BatchPlan:
    """Split an epoch's pairs over ranks, sampling batches and optimiser steps; explicit sizes win.

    The sample and train batch sizes are the paper's split (reported, and executed when given or when
    `max_batch_size` is); the micro-batch is how many (sample, timestep) items one forward/backward takes. With no
    size and no `max_batch_size` given, sampling runs the largest divisor of the pairs per rank up to
    AUTO_SAMPLE_BATCH at a time, and training the paper's micro-batch raised to a divisor of a step's items up
    to AUTO_MICRO_BATCH; a given `max_batch_size` caps everything (for GPUs with less memory).
    """
    if world_size < 1:
        raise ConfigError(f"The world size must be at least 1, got {world_size}.")
    if sizes.max_batch_size is not None and sizes.max_batch_size < 1:
        raise ConfigError(f"--max-batch-size must be at least 1, got {sizes.max_batch_size}.")
    paper_cap = sizes.max_batch_size or (6 if world_size < 8 else 13)
    pairs = pairs_per_rank(total_pairs_per_epoch, world_size, gradient_steps_per_epoch)
    sampling_batch, sample_batch_size = sampling_sizes(pairs, paper_cap, sizes)
    samples_per_step = 2 * pairs // gradient_steps_per_epoch
    train_batch_size, micro_batch = training_sizes(samples_per_step, items_per_sample, paper_cap, sizes)
    return BatchPlan(
        world_size=world_size,
        pairs_per_rank=pairs,
        sample_batch_size=sample_batch_size,
        num_sample_batches=pairs // sample_batch_size,
        samples_per_step=samples_per_step,
        train_batch_size=train_batch_size,
        gradient_accumulation_steps=samples_per_step // train_batch_size,
        gradient_steps_per_epoch=gradient_steps_per_epoch,
        sampling_batch=sampling_batch,
        micro_batch=micro_batch,
        micro_batches_per_step=samples_per_step * items_per_sample // micro_batch,
    )


def pairs_per_rank(total_pairs_per_epoch: int, world_size: int, gradient_steps_per_epoch: int) -> int:
    """The pairs each rank samples: an equal share, rounded down so that every step takes whole trajectories."""
    if total_pairs_per_epoch < 1:
        raise ConfigError(f"--total-pairs-per-epoch must be at least 1; got {total_pairs_per_epoch}.")
    if gradient_steps_per_epoch < 1:
        raise ConfigError(f"--gradient-steps-per-epoch must be at least 1, got {gradient_steps_per_epoch}.")
    # Each step takes 2·pairs/steps trajectories per rank, so pairs per rank is a multiple of steps/gcd(2, steps).
    granule = gradient_steps_per_epoch // math.gcd(2, gradient_steps_per_epoch)
    pairs = total_pairs_per_epoch // world_size
    pairs -= pairs % granule
    if pairs == 0:
        raise ConfigError(
            f"--total-pairs-per-epoch {total_pairs_per_epoch} gives no pairs per rank on {world_size} rank(s) with "
            f"{gradient_steps_per_epoch} gradient steps per epoch: raise --total-pairs-per-epoch to at least "
            f"{world_size * granule} (or lower --gradient-steps-per-epoch)."
        )
    return pairs


def sampling_sizes(pairs: int, paper_cap: int, sizes: BatchSizes) -> tuple[int, int]:
    """(pairs per sampling call as executed, the paper's sampling batch)."""
    executed = sizes.sample_batch_size or largest_divisor_at_most(pairs, sizes.max_batch_size or AUTO_SAMPLE_BATCH)
    if sizes.sample_batch_size is None:
        return executed, largest_divisor_at_most(pairs, paper_cap)
    if sizes.sample_batch_size < 1 or pairs % sizes.sample_batch_size:
        raise ConfigError(f"--sample.batch-size {sizes.sample_batch_size} must divide the {pairs} pairs per rank; "
                          f"pick a divisor of {pairs} or leave it unset.")
    return executed, sizes.sample_batch_size


def training_sizes(samples_per_step: int, items_per_sample: int, paper_cap: int, sizes: BatchSizes
                   ) -> tuple[int, int]:
    """(the paper's training batch, items per forward/backward as executed)."""
    train_batch_size = sizes.train_batch_size
    if train_batch_size is None:
        train_batch_size = largest_divisor_at_most(samples_per_step, paper_cap)
    elif train_batch_size < 1 or samples_per_step % train_batch_size:
        raise ConfigError(f"--train.batch-size {train_batch_size} must divide the {samples_per_step} samples per rank "
                          f"and optimiser step; pick a divisor of {samples_per_step} or leave it unset.")
    items_per_step = samples_per_step * items_per_sample
    micro_batch = sizes.micro_batch
    if micro_batch is None:
        executed_as_given = sizes.max_batch_size is not None or sizes.train_batch_size is not None
        micro_batch = (train_batch_size if executed_as_given else
                       max(train_batch_size, largest_divisor_at_most(items_per_step, AUTO_MICRO_BATCH)))
    if items_per_step % micro_batch:
        raise ConfigError(
            f"--train.micro-batch {micro_batch} must divide the {items_per_step} (sample, timestep) items per rank and "
            f"optimiser step ({samples_per_step} samples × {items_per_sample} steps); pick a divisor or leave it unset."
        )
    return train_batch_size, micro_batch
