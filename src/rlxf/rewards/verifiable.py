"""Verifiable rewards: compare the completion's final answer with the row's ``answer``.

All return 1.0 (right) or 0.0 (wrong) per sample, and None for a row whose ``answer`` is None
(nothing to compare with). The final answer is the text after the completion's last ``#`` marker
(:func:`rlxf.tasks.extract_answer`, the built-in tasks' convention), or the whole completion when
it has no marker. These are the rule-based rewards of GRPO/DAPO (DeepSeekMath, arXiv 2402.03300;
DAPO, arXiv 2503.14476: R = 1 if the
answer is equivalent, else 0; DAPO's ±1 is the affine map 2R − 1, which group normalisation cancels).
"""

from __future__ import annotations

import math
import re

from rlxf.rewards.base import RewardError
from rlxf.rewards.registry import register_reward
from rlxf.tasks import Task, extract_answer, get_task

_SPACE = re.compile(r"\s+")
# a sign only where it cannot be a binary operator ("23-12" is 23 and 12; "=-5" is -5);
# thousands separators only in groups of three ("1,234" is 1234; "1,2,3" is 1, 2 and 3)
_NUMBER = re.compile(r"(?:(?<![\w.)\]])[-+\u2212])?(?<![\d.])"
                     r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?")


def final_answer(completion: str) -> str:
    """The text after the last ``#`` marker (see :func:`rlxf.tasks.extract_answer`), else the whole completion."""
    extracted = extract_answer(completion)
    return completion if extracted is None else extracted


def normalise_text(text: str) -> str:
    """Strip and collapse every run of whitespace to one space."""
    return _SPACE.sub(" ", str(text)).strip()


def parse_number(text: str) -> float | None:
    """The last number in ``text`` (``-3``, ``2.5``, ``1,234``, ``1e-3``, ``−7``), or None."""
    numbers = _NUMBER.findall(str(text))
    if not numbers:
        return None
    token = numbers[-1].replace(",", "").replace("\u2212", "-")
    try:
        return float(token)
    except ValueError:
        return None


@register_reward("exact_match")
def exact_match(prompts: list[str], completions: list[str], answer: list | None = None,
                **_fields) -> list[float | None]:
    """1.0 if the final answer equals ``answer`` after whitespace normalisation, else 0.0.

    r_i = 1[normalise(final_answer(completion_i)) == normalise(str(answer_i))]; None if answer_i is None.
    """
    answers = _require_answers("exact_match", answer)
    return [None if a is None else float(normalise_text(final_answer(c)) == normalise_text(a))
            for c, a in zip(completions, answers)]


def numeric_match(prompts: list[str], completions: list[str], answer: list | None = None, *,
                  rel_tol: float = 1e-6, abs_tol: float = 1e-9, **_fields) -> list[float | None]:
    """1.0 if the final answer's last number equals ``answer`` within tolerance, else 0.0.

    r_i = 1[|x̂_i − x_i| ≤ max(rel_tol · max(|x̂_i|, |x_i|), abs_tol)] (``math.isclose``), x̂_i = the
    last number of the final answer. A completion with no number scores 0.0; an answer that is
    None or holds no number gives None (the row cannot be judged).
    """
    answers = _require_answers("numeric_match", answer)
    out: list[float | None] = []
    for completion, target in zip(completions, answers):
        expected = target if isinstance(target, (int, float)) and not isinstance(target, bool) else (
            None if target is None else parse_number(target))
        if expected is None or not math.isfinite(expected):
            out.append(None)
            continue
        predicted = parse_number(final_answer(completion))
        out.append(float(predicted is not None and math.isclose(predicted, expected, rel_tol=rel_tol,
                                                                abs_tol=abs_tol)))
    return out


def format_reward(pattern: str, *, fullmatch: bool = False, flags: int = 0):
    """Factory: reward 1.0 when the completion matches the regex ``pattern``, else 0.0.

    ``fullmatch=False`` uses ``re.search`` (the pattern appears anywhere); ``fullmatch=True``
    requires the whole completion to match (add ``re.DOTALL`` to ``flags`` to let ``.`` cross lines).
    """
    try:
        regex = re.compile(pattern, flags)
    except re.error as err:
        raise RewardError(f"format reward: pattern {pattern!r} is not a valid regular expression: {err}") from err
    match = regex.fullmatch if fullmatch else regex.search

    def format_ok(prompts: list[str], completions: list[str], **_fields) -> list[float | None]:
        return [float(match(c) is not None) for c in completions]

    format_ok.reward_name = "format"
    return format_ok


def task_reward(task: str | Task):
    """Factory: the built-in task's verifier as a reward — 1.0 if ``task.verify(completion, answer)``."""
    task = get_task(task) if isinstance(task, str) else task

    def verified(prompts: list[str], completions: list[str], answer: list | None = None,
                 **_fields) -> list[float | None]:
        answers = _require_answers(f"task:{task.name}", answer)
        return [None if a is None else float(task.verify(c, str(a))) for c, a in zip(completions, answers)]

    verified.reward_name = f"task:{task.name}"
    return verified


@register_reward("numeric_match", factory=True)
def _numeric_match_factory(rel_tol: float = 1e-6, abs_tol: float = 1e-9):
    """Numeric answer match within a tolerance (options: rel_tol, abs_tol)."""
    def numeric(prompts, completions, **fields):
        return numeric_match(prompts, completions, rel_tol=rel_tol, abs_tol=abs_tol, **fields)

    numeric.reward_name = "numeric_match"
    return numeric


@register_reward("verifiable", factory=True)
def _verifiable_factory(task: str | Task | None = None):
    """The task's verifier when a built-in task is given (option/context: task), else exact match."""
    return exact_match if task is None else task_reward(task)


@register_reward("format", factory=True)
def _format_factory(pattern: str, fullmatch: bool = False, flags: int = 0):
    """1.0 when the completion matches a regex (options: pattern, fullmatch, flags)."""
    return format_reward(pattern, fullmatch=fullmatch, flags=flags)


def _require_answers(name: str, answer) -> list:
    if answer is None:
        raise RewardError(f"reward {name!r} needs the row field 'answer' (one reference answer per "
                          "completion); add an 'answer' column to the dataset")
    return list(answer)
