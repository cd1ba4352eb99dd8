"""The EMA of the LoRA (fdfo/runs/ema.py) against the published EMAModuleWrapper, run side by side in the places
and the order the published trainers call it, on the same weights.

    python bench/ema_side_by_side.py --flow-grpo PATH --diffusion-nft PATH [--out bench/results/ema-side-by-side.json]

PATHs are checkouts of github.com/yifan123/flow_grpo and github.com/NVlabs/DiffusionNFT (never committed here);
their flow_grpo/ema.py runs unchanged. The trainers themselves are too heavy to run, so their loops are replayed:
Flow-GRPO's scripts/train_sd3.py calls `ema.step(params, global_step)` after each sampling batch of a GPU (the
step count already advanced when that batch ended an accumulation), at its recipe 4 batches an epoch of which
every second one steps; DiffusionNFT's scripts/train_nft_sd3.py calls it once after each optimiser step.
Ours runs as the harness runs it: after every optimiser step, with the recipe's decay, interval and repeats.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fdfo.formulas import diffusion_nft, flow_grpo  # noqa: E402
from fdfo.runs.ema import LoraEma  # noqa: E402


def published_ema(checkout: Path):
    spec = importlib.util.spec_from_file_location(f"ema_{checkout.name}", checkout / "flow_grpo" / "ema.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.EMAModuleWrapper


def weights_after(steps: int, shapes: list[tuple[int, ...]]) -> list[list[torch.Tensor]]:
    """A random walk of LoRA weights: entry s holds the weights after s optimiser steps."""
    generator = torch.Generator().manual_seed(0)
    walk = [[torch.randn(shape, generator=generator) for shape in shapes]]
    for _ in range(steps):
        walk.append([w + 0.1 * torch.randn(w.shape, generator=generator) for w in walk[-1]])
    return walk


def replay(wrapper, recipe: dict, walk: list, batches_per_step: int, calls_per_batch: bool) -> dict:
    """Max |difference| between the published average and ours after every epoch."""
    params = [torch.nn.Parameter(w.clone()) for w in walk[0]]
    theirs = wrapper(params, decay=recipe["ema_decay"], update_step_interval=recipe["ema_interval"])
    ours = LoraEma([w.clone() for w in walk[0]], recipe["ema_decay"], recipe["ema_interval"], recipe["ema_repeats"])
    steps, worst, global_step = len(walk) - 1, 0.0, 0
    for batch in range(steps * batches_per_step):
        if (batch + 1) % batches_per_step == 0:  # this batch ends an accumulation: the optimiser steps
            global_step += 1
            for p, w in zip(params, walk[global_step]):
                p.data.copy_(w)
            ours.step(params, global_step)
            if not calls_per_batch:
                theirs.step(params, global_step)
        if calls_per_batch:
            theirs.step(params, global_step)
        if calls_per_batch and batch % (2 * batches_per_step) != 2 * batches_per_step - 1:
            continue  # compare at epoch ends only (Flow-GRPO: 2 steps an epoch)
        worst = max(worst, max((a - b).abs().max().item() for a, b in zip(theirs.ema_parameters, ours.weights)))
    moved = max((a - w).abs().max().item() for a, w in zip(ours.weights, walk[-1]))
    return {"steps": steps, "max_abs_difference": worst, "updates": ours.updates,
            "max_abs_gap_to_the_weights": moved}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--flow-grpo", type=Path, required=True)
    parser.add_argument("--diffusion-nft", type=Path, required=True)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    walk = weights_after(240, [(32, 64), (64, 32), (7,)])
    results = {
        "flow_grpo": replay(published_ema(args.flow_grpo), flow_grpo.DEFAULTS, walk,
                            flow_grpo.DEFAULTS["gradient_accumulation_steps"], calls_per_batch=True),
        "diffusion_nft": replay(published_ema(args.diffusion_nft), diffusion_nft.DEFAULTS, walk, 1,
                                calls_per_batch=False),
    }
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
