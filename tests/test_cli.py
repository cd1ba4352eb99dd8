"""The entry points as a user meets them: bad input is one sentence and exit code 2, nothing written; Ctrl-C says
where the last checkpoint is; a run that stops before its first epoch leaves no folder behind."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fdfo.cli import main, parse_train_config
from fdfo.config import ConfigError, GenerateConfig, MetricsConfig, TrainConfig
from fdfo.evaluation.metrics import evaluate
from fdfo.evaluation.generate import generate
from fdfo.rewards import engine
from fdfo.harness.training_loop import train
from tests.conftest import ROOT
from tests.test_train import SMALL

NO_MODEL = ["--pretrained-model", "no-such/model"]  # a check that came after model loading would fail differently


def bad_train_inputs(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("un caf\xe9 cr\xe8me\n".encode("latin-1"))
    (tmp_path / "typo.toml").write_text('reward_preset = "pickscor"\n')
    (tmp_path / "ten.toml").write_text('num_epochs = "ten"\n')
    (tmp_path / "a_file").write_text("")
    return [
        (["--total-pairs-per-epoch", "-4"], "--total-pairs-per-epoch must be at least 1; got -4."),
        (["--num-epochs", "0"], "--num-epochs must be at least 1; got 0."),
        (["--num-epochs", "-1"], "--num-epochs must be at least 1; got -1."),
        (["--train.learning-rate", "-1e-3"], "--train.learning-rate must be 0 or more"),
        (["--lora-rank", "0"], "--lora-rank must be at least 1; got 0."),
        (["--sample.num-solver-steps", "0"], "--sample.num-solver-steps must be at least 1; got 0."),
        (["--sample.churn-weight", "-0.1"], "--sample.churn-weight must be 0 or more"),
        (["--save-freq", "0"], "--save-freq must be at least 1; got 0."),
        (["--sample.resolution", "100"], "--sample.resolution must be a multiple of 16"),
        (["--runs-dir", str(tmp_path / "a_file")], "is a file; give a folder for the runs."),
        (["--runs-dir", str(tmp_path / "a_file" / "runs")], r"a_file/runs cannot be written \(Not a directory\)"),
        (["--runs-dir", "/proc/fdfo-runs"], "--runs-dir /proc/fdfo-runs cannot be written"),
        (["--run-name", "a/b"], "--run-name 'a/b' must be a folder name"),
        (["--run-name", ".."], "--run-name '..' must be a folder name"),
        (["--train.learning-rate", "inf"], "--train.learning-rate must be a finite number"),
        (["--train.weight-decay", "inf"], "--train.weight-decay must be a finite number"),
        (["--train.learning-rate", "1e39"], r"--train.learning-rate must be a finite number \(float32's, at most 3.4e38"),
        (["--train.max-grad-norm", "nan"], "--train.max-grad-norm must be a finite number"),
        (["--sample.guidance-scale", "inf"], "--sample.guidance-scale must be a finite number"),
        (["--sample.churn-weight", "inf"], "--sample.churn-weight must be a finite number"),
        (["--sample.interval.sigma", "inf"], "--sample.interval.sigma must be a finite number"),
        (["--method", "flow_grpo", "--grpo.kl-weight", "inf"], "--grpo.kl-weight must be a finite number"),
        (["--seed", "-1"], "--seed must be a whole number from 0 to "),
        (["--seed", str(2**64)], "--seed must be a whole number from 0 to "),
        (["--prompt-file", str(tmp_path / "latin1.txt")], r"latin1.txt is not UTF-8 text"),
        (["--config", str(tmp_path / "typo.toml")], "`reward_preset` must be one of 'combined', .*; got 'pickscor'."),
        (["--config", str(tmp_path / "ten.toml")], "`num_epochs` must be an integer; got 'ten'."),
    ]


def test_bad_training_input_is_one_sentence_exit_2_and_nothing_written(tmp_path, capsys):
    runs = tmp_path / "runs"
    for flags, message in bad_train_inputs(tmp_path):
        with pytest.raises(SystemExit) as stop:
            main(train, TrainConfig, [*NO_MODEL, "--runs-dir", str(runs), *flags])
        err = capsys.readouterr().err
        assert stop.value.code == 2, flags
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, (flags, err)
        assert __import__("re").search(message, err), (flags, err)
        assert not runs.exists(), flags


def test_bad_generate_and_metrics_input_is_refused_before_any_image(tmp_path, capsys):
    (tmp_path / "folder.png").mkdir()
    cases = [
        (generate, GenerateConfig, ["--out", str(tmp_path / "grid.gif")], "the extension decides the format"),
        (generate, GenerateConfig, ["--out", "/proc/fdfo/grid.png"], "its folder /proc/fdfo cannot be written"),
        (generate, GenerateConfig, ["--out", str(tmp_path / "folder.png")], "is a folder; give a file name"),
        (generate, GenerateConfig, ["--grid-rows", "0"], "--grid-rows must be at least 1"),
        (evaluate, MetricsConfig, ["--num-prompts", "0"], "--num-prompts must be at least 1"),
        (evaluate, MetricsConfig, ["--metrics", "dreamsim_diversity"], "--num-repeats 2 or more"),
        (generate, GenerateConfig, ["--guidance-scale", "inf"], "--guidance-scale must be a finite number"),
        (generate, GenerateConfig, ["--seed", "-1"], "--seed must be a whole number from 0 to"),
        (evaluate, MetricsConfig, ["--guidance-scale", "nan"], "--guidance-scale must be a finite number"),
        (evaluate, MetricsConfig, ["--prompt-seed", "-1"], "--prompt-seed must be a whole number from 0 to 4294967295"),
        (evaluate, MetricsConfig, ["--prompt-seed", str(2**32)], "--prompt-seed must be a whole number from 0 to"),
        (evaluate, MetricsConfig, ["--image-seed", "-5"], "--image-seed must be a whole number from 0 to"),
    ]
    for entry, cls, flags, message in cases:
        with pytest.raises(SystemExit) as stop:
            main(entry, cls, [*NO_MODEL, *flags])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and message in err and "Traceback" not in err, (flags, err)


def test_debug_switch_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("FDFO_DEBUG", "1")
    with pytest.raises(ConfigError, match="--num-epochs must be at least 1"):
        main(train, TrainConfig, [*NO_MODEL, "--num-epochs", "0", "--runs-dir", str(tmp_path)])


def test_a_rounded_pair_count_is_said_in_one_line(tmp_path, capsys):
    train(parse_train_config([*NO_MODEL, "--total-pairs-per-epoch", "5", "--dry-run", "--runs-dir", str(tmp_path),
                              "--prompt-file", "prompt_sets/demo.txt"]))
    assert "--total-pairs-per-epoch 5 rounds down to 4: 4 pairs on each of 1 rank(s)" in capsys.readouterr().out


def test_the_real_entry_point_prints_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--num-epochs", "0", "--runs-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr == "error: --num-epochs must be at least 1; got 0.\n"


def test_ctrl_c_says_where_the_last_checkpoint_is(tmp_path):
    command = [sys.executable, str(ROOT / "train.py"), *SMALL, "--num-epochs", "1000", "--save-freq", "1",
               "--runs-dir", str(tmp_path)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in process.stdout:  # wait for the first checkpoint
        if line.startswith("Saved "):
            break
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    run_dir = next(tmp_path.iterdir())
    assert process.returncode == 130
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert f"Interrupted. The last checkpoint is {run_dir}/checkpoints/epoch-" in out
    assert f"continue with: python train.py --resume-from {run_dir}" in out


def test_a_run_that_fails_before_its_first_epoch_leaves_no_folder(tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise FloatingPointError("The reward term `x` is nan for the prompt 'a'.")
    monkeypatch.setattr(engine.Reward, "__call__", broken)
    with pytest.raises(FloatingPointError):
        train(parse_train_config([*SMALL, "--runs-dir", str(tmp_path), "--num-epochs", "2"]))
    assert list(tmp_path.iterdir()) == []
    assert "No epoch had finished, so the new run folder" in capsys.readouterr().out


SIGNAL_IN_A_CALLBACK = """
import os, signal, weakref
import torch
calls = []
def score(images, prompts):
    calls.append(1)
    if len(calls) == {call}:  # the signal lands while a weakref callback runs, where a raise would be swallowed
        def callback():
            os.kill(os.getpid(), signal.{signal})
            for _ in range(100000):
                pass
        weakref.finalize(type("Held", (), {{}})(), callback)  # collected at once: the callback runs here
    return images.mean(dim=(1, 2, 3))
"""


@pytest.mark.parametrize("call,signum", [(1, "SIGTERM"), (5, "SIGTERM"), (6, "SIGINT")])
def test_a_signal_inside_a_weakref_callback_stops_the_run(call, signum, tmp_path):
    # Scored once a sampling batch (4 an epoch here): call 1 is epoch 0's first, call 5 epoch 1's, after a checkpoint.
    (tmp_path / "stopping_scorer.py").write_text(SIGNAL_IN_A_CALLBACK.format(call=call, signal=signum))
    command = [sys.executable, str(ROOT / "train.py"), *SMALL, "--reward", "stopping_scorer:score=1",
               "--num-epochs", "50", "--save-freq", "1", "--runs-dir", str(tmp_path / "runs")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode == {"SIGTERM": 143, "SIGINT": 130}[signum], result.stderr[-2000:]
    assert "Traceback" not in result.stderr.replace("Exception ignored", ""), result.stderr[-2000:]
    epochs = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    if call == 1:  # no epoch finished: the new folder is removed
        assert epochs == [] and "No epoch had finished" in result.stdout
        assert not any((tmp_path / "runs").iterdir())
    else:  # stopped in epoch 1: epoch 0's checkpoint is the last, and the log holds epoch 0 only
        run_dir = next((tmp_path / "runs").iterdir())
        assert len(epochs) == 1 and f"Interrupted. The last checkpoint is {run_dir}/checkpoints/epoch-0000001" in result.stdout
        assert [r["epoch"] for r in map(json.loads, (run_dir / "training_log.jsonl").read_text().splitlines())
                if r["kind"] == "epoch"] == [0]
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["epoch-0000001"]


def test_ctrl_c_while_the_imports_run_exits_130_without_a_traceback():
    # torch alone takes seconds to import: the signal lands during the entry point's imports.
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--dry-run"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130 and err == "" and out == "", err
