"""Configuration: one frozen dataclass per recipe is the single source of truth.

Every field carries a one-line help text (``metadata["help"]``) that becomes its ``--help`` entry.
The CLI and YAML files are generated from the dataclass: ``--config file.yaml`` is read first,
``--field value`` flags override it, and unknown keys are errors that name the closest valid key.
Derived values are computed in one place: the dataclass's ``__post_init__`` validation.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A bad configuration value or key; the message says which field and what is allowed."""


def option(default: Any, help: str, *, choices: tuple | None = None) -> Any:
    """A dataclass field with its ``--help`` text (and optional allowed values)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


def check_choice(cfg: Any, name: str) -> None:
    """Raise ConfigError if field ``name`` holds a value outside its declared choices."""
    f = next(f for f in dataclasses.fields(cfg) if f.name == name)
    choices = f.metadata.get("choices")
    value = getattr(cfg, name)
    if choices and value not in choices:
        raise ConfigError(f"--{name.replace('_', '-')}: {value!r} is not one of {', '.join(map(str, choices))}")


def _base_type(annotation: Any) -> tuple[type, bool]:
    """(scalar type, optional?) for annotations like ``int``, ``str | None``, ``Optional[float]``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(annotation))
    return annotation, False


def _parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true/false, got {text!r}")


def coerce(cls: type, name: str, value: Any, where: str = "config") -> Any:
    """Convert a YAML/CLI value to the declared type of field ``name`` (clear error otherwise).

    Lists of strings (YAML ``[q_proj, v_proj]``) become comma-separated strings; YAML booleans
    are not numbers.
    """
    hints = typing.get_type_hints(cls)
    kind, optional = _base_type(hints[name])
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ConfigError(f"{where}: {name}: a value is required (type {kind.__name__})")
    if isinstance(value, bool) and kind in (int, float):
        raise ConfigError(f"{where}: {name}: expected a number, got the boolean {value}")
    if isinstance(value, (list, tuple)):
        if kind is str and all(isinstance(v, str) for v in value):
            return ",".join(value)
        raise ConfigError(f"{where}: {name}: expected a single {kind.__name__}, got a list {value!r}")
    try:
        if kind is bool:
            return _parse_bool(value)
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(f"{value} is not an integer")
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if kind is float:
            return float(value)
        if kind is str:
            return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {name}: cannot read {value!r} as {kind.__name__} ({exc})") from None
    return value


def _unknown_key_error(cls: type, key: str, where: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key.replace("-", "_"), names, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
    return ConfigError(f"{where}: unknown option '{key}' for {cls.__name__}{hint}")


def load_yaml(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"--config: file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value, got {type(data).__name__}")
    return data


def build_config(cls: type, values: dict, *, where: str = "config") -> Any:
    """Instantiate ``cls`` from a dict, coercing types and rejecting unknown keys."""
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in names:
            raise _unknown_key_error(cls, key, where)
        kwargs[name] = coerce(cls, name, value, where)
    return cls(**kwargs)


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--flag`` per dataclass field, with its help text, default and choices."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind, _ = _base_type(hints[f.name])
        meta = f.metadata
        help_text = meta.get("help", "")
        if meta.get("choices"):
            help_text += f" {{{', '.join(map(str, meta['choices']))}}}"
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text += f" (default: {default})"
        flag = "--" + f.name.replace("_", "-")
        metavar = {bool: "BOOL", int: "INT", float: "FLOAT"}.get(kind, "STR")
        # argparse keeps strings; coerce() converts them so YAML and CLI share one path
        parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, metavar=metavar,
                            help=help_text.replace("%", "%%"), **({"nargs": "?", "const": "true"} if kind is bool else {}))


def parse_args(cls: type, args: argparse.Namespace) -> Any:
    """Merge ``--config`` YAML with explicit flags (flags win) into a ``cls`` instance."""
    values: dict = {}
    config_path = getattr(args, "config", None)
    if config_path:
        values.update(load_yaml(config_path))
        where = str(config_path)
    else:
        where = "config"
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "command", "func")}
    values.update(flags)
    return build_config(cls, values, where=where)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_yaml(cfg: Any, path: str | Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
