"""Every method in one harness: the same command line but for --method, the same cost axis."""

import dataclasses
import json
import shutil
import typing
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fdfo import config
from fdfo.cli import parse_train_config
from fdfo.config import ConfigError
from fdfo.methods import METHODS
from fdfo.methods.base import Method
from fdfo.runs.runlog import read_log
from fdfo.harness.training_loop import train
from tests.conftest import ROOT, torchrun

# 8 pairs = 16 images in groups of 4 (4 prompts), 4 steps at 32 px, no CFG, a moderate learning rate.
COMMON = ["--pretrained-model", "tiny", "--total-pairs-per-epoch", "8", "--sample.num-solver-steps", "4",
          "--sample.resolution", "32", "--sample.guidance-scale", "1.0", "--train.learning-rate", "1e-3"]
OWN = {"fdfo": [], "fdfo_grad": [], "draft": [], "rsm": ["--rsm.branches", "2", "2", "0", "--rsm.seeds-per-prompt", "2"], "flow_grpo": ["--grpo.group-size", "4", "--grpo.timestep-fraction", "0.75"],
       "diffusion_nft": ["--nft.group-size", "4", "--nft.timestep-fraction", "0.75"]}


def small(method):
    """The same command line for every method but --method and the method's own settings."""
    return [*COMMON, "--method", method, *OWN[method]]
# Samples through the transformer per epoch, by hand: 16 images × 4 sampling steps, then per trained item
# (3 of the 4 levels for the baselines) the policy and, with a KL weight, the LoRA-free reference; DiffusionNFT
# also evaluates its old policy once per item.
# DRaFT (K = 1, checkpointed): each image's last step with gradient, run again in the backward pass.
FORWARDS_PER_EPOCH = {"fdfo": 16 * 4 + 16 * 4, "fdfo_grad": 16 * 4 + 16 * 4, "flow_grpo": 16 * 4 + 16 * 3 * 2, "diffusion_nft": 16 * 4 + 16 * 3 * 3,
                      "draft": 16 * 4 + 16 * 1 * 2, "rsm": 48 + 16 * 2 + 4 * 2}
# Back-propagated: the policy's pass of every trained item; the sampling, the references, DiffusionNFT's old
# policy and the checkpoint's recomputation are not.
BACKWARDS_PER_EPOCH = {"fdfo": 16 * 4, "fdfo_grad": 16 * 4, "flow_grpo": 16 * 3, "diffusion_nft": 16 * 3, "draft": 16 * 1,
                       "rsm": 16 + 4}


def epochs(run_dir):
    return [r for r in read_log(run_dir) if r["kind"] == "epoch"]


def weights(run_dir, epoch, folder=""):
    return load_file(Path(run_dir) / "checkpoints" / f"epoch-{epoch:07d}" / folder / "adapter_model.safetensors")


@pytest.mark.parametrize("method", ["fdfo", "fdfo_grad", "flow_grpo", "diffusion_nft", "draft", "rsm"])
def test_each_method_trains_from_the_same_command_line(method, tmp_path):
    run_dir = train(parse_train_config([*small(method), "--num-epochs", "2", "--runs-dir", str(tmp_path)]))
    records = epochs(run_dir)
    assert [r["reward_evaluations"] for r in records] == [16, 32]  # the same budget axis for every method
    assert [r["transformer_forwards"] for r in records] == [FORWARDS_PER_EPOCH[method] * n for n in (1, 2)]
    assert [r["transformer_backwards"] for r in records] == [BACKWARDS_PER_EPOCH[method] * n for n in (1, 2)]
    b = [w for k, w in weights(run_dir, 2).items() if "lora_B" in k]
    assert max(w.abs().max().item() for w in b) > 1e-5  # the LoRA moved away from its zero-effect start
    steps = [r for r in read_log(run_dir) if r["kind"] == "step"]
    if method in ("fdfo", "fdfo_grad", "flow_grpo"):  # training re-evaluates the sampling policy first: ρ = 1 exactly
        assert steps[0]["ratio_dev_first_micro_batch"] < 1e-6
    config = json.loads((run_dir / "config.json").read_text())["config"]
    assert config["method"] == method


def test_diffusion_nft_resumes_exactly_with_its_old_policy(tmp_path):
    nft = [*small("diffusion_nft"), "--save-freq", "1"]
    straight = train(parse_train_config([*nft, "--num-epochs", "3", "--runs-dir", str(tmp_path / "a")]))
    first = train(parse_train_config([*nft, "--num-epochs", "2", "--runs-dir", str(tmp_path / "b")]))
    resumed = train(parse_train_config([*nft, "--num-epochs", "3", "--runs-dir", str(tmp_path / "b"),
                                        "--resume-from", str(first)]))
    for folder in ("", "old_policy"):
        expected = weights(straight, 3, folder)
        assert all(torch.equal(weights(resumed, 3, folder)[k], v) for k, v in expected.items()), folder
    old, new = weights(straight, 3, "old_policy"), weights(straight, 3)
    assert any(not torch.equal(old[k], new[k]) for k in new)  # the old policy lags the LoRA
    assert [r["transformer_forwards"] for r in epochs(resumed)] == [r["transformer_forwards"] for r in epochs(straight)]


@pytest.mark.parametrize("method", ["flow_grpo", "diffusion_nft", "draft", "fdfo_grad", "rsm"])
def test_each_method_gives_the_same_result_on_1_and_2_ranks(method, tmp_path):
    """Images, groups, advantages and the item shuffle are global, as FDFO's pairs: the rank count changes only
    the order of float sums. Compared on the LoRA's B matrices (zero at the start, so B is the whole update):
    Adam turns rounding in near-zero gradient entries into steps of ±lr, so single entries can differ by more
    than the norm of the difference says. Measured: relative gap 2.9e-5 (Flow-GRPO), 6.7e-6 (DiffusionNFT),
    3.9e-7 (DRaFT), 2.9e-6 (FDFO's gradient row I) and 5.5e-5 (RSM) with 2 threads and with 1; 3.2e-5, 1.1e-4,
    3.6e-7, 2.9e-6 and 5.0e-4 with ATEN_CPU_CAPABILITY=avx2; the bar is 9× the largest, and 10× RSM's own: its hinge
    switches a row's gradient off at a threshold, so rounding near it switches whole rows."""
    flags = [*small(method), "--num-epochs", "2", "--gradient-steps-per-epoch", "2"]
    runs = {}
    for n in (1, 2):
        torchrun(n, ROOT / "train.py", *flags, "--runs-dir", str(tmp_path / str(n)))
        (runs[n],) = (tmp_path / str(n)).iterdir()
    assert epochs(runs[1])[0]["reward_mean"] == pytest.approx(epochs(runs[2])[0]["reward_mean"], abs=1e-6)
    one, two = (torch.cat([w.flatten() for k, w in sorted(weights(runs[n], 2).items()) if "lora_B" in k]) for n in (1, 2))
    relative = ((one - two).norm() / one.norm()).item()
    print(f"{method}: 1 vs 2 ranks, LoRA B relative gap {relative:.2e}, max |difference| "
          f"{(one - two).abs().max():.2e} of max |B| {one.abs().max():.2e}")
    assert relative < (5e-3 if method == "rsm" else 1e-3)


def test_groups_must_fill_a_ranks_images(tmp_path):
    with pytest.raises(ConfigError, match="--grpo.group-size 5 must divide the 16 images each rank samples"):
        train(parse_train_config([*small("flow_grpo"), "--grpo.group-size", "5", "--runs-dir",
                                  str(tmp_path)]))


FIXTURES = ROOT / "tests" / "fixtures" / "main-7dee980"  # one run per method, 1 epoch, written by main at 7dee980


@pytest.mark.parametrize("method", ["fdfo", "flow_grpo", "diffusion_nft"])
def test_a_checkpoint_of_main_7dee980_resumes_without_phantom_changes(method, tmp_path, capsys):
    run_dir = tmp_path / method
    shutil.copytree(FIXTURES / method, run_dir)
    assert train(parse_train_config(["--resume-from", str(run_dir), "--num-epochs", "2"])) == run_dir
    assert "Changed on resume" not in capsys.readouterr().out
    history = json.loads((run_dir / "config.json").read_text())["history"]
    assert not any("changed" in entry for entry in history)
    records = epochs(run_dir)
    assert [r["epoch"] for r in records] == [0, 1]
    assert records[1]["transformer_forwards"] == 2 * records[0]["transformer_forwards"]  # counted on from the state
    before, after = weights(run_dir, 1), weights(run_dir, 2)
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in after)
    if method == "diffusion_nft":  # its old policy came back from old_policy/ and was saved again
        assert weights(run_dir, 2, "old_policy").keys() == after.keys()
        nft = json.loads((run_dir / "config.json").read_text())["config"]["nft"]
        assert (nft["solver"], nft["integer_timesteps"]) == ("euler", False)  # as it ran before they were settings


def test_every_method_is_registered_the_same_way():
    assert set(typing.get_args(config.Method)) == set(METHODS)
    for name, cls in METHODS.items():
        assert issubclass(cls, Method), name
        assert name == "fdfo" or (ROOT / "configs" / f"{name}.toml").is_file(), name  # its published recipe


def readme_example() -> str:
    """The Python block of the README's "Adding a method" section."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Adding a method"):]
    return section[section.index("```python\n") + len("```python\n"):section.index("\n```", section.index("```python"))]


def test_the_readmes_new_method_trains_in_the_harness_unchanged(tmp_path, monkeypatch):
    namespace: dict = {}
    exec(compile(readme_example(), "README.md (Adding a method)", "exec"), namespace)
    monkeypatch.setitem(METHODS, "best_of_group", namespace["BestOfGroup"])
    cfg = dataclasses.replace(parse_train_config([*small("flow_grpo"), "--num-epochs", "2", "--runs-dir", str(tmp_path)]),
                              method="best_of_group")
    run_dir = train(cfg)
    assert [r["reward_evaluations"] for r in epochs(run_dir)] == [16, 32]
    assert [r["transformer_forwards"] for r in epochs(run_dir)] == [(16 * 4 + 16 * 4) * n for n in (1, 2)]
    b = [w for k, w in weights(run_dir, 2).items() if "lora_B" in k]
    assert max(w.abs().max().item() for w in b) > 1e-5
