"""Resume rules: settings from the checkpoint, changes applied and recorded, fixed ones refused, older checkpoints
branch into a new folder, damaged files named, nothing written before everything checks out."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save

from fdfo.runs.checkpoint import CheckpointError, load_state
from fdfo.cli import parse_train_config
from fdfo.config import ConfigError
from fdfo.runs.runlog import read_log
from fdfo.harness.training_loop import train
from tests.test_train import SMALL, epoch_records, lora_weights


def run(*flags):
    return train(parse_train_config(list(flags)))


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes: to show that nothing was written."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def three_epochs(tmp_path_factory):
    """A run of 3 epochs with a checkpoint after each, learning rate 1e-3; tests copy it before changing it."""
    runs = tmp_path_factory.mktemp("runs")
    return run(*SMALL, "--runs-dir", str(runs), "--num-epochs", "3", "--save-freq", "1")


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    import shutil
    target = tmp_path / "runs" / run_dir.name
    shutil.copytree(run_dir, target)
    return target


def test_a_resume_takes_its_settings_from_the_checkpoint_and_applies_and_records_new_ones(three_epochs, tmp_path):
    run_dir = copy_run(three_epochs, tmp_path)
    # No other flag: the run's own settings (reward, sizes, learning rate…) come from the checkpoint.
    resumed = run("--resume-from", str(run_dir), "--num-epochs", "4", "--train.learning-rate", "5e-4",
                  "--train.adam-beta2", "0.99")
    assert resumed == run_dir
    steps = [r for r in read_log(run_dir) if r["kind"] == "step"]
    assert [(r["epoch"], r["lr"]) for r in steps] == [(e, 1e-3) for e in range(3) for _ in range(2)] + [(3, 5e-4)] * 2
    config = json.loads((run_dir / "config.json").read_text())
    assert config["config"]["train"]["learning_rate"] == 5e-4 and config["config"]["reward_preset"] == "compressibility"
    assert config["history"][0]["from_epoch"] == 0 and config["history"][0]["settings"]["train"]["learning_rate"] == 1e-3
    assert config["history"][1] == {"from_epoch": 3, "changed": {"train.learning_rate": [1e-3, 5e-4],
                                                                  "train.adam_beta2": [0.999, 0.99]}}


@pytest.mark.parametrize("flags,message", [
    (["--lora-rank", "16"], "--lora-rank 16 differs from the checkpoint's 32: the LoRA's shape cannot change"),
    (["--seed", "7"], "--seed 7 differs from the checkpoint's 6"),
    (["--total-pairs-per-epoch", "16"], "Resume with --total-pairs-per-epoch 8"),
    (["--pretrained-model", "sd35m-random"], "--pretrained-model sd35m-random differs from the checkpoint's tiny"),
])
def test_settings_that_cannot_change_are_refused_before_anything_is_written(three_epochs, tmp_path, flags, message):
    run_dir = copy_run(three_epochs, tmp_path)
    before = snapshot(run_dir.parent)
    with pytest.raises(ConfigError, match=message):
        run("--resume-from", str(run_dir), "--num-epochs", "4", *flags)
    assert snapshot(run_dir.parent) == before


def test_a_resume_from_an_older_checkpoint_branches_into_a_new_folder(three_epochs, tmp_path):
    run_dir = copy_run(three_epochs, tmp_path)
    before = snapshot(run_dir)
    branch = run("--resume-from", str(run_dir / "checkpoints" / "epoch-0000001"), "--num-epochs", "2")
    assert branch != run_dir and branch.parent == run_dir.parent
    assert snapshot(run_dir) == before  # the parent is untouched
    config = json.loads((branch / "config.json").read_text())
    assert config["parent"] == {"run_dir": str(run_dir), "checkpoint": str(run_dir / "checkpoints" / "epoch-0000001")}
    assert [r["epoch"] for r in epoch_records(branch)] == [0, 1]
    assert epoch_records(branch)[0] == epoch_records(run_dir)[0]  # the parent's record, copied
    # Unchanged settings: the branch's epoch 1 is the parent's, bit for bit (exact resume).
    for key, value in lora_weights(run_dir, 2).items():
        assert torch.equal(lora_weights(branch, 2)[key], value), key
    # The branch's own folder continues the branch.
    assert run("--resume-from", str(branch), "--num-epochs", "3") == branch
    assert [r["epoch"] for r in epoch_records(branch)] == [0, 1, 2]
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("damage,message", [
    ({"adapter_model.safetensors": b"\x00" * 10}, "adapter_model.safetensors cannot be read"),
    ({"adapter_model.safetensors": b""}, "adapter_model.safetensors cannot be read"),
    ({"training_state.pt": b""}, "training_state.pt cannot be read"),
    ({"training_state.pt": b"not a checkpoint at all"}, "training_state.pt cannot be read"),
    ({"settings.json": b"{"}, "settings.json cannot be read"),
    ("a NaN in the LoRA", "adapter_model.safetensors cannot be read .The LoRA in .* holds 1 non-finite value"),
])
def test_a_damaged_checkpoint_is_named_with_the_previous_one(three_epochs, tmp_path, damage, message):
    run_dir = copy_run(three_epochs, tmp_path)
    newest = run_dir / "checkpoints" / "epoch-0000003"
    if "adapter_model.safetensors" in damage and damage["adapter_model.safetensors"]:
        damage = {"adapter_model.safetensors": (newest / "adapter_model.safetensors").read_bytes()[:1000]}  # truncated
    if damage == "a NaN in the LoRA":  # a run that diverged: every image of the checkpoint would be noise
        weights = load_file(newest / "adapter_model.safetensors")
        next(w for k, w in weights.items() if "lora_B" in k)[0, 0] = float("nan")
        damage = {"adapter_model.safetensors": save(weights)}
    for name, data in damage.items():
        (newest / name).write_bytes(data)
    before = snapshot(run_dir.parent)
    with pytest.raises(CheckpointError, match=f"{message}.*resume from the previous checkpoint, .*epoch-0000002"):
        run("--resume-from", str(run_dir), "--num-epochs", "4")
    assert snapshot(run_dir.parent) == before


def test_a_training_state_that_could_run_code_is_refused(three_epochs, tmp_path):
    run_dir = copy_run(three_epochs, tmp_path)
    state = run_dir / "checkpoints" / "epoch-0000003" / "training_state.pt"
    assert set(torch.load(state, weights_only=True)) == {"format", "epochs_done", "optimizer_steps", "total_pairs",
                                                         "optimizer", "grad_scaler", "ema_steps", "forward_passes",
                                                         "backward_passes", "prompts_sha256"}  # tensors, numbers and a digest only
    torch.save({"format": 2, "callback": os.system}, state)  # a pickle that names a function
    with pytest.raises(CheckpointError, match="holds Python objects besides tensors and numbers.*refused"):
        load_state(state.parent)


def test_killed_checkpoint_writes_are_tidied_when_the_run_resumes(three_epochs, tmp_path):
    run_dir = copy_run(three_epochs, tmp_path)
    checkpoints = run_dir / "checkpoints"
    os.replace(checkpoints / "epoch-0000003", checkpoints / ".epoch-0000003.old-999")  # killed mid-swap
    (checkpoints / ".epoch-0000004.tmp-998").mkdir()  # killed mid-write
    run("--resume-from", str(run_dir), "--num-epochs", "4")
    assert sorted(p.name for p in checkpoints.iterdir()) == [f"epoch-000000{e}" for e in (1, 2, 3, 4)]
    assert [r["epoch"] for r in epoch_records(run_dir)] == [0, 1, 2, 3]  # resumed from the restored epoch 3


def test_a_checkpoint_of_an_older_fdfo_resumes_without_phantom_changes(three_epochs, tmp_path):
    # Before --method, its settings had no `method`, `grpo` or `nft`, and its state no forward count.
    run_dir = copy_run(three_epochs, tmp_path)
    checkpoint = run_dir / "checkpoints" / "epoch-0000003"
    settings = json.loads((checkpoint / "settings.json").read_text())
    for key in ("method", "grpo", "nft"):
        del settings[key]
    (checkpoint / "settings.json").write_text(json.dumps(settings))
    state = torch.load(checkpoint / "training_state.pt", weights_only=True)
    del state["forward_passes"], state["backward_passes"]
    torch.save(state, checkpoint / "training_state.pt")
    resumed = run("--resume-from", str(run_dir), "--num-epochs", "4")
    history = json.loads((resumed / "config.json").read_text())["history"]
    assert not any("changed" in entry for entry in history)
    last = epoch_records(resumed)[-1]
    assert last["transformer_forwards"] is None and last["transformer_backwards"] is None  # unknown, not from 0


def test_a_resume_with_no_epochs_left_is_refused_before_anything_is_written(three_epochs, tmp_path):
    run_dir = copy_run(three_epochs, tmp_path)
    before = snapshot(run_dir.parent)
    for epochs in ("3", "2"):
        with pytest.raises(ConfigError, match=f"epoch-0000003 has 3 epochs done: --num-epochs {epochs} leaves none to "
                                              "train. Give --num-epochs more than 3."):
            run("--resume-from", str(run_dir), "--num-epochs", epochs)
    assert snapshot(run_dir.parent) == before


def test_prompts_edited_since_the_checkpoint_are_refused_or_accepted_and_recorded(three_epochs, tmp_path):
    run_dir = copy_run(three_epochs, tmp_path)
    prompts = Path(json.loads((run_dir / "config.json").read_text())["config"]["prompt_file"])
    edited = tmp_path / "edited.txt"
    edited.write_text(prompts.read_text().replace("a", "the", 1))
    before = snapshot(run_dir.parent)
    with pytest.raises(ConfigError, match=r"The prompts of .*edited.txt differ from those .*epoch-0000003 trained on "
                                          r"\(SHA-256 [0-9a-f]{12}…, the checkpoint's [0-9a-f]{12}…\).*"
                                          "--accept-changed-prompts"):
        run("--resume-from", str(run_dir), "--num-epochs", "4", "--prompt-file", str(edited))
    assert snapshot(run_dir.parent) == before
    # The same prompts in another file are no change; other text is, with the flag, and the history says so.
    (tmp_path / "same.txt").write_text(prompts.read_text() + "\n\n")
    run("--resume-from", str(run_dir), "--num-epochs", "4", "--prompt-file", str(tmp_path / "same.txt"))
    run("--resume-from", str(run_dir), "--num-epochs", "5", "--prompt-file", str(edited), "--accept-changed-prompts")
    history = json.loads((run_dir / "config.json").read_text())["history"]
    assert "prompts_sha256" not in history[-2].get("changed", {}) and history[-1]["from_epoch"] == 4
    old, new = history[-1]["changed"]["prompts_sha256"]
    assert old == load_state(run_dir / "checkpoints" / "epoch-0000004").prompts_sha256 != new
    assert load_state(run_dir / "checkpoints" / "epoch-0000005").prompts_sha256 == new
