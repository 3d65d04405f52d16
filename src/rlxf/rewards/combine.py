"""Weighted sums of reward functions, with each component kept for logging.

    R_i = Σ_k w_k · r_k,i

Each component is called through :func:`rlxf.rewards.call_reward`, so its failures are isolated and
counted separately. Choice, stated: a sample is None when **any** component is None for it — a sum
that silently skipped a missing term would put that sample on a different scale from the others
(e.g. a missing correctness term would make a wrong answer look as good as a right one).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rlxf.rewards.base import RewardFn, call_reward, reward_name


class CombinedReward:
    """A contract function ``R = Σ_k w_k · r_k``; see :func:`combine`.

    After each call, ``last_components[name]`` holds component ``name``'s N values (None where it
    had no opinion) and ``last_stats[name]`` its :func:`call_reward` stats, for logging.
    """

    def __init__(self, components: Sequence[tuple[RewardFn, float, str]]):
        if not components:
            raise ValueError("combine: give at least one (function, weight) component")
        names = [name for _, _, name in components]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"combine: component names must be unique, {duplicates} repeat; "
                             "name them: combine([(fn, weight, 'name'), ...])")
        self.components = list(components)
        self.reward_name = "+".join(names)
        self.last_components: dict[str, list[float | None]] = {}
        self.last_stats: dict[str, dict] = {}

    def __call__(self, prompts: list[str], completions: list[str], **row_fields) -> list[float | None]:
        totals: list[float | None] = [0.0] * len(prompts)
        self.last_components, self.last_stats = {}, {}
        for fn, weight, name in self.components:
            values, stats = call_reward(fn, prompts, completions, row_fields, name=name)
            self.last_components[name], self.last_stats[name] = values, stats
            totals = [None if t is None or v is None else t + weight * v for t, v in zip(totals, values)]
        return totals


def combine(components: Sequence[tuple]) -> CombinedReward:
    """Weighted sum of reward functions: ``combine([(fn, weight), (fn, weight, name), ...])``.

    The name defaults to the function's :func:`~rlxf.rewards.base.reward_name`. Returns a
    :class:`CombinedReward` (a contract function whose ``last_components`` holds each term).
    """
    normalised = []
    for item in components:
        if not isinstance(item, (tuple, list)) or len(item) not in (2, 3) or not callable(item[0]):
            raise ValueError(f"combine: each component is (function, weight) or (function, weight, name), "
                             f"got {item!r}")
        fn, weight = item[0], float(item[1])
        normalised.append((fn, weight, item[2] if len(item) == 3 else reward_name(fn)))
    return CombinedReward(normalised)


def weighted(rewards: Mapping[str, tuple[RewardFn, float]]) -> CombinedReward:
    """Weighted sum from ``{name: (fn, weight)}`` (same as :func:`combine`)."""
    return combine([(fn, weight, name) for name, (fn, weight) in rewards.items()])
