"""The three things asked of SD3: encode prompts, predict a velocity (CFG decided here), decode latents."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import StableDiffusion3Pipeline

from fdfo import distributed


@dataclass
class PromptEmbeds:
    """Text conditioning of a batch; `uncond_*` (empty prompt) only when guidance is used."""

    embeds: torch.Tensor  # (B, 77 + T5 tokens, joint_attention_dim)
    pooled: torch.Tensor  # (B, pooled_projection_dim)
    uncond_embeds: torch.Tensor | None = None
    uncond_pooled: torch.Tensor | None = None

    def repeat_interleave(self, n: int) -> PromptEmbeds:
        """Each row n times in a row, e.g. the two branches of a pair."""
        rep = lambda x: None if x is None else x.repeat_interleave(n, dim=0)  # noqa: E731
        return PromptEmbeds(rep(self.embeds), rep(self.pooled), rep(self.uncond_embeds), rep(self.uncond_pooled))

    def to(self, dtype: torch.dtype) -> PromptEmbeds:
        """In the compute dtype: predict_velocity runs the transformer under autocast in the embeddings' dtype."""
        cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
        return PromptEmbeds(cast(self.embeds), cast(self.pooled), cast(self.uncond_embeds), cast(self.uncond_pooled))

    def index(self, idx: torch.Tensor | slice) -> PromptEmbeds:
        pick = lambda x: None if x is None else x[idx]  # noqa: E731
        return PromptEmbeds(pick(self.embeds), pick(self.pooled), pick(self.uncond_embeds), pick(self.uncond_pooled))

    # Batches of an epoch, kept apart from their empty-prompt rows: those are all alike, so one is kept
    # (`cat`, `gather`) and repeated for the rows taken (`take`).
    @staticmethod
    def cat(parts: list[PromptEmbeds]) -> PromptEmbeds:
        """The rows of all parts, and one empty-prompt row."""
        first = parts[0]
        return PromptEmbeds(torch.cat([p.embeds for p in parts]), torch.cat([p.pooled for p in parts]),
                            None if first.uncond_embeds is None else first.uncond_embeds[:1],
                            None if first.uncond_pooled is None else first.uncond_pooled[:1])

    def gather(self) -> PromptEmbeds:
        """The rows of every rank, in rank order (and the one empty-prompt row)."""
        return PromptEmbeds(distributed.all_gather_tensor(self.embeds), distributed.all_gather_tensor(self.pooled),
                            self.uncond_embeds, self.uncond_pooled)

    def take(self, rows: torch.Tensor) -> PromptEmbeds:
        """Rows `rows`, each with the empty-prompt row."""
        expand = lambda x: None if x is None else x.expand(len(rows), *x.shape[1:])  # noqa: E731
        return PromptEmbeds(self.embeds[rows], self.pooled[rows], expand(self.uncond_embeds),
                            expand(self.uncond_pooled))


@torch.no_grad()
def encode_prompts(pipe: StableDiffusion3Pipeline, prompts: list[str], guidance_scale: float,
                   max_sequence_length: int) -> PromptEmbeds:
    """CLIP-L + CLIP-G + T5 embeddings as diffusers builds them; empty-prompt ones too when CFG is on."""
    use_cfg = guidance_scale != 1.0
    embeds, uncond_embeds, pooled, uncond_pooled = pipe.encode_prompt(
        prompt=prompts, prompt_2=None, prompt_3=None, device=pipe.text_encoder.device,
        do_classifier_free_guidance=use_cfg, negative_prompt="" if use_cfg else None,
        max_sequence_length=max_sequence_length,
    )
    return PromptEmbeds(embeds, pooled, uncond_embeds, uncond_pooled)


def predict_velocity(transformer: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: PromptEmbeds,
                     guidance_scale: float, detach_uncond: bool = False, integer_timestep: bool = False
                     ) -> torch.Tensor:
    """v(x, σ) in float32, with classifier-free guidance when guidance_scale ≠ 1.

    The compute dtype is that of the prompt embeddings (cast to it by the caller; fp16 over bf16 weights
    in the published recipe), under autocast, so that sampling and training run the very same numerics
    and the ratio ρ starts at exactly 1. `detach_uncond`: no gradient through the empty prompt's velocity
    (Flow-GRPO's training). `integer_timestep`: the transformer sees ⌊1000σ⌋ as an integer (DiffusionNFT's
    rollouts).
    """
    dtype = cond.embeds.dtype
    timestep = (1000 * sigma).to(torch.long if integer_timestep else torch.float32).expand(x.shape[0])
    embeds, pooled, hidden = cond.embeds, cond.pooled, x.to(dtype)
    use_cfg = guidance_scale != 1.0
    if use_cfg:
        embeds = torch.cat([cond.uncond_embeds, embeds])
        pooled = torch.cat([cond.uncond_pooled, pooled])
        hidden, timestep = torch.cat([hidden, hidden]), torch.cat([timestep, timestep])
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        v = transformer(hidden_states=hidden, timestep=timestep, encoder_hidden_states=embeds,
                        pooled_projections=pooled, return_dict=False)[0].float()
    if use_cfg:
        v_uncond, v_cond = v.chunk(2)
        if detach_uncond:
            v_uncond = v_uncond.detach()
        v = v_uncond + guidance_scale * (v_cond - v_uncond)
    return v


@torch.no_grad()
def decode_latents(pipe: StableDiffusion3Pipeline, latents: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Final float32 latents → images in [0, 1], float32, (B, 3, H, W), without gradient (see `decode`)."""
    return decode(pipe, latents, dtype)


def decode(pipe: StableDiffusion3Pipeline, latents: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Final float32 latents → images in [0, 1], float32, (B, 3, H, W), differentiable in the latents.

    As the published sampler decodes: under the sampling's autocast in `dtype` (fp16 in its recipe),
    mapped to [0, 1] in the decoder's output dtype, then widened.
    """
    vae = pipe.vae
    latents = latents / vae.config.scaling_factor + vae.config.shift_factor
    with torch.autocast(latents.device.type, dtype=dtype, enabled=dtype != torch.float32):
        images = vae.decode(latents, return_dict=False)[0]  # float32 in: autocast casts it as published
    return (images * 0.5 + 0.5).clamp(0, 1).float()


def latent_shape(pipe: StableDiffusion3Pipeline, resolution: int | None) -> tuple[int, int, int]:
    """(channels, height, width) of the latents for a square image of `resolution` pixels."""
    resolution = resolution or default_resolution(pipe)
    factor = pipe.vae_scale_factor * pipe.transformer.config.patch_size
    if resolution % factor:
        raise ValueError(f"The resolution must be a multiple of {factor} pixels, got {resolution}.")
    side = resolution // pipe.vae_scale_factor
    return (pipe.transformer.config.in_channels, side, side)


def tokens_per_row(pipe: StableDiffusion3Pipeline, resolution: int | None, max_sequence_length: int) -> int:
    """Tokens the transformer attends over per row: the image's patches and the prompt's CLIP (padded to the
    tokenizer's length) and T5 tokens, as encode_prompts gives them."""
    _, side, _ = latent_shape(pipe, resolution)
    return (side // pipe.transformer.config.patch_size) ** 2 + pipe.tokenizer_max_length + max_sequence_length


PAPER_RESOLUTION = 512  # pixels; SD3.5-M's own config would give 1024 (sample_size 128), the paper samples at 512


def default_resolution(pipe: StableDiffusion3Pipeline) -> int:
    """The paper's 512 px, or the model's own size where that is smaller (the tiny model's 64 px)."""
    return min(PAPER_RESOLUTION, pipe.default_sample_size * pipe.vae_scale_factor)
