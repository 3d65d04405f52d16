"""Find reward functions by name: the built-in registry, ``module:function`` and ``file.py:function``.

``--reward SPEC`` (and :func:`get_reward`) accepts

- a registered name (``exact_match``, ``verifiable``, ``likelihood`` ...; :func:`list_rewards`);
- ``package.module:function`` — imports the module (it must be importable: installed, or on
  ``PYTHONPATH`` / in the working directory) and takes the attribute (dots walk attributes,
  ``module:Class.method``);
- ``path/to/file.py:function`` — loads that file as a module (no package needed);
- ``sandbox:path/to/file.py:function`` — runs the function behind the OS boundary for every batch
  (:class:`rlxf.rewards.sandbox.SandboxedReward`). Files written by ``rlxf text2reward`` (first line
  the provenance header of :mod:`rlxf.sandbox.provenance`) always run this way, even without the
  prefix, and a file whose rlxf header is malformed is refused: code written by a model never runs
  in the training process (docs/security.md).

Registered entries are either contract functions (returned as they are) or *factories*:
``factory(**options) -> reward function``. :func:`get_reward` passes a factory the keyword
arguments its signature names and drops the others, so a recipe can offer the same context to
every factory (``model``, ``ref_model``, ``tokenizer``, ``task``, plus the user's options) and
each takes what it needs. A user-supplied ``module:function`` is returned as it is.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rlxf.rewards.base import RewardError, RewardFn, reward_name
from rlxf.rewards.sandbox import SANDBOX_PREFIX, SandboxedReward, is_generated_file


@dataclass(frozen=True)
class RewardEntry:
    """One registered reward: ``target`` is a contract function, or a factory when ``factory``."""

    name: str
    target: Callable
    factory: bool
    summary: str


REWARDS: dict[str, RewardEntry] = {}


def register_reward(name: str, *, factory: bool = False):
    """Decorator: register a reward function (or, with ``factory=True``, a factory) under ``name``.

    A factory is called by :func:`get_reward` with the keyword arguments it accepts and must return
    a contract function. Registering a taken name raises ``ValueError``.
    """
    def decorate(target: Callable) -> Callable:
        if name in REWARDS and REWARDS[name].target is not target:
            raise ValueError(f"reward name {name!r} is already registered "
                             f"({_describe(REWARDS[name].target)}); pick another name")
        doc = inspect.getdoc(target) or ""
        REWARDS[name] = RewardEntry(name, target, factory, doc.splitlines()[0] if doc else "")
        return target
    return decorate


def list_rewards() -> list[str]:
    """Registered reward names, sorted (``REWARDS[name].summary`` is each one's first doc line)."""
    return sorted(REWARDS)


def get_reward(spec: str | Callable, *, reward_args: dict | None = None, **context) -> RewardFn:
    """Resolve ``spec`` to a contract function ``fn(prompts, completions, **row_fields)``.

    spec: a registered name, ``module:attr``, ``path/to/file.py:attr``, or a callable. context:
    keyword arguments for factories (``model``, ``ref_model``, ``tokenizer``, ``task`` and factory
    options); a factory receives those it names, the rest are ignored. ``unsafe_reward_code=True``
    in the context lets a sandboxed reward run without the OS boundary where this machine has none
    (``--unsafe-reward-code``).
    reward_args: the user's own arguments (``--reward-arg key=value``): a factory receives them when
    it is built, a plain reward function on every call; each must be a parameter the target names
    (or it takes ``**kwargs``), else :class:`RewardError` lists the ones it takes.
    Raises :class:`RewardError` with what was wrong and how to fix it.
    """
    reward_args = dict(reward_args or {})
    if callable(spec):
        return _bind(spec, reward_args, callable_name(spec))
    if not isinstance(spec, str) or not spec.strip():
        raise RewardError(f"reward spec must be a registered name or 'module:function', got {spec!r}")
    spec = spec.strip()
    if spec.startswith(SANDBOX_PREFIX) or is_generated_file(spec):
        if reward_args:
            raise RewardError(f"reward {spec!r} is model-written code run in the sandbox; it takes no arguments "
                              f"(got {', '.join(reward_args)}); write the values into the file instead")
        return SandboxedReward.from_spec(spec, unsafe=bool(context.get("unsafe_reward_code", False)))
    if spec in REWARDS:
        entry = REWARDS[spec]
        if entry.factory:
            _check_accepts(entry.target, reward_args, spec, what="factory")
            return _build(entry, {**context, **reward_args})
        return _bind(entry.target, reward_args, spec)
    if ":" in spec:
        return _bind(_load_attribute(spec), reward_args, spec)
    raise RewardError(f"unknown reward {spec!r}; registered rewards: {', '.join(list_rewards())}; "
                      "or give your own function as 'package.module:function' or 'path/to/file.py:function'")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def callable_name(fn: Callable) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


def _check_accepts(target: Callable, args: dict, spec: str, *, what: str) -> None:
    """Each of ``args`` must be a keyword parameter of ``target`` (or it takes ``**kwargs``)."""
    if not args:
        return
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return   # no signature to check (a builtin); the call itself will say
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    named = [n for n, p in params.items() if p.kind in (inspect.Parameter.KEYWORD_ONLY,
                                                       inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    unknown = [k for k in args if k not in named]
    if unknown:
        raise RewardError(f"--reward-arg {', '.join(unknown)}: reward {spec!r} ({what}) takes no such argument; "
                          f"its parameters: {', '.join(named) or 'none'}")


class BoundReward:
    """A reward function with the user's ``--reward-arg`` values passed on every call.

    An argument that a row field also names is refused at the first call (one of the two would
    silently shadow the other)."""

    def __init__(self, fn: Callable, args: dict, spec: str):
        self.fn, self.args, self.spec = fn, dict(args), spec
        self.reward_name = reward_name(fn)

    def __call__(self, prompts, completions, **fields):
        clash = sorted(set(fields) & set(self.args))
        if clash:
            raise RewardError(f"--reward-arg {', '.join(clash)}: the dataset rows have a field of the same name; "
                              "rename the argument in your reward function, or drop the field from the data")
        return self.fn(prompts, completions, **fields, **self.args)


def _bind(fn: Callable, args: dict, spec: str) -> RewardFn:
    if not args:
        return fn
    _check_accepts(fn, args, spec, what="function")
    return BoundReward(fn, args, spec)


def _build(entry: RewardEntry, context: dict) -> RewardFn:
    params = inspect.signature(entry.target).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        kwargs = dict(context)
    else:
        kwargs = {key: value for key, value in context.items() if key in params}
    missing = [p.name for p in params.values()
               if p.default is inspect.Parameter.empty and p.name not in kwargs
               and p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    if missing:
        raise RewardError(f"reward {entry.name!r} needs {', '.join(repr(m) for m in missing)}; pass "
                          f"{'it' if len(missing) == 1 else 'them'} as keyword arguments to get_reward "
                          f"(e.g. get_reward({entry.name!r}, {missing[0]}=...))")
    fn = entry.target(**kwargs)
    if not callable(fn):
        raise RewardError(f"reward factory {entry.name!r} returned {type(fn).__name__}, not a function")
    return fn


def _load_attribute(spec: str) -> Callable:
    source, _, attr_path = spec.rpartition(":")
    if not source or not attr_path:
        raise RewardError(f"reward spec {spec!r} must look like 'package.module:function' or "
                          "'path/to/file.py:function'")
    is_file = source.endswith(".py") or "/" in source or "\\" in source
    module = _load_file(source, spec) if is_file else _import_module(source, spec)
    obj = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
            raise RewardError(f"reward spec {spec!r}: {source!r} has no attribute {attr_path!r}; "
                              f"callables defined there: {', '.join(names) or 'none'}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardError(f"reward spec {spec!r}: {attr_path!r} is a {type(obj).__name__}, not a function; "
                          "point at a function fn(prompts, completions, **row_fields) -> list[float | None]")
    return obj


def _import_module(name: str, spec: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name and (name == err.name or name.startswith(err.name + ".")):
            raise RewardError(
                f"reward spec {spec!r}: module {name!r} not found; install it, add its directory to "
                "PYTHONPATH (or run from there), or give a file path: 'path/to/file.py:function'") from err
        raise RewardError(f"reward spec {spec!r}: importing {name!r} failed because it imports "
                          f"{err.name!r}, which is not installed") from err
    except Exception as err:
        raise RewardError(f"reward spec {spec!r}: importing {name!r} raised "
                          f"{type(err).__name__}: {err}") from err


def _load_file(path_text: str, spec: str):
    path = Path(path_text).expanduser().resolve()
    if not path.is_file():
        raise RewardError(f"reward spec {spec!r}: file {path_text!r} not found (resolved to {path}); "
                          "give a path to a .py file relative to the working directory, or an absolute one")
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:10]
    module_name = f"rlxf_user_reward_{path.stem}_{digest}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise RewardError(f"reward spec {spec!r}: {path} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # so dataclasses/pickle inside the file can find their module
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[module_name]
        raise RewardError(f"reward spec {spec!r}: running {path} raised {type(err).__name__}: {err}") from err
    return module


def _describe(target: Callable) -> str:
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', repr(target))}"
