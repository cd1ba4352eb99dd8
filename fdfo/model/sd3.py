"""Stable Diffusion 3 / 3.5 (Medium, Large): CLIP-L + CLIP-G + T5 prompts, classifier-free guidance, 2×2 patches."""

from __future__ import annotations

import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

from fdfo.model.backbone import Backbone, PromptEmbeds
from fdfo.model.lora import LORA_TARGETS


def predict_velocity(model: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: PromptEmbeds,
                     guidance_scale: float, detach_uncond: bool = False, integer_timestep: bool = False
                     ) -> torch.Tensor:
    """Backbone.velocity for SD3: classifier-free guidance where guidance_scale ≠ 1, the empty prompt's rows
    batched with the prompts'; the transformer sees 1000σ."""
    dtype = cond.embeds.dtype
    timestep = (1000 * sigma).to(torch.long if integer_timestep else torch.float32).expand(x.shape[0])
    embeds, pooled, hidden = cond.embeds, cond.pooled, x.to(dtype)
    use_cfg = guidance_scale != 1.0
    if use_cfg:
        embeds = torch.cat([cond.uncond_embeds, embeds])
        pooled = torch.cat([cond.uncond_pooled, pooled])
        hidden, timestep = torch.cat([hidden, hidden]), torch.cat([timestep, timestep])
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        v = model(hidden_states=hidden, timestep=timestep, encoder_hidden_states=embeds,
                  pooled_projections=pooled, return_dict=False)[0].float()
    if use_cfg:
        v_uncond, v_cond = v.chunk(2)
        if detach_uncond:
            v_uncond = v_uncond.detach()
        v = v_uncond + guidance_scale * (v_cond - v_uncond)
    return v


class SD3(Backbone):
    pipeline_class = StableDiffusion3Pipeline
    transformer_class = SD3Transformer2DModel
    lora_targets = LORA_TARGETS  # joint attention of every block (the dual-attention `attn2` left alone), as published
    auto_precision = "fp16"  # the published recipe: fp16 autocast over bf16 weights
    guidance = "cfg"

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.pipe.text_encoder, self.pipe.text_encoder_2, self.pipe.text_encoder_3]

    def blocks(self) -> list[torch.nn.Module]:
        return list(self.transformer.transformer_blocks)

    @property
    def latent_patch(self) -> int:
        return self.transformer.config.patch_size

    @torch.no_grad()
    def encode(self, prompts: list[str], guidance_scale: float, max_sequence_length: int) -> PromptEmbeds:
        """CLIP-L + CLIP-G + T5 embeddings as diffusers builds them; empty-prompt ones too when CFG is on."""
        use_cfg = self.uses_cfg(guidance_scale)
        embeds, uncond_embeds, pooled, uncond_pooled = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.pipe.text_encoder.device,
            do_classifier_free_guidance=use_cfg, negative_prompt="" if use_cfg else None,
            max_sequence_length=max_sequence_length,
        )
        return PromptEmbeds(embeds, pooled, uncond_embeds, uncond_pooled)

    velocity = staticmethod(predict_velocity)  # the SD3 transformer's call alone, for benchmarks of a bare transformer

    def tokens_per_row(self, resolution: int | None, max_sequence_length: int) -> int:
        """The image's patches and the prompt's CLIP (padded to the tokenizer's length) and T5 tokens."""
        _, side, _ = self.latent_shape(resolution)
        return (side // self.latent_patch) ** 2 + self.pipe.tokenizer_max_length + max_sequence_length

    def generate(self, prompts: list[str], noise: torch.Tensor, num_steps: int, guidance_scale: float,
                 resolution: int, max_sequence_length: int) -> torch.Tensor:
        return self.pipe(prompt=prompts, latents=noise, num_inference_steps=num_steps, guidance_scale=guidance_scale,
                         height=resolution, width=resolution, max_sequence_length=max_sequence_length,
                         output_type="pt").images

    def truncated(self, timestep: torch.Tensor) -> torch.Tensor:
        return timestep.long()  # the pipeline's 1000σ
