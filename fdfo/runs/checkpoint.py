"""Checkpoints: the PEFT adapter folder, the training state and the run's settings, written atomically; finding,
checking and loading one to resume.

A checkpoint folder `epoch-<7 digits>/` holds `adapter_config.json` and `adapter_model.safetensors` (PEFT's
format, as the published checkpoints), `training_state.pt` (tensors and numbers only: it loads with
`weights_only=True`, so a checkpoint from elsewhere cannot run code), `settings.json` (the run's
resolved settings, the defaults of a resume), and one folder per other copy of the LoRA weights the run keeps,
same format, by name (`ema/` with `--ema-decay`; a method's own, e.g. DiffusionNFT's `old_policy/`).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors import SafetensorError

from fdfo.errors import UserError
from fdfo.model.lora import load_lora_weights, save_lora, save_lora_copy
from fdfo.model.lora_folder import ADAPTER_FILES, LoraLoadError, check_lora_folder

STATE_FILE = "training_state.pt"
SETTINGS_FILE = "settings.json"
STATE_FORMAT = 2  # 1: pickled random states (fdfo before 2026-11-24), not loadable safely


class CheckpointError(UserError, FileNotFoundError):
    pass


@dataclass
class TrainingState:
    """What exact resume needs besides the LoRA weights. Every draw of a run derives from (seed, epoch,
    index), so no random-number state is kept."""

    epochs_done: int
    optimizer_steps: int
    total_pairs: int  # pairs per epoch over all ranks: the prompt stream and the noise of each pair depend on it
    optimizer: dict[str, Any]  # AdamW's state_dict
    grad_scaler: dict[str, Any]  # the fp16 recipe's GradScaler state_dict; empty without it
    ema_steps: int = 0  # updates of the EMA of the LoRA weights (in the checkpoint's ema/ folder); 0 without one
    forward_passes: int | None = None  # samples through the transformer on all ranks so far; None: not counted (older fdfo)
    backward_passes: int | None = None  # of them, back-propagated; None: not counted (older fdfo)
    prompts_sha256: str | None = None  # of the training prompts (harness/prompts.py); None: not recorded (older fdfo)


def checkpoint_dir(run_dir: Path, epochs_done: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"epoch-{epochs_done:07d}"


def run_checkpoints(run_dir: Path, required: str = STATE_FILE) -> list[Path]:
    """The run's complete checkpoints (holding `required`), oldest first."""
    return sorted(p for p in (Path(run_dir) / "checkpoints").glob("epoch-*") if (p / required).is_file())


def save_checkpoint(run_dir: Path, lora: PeftModel, state: TrainingState, settings: dict[str, Any],
                    copies: dict[str, list[torch.Tensor]] | None = None) -> Path:
    """Write `epoch-<7 digits>/` through a temporary folder and a rename: a crash never leaves a half checkpoint.
    `copies`: other weights of the LoRA (one tensor per trainable parameter), each saved as the folder of its name."""
    final = checkpoint_dir(run_dir, state.epochs_done)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        save_lora(lora, tmp)
        for name, weights in (copies or {}).items():
            save_lora_copy(lora, weights, tmp / name)
        torch.save({"format": STATE_FORMAT, **dataclasses.asdict(state)}, tmp / STATE_FILE)
        (tmp / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    except (OSError, RuntimeError, SafetensorError) as e:  # torch.save and safetensors report a failed write so
        shutil.rmtree(tmp, ignore_errors=True)
        raise unwritten(final, e) from None
    if final.exists():  # rewriting the same epoch (a re-run): swap, then drop the old one
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    return final


def unwritten(checkpoint: Path, error: Exception) -> CheckpointError:
    """The error for a checkpoint that could not be written (its temporary folder already removed)."""
    free = shutil.disk_usage(checkpoint.parent).free if checkpoint.parent.exists() else 0
    full = getattr(error, "errno", None) == errno.ENOSPC or "No space left" in str(error) or free < 2**20
    why = (f"the disk is full ({free / 2**20:.0f} MiB free)" if full else
           str(error).splitlines()[0] if str(error) else type(error).__name__)
    return CheckpointError(f"The checkpoint {checkpoint} could not be written: {why}. Its temporary folder was "
                           f"removed and the run's earlier checkpoints are intact; "
                           + ("free some space, then " if full else "") + "resume the run from its last checkpoint.")


def recover_interrupted_writes(run_dir: Path) -> bool:
    """Tidy what a killed save_checkpoint left: drop half-written temporary folders, and put back a checkpoint
    that was moved aside for a rewrite of the same epoch but not yet replaced (whether one was)."""
    folder = Path(run_dir) / "checkpoints"
    restored = False
    for leftover in folder.glob(".epoch-*.*-*"):
        match = re.fullmatch(r"\.(epoch-\d{7})\.(tmp|old)-\d+", leftover.name)
        if match and match.group(2) == "old" and not (folder / match.group(1)).exists():
            os.replace(leftover, folder / match.group(1))
            restored = True
        elif match:
            shutil.rmtree(leftover)
    return restored


def published_checkpoints(run_dir: Path, required: str) -> list[Path]:
    """The checkpoints of a run folder in the published layout, `<run>/epoch-*/` (no checkpoints/), oldest first."""
    return sorted(p for p in Path(run_dir).glob("epoch-*") if (p / required).is_file())


def find_checkpoint(path: Path, required: str = STATE_FILE) -> Path:
    """`path` itself if it is a checkpoint folder, else the newest complete checkpoint of the run folder `path`
    (ours, `<run>/checkpoints/epoch-*`, or the published layout, `<run>/epoch-*`).

    Complete = holding `required` (the training state to resume; the adapter weights to generate).
    """
    path = Path(path)
    if (path / required).is_file():
        return path
    candidates = run_checkpoints(path, required) or published_checkpoints(path, required)
    if not candidates:
        raise CheckpointError(
            f"{path}: no checkpoint there (expected {path}/{required}, {path}/checkpoints/epoch-<7 digits>/{required} "
            f"or {path}/epoch-<7 digits>/{required}). Pass a checkpoint folder or a run folder that has one."
        )
    return candidates[-1]


def read_settings(checkpoint: Path) -> dict[str, Any]:
    """The run's settings when `checkpoint` was written."""
    try:
        return json.loads((Path(checkpoint) / SETTINGS_FILE).read_text())
    except (OSError, ValueError) as e:
        raise damaged(checkpoint, SETTINGS_FILE, e) from None


def load_state(checkpoint: Path) -> TrainingState:
    """The training state of `checkpoint`, checked: a missing, damaged or foreign file is refused with a sentence."""
    try:
        data = torch.load(Path(checkpoint) / STATE_FILE, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" not in str(e):  # a truncated or foreign file, not a pickle that names code
            raise damaged(checkpoint, STATE_FILE, e) from None
        raise CheckpointError(f"{Path(checkpoint) / STATE_FILE} holds Python objects besides tensors and numbers (a "
                              "checkpoint of an fdfo older than 2026-11-24, or not ours); loading it could run code, so "
                              "it is refused. Its LoRA still loads in generate.py and metrics.py.") from None
    except Exception as e:  # torch raises many kinds for a truncated, empty or foreign file
        raise damaged(checkpoint, STATE_FILE, e) from None
    if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{Path(checkpoint) / STATE_FILE} is not a training state of this fdfo (format "
                              f"{data.get('format') if isinstance(data, dict) else '?'}, expected {STATE_FORMAT}); "
                              "its LoRA still loads in generate.py and metrics.py.")
    data.pop("format")
    return TrainingState(**data)


def check_adapter(checkpoint: Path) -> None:
    """The LoRA of `checkpoint` is whole and finite (a truncated, foreign or diverged one is refused with a
    sentence, before the base model loads)."""
    try:
        check_lora_folder(checkpoint)
        load_lora_weights(checkpoint)
    except LoraLoadError as e:
        raise damaged(checkpoint, ADAPTER_FILES[1], e) from None


def damaged(checkpoint: Path, name: str, error: Exception) -> CheckpointError:
    """The error for a file of `checkpoint` that cannot be read, pointing at the checkpoint before it."""
    checkpoint = Path(checkpoint)
    earlier = [p for p in run_checkpoints(checkpoint.parent.parent) if p.name < checkpoint.name]
    hint = (f"resume from the previous checkpoint, {earlier[-1]}" if earlier else "there is no earlier checkpoint in "
            "this run to resume from")
    detail = str(error).splitlines()[0] if str(error) else type(error).__name__
    return CheckpointError(f"{checkpoint / name} cannot be read ({detail}); {hint}.")
