"""An exponential moving average of the LoRA weights (optional: the paper has none), kept by diffusers' EMAModel.

A checkpoint keeps it as a second LoRA in PEFT's format, `<checkpoint>/ema/`, so that everything that loads a
LoRA (generate.py, metrics.py, the export) loads it too, and a resume restores it exactly (float32 weights).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.training_utils import EMAModel
from peft import PeftModel

from fdfo.errors import UserError
from fdfo.lora import load_lora, save_lora

EMA_FOLDER = "ema"


class EmaMissingError(UserError, FileNotFoundError):
    pass


def trainable(lora: PeftModel) -> list[torch.nn.Parameter]:
    return [p for p in lora.parameters() if p.requires_grad]


def start_ema(lora: PeftModel, decay: float) -> EMAModel:
    """An average that starts at the LoRA's current weights; decay min(decay, (1 + n)/(10 + n)) at step n."""
    return EMAModel(trainable(lora), decay=decay, foreach=True)


def save_ema(ema: EMAModel, lora: PeftModel, folder: Path) -> None:
    """The averaged weights as a PEFT LoRA folder: swapped into the LoRA for the save, then swapped back."""
    params = trainable(lora)
    ema.store(params)
    ema.copy_to(params)
    try:
        save_lora(lora, folder)
    finally:
        ema.restore(params)


def load_ema(lora: PeftModel, checkpoint: Path, decay: float, steps: int) -> EMAModel:
    """The average saved in `checkpoint` after `steps` updates; the LoRA's own weights are left as they were."""
    params = trainable(lora)
    current = [p.detach().clone() for p in params]
    load_lora(lora, ema_folder(checkpoint))
    ema = start_ema(lora, decay)
    ema.optimization_step = steps
    for p, value in zip(params, current):
        p.data.copy_(value)
    return ema


def ema_folder(checkpoint: Path) -> Path:
    """The EMA LoRA of `checkpoint`, or an error saying how to get one."""
    folder = Path(checkpoint) / EMA_FOLDER
    if not folder.is_dir():
        raise EmaMissingError(f"{checkpoint} holds no EMA weights ({folder} is missing): only runs trained with "
                              "--ema-decay have them. Leave out --ema to use the checkpoint's own weights.")
    return folder
