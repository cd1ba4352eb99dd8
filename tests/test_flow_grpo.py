import math

import torch

from fdfo.formulas.flow_grpo import (DEFAULTS, clipped_policy_loss, diffusion_coefficient, group_advantages, kl_penalty,
                            sde_step, step_log_prob)


def lat(*values):
    """One sample's latent (1, 1, 1, n) from its values."""
    return torch.tensor(values, dtype=torch.float32).view(1, 1, 1, -1)


def test_sde_step_by_hand():
    # σ = 0.5, σ' = 0.25, a = 0.5: σ_t = 0.5·sqrt(0.5/0.5) = 0.5, dt = −0.25, σ_t²/(2σ) = 0.25, std = 0.5·0.5.
    # x = (1, −2), v = (2, 0): x + (1 − σ)v = (2, −2), drift = v + 0.25·(2, −2) = (2.5, −0.5),
    # mean = x − 0.25·drift = (0.375, −1.875); next = mean + 0.25·noise with noise = (1, −2).
    step = sde_step(lat(1.0, -2.0), lat(2.0, 0.0), 0.5, 0.25, 0.5, lat(1.0, -2.0), sigma_max=0.96)
    torch.testing.assert_close(step.mean, lat(0.375, -1.875))
    torch.testing.assert_close(step.std, torch.tensor(0.25))
    torch.testing.assert_close(step.sigma_t, torch.tensor(0.5))
    torch.testing.assert_close(step.next, lat(0.625, -2.375))


def test_sde_step_at_sigma_one_uses_sigma_max():
    # σ = 1: σ_t = 0.7·sqrt(1/(1 − 0.96)) = 0.7·5 = 3.5; dt = −0.2, so std = 3.5·sqrt(0.2).
    # mean = x + [v + 3.5²/2·(x + 0·v)]·(−0.2) = 1 − 0.2·(1 + 6.125) = −0.425 for x = v = 1.
    step = sde_step(lat(1.0), lat(1.0), 1.0, 0.8, 0.7, lat(0.0), sigma_max=0.96)
    torch.testing.assert_close(step.sigma_t, torch.tensor(3.5))
    torch.testing.assert_close(step.std, torch.tensor(3.5 * math.sqrt(0.2)))
    torch.testing.assert_close(step.mean, lat(-0.425))
    # Elsewhere σ_max plays no part.
    torch.testing.assert_close(diffusion_coefficient(torch.tensor([0.5]), 0.7, 0.1), torch.tensor([0.7]))


def test_sde_step_with_noise_level_zero_is_the_euler_step():
    gen = torch.Generator().manual_seed(0)
    x, v, noise = (torch.randn(3, 2, 4, 4, generator=gen) for _ in range(3))
    sigma, sigma_next = torch.tensor([1.0, 0.6, 0.3]), torch.tensor([0.9, 0.4, 0.0])
    step = sde_step(x, v, sigma, sigma_next, 0.0, noise, sigma_max=0.9)
    euler = x + (sigma_next - sigma).view(-1, 1, 1, 1) * v
    torch.testing.assert_close(step.mean, euler)
    torch.testing.assert_close(step.next, euler)
    assert step.std.abs().max().item() == 0


def test_sde_step_keeps_the_marginal_to_first_order():
    # Data at x0 = 0: x_σ = σ·ε and the exact velocity is v = ε = x/σ. One step maps ε to k·ε + std·noise, and
    # Var = k² + std² should be σ'² up to O(dt²) (exactly σ_t²dt²/σ + σ_t⁴dt²/(4σ²)); without the score term
    # it would be off by σ_t²·|dt|.
    sigma, dt, a = 0.5, -1e-3, 0.7
    step = sde_step(lat(sigma), lat(1.0), sigma, sigma + dt, a, lat(0.0), sigma_max=0.96)
    k, var_sde = step.mean.item(), step.mean.item() ** 2 + step.std.item() ** 2
    sigma_t2 = a**2 * sigma / (1 - sigma)
    expected_error = sigma_t2 * dt**2 / sigma + sigma_t2**2 * dt**2 / (4 * sigma**2)
    assert abs(var_sde - (sigma + dt) ** 2 - expected_error) < 1e-2 * sigma_t2 * abs(dt)
    assert abs(k - (sigma + dt + sigma_t2 * dt / (2 * sigma))) < 1e-6


def test_step_log_prob_by_hand():
    # std = 2: elements −1²/8 and −2²/8, each minus log 2 + log sqrt(2π); the mean over the two elements.
    mean = lat(0.0, 1.0).requires_grad_()
    x_next = lat(1.0, 3.0).requires_grad_()
    logp = step_log_prob(x_next, mean, torch.tensor(2.0))
    expected = -(1 / 8 + 4 / 8) / 2 - math.log(2) - 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(logp, torch.tensor([expected]))
    ref = torch.distributions.Normal(mean.detach(), 2.0).log_prob(x_next.detach()).mean()
    torch.testing.assert_close(logp[0], ref)
    logp.sum().backward()
    assert x_next.grad is None and mean.grad is not None  # gradient through the mean only


def test_log_prob_of_a_step_is_that_of_its_noise():
    gen = torch.Generator().manual_seed(1)
    x, v, noise = (torch.randn(2, 3, 2, 2, generator=gen) for _ in range(3))
    step = sde_step(x, v, torch.tensor([0.8, 0.5]), torch.tensor([0.7, 0.3]), 0.7, noise, sigma_max=0.96)
    expected = (-noise**2 / 2).flatten(1).mean(1) - step.std.flatten().log() - 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(step_log_prob(step.next, step.mean, step.std), expected)


def test_group_advantages_by_hand():
    # Groups 7: rewards (1, 3), mean 2; group 3: rewards (2, 6), mean 4 — interleaved in the batch.
    rewards, groups = torch.tensor([1.0, 2.0, 3.0, 6.0]), torch.tensor([7, 3, 7, 3])
    centred = torch.tensor([-1.0, -2.0, 1.0, 2.0])
    # Global std: batch mean 3, squared deviations 4, 1, 0, 9 → sqrt(14/4).
    torch.testing.assert_close(group_advantages(rewards, groups), centred / (math.sqrt(3.5) + 1e-4))
    # Per-group std: 1 for group 7, 2 for group 3.
    per_group = group_advantages(rewards, groups, global_std=False)
    torch.testing.assert_close(per_group, centred / (torch.tensor([1.0, 2.0, 1.0, 2.0]) + 1e-4))


def test_group_advantages_have_zero_mean_per_group():
    gen = torch.Generator().manual_seed(2)
    rewards, groups = torch.randn(24, generator=gen), torch.arange(4).repeat_interleave(6)
    for global_std in (True, False):
        adv = group_advantages(rewards, groups, global_std=global_std).view(4, 6)
        torch.testing.assert_close(adv.mean(dim=1), torch.zeros(4), atol=1e-6, rtol=0)
    # With the group's own std each group has unit (population) std, up to eps.
    adv = group_advantages(rewards, groups, global_std=False, eps=0.0).view(4, 6)
    torch.testing.assert_close(adv.std(dim=1, unbiased=False), torch.ones(4))


def test_clipped_policy_loss_by_hand():
    # ε = 0.2, A clipped to ±5: A = (1, 1, 5, −2), ρ = (1.5, 0.5, 1, 1.3).
    # max(−Aρ, −A·clip ρ): max(−1.5, −1.2) = −1.2; max(−0.5, −0.8) = −0.5; −5; max(2.6, 2.4) = 2.6.
    ratio = torch.tensor([1.5, 0.5, 1.0, 1.3])
    old = torch.tensor([0.1, -0.3, 0.2, 0.0])
    loss, rho, clipfrac = clipped_policy_loss(old + ratio.log(), old, torch.tensor([1.0, 1.0, 7.0, -2.0]), 0.2, 5.0)
    torch.testing.assert_close(loss, torch.tensor((-1.2 - 0.5 - 5 + 2.6) / 4))
    torch.testing.assert_close(rho, ratio)
    assert clipfrac.item() == 0.75  # |ρ − 1| = 0.5, 0.5, 0, 0.3 against 0.2


def test_policy_loss_at_ratio_one_is_minus_mean_advantage_and_its_gradient():
    adv = torch.tensor([0.5, -1.5, 2.0])
    log_prob = torch.tensor([-1.0, 0.3, 2.0], requires_grad=True)
    loss, _, clipfrac = clipped_policy_loss(log_prob, log_prob.detach(), adv, 1e-4, 5.0)
    torch.testing.assert_close(loss, -adv.mean())
    loss.backward()
    torch.testing.assert_close(log_prob.grad, -adv / 3)  # raising log π where A > 0 lowers the loss
    assert clipfrac.item() == 0


def test_kl_penalty_by_hand_and_as_a_gaussian_kl():
    # Item 0: differences (1, 3), mean square 5, std 1 → 2.5; item 1: (2, 0), mean square 2, std 2 → 0.25.
    mean = torch.tensor([[1.0, 3.0], [2.0, 0.0]]).view(2, 1, 1, 2)
    std = torch.tensor([1.0, 2.0]).view(2, 1, 1, 1)
    torch.testing.assert_close(kl_penalty(mean, torch.zeros_like(mean), std), torch.tensor((2.5 + 0.25) / 2))
    gen = torch.Generator().manual_seed(3)
    m, m_ref = torch.randn(2, 2, 3, 3, generator=gen), torch.randn(2, 2, 3, 3, generator=gen)
    p, q = torch.distributions.Normal(m, std), torch.distributions.Normal(m_ref, std)
    torch.testing.assert_close(kl_penalty(m, m_ref, std), torch.distributions.kl_divergence(p, q).mean())


def test_defaults_are_the_published_sd35m_pickscore_recipe():
    d = DEFAULTS
    assert (d["num_steps"], d["noise_level"], d["group_size"], d["kl_beta"]) == (10, 0.7, 24, 0.01)
    assert (d["clip_range"], d["adv_clip_max"], d["learning_rate"], d["guidance_scale"]) == (1e-4, 5.0, 3e-4, 4.5)
    assert (d["lora_rank"], d["lora_alpha"], d["resolution"], d["global_std"]) == (32, 64, 512, True)
    assert int(d["num_steps"] * d["timestep_fraction"]) == 9  # trained steps per trajectory
    # 48 prompts × 24 images = 32 GPUs × 9 per batch × 4 batches, i.e. 2 accumulation rounds of 2 batches.
    batches = d["groups_per_epoch"] * d["group_size"] // (d["num_gpus"] * d["sample_batch_size"])
    assert batches == 4 and batches // d["gradient_accumulation_steps"] == 2
