"""Resuming a run: which checkpoint, whether to continue in place or branch, which settings may change.

Rules (README, "Resume"): a resume starts from the settings saved with the checkpoint, and flags given on
the command line change them; the changes are applied (the optimiser's too) and recorded in the run's
history. The base model, the LoRA's shape, the seed and the pairs per epoch cannot change. Resuming from a
checkpoint that is not its run's newest continues in a new run folder that records its parent, so two
branches never mix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fdfo.runs.checkpoint import (TrainingState, check_adapter, find_checkpoint, load_state, read_settings,
                             recover_interrupted_writes, run_checkpoints)
from fdfo import distributed
from fdfo.config import ConfigError
from fdfo.runs import lock

# Settings a resume cannot change, and why.
FIXED = {
    "pretrained_model": "the LoRA belongs to its base model",
    "lora_rank": "the LoRA's shape cannot change",
    "lora_alpha": "the LoRA's scale is part of its weights",
    "seed": "the prompts and the noise of every epoch derive from it",
    "method": "the optimiser's state (and DiffusionNFT's old policy) belong to the method that trained",
}
# Settings that are not the training's own: a resume takes them from the command line, and does not record them.
NOT_RECORDED = ("config", "resume_from", "dry_run", "runs_dir", "run_name", "num_epochs", "log_wandb",
                "accept_changed_prompts")


@dataclass
class Resume:
    checkpoint: Path
    state: TrainingState
    run_dir: Path | None  # the run continued in place; None: a branch, continued in a new run folder
    changes: dict[str, list[Any]]  # dotted setting name → [value in the checkpoint, value now]


def run_of(path: Path) -> Path | None:
    """The run folder that `path` (a run folder or one of its checkpoints) belongs to, if any."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        return path
    return path.parent.parent if path.parent.name == "checkpoints" else None


def claim_run(resume: Resume, dry_run: bool) -> bool:
    """Lock the run that `resume` continues in place, for the rest of this process's run, and tidy what a killed
    checkpoint write left there: only the lock's holder may. A branch's parent (perhaps training now) is only
    read; a dry run only checks that the run is free. Whether the tidying put a checkpoint back."""
    if resume.run_dir is None:
        return False
    lock.hold(resume.run_dir)
    if dry_run:
        lock.release()
        return False
    restored = recover_interrupted_writes(resume.run_dir) if distributed.is_main() else False
    return distributed.broadcast_object(restored)


# What a run of an older fdfo did where a setting added since has another default: it resumes doing the same.
OLDER_VALUES = {"nft.solver": "euler", "nft.integer_timesteps": False}  # before DiffusionNFT's own solver (2026-12-02)


def resumed_settings(resume_from: Path) -> tuple[Path, dict[str, Any]]:
    """(checkpoint, its run's settings), the defaults of a resumed run's configuration."""
    checkpoint = find_checkpoint(resume_from)
    settings = with_older_values(read_settings(checkpoint))
    return checkpoint, {k: v for k, v in settings.items()
                        if k not in ("config", "resume_from", "dry_run", "accept_changed_prompts")}


def with_older_values(settings: dict[str, Any]) -> dict[str, Any]:
    """`settings` with OLDER_VALUES where an older fdfo wrote none."""
    settings = {k: dict(v) if isinstance(v, dict) else v for k, v in settings.items()}
    for name, value in OLDER_VALUES.items():
        section, key = name.split(".")
        settings.setdefault(section, {}).setdefault(key, value)
    return settings


def plan_resume(resume_from: Path, settings: dict[str, Any], total_pairs: int, prompts_sha256: str) -> Resume:
    """Check everything a resume needs (files readable, fixed settings unchanged, epochs left to train, the same
    prompts) before anything is written."""
    checkpoint = find_checkpoint(resume_from)
    state = load_state(checkpoint)
    check_adapter(checkpoint)
    if settings["num_epochs"] <= state.epochs_done:
        raise ConfigError(f"{checkpoint} has {state.epochs_done} epochs done: --num-epochs {settings['num_epochs']} "
                          f"leaves none to train. Give --num-epochs more than {state.epochs_done}.")
    changes = setting_changes(with_older_values(read_settings(checkpoint)), settings)
    if state.prompts_sha256 not in (None, prompts_sha256):
        if not settings["accept_changed_prompts"]:
            raise ConfigError(f"The prompts of {settings['prompt_file']} differ from those {checkpoint} trained on "
                              f"(SHA-256 {prompts_sha256[:12]}…, the checkpoint's {state.prompts_sha256[:12]}…): the "
                              "prompt of every later pair would change. Restore the file, or resume with "
                              "--accept-changed-prompts to train on the new prompts (recorded in config.json).")
        changes["prompts_sha256"] = [state.prompts_sha256, prompts_sha256]
    for name, reason in FIXED.items():
        if name in changes:
            old, new = changes[name]
            raise ConfigError(f"{flag(name)} {new} differs from the checkpoint's {old}: {reason}. Resume with "
                              f"{flag(name)} {old}, or start a new run.")
    if total_pairs != state.total_pairs:
        raise ConfigError(f"This resume samples {total_pairs} pairs per epoch, the checkpoint's run {state.total_pairs}: "
                          "the prompt stream and the noise of every pair depend on it. Resume with "
                          f"--total-pairs-per-epoch {state.total_pairs}, or start a new run.")
    run_dir = run_of(checkpoint)
    newest = run_dir is not None and run_checkpoints(run_dir)[-1] == checkpoint
    return Resume(checkpoint, state, run_dir if newest else None,
                  {k: v for k, v in changes.items() if k.split(".")[0] not in NOT_RECORDED})


def setting_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, list[Any]]:
    """Dotted names of the settings whose values differ, with [old, new]. A setting that an older fdfo did not
    have is not a change (it has the value the resumed run starts from); a run from before --method was FDFO."""
    flat_old, flat_new = {"method": "fdfo", **flatten(old)}, flatten(new)
    return {k: [flat_old[k], v] for k, v in flat_new.items() if k in flat_old and flat_old[k] != v}


def flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")
