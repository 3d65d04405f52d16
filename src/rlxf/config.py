"""Configuration: one frozen dataclass per recipe is the single source of truth.

Every field carries a one-line help text (``metadata["help"]``) that becomes its ``--help`` entry.
The CLI and YAML files are generated from the dataclass: ``--config file.yaml`` is read first,
``--field value`` flags override it, and unknown keys are errors that name the closest valid key.
Derived values are computed in one place: the dataclass's ``__post_init__`` validation.

Every numeric field declares its allowed values once, as :class:`Bounds` in ``metadata["bounds"]``
(a subclass that overrides a field's default inherits them). :func:`check_numbers` checks every
numeric field of a config against them (finite, in range) and is the first thing each config's
``__post_init__`` does, so the CLI, YAML files and the Python API share one check that runs before
any model or data loads. Its :class:`OptionRangeError` names each option as the user wrote it
(``--lr`` on the command line, ``lr`` in a YAML file or in Python).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import math
import types
import typing
from pathlib import Path
from typing import Any, Callable


class ConfigError(ValueError):
    """A bad configuration value or key; the message says which field and what is allowed."""


@dataclasses.dataclass(frozen=True)
class Bounds:
    """The allowed values of a numeric option: a finite number in an interval, plus ``special``
    values outside it that have their own meaning (e.g. ``-1`` = derive from another option).

    ``low``/``high`` of None leave that side open-ended; ``low_open``/``high_open`` exclude the end.
    NaN and ±inf are never allowed: no option of rlxf means anything by them.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    special: tuple = ()

    def allows(self, value: float) -> bool:
        if value in self.special:
            return True
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.high_open and value == self.high))

    def describe(self, kind: type) -> str:
        """``"a finite number > 0"``, ``"an integer >= 1"``, ``"a finite number in [0, 1)"`` ..."""
        noun = "an integer" if kind is int else "a finite number"
        if self.low is not None and self.high is not None:
            text = (f"{noun} in {'(' if self.low_open else '['}{_num(self.low)}, "
                    f"{_num(self.high)}{')' if self.high_open else ']'}")
        elif self.low is not None:
            text = f"{noun} {'>' if self.low_open else '>='} {_num(self.low)}"
        elif self.high is not None:
            text = f"{noun} {'<' if self.high_open else '<='} {_num(self.high)}"
        else:
            text = noun
        return text + "".join(f", or {_num(v)}" for v in self.special)


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


POSITIVE = Bounds(low=0, low_open=True)          # > 0: learning rates, scales that must not vanish
NON_NEGATIVE = Bounds(low=0)                     # >= 0: counts where 0 means "none"/"off", weights
AT_LEAST_ONE = Bounds(low=1)                     # >= 1: sizes, counts, intervals used as divisors
UNIT = Bounds(low=0, high=1)                     # [0, 1]: fractions, probabilities
SEED = Bounds(low=0, high=2**32 - 1)             # the 32-bit seeds every RNG rlxf feeds accepts


def between(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Bounds:
    """Bounds of an interval, e.g. ``between(0, 1, high_open=True)`` is [0, 1)."""
    return Bounds(low=low, high=high, low_open=low_open, high_open=high_open)


def option(default: Any, help: str, *, choices: tuple | None = None, bounds: Bounds | None = None,
           python_callable: bool = False, flag: str | None = None, block: str | None = None) -> Any:
    """A dataclass field with its ``--help`` text (and optional allowed values or numeric bounds).

    ``python_callable``: a string option that the Python API may also set to a function (``reward``);
    :func:`to_dict` records such a function as ``module:name``. A ``dict`` default makes a
    keyword-arguments option: ``flag`` names its repeatable ``--flag key=value`` on the command line
    and YAML gives it as a mapping. ``block``: the dict field that a YAML mapping
    ``{name: ..., args: {...}}`` given for this option fills with its ``args``."""
    metadata = {"help": help, "choices": choices, "bounds": bounds, "python_callable": python_callable,
                "flag": flag, "block": block}
    if isinstance(default, dict):
        return dataclasses.field(default_factory=lambda: dict(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


class OptionRangeError(ConfigError):
    """Numeric options outside their :class:`Bounds`; ``problems`` holds ``(field, value, allowed)``.

    The message names each option by ``spell(field)``: by default the field name (the Python
    API's spelling); :func:`build_config` re-raises it with the user's own (``--lr`` on the
    command line)."""

    def __init__(self, problems: list[tuple[str, Any, str]], spell: Callable[[str], str] = str):
        self.problems = problems
        super().__init__(self.spelled(spell))

    def __reduce__(self):  # pickled (torchrun sends errors between processes) as its message
        return ConfigError, (str(self),)

    def spelled(self, spell: Callable[[str], str]) -> str:
        lines = [f"{spell(name)} {value!r} is out of range: it must be {allowed}"
                 for name, value, allowed in self.problems]
        if len(lines) == 1:
            return lines[0]
        return f"{len(lines)} options are out of range:\n" + "\n".join(f"  {line}" for line in lines)


@functools.lru_cache(maxsize=None)
def numeric_fields(cls: type) -> tuple[tuple[str, type, Bounds | None, str], ...]:
    """``(name, int or float, bounds, help)`` of every numeric field of the config class ``cls``.

    A field's bounds come from the nearest class in the MRO that declares them, so an override
    that only changes the default keeps the range."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        kind, _ = _base_type(hints[f.name])
        if kind not in (int, float):
            continue
        bounds = next((base.__dataclass_fields__[f.name].metadata.get("bounds") for base in cls.__mro__
                       if f.name in getattr(base, "__dataclass_fields__", {})
                       and base.__dataclass_fields__[f.name].metadata.get("bounds") is not None), None)
        out.append((f.name, kind, bounds, f.metadata.get("help", "")))
    return tuple(out)


def check_numbers(cfg: Any) -> None:
    """Raise :class:`OptionRangeError` listing every numeric field of ``cfg`` that is not finite
    or lies outside its bounds (None, an unset optional, is skipped)."""
    problems = []
    for name, kind, bounds, help_text in numeric_fields(type(cfg)):
        value = getattr(cfg, name)
        if value is None or isinstance(value, bool):
            continue
        bounds = bounds or Bounds()
        if not bounds.allows(value):
            problems.append((name, value, f"{bounds.describe(kind)} ({help_text})"))
    if problems:
        raise OptionRangeError(problems)


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
    if kind is dict:
        return keyword_arguments(value, f"{where}: {name}")
    if callable(value) and cls.__dataclass_fields__[name].metadata.get("python_callable"):
        return value   # a Python function or class given in the API, e.g. reward=my_reward, env=MyEnv
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
    except (TypeError, ValueError, OverflowError) as exc:
        raise ConfigError(f"{where}: {name}: cannot read {value!r} as {kind.__name__} ({exc})") from None
    return value


def keyword_arguments(value: Any, where: str) -> dict:
    """Keyword arguments from a YAML mapping or from ``key=value`` texts (``--reward-arg``, repeatable).

    A value is read as YAML (``3`` an int, ``0.5`` a float, ``true`` a bool, ``[1, 2]`` a list, anything
    else the text); keys must be Python identifiers, since they become keyword arguments."""
    import yaml

    if value is None:
        return {}
    if isinstance(value, str):
        value = [value]
    if isinstance(value, (list, tuple)):
        pairs = {}
        for item in value:
            key, sep, text = str(item).partition("=")
            if not sep:
                raise ConfigError(f"{where}: {item!r} is not key=value (e.g. --reward-arg threshold=0.5)")
            try:
                pairs[key.strip()] = yaml.safe_load(text) if text.strip() else ""
            except yaml.YAMLError:
                pairs[key.strip()] = text
        value = pairs
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping of name: value, got {type(value).__name__} {value!r}")
    bad = [k for k in value if not (isinstance(k, str) and k.isidentifier())]
    if bad:
        raise ConfigError(f"{where}: argument names must be Python identifiers (letters, digits, _), "
                          f"got {', '.join(map(repr, bad))}")
    return dict(value)


def _expand_blocks(cls: type, values: dict, where: str) -> dict:
    """``reward: {name: SPEC, args: {...}}`` in YAML → ``reward: SPEC`` plus ``reward_args: {...}``."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = dict(values)
    for key, value in values.items():
        field = fields.get(str(key).replace("-", "_"))
        block = field.metadata.get("block") if field else None
        if not block or not isinstance(value, dict):
            continue
        unknown = set(value) - {"name", "args"}
        if unknown or "name" not in value:
            raise ConfigError(f"{where}: {key}: a block takes 'name' (required) and 'args' (a mapping), "
                              f"got keys {', '.join(map(str, value))}")
        if any(str(k).replace("-", "_") == block for k in values):
            raise ConfigError(f"{where}: give the arguments of {key} once: in its 'args' or in {block}, not both")
        out[key] = value["name"]
        out[block] = value.get("args") or {}
    return out


def _unknown_key_error(cls: type, key: str, where: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key.replace("-", "_"), names, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
    return ConfigError(f"{where}: unknown option '{key}' for {cls.__name__}{hint}")


def load_yaml(path: str | Path) -> dict:
    import yaml

    from rlxf.data.loading import decode_utf8

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"--config: file not found: {path}")
    text = decode_utf8(path.read_bytes(), str(path), error=ConfigError)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value, got {type(data).__name__}")
    return data


def build_config(cls: type, values: dict, *, where: str = "config",
                 spelling: dict[str, str] | None = None) -> Any:
    """Instantiate ``cls`` from a dict, coercing types and rejecting unknown keys.

    ``spelling`` maps field names to how the user wrote them (``{"lr": "--lr"}``); an
    :class:`OptionRangeError` names options that way, and the others by the key given in ``values``.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs, written = {}, {}
    for key, value in _expand_blocks(cls, values, where).items():
        name = key.replace("-", "_")
        if name not in names:
            raise _unknown_key_error(cls, key, where)
        kwargs[name] = coerce(cls, name, value, where)
        written[name] = key
    written.update(spelling or {})
    try:
        return cls(**kwargs)
    except OptionRangeError as exc:
        raise OptionRangeError(exc.problems, spell=lambda name: written.get(name, name)) from None


def add_arguments(parser: argparse.ArgumentParser, cls: type, *, groups: dict[str, str] | None = None,
                  full: bool = True) -> None:
    """One ``--flag`` per dataclass field, with its help text, default and choices or allowed range.

    groups: field -> group title; with ``full`` False a grouped field is parsed but not listed, and
    the help ends with the groups ``--help-all`` shows."""
    hints = typing.get_type_hints(cls)
    ranges = {name: (kind, bounds) for name, kind, bounds, _ in numeric_fields(cls) if bounds is not None}
    groups = groups or {}
    sections: dict[str, argparse._ArgumentGroup] = {}
    folded: dict[str, int] = {}
    for f in dataclasses.fields(cls):
        kind, _ = _base_type(hints[f.name])
        meta = f.metadata
        help_text = meta.get("help", "")
        if meta.get("choices"):
            help_text += f" {{{', '.join(map(str, meta['choices']))}}}"
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text += f" (default: {default}"
        help_text += f"; allowed: {ranges[f.name][1].describe(ranges[f.name][0])})" if f.name in ranges else ")"
        flag = cli_flag(f)
        metavar = {bool: "BOOL", int: "INT", float: "FLOAT", dict: "KEY=VALUE"}.get(kind, "STR")
        group = groups.get(f.name)
        target = parser
        if group and full:
            target = sections.setdefault(group, parser.add_argument_group(group))
        elif group:
            folded[group] = folded.get(group, 0) + 1
        # argparse keeps strings; coerce() converts them so YAML and CLI share one path
        target.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, metavar=metavar,
                            help=argparse.SUPPRESS if group and not full else help_text.replace("%", "%%"),
                            **({"nargs": "?", "const": "true"} if kind is bool else
                               {"action": "append"} if kind is dict else {}))
    if folded:
        listing = "; ".join(f"{name} ({n})" for name, n in folded.items())
        parser.epilog = (f"{sum(folded.values())} more options, in groups: {listing}. "
                         f"--help-all lists every option.")


def cli_flag(f: dataclasses.Field) -> str:
    """The command-line spelling of a config field: ``--reward-arg`` for ``reward_args``, else ``--name``."""
    return "--" + (f.metadata.get("flag") or f.name).replace("_", "-")


def parse_args(cls: type, args: argparse.Namespace) -> Any:
    """Merge ``--config`` YAML with explicit flags (flags win) into a ``cls`` instance."""
    values: dict = {}
    spelling: dict[str, str] = {}
    config_path = getattr(args, "config", None)
    if config_path:
        from_file = load_yaml(config_path)
        values.update(from_file)
        spelling.update({str(k).replace("-", "_"): f"{config_path}: {k}" for k in from_file})
        where = str(config_path)
    else:
        where = "config"
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "command", "func")}
    values = _expand_blocks(cls, values, where)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, value in flags.items():   # --reward-arg k=v adds to (and overrides keys of) the YAML mapping
        if name in fields and fields[name].metadata.get("flag") and name in values:
            flags[name] = {**keyword_arguments(values[name], f"{where}: {name}"),
                           **keyword_arguments(value, "--" + fields[name].metadata["flag"])}
    values.update(flags)
    spelling.update({name: cli_flag(fields[name]) if name in fields else "--" + name.replace("_", "-")
                     for name in flags})
    return build_config(cls, values, where=where, spelling=spelling)


def to_dict(cfg: Any) -> dict:
    """The config's fields as plain data; a Python function in a field (or a class in an option that
    takes one, such as ``env``) becomes ``module:name``."""
    takes_class = {f.name for f in dataclasses.fields(cfg) if f.metadata.get("python_callable")}
    return {k: callable_spec(v) if callable(v) and (not isinstance(v, type) or k in takes_class) else v
            for k, v in dataclasses.asdict(cfg).items()}


def callable_spec(fn: Any) -> str:
    """``module:qualified_name`` of a function (of its class for another callable object)."""
    target = fn if hasattr(fn, "__qualname__") else type(fn)
    return f"{getattr(target, '__module__', '?')}:{target.__qualname__}"


def save_yaml(cfg: Any, path: str | Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
