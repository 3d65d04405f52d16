"""The reward-function contract and the one safe way to call a reward function.

Contract (docs/rewards.md)::

    fn(prompts: list[str], completions: list[str], **row_fields) -> list[float | None]

``prompts`` and ``completions`` have one entry per sample (N); every row field (``answer=[...]``,
``reference=[...]`` ...) is a list of N values, aligned with them. The function returns N values in
the same order. ``None`` means "no opinion" (the sample cannot be judged, e.g. its row has no
answer): it is excluded from statistics and never silently turned into 0 — what a recipe does with
it (drop the sample, drop its group, or use a neutral reward) is the recipe's documented choice.

:func:`call_reward` is how rlxf calls every reward function (docs/rewards.md, failure
isolation): a sample whose scoring raises, returns something that is not a number, or returns NaN/inf
gets None, the others keep their values, and the failures are counted for the run's metrics. A
function that returns the wrong *number* of values is a programming error, not a bad sample:
that raises :class:`RewardError`.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Mapping, Sequence

RewardFn = Callable[..., Sequence[float | None]]


class RewardError(ValueError):
    """A reward function was built, found or called wrongly (a configuration or programming error).

    Never raised for one bad sample: those become None (see :func:`call_reward`). Raised from
    inside a reward function, it is not isolated either: it stops the run with its message.
    """


def reward_name(fn) -> str:
    """A readable name for ``fn`` for logs and metrics (its ``reward_name`` attribute if it has one)."""
    name = getattr(fn, "reward_name", None)
    if isinstance(name, str) and name:
        return name
    if isinstance(fn, functools.partial):
        return reward_name(fn.func)
    return getattr(fn, "__name__", None) or type(fn).__name__


def call_reward(fn: RewardFn, prompts: Sequence[str], completions: Sequence[str],
                fields: Mapping[str, Sequence] | None = None, *,
                name: str | None = None) -> tuple[list[float | None], dict]:
    """Call ``fn(prompts, completions, **fields)`` with failures isolated per sample.

    prompts, completions: N strings; fields: row-field name → N values.
    Returns ``(values, stats)``: ``values`` is N floats or None; ``stats`` is a dict with

    - ``none``: how many values are None (whatever the reason, including the function's own Nones);
    - ``errors``: samples whose call raised or returned a non-number;
    - ``nonfinite``: samples whose value was NaN or ±inf;
    - ``retried``: True when the batch call raised and the samples were scored one at a time;
    - ``first_error``: the first failure as text, or None: ``"sample 3: ValueError: ..."``, or
      ``"batch of 8: ValueError: ..."`` when the batch call raised (the per-sample errors are
      then counted in ``errors``).

    Failure isolation: if the batch call raises, ``fn`` is called once per sample (with one-element
    lists), so one bad sample cannot take the others' rewards with it. :class:`RewardError` is never
    isolated, and a wrong number of returned values raises :class:`RewardError` naming ``fn``.
    """
    name = name or reward_name(fn)
    prompts, completions = list(prompts), list(completions)
    fields = _checked_fields(name, prompts, completions, fields or {})
    stats = {"none": 0, "errors": 0, "nonfinite": 0, "retried": False, "first_error": None}
    try:
        returned = fn(prompts, completions, **fields)
    except RewardError:
        raise
    except Exception as err:  # noqa: BLE001 - isolated by rescoring sample by sample below
        stats["retried"] = True
        _record_error(stats, f"batch of {len(prompts)}: {type(err).__name__}: {err}")
        values = [_call_one(fn, name, prompts, completions, fields, i, stats) for i in range(len(prompts))]
    else:
        values = [_checked_value(v, i, stats) for i, v in enumerate(_as_list(returned, name, len(prompts)))]
    stats["none"] = sum(v is None for v in values)
    return values, stats


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def _checked_fields(name: str, prompts: list, completions: list, fields: Mapping) -> dict:
    if len(completions) != len(prompts):
        raise RewardError(f"reward {name!r}: got {len(prompts)} prompts but {len(completions)} "
                          "completions; pass one prompt per completion (repeat a prompt for each sample)")
    out = {}
    for key, column in fields.items():
        if isinstance(column, (str, bytes)) or not isinstance(column, Sequence):
            raise RewardError(f"reward {name!r}: row field {key!r} must be a list with one value per "
                              f"completion, got {type(column).__name__}")
        if len(column) != len(prompts):
            raise RewardError(f"reward {name!r}: row field {key!r} has {len(column)} values for "
                              f"{len(prompts)} completions; pass one value per completion")
        out[key] = list(column)
    return out


def _call_one(fn, name: str, prompts: list, completions: list, fields: dict, i: int, stats: dict):
    one_fields = {key: [column[i]] for key, column in fields.items()}
    try:
        returned = fn([prompts[i]], [completions[i]], **one_fields)
    except RewardError:
        raise
    except Exception as err:  # noqa: BLE001 - this sample gets None; counted and reported
        stats["errors"] += 1
        _record_error(stats, f"sample {i}: {type(err).__name__}: {err}")
        return None
    return _checked_value(_as_list(returned, name, 1)[0], i, stats)


def _as_list(returned, name: str, expected: int) -> list:
    """The function's return value as a list of ``expected`` items, else :class:`RewardError`."""
    if hasattr(returned, "tolist") and not isinstance(returned, (str, bytes)):  # tensor, ndarray
        returned = returned.tolist()
    if isinstance(returned, (str, bytes, Mapping)) or not isinstance(returned, Sequence):
        raise RewardError(f"reward {name!r} returned {type(returned).__name__}; a reward function must "
                          f"return a list with one float (or None) per completion ({expected} here)")
    if len(returned) != expected:
        raise RewardError(f"reward {name!r} returned {len(returned)} values for {expected} completions; "
                          "it must return exactly one float (or None) per completion, in order")
    return list(returned)


def _checked_value(value, i: int, stats: dict) -> float | None:
    if value is None:
        return None
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # 0-d tensor / numpy scalar
        value = value.item()
    if not isinstance(value, numbers.Real):
        stats["errors"] += 1
        _record_error(stats, f"sample {i}: returned {type(value).__name__} {value!r:.60}, "
                             "expected a float or None")
        return None
    value = float(value)
    if not math.isfinite(value):
        stats["nonfinite"] += 1
        _record_error(stats, f"sample {i}: returned {value}")
        return None
    return value


def _record_error(stats: dict, message: str) -> None:
    if stats["first_error"] is None:
        stats["first_error"] = message
