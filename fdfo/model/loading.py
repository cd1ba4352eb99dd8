"""Loading the SD3 parts for `--pretrained-model`: the real weights, `tiny`, or `sd35m-random`."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from fdfo.hub_files import HubFiles, ModelLoadError
from fdfo.model import tiny
from fdfo.model.sd3 import PAPER_RESOLUTION

RANDOM_MODELS = {"tiny": "tiny", "sd35m-random": "sd35m"}
RANDOM_SHAPES = {"tiny": (tiny.TINY_TRANSFORMER, tiny.TINY_VAE), "sd35m": (tiny.SD35M_TRANSFORMER, tiny.SD35M_VAE)}
# The folders of an SD3 repo that StableDiffusion3Pipeline reads (not the single-file checkpoints beside them).
SD3_FOLDERS = ("scheduler", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2",
               "tokenizer_3", "transformer", "vae")


def pipeline_files(name: str) -> HubFiles:
    """The files of the base model `name` that the pipeline loads."""
    return HubFiles("the base model", name, ("model_index.json", *(f"{folder}/*" for folder in SD3_FOLDERS)))


def transformer_files(name: str) -> HubFiles:
    return HubFiles("the base model's transformer", name, ("transformer/*",))

def check_model_name(name: str) -> None:
    """`--pretrained-model` names an existing folder, a random model or a well-formed Hub id (org/name); anything
    else would only fail inside the loader, with its traceback."""
    if name in RANDOM_MODELS or Path(name).exists():
        return
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ModelLoadError(f"--pretrained-model {name}: there is no folder {Path(name).absolute()}, and it is not "
                             "a Hugging Face Hub id (org/name) either; give the folder of a diffusers SD3 model, a Hub "
                             "id such as stabilityai/stable-diffusion-3.5-medium, or `tiny`.") from None


def planned_resolution(name: str) -> int:
    """What sd3.default_resolution will give for the model `name`, before it loads: the random models' own size;
    for real weights the paper's 512 px, the most default_resolution gives (a folder's own size is known only
    once it loads)."""
    if name not in RANDOM_MODELS:
        return PAPER_RESOLUTION
    transformer, vae = RANDOM_SHAPES[RANDOM_MODELS[name]]
    return min(PAPER_RESOLUTION, transformer["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1))


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


def load_transformer(name: str, device: torch.device, dtype: torch.dtype) -> SD3Transformer2DModel:
    """The SD3 transformer of `name` alone, frozen on `device` (what a merged export needs: no text encoders or VAE)."""
    if name in RANDOM_MODELS:  # its output layer is drawn after the other parts: built with them, as in training
        return tiny.random_pipeline(RANDOM_MODELS[name], device=device, dtype=dtype).transformer
    check_model_name(name)
    files = transformer_files(name)
    with files.loading():
        transformer = SD3Transformer2DModel.from_pretrained(files.local(), subfolder="transformer", dtype=dtype)
    return transformer.requires_grad_(False).eval().to(device)


SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def stored_dtype(name: str) -> torch.dtype:
    """The dtype the transformer of `name` is stored in (its first weight's; a random model's is float32)."""
    if name in RANDOM_MODELS:
        return torch.float32
    from safetensors import safe_open
    files = transformer_files(name)
    with files.loading():
        folder = files.local() / "transformer"
        weights = sorted(folder.glob("*.safetensors"))
        if not weights:
            raise FileNotFoundError(f"no .safetensors weights in {folder}")
        with safe_open(weights[0], framework="pt") as f:
            return SAFETENSORS_DTYPES[f.get_slice(next(iter(f.keys()))).get_dtype()]


def load_pipeline(name: str, device: torch.device, dtype: torch.dtype) -> StableDiffusion3Pipeline:
    """All SD3 parts (transformer, VAE, three text encoders and tokenizers, scheduler) on `device`, frozen."""
    # diffusers warns at every batch with a prompt longer than CLIP's 77 or T5's `max_sequence_length` tokens
    # (printing the wrong text as removed, for T5). Truncation is how SD3 reads prompts, not news: only its
    # errors are shown, as in the published code.
    logging.getLogger(StableDiffusion3Pipeline.__module__).setLevel(logging.ERROR)
    if name in RANDOM_MODELS:
        return tiny.random_pipeline(RANDOM_MODELS[name], device=device, dtype=dtype)
    check_model_name(name)
    gated = (f" The SD3.5 repos are gated: downloading needs `hf auth login` with a token of an account that accepted "
             f"the licence on https://huggingface.co/{name}. To try the code without any download, use "
             "`--pretrained-model tiny`.")
    files = pipeline_files(name)
    with files.loading(hint="" if files.is_local else gated):
        pipe = StableDiffusion3Pipeline.from_pretrained(files.local(), dtype=dtype)
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        module.requires_grad_(False).eval()
    return pipe.to(device)
