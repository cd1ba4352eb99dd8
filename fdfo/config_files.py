"""TOML files of settings: a file's values checked against the fields' types and applied to a configuration."""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from fdfo.config import ConfigError


def with_overrides(instance: Any, overrides: dict[str, Any], where: str) -> Any:
    """`instance` with the fields named in `overrides` replaced; nested dataclasses take nested tables.
    Every value is checked against the field's type, so a typo fails here, before any model loads."""
    fields = {f.name: f for f in dataclasses.fields(instance)}
    types = typing.get_type_hints(type(instance))
    changes = {}
    for key, value in overrides.items():
        name = key.replace("-", "_")
        if name not in fields:
            raise ConfigError(f"{where}: unknown setting `{key}`; valid settings are: {', '.join(sorted(fields))}.")
        current = getattr(instance, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: `{key}` is a section; write it as a [{key}] table.")
            changes[name] = with_overrides(current, value, f"{where} [{key}]")
        else:
            changes[name] = typed_value(value, types[name], f"{where}: `{key}`")
    return dataclasses.replace(instance, **changes)


def typed_value(value: Any, annotation: Any, what: str) -> Any:
    """A TOML value as a field of type `annotation` holds it (a Path, a tuple…), or a ConfigError naming `what`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if value is None and type(None) in args:  # JSON's null (a resumed run's settings); TOML has none
        return None
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{what} must be one of {', '.join(repr(a) for a in args)}; got {value!r}.")
    if origin in (typing.Union, types.UnionType):
        for arm in (a for a in args if a is not type(None)):
            try:
                return typed_value(value, arm, what)
            except ConfigError:
                pass
        raise ConfigError(f"{what} must be {' or '.join(describe(a) for a in args if a is not type(None))}; "
                          f"got {value!r}.")
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{what} must be a list, e.g. [{describe(args[0])}, ...]; got {value!r}.")
        return tuple(typed_value(v, args[0], what) for v in value)
    ok = {bool: isinstance(value, bool), int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool),
          str: isinstance(value, str), Path: isinstance(value, str)}[annotation]
    if not ok:
        raise ConfigError(f"{what} must be {describe(annotation)}; got {value!r}.")
    return annotation(value) if annotation in (float, Path) else value


def describe(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path (a string)"
            }.get(annotation, str(annotation))


def read_toml(path: Path) -> dict[str, Any]:
    if not Path(path).is_file():
        raise ConfigError(f"Config file {path} does not exist; the paper's runs are in configs/ (e.g. configs/pickscore.toml).")
    with open(path, "rb") as f:
        try:
            return tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"Config file {path} is not valid TOML: {e}") from None


def load_config_file(cls: type, path: Path, base: Any = None) -> Any:
    """`base` (default: `cls()`) with the settings of a TOML file applied."""
    base = cls() if base is None else base
    return with_overrides(dataclasses.replace(base, config=Path(path)), read_toml(path), str(path))
