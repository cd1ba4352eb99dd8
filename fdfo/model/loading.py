"""Loading the SD3 parts for `--pretrained-model`: the real weights, `tiny`, or `sd35m-random`."""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path
from typing import Iterator

import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from fdfo.model import tiny
from fdfo.model.sd3 import PAPER_RESOLUTION
from fdfo.errors import UserError

RANDOM_MODELS = {"tiny": "tiny", "sd35m-random": "sd35m"}
RANDOM_SHAPES = {"tiny": (tiny.TINY_TRANSFORMER, tiny.TINY_VAE), "sd35m": (tiny.SD35M_TRANSFORMER, tiny.SD35M_VAE)}
# What the loaders (transformers, diffusers, huggingface_hub) raise for files that are not there or cannot be
# fetched: OSError (URLError, HfHubHTTPError and LocalEntryNotFoundError are OSErrors), ValueError (a name that
# is neither a folder nor a Hub id: HFValidationError, diffusers' own).
LOAD_ERRORS = (OSError, ValueError)


class ModelLoadError(UserError, RuntimeError):
    """A model (or other files from the Hugging Face Hub) could not be loaded; the message says what to do."""


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


@contextlib.contextmanager
def from_hub(what: str, repo_id: str, download_flags: str = "", hint: str = "") -> Iterator[None]:
    """Load `what` from `repo_id` (a Hub repo or a local folder) inside this block: the loader's error for files
    that are missing or cannot be fetched becomes a ModelLoadError that names the repo, says whether
    HF_HUB_OFFLINE is set and what to do, followed by `hint`. `download_flags` complete the `hf download` command
    it suggests (e.g. --repo-type dataset, --include 'folder/*')."""
    try:
        yield
    except LOAD_ERRORS as e:
        raise ModelLoadError(not_loaded(what, repo_id, e, download_flags) + hint) from e


def not_loaded(what: str, repo_id: str, error: Exception, download_flags: str = "") -> str:
    """The sentence of from_hub's error."""
    cause = error_line(error)
    if Path(repo_id).exists():
        return (f"Could not load {what} from the local folder {repo_id} ({cause}); check that the folder holds the "
                "whole model, as its Hub repo does.")
    download = f"`hf download {repo_id}{' ' + download_flags if download_flags else ''}`"
    cache = hub_constants.HF_HUB_CACHE
    elsewhere = f"run {download} on a machine online with the same HF_HOME (a shared folder, or copy {cache} here)"
    if hub_constants.is_offline_mode():
        todo = (f"HF_HUB_OFFLINE is set and the Hugging Face cache {cache} does not hold it: {elsewhere}, or unset "
                "HF_HUB_OFFLINE to download it here.")
    else:
        todo = (f"HF_HUB_OFFLINE is not set, so it was to be downloaded into the Hugging Face cache {cache}, which "
                f"needs huggingface.co to be reachable; without internet, {elsewhere} and set HF_HUB_OFFLINE=1.")
    return f"Could not load {what} from the Hugging Face Hub repo `{repo_id}` ({cause}). {todo}"


def error_line(error: BaseException) -> str:
    """`Type: the first sentence of its message`, for a sentence that quotes an error (the loaders' messages run to
    several sentences and lines, the first says what failed)."""
    sentence = re.split(r"\.\s", str(error).strip(), maxsplit=1)[0].rstrip(".")
    if sentence.count("(") > sentence.count(")"):  # the sentence ended inside a parenthesis: drop its start
        sentence = sentence[:sentence.rindex("(")].rstrip()
    return f"{type(error).__name__}: {sentence}" if sentence else type(error).__name__


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
    with from_hub("the base model's transformer", name, "--include 'transformer/*'"):
        transformer = SD3Transformer2DModel.from_pretrained(name, subfolder="transformer", dtype=dtype)
    return transformer.requires_grad_(False).eval().to(device)


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
    with from_hub("the base model", name, hint="" if Path(name).exists() else gated):
        pipe = StableDiffusion3Pipeline.from_pretrained(name, dtype=dtype)
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        module.requires_grad_(False).eval()
    return pipe.to(device)
