"""The run folder and its records: config.json (settings, their history, the batch plan), training_log.jsonl and
reward_curve.png (always), Weights & Biases (when asked); a new folder removed again if no epoch finished."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from fdfo import distributed
from fdfo.errors import UserError
from fdfo.evaluation.images import to_uint8
from fdfo.runs.checkpoint import checkpoint_dir, read_settings
from fdfo.runs.plots import REWARD_CURVE, plot_reward_curve
from fdfo.runs.resume import Resume, run_of

LOG_FILE = "training_log.jsonl"
CONFIG_FILE = "config.json"
WANDB_IMAGE_EVERY = 10  # epochs between the image pairs sent to W&B


def new_run_dir(runs_dir: Path, name: str) -> Path:
    """`runs_dir/<next free 5-digit id>-<name>/`, created."""
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    ids = [int(m.group(1)) for p in runs_dir.iterdir() if (m := re.match(r"(\d{5})-", p.name))]
    run_dir = runs_dir / f"{max(ids, default=-1) + 1:05d}-{name}"
    run_dir.mkdir()
    return run_dir


def open_run_dir(settings: dict[str, Any], batch_plan: dict[str, Any], runs_dir: Path, name: str,
                 resume: Resume | None) -> Path:
    """The run folder, with config.json: the settings now, the batch plan, and the history of the settings
    (which epochs ran under which values). A fresh run gets a new folder in `runs_dir`; a branch (a resume
    from a checkpoint that is not its run's newest) one beside its parent run, holding a copy of its
    starting checkpoint and of the parent's log up to it, and naming its parent. Rank 0 writes; every rank
    gets the path."""
    run_dir = None
    if distributed.is_main():
        config = {"config": settings, "batch_plan": batch_plan}
        if resume is not None and resume.run_dir is not None:  # in place
            run_dir = resume.run_dir
            previous = read_json(run_dir / CONFIG_FILE)
            config |= {"wandb_id": previous.get("wandb_id", uuid.uuid4().hex[:16]),
                       "history": previous.get("history") or [{"from_epoch": 0, "settings": previous.get("config")}]}
        else:  # a new run, or a branch: beside its parent run
            parent = run_of(resume.checkpoint) if resume is not None else None
            run_dir = new_run_dir(parent.parent if parent else runs_dir, name)
            config |= {"wandb_id": uuid.uuid4().hex[:16], "history": [{"from_epoch": 0, "settings": settings}]}
        if resume is not None and resume.run_dir is None:  # a branch
            epochs = resume.state.epochs_done
            inherited = read_json(parent / CONFIG_FILE).get("history") if parent else None
            config["parent"] = {"run_dir": str(parent) if parent else None, "checkpoint": str(resume.checkpoint)}
            config["history"] = ([h for h in inherited if h["from_epoch"] < epochs] if inherited else
                                 [{"from_epoch": 0, "settings": read_settings(resume.checkpoint)}])
            shutil.copytree(resume.checkpoint, checkpoint_dir(run_dir, epochs))
            if parent:
                kept = [line for line in read_lines(parent / LOG_FILE) if json.loads(line)["epoch"] < epochs]
                (run_dir / LOG_FILE).write_text("".join(line + "\n" for line in kept))
        if resume is not None and resume.changes:
            config["history"].append({"from_epoch": resume.state.epochs_done, "changed": resume.changes})
        config["run_dir"] = str(run_dir)
        write_json(run_dir / CONFIG_FILE, config)
    return Path(distributed.broadcast_object(str(run_dir) if run_dir else None))


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


class RunFolderError(UserError, OSError):
    pass


@contextlib.contextmanager
def written(path: Path, undo: Callable[[], None]) -> Iterator[None]:
    """A write of the run folder that fails (a full disk) is undone and said in a sentence."""
    try:
        yield
    except OSError as e:
        with contextlib.suppress(OSError):
            undo()
        full = e.errno == errno.ENOSPC
        raise RunFolderError(f"{path} could not be written ({'the disk is full' if full else e.strerror}); the write "
                             "was undone and the run's checkpoints are intact: "
                             + ("free some space, then " if full else "") + "resume the run.") from None


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Through a temporary file and a rename: a crash leaves the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with written(path, undo=lambda: tmp.unlink(missing_ok=True)):
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)


def read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []


class RunLog:
    """Appends records to training_log.jsonl on rank 0, redraws reward_curve.png after every epoch record, and
    mirrors the records to W&B if enabled."""

    def __init__(self, run_dir: Path, use_wandb: bool, resume_epoch: int | None = None):
        self.path = Path(run_dir) / LOG_FILE
        self.wandb = None
        self.epochs: list[dict[str, Any]] = []  # the epoch records so far, for the reward curve
        if not distributed.is_main():
            return
        kept = [line for line in read_lines(self.path) if resume_epoch is not None and
                json.loads(line)["epoch"] < resume_epoch]  # a fresh log, or one without the epochs to run again
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)
        self.epochs = [r for r in map(json.loads, kept) if r["kind"] == "epoch"]
        if use_wandb:
            import wandb
            config = read_json(Path(run_dir) / CONFIG_FILE)
            self.wandb = wandb.init(project="fdfo", name=Path(run_dir).name, dir=str(run_dir), config=config["config"],
                                    resume="allow", id=config["wandb_id"])

    def write(self, record: dict[str, Any], images: dict[str, tuple[np.ndarray, str]] | None = None) -> None:
        """Append `record`; `images` (name → (uint8 array of height × width × 3, caption)) go to W&B only."""
        if not distributed.is_main():
            return
        size = self.path.stat().st_size if self.path.exists() else 0
        with written(self.path, undo=lambda: os.truncate(self.path, size)), open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")  # whole lines only: a failed append is cut off again
        if record["kind"] == "epoch":
            self.epochs.append(record)
            plot_reward_curve(self.epochs, self.path.parent / REWARD_CURVE)
        if self.wandb is not None:
            import wandb
            pictures = {}
            for name, (pixels, caption) in (images or {}).items():
                if pixels.dtype != np.uint8:  # W&B casts floats in [0, 1] straight to uint8: black pictures
                    raise TypeError(f"W&B images must be uint8 arrays, got {pixels.dtype}.")
                pictures[name] = wandb.Image(pixels, caption=caption)
            self.wandb.log({**{k: v for k, v in record.items() if k != "kind"}, **pictures})

    def write_epoch(self, record: dict[str, Any], steps: list[dict[str, Any]],
                    example: tuple[torch.Tensor, list[float], str]) -> None:
        """The epoch's step records and its own. `example` (two images in [0, 1] of one prompt, a pair's or a
        group's, their rewards and the prompt) goes to W&B side by side every WANDB_IMAGE_EVERY epochs."""
        for step in steps:
            self.write(step)
        images = None
        if record["epoch"] % WANDB_IMAGE_EVERY == 0:
            pair, (r0, r1), prompt = example
            side_by_side = to_uint8(torch.cat(list(pair), dim=2)).permute(1, 2, 0).numpy()
            images = {"pair": (side_by_side, f"R = {r0:.3f} | {r1:.3f}: {prompt}")}
        self.write(record, images)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def read_log(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / LOG_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def close_run_dir(run_dir: Path, new_folder: bool, epochs_run: int) -> bool:
    """After a crash or Ctrl-C: remove a new run folder that holds no finished epoch (rank 0). Whether it is kept."""
    if new_folder and epochs_run == 0:
        if distributed.is_main():
            shutil.rmtree(run_dir, ignore_errors=True)
        return False
    return True
