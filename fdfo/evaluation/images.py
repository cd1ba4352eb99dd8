"""Images from the plain diffusers pipeline of the backbone (no churn), one seed per image; shared by generate.py and metrics.py."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from tqdm import tqdm

from fdfo import distributed
from fdfo.model.lora import attach_lora_from
from fdfo.model.backbone import Backbone
from fdfo.model.loading import load_backbone, model_dtype


def load_with_checkpoint(pretrained_model: str, precision: str, checkpoint: Path | None,
                         device: torch.device) -> Backbone:
    """The base model, with the LoRA of `checkpoint` (a resolved adapter folder) attached if given."""
    backbone = load_backbone(pretrained_model, device, model_dtype(precision, device))
    if checkpoint is not None:
        attach_lora_from(backbone.transformer, checkpoint)
        distributed.print0(f"LoRA from {checkpoint}")
    return backbone


def image_noise(seeds: list[int], shape: tuple[int, int, int], dtype: torch.dtype) -> torch.Tensor:
    """The starting latents (N, C, h, w) on the CPU, drawn as the published evaluation draws them: one CPU
    generator per image seeded with seed mod 2³¹, in the pipeline's dtype (so the images do not depend on
    the device, the batch or the rank)."""
    return torch.cat([torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(s % 2**31), dtype=dtype)
                      for s in seeds])


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """The pipeline's [0, 1] images → uint8 as the published evaluation converts them: x·255 + 0.5 in the
    pipeline's own dtype (bf16 on a GPU, which posterises a little), clipped, truncated."""
    return (images * 255 + 0.5).clip(0, 255).to(torch.uint8)


@torch.no_grad()
def generate_images(backbone: Backbone, prompts: list[str], seeds: list[int], num_steps: int,
                    guidance_scale: float, resolution: int | None, max_sequence_length: int,
                    batch_size: int, desc: str = "generating", integer: bool = False) -> torch.Tensor:
    """uint8 images (N, 3, H, W) for prompts[i] with starting noise from seeds[i], in batches; `integer`: at
    integer timesteps (as DiffusionNFT's pipeline feeds them)."""
    transformer = backbone.transformer
    backbone.pipe.set_progress_bar_config(disable=True)  # one bar, ours, over the batches
    resolution = resolution or backbone.default_resolution()
    shape = backbone.latent_shape(resolution)
    out = []
    with backbone.integer_timesteps() if integer else contextlib.nullcontext():
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not distributed.is_main()):
            chunk = slice(start, start + batch_size)
            latents = image_noise(seeds[chunk], shape, transformer.dtype).to(transformer.device)
            images = backbone.generate(prompts[chunk], latents, num_steps, guidance_scale, resolution,
                                       max_sequence_length)
            out.append(to_uint8(images).cpu())
    return torch.cat(out)
