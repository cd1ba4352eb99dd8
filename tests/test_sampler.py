import math

import pytest
import torch

from fdfo.formulas.flow_grpo import sde_step, step_log_prob
from fdfo.formulas.churn import raw_gammas
from fdfo.model.sampler import branch_noise, churned_euler_step, perturb_initial, sample_pairs, sample_rollouts

PROMPTS = ["a red cube on a wooden table", "an astronaut riding a horse"]


def generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_churn_zero_equals_diffusers_pipeline(tiny, guidance):
    cond = tiny.encode(PROMPTS, guidance, 128)
    ours = sample_pairs(tiny, cond, generators([3, 4]), num_steps=6, churn=0.0, guidance_scale=guidance)
    base = torch.stack([torch.randn(16, 8, 8, generator=g) for g in generators([3, 4])])
    kwargs = dict(prompt=PROMPTS, num_inference_steps=6, guidance_scale=guidance, latents=base.clone(),
                  max_sequence_length=128, height=64, width=64)
    latents = tiny.pipe(**kwargs, output_type="latent").images
    images = tiny.pipe(**kwargs, output_type="pt").images
    # Both branches are the plain Euler trajectory; fp32 on CPU, so only rounding differs.
    print(f"guidance {guidance}: max |difference| to diffusers: latents "
          f"{(ours.final_latents[0::2] - latents).abs().max():.2e}, images {(ours.images[0::2] - images).abs().max():.2e}")
    for branch in (0, 1):
        torch.testing.assert_close(ours.final_latents[branch::2], latents, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.images[branch::2], images, rtol=0, atol=1e-5)
    assert ours.inputs.shape == ours.velocities.shape == (4, 6, 16, 8, 8)
    assert ours.images.shape == (4, 3, 64, 64) and ours.sigmas.shape == (7,) and ours.sigmas[-1] == 0


def test_churn_schedule_is_raw():
    assert raw_gammas(4, 0.1) == [0.1, 0.1, 0.1, 0.1, 0.0]


@pytest.mark.parametrize("gamma", [0.0025, 0.5])
@pytest.mark.parametrize("t,s", [(1.0, 0.9), (0.6, 0.3), (0.2, 0.0)])
def test_churned_step_lands_exactly_on_noise_level_s(gamma, t, s):
    # On the straight path x_t = (1−t) x0 + t ε the velocity is ε − x0.
    gen = torch.Generator().manual_seed(0)
    x0, eps, fresh = (torch.randn(1_000_000, generator=gen, dtype=torch.float64) for _ in range(3))
    t, s = torch.tensor(t, dtype=torch.float64), torch.tensor(s, dtype=torch.float64)
    x, v = (1 - t) * x0 + t * eps, eps - x0
    # Analytic: with the fresh noise switched off, the data coefficient is exactly 1 − s.
    no_noise = churned_euler_step((1 - t) * x0, -x0, t, s, gamma, torch.zeros_like(x0))
    torch.testing.assert_close(no_noise, (1 - s) * x0, rtol=0, atol=1e-12)
    # Statistical: what is left is Gaussian noise of standard deviation exactly s.
    residual = churned_euler_step(x, v, t, s, gamma, fresh) - (1 - s) * x0
    if s == 0:
        assert residual.abs().max() < 1e-12
    else:
        assert abs(residual.std().item() / s.item() - 1) < 5e-3
        assert abs(residual.mean().item()) < 5e-3 * s.item()


def test_zero_churn_is_the_euler_step():
    x, v, noise = torch.randn(3, 10).unbind()
    torch.testing.assert_close(churned_euler_step(x, v, torch.tensor(0.8), torch.tensor(0.5), 0.0, noise), x - 0.3 * v)


def test_initial_perturbation_keeps_unit_variance():
    x, noise = torch.randn(2, 1_000_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64).unbind()
    assert abs(perturb_initial(x, 0.3, noise).var().item() - 1) < 5e-3


def test_branches_share_base_noise_and_differ_only_by_churn(tiny):
    gamma = 0.0025
    cond = tiny.encode(PROMPTS, 1.0, 128)
    out = sample_pairs(tiny, cond, generators([7, 8]), num_steps=4, churn=gamma)
    # Replay each pair's generator: base noise first, then the two branches' initial churn.
    for k, g in enumerate(generators([7, 8])):
        base = torch.randn(16, 8, 8, generator=g)
        noise = branch_noise([g], (16, 8, 8), torch.device("cpu"))
        torch.testing.assert_close(out.inputs[2 * k, 0], perturb_initial(base, gamma, noise[0]), rtol=0, atol=0)
        torch.testing.assert_close(out.inputs[2 * k + 1, 0], perturb_initial(base, gamma, noise[1]), rtol=0, atol=0)
    gap = (out.final_latents[0::2] - out.final_latents[1::2]).std().item()
    assert 0 < gap < 10 * math.sqrt((1 + gamma) ** 2 - 1)  # small, churn-sized, nonzero
    unpaired = (out.final_latents[0] - out.final_latents[2]).std().item()
    assert gap < unpaired / 5


def test_fixed_generators_give_identical_pairs_and_pairs_do_not_depend_on_their_batch(tiny):
    cond = tiny.encode(PROMPTS, 1.0, 128)
    first = sample_pairs(tiny, cond, generators([1, 2]), num_steps=4)
    again = sample_pairs(tiny, cond, generators([1, 2]), num_steps=4)
    for name in ("inputs", "velocities", "final_latents", "images"):
        assert torch.equal(getattr(first, name), getattr(again, name))
    alone = sample_pairs(tiny, cond.index(slice(1, 2)), generators([2]), num_steps=4)
    torch.testing.assert_close(alone.final_latents, first.final_latents[2:], rtol=0, atol=1e-5)


def test_one_generator_per_pair_is_required(tiny):
    cond = tiny.encode(PROMPTS, 1.0, 128)
    with pytest.raises(ValueError, match="one generator per pair"):
        sample_pairs(tiny, cond, generators([1]), num_steps=2)


def test_rollouts_are_the_ode_at_noise_0_and_keep_the_sde_steps_log_density(tiny):
    cond = tiny.encode(PROMPTS, 1.0, 128)
    pairs = sample_pairs(tiny, cond, generators([1, 2]), num_steps=4, churn=0.0)
    ode = sample_rollouts(tiny, cond, generators([1, 2]), num_steps=4, noise_level=0.0)
    assert ode.log_probs is None
    torch.testing.assert_close(ode.final_latents, pairs.final_latents[::2], rtol=0, atol=1e-6)  # branch a of each pair
    sde = sample_rollouts(tiny, cond, generators([1, 2]), num_steps=4, noise_level=0.7)
    assert sde.log_probs.shape == (2, 4) and torch.equal(sde.inputs[:, 0], ode.inputs[:, 0])  # same starting noise
    # Step 1's log-density, recomputed from what the rollout kept: x_1, the velocity there, x_2.
    sigmas = sde.sigmas
    v = tiny.velocity(tiny.transformer, sde.inputs[:, 1], sigmas[1], cond, 1.0)
    step = sde_step(sde.inputs[:, 1], v, sigmas[1], sigmas[2], 0.7, torch.zeros_like(v), sigma_max=sigmas[1].item())
    torch.testing.assert_close(step_log_prob(sde.inputs[:, 2], step.mean, step.std), sde.log_probs[:, 1],
                               rtol=0, atol=1e-5)
    assert (sde.final_latents - ode.final_latents).abs().mean() > 0.05  # the SDE's noise changes the images
