"""The optimisation phase of an epoch, whatever the method: items shuffled over all ranks, fetched from the rank
that sampled them, micro-batches accumulated into `gradient_steps_per_epoch` optimiser steps."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm import tqdm

from fdfo import distributed, signals
from fdfo.harness.batching import BatchPlan
from fdfo.harness.exchange import fetch_items, rank_slice, step_items
from fdfo.harness.learner import Learner
from fdfo.harness.seeding import item_permutation
from fdfo.harness.timing import PhaseTimer

# A method's loss of a micro-batch: (the fetched rows of each local tensor, the items' global ids) → "loss" (to
# back-propagate) and detached diagnostics to log, each a scalar tensor.
MicroBatchLoss = Callable[[list[torch.Tensor], torch.Tensor], dict[str, torch.Tensor]]


@dataclass
class TrainingItems:
    """An epoch's training items as a method defines them. Item i of the epoch lives on rank i // items_per_rank."""

    local: list[torch.Tensor]  # this rank's items: one row each, in every tensor
    order: torch.Tensor  # the epoch's shuffle of all ranks' items: step k trains on its slice k
    loss: MicroBatchLoss

    @staticmethod
    def shuffled(local: list[torch.Tensor], seed: int, epoch: int, world_size: int, loss: MicroBatchLoss
                 ) -> TrainingItems:
        """This rank's items, in the epoch's shuffle of the items of all ranks (each rank has as many)."""
        return TrainingItems(local, item_permutation(seed, epoch, world_size * len(local[0])), loss)


def step_sums(order: torch.Tensor, values: torch.Tensor, steps: int) -> torch.Tensor:
    """For every item of the epoch (by global id), the sum of `values` (one per global item) over the items of its
    optimiser step: what a loss normalised per step divides by — the same on any rank count and micro-batch
    size, where a count per micro-batch would not be."""
    sums = torch.empty_like(values)
    for k in range(steps):
        ids = step_items(order, k, steps).to(values.device)
        sums[ids] = values[ids].sum()
    return sums


def split_items(items: torch.Tensor, per_sample: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global item ids → (sample, index within the sample): item = sample · per_sample + index."""
    return torch.div(items, per_sample, rounding_mode="floor"), items % per_sample


def optimise_epoch(learner: Learner, items: TrainingItems, plan: BatchPlan, timer: PhaseTimer) -> list[dict]:
    """`gradient_steps_per_epoch` optimiser steps; one record per step (diagnostics averaged over its micro-batches
    and ranks; the first step also the first micro-batch's mean |ρ − 1|, `ratio_dev`, where the method has one).

    Timed phases: "exchange" (items fetched from their ranks), "train" (micro-batches without gradient
    sync), "train_sync" (each step's last micro-batch, whose backward all-reduces the gradients), "optimizer".
    """
    micro_batches = plan.micro_batches_per_step
    learner.lora.train()
    stats = []
    bar = tqdm(total=plan.gradient_steps_per_epoch * micro_batches, desc="training", disable=not distributed.is_main(),
               leave=False)
    for k in range(plan.gradient_steps_per_epoch):
        step = step_items(items.order, k, plan.gradient_steps_per_epoch)
        mine = rank_slice(step, distributed.rank(), plan.world_size).to(items.local[0].device)
        with timer("exchange"):
            rows = fetch_items(items.local, step, len(items.local[0]))

        def backward_micro_batch(m: int) -> dict[str, torch.Tensor]:
            signals.check()  # a Ctrl-C or SIGTERM stops between micro-batches (fdfo/signals.py)
            part = slice(m * plan.micro_batch, (m + 1) * plan.micro_batch)
            terms = items.loss([r[part] for r in rows], mine[part])
            learner.scaler.scale(terms["loss"] / micro_batches).backward()
            bar.update()
            return {name: value.detach() for name, value in terms.items()}

        # Timed per phase, not per micro-batch, so that the GPU is synchronised twice a step, not twice a micro-batch.
        with timer("train"), distributed.ddp_sync(learner.model, sync=False):
            per_micro_batch = [backward_micro_batch(m) for m in range(micro_batches - 1)]
        with timer("train_sync"):  # the last micro-batch's backward all-reduces the step's gradients
            per_micro_batch.append(backward_micro_batch(micro_batches - 1))
        with timer("optimizer"):
            grad_norm, scale = learner.step()
        names = list(per_micro_batch[0])
        means = distributed.all_reduce_mean(torch.stack([torch.stack([t[n] for n in names]) for t in per_micro_batch])
                                            .mean(dim=0))
        skipped = not math.isfinite(grad_norm)
        stats.append({"step": learner.optimizer_steps, **{n: v.item() for n, v in zip(names, means)},
                      "grad_norm": None if skipped else grad_norm, "lr": learner.optimizer.param_groups[0]["lr"],
                      **({"grad_scale": scale, "skipped": skipped} if learner.scaler.is_enabled() else {}),
                      **({"ratio_dev_first_micro_batch": per_micro_batch[0]["ratio_dev"].item()}
                         if k == 0 and "ratio_dev" in names else {}),
                      "wall_time": time.time()})
    bar.close()
    return stats
