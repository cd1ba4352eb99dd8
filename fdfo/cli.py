"""Command-line parsing shared by the entry points: defaults, then a TOML file, then tyro flags on top."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, Callable, TypeVar

import tyro

from fdfo import distributed, signals
from fdfo.config import TINY_MODELS, TINY_PRESET, ConfigError, TrainConfig, method_recipe
from fdfo.config_files import load_config_file, read_toml, with_overrides
from fdfo.errors import UserError
from fdfo.runs.resume import resumed_settings

T = TypeVar("T")


def parse(cls: type[T], args: list[str] | None = None) -> T:
    """Parse `args` (default: sys.argv) into `cls`. Layers, later ones winning: the paper's defaults; for
    training with `--method flow_grpo` or `diffusion_nft`, that method's published recipe (configs/); with
    `--pretrained-model tiny`, configs/tiny.toml (a CPU-sized demo); when resuming, the settings saved with
    the checkpoint; `--config FILE`; the flags."""
    args = sys.argv[1:] if args is None else list(args)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path, default=None)
    pre.add_argument("--pretrained-model", default=None)
    pre.add_argument("--resume-from", type=Path, default=None)
    pre.add_argument("--method", default=None)
    known, _ = pre.parse_known_args(args)
    default = cls()
    user_file = read_toml(known.config) if known.config else {}
    resume_from = known.resume_from or user_file.get("resume_from")
    checkpoint, resumed = resumed_settings(resume_from) if cls is TrainConfig and resume_from else (None, {})
    model = (known.pretrained_model or user_file.get("pretrained_model") or resumed.get("pretrained_model")
             or getattr(default, "pretrained_model", None))
    method = known.method or user_file.get("method") or resumed.get("method")
    recipe = method_recipe(method) if cls is TrainConfig else None
    if recipe is not None:
        default = dataclasses.replace(load_config_file(cls, recipe, default), config=None)
    if cls is TrainConfig and model in TINY_MODELS:
        default = dataclasses.replace(load_config_file(cls, TINY_PRESET, default), config=None)
    if resumed:
        default = with_overrides(default, resumed, f"{checkpoint}/settings.json")
    if known.config:
        default = with_overrides(dataclasses.replace(default, config=known.config), user_file, str(known.config))
    if cls is TrainConfig:
        refuse_foreign_settings(method or "fdfo", args, user_file)
    return tyro.cli(cls, args=args, default=default, description=cls.__doc__)


def refuse_foreign_settings(method: str, args: list[str], user_file: dict[str, Any]) -> None:
    """A setting that only another method reads (e.g. --grpo.group-size with --method fdfo), given on the command
    line or in --config's file, is refused: it would do nothing. Recipes and checkpoints are not the user's words."""
    from fdfo.methods import METHODS  # the methods import this module's neighbours
    flags = [a.lstrip("-").partition("=")[0].replace("-", "_") for a in args if a.startswith("--")]
    given = [(name, f"--{name.replace('_', '-')}") for name in flags]
    given += [(name, f"`{name}` in {user_file_name(args)}") for name in flat_names(user_file)]
    for name, where in given:
        owners = [m for m, cls in METHODS.items() if any(name == own or name.startswith(own + ".")
                                                         for own in cls.settings)]
        if owners and method not in owners:
            raise ConfigError(f"{where} is a setting of --method {' or '.join(owners)}; this run is --method "
                              f"{method}, where it would do nothing. Leave it out, or run --method {owners[0]}.")


def flat_names(table: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted names of a TOML table's settings (`[grpo] group_size` → grpo.group_size)."""
    names = []
    for key, value in table.items():
        name = prefix + key.replace("-", "_")
        names += flat_names(value, name + ".") if isinstance(value, dict) else [name]
    return names


def user_file_name(args: list[str]) -> str:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default="the --config file")
    return str(pre.parse_known_args(args)[0].config)


def parse_train_config(args: list[str] | None = None) -> TrainConfig:
    return parse(TrainConfig, args)


def main(entry: Callable[[T], Any], cls: type[T], args: list[str] | None = None) -> None:
    """The body of an entry point: parse the command line into `cls` and call `entry` with it.

    A UserError (bad input, a missing or damaged file) prints as one line and exits with 2; FDFO_DEBUG=1
    shows its traceback instead. Ctrl-C (or SIGTERM, e.g. from a scheduler) exits with 130 (143) once
    `entry` has said where things stand (fdfo/signals.py: a training run stops at its next safe point).
    """
    signals.install()
    try:
        entry(parse(cls, args))
        # Leave the process group together: a rank that exits while another still talks to it can abort
        # the other (gloo: "terminate called without an active exception").
        distributed.barrier()
        distributed.shutdown()
        signals.check()  # a stop asked for as the work ended: still the exit code a scheduler expects
    except UserError as e:
        if os.environ.get("FDFO_DEBUG"):
            raise
        if distributed.is_main():
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(signals.exit_code())
