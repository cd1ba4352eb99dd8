"""The run folder under stress: one process at a time (a lock), a full disk during a checkpoint, a step that would
train non-finite weights; each a sentence, with nothing half-written and the earlier checkpoints intact."""

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import SafetensorError

from fdfo.cli import main, parse_train_config
from fdfo.config import TrainConfig
from fdfo.harness.learner import Learner, TrainingDiverged
from fdfo.harness.training_loop import train
from fdfo.runs import checkpoint, runlog
from fdfo.runs.checkpoint import load_state, run_checkpoints
from fdfo.runs.lock import LOCK_FILE
from fdfo.runs.runlog import LOG_FILE, RunFolderError, RunLog
from tests.conftest import ROOT
from tests.test_train import SMALL, epoch_records


def refusal(args, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        main(train, TrainConfig, args)
    assert stop.value.code == 2
    return capsys.readouterr().err


def test_a_live_run_is_locked_and_its_temporary_folders_are_left_alone(tmp_path, capsys):
    live = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *SMALL, "--num-epochs", "1000", "--save-freq", "1",
                             "--runs-dir", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        saved = 0
        for line in live.stdout:  # wait for its second checkpoint
            saved += line.startswith("Saved ")
            if saved == 2:
                break
        run_dir = next(tmp_path.iterdir())
        writing = run_dir / "checkpoints" / f".epoch-0000999.tmp-{live.pid}"  # as if the live run were writing it
        writing.mkdir()
        for extra in (["--dry-run"], [], ["--num-epochs", "2000"]):
            err = refusal(["--resume-from", str(run_dir), *extra], capsys)
            assert f"The run {run_dir} is in use: process {live.pid} on " in err and "train.py" in err, err
            assert "Wait for it to end" in err and err.count("\n") == 1
            assert writing.is_dir()  # neither the parsing nor the refused resume tidied it
        # A branch from an older checkpoint only reads the live run: it may start meanwhile (here: as a dry run).
        train(parse_train_config(["--resume-from", str(run_checkpoints(run_dir)[0]), "--dry-run"]))
    finally:
        live.send_signal(signal.SIGTERM)
        live.communicate(timeout=120)
    assert live.returncode == 143
    # Once the run has stopped, a resume holds the lock and tidies what was left.
    done = len(run_checkpoints(run_dir))
    train(parse_train_config(["--resume-from", str(run_dir), "--num-epochs", str(done + 1)]))
    assert not writing.exists() and (run_dir / LOCK_FILE).is_file()
    assert [r["epoch"] for r in epoch_records(run_dir)] == list(range(done + 1))


@pytest.mark.parametrize("writer", ["torch", "safetensors"])
def test_a_full_disk_during_a_checkpoint_is_said_and_leaves_the_earlier_ones(writer, tmp_path, monkeypatch, capsys):
    # The second checkpoint: half of a file, then the disk is full (as on a full tmpfs: safetensors reports it in
    # a SafetensorError of its own, torch.save in an OSError).
    real_save, real_save_lora, saves = torch.save, checkpoint.save_lora, []

    def fills(path):
        saves.append(path)
        if len(saves) == 2:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            open(path, "wb").write(b"\0" * 100)
            if writer == "torch":
                raise OSError(errno.ENOSPC, "No space left on device")
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    if writer == "torch":
        monkeypatch.setattr(checkpoint.torch, "save", lambda obj, path, *a, **k: fills(path) or real_save(obj, path))
    else:
        monkeypatch.setattr(checkpoint, "save_lora", lambda lora, folder: fills(Path(folder) / "partial")
                            or real_save_lora(lora, folder))
    err = refusal([*SMALL, "--runs-dir", str(tmp_path), "--num-epochs", "3", "--save-freq", "1"], capsys)
    run_dir = next(tmp_path.iterdir())
    assert "epoch-0000002 could not be written: the disk is full" in err, err
    assert "Its temporary folder was removed and the run's earlier checkpoints are intact; free some space" in err
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["epoch-0000001"]
    assert load_state(run_dir / "checkpoints" / "epoch-0000001").epochs_done == 1


@pytest.mark.parametrize("learning_rate,message", [
    ("1e36", "the step left LoRA weights that are not finite"),  # finite in float32, the weights are not after a step
    ("3e38", "the optimiser's update overflows float32"),  # AdamW's first step size, lr / (1 − β₁), is not
])
def test_a_learning_rate_that_overflows_stops_before_anything_is_saved(learning_rate, message, tmp_path, capsys):
    err = refusal([*SMALL, "--runs-dir", str(tmp_path), "--train.learning-rate", learning_rate], capsys)
    assert f"error: Epoch 0, optimiser step 1: {message}" in err, err
    assert list(tmp_path.iterdir()) == []  # no epoch finished: the new folder is gone, no checkpoint was written


@pytest.mark.parametrize("scaled", [False, True])
def test_a_gradient_that_is_not_finite_stops_the_run_unless_the_fp16_scaler_skips_it(scaled):
    layer = torch.nn.Linear(3, 2)
    learner = SimpleNamespace(lora=layer, optimizer=torch.optim.AdamW(layer.parameters(), lr=1e-3), ema=None,
                              scaler=torch.amp.GradScaler("cpu", enabled=scaled, init_scale=1.0), max_grad_norm=1.0,
                              epochs_done=4, optimizer_steps=17)
    before = [p.detach().clone() for p in layer.parameters()]
    learner.scaler.scale(layer(torch.ones(1, 3)).sum()).backward()
    layer.weight.grad[0, 0] = float("nan")
    if scaled:  # an fp16 overflow: the scaler skips the step and lowers its scale; the run goes on
        grad_norm, _ = Learner.step(learner)
        assert grad_norm != grad_norm and learner.scaler.get_scale() == 0.5 and learner.optimizer_steps == 18
    else:
        with pytest.raises(TrainingDiverged, match="Epoch 4, optimiser step 18: the gradient norm is nan, so the step "
                                                   "was not taken"):
            Learner.step(learner)
    assert all(torch.equal(p, b) for p, b in zip(layer.parameters(), before))  # no step was applied


def test_a_log_record_that_cannot_be_written_is_cut_off_and_said(tmp_path, monkeypatch):
    log = RunLog(tmp_path, use_wandb=False)
    log.write({"kind": "step", "epoch": 0, "step": 1})
    whole = (tmp_path / LOG_FILE).read_text()

    class FillingFile:  # writes half of what it is given, then finds the disk full
        def __init__(self, path, mode):
            self.file = open(path, mode)

        def write(self, text):
            self.file.write(text[:len(text) // 2])
            self.file.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()
    monkeypatch.setattr(runlog, "open", FillingFile, raising=False)
    with pytest.raises(RunFolderError, match=f"{tmp_path / LOG_FILE} could not be written .the disk is full.; the "
                                             "write was undone and the run's checkpoints are intact: free some space"):
        log.write({"kind": "step", "epoch": 0, "step": 2})
    assert (tmp_path / LOG_FILE).read_text() == whole  # no half line for a resume to trip on
