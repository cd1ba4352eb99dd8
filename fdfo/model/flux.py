"""FLUX.1 (dev): T5 + CLIP-L pooled prompts, guidance distilled into an embedding, latents packed 2×2 into tokens
with position ids, and a σ grid shifted by the image's token count (diffusers' `calculate_shift`).

`--sample.guidance-scale` is the value fed to FLUX.1-dev's guidance embedding (its pipeline's default is 3.5): one
transformer call per step whatever its value; there is no classifier-free guidance and no empty-prompt pass.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from fdfo.model.backbone import Backbone, PromptEmbeds
from fdfo.model.lora import LORA_TARGETS


class Flux(Backbone):
    pipeline_class = FluxPipeline
    transformer_class = FluxTransformer2DModel
    # The attention projections: all eight of the double-stream blocks (as SD3's joint attention) and q/k/v of the
    # single-stream blocks (their output projection also carries the MLP's, so it is left alone, as SD3's MLPs).
    lora_targets = LORA_TARGETS
    auto_precision = "bf16"  # FLUX.1 is made and run in bf16: its activations exceed fp16's range (diffusers clips them)
    guidance = "embedded"

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.pipe.text_encoder, self.pipe.text_encoder_2]

    def blocks(self) -> list[torch.nn.Module]:
        return [*self.transformer.transformer_blocks, *self.transformer.single_transformer_blocks]

    @torch.no_grad()
    def encode(self, prompts: list[str], guidance_scale: float, max_sequence_length: int) -> PromptEmbeds:
        """T5 token embeddings and CLIP-L's pooled vector, as FluxPipeline builds them."""
        embeds, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.pipe.text_encoder.device,
                                                    max_sequence_length=max_sequence_length)
        return PromptEmbeds(embeds, pooled)

    def velocity(self, model: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: PromptEmbeds,
                 guidance_scale: float, detach_uncond: bool = False, integer_timestep: bool = False) -> torch.Tensor:
        dtype, (b, c, h, w) = cond.embeds.dtype, x.shape
        timestep = sigma.float().expand(b)  # FLUX's transformer takes σ and scales it by 1000 itself
        if integer_timestep:
            timestep = torch.floor(1000 * timestep) / 1000
        config = self.transformer.config
        guidance = torch.full((b,), guidance_scale, device=x.device) if config.guidance_embeds else None
        hidden = FluxPipeline._pack_latents(x.to(dtype), b, c, h, w)
        image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, dtype)
        text_ids = torch.zeros(cond.embeds.shape[1], 3, device=x.device, dtype=dtype)
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            v = model(hidden_states=hidden, timestep=timestep, guidance=guidance, pooled_projections=cond.pooled,
                      encoder_hidden_states=cond.embeds, txt_ids=text_ids, img_ids=image_ids,
                      return_dict=False)[0].float()
        return FluxPipeline._unpack_latents(v, h * self.pipe.vae_scale_factor, w * self.pipe.vae_scale_factor,
                                            self.pipe.vae_scale_factor)

    def timestep_settings(self, num_steps: int, resolution: int | None) -> dict:
        """FluxPipeline's: σ from 1 to 1/N in N even steps, shifted by μ, linear in the image's tokens."""
        _, side, _ = self.latent_shape(resolution)
        config = self.pipe.scheduler.config
        mu = calculate_shift((side // 2) ** 2, config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        return {"sigmas": np.linspace(1.0, 1 / num_steps, num_steps), "mu": mu}

    def tokens_per_row(self, resolution: int | None, max_sequence_length: int) -> int:
        """The image's 2×2 packed latents and the prompt's T5 tokens (CLIP-L gives only the pooled vector)."""
        _, side, _ = self.latent_shape(resolution)
        return (side // 2) ** 2 + max_sequence_length

    def generate(self, prompts: list[str], noise: torch.Tensor, num_steps: int, guidance_scale: float,
                 resolution: int, max_sequence_length: int) -> torch.Tensor:
        b, c, h, w = noise.shape
        return self.pipe(prompt=prompts, latents=FluxPipeline._pack_latents(noise, b, c, h, w),
                         num_inference_steps=num_steps, guidance_scale=guidance_scale, height=resolution,
                         width=resolution, max_sequence_length=max_sequence_length, output_type="pt").images

    def truncated(self, timestep: torch.Tensor) -> torch.Tensor:
        return torch.floor(1000 * timestep) / 1000  # the pipeline's σ
