"""A LoRA checkpoint (ours or a published one) in the format diffusers loads:

    python export.py --checkpoint runs/00000-combined-cfg_1p0 --out lora/
    pipe = StableDiffusion3Pipeline.from_pretrained(...); pipe.load_lora_weights("lora/")

The weights keep PEFT's key names below the transformer, and the adapter's config (rank, alpha, targets)
travels in the file's metadata, which diffusers reads back, so the scale alpha / rank is kept. They are saved
by the base model's own pipeline class (`--pretrained-model`: StableDiffusion3Pipeline, FluxPipeline). With
`--merged`, the transformer with the LoRA merged into its weights is written too (`<out>/transformer`), for
tools that take a plain transformer.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from peft import LoraConfig

from fdfo import distributed
from fdfo.config import ExportConfig, check_export_config
from fdfo.runs.hub import resolve_checkpoint
from fdfo.model.lora import attach_lora_from, load_lora_weights
from fdfo.model.lora_folder import PEFT_PREFIX, check_lora_folder
from fdfo.model.loading import backbone_class, load_transformer, stored_dtype

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the name diffusers looks for


def export_lora(checkpoint: Path, out: Path, pipeline_class: type[DiffusionPipeline]) -> Path:
    """Write the LoRA of the checkpoint folder `checkpoint` into `out` with diffusers' own saving function, that
    of `pipeline_class`."""
    config = LoraConfig.from_pretrained(str(checkpoint))
    weights = load_lora_weights(checkpoint)
    layers = {name.removeprefix(PEFT_PREFIX): value for name, value in weights.items()}
    pipeline_class.save_lora_weights(out, transformer_lora_layers=layers, weight_name=WEIGHT_NAME,
                                     transformer_lora_adapter_metadata=config.to_dict())
    return out / WEIGHT_NAME


EXPORT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def merged_transformer(checkpoint: Path, pretrained_model: str, dtype: str) -> torch.nn.Module:
    """The base model's transformer alone (not the pipeline: a fraction of the memory) with the LoRA of `checkpoint`
    merged into its weights in float32, then cast to `dtype` (auto: the dtype the base model is stored in)."""
    device = distributed.init()
    target = stored_dtype(pretrained_model) if dtype == "auto" else EXPORT_DTYPES[dtype]
    transformer = load_transformer(pretrained_model, device, torch.float32)
    return attach_lora_from(transformer, checkpoint).merge_and_unload().to(target)  # W + alpha/rank · B·A


def export(cfg: ExportConfig) -> Path:
    check_export_config(cfg)
    checkpoint = resolve_checkpoint(cfg.checkpoint, cfg.ema)
    check_lora_folder(checkpoint)  # a damaged or foreign folder would give a file diffusers rejects
    # The base model is loaded and the LoRA merged before anything is written: a missing model writes nothing.
    backbone = backbone_class(cfg.pretrained_model)
    merged = merged_transformer(checkpoint, cfg.pretrained_model, cfg.dtype) if cfg.merged else None
    path = export_lora(checkpoint, cfg.out, backbone.pipeline_class)
    distributed.print0(f"Wrote {path}: load it with {backbone.pipeline_class.__name__}.load_lora_weights"
                       f"({str(cfg.out)!r})")
    if merged is not None:
        merged.save_pretrained(cfg.out / "transformer")
        distributed.print0(f"Wrote {cfg.out / 'transformer'} ({str(merged.dtype).removeprefix('torch.')}): load it with "
                           f"{type(merged).__name__}.from_pretrained({str(cfg.out / 'transformer')!r})")
    return path
