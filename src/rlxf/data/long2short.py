"""Long2short data builders (Kimi k1.5, arXiv 2501.12599): shorter reasoning from samples.

Both builders take, for each prompt, the ``n`` sampled completions of a (long-reasoning) model,
whether each is correct, and optionally each one's length in tokens::

    prompts     = ["2+2=?", ...]                       # [P]
    completions = [["... #4", "#4", "#5"], ...]        # [P][n_p]  (n_p may differ per prompt)
    correct     = [[True, True, False], ...]           # [P][n_p]
    lengths     = [[812, 40, 96], ...]                 # [P][n_p], tokens; None = characters

- :func:`shortest_correct_rows` — *shortest rejection sampling*: SFT rows on the shortest correct
  completion of each prompt (the paper samples n = 8).
- :func:`long_short_pairs` — *long2short DPO*: chosen = the shortest correct completion;
  rejected = every wrong completion longer than it and every correct completion at least
  ``ratio`` (1.5 in the paper) times as long.

"Shortest" uses ``lengths`` when given (token counts, what the paper measures), else the number of
characters of the completion; ties go to the earliest sample. Extra keyword arguments are
per-prompt fields copied into every row of that prompt (``answer=[...]``, ``id=[...]``). Rows are
in prompt order, then sample order, so the output is deterministic. Both return ``(rows, stats)``;
``stats`` counts what was kept and skipped, for the log. The rows are in rlxf's ``sft`` and
``preference`` formats (docs/data.md).
"""

from __future__ import annotations

import math
from numbers import Integral, Real

CHOSEN_SCORE = 1.0
"""``chosen_score`` of every pair: the shortest correct completion."""
WRONG_SCORE = 0.0
"""``rejected_score`` of a wrong completion."""
CORRECT_LONG_SCORE = 0.5
"""``rejected_score`` of a correct but long completion: right answer, wasted tokens."""
PAIR_KINDS = ("wrong_longer", "correct_long")
LENGTH_RTOL = 1e-9  # so that e.g. 11 tokens count as >= 1.1 x 10 despite 1.1 * 10 = 11.000000000000002


def shortest_correct_rows(prompts: list, completions: list[list], correct: list[list[bool]],
                          lengths: list[list[int]] | None = None, **extra_fields: list) -> tuple[list[dict], dict]:
    """SFT rows ``{"prompt", "completion", "completion_length", **extra}`` on each prompt's shortest correct sample.

    Kimi k1.5's shortest rejection sampling. Prompts without a correct sample give no row.

    Returns ``(rows, stats)`` with ``stats``: ``prompts``, ``rows``, ``no_correct`` (prompts
    skipped), ``mean_chosen_length`` (of the rows) and ``mean_correct_length`` (of every correct
    sample of those prompts; the gap between the two is how much shorter the SFT targets are);
    the means are NaN when there is no row.
    """
    lengths = _check_groups(prompts, completions, correct, lengths, extra_fields,
                            reserved=("prompt", "completion", "completion_length"))
    rows, chosen_lengths, correct_lengths = [], [], []
    for p, prompt in enumerate(prompts):
        best = _shortest_correct(correct[p], lengths[p])
        if best is None:
            continue
        rows.append({"prompt": prompt, "completion": completions[p][best],
                     "completion_length": lengths[p][best], **{k: v[p] for k, v in extra_fields.items()}})
        chosen_lengths.append(lengths[p][best])
        correct_lengths += [n for n, ok in zip(lengths[p], correct[p]) if ok]
    stats = {"prompts": len(prompts), "rows": len(rows), "no_correct": len(prompts) - len(rows),
             "mean_chosen_length": _mean(chosen_lengths), "mean_correct_length": _mean(correct_lengths)}
    return rows, stats


def long_short_pairs(prompts: list, completions: list[list], correct: list[list[bool]],
                     lengths: list[list[int]] | None = None, *, ratio: float = 1.5,
                     max_pairs_per_prompt: int | None = None, **extra_fields: list) -> tuple[list[dict], dict]:
    """Preference pairs that prefer the shortest correct completion (Kimi k1.5 long2short DPO).

    For each prompt, chosen = its shortest correct sample (ties: the earliest); rejected, in sample
    order:

    - ``"wrong_longer"``: each wrong sample strictly longer than the chosen one;
    - ``"correct_long"``: each correct sample with length ≥ ``ratio`` × the chosen length (and
      strictly longer, which only matters when the chosen one is empty).

    Wrong samples no longer than the chosen one are not used: the paper's negatives are the
    *longer* wrong responses, so every pair teaches "shorter and correct". A rejected completion
    identical to an earlier rejected one of the same prompt is dropped (it would only duplicate the
    pair). ``max_pairs_per_prompt`` keeps the first k pairs in sample order — samples are i.i.d.,
    so that is an unbiased subset. Prompts without a correct sample give no pair.

    Rows: ``{"prompt", "chosen", "rejected", "pair_kind", "chosen_score", "rejected_score",
    "chosen_length", "rejected_length", **extra}``. Scores (rlxf's choice; the paper gives none):
    chosen :data:`CHOSEN_SCORE` = 1.0, wrong :data:`WRONG_SCORE` = 0.0, correct but long
    :data:`CORRECT_LONG_SCORE` = 0.5 — they order the three outcomes for reward-aware losses
    (``rpo``) and are ignored by ``dpo``.

    Returns ``(rows, stats)`` with ``stats``: ``prompts``, ``pairs``, ``wrong_longer``,
    ``correct_long``, ``no_correct`` (prompts skipped), ``no_rejected`` (prompts with a chosen
    completion but nothing to reject), ``duplicates_dropped``, ``capped`` (pairs dropped by
    ``max_pairs_per_prompt``).
    """
    if not (isinstance(ratio, Real) and not isinstance(ratio, bool) and math.isfinite(ratio) and ratio >= 1.0):
        raise ValueError(f"long_short_pairs: ratio must be a number >= 1 (a correct completion at least ratio x "
                         f"the shortest correct one is rejected; the paper uses 1.5), got {ratio!r}")
    if max_pairs_per_prompt is not None and not (isinstance(max_pairs_per_prompt, Integral)
                                                 and not isinstance(max_pairs_per_prompt, bool)
                                                 and max_pairs_per_prompt > 0):
        raise ValueError(f"long_short_pairs: max_pairs_per_prompt must be a positive integer or None (no limit), "
                         f"got {max_pairs_per_prompt!r}")
    lengths = _check_groups(prompts, completions, correct, lengths, extra_fields,
                            reserved=("prompt", "chosen", "rejected", "pair_kind", "chosen_score", "rejected_score",
                                      "chosen_length", "rejected_length"))
    rows = []
    stats = {"prompts": len(prompts), "pairs": 0, "wrong_longer": 0, "correct_long": 0, "no_correct": 0,
             "no_rejected": 0, "duplicates_dropped": 0, "capped": 0}
    for p, prompt in enumerate(prompts):
        best = _shortest_correct(correct[p], lengths[p])
        if best is None:
            stats["no_correct"] += 1
            continue
        chosen_length = lengths[p][best]
        candidates = []  # (completion, kind, length) in sample order
        for j, (completion, ok, length) in enumerate(zip(completions[p], correct[p], lengths[p])):
            if j == best or length <= chosen_length:
                continue
            if not ok:
                kind = "wrong_longer"
            elif length >= ratio * chosen_length * (1.0 - LENGTH_RTOL):
                kind = "correct_long"
            else:
                continue
            if any(completion == seen for seen, _, _ in candidates):
                stats["duplicates_dropped"] += 1
                continue
            candidates.append((completion, kind, length))
        if max_pairs_per_prompt is not None and len(candidates) > max_pairs_per_prompt:
            stats["capped"] += len(candidates) - max_pairs_per_prompt
            candidates = candidates[:max_pairs_per_prompt]
        if not candidates:
            stats["no_rejected"] += 1
        extra = {k: v[p] for k, v in extra_fields.items()}
        for rejected, kind, length in candidates:
            rows.append({"prompt": prompt, "chosen": completions[p][best], "rejected": rejected, "pair_kind": kind,
                         "chosen_score": CHOSEN_SCORE,
                         "rejected_score": WRONG_SCORE if kind == "wrong_longer" else CORRECT_LONG_SCORE,
                         "chosen_length": chosen_length, "rejected_length": length, **extra})
            stats[kind] += 1
    stats["pairs"] = len(rows)
    return rows, stats


def _shortest_correct(correct: list[bool], lengths: list[int]) -> int | None:
    """Index of the shortest correct sample (the earliest on ties), or None when none is correct."""
    best = None
    for j, (ok, length) in enumerate(zip(correct, lengths)):
        if ok and (best is None or length < lengths[best]):
            best = j
    return best


def _check_groups(prompts: list, completions: list, correct: list, lengths: list | None, extra_fields: dict,
                  *, reserved: tuple[str, ...]) -> list[list[int]]:
    """Check the nested inputs line up; return the lengths (characters when ``lengths`` is None)."""
    num = len(prompts)
    named = {"completions": completions, "correct": correct, **({"lengths": lengths} if lengths is not None else {}),
             **extra_fields}
    for name, values in named.items():
        if not isinstance(values, (list, tuple)) or len(values) != num:
            size = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
            raise ValueError(f"{name} must be a list with one entry per prompt ({num} prompts), got {size}")
    for name in extra_fields:
        if name in reserved:
            raise ValueError(f"extra field {name!r} would overwrite a field the builder writes "
                             f"({', '.join(reserved)}); rename it")
    for p in range(num):
        n = len(completions[p]) if isinstance(completions[p], (list, tuple)) else None
        for name, values in (("completions", completions), ("correct", correct), ("lengths", lengths)):
            if values is None:
                continue
            group = values[p]
            if not isinstance(group, (list, tuple)) or len(group) != n:
                size = len(group) if isinstance(group, (list, tuple)) else type(group).__name__
                raise ValueError(f"prompt {p}: {name}[{p}] must be a list with one entry per sample "
                                 f"({n if n is not None else 'a list like completions'}), got {size}; "
                                 f"completions, correct and lengths must have the same shape")
        for j, ok in enumerate(correct[p]):
            if ok not in (True, False):  # bools, numpy bools and 0/1
                raise ValueError(f"prompt {p}: correct[{p}][{j}]={ok!r} is not a bool (True if the sample is correct)")
        if lengths is not None:
            for j, length in enumerate(lengths[p]):
                if not isinstance(length, Integral) or isinstance(length, bool) or length < 0:
                    raise ValueError(f"prompt {p}: lengths[{p}][{j}]={length!r} is not a non-negative integer "
                                     f"(the completion's length in tokens)")
        else:
            for j, completion in enumerate(completions[p]):
                if not isinstance(completion, str):
                    raise ValueError(f"prompt {p}: completions[{p}][{j}] is a {type(completion).__name__}, not a "
                                     f"string, so its length in characters is undefined; pass lengths (tokens)")
    if lengths is not None:
        return [[int(n) for n in group] for group in lengths]
    return [[len(c) for c in group] for group in completions]


def _mean(values: list[int]) -> float:
    return sum(values) / len(values) if values else math.nan
