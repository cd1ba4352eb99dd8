"""Random-weight pipelines built in code: `tiny` and `tiny-flux` for CPU tests, `sd35m-random`, `sd35l-random`
and `flux-random` (the real models' shapes) for GPU benchmarks.

They use the real diffusers/transformers classes and keep the relations of the real models (SD3.5: CLIP-L and
CLIP-G hidden states side by side, zero-padded to the T5 width, pooled vector = both CLIP projections; FLUX.1:
T5 tokens, CLIP-L's pooled vector, a guidance embedding), so diffusers' own `StableDiffusion3Pipeline` and
`FluxPipeline` run on them. Tokenizers are our own character-level vocabularies: no file is downloaded.
"""

from __future__ import annotations

import contextlib
import string
from typing import Iterator

import torch
from diffusers import (AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                       FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline)
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Config,
                          T5EncoderModel, T5Tokenizer)

CHARACTERS = string.ascii_lowercase + string.digits + string.punctuation
T5_CHARACTERS = string.ascii_letters + string.digits + string.punctuation

# SD3.5-Medium shapes (the published transformer/config.json).
SD35M_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)),
)
TINY_TRANSFORMER = dict(
    sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=3, attention_head_dim=8,
    num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=48,
    pos_embed_max_size=32, qk_norm="rms_norm", dual_attention_layers=(0,),
)
# SD3.5-Large (its transformer/config.json): the same block without dual attention, wider and deeper.
SD35L_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
    num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048,
    pos_embed_max_size=192, qk_norm="rms_norm", dual_attention_layers=(),
)
SD35M_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
TINY_VAE = dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4)
SD35M_TEXT = dict(
    clip_l=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                projection_dim=768, hidden_act="quick_gelu", vocab_size=49408),
    clip_g=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                projection_dim=1280, hidden_act="gelu", vocab_size=49408),
    t5=dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128),
)
TINY_TEXT = dict(
    clip_l=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                projection_dim=16, hidden_act="quick_gelu"),
    clip_g=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                projection_dim=32, hidden_act="gelu"),
    t5=dict(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2),
)


# FLUX.1-dev (its transformer/config.json; text encoders CLIP-L and T5-XXL as SD3.5's, VAE as SD3.5's but for its
# scaling and shift) and a tiny twin: two blocks of each stream, a guidance embedding, the rotary axes 1:1:2.
FLUX1DEV_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
TINY_FLUX_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=4,
    joint_attention_dim=64, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
)
FLUX_VAE_SCALING = dict(scaling_factor=0.3611, shift_factor=0.1159)
SD3_VAE_SCALING = dict(scaling_factor=1.5305, shift_factor=0.0609)

# size → (backbone, transformer shape, VAE shape, text encoder shapes, native image side in pixels)
SIZES = {
    "tiny": ("sd3", TINY_TRANSFORMER, TINY_VAE, TINY_TEXT, 64),
    "sd35m": ("sd3", SD35M_TRANSFORMER, SD35M_VAE, SD35M_TEXT, 1024),
    "sd35l": ("sd3", SD35L_TRANSFORMER, SD35M_VAE, SD35M_TEXT, 1024),
    "tiny-flux": ("flux", TINY_FLUX_TRANSFORMER, TINY_VAE, TINY_TEXT, 64),
    "flux1-dev": ("flux", FLUX1DEV_TRANSFORMER, SD35M_VAE, SD35M_TEXT, 1024),
}


def clip_tokenizer() -> CLIPTokenizer:
    """Character-level CLIP tokenizer (CLIP lower-cases its input), 77 tokens like the real one."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in CHARACTERS:
            vocab[c + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_tokenizer() -> T5Tokenizer:
    """Character-level unigram T5 tokenizer: <pad>=0, </s>=1, <unk>=2 as in T5."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)] + [(c, -2.0) for c in T5_CHARACTERS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def clip_text_encoder(tokenizer: CLIPTokenizer, vocab_size: int | None = None, projection: bool = True,
                      **shape) -> CLIPTextModel | CLIPTextModelWithProjection:
    """SD3's CLIPs project their pooled vector; FLUX's CLIP-L gives its pooled output as it is."""
    config = CLIPTextConfig(
        vocab_size=vocab_size or len(tokenizer), max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **shape,
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def t5_text_encoder(tokenizer: T5Tokenizer, vocab_size: int | None = None, **shape) -> T5EncoderModel:
    config = T5Config(vocab_size=vocab_size or len(tokenizer), feed_forward_proj="gated-gelu",
                      is_encoder_decoder=False, use_cache=False, **shape)
    return T5EncoderModel(config)


def vae(scaling: dict = SD3_VAE_SCALING, **shape) -> AutoencoderKL:
    n = len(shape["block_out_channels"])
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, use_quant_conv=False, use_post_quant_conv=False, **scaling, **shape,
    )


def sd3_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1-dev's scheduler/scheduler_config.json: σ shifted by μ from the image's token count."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                           base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                           max_image_seq_len=4096)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Construct modules directly in `dtype` (no float32 copy first)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def flow_scaled_output(transformer: SD3Transformer2DModel | FluxTransformer2DModel) -> None:
    """Re-draw the output projection so the velocity has a trained flow model's scale.

    A trained model predicts v = ε − x₀, about √2 per element for unit-variance noise and latents; with
    PyTorch's default init a random transformer's velocity is 0.6 (measured on `tiny`), so a LoRA could
    move samples less than half as far as on a real model. Weights of variance 2 / width give ≈ √2.
    """
    projection = transformer.proj_out
    torch.nn.init.normal_(projection.weight, std=(2 / projection.in_features) ** 0.5)


def random_pipeline(size: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                    seed: int = 0) -> DiffusionPipeline:
    """A random-weight pipeline of `size` (a key of SIZES), constructed directly on `device`."""
    backbone, transformer_shape, vae_shape, text_shape, native = SIZES[size]
    tok_l, tok_g, tok_t5 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    with torch.random.fork_rng(devices=[]), torch.device(device), default_dtype(dtype):
        torch.manual_seed(seed)
        if torch.device(device).type == "cuda":
            torch.cuda.manual_seed(seed)
        if backbone == "sd3":
            parts = dict(
                transformer=SD3Transformer2DModel(**transformer_shape),
                vae=vae(**vae_shape),
                text_encoder=clip_text_encoder(tok_l, **text_shape["clip_l"]),
                text_encoder_2=clip_text_encoder(tok_g, **text_shape["clip_g"]),
                text_encoder_3=t5_text_encoder(tok_t5, **text_shape["t5"]),
            )
        else:
            parts = dict(
                transformer=FluxTransformer2DModel(**transformer_shape),
                vae=vae(FLUX_VAE_SCALING, **vae_shape),
                text_encoder=clip_text_encoder(tok_l, projection=False, **text_shape["clip_l"]),
                text_encoder_2=t5_text_encoder(tok_t5, **text_shape["t5"]),
            )
        flow_scaled_output(parts["transformer"])
    for module in parts.values():
        module.eval().requires_grad_(False)
    if backbone == "sd3":
        return StableDiffusion3Pipeline(**parts, tokenizer=tok_l, tokenizer_2=tok_g, tokenizer_3=tok_t5,
                                        scheduler=sd3_scheduler())
    pipe = FluxPipeline(**parts, tokenizer=tok_l, tokenizer_2=tok_t5, scheduler=flux_scheduler())
    pipe.default_sample_size = native // pipe.vae_scale_factor  # FluxPipeline assumes FLUX.1's 128 (1024 px)
    return pipe


def sd35m_transformer(device: torch.device | str = "meta") -> SD3Transformer2DModel:
    """The SD3.5-M transformer alone, by default on the meta device (shapes only, no memory)."""
    with torch.device(device):
        return SD3Transformer2DModel(**SD35M_TRANSFORMER)
