"""The before/after picture of a run: the same prompts and seeds from the base model and from the trained LoRA."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel

from fdfo import distributed
from fdfo.config import PROJECT_ROOT, SampleConfig
from fdfo.evaluation.images import generate_images
from fdfo.evaluation.grid import make_grid
from fdfo.harness.prompts import load_prompts
from fdfo.model.backbone import Backbone
from fdfo.rewards import Reward

BEFORE_AFTER = "before_after.png"
PROMPTS = PROJECT_ROOT / "prompt_sets" / "generate_default.txt"
SEEDS = (0, 1)  # images per prompt, the same seeds in both rows


def write_before_after(backbone: Backbone, lora: PeftModel, reward: Reward, sample: SampleConfig,
                       epochs_done: int, out: Path) -> None:
    """Grid of the base model's images (top row) over the trained LoRA's (bottom row), each row labelled with
    its mean reward. Every rank takes part (a sharded reward model needs them all); rank 0 writes `out`."""
    prompts = load_prompts(PROMPTS)
    jobs = [(p, s) for p in prompts for s in SEEDS]

    def images() -> torch.Tensor:
        return generate_images(backbone, [p for p, _ in jobs], [s for _, s in jobs], sample.num_solver_steps,
                               sample.guidance_scale, sample.resolution, sample.max_sequence_length,
                               batch_size=len(jobs), desc="before/after")

    with lora.disable_adapter():
        before = images()
    after = images()
    scores = [reward(x.float() / 255, [p for p, _ in jobs]).total.mean().item() for x in (before, after)]
    k = len(SEEDS)
    blocks = [torch.cat([before[i:i + k], after[i:i + k]]) for i in range(0, len(jobs), k)]  # per prompt: 2 rows
    labels = [f"base model\nreward {scores[0]:.4g}", f"after {epochs_done} epoch{'s' * (epochs_done != 1)}\nreward {scores[1]:.4g}"]
    if distributed.is_main():
        make_grid(torch.cat(blocks), prompts, rows=2, cols=k, row_labels=labels).save(out)
