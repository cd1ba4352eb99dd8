"""The published code's churn schedules (raw, interval, prior): γ per step against a hand computation of its
formulas, in float64 with the math module; the sampler and a training run with each schedule."""

import math

import pytest
import torch
from safetensors.torch import load_file

from fdfo.cli import parse_train_config
from fdfo.config import ConfigError
from fdfo.formulas.churn import interval_density, interval_gammas, prior_gammas, raw_gammas
from fdfo.harness.training_loop import train
from fdfo.methods.fdfo import churn_draw
from fdfo.model.sampler import sample_pairs
from fdfo.model.sd3 import SD3
from tests.test_train import SMALL, epoch_records, lora_weights


def sd3_levels(num_steps):
    """σ_0 … σ_{T−1} of SD3's shifted scheduler, as the published code sees them (timesteps / 1000)."""
    from fdfo.model.tiny import random_pipeline
    return SD3(random_pipeline("tiny")).sigmas(num_steps, None, torch.device("cpu"))[:-1] * 1000 / 1000


def hand_logit_normal(t, mu, sigma):
    t = min(max(t, 1e-6), 1 - 1e-6)
    return math.exp(-(math.log(t / (1 - t)) - mu) ** 2 / (2 * sigma**2)) / (math.sqrt(2 * math.pi) * sigma * t * (1 - t))


def hand_interval(levels, z1, z2, mu, sigma, churn_weight, churn_weight_sigma, soft_sigma):
    """The published IntervalScheduler: centre μ + σ·z₁, weight exp(z₂·σ_w + log w); pdf 0 at t = 0 and 1,
    normalised; γ = exp(weight·pdf) − 1; the initial perturbation takes entry 0, step i entry i + 1, the last 0."""
    centre = z1 * sigma + mu
    weight = math.exp(z2 * churn_weight_sigma + math.log(churn_weight))
    pdf = [0.0 if t in (0.0, 1.0) else hand_logit_normal(t, centre, soft_sigma) for t in levels]
    total = sum(pdf)
    pdf = [p / total for p in pdf] if total > 1e-6 else [1 / len(pdf)] * len(pdf)
    return [math.exp(weight * p) - 1 for p in pdf] + [0.0]


def test_raw_is_the_weight_everywhere_but_the_last_step():
    assert raw_gammas(3, 0.0025) == [0.0025, 0.0025, 0.0025, 0.0]


@pytest.mark.parametrize("z", [(0.0, 0.0), (-0.7, 1.3), (1.8, -0.4)])
@pytest.mark.parametrize("settings", [dict(mu=1.0, sigma=1.5, churn_weight=1.0, churn_weight_sigma=0.0, soft_sigma=0.25),
                                      dict(mu=-0.5, sigma=0.8, churn_weight=0.3, churn_weight_sigma=0.7, soft_sigma=0.6)])
def test_interval_gammas_are_the_published_formula(z, settings):
    levels = sd3_levels(40)
    ours = interval_gammas(levels, torch.tensor(z), **settings)
    hand = hand_interval(levels.double().tolist(), *z, **settings)
    assert ours.shape == (41,) and ours[0] == 0 and ours[-1] == 0  # σ_0 = 1 exactly: no initial perturbation
    torch.testing.assert_close(ours.double(), torch.tensor(hand, dtype=torch.float64), rtol=2e-5, atol=3e-7)
    assert ours.max() > 10 * ours[1:-1].min()  # concentrated around the pair's centre, not flat


def test_interval_endpoints_and_guards():
    levels = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    density = interval_density(levels, centre=0.0, soft_sigma=0.5)
    assert density[0] == 0 and density[-1] == 0  # t = 1 and t = 0 exactly get nothing
    assert density.sum().item() == pytest.approx(1.0, abs=1e-6)
    hand = [hand_logit_normal(t, 0.0, 0.5) for t in (0.75, 0.5, 0.25)]
    torch.testing.assert_close(density[1:4].double(), torch.tensor(hand, dtype=torch.float64) / sum(hand), rtol=1e-5, atol=0)
    # A centre far outside the grid leaves (almost) nothing: every level, the endpoints too, gets 1/T, as published.
    assert torch.equal(interval_density(levels, centre=60.0, soft_sigma=0.25), torch.full((5,), 0.2))
    # A width that float32 cannot square gives 0/0 at the centre and −x/0 elsewhere: NaN and 0, guarded to 0, so uniform.
    assert torch.equal(interval_density(levels, centre=0.0, soft_sigma=1e-30), torch.full((5,), 0.2))


@pytest.mark.parametrize("z,churn_weight,churn_weight_sigma", [(0.0, 0.1, 1.0), (1.2, 0.1, 1.0), (-0.5, 0.3, 0.0)])
def test_prior_churns_only_the_initial_noise(z, churn_weight, churn_weight_sigma):
    ours = prior_gammas(sd3_levels(10), torch.tensor([z]), churn_weight, churn_weight_sigma)
    weight = math.exp(z * churn_weight_sigma + math.log(churn_weight))
    assert ours[0].item() == pytest.approx(math.exp(weight) - 1, rel=1e-6)
    assert ours[1:].tolist() == [0.0] * 10


def test_a_pair_is_the_same_in_any_batch_with_each_schedule(tiny):
    cond = tiny.encode(["a red cube", "a blue ball", "a green tree"], 1.0, 32)
    for schedule in ("interval", "prior"):
        sample = parse_train_config(["--pretrained-model", "tiny", "--sample.churn-schedule", schedule]).sample
        churn = churn_draw(sample)
        generators = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
        together = sample_pairs(tiny, cond, generators([1, 2, 3]), num_steps=4, churn=churn, resolution=32)
        alone = sample_pairs(tiny, cond.index(slice(1, 2)), generators([2]), num_steps=4, churn=churn, resolution=32)
        torch.testing.assert_close(alone.final_latents, together.final_latents[2:4], rtol=0, atol=1e-6)
        assert not torch.equal(together.final_latents[2], together.final_latents[3])  # the branches churned apart


@pytest.mark.parametrize("schedule", ["interval", "prior"])
def test_a_run_with_each_schedule_trains_records_it_and_resumes_exactly(schedule, tmp_path):
    flags = [*SMALL, "--reward-preset", "brightness", "--sample.churn-schedule", schedule, "--save-freq", "1"]
    straight = train(parse_train_config([*flags, "--num-epochs", "3", "--runs-dir", str(tmp_path / "a")]))
    first = train(parse_train_config([*flags, "--num-epochs", "2", "--runs-dir", str(tmp_path / "b")]))
    resumed = train(parse_train_config(["--resume-from", str(first), "--num-epochs", "3"]))
    for key, value in lora_weights(straight, 3).items():
        assert torch.equal(lora_weights(resumed, 3)[key], value), key
    assert [r["reward_mean"] for r in epoch_records(resumed)] == [r["reward_mean"] for r in epoch_records(straight)]
    settings = (resumed / "config.json").read_text()
    assert f'"churn_schedule": "{schedule}"' in settings and '"changed"' not in settings
    raw = train(parse_train_config([*SMALL, "--reward-preset", "brightness", "--num-epochs", "1",
                                    "--runs-dir", str(tmp_path / "raw")]))
    assert epoch_records(raw)[0]["reward_mean"] != epoch_records(straight)[0]["reward_mean"]  # the schedule was used
    assert max(w.abs().max().item() for k, w in load_file(
        straight / "checkpoints" / "epoch-0000003" / "adapter_model.safetensors").items() if "lora_B" in k) > 0


@pytest.mark.parametrize("flags,message", [
    (["--sample.churn-schedule", "interval", "--sample.interval.soft-sigma", "0"], "--sample.interval.soft-sigma must be more than 0"),
    (["--sample.prior.churn-weight", "-1"], "--sample.prior.churn-weight must be more than 0"),
    (["--sample.interval.churn-weight-sigma", "-0.5"], "--sample.interval.churn-weight-sigma must be 0 or more"),
])
def test_impossible_schedule_settings_are_refused(flags, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        train(parse_train_config([*SMALL, *flags, "--runs-dir", str(tmp_path)]))
