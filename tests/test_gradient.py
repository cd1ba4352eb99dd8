"""The paper's gradient ablations (rows I and J): the virtual pair along the exact gradient by hand, Reward Score
Matching's time weights, and row J's gradients carried back through the chain against autograd on the whole chain."""

from types import SimpleNamespace

import pytest
import torch

from fdfo.cli import parse_train_config
from fdfo.config import ConfigError
from fdfo.formulas.gradient import time_weight, virtual_pair
from fdfo.harness.training_loop import train
from fdfo.methods.fdfo_grad import FdfoGrad, reward_gradient
from fdfo.model.sampler import sample_pairs
from fdfo.rewards import Reward, RewardTerm
from fdfo.rewards.brightness import brightness
from fdfo.rewards.registry import RewardSpecError
from tests.test_methods import epochs, small, weights


def test_the_virtual_pair_by_hand():
    # g = (3, 4): rms(g) = √12.5; a displacement of rms s = 0.1 along g is dx = 0.1·g/√12.5 = (0.0848528, 0.1131371),
    # mean(dx²) = 0.01, so d = dx / (0.01 + 1e-6); dR = g·dx = 0.1 · 2 · √12.5 = 0.7071068.
    d, dR = virtual_pair(torch.tensor([[3.0, 4.0], [0.0, 0.0]]), torch.tensor([0.1, 0.5]))
    torch.testing.assert_close(d[0], torch.tensor([0.0848528, 0.1131371]) / 0.010001)
    torch.testing.assert_close(dR, torch.tensor([0.7071068, 0.0]))
    assert torch.equal(d[1], torch.zeros(2))  # no gradient, no signal
    torch.testing.assert_close(dR[0] * d[0], 2 * torch.tensor([3.0, 4.0]) * 0.01 / 0.010001)  # dR·d = D·g


def test_reward_score_matchings_time_weights():
    sigma = torch.tensor([1.0, 0.75, 0.0])
    assert time_weight(sigma, "constant").tolist() == [1.0, 1.0, 1.0]
    assert time_weight(sigma, "linear").tolist() == [0.0, 0.25, 1.0]
    assert time_weight(sigma, "quadratic").tolist() == [0.0, 0.0625, 1.0]


@pytest.mark.parametrize("chain", [False, True])
def test_the_directions_are_the_gradients_of_the_reward_through_the_chain(chain, tiny):
    # Without churn a sample's steps are plain Euler steps: re-running the chain from the output of step t with
    # autograd on, decoding and scoring gives ∂R/∂x_{t+1} directly, to compare with row J's step-by-step product;
    # row I's is ∂R/∂x_T at every step.
    torch.manual_seed(0)
    flags = [*small("fdfo_grad"), "--sample.churn-weight", "0", *(["--grad.chain"] if chain else [])]
    method = FdfoGrad(parse_train_config(flags))
    cond = tiny.encode(["a cat"], 1.0, 16)
    traj = sample_pairs(tiny, cond, [torch.Generator().manual_seed(1)], num_steps=4, churn=0.0, resolution=32)
    learner = SimpleNamespace(backbone=tiny, reward=Reward([RewardTerm("brightness", 1.0, brightness)]))
    directions = method.directions(learner, traj, cond, ["a cat"] * 2, chunk=1)  # one sample at a time
    sigmas, both = traj.sigmas, cond.repeat_interleave(2)
    for t in range(4):
        x = (traj.inputs[:, t + 1] if chain and t < 3 else traj.final_latents).clone().requires_grad_(True)
        y = x
        for i in range(t + 1, 4) if chain else ():
            y = y + (sigmas[i + 1] - sigmas[i]) * tiny.transformer(
                hidden_states=y, timestep=(1000 * sigmas[i]).expand(2), encoder_hidden_states=both.embeds,
                pooled_projections=both.pooled, return_dict=False)[0]
        (expected,) = torch.autograd.grad(brightness(tiny.decode(y, torch.float32), []).sum(), x)
        scale = expected.abs().max().item()  # rounding noise measured at ≤ 2.6e-6 of it (1, 2 threads; AVX2, AVX-512)
        torch.testing.assert_close(directions[:, t], expected, rtol=1e-4, atol=2e-5 * scale)
    if chain:  # the chain matters: the last step's gradient is not the first's
        assert (directions[:, 0] - directions[:, 3]).abs().max() > 1e-3 * directions[:, 3].abs().max()


@pytest.mark.parametrize("flags,error,message", [
    (["--grad.chain", "--sample.churn-schedule", "prior"], ConfigError,
     "--grad.chain differentiates the churned steps with the raw schedule"),
    (["--reward", "brightness=1", "vlm_quality=1"], RewardSpecError,
     "The reward term `vlm_quality` has no gradient w.r.t. the image, and --method fdfo_grad back-propagates"),
])
def test_what_cannot_work_is_refused_before_anything_loads(flags, error, message, tmp_path):
    with pytest.raises(error, match=message):
        train(parse_train_config([*small("fdfo_grad"), *flags, "--runs-dir", str(tmp_path)]))
    assert not any(tmp_path.iterdir())


def test_row_j_counts_its_passes_and_resumes_bit_for_bit(tmp_path):
    flags = [*small("fdfo_grad"), "--grad.chain", "--grad.time-weight", "linear", "--save-freq", "1"]
    straight = train(parse_train_config([*flags, "--num-epochs", "2", "--runs-dir", str(tmp_path / "a")]))
    first = train(parse_train_config([*flags, "--num-epochs", "1", "--runs-dir", str(tmp_path / "b")]))
    resumed = train(parse_train_config([*flags, "--num-epochs", "2", "--runs-dir", str(tmp_path / "b"),
                                        "--resume-from", str(first)]))
    for key, w in weights(straight, 2).items():
        assert torch.equal(w, weights(resumed, 2)[key]), key
    # 16 images × 4 sampling steps; each image's gradient carried back through its steps 3, 2 and 1 (a pass with
    # gradient w.r.t. the input each); FDFO's 16 × 4 trained items.
    assert [r["transformer_forwards"] for r in epochs(resumed)] == [64 + 48 + 64, 2 * (64 + 48 + 64)]
    assert [r["transformer_backwards"] for r in epochs(resumed)] == [48 + 64, 2 * (48 + 64)]
    assert [r["reward_mean"] for r in epochs(resumed)] == [r["reward_mean"] for r in epochs(straight)]


def test_the_reward_gradient_in_fp16_is_the_fp32_one(tiny):
    # The fp16 recipe decodes under fp16 autocast: the reward is scaled before its backward pass (as a loss scaler
    # does), so the decoder's small gradients (|g| ≤ 7e-4 here) keep their direction. Measured: cosine 0.9999.
    learner = SimpleNamespace(backbone=tiny, reward=Reward([RewardTerm("brightness", 1.0, brightness)]))
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    full, half = (reward_gradient(learner, x, ["a", "b"], dtype) for dtype in (torch.float32, torch.float16))
    assert torch.isfinite(half).all()
    assert torch.nn.functional.cosine_similarity(full.flatten(), half.flatten(), dim=0) > 0.999
