"""Command-line parsing shared by the entry points: defaults, then a TOML file, then tyro flags on top."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import TypeVar

import tyro

from fdfo.config import TINY_PRESET, ConfigError, TrainConfig, load_config_file, read_toml, with_overrides

T = TypeVar("T")


def parse(cls: type[T], args: list[str] | None = None) -> T:
    """Parse `args` (default: sys.argv) into `cls`. Layers, later ones winning: the paper's defaults;
    for training with `--pretrained-model tiny`, configs/tiny.toml (a CPU-sized demo); `--config FILE`;
    the flags."""
    args = sys.argv[1:] if args is None else list(args)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path, default=None)
    pre.add_argument("--pretrained-model", default=None)
    known, _ = pre.parse_known_args(args)
    try:
        default = cls()
        user_file = read_toml(known.config) if known.config else {}
        model = known.pretrained_model or user_file.get("pretrained_model", getattr(default, "pretrained_model", None))
        if cls is TrainConfig and model == "tiny":
            default = dataclasses.replace(load_config_file(cls, TINY_PRESET), config=None)
        if known.config:
            default = with_overrides(dataclasses.replace(default, config=known.config), user_file, str(known.config))
    except ConfigError as e:
        sys.exit(f"error: {e}")
    return tyro.cli(cls, args=args, default=default, description=cls.__doc__)


def parse_train_config(args: list[str] | None = None) -> TrainConfig:
    return parse(TrainConfig, args)
