"""Reward health of an online run: how many samples got no reward and why, where the reward
function first failed, and the rule that stops a run whose reward keeps failing.

A sample *fails* when its reward function raised, returned something that is not a number, or
returned NaN or ±inf; :func:`rlxf.rewards.call_reward` then gives it None, so it drops out of the
loss. A None the function returns on purpose ("no opinion") is not a failure; ``reward_none``
counts both. Each step's counts are ``reward_errors`` (failed) and ``reward_none`` in metrics.jsonl
and on the progress line; the run's totals and the first failure of each kind, with the file and
line where it happened, are ``reward_health`` in summary.json, and each kind is logged once, when it
first happens.

The stop rule (:meth:`RewardHealth.after_step`): a step on which every sample failed stops the run,
and so do ``patience`` consecutive steps on which more than ``max_failure_share`` of the samples
failed (``--max-reward-failure-share``, ``--reward-failure-patience``).
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import numbers
import sysconfig
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

log = logging.getLogger("rlxf.rewards")

FIX = ("Fix the reward function (rlxf.rewards.call_reward(fn, prompts, completions, fields) on a few rows shows "
       "each sample's value and the first error) and run again, with --resume to continue from the newest "
       "checkpoint or with another --output-dir.")
_LIBRARY_DIRS = tuple({sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")})


@dataclass
class FirstError:
    """The first failure of one kind: an exception type, ``non-number`` or ``non-finite``."""

    kind: str
    message: str
    location: str        # "path/file.py:12 in score"
    step: int | None     # the training step (1-based) being scored; None for an evaluation
    split: str           # "train" or "eval"


class RewardHealth:
    """Failure counts of one run's reward function, its first failures, and the stop rule."""

    def __init__(self, name: str, *, max_failure_share: float, patience: int):
        self.name, self.max_failure_share, self.patience = name, max_failure_share, patience
        self.samples = self.failed = self.none = 0
        self.first_errors: dict[str, FirstError] = {}
        self.streak: list[tuple[int, float]] = []   # (step, failed share) of the steps over the share, in a row
        self._none_warned = False

    def traced(self, fn: Callable, *, step: int | None, split: str) -> Callable:
        """``fn`` with its failures recorded (the first of each kind is logged): exceptions with the
        line they were raised at, values that are not finite numbers with where ``fn`` is defined.
        Everything ``fn`` returns or raises passes through unchanged."""

        def call(prompts, completions, **fields):
            try:
                returned = fn(prompts, completions, **fields)
            except Exception as err:
                self._record(type(err).__name__, f"{type(err).__name__}: {err}", raise_location(err), step, split)
                raise
            self._check_values(returned, fn, step, split)
            return returned

        return call

    def _check_values(self, returned, fn: Callable, step: int | None, split: str) -> None:
        values = returned.tolist() if hasattr(returned, "tolist") else returned
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            return   # call_reward stops the run with its own message
        for value in values:
            if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
                value = value.item()
            if value is None:
                continue
            if not isinstance(value, numbers.Real):
                self._record("non-number", f"returned {type(value).__name__} {value!r:.60}, expected a float or None",
                             function_location(fn), step, split)
            elif not math.isfinite(float(value)):
                self._record("non-finite", f"returned {value}", function_location(fn), step, split)

    def _record(self, kind: str, message: str, location: str, step: int | None, split: str) -> None:
        if kind in self.first_errors:
            return
        self.first_errors[kind] = FirstError(kind, message, location, step, split)
        when = f"step {step}" if step is not None else "an evaluation"
        log.warning("reward %r failed (first %s, at %s): %s\n  at %s\n  (each kind of failure is logged once; every "
                    "step's counts are reward_errors and reward_none in metrics.jsonl)", self.name, kind, when,
                    message, location)

    def after_step(self, step: int, metrics: dict) -> str | None:
        """Count step ``step`` (1-based) from its metrics (``_reward_samples``, ``reward_errors``,
        ``reward_none``, combined over the processes); the reason to stop the run, or None."""
        samples, failed = int(metrics.get("_reward_samples", 0)), int(metrics.get("reward_errors", 0))
        none = int(metrics.get("reward_none", 0))
        self.samples, self.failed, self.none = self.samples + samples, self.failed + failed, self.none + none
        if not samples:
            return None
        if failed == samples:
            return (f"reward {self.name!r} failed on all {samples} samples of step {step}, so the step had nothing "
                    f"to learn from. {self.describe_first_errors()} {FIX}")
        share = failed / samples
        self.streak = self.streak + [(step, share)] if share > self.max_failure_share else []
        if len(self.streak) >= self.patience:
            return self._over_share_message()
        if self.streak:
            log.warning("reward %r failed on %d of %d samples of step %d (%.0f%%, over --max-reward-failure-share "
                        "%g); %d such steps in a row stop the run", self.name, failed, samples, step, 100 * share,
                        self.max_failure_share, self.patience)
        if none == samples and not self._none_warned:
            self._none_warned = True
            log.warning("reward %r returned None for every sample of step %d: the step had nothing to learn from "
                        "(check the row fields the function reads)", self.name, step)
        return None

    def _over_share_message(self) -> str:
        first, last = self.streak[0][0], self.streak[-1][0]
        steps = f"step {first}" if first == last else f"steps {first}-{last}"
        shares = ", ".join(f"{100 * share:.0f}%" for _, share in self.streak)
        return (f"reward {self.name!r} failed on more than {100 * self.max_failure_share:g}% of the samples in "
                f"{len(self.streak)} consecutive steps ({steps}: {shares}); those samples teach nothing. "
                f"{self.describe_first_errors()} {FIX} To let such a run go on, raise --max-reward-failure-share "
                f"(1 stops only on a step where every sample fails) or --reward-failure-patience.")

    def describe_first_errors(self) -> str:
        """The first failure of each kind with where it happened, as one sentence."""
        if not self.first_errors:
            return ""
        parts = [(e.message if e.message.startswith(e.kind) else f"{e.kind}: {e.message}") + f" at {e.location}"
                 for e in self.first_errors.values()]
        return f"First failure{'s' if len(parts) > 1 else ''}: {'; '.join(parts)}."

    def summary(self) -> dict:
        """``reward_health`` of summary.json: totals over the training steps and the first failures."""
        return {"samples": self.samples, "failed": self.failed, "none": self.none,
                "failed_share": round(self.failed / self.samples, 4) if self.samples else 0.0,
                "first_errors": [asdict(e) for e in self.first_errors.values()]}

    def state_dict(self) -> dict:
        return {**self.summary(), "streak": [list(s) for s in self.streak]}

    def load_state_dict(self, state: dict) -> None:
        self.samples, self.failed, self.none = state["samples"], state["failed"], state["none"]
        self.first_errors = {e["kind"]: FirstError(**e) for e in state["first_errors"]}
        self.streak = [(int(step), float(share)) for step, share in state["streak"]]


def raise_location(err: BaseException) -> str:
    """``file:line in function`` where ``err`` was raised: the innermost frame outside Python's own and
    installed libraries (the user's code), else the innermost frame."""
    frames = traceback.extract_tb(err.__traceback__)[1:]   # [0] is RewardHealth.traced's own call
    if not frames:
        return "unknown location"
    frame = next((f for f in reversed(frames) if not f.filename.startswith(_LIBRARY_DIRS)), frames[-1])
    return f"{frame.filename}:{frame.lineno} in {frame.name}"


def function_location(fn: Callable) -> str:
    """``file:line in name`` where ``fn`` (or its class) is defined."""
    target = inspect.unwrap(fn.func if isinstance(fn, functools.partial) else fn)
    if not (inspect.isfunction(target) or inspect.ismethod(target)):
        target = type(target)
    try:
        return f"{inspect.getsourcefile(target)}:{inspect.getsourcelines(target)[1]} in {target.__qualname__}"
    except (OSError, TypeError):
        return getattr(target, "__qualname__", repr(target))
