"""Checkpoints: the PEFT adapter folder plus a training state, written atomically; finding one to resume."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel

from fdfo.lora import save_lora

STATE_FILE = "training_state.pt"


class CheckpointError(FileNotFoundError):
    pass


def checkpoint_dir(run_dir: Path, epochs_done: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"epoch-{epochs_done:07d}"


def rng_states() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(run_dir: Path, epochs_done: int, lora: PeftModel, state: dict[str, Any]) -> Path:
    """Write `epoch-<7 digits>/` through a temporary folder and a rename: a crash never leaves a half checkpoint."""
    final = checkpoint_dir(run_dir, epochs_done)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_lora(lora, tmp)
    torch.save({**state, "epochs_done": epochs_done, "rng": rng_states()}, tmp / STATE_FILE)
    if final.exists():  # rewriting the same epoch (a re-run): swap, then drop the old one
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    return final


def find_checkpoint(path: Path, required: str = STATE_FILE) -> Path:
    """`path` itself if it is a checkpoint folder, else the newest complete checkpoint of the run folder `path`.

    Complete = holding `required` (the training state to resume; the adapter weights to generate).
    """
    path = Path(path)
    if (path / required).is_file():
        return path
    candidates = sorted(p for p in (path / "checkpoints").glob("epoch-*") if (p / required).is_file())
    if not candidates:
        raise CheckpointError(
            f"{path}: no checkpoint there (expected {path}/{required} or "
            f"{path}/checkpoints/epoch-<7 digits>/{required}). Pass a checkpoint folder or a run folder that has one."
        )
    return candidates[-1]


def load_state(checkpoint: Path) -> dict[str, Any]:
    return torch.load(Path(checkpoint) / STATE_FILE, map_location="cpu", weights_only=False)
