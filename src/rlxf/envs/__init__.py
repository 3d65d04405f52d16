"""Environments for multi-turn, tool-use RL (``--env``; docs/methods/tools.md).

An environment is any class whose instances follow :class:`rlxf.rollout.multiturn.Environment`:
``reset(row) -> messages`` opens one episode, ``step(turn_text) -> (observation, reward, done)``
answers each model turn. One instance serves one episode; the rollout makes a fresh one per
sample. Built-ins:

- ``calculator`` (:class:`CalculatorEnv`): ``<calc>EXPR</calc>`` evaluated by a whitelisting
  parser, never ``eval``;
- ``python`` (:class:`PythonEnv`): ``<python>CODE</python>`` run behind the OS sandbox of
  docs/security.md, its printed output as the observation.

``get_env(spec)`` also takes ``module:Class`` or ``path/file.py:Class``. Such a class is **your
own code and runs in the training process**, trusted like ``--reward path/file.py:fn``; it is not
sandboxed (model-written code belongs behind ``python``'s boundary, not in an environment class).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
from collections.abc import Callable
from pathlib import Path

from rlxf.envs.calculator import CalculatorEnv, CalculatorError, safe_eval
from rlxf.envs.python_tool import PythonEnv

ENVS: dict[str, Callable] = {"calculator": CalculatorEnv, "python": PythonEnv}


class EnvError(ValueError):
    """An ``--env`` spec that cannot be loaded; the message says what and how to fix it."""


def get_env(spec, *, unsafe_code: bool = False) -> Callable[[], object]:
    """A factory that makes one fresh environment per episode, from a built-in name, ``module:Class``,
    ``path/file.py:Class`` or (in Python) a class or zero-argument callable. ``unsafe_code`` is
    ``--unsafe-reward-code``, passed to the ``python`` environment only."""
    if callable(spec):
        factory = spec
    elif not isinstance(spec, str) or not spec.strip():
        raise EnvError(f"--env must be a built-in name ({', '.join(ENVS)}), module:Class or path/file.py:Class, "
                       f"got {spec!r}")
    elif spec in ENVS:
        factory = functools.partial(PythonEnv, unsafe=unsafe_code) if spec == "python" else ENVS[spec]
    else:
        factory = _load(spec)
    _check_interface(spec, factory)
    return factory


def env_label(spec) -> str:
    """``--env`` as text (a Python class as ``module:Name``)."""
    return spec if isinstance(spec, str) else f"{getattr(spec, '__module__', '?')}:{getattr(spec, '__qualname__', spec)}"


def _load(spec: str):
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name.isidentifier():
        raise EnvError(f"--env {spec!r}: not a built-in environment ({', '.join(ENVS)}); a custom one is "
                       "module:Class or path/file.py:Class")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise EnvError(f"--env {spec!r}: file {target!r} not found (resolved to {path.resolve()})")
        module_spec = importlib.util.spec_from_file_location(f"rlxf_user_env_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as err:
            raise EnvError(f"--env {spec!r}: importing {target} failed: {type(err).__name__}: {err}") from err
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as err:
            raise EnvError(f"--env {spec!r}: cannot import module {target!r} ({err}); is it on PYTHONPATH?") from err
    factory = getattr(module, name, None)
    if factory is None:
        raise EnvError(f"--env {spec!r}: {target} defines no {name!r}")
    return factory


def _check_interface(spec, factory) -> None:
    """The factory must be callable; a class must have ``reset`` and ``step`` methods."""
    if not callable(factory):
        raise EnvError(f"--env {env_label(spec)}: {factory!r} is not a class or callable")
    if inspect.isclass(factory):
        missing = [m for m in ("reset", "step") if not callable(getattr(factory, m, None))]
        if missing:
            raise EnvError(f"--env {env_label(spec)}: class {factory.__name__} has no {' or '.join(missing)} method; "
                           "an environment implements reset(row) -> messages and step(turn) -> "
                           "(observation, reward, done)")


__all__ = ["ENVS", "CalculatorEnv", "CalculatorError", "EnvError", "PythonEnv", "env_label", "get_env", "safe_eval"]
