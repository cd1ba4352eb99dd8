"""DRaFT in the harness: the reward's gradient through the last K steps, DRaFT-LV's noisings, exact resume, and
the refusals of what cannot work (a reward without gradient, K outside the steps, another method's flags)."""

import pytest
import torch

from fdfo.cli import parse_train_config
from fdfo.config import ConfigError
from fdfo.harness.training_loop import train
from fdfo.rewards import Reward, RewardTerm
from fdfo.rewards.registry import RewardSpecError
from fdfo.runs.runlog import read_log
from tests.test_methods import epochs, small, weights


def run(tmp_path, *flags, name="run"):
    return train(parse_train_config([*small("draft"), "--num-epochs", "1", "--runs-dir", str(tmp_path / name), *flags]))


def first_step(run_dir):
    return next(r for r in read_log(run_dir) if r["kind"] == "step")


@pytest.mark.parametrize("k", [1, 4])
def test_the_kept_steps_reproduce_the_sampled_images(k, tmp_path):
    # One optimiser step over all 16 images: before it, the LoRA is the sampling's, so re-running the last K steps
    # from their stored input and decoding gives the images that were scored (up to the batch's float rounding).
    run_dir = run(tmp_path, "--draft.k", str(k), "--gradient-steps-per-epoch", "1")
    assert first_step(run_dir)["reward"] == pytest.approx(epochs(run_dir)[0]["reward_mean"], abs=1e-5)


def test_checkpointing_changes_memory_not_the_gradient(tmp_path):
    on = run(tmp_path, "--draft.k", "4", "--num-epochs", "2", name="on")
    off = run(tmp_path, "--draft.k", "4", "--num-epochs", "2", "--draft.no-checkpointing", name="off")
    for key, w in weights(on, 2).items():
        torch.testing.assert_close(w, weights(off, 2)[key], rtol=0, atol=1e-7)
    # 16 images × 4 sampling steps, then 16 × 4 kept steps, recomputed in the backward pass only when checkpointed.
    assert [r["transformer_forwards"] for r in epochs(on)] == [64 + 16 * 4 * 2, 2 * (64 + 16 * 4 * 2)]
    assert [r["transformer_forwards"] for r in epochs(off)] == [64 + 16 * 4, 2 * (64 + 16 * 4)]
    assert [r["transformer_backwards"] for r in epochs(on)] == [r["transformer_backwards"] for r in epochs(off)] == [
        64, 128]


def test_lv_averages_fresh_noisings_of_the_last_step(tmp_path):
    run_dir = run(tmp_path, "--draft.lv-samples", "3")
    # Each image's final latent noised 3 times and denoised in one checkpointed step: 3 passes, 3 recomputed.
    assert epochs(run_dir)[0]["transformer_forwards"] == 64 + 16 * 3 * 2
    assert epochs(run_dir)[0]["transformer_backwards"] == 16 * 3
    b = [w for key, w in weights(run_dir, 1).items() if "lora_B" in key]
    assert max(w.abs().max().item() for w in b) > 1e-5


def test_draft_plus_counts_the_base_models_passes(tmp_path):
    run_dir = run(tmp_path, "--draft.kl-weight", "1.0")
    assert epochs(run_dir)[0]["transformer_forwards"] == 64 + 16 * 2 + 16  # + the LoRA-free reference at the kept step
    assert first_step(run_dir)["kl"] == 0.0  # the LoRA starts with no effect: v_θ = v_base at the first step


def test_draft_resumes_bit_for_bit(tmp_path):
    flags = ["--save-freq", "1", "--draft.k", "2"]
    straight = run(tmp_path, *flags, "--num-epochs", "3", name="a")
    first = run(tmp_path, *flags, "--num-epochs", "2", name="b")
    resumed = run(tmp_path, *flags, "--num-epochs", "3", "--resume-from", str(first), name="b")
    assert resumed == first
    for key, w in weights(straight, 3).items():
        assert torch.equal(w, weights(resumed, 3)[key]), key
    keep = ("reward_mean", "transformer_forwards", "transformer_backwards")
    assert [{k: r[k] for k in keep} for r in epochs(resumed)] == [{k: r[k] for k in keep} for r in epochs(straight)]


@pytest.mark.parametrize("flags,message", [
    (["--draft.k", "0"], "--draft.k must be between 1 and the 4 sampling steps; got 0"),
    (["--draft.k", "5"], "--draft.k must be between 1 and the 4 sampling steps; got 5"),
    (["--draft.k", "2", "--draft.lv-samples", "2"], "DRaFT-LV .* needs --draft.k 1 .got 2"),
    (["--draft.kl-weight", "-1"], "--draft.kl-weight must be 0 or more"),
    (["--draft.lv-samples", "2", "--draft.kl-weight", "1"], "DRaFT-LV .--draft.lv-samples. keeps none"),
    (["--reward", "brightness=1", "vlm_alignment=0.1"],
     "The reward term `vlm_alignment` has no gradient w.r.t. the image, and --method draft back-propagates"),
    (["--reward", "compressibility=1"], "`compressibility` has no gradient"),
])
def test_what_cannot_work_is_refused_before_anything_loads(flags, message, tmp_path):
    with pytest.raises((ConfigError, RewardSpecError), match=message):
        run(tmp_path, *flags)
    assert not (tmp_path / "run").exists()


def test_a_user_scorer_without_gradient_is_named():
    images = torch.rand(2, 3, 8, 8, requires_grad=True)
    detached = Reward([RewardTerm("mine", 1.0, lambda x, prompts: x.mean(dim=(1, 2, 3)).detach())])
    with pytest.raises(RewardSpecError, match="`mine` returned scores without a gradient"):
        detached(images, ["a", "b"], differentiable=True)
    assert detached(images, ["a", "b"]).total.grad_fn is None  # scoring for the log needs none


@pytest.mark.parametrize("method,flags,owner", [
    ("fdfo", ["--grpo.group-size", "4"], "flow_grpo"),
    ("flow_grpo", ["--draft.k", "2"], "draft"),
    ("draft", ["--sample.churn-weight", "0.5"], "fdfo or fdfo_grad"),
    ("fdfo", ["--grad.chain"], "fdfo_grad"),
    ("diffusion_nft", ["--train.clip-range=1e-3"], "fdfo or fdfo_grad"),
])
def test_another_methods_flag_is_refused_with_its_owner(method, flags, owner):
    with pytest.raises(ConfigError, match=f"{flags[0].partition('=')[0]} is a setting of --method {owner}; this run "
                                          f"is --method {method}"):
        parse_train_config(["--pretrained-model", "tiny", "--method", method, *flags])


def test_another_methods_setting_in_a_config_file_is_refused(tmp_path):
    toml = tmp_path / "mine.toml"
    toml.write_text("[nft]\ngroup_size = 8\n")
    with pytest.raises(ConfigError, match=f"`nft.group_size` in {toml} is a setting of --method diffusion_nft"):
        parse_train_config(["--method", "draft", "--config", str(toml)])
