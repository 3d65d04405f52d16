"""Length-based reward terms: Kimi k1.5's length reward and DAPO's overlong penalty.

Both are pure functions of token lengths (list or tensor in, ``list[float]`` out), computed in
float64; the recipe measures the lengths (completion tokens) and adds the term to the task reward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def kimi_length_reward(lengths: Sequence[int] | torch.Tensor, correct: Sequence[bool] | torch.Tensor,
                       group_size: int) -> list[float]:
    """Kimi k1.5 length reward, per sample (Kimi k1.5, arXiv 2501.12599, "length penalty").

    Rows are ordered group by group: rows ``[g·G, (g+1)·G)`` are the G samples of one problem.
    Within a group, with min/max over its lengths::

        λ_i = 0.5 − (len_i − min_len) / (max_len − min_len)          ∈ [−0.5, 0.5]
        len_reward_i = λ_i            if correct_i
                     = min(0, λ_i)    otherwise
        len_reward_i = 0 for the whole group when max_len == min_len

    lengths: ``[N]`` token lengths (answer + CoT); correct: ``[N]`` booleans (r(x, y_i, y*) = 1);
    N must be a multiple of ``group_size``. Returns N floats. The paper's total reward is
    r + w · len_reward with w unspecified, applied after a warm-up without it: both are the
    recipe's choices.
    """
    if group_size < 1:
        raise ValueError(f"kimi_length_reward: group_size must be >= 1, got {group_size}")
    lengths_t = _as_float64(lengths, "lengths")                              # [N]
    correct_t = _as_float64(correct, "correct")                              # [N]
    if lengths_t.numel() != correct_t.numel():
        raise ValueError(f"kimi_length_reward: {lengths_t.numel()} lengths but {correct_t.numel()} "
                         "correctness values; pass one of each per sample")
    if lengths_t.numel() % group_size:
        raise ValueError(f"kimi_length_reward: {lengths_t.numel()} samples is not a multiple of "
                         f"group_size={group_size}; rows must be whole groups, ordered group by group")
    grouped = lengths_t.view(-1, group_size)                                 # [N/G, G]
    low = grouped.min(-1, keepdim=True).values                               # [N/G, 1]
    span = grouped.max(-1, keepdim=True).values - low                        # [N/G, 1]
    lam = torch.where(span > 0, 0.5 - (grouped - low) / span.clamp(min=1e-300), 0.0)  # [N/G, G]
    lam = lam.flatten()                                                      # [N]
    return torch.where(correct_t.bool(), lam, lam.clamp(max=0.0)).tolist()


def overlong_penalty(lengths: Sequence[int] | torch.Tensor, max_len: int, buffer: int,
                     factor: float = 1.0) -> list[float]:
    """DAPO soft overlong punishment, per sample (DAPO, arXiv 2503.14476)::

        R_length(y) = 0                                      if |y| ≤ L_max − L_cache
                    = ((L_max − L_cache) − |y|) / L_cache · factor   if L_max − L_cache < |y| ≤ L_max
                    = −factor                                if |y| > L_max

    with L_max = ``max_len``, L_cache = ``buffer``; ``factor`` is verl's ``penalty_factor`` (the paper
    uses 1). lengths: ``[N]`` completion token lengths → N floats in [−factor, 0], added to the task
    reward. The middle piece reaches −factor at |y| = L_max, so the penalty is continuous.
    ``buffer=0`` leaves only the hard −factor beyond ``max_len``.
    """
    if max_len < 1:
        raise ValueError(f"overlong_penalty: max_len must be >= 1, got {max_len}")
    if not 0 <= buffer <= max_len:
        raise ValueError(f"overlong_penalty: buffer must be in [0, max_len={max_len}], got {buffer}")
    if factor < 0:
        raise ValueError(f"overlong_penalty: factor must be >= 0, got {factor}")
    lengths_t = _as_float64(lengths, "lengths")                              # [N]
    soft_limit = max_len - buffer
    in_buffer = (soft_limit - lengths_t) / max(buffer, 1) * factor           # [N]
    penalty = torch.where(lengths_t <= max_len, in_buffer, -float(factor))
    return torch.where(lengths_t <= soft_limit, 0.0, penalty).tolist()


def _as_float64(values, what: str) -> torch.Tensor:
    tensor = values.detach().to("cpu", torch.float64) if isinstance(values, torch.Tensor) else (
        torch.tensor([float(v) for v in _no_none(values, what)], dtype=torch.float64))
    return tensor.flatten()


def _no_none(values, what: str):
    values = list(values)
    if any(v is None for v in values):
        raise ValueError(f"{what} holds None; length terms need a value for every sample "
                         "(drop samples without a verdict before calling)")
    return values
