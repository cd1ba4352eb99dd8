"""The run folder and its records: config.json, training_log.jsonl and reward_curve.png (always), Weights &
Biases (when asked)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from fdfo import distributed
from fdfo.plots import REWARD_CURVE, plot_reward_curve

LOG_FILE = "training_log.jsonl"


def new_run_dir(runs_dir: Path, name: str) -> Path:
    """`runs_dir/<next free 5-digit id>-<name>/`, created."""
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    ids = [int(m.group(1)) for p in runs_dir.iterdir() if (m := re.match(r"(\d{5})-", p.name))]
    run_dir = runs_dir / f"{max(ids, default=-1) + 1:05d}-{name}"
    run_dir.mkdir()
    return run_dir


class RunLog:
    """Appends records to training_log.jsonl on rank 0, redraws reward_curve.png after every epoch record, and
    mirrors the records to W&B if enabled."""

    def __init__(self, run_dir: Path, config: dict[str, Any], use_wandb: bool, resume_epoch: int | None = None):
        self.path = Path(run_dir) / LOG_FILE
        self.wandb = None
        self.epochs: list[dict[str, Any]] = []  # the epoch records so far, for the reward curve
        if not distributed.is_main():
            return
        if resume_epoch is not None and self.path.exists():  # drop records of epochs that will run again
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["epoch"] < resume_epoch]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(self.path)
            self.epochs = [r for r in map(json.loads, kept) if r["kind"] == "epoch"]
        if use_wandb:
            import wandb
            self.wandb = wandb.init(project="fdfo", name=Path(run_dir).name, dir=str(run_dir), config=config,
                                    resume="allow", id=Path(run_dir).name.replace("/", "_"))

    def write(self, record: dict[str, Any], images: dict[str, Any] | None = None) -> None:
        if not distributed.is_main():
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if record["kind"] == "epoch":
            self.epochs.append(record)
            plot_reward_curve(self.epochs, self.path.parent / REWARD_CURVE)
        if self.wandb is not None:
            self.wandb.log({**{k: v for k, v in record.items() if k != "kind"}, **(images or {})})

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def read_log(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / LOG_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
