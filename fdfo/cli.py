"""Command-line parsing shared by the entry points: an optional TOML file, then tyro flags on top."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TypeVar

import tyro

from fdfo.config import ConfigError, load_config_file

T = TypeVar("T")


def parse(cls: type[T], args: list[str] | None = None) -> T:
    """Parse `args` (default: sys.argv) into `cls`; `--config FILE` sets the defaults the flags override."""
    args = sys.argv[1:] if args is None else list(args)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path, default=None)
    known, _ = pre.parse_known_args(args)
    try:
        default = load_config_file(cls, known.config) if known.config else cls()
    except ConfigError as e:
        sys.exit(f"error: {e}")
    return tyro.cli(cls, args=args, default=default, description=cls.__doc__)
