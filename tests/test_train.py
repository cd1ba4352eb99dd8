import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from fdfo.runs import checkpoint
from fdfo.runs.checkpoint import CheckpointError, find_checkpoint
from fdfo.cli import parse_train_config
from fdfo.config import ConfigError
from fdfo.harness.prompts import PromptFileError
from fdfo.rewards import Reward, RewardTerm
from fdfo.runs.runlog import read_log
from fdfo.harness.training_loop import train
from tests.conftest import ROOT, torchrun

# A small but complete run: 8 pairs of 4-step trajectories at 32 px, 2 optimiser steps per epoch, the
# paper's churn and a moderate learning rate (not the demo's, whose large Adam steps turn rounding-level
# gradient differences in near-zero entries into visible weight differences).
SMALL = ["--pretrained-model", "tiny", "--reward-preset", "compressibility", "--total-pairs-per-epoch", "8",
         "--gradient-steps-per-epoch", "2", "--sample.num-solver-steps", "4", "--sample.resolution", "32",
         "--sample.batch-size", "2", "--train.batch-size", "2", "--sample.churn-weight", "0.0025",
         "--train.learning-rate", "1e-3"]


def epoch_records(run_dir):
    return [r for r in read_log(run_dir) if r["kind"] == "epoch"]


def lora_weights(run_dir, epochs):
    return load_file(Path(run_dir) / "checkpoints" / f"epoch-{epochs:07d}" / "adapter_model.safetensors")


def ema_weights(run_dir, epochs):
    return load_file(Path(run_dir) / "checkpoints" / f"epoch-{epochs:07d}" / "ema" / "adapter_model.safetensors")


def run_ranks(nproc, runs_dir, *flags):
    """train.py under torchrun with gloo ranks; later flags win over SMALL's. Returns the run folder."""
    torchrun(nproc, ROOT / "train.py", *SMALL, "--runs-dir", str(runs_dir), *flags)
    (run_dir,) = Path(runs_dir).iterdir()
    return run_dir


def test_same_result_on_1_2_and_4_ranks(tmp_path):
    # A continuous reward (the tiny PickScore twin): JPEG sizes are whole bytes, so a rounding-level
    # difference in the LoRA can flip a compressibility reward and change the next epoch's signal.
    runs = {n: run_ranks(n, tmp_path / f"ranks{n}", "--reward-preset", "pickscore", "--num-epochs", "2",
                        "--save-freq", "2") for n in (1, 2, 4)}
    rewards = {n: epoch_records(run)[0]["reward_mean"] for n, run in runs.items()}
    assert rewards[1] == rewards[2] == rewards[4]  # the same pairs, bit for bit
    reference = lora_weights(runs[1], 2)
    worst = 0.0
    for n in (2, 4):
        weights = lora_weights(runs[n], 2)
        assert weights.keys() == reference.keys()
        for key, value in reference.items():
            worst = max(worst, (weights[key] - value).abs().max().item())
    print(f"largest LoRA weight difference vs 1 rank after 2 epochs: {worst:.3g}")
    assert worst < 1e-5  # float reduction order only (measured: see the README)


def test_execution_batch_sizes_change_only_rounding(tmp_path):
    # All 8 pairs in one sampling call and 16-item micro-batches against SMALL's 2 and 2: the same pairs
    # (each has its own noise) and the same gradient (the mean over a step's items), up to float rounding.
    # Rewards of churned pairs differ by little, so their finite differences amplify rounding: measured,
    # step gradient norms agree to 2e-5 (relative) and the LoRA update to 1.7e-4 (3.6e-4 with
    # ATEN_CPU_CAPABILITY=avx2); a gradient summed over the wrong items or scaled by the wrong count would
    # be off by more than 1e-1 in either.
    runs = [train(parse_train_config([*SMALL, "--reward-preset", "pickscore", "--runs-dir", str(tmp_path / name),
                                      "--num-epochs", "1", "--save-freq", "1", *flags]))
            for name, flags in [("small", ["--train.micro-batch", "2"]),
                                ("large", ["--sample.batch-size", "8", "--train.micro-batch", "16"])]]
    plans = [json.loads((run / "config.json").read_text())["batch_plan"] for run in runs]
    assert [(p["sampling_batch"], p["micro_batch"]) for p in plans] == [(2, 2), (8, 16)]
    norms = [[r["grad_norm"] for r in read_log(run) if r["kind"] == "step"] for run in runs]
    assert len(norms[0]) == 2 and norms[0] == pytest.approx(norms[1], rel=1e-4)
    small, large = (lora_weights(run, 1) for run in runs)
    update = sum((v ** 2).sum() for k, v in small.items() if "lora_B" in k) ** 0.5  # B starts at zero
    gap = sum(((large[k] - v) ** 2).sum() for k, v in small.items() if "lora_B" in k) ** 0.5
    print(f"grad norms {norms}; LoRA update differs by {gap / update:.3g} of its norm")
    assert gap / update < 2e-3


def test_resume_continues_exactly(tmp_path):
    ema = ["--ema-decay", "0.9"]  # the EMA of the LoRA weights resumes exactly too
    straight = train(parse_train_config([*SMALL, *ema, "--runs-dir", str(tmp_path / "a"), "--num-epochs", "4",
                                         "--save-freq", "2"]))
    first = train(parse_train_config([*SMALL, *ema, "--runs-dir", str(tmp_path / "b"), "--num-epochs", "2",
                                      "--save-freq", "2"]))
    resumed = train(parse_train_config([*SMALL, "--runs-dir", str(tmp_path / "b"), "--num-epochs", "4",
                                        "--save-freq", "2", "--resume-from", str(first)]))
    assert resumed == first  # continues in the same run folder
    for weights in (lora_weights, ema_weights):
        for key, value in weights(straight, 4).items():
            assert torch.equal(weights(resumed, 4)[key], value), key
    assert not torch.equal(*(next(iter(weights(straight, 4).values())) for weights in (lora_weights, ema_weights)))
    assert [r["reward_mean"] for r in epoch_records(resumed)] == [r["reward_mean"] for r in epoch_records(straight)]
    assert [r["epoch"] for r in epoch_records(resumed)] == [0, 1, 2, 3]
    steps = [r for r in read_log(resumed) if r["kind"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert {"loss", "policy_loss", "clipfrac", "grad_norm", "lr", "kl"} <= steps[0].keys()
    assert "ratio_dev_first_micro_batch" in steps[0]
    config = json.loads((resumed / "config.json").read_text())
    assert config["batch_plan"]["pairs_per_rank"] == 8


def test_fp16_recipe_scales_the_loss_resumes_exactly_and_logs_skipped_steps(tmp_path, monkeypatch):
    # The published recipe: fp16 autocast and a gradient scaler (on a CPU over fp32 weights).
    fp16 = [*SMALL, "--precision", "fp16", "--total-pairs-per-epoch", "4", "--sample.num-solver-steps", "2",
            "--save-freq", "1"]
    straight = train(parse_train_config([*fp16, "--runs-dir", str(tmp_path / "a"), "--num-epochs", "2"]))
    first = train(parse_train_config([*fp16, "--runs-dir", str(tmp_path / "b"), "--num-epochs", "1"]))
    resumed = train(parse_train_config([*fp16, "--runs-dir", str(tmp_path / "b"), "--num-epochs", "2",
                                        "--resume-from", str(first)]))
    for key, value in lora_weights(straight, 2).items():  # the scaler's state travels with the checkpoint
        assert torch.equal(lora_weights(resumed, 2)[key], value), key
    steps = [r for r in read_log(resumed) if r["kind"] == "step"]
    assert [(r["grad_scale"], r["skipped"]) for r in steps] == [(65536.0, False)] * 4
    assert steps[0]["ratio_dev_first_micro_batch"] == 0.0  # sampling and training under the same fp16 autocast

    # A step whose fp16 gradients overflow is skipped, logged, and the scale backs off.
    class Overflowing(torch.amp.GradScaler):
        def __init__(self, device, enabled):
            super().__init__(device, init_scale=2.0**100, backoff_factor=2.0**-90, enabled=enabled)
    monkeypatch.setattr(torch.amp, "GradScaler", Overflowing)
    run_dir = train(parse_train_config([*fp16, "--runs-dir", str(tmp_path / "c"), "--num-epochs", "1"]))
    first_step, second_step = [r for r in read_log(run_dir) if r["kind"] == "step"]
    assert (first_step["skipped"], first_step["grad_norm"], first_step["grad_scale"]) == (True, None, 2.0**100)
    assert (second_step["skipped"], second_step["grad_scale"]) == (False, 2.0**10)
    assert math.isfinite(second_step["grad_norm"])


def test_run_folder_layout(tmp_path):
    run_dir = train(parse_train_config([*SMALL, "--runs-dir", str(tmp_path), "--num-epochs", "1"]))
    assert run_dir.name == "00000-compressibility-cfg_1p0"
    ckpt = run_dir / "checkpoints" / "epoch-0000001"
    assert {p.name for p in ckpt.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors", "training_state.pt"}
    record = epoch_records(run_dir)[0]
    assert {"reward_evaluations", "reward_mean", "reward_std", "reward_compressibility", "reward_compressibility_std",
            "time_sample", "time_reward", "time_exchange", "time_train", "time_train_sync", "time_optimizer",
            "pairs_per_s"} <= record.keys()
    assert record["reward_evaluations"] == 2 * 8  # 8 pairs, 2 images each
    assert {"config.json", "training_log.jsonl", "reward_curve.png", "before_after.png"} <= {
        p.name for p in run_dir.iterdir()}
    again = train(parse_train_config([*SMALL, "--runs-dir", str(tmp_path), "--num-epochs", "1", "--run-name", "x"]))
    assert again.name == "00001-x"


def test_interrupted_checkpoint_write_leaves_the_last_one_intact(tmp_path, monkeypatch):
    run_dir = train(parse_train_config([*SMALL, "--runs-dir", str(tmp_path), "--num-epochs", "1"]))
    good = find_checkpoint(run_dir)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        train(parse_train_config([*SMALL, "--runs-dir", str(tmp_path), "--num-epochs", "2",
                                  "--resume-from", str(run_dir)]))
    assert find_checkpoint(run_dir) == good and good.name == "epoch-0000001"
    assert not (run_dir / "checkpoints" / "epoch-0000002").exists()


def test_bad_input_fails_before_models_load(tmp_path):
    not_a_model = ["--pretrained-model", "no-such/model", "--runs-dir", str(tmp_path)]
    with pytest.raises(ConfigError, match="raise --total-pairs-per-epoch"):
        train(parse_train_config([*not_a_model, "--total-pairs-per-epoch", "1"]))
    with pytest.raises(PromptFileError, match=r"missing\.txt does not exist"):
        train(parse_train_config([*not_a_model, "--prompt-file", str(tmp_path / "missing.txt")]))
    with pytest.raises(PromptFileError, match=r"curl -L -o \S*pickscore_train.txt https://raw.githubusercontent.com/yifan123/flow_grpo/\w+/dataset/pickscore/train.txt"):
        train(parse_train_config([*not_a_model, "--prompt-file", str(tmp_path / "pickscore_train.txt")]))
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(PromptFileError, match="holds no prompts"):
        train(parse_train_config([*not_a_model, "--prompt-file", str(tmp_path / "empty.txt")]))
    (tmp_path / "run").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint there"):
        train(parse_train_config([*SMALL, "--runs-dir", str(tmp_path), "--resume-from", str(tmp_path / "run")]))


def test_offline_demo_learns(tmp_path):
    """The README's quickstart (configs/tiny.toml): the brightness of the images rises far beyond its noise.

    The noise is measured by the run itself: an epoch mean of 128 images has the standard error
    std(images) / √128 (≈ 0.00023; the epoch-to-epoch scatter at learning rate 0 is 0.0003). The
    rise of the last five epochs over the first five must beat 10 such standard errors (10× the noise)
    by 5 standard errors of the rise itself. Measured on an AMD EPYC (AVX-512): rise 0.0342 against
    a threshold of 0.0027 with 2 threads, with 1 thread (FDFO_TEST_THREADS=1) and with
    ATEN_CPU_CAPABILITY=avx2 alike.
    """
    run_dir = train(parse_train_config(["--pretrained-model", "tiny", "--runs-dir", str(tmp_path)]))
    epochs = epoch_records(run_dir)
    assert len(epochs) == 20
    images = 2 * 64
    standard_error = [r["reward_std"] / math.sqrt(images) for r in epochs]
    first, last = (sum(r["reward_mean"] for r in group) / 5 for group in (epochs[:5], epochs[-5:]))
    rise = last - first
    rise_error = math.sqrt(sum(se**2 for se in standard_error[:5] + standard_error[-5:])) / 5
    threshold = 10 * sum(standard_error) / len(standard_error) + 5 * rise_error
    print(f"mean brightness of epochs 0-4: {first:.4f}, of epochs 15-19: {last:.4f}, rise {rise:.4f} "
          f"(threshold {threshold:.4f})")
    assert rise > threshold
    assert (run_dir / "checkpoints" / "epoch-0000020" / "adapter_model.safetensors").is_file()
    # The pictures: the reward curve and the labelled before/after grid (4 prompts × 2 seeds, 2 rows of 64 px).
    assert Image.open(run_dir / "reward_curve.png").format == "PNG"
    grid = Image.open(run_dir / "before_after.png")
    assert grid.height > 2 * 64 and grid.width > 4 * 2 * 64


def test_wandb_receives_the_records_and_uint8_image_pairs(tmp_path, monkeypatch):
    # A stand-in for the wandb package that keeps what it is given (W&B casts float images in [0, 1] straight to
    # uint8, which made the pairs black).
    received = {"init": [], "log": [], "images": []}

    class Run:
        def log(self, data):
            received["log"].append(data)

        def finish(self):
            received["finished"] = True

    class Image:
        def __init__(self, pixels, caption):
            received["images"].append((pixels, caption))

    fake = types.SimpleNamespace(init=lambda **kwargs: received["init"].append(kwargs) or Run(), Image=Image)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run_dir = train(parse_train_config([*SMALL, "--runs-dir", str(tmp_path), "--num-epochs", "1", "--log-wandb"]))
    (init,) = received["init"]
    assert init["id"] == json.loads((run_dir / "config.json").read_text())["wandb_id"] and init["resume"] == "allow"
    (pixels, caption), = received["images"]
    assert pixels.dtype == np.uint8 and pixels.shape == (32, 64, 3) and pixels.max() > 1  # two 32-px images
    assert caption.startswith("R = ")
    assert [set(d) >= {"loss", "lr"} for d in received["log"][:2]] == [True, True]
    assert "reward_mean" in received["log"][-1] and "pair" in received["log"][-1] and received["finished"]


def test_training_prints_no_truncation_warnings(tmp_path, capfd):
    # The demo prompts run past the tiny model's 32 T5 tokens in every batch; diffusers would say so each time.
    train(parse_train_config([*SMALL, "--runs-dir", str(tmp_path), "--num-epochs", "1"]))
    captured = capfd.readouterr()
    assert "truncated" not in captured.out + captured.err


def test_non_finite_reward_names_the_prompt():
    reward = Reward([RewardTerm("broken", 1.0, lambda images, prompts: torch.tensor([1.0, float("nan")]))])
    with pytest.raises(FloatingPointError, match="`broken` is nan for the prompt 'a green apple'"):
        reward(torch.rand(2, 3, 8, 8), ["a red apple", "a green apple"])
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        reward(torch.rand(2, 3, 8, 8) * 2, ["a", "b"])
    with pytest.raises(ValueError, match="shape"):
        reward(torch.rand(2, 8, 8), ["a", "b"])


def test_ema_is_the_average_of_the_steps_weights_by_hand(tmp_path):
    # One optimiser step an epoch and a checkpoint every epoch: the LoRA after steps 1…4 are w1…w4; its B starts
    # at 0. The baselines' published rule with Flow-GRPO's interval and repeats (here 2 and 2): after the steps s
    # with (s + 1) even, i.e. 1 and 3, two updates w̄ += (1 − d)(w_s − w̄), d = min(0.9, (1 + s)/(10 + s)).
    run_dir = train(parse_train_config([*SMALL, "--runs-dir", str(tmp_path), "--num-epochs", "4", "--save-freq", "1",
                                        "--gradient-steps-per-epoch", "1", "--ema-decay", "0.9", "--ema-interval", "2",
                                        "--ema-repeats", "2"]))
    w = {n: lora_weights(run_dir, n) for n in (1, 2, 3, 4)}
    ema = ema_weights(run_dir, 4)
    assert ema.keys() == w[4].keys()
    for key in [k for k in ema if "lora_B" in k]:
        by_hand = torch.zeros_like(w[1][key])
        for s in (1, 3):
            decay = min(0.9, (1 + s) / (10 + s))
            for _ in range(2):
                by_hand = by_hand + (1 - decay) * (w[s][key] - by_hand)
        torch.testing.assert_close(ema[key], by_hand, rtol=0, atol=1e-7)
    assert (w[4][key] - ema[key]).abs().max() > 1e-4 and (w[3][key] - ema[key]).abs().max() > 1e-5  # it lags
    assert checkpoint.load_state(run_dir / "checkpoints" / "epoch-0000004").ema_steps == 4  # updates counted for the resume
    for flag, value, message in [("--ema-decay", "1.5", "--ema-decay must be between 0 and 1"),
                                 ("--ema-interval", "0", "--ema-interval must be at least 1")]:
        with pytest.raises(ConfigError, match=message):
            train(parse_train_config([*SMALL, "--runs-dir", str(tmp_path), "--ema-decay", "0.9", flag, value]))


def test_a_reward_from_the_users_own_module_trains_the_tiny_model(tmp_path, monkeypatch):
    """The demo's run with `--reward my_rewards:darkness=2`, a scorer from a module written here: the images
    darken far beyond the noise (the same margin as the demo test), and the term is logged and recorded."""
    (tmp_path / "my_rewards.py").write_text(
        "def darkness(images, prompts):\n    return 1 - images.mean(dim=(1, 2, 3))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    run_dir = train(parse_train_config(["--pretrained-model", "tiny", "--runs-dir", str(tmp_path), "--num-epochs",
                                        "10", "--reward", "my_rewards:darkness=2"]))
    assert run_dir.name.endswith("my_rewards.darkness-cfg_1p0")
    epochs = epoch_records(run_dir)
    term = [r["reward_my_rewards:darkness"] for r in epochs]
    assert [r["reward_mean"] for r in epochs] == pytest.approx([2 * t for t in term], rel=1e-5)
    standard_error = [r["reward_my_rewards:darkness_std"] / math.sqrt(2 * 64) for r in epochs]
    first, last = sum(term[:3]) / 3, sum(term[-3:]) / 3
    rise_error = math.sqrt(sum(se**2 for se in standard_error[:3] + standard_error[-3:])) / 3
    threshold = 10 * sum(standard_error) / len(standard_error) + 5 * rise_error
    print(f"darkness of epochs 0-2: {first:.4f}, of epochs 7-9: {last:.4f}, rise {last - first:.4f} "
          f"(threshold {threshold:.4f})")
    assert last - first > threshold
    assert json.loads((run_dir / "config.json").read_text())["config"]["reward"] == ["my_rewards:darkness=2"]
