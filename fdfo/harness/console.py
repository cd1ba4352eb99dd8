"""What a training run prints: the resolved settings at the start, a line per epoch, where things stand at a stop."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fdfo import distributed
from fdfo.harness.batching import BatchPlan
from fdfo.runs.checkpoint import run_checkpoints
from fdfo.runs.resume import Resume


def announce(settings: dict[str, Any], plan: BatchPlan, pairs_asked: int, resume: Resume | None) -> None:
    """Print the resolved settings and batch plan, and in a line each what was rounded or changed on resume."""
    distributed.print0(json.dumps({"config": settings, "batch_plan": asdict(plan)}, indent=2))
    if plan.total_pairs != pairs_asked:
        distributed.print0(f"--total-pairs-per-epoch {pairs_asked} rounds down to {plan.total_pairs}: "
                           f"{plan.pairs_per_rank} pairs on each of {plan.world_size} rank(s), a multiple of what "
                           f"{plan.gradient_steps_per_epoch} gradient steps per epoch divide evenly.")
    if resume is None:
        return
    distributed.print0(f"Resuming from {resume.checkpoint}: {resume.state.epochs_done} epochs and "
                       f"{resume.state.optimizer_steps} optimiser steps done.")
    if resume.run_dir is None:
        distributed.print0("It is not its run's newest checkpoint, so the run continues in a new folder (a branch "
                           "that records its parent): the two never mix.")
    if resume.changes:
        distributed.print0("Changed on resume (recorded in config.json's history): " + ", ".join(
            f"{name} {old} → {new}" for name, (old, new) in resume.changes.items()) + ".")


def epoch_line(record: dict[str, Any], steps: list[dict[str, Any]]) -> str:
    """The epoch in one line: reward, clipped fraction (where the method clips), gradient norm, speed."""
    # The loss is not printed: FDFO's is exactly 0 on the sampling policy (an epoch's first step; dR sums to 0).
    norms = [s["grad_norm"] for s in steps if s["grad_norm"] is not None]
    skipped = sum(s.get("skipped", False) for s in steps)
    clipfrac = sum(s.get("clipfrac", 0) for s in steps) / len(steps)  # DiffusionNFT clips nothing
    return (f"epoch {record['epoch']}: reward {record['reward_mean']:.4f} ± {record['reward_std']:.4f}, "
            + (f"clipfrac {clipfrac:.3f}, " if "clipfrac" in steps[0] else "")
            + f"grad norm {sum(norms) / len(norms) if norms else float('nan'):.3g}, "
            + (f"{skipped} of {len(steps)} steps skipped (fp16 overflow), " if skipped else "")
            + f"{record['pairs_per_s']:.2f} pairs/s")


def stop_message(run_dir: Path, stop: BaseException, kept: bool) -> str:
    """Where things stand after a crash or Ctrl-C, and the command that continues the run."""
    if not kept:
        where = f"No epoch had finished, so the new run folder {run_dir} was removed."
    else:
        done = run_checkpoints(run_dir)
        where = (f"The last checkpoint is {done[-1]}; continue with: python train.py --resume-from {run_dir}"
                 if done else f"No checkpoint was written yet in {run_dir}; the run has to start again.")
    if isinstance(stop, KeyboardInterrupt):
        return f"\nInterrupted. {where}"
    return f"The run stopped with an error. {where}"
