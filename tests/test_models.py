from types import SimpleNamespace

import pytest
import torch

from fdfo.model.lora import LoraLoadError, attach_lora, load_lora, save_lora, trainable_parameters
from fdfo.hub_files import ModelLoadError
from fdfo.model.loading import load_backbone
from fdfo.model.sd3 import SD3
from fdfo.model.tiny import random_pipeline, sd35m_transformer


def test_tiny_is_deterministic_and_keeps_sd3_relations(tiny):
    other = random_pipeline("tiny")
    for a, b in zip(tiny.transformer.parameters(), other.transformer.parameters()):
        assert torch.equal(a, b)
    cfg = tiny.transformer.config
    clip_width = tiny.pipe.text_encoder.config.hidden_size + tiny.pipe.text_encoder_2.config.hidden_size
    assert clip_width < cfg.joint_attention_dim == tiny.pipe.text_encoder_3.config.d_model  # CLIP zero-padded to T5
    assert cfg.pooled_projection_dim == (tiny.pipe.text_encoder.config.projection_dim
                                         + tiny.pipe.text_encoder_2.config.projection_dim)
    assert tiny.transformer.config.dual_attention_layers == (0,)
    assert tiny.pipe.vae_scale_factor == 8 and tiny.vae.config.latent_channels == 16
    cond = tiny.encode(["a red cube on a table", ""], guidance_scale=1.0, max_sequence_length=128)
    assert cond.embeds.shape == (2, 77 + 128, cfg.joint_attention_dim)
    assert cond.uncond_embeds is None


def test_long_and_empty_prompts_encode(tiny):
    cond = tiny.encode(["word " * 200, ""], guidance_scale=4.5, max_sequence_length=128)
    assert cond.embeds.shape == cond.uncond_embeds.shape == (2, 205, 64)
    assert torch.isfinite(cond.embeds).all()


def test_sd35m_lora_has_the_published_trainable_count():
    model = attach_lora(sd35m_transformer("meta"), rank=32, alpha=64)
    assert trainable_parameters(model) == 18_776_064
    adapted = [n for n, m in model.named_modules() if n.endswith(".lora_A")]
    assert len(adapted) == 191 and not any(".attn2." in n for n in adapted)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_lora_weights_are_float32_on_a_bf16_base():
    pipe = random_pipeline("tiny", dtype=torch.bfloat16)
    model = attach_lora(pipe.transformer)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}


def velocity_of(model):
    cond = model.encode(["a photo of a cat"], 1.0, 128)
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    return model.velocity(model.transformer, x, torch.tensor(0.7), cond, 1.0)


def test_lora_save_load_round_trip(tmp_path, tiny):
    model = attach_lora(tiny.transformer, seed=1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)  # B starts at zero; make the adapter change the output
    expected = velocity_of(tiny)
    save_lora(model, tmp_path / "ckpt")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "ckpt").iterdir()}

    fresh = SD3(random_pipeline("tiny"))
    fresh_model = attach_lora(fresh.transformer, seed=2)
    assert not torch.equal(velocity_of(fresh), expected)
    load_lora(fresh_model, tmp_path / "ckpt")
    assert torch.equal(velocity_of(fresh), expected)


def test_lora_of_another_shape_or_keys_is_refused(tmp_path, tiny):
    save_lora(attach_lora(random_pipeline("tiny").transformer, rank=4), tmp_path / "rank4")
    model = attach_lora(tiny.transformer, rank=8)
    with pytest.raises(LoraLoadError, match="of another shape.*--lora-rank"):
        load_lora(model, tmp_path / "rank4")

    from peft import LoraConfig, get_peft_model
    partial = get_peft_model(random_pipeline("tiny").transformer, LoraConfig(r=8, target_modules=["attn.to_q"]))
    partial.save_pretrained(tmp_path / "partial")
    with pytest.raises(LoraLoadError, match="weights missing"):
        load_lora(model, tmp_path / "partial")
    with pytest.raises(LoraLoadError, match="not a LoRA checkpoint folder"):
        load_lora(model, tmp_path)


def test_unreachable_hub_model_says_what_to_do():
    with pytest.raises(ModelLoadError) as err:
        load_backbone("stabilityai/stable-diffusion-3.5-medium", torch.device("cpu"), torch.bfloat16)
    message = str(err.value)
    assert "hf auth login" in message and "accepted the licence" in message and "--pretrained-model tiny" in message


def test_default_resolution_is_the_papers_512_px(tiny):
    from fdfo.model.tiny import SD35M_TRANSFORMER
    assert tiny.default_resolution() == 64 and tiny.latent_shape(None) == (16, 8, 8)

    # SD3.5-M's config says sample_size 128 (1024 px); the paper samples at 512 px
    sd35m = SimpleNamespace(default_sample_size=SD35M_TRANSFORMER["sample_size"], vae_scale_factor=8)
    assert SD3(sd35m).default_resolution() == 512
