"""The optional EMA of the LoRA weights, by the rule of both baselines' published code (Flow-GRPO's
`flow_grpo/ema.py` EMAModuleWrapper, which DiffusionNFT reuses; the FDFO paper has none): after optimiser step
s, when (s + 1) is a multiple of the interval, w̄ ← w̄ + (1 − d)(w − w̄) with d = min(decay, (1 + s)/(10 + s)),
`repeats` times. Saved in a checkpoint as a second LoRA in PEFT's format, `<checkpoint>/ema/`: it loads wherever
a LoRA loads (generate.py, metrics.py, the export), and a resume restores it exactly (float32 weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel

from fdfo.errors import UserError
from fdfo.model.lora import load_lora_copy, trainable

EMA_FOLDER = "ema"


class EmaMissingError(UserError, FileNotFoundError):
    pass


@dataclass
class LoraEma:
    """The average of the LoRA weights and how it is kept."""

    weights: list[torch.Tensor]  # float32, one per trainable parameter
    decay: float
    interval: int  # Flow-GRPO's recipe: 8; DiffusionNFT's: 1
    repeats: int  # Flow-GRPO's code updates once per sampling batch of a GPU: at its 32-GPU recipe twice a step
    updates: int = 0  # updates made so far (counted in the checkpoint)

    @torch.no_grad()
    def step(self, params: list[torch.nn.Parameter], step: int) -> None:
        """After optimiser step `step` (1 for the first)."""
        if (step + 1) % self.interval:
            return
        one_minus_decay = 1 - min(self.decay, (1 + step) / (10 + step))
        for _ in range(self.repeats):
            for average, param in zip(self.weights, params, strict=True):
                average.add_(one_minus_decay * (param.detach() - average))
            self.updates += 1


def start_ema(lora: PeftModel, decay: float, interval: int, repeats: int) -> LoraEma:
    """An average that starts at the LoRA's current weights."""
    return LoraEma([p.detach().clone() for p in trainable(lora)], decay, interval, repeats)


def load_ema(lora: PeftModel, checkpoint: Path, decay: float, interval: int, repeats: int, updates: int) -> LoraEma:
    """The average saved in `checkpoint` after `updates` updates."""
    return LoraEma(load_lora_copy(lora, ema_folder(checkpoint)), decay, interval, repeats, updates)


def ema_folder(checkpoint: Path) -> Path:
    """The EMA LoRA of `checkpoint`, or an error saying how to get one."""
    folder = Path(checkpoint) / EMA_FOLDER
    if not folder.is_dir():
        raise EmaMissingError(f"{checkpoint} holds no EMA weights ({folder} is missing): only runs trained with "
                              "--ema-decay have them. Leave out --ema to use the checkpoint's own weights.")
    return folder
