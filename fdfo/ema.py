"""Averages of the LoRA weights kept beside it: the optional EMA (diffusers' EMAModel; the paper has none) and
DiffusionNFT's lagged old policy, each saved in a checkpoint as a second LoRA in PEFT's format.

In a checkpoint, `<checkpoint>/ema/` (and `old_policy/`) load wherever a LoRA loads (generate.py, metrics.py,
the export), and a resume restores them exactly (float32 weights).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch
from diffusers.training_utils import EMAModel
from peft import PeftModel

from fdfo.errors import UserError
from fdfo.lora import load_lora, save_lora

EMA_FOLDER = "ema"
OLD_POLICY_FOLDER = "old_policy"


class EmaMissingError(UserError, FileNotFoundError):
    pass


def trainable(lora: PeftModel) -> list[torch.nn.Parameter]:
    return [p for p in lora.parameters() if p.requires_grad]


@contextlib.contextmanager
def swapped_in(lora: PeftModel, weights: list[torch.Tensor]) -> Iterator[None]:
    """The LoRA runs with `weights` (one per trainable parameter) inside the block, with its own after it."""
    params = trainable(lora)
    current = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, w in zip(params, weights):
                p.copy_(w)
        yield
    finally:
        with torch.no_grad():
            for p, c in zip(params, current):
                p.copy_(c)


def save_lora_copy(lora: PeftModel, weights: list[torch.Tensor], folder: Path) -> None:
    """`weights` (one per trainable LoRA parameter) as a PEFT LoRA folder."""
    with swapped_in(lora, weights):
        save_lora(lora, folder)


def load_lora_copy(lora: PeftModel, folder: Path) -> list[torch.Tensor]:
    """The weights of the LoRA folder `folder`, one per trainable parameter; the LoRA itself is left as it was."""
    with swapped_in(lora, trainable(lora)):
        load_lora(lora, folder)
        return [p.detach().clone() for p in trainable(lora)]


def start_ema(lora: PeftModel, decay: float) -> EMAModel:
    """An average that starts at the LoRA's current weights; decay min(decay, (1 + n)/(10 + n)) at step n."""
    return EMAModel(trainable(lora), decay=decay, foreach=True)


def load_ema(lora: PeftModel, checkpoint: Path, decay: float, steps: int) -> EMAModel:
    """The average saved in `checkpoint` after `steps` updates."""
    ema = start_ema(lora, decay)
    ema.shadow_params = load_lora_copy(lora, ema_folder(checkpoint))
    ema.optimization_step = steps
    return ema


def ema_folder(checkpoint: Path) -> Path:
    """The EMA LoRA of `checkpoint`, or an error saying how to get one."""
    folder = Path(checkpoint) / EMA_FOLDER
    if not folder.is_dir():
        raise EmaMissingError(f"{checkpoint} holds no EMA weights ({folder} is missing): only runs trained with "
                              "--ema-decay have them. Leave out --ema to use the checkpoint's own weights.")
    return folder
