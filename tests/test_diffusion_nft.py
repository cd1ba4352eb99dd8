import math

import pytest
import torch

from fdfo.formulas.diffusion_nft import (DEFAULTS, adaptive_x0_loss, dpm2_step, forward_noise, implicit_policies,
                                         lagged_update, nft_loss, old_policy_decay, optimality_weight,
                                         train_timestep_indices)
from fdfo.model.backbone import PromptEmbeds
from fdfo.model.sd3 import SD3
from fdfo.model.tiny import random_pipeline


def lats(*rows):
    """A batch of latents (B, 1, 1, n), one row of values per sample."""
    return torch.tensor(rows, dtype=torch.float32).view(len(rows), 1, 1, -1)


def test_forward_noise_by_hand():
    # t = 0.25: 0.75·(1, 2) + 0.25·(0, 4) = (0.75, 2.5); t = 0.5: 0.5·(3, −1) + 0.5·(1, 1) = (2, 0).
    x0, noise = lats([1.0, 2.0], [3.0, -1.0]), lats([0.0, 4.0], [1.0, 1.0])
    x_t = forward_noise(x0, noise, torch.tensor([0.25, 0.5]))
    torch.testing.assert_close(x_t, lats([0.75, 2.5], [2.0, 0.0]))
    # x0 = x_t − t·v with v = ε − x0, the identity the loss relies on.
    torch.testing.assert_close(x_t - torch.tensor([0.25, 0.5]).view(-1, 1, 1, 1) * (noise - x0), x0)


def test_optimality_weight_by_hand():
    # Groups (1, 3) and (2, 6): centred (−1, 1, −2, 2); global std sqrt(3.5); r = 1/2 + A/(2·5).
    r = optimality_weight(torch.tensor([1.0, 3.0, 2.0, 6.0]), torch.tensor([0, 0, 1, 1]))
    adv = torch.tensor([-1.0, 1.0, -2.0, 2.0]) / (math.sqrt(3.5) + 1e-4)
    torch.testing.assert_close(r, 0.5 + adv / 10)


def test_optimality_weight_clips_at_z():
    # One group of 30 zeros and a 1: mean 1/31, std sqrt(30)/31, so A = sqrt(30) ≈ 5.48 > 5 for the 1 → r = 1,
    # and A = −1/sqrt(30) for the zeros → r = 1/2 − 1/(10·sqrt(30)).
    rewards = torch.zeros(31)
    rewards[4] = 1.0
    r = optimality_weight(rewards, torch.zeros(31, dtype=torch.long), eps=0.0)
    assert r[4].item() == 1.0
    torch.testing.assert_close(r[0], torch.tensor(0.5 - 1 / (10 * math.sqrt(30))))
    assert r.min().item() >= 0 and r.max().item() <= 1


def test_implicit_policies_by_hand():
    # β = 0.5: v⁺ = 0.5·(1, 3) + 0.5·(2, 2) = (1.5, 2.5); v⁻ = 1.5·(2, 2) − 0.5·(1, 3) = (2.5, 1.5).
    v_theta, v_old = lats([1.0, 3.0]).requires_grad_(), lats([2.0, 2.0]).requires_grad_()
    v_pos, v_neg = implicit_policies(v_theta, v_old, 0.5)
    torch.testing.assert_close(v_pos, lats([1.5, 2.5]))
    torch.testing.assert_close(v_neg, lats([2.5, 1.5]))
    torch.testing.assert_close((v_pos + v_neg) / 2, v_old.detach())  # they straddle the old policy
    (v_pos.sum() + 2 * v_neg.sum()).backward()
    torch.testing.assert_close(v_theta.grad, torch.full_like(v_theta, 0.5 - 2 * 0.5))
    assert v_old.grad is None


def test_adaptive_x0_loss_by_hand():
    # x0 = (1, −1), t = 0.5, ε = (1, 1): x_t = (1, 0). v = (2, 2): x̂0 = x_t − 0.5·v = (0, −1), error (−1, 0):
    # mean square 0.5 over mean |·| 0.5 → 1. An exact prediction gives 0 (the weight is floored at 1e-5).
    x0, t = lats([1.0, -1.0]), torch.tensor([0.5]).view(-1, 1, 1, 1)
    x_t = forward_noise(x0, lats([1.0, 1.0]), 0.5)
    torch.testing.assert_close(adaptive_x0_loss(lats([2.0, 2.0]), x0, x_t, t), torch.tensor([1.0]))
    torch.testing.assert_close(adaptive_x0_loss(lats([0.0, 2.0]), x0, x_t, t), torch.tensor([0.0]))


def test_nft_loss_by_hand():
    # Both samples: x0 = (1, −1), ε = (1, 1), so the target velocity is v = ε − x0 = (0, 2). β = 0.5, Z = 5.
    x0, noise, t = lats([1.0, -1.0], [1.0, -1.0]), lats([1.0, 1.0], [1.0, 1.0]), torch.tensor([0.5, 0.25])
    x_t = forward_noise(x0, noise, t)
    # Sample 0 (t = 0.5, r = 0.75): v_θ = (3, 2), v_old = (1, 2) → v⁺ = (2, 2), v⁻ = 1.5·(1, 2) − 0.5·(3, 2) = (0, 2).
    #   x̂0 − x0 = t·(v − v^±): (−1, 0) → 0.5/0.5 = 1 for L⁺; (0, 0) → 0 for L⁻. Item: (0.75·1 + 0.25·0)/0.5 = 1.5.
    # Sample 1 (t = 0.25, r = 0.2): v_θ = v_old = 0 → v^± = 0, error 0.25·(0, 2) = (0, 0.5): 0.125/0.25 = 0.5
    #   for both. Item: (0.2·0.5 + 0.8·0.5)/0.5 = 1.
    v_theta, v_old = lats([3.0, 2.0], [0.0, 0.0]), lats([1.0, 2.0], [0.0, 0.0])
    r = torch.tensor([0.75, 0.2])
    terms = nft_loss(v_theta, v_old, x0, x_t, t, r, beta=0.5, adv_clip_max=5.0)
    torch.testing.assert_close(terms.loss, torch.tensor(5 * (1.5 + 1.0) / 2))
    torch.testing.assert_close(terms.unweighted_policy_loss, torch.tensor((1.5 + 1.0) / 2))
    torch.testing.assert_close(terms.positive_loss, torch.tensor((1.0 + 0.5) / 2))
    torch.testing.assert_close(terms.negative_loss, torch.tensor((0.0 + 0.5) / 2))
    torch.testing.assert_close(terms.old_deviate, torch.tensor(4 / 4))  # only sample 0's first element differs
    # With a reference: mean((v_θ − 0)²) per sample = (9 + 4)/2 and 0, mean 3.25, times kl_weight.
    with_kl = nft_loss(v_theta, v_old, x0, x_t, t, r, 0.5, 5.0, v_ref=torch.zeros_like(v_theta), kl_weight=0.1)
    torch.testing.assert_close(with_kl.kl, torch.tensor(3.25))
    torch.testing.assert_close(with_kl.loss, terms.loss + 0.1 * 3.25)


def test_with_r_one_the_loss_pulls_v_theta_to_the_target_velocity():
    gen = torch.Generator().manual_seed(0)
    x0, noise, v_old = (torch.randn(3, 2, 4, 4, generator=gen) for _ in range(3))
    t = torch.tensor([0.2, 0.5, 0.9])
    x_t, target = forward_noise(x0, noise, t), noise - x0
    v_theta = (v_old + 0.3 * torch.randn(3, 2, 4, 4, generator=gen)).requires_grad_()
    beta, n = 1.0, 2 * 4 * 4
    nft_loss(v_theta, v_old, x0, x_t, t, torch.ones(3), beta).loss.backward()
    # x̂0 − x0 = −t·e with e = v_θ − target; with the weight t·mean|e| held constant the gradient of
    # Z·mean_b(t²·mean(e²)/(t·mean|e|)) is Z/B · 2t·e/(n·mean|e|).
    e = (v_theta - target).detach()
    l1 = e.abs().flatten(1).mean(1).view(-1, 1, 1, 1)
    torch.testing.assert_close(v_theta.grad, 5.0 / 3 * 2 * t.view(-1, 1, 1, 1) * e / (n * l1))
    # So a gradient step moves every sample straight towards ε − x0; there the loss is 0.
    stepped = v_theta.detach() - 0.01 * v_theta.grad
    assert ((stepped - target).flatten(1).norm(dim=1) < e.flatten(1).norm(dim=1)).all()
    assert nft_loss(target, v_old, x0, x_t, t, torch.ones(3), beta).loss.item() < 1e-5
    # With r = 0 the minimum is where v⁻ = 2·v_old − v_θ hits the target instead.
    assert nft_loss(2 * v_old - target, v_old, x0, x_t, t, torch.zeros(3), beta).loss.item() < 1e-5


def test_old_policy_decay_schedules_by_hand():
    assert [old_policy_decay(s) for s in (0, 100, 499, 1000)] == [0.0, 0.1, 0.499, 0.5]  # min(0.001·s, 0.5)
    assert [old_policy_decay(s, 2) for s in (0, 74, 75, 175, 1000)] == [0.0, 0.0, 0.0, 0.75, 0.999]
    assert old_policy_decay(10**6, 0) == 0.0  # the old policy is the current one
    torch.testing.assert_close(lagged_update(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0]), 0.25),
                               torch.tensor([0.25 * 1 + 0.75 * 3, 0.25 * 2 + 0.75 * 0]))


def test_train_timestep_indices_drop_one_random_sigma_per_sample():
    generator = torch.Generator().manual_seed(0)
    idx = torch.stack([train_timestep_indices(10, 9, generator) for _ in range(64)])
    assert idx.shape == (64, 9)
    assert all(len(set(row.tolist())) == 9 and 0 <= min(row) and max(row) <= 9 for row in idx)
    dropped = {45 - row.sum().item() for row in idx}  # 0 + … + 9 = 45 minus the one left out
    assert len(dropped) > 1  # not always the same one


def test_defaults_are_the_published_sd35m_pickscore_recipe():
    d = DEFAULTS
    assert (d["num_steps"], d["group_size"], d["beta"], d["kl_weight"]) == (10, 24, 1.0, 1e-4)
    assert (d["guidance_scale"], d["learning_rate"], d["decay_type"], d["resolution"]) == (1.0, 3e-4, 1, 512)
    assert int(d["num_steps"] * d["timestep_fraction"]) == 9
    # 48 prompts × 24 images on 8 GPUs × 9 per batch → 16 batches, all accumulated into one optimiser step.
    batches = d["groups_per_epoch"] * d["group_size"] // (d["num_gpus"] * d["sample_batch_size"])
    assert batches == d["gradient_accumulation_steps"] == 16


def test_the_dpm2_solver_by_hand():
    # Levels 1, 0.8, 0.5, 0.2, 0; λ = log((1 − σ)/σ): −∞, −log 4, 0, log 4. Step 0 is DDIM: x' = (1 − t)·x̂0 + t·x.
    sigmas = torch.tensor([1.0, 0.8, 0.5, 0.2, 0.0])
    one = lambda v: torch.tensor([v])  # noqa: E731
    torch.testing.assert_close(dpm2_step(one(2.0), one(1.0), None, sigmas, 0), one(0.2 * 1.0 + 0.8 * 2.0))
    # Step 1 (0.8 → 0.5): λ(σ_0) = −∞ makes r0 = ∞ and the correction 0: x' = (t/s)·x − (1 − t)(e^−h − 1)·x̂0, e^−h = 1/4.
    torch.testing.assert_close(dpm2_step(one(1.0), one(0.5), one(0.3), sigmas, 1), one(0.625 * 1.0 + 0.5 * 0.75 * 0.5))
    # Step 2 (0.5 → 0.2): h = h_0 = log 4, r0 = 1: x' = 0.4·x + 0.6·x̂0 + 0.3·(x̂0 − x̂0_prev).
    torch.testing.assert_close(dpm2_step(one(1.0), one(0.5), one(0.7), sigmas, 2), one(0.4 + 0.3 - 0.06))
    # The last step is DDIM to σ = 0: x' = x̂0.
    torch.testing.assert_close(dpm2_step(one(0.3), one(0.25), one(0.5), sigmas, 3), one(0.25))


def test_the_dpm2_solver_is_second_order_on_the_sd3_grid():
    # Gaussian data N(0, 1): the exact velocity is linear, the exact ODE takes x(1) to x(0) = x(1). Doubling the
    # steps divides Euler's error by 2 and dpm2's by 4 (measured: 40 → 80 steps, 2.0× and 4.6×).
    def solve(steps, solver):
        sigmas = SD3(random_pipeline("tiny")).sigmas(steps, None, torch.device("cpu")).double()
        x, previous = torch.ones(1, dtype=torch.float64), None
        for i in range(steps):
            s = sigmas[i]
            v = (x - (1 - s) / ((1 - s) ** 2 + s ** 2) * x) / s
            if solver == "euler":
                x = x + (sigmas[i + 1] - s) * v
            else:
                x0 = x - s * v
                x, previous = dpm2_step(x, x0, previous, sigmas, i), x0
        return (x - 1).abs().item()
    assert 1.8 < solve(40, "euler") / solve(80, "euler") < 2.2
    assert solve(40, "dpm2") / solve(80, "dpm2") > 3.5


def test_diffusion_nfts_rollouts_feed_integer_timesteps():
    # Its pipeline: torch.full(..., sigma * 1000, dtype=torch.long), 960 at σ = 0.960129.
    seen = []

    def transformer(hidden_states, timestep, **kwargs):
        seen.append(timestep)
        return (torch.zeros_like(hidden_states),)
    cond = PromptEmbeds(torch.zeros(1, 2, 4), torch.zeros(1, 4), None, None)
    for integer in (True, False):
        SD3(random_pipeline("tiny")).velocity(transformer, torch.zeros(1, 4, 2, 2), torch.tensor(0.960129), cond, 1.0, integer_timestep=integer)
    assert seen[0].dtype == torch.long and seen[0].tolist() == [960]
    assert seen[1].dtype == torch.float32 and seen[1].item() == pytest.approx(960.129, abs=1e-3)
