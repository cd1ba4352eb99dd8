"""What a method needs of a flow-matching text-to-image model, whatever its architecture (fdfo/model/sd3.py,
fdfo/model/flux.py): encode prompts, the velocity v(x, σ) with or without guidance, the σ grid, the latent
shape, decoding, the LoRA's targets, the plain pipeline's images, and the diffusers class its LoRA is saved for.

Latents are (B, C, h, w) everywhere above this layer (a backbone that packs them, as FLUX does, packs inside
`velocity`), so the samplers and methods are the same for every backbone. Convention: x_σ = (1 − σ) x_data + σ ε.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ClassVar, Iterator

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

from fdfo import distributed

PAPER_RESOLUTION = 512  # pixels; SD3.5-M's own config would give 1024, the paper samples at 512


@dataclass
class PromptEmbeds:
    """Text conditioning of a batch; `uncond_*` (empty prompt) only when classifier-free guidance is used."""

    embeds: torch.Tensor  # (B, tokens, joint_attention_dim)
    pooled: torch.Tensor  # (B, pooled_projection_dim)
    uncond_embeds: torch.Tensor | None = None
    uncond_pooled: torch.Tensor | None = None

    def repeat_interleave(self, n: int) -> PromptEmbeds:
        """Each row n times in a row, e.g. the two branches of a pair."""
        rep = lambda x: None if x is None else x.repeat_interleave(n, dim=0)  # noqa: E731
        return PromptEmbeds(rep(self.embeds), rep(self.pooled), rep(self.uncond_embeds), rep(self.uncond_pooled))

    def to(self, dtype: torch.dtype) -> PromptEmbeds:
        """In the compute dtype: `velocity` runs the transformer under autocast in the embeddings' dtype."""
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


class Backbone:
    """A diffusers pipeline seen through what the methods ask of it; one subclass per architecture."""

    pipeline_class: ClassVar[type[DiffusionPipeline]]  # what loads it, and whose save_lora_weights the export uses
    transformer_class: ClassVar[type[torch.nn.Module]]
    lora_targets: ClassVar[tuple[str, ...]]  # the LoRA's targets, as PEFT suffixes of module names
    auto_precision: ClassVar[str]  # what --precision auto trains in on a GPU
    guidance: ClassVar[str]  # what --sample.guidance-scale is: "cfg" (w of classifier-free guidance, 1 = none) or
    # "embedded" (the value of a guidance-distilled model's guidance embedding; one transformer call a step)

    def __init__(self, pipe: DiffusionPipeline):
        self.pipe = pipe

    @property
    def transformer(self) -> torch.nn.Module:
        return self.pipe.transformer

    @property
    def vae(self) -> torch.nn.Module:
        return self.pipe.vae

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        raise NotImplementedError

    def blocks(self) -> list[torch.nn.Module]:
        """The transformer's blocks, in order (compiled one by one: fdfo/model/compile.py)."""
        raise NotImplementedError

    def encode(self, prompts: list[str], guidance_scale: float, max_sequence_length: int) -> PromptEmbeds:
        """The prompts' embeddings as the pipeline builds them (empty-prompt ones too where CFG is on)."""
        raise NotImplementedError

    def velocity(self, model: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: PromptEmbeds,
                 guidance_scale: float, detach_uncond: bool = False, integer_timestep: bool = False) -> torch.Tensor:
        """v(x, σ) in float32 from `model` (this backbone's transformer, bare or wrapped: DDP, PEFT).

        The compute dtype is that of the prompt embeddings (cast to it by the caller; fp16 over bf16 weights in
        the published recipe), under autocast, so that sampling and training run the very same numerics and the
        ratio ρ starts at exactly 1. `detach_uncond`: no gradient through the empty prompt's velocity
        (Flow-GRPO's training). `integer_timestep`: the transformer sees ⌊1000σ⌋ (DiffusionNFT's rollouts)."""
        raise NotImplementedError

    @classmethod
    def uses_cfg(cls, guidance_scale: float) -> bool:
        """Whether a velocity at this guidance runs the transformer on the empty prompt too (2 rows per row)."""
        return cls.guidance == "cfg" and guidance_scale != 1.0

    def sigmas(self, num_steps: int, resolution: int | None, device: torch.device) -> torch.Tensor:
        """σ_0 … σ_T = 0 of the pipeline's own scheduler for `num_steps` steps at `resolution`, float32."""
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)  # the pipeline's untouched
        scheduler.set_timesteps(device=device, **self.timestep_settings(num_steps, resolution))
        return scheduler.sigmas.to(device=device, dtype=torch.float32)

    def timestep_settings(self, num_steps: int, resolution: int | None) -> dict:
        """What the pipeline passes to its scheduler's set_timesteps."""
        return {"num_inference_steps": num_steps}

    def latent_shape(self, resolution: int | None) -> tuple[int, int, int]:
        """(channels, height, width) of the latents for a square image of `resolution` pixels."""
        resolution = resolution or self.default_resolution()
        factor = self.pipe.vae_scale_factor * self.latent_patch
        if resolution % factor:
            raise ValueError(f"The resolution must be a multiple of {factor} pixels, got {resolution}.")
        side = resolution // self.pipe.vae_scale_factor
        return (self.vae.config.latent_channels, side, side)

    latent_patch: ClassVar[int] = 2  # latent pixels per transformer token along a side

    def tokens_per_row(self, resolution: int | None, max_sequence_length: int) -> int:
        """Tokens the transformer attends over per row: the image's and the prompt's, as `encode` gives them."""
        raise NotImplementedError

    def native_resolution(self) -> int:
        """The pipeline's own default image side in pixels."""
        return self.pipe.default_sample_size * self.pipe.vae_scale_factor

    def default_resolution(self) -> int:
        """The paper's 512 px, or the model's own size where that is smaller (the tiny models' 64 px)."""
        return min(PAPER_RESOLUTION, self.native_resolution())

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Final float32 latents → images in [0, 1], float32, (B, 3, H, W), without gradient (see `decode`)."""
        return self.decode(latents, dtype)

    def decode(self, latents: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Final float32 latents → images in [0, 1], float32, (B, 3, H, W), differentiable in the latents.

        As the published sampler decodes: under the sampling's autocast in `dtype` (fp16 in its recipe), mapped
        to [0, 1] in the decoder's output dtype, then widened.
        """
        vae = self.vae
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        with torch.autocast(latents.device.type, dtype=dtype, enabled=dtype != torch.float32):
            images = vae.decode(latents, return_dict=False)[0]  # float32 in: autocast casts it as published
        return (images * 0.5 + 0.5).clamp(0, 1).float()

    def generate(self, prompts: list[str], noise: torch.Tensor, num_steps: int, guidance_scale: float,
                 resolution: int, max_sequence_length: int) -> torch.Tensor:
        """The plain diffusers pipeline's images in [0, 1] (B, 3, H, W) from the starting latents `noise`."""
        raise NotImplementedError

    @contextlib.contextmanager
    def integer_timesteps(self) -> Iterator[None]:
        """The plain pipeline's transformer sees ⌊1000σ⌋ (as DiffusionNFT's pipeline feeds it) inside the block."""
        def truncate(module, args, kwargs):
            return args, {**kwargs, "timestep": self.truncated(kwargs["timestep"])}
        handle = self.transformer.register_forward_pre_hook(truncate, with_kwargs=True, prepend=True)  # first
        try:
            yield
        finally:
            handle.remove()

    def truncated(self, timestep: torch.Tensor) -> torch.Tensor:
        """The transformer's timestep input as its pipeline gives it → the same at ⌊1000σ⌋."""
        raise NotImplementedError
