"""Loading the base model for `--pretrained-model` as its backbone (SD3, FLUX): the real weights, or a random model."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from fdfo.hub_files import HubFiles, ModelLoadError
from fdfo.model import tiny
from fdfo.model.backbone import PAPER_RESOLUTION, Backbone
from fdfo.model.flux import Flux
from fdfo.model.sd3 import SD3

# The random models' names → their size in fdfo/model/tiny.py.
RANDOM_MODELS = {"tiny": "tiny", "sd35m-random": "sd35m", "sd35l-random": "sd35l", "tiny-flux": "tiny-flux",
                 "flux-random": "flux1-dev"}
BACKBONES = {"sd3": SD3, "flux": Flux}
# model_index.json's `_class_name` → backbone; the repos whose backbone is known without reading it.
PIPELINE_CLASSES = {cls.pipeline_class.__name__: cls for cls in BACKBONES.values()}
KNOWN_REPOS = {"stabilityai/stable-diffusion-3.5-medium": SD3, "stabilityai/stable-diffusion-3.5-large": SD3,
               "black-forest-labs/FLUX.1-dev": Flux}
# The folders of a diffusers pipeline repo that its pipeline class reads (not the single-file checkpoints beside
# them): SD3's; FLUX's are among them.
PIPELINE_FOLDERS = ("scheduler", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2",
                    "tokenizer_3", "transformer", "vae")


def pipeline_files(name: str) -> HubFiles:
    """The files of the base model `name` that the pipeline loads."""
    return HubFiles("the base model", name, ("model_index.json", *(f"{folder}/*" for folder in PIPELINE_FOLDERS)))


def transformer_files(name: str) -> HubFiles:
    return HubFiles("the base model's transformer", name, ("model_index.json", "transformer/*"))


def check_model_name(name: str) -> None:
    """`--pretrained-model` names an existing folder, a random model or a well-formed Hub id (org/name); anything
    else would only fail inside the loader, with its traceback."""
    if name in RANDOM_MODELS or Path(name).exists():
        return
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ModelLoadError(f"--pretrained-model {name}: there is no folder {Path(name).absolute()}, and it is not "
                             "a Hugging Face Hub id (org/name) either; give the folder of a diffusers SD3 or FLUX "
                             "model, a Hub id such as stabilityai/stable-diffusion-3.5-medium, or one of the random "
                             f"models {', '.join(RANDOM_MODELS)}.") from None


def backbone_class(name: str, folder: Path | None = None) -> type[Backbone]:
    """The backbone of the model `name`: by its name where known, else by the `_class_name` of its model_index.json
    (in `folder`, where it is already local)."""
    if name in RANDOM_MODELS:
        return BACKBONES[tiny.SIZES[RANDOM_MODELS[name]][0]]
    if name in KNOWN_REPOS:
        return KNOWN_REPOS[name]
    if folder is None:
        files = HubFiles("the base model's model_index.json", name, ("model_index.json",))
        with files.loading():
            folder = files.local()
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(f"--pretrained-model {name}: {index} is missing, so this is not a diffusers pipeline "
                             "folder; give the folder that holds model_index.json (a diffusers SD3 or FLUX model).")
    class_name = json.loads(index.read_text()).get("_class_name")
    if class_name not in PIPELINE_CLASSES:
        raise ModelLoadError(f"--pretrained-model {name} is a {class_name}; fdfo trains "
                             f"{' and '.join(PIPELINE_CLASSES)} models (SD3/SD3.5 and FLUX.1).")
    return PIPELINE_CLASSES[class_name]


def planned_resolution(name: str) -> int:
    """What Backbone.default_resolution will give for the model `name`, before it loads: the random models' own
    size; for real weights the paper's 512 px, the most default_resolution gives (a folder's own size is known only
    once it loads)."""
    if name not in RANDOM_MODELS:
        return PAPER_RESOLUTION
    return min(PAPER_RESOLUTION, tiny.SIZES[RANDOM_MODELS[name]][4])


def model_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype of the plain pipeline in generation and evaluation: auto = bf16 on GPU (as published), fp32 on CPU."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]


def training_dtypes(precision: str, device: torch.device, auto: str = "fp16") -> tuple[torch.dtype, torch.dtype]:
    """(frozen base weights, compute under autocast) of sampling and training; LoRA weights stay float32.

    fp16 is the published recipe: fp16 autocast over bf16 weights, with a gradient scaler (on a CPU the
    weights are fp32: CPU autocast cannot mix bf16 weights into fp16 compute). auto = `auto` on GPU (the backbone's
    Backbone.auto_precision), fp32 on CPU.
    """
    if precision == "auto":
        precision = auto if device.type == "cuda" else "fp32"
    if precision == "fp16":
        return (torch.bfloat16 if device.type == "cuda" else torch.float32), torch.float16
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    return dtype, dtype


def load_transformer(name: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The transformer of `name` alone, frozen on `device` (what a merged export needs: no text encoders or VAE)."""
    if name in RANDOM_MODELS:  # its output layer is drawn after the other parts: built with them, as in training
        return tiny.random_pipeline(RANDOM_MODELS[name], device=device, dtype=dtype).transformer
    check_model_name(name)
    files = transformer_files(name)
    with files.loading():
        folder = files.local()
        transformer = backbone_class(name, folder).transformer_class.from_pretrained(
            folder, subfolder="transformer", dtype=dtype)
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


def load_backbone(name: str, device: torch.device, dtype: torch.dtype) -> Backbone:
    """All parts of the model `name` (transformer, VAE, text encoders and tokenizers, scheduler) on `device`, frozen."""
    if name in RANDOM_MODELS:
        pipe = tiny.random_pipeline(RANDOM_MODELS[name], device=device, dtype=dtype)
        return quiet(backbone_class(name)(pipe))
    check_model_name(name)
    gated = (f" The SD3.5 and FLUX.1-dev repos are gated: downloading needs `hf auth login` with a token of an "
             f"account that accepted the licence on https://huggingface.co/{name}. To try the code without any "
             "download, use `--pretrained-model tiny`.")
    files = pipeline_files(name)
    with files.loading(hint="" if files.is_local else gated):
        folder = files.local()
        cls = backbone_class(name, folder)
        pipe = cls.pipeline_class.from_pretrained(folder, dtype=dtype)
    backbone = quiet(cls(pipe))
    for module in (backbone.transformer, backbone.vae, *backbone.text_encoders):
        module.requires_grad_(False).eval()
    pipe.to(device)
    return backbone


def quiet(backbone: Backbone) -> Backbone:
    """diffusers warns at every batch with a prompt longer than CLIP's 77 or T5's `max_sequence_length` tokens
    (printing the wrong text as removed, for T5). Truncation is how these models read prompts, not news: only its
    errors are shown, as in the published code."""
    logging.getLogger(backbone.pipeline_class.__module__).setLevel(logging.ERROR)
    return backbone
