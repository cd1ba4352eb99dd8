"""The optional EMA of the LoRA weights (diffusers' EMAModel; the paper has none), saved in a checkpoint as a
second LoRA in PEFT's format, `<checkpoint>/ema/`: it loads wherever a LoRA loads (generate.py, metrics.py, the
export), and a resume restores it exactly (float32 weights).
"""

from __future__ import annotations

from pathlib import Path

from diffusers.training_utils import EMAModel
from peft import PeftModel

from fdfo.errors import UserError
from fdfo.model.lora import load_lora_copy, trainable

EMA_FOLDER = "ema"


class EmaMissingError(UserError, FileNotFoundError):
    pass


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
