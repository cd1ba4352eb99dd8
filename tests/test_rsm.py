"""Reward Score Matching, zeroth order: its formulas by hand, the branch sampler against the plain ODE and SDE steps,
and the method in the harness (exact resume, the refusals). Side by side with the published code:
bench/rsm_side_by_side.py (bench/results/rsm-side-by-side.json)."""

import math

import pytest
import torch

from fdfo.cli import parse_train_config
from fdfo.config import ConfigError
from fdfo.formulas.flow_grpo import diffusion_coefficient, sde_step
from fdfo.formulas.rsm import hinge_matching_loss, matching_weight, mean_active_branches, step_kl
from fdfo.harness.optimise import step_sums
from fdfo.harness.training_loop import train
from fdfo.model.sampler import sample_branches, sample_rollouts
from tests.test_methods import epochs, small, weights


def rows(*values):
    """(B, 1, 1, D) from B lists of D numbers."""
    return torch.tensor(values, dtype=torch.float32)[:, None, None, :]


def test_the_hinge_matching_loss_by_hand():
    # σ = 0.5, Δt = 0.1, σ̃ = 1: w = √0.1 · (1 + 0.5/1 · 1) = 1.5·√0.1; δ = (0.2, −0.2), ε = (1, 0).
    w = 1.5 * math.sqrt(0.1)
    term_1, term_2 = 0.5 * (w * 0.2) ** 2, (w * 0.2 * 1 + 0) / 2
    m = (term_1 + term_2) * 1 * 0.1
    scale = 1 / (1 * 0.1) * (1 / math.sqrt(0.1))  # fair_clip2: 1/(σ̃²Δt) · σ̃/√Δt
    v_old = rows([0.0, 0.0], [0.0, 0.0], [0.0, 0.0])
    v_theta, noise = rows([0.2, -0.2], [0.2, -0.2], [0.2, -0.2]), rows([1.0, 0.0], [1.0, 0.0], [1.0, 0.0])
    advantages = torch.tensor([1.0, -1.0, -0.01])
    three = lambda x: torch.full((3,), x)  # noqa: E731
    loss = hinge_matching_loss(v_theta, v_old, noise, advantages, three(0.5), three(0.1), three(1.0), clip_range=1e-4)
    torch.testing.assert_close(matching_weight(three(0.5), three(0.1), three(1.0)), three(w))
    expected = [(1e-4 + m) * scale, 0.0, max(1e-4 * 0.01 - 0.01 * m, 0.0) * scale]  # A < 0 stops once m > c
    torch.testing.assert_close(loss, torch.tensor(expected))
    assert expected[1] == 0 and expected[2] == 0


def test_the_matching_term_is_the_gaussian_log_ratio_of_the_branch():
    # m/(σ̃²Δt) = −mean log N(x' | μ_θ, s²)/N(x' | μ_old, s²) at the branch x' = μ_old + s·ε (s = σ̃√Δt).
    g = torch.Generator().manual_seed(0)
    x, v_old, noise = (torch.randn(2, 4, 3, 3, generator=g) for _ in range(3))
    v_theta = v_old + 0.1 * torch.randn(2, 4, 3, 3, generator=g)
    sigma, sigma_next = torch.tensor([0.9, 0.6]), torch.tensor([0.8, 0.45])
    old = sde_step(x, v_old, sigma, sigma_next, 0.7, noise, sigma_max=0.96)
    new = sde_step(x, v_theta, sigma, sigma_next, 0.7, noise, sigma_max=0.96)
    s = old.std.flatten()
    log_ratio = ((-(old.next - new.mean) ** 2 + (old.next - old.mean) ** 2).flatten(1).mean(1)) / (2 * s ** 2)
    tilde, dt = diffusion_coefficient(sigma, 0.7, 0.96), sigma - sigma_next
    a = torch.tensor([1.0, 1.0])
    hinge = hinge_matching_loss(v_theta, v_old, noise, a, sigma, dt, tilde, clip_range=0.0)  # A = 1, c = 0: A·m
    m = hinge * (tilde ** 2 * dt) / (tilde / dt.sqrt())
    torch.testing.assert_close(torch.maximum(-log_ratio * tilde ** 2 * dt, torch.zeros(2)), m, rtol=1e-4, atol=1e-7)


def test_the_kl_the_weights_and_the_sums_per_step_by_hand():
    # KL = mean((μ_θ − μ_ref)²)/(2σ̃²Δt): differences (0.3, −0.1) → 0.05 / (2 · 4 · 0.05) = 0.125.
    kl = step_kl(rows([0.3, -0.1]), rows([0.0, 0.0]), torch.tensor([2.0]), torch.tensor([0.05]))
    torch.testing.assert_close(kl, torch.tensor([0.125]))
    assert mean_active_branches((6, 6, 8, 10, 0, 0, 0, 0, 0)) == 7.5  # the recipe's k̄
    # Items 0 … 5 in the shuffle (3, 0, 4 | 1, 5, 2), two optimiser steps: each item gets its step's sum.
    sums = step_sums(torch.tensor([3, 0, 4, 1, 5, 2]), torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0, 32.0]), steps=2)
    assert sums.tolist() == [1 + 8 + 16, 2 + 4 + 32, 2 + 4 + 32, 1 + 8 + 16, 1 + 8 + 16, 2 + 4 + 32]


def test_branches_leave_the_ode_trunk_by_one_sde_step_and_return_to_it(tiny):
    cond = tiny.encode(["a cat", "a dog"], 1.0, 16)
    generators = lambda: [torch.Generator().manual_seed(s) for s in (3, 4)]  # noqa: E731
    out = sample_branches(tiny, cond, generators(), num_steps=4, branches=(2, 3, 0), noise_level=0.7,
                          resolution=32)
    assert out.step.tolist() == [0] * 4 + [1] * 6 and out.seed.tolist() == [0, 0, 1, 1, 0, 0, 0, 1, 1, 1]
    assert out.images.shape == (10, 3, 32, 32) and out.anchor_steps == [2] and out.anchors.shape[0] == 2
    trunk = sample_rollouts(tiny, cond, generators(), num_steps=4, noise_level=0.0, resolution=32)
    sigmas = out.sigmas
    for row in range(10):  # the stored x_i is the trunk's state; the branch's end is its SDE step, then the ODE
        seed, i = out.seed[row].item(), out.step[row].item()
        torch.testing.assert_close(out.inputs[row], trunk.inputs[seed, i], rtol=0, atol=1e-6)
        x = sde_step(out.inputs[row:row + 1], out.velocities[row:row + 1], sigmas[i], sigmas[i + 1], 0.7,
                     out.noise[row:row + 1], sigma_max=sigmas[1].item()).next
        for j in range(i + 1, 4):
            v = tiny.transformer(hidden_states=x, timestep=(1000 * sigmas[j]).view(1),
                                      encoder_hidden_states=cond.embeds[seed:seed + 1],
                                      pooled_projections=cond.pooled[seed:seed + 1], return_dict=False)[0]
            x = x + (sigmas[j + 1] - sigmas[j]) * v
        torch.testing.assert_close(out.final_latents[row:row + 1], x, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.anchors, trunk.inputs[:, 2], rtol=0, atol=1e-6)
    # Each seed's draws come from its own generator: the same alone as beside another seed.
    alone = sample_branches(tiny, cond.take(torch.tensor([1])), generators()[1:], num_steps=4,
                            branches=(2, 3, 0), noise_level=0.7, resolution=32)
    torch.testing.assert_close(alone.noise, out.noise[out.seed == 1], rtol=0, atol=0)


def run(tmp_path, *flags, name="run"):
    return train(parse_train_config([*small("rsm"), "--num-epochs", "1", "--runs-dir", str(tmp_path / name), *flags]))


def test_rsm_resumes_bit_for_bit(tmp_path):
    flags = ["--save-freq", "1"]
    straight = run(tmp_path, *flags, "--num-epochs", "3", name="a")
    first = run(tmp_path, *flags, "--num-epochs", "2", name="b")
    resumed = run(tmp_path, *flags, "--num-epochs", "3", "--resume-from", str(first), name="b")
    for key, w in weights(straight, 3).items():
        assert torch.equal(w, weights(resumed, 3)[key]), key
    keep = ("reward_mean", "transformer_forwards", "transformer_backwards")
    assert [{k: r[k] for k in keep} for r in epochs(resumed)] == [{k: r[k] for k in keep} for r in epochs(straight)]


def test_without_the_kl_only_the_policy_trains(tmp_path):
    run_dir = run(tmp_path, "--rsm.kl-weight", "0")
    assert epochs(run_dir)[0]["transformer_forwards"] == 48 + 16  # sampling, then the policy on every branch row


@pytest.mark.parametrize("flags,message", [
    (["--rsm.branches", "2", "2"], r"--rsm.branches needs a branch count for each of the steps 0 … T − 2 \(3 for"),
    (["--rsm.branches", "2", "1", "0"], "0, or 2 or more"),
    (["--rsm.branches", "0", "0", "0"], "at least one above 0"),
    (["--rsm.branches", "2", "0", "0", "0", "0", "--sample.num-solver-steps", "6"],
     r"4 steps without branches \(KL anchors\) and 2 branches per seed"),
    (["--rsm.seeds-per-prompt", "3"], r"Each rank samples 16 images .* 3 seeds × 4 branches .--rsm.branches. = 12"),
    (["--rsm.noise-level", "0"], "--rsm.noise-level must be a finite number more than 0"),
    (["--rsm.kl-weight", "-1"], "--rsm.kl-weight must be a finite number, 0 or more"),
])
def test_what_cannot_work_is_refused_before_anything_loads(flags, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        run(tmp_path, *flags)
    assert not (tmp_path / "run").exists()


def test_a_call_of_several_seeds_samples_with_cfg(tmp_path):
    # The recipe's CFG 4.5, 4 seeds in one sampling call: the branches of several seeds take the guided ODE together.
    run_dir = run(tmp_path, "--sample.guidance-scale", "4.5")
    assert epochs(run_dir)[0]["transformer_forwards"] == 2 * (48 + 16 * 2 + 4 * 2)  # every pass twice under CFG
