"""Loading the SD3 parts for `--pretrained-model`: the real weights, `tiny`, or `sd35m-random`."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import StableDiffusion3Pipeline

from fdfo.model import tiny
from fdfo.errors import UserError

RANDOM_MODELS = {"tiny": "tiny", "sd35m-random": "sd35m"}


class ModelLoadError(UserError, RuntimeError):
    """The base model could not be loaded; the message says what to do."""


def model_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype of the plain pipeline in generation and evaluation: auto = bf16 on GPU (as published), fp32 on CPU."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]


def training_dtypes(precision: str, device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    """(frozen base weights, compute under autocast) of sampling and training; LoRA weights stay float32.

    fp16 is the published recipe: fp16 autocast over bf16 weights, with a gradient scaler (on a CPU the
    weights are fp32: CPU autocast cannot mix bf16 weights into fp16 compute). auto = fp16 on GPU, fp32 on CPU.
    """
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp16":
        return (torch.bfloat16 if device.type == "cuda" else torch.float32), torch.float16
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    return dtype, dtype


def load_pipeline(name: str, device: torch.device, dtype: torch.dtype) -> StableDiffusion3Pipeline:
    """All SD3 parts (transformer, VAE, three text encoders and tokenizers, scheduler) on `device`, frozen."""
    # diffusers warns at every batch with a prompt longer than CLIP's 77 or T5's `max_sequence_length` tokens
    # (printing the wrong text as removed, for T5). Truncation is how SD3 reads prompts, not news: only its
    # errors are shown, as in the published code.
    logging.getLogger(StableDiffusion3Pipeline.__module__).setLevel(logging.ERROR)
    if name in RANDOM_MODELS:
        return tiny.random_pipeline(RANDOM_MODELS[name], device=device, dtype=dtype)
    try:
        pipe = StableDiffusion3Pipeline.from_pretrained(name, dtype=dtype)
    except OSError as e:
        where = f"the local folder {name}" if Path(name).exists() else f"the Hugging Face Hub repo `{name}`"
        raise ModelLoadError(
            f"Could not load the base model from {where}.\n"
            f"  - If the weights are not downloaded yet, this machine needs access to huggingface.co, and "
            f"the repo is gated: run `hf auth login` with a token of an account that accepted the licence on "
            f"https://huggingface.co/{name} (if HF_HUB_OFFLINE=1 is set, unset it for the first download).\n"
            f"  - To try the code without any download, use `--pretrained-model tiny`.\n"
            f"Original error: {e}"
        ) from e
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        module.requires_grad_(False).eval()
    return pipe.to(device)
