"""Compiled transformer blocks compute what the plain ones compute: velocities, the loss, LoRA gradients."""

import torch

from fdfo.model.compile import compile_blocks, should_compile
from fdfo.formulas.estimator import normalise, surrogate_loss
from fdfo.model.lora import attach_lora
from fdfo.model.sd3 import SD3
from fdfo.model.tiny import random_pipeline


def trained_looking_lora_model():
    """The tiny model with a LoRA whose B is non-zero, so the adapter changes every output."""
    model = SD3(random_pipeline("tiny"))
    lora = attach_lora(model.transformer, seed=0)
    gen = torch.Generator().manual_seed(1)
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            p.data = 0.05 * torch.randn(p.shape, generator=gen)
    return model, lora


def loss_and_grads(model, lora, x, sigmas, cond, v_ref, d, dR):
    lora.zero_grad(set_to_none=True)
    v = model.velocity(model.transformer, x, sigmas, cond, 1.0)
    terms = surrogate_loss(v, v_ref, d, dR, clip_range=0.03)
    terms.loss.backward()
    grads = {n: p.grad.clone() for n, p in lora.named_parameters() if p.requires_grad}
    return terms, grads


def test_compiled_blocks_match_the_plain_path_in_sampling_and_training():
    model, lora = trained_looking_lora_model()
    gen = torch.Generator().manual_seed(2)
    shape = model.latent_shape(None)
    x = torch.randn(4, *shape, generator=gen)  # sampling batch of 4
    sigma = torch.tensor(0.7)
    cond = model.encode(["a red cube", "two cats", "a tree at night", "blue"], 1.0, 32)
    rows = torch.tensor([1, 3])  # a training micro-batch of another size than the sampling batch
    train_cond = cond.index(rows)
    d, dR = normalise(torch.randn(2, *shape, generator=gen)), torch.tensor([0.3, -0.2])
    sigmas = sigma.expand(2)

    with torch.no_grad():
        v_plain = model.velocity(model.transformer, x, sigma, cond, 1.0)
    # Off the sampling policy (v_ref shifted), so that ρ ≠ 1 and every term of the loss has a gradient.
    v_ref = v_plain[rows] + 0.01 * torch.randn(2, *shape, generator=gen)
    plain, plain_grads = loss_and_grads(model, lora, x[rows], sigmas, train_cond, v_ref, d, dR)

    assert compile_blocks(model.blocks()) == len(model.transformer.transformer_blocks)
    with torch.no_grad():
        v_compiled = model.velocity(model.transformer, x, sigma, cond, 1.0)
    compiled, compiled_grads = loss_and_grads(model, lora, x[rows], sigmas, train_cond, v_ref, d, dR)

    scale = v_plain.abs().max()
    assert (v_compiled - v_plain).abs().max() <= 1e-5 * scale
    assert torch.allclose(compiled.loss, plain.loss, rtol=1e-5, atol=0)
    assert torch.allclose(compiled.ratio, plain.ratio, rtol=1e-6, atol=0)
    assert compiled_grads.keys() == plain_grads.keys()
    # Every LoRA weight gets a gradient but the last block's text-query ones (that block's text output is unused).
    assert sum(g.abs().max() == 0 for g in plain_grads.values()) <= 2 < len(plain_grads)
    for name, g in plain_grads.items():
        assert (compiled_grads[name] - g).abs().max() <= 1e-4 * g.abs().max(), name

    # On the sampling policy the compiled training pass reproduces the compiled sampling pass: ρ = 1.
    on_policy, _ = loss_and_grads(model, lora, x[rows], sigmas, train_cond, v_compiled[rows], d, dR)
    assert (on_policy.ratio - 1).abs().max() < 1e-5


def test_compile_mode_auto_means_gpu_only():
    assert should_compile("auto", torch.device("cuda", 0))
    assert not should_compile("auto", torch.device("cpu"))
    assert should_compile("always", torch.device("cpu")) and not should_compile("never", torch.device("cuda"))
