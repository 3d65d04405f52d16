"""Judge-based rewards: LMGT reward shifting (arXiv 2409.04744) and d-RLAIF (arXiv 2309.00267).

LMGT: a language-model judge shifts the base reward by δ ∈ {−1, 0, +1}.

LMGT (arXiv 2409.04744) lets an LLM with prior knowledge approve (+1), stay neutral (0) or
disapprove (−1) of each (state, action); the agent learns from ``r' = r + δ``. rlxf's LLM setting
(Appendix C "LMGT in the LLM setting") reads (prompt, completion) for (state, action)::

    R_i = base_i + scale_t · δ_i,      δ_i = judge.shift(prompt_i, completion_i, knowledge) ∈ {−1, 0, +1}
    scale_t = scale · (1 − decay)^t    (t = completed optimizer steps; multiplicative per-step decay)

- **Cost control.** δ is cached by a hash of (prompt, completion): a cached sample is never sent
  again, and duplicates within a batch share one call (both count as ``cache_hits``). Each
  uncached sample is sent with probability ``call_fraction``; the others get δ = 0 and count as
  ``not_called``.
- **Failures.** A failed judgement (None) gives δ = 0, is counted in ``failed`` and is not cached
  (a later step may ask again). A sample whose base reward is None stays None (never judged).
- **Training only.** ``eval_fn`` is the base reward: rlxf's greedy evaluation scores with it, so
  held-out rewards are comparable with and without LMGT (the paper removes the LLM at deployment).
- **Metrics** (:meth:`LMGTReward.after_step`, logged by GRPO each step, ``lmgt/`` prefix): the
  shift distribution (counts of +1 / 0 / −1 among judged samples), ``not_called``, ``failed``,
  ``calls`` (samples sent), ``cache_hits``, the scale used, and agreement: δ ≠ 0 agrees with the
  verifier when the task's verifier can check the sample (δ = +1 on a correct answer, −1 on a
  wrong one), and with the base reward when the base is above / below its batch mean.

Deviation, stated: the paper uses unit shifts every step; ``scale``, ``decay`` and
``call_fraction`` are rlxf's options (defaults 1, 0, 1 reproduce the paper's form). Not validated
against the paper's numbers (its environments are not language tasks).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from rlxf.rewards.base import RewardError, RewardFn, call_reward
from rlxf.rewards.registry import get_reward, register_reward

log = logging.getLogger("rlxf.lmgt")


def sample_key(prompt, completion: str) -> str:
    """Cache key of a (prompt, completion) pair: sha256 of both (a message-list prompt as JSON)."""
    text = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(f"{text}\x00{completion}".encode()).hexdigest()


class LMGTReward:
    """Contract function ``base + scale_t · δ``; stateful (see the module docstring).

    ``base_fn``: any reward function; ``judge``: an object with ``shift(prompts, completions, *,
    knowledge=None) -> list[int | None]`` (an :mod:`rlxf.judges` judge); ``task``: a task whose
    ``verify(completion, answer)`` gives the verifier agreement (rows need an ``answer`` field).
    """

    def __init__(self, base_fn: RewardFn, judge, *, scale: float = 1.0, decay: float = 0.0,
                 call_fraction: float = 1.0, knowledge: str | None = None, seed: int = 0, task=None,
                 cache_size: int = 100_000):
        if scale < 0:
            raise RewardError(f"lmgt: scale must be >= 0, got {scale}")
        if not 0 <= decay < 1:
            raise RewardError(f"lmgt: decay must be in [0, 1) (per-step multiplicative), got {decay}")
        if not 0 < call_fraction <= 1:
            raise RewardError(f"lmgt: call_fraction must be in (0, 1], got {call_fraction}")
        if cache_size < 0:
            raise RewardError(f"lmgt: cache_size must be >= 0, got {cache_size}")
        self.base_fn, self.judge, self.task = base_fn, judge, task
        self.scale, self.decay, self.call_fraction = scale, decay, call_fraction
        self.knowledge, self.seed, self.cache_size = knowledge, seed, cache_size
        self.reward_name = "lmgt"
        self.step = 0
        self.cache: dict[str, int] = {}
        self.calls_total = 0
        self._reset()

    @property
    def eval_fn(self) -> RewardFn:
        """What evaluation scores with: the base reward (the judge is used only while training)."""
        return self.base_fn

    def current_scale(self) -> float:
        return self.scale * (1.0 - self.decay) ** self.step

    def _reset(self) -> None:
        self.counts = Counter()
        self.agree = Counter()
        self.calls_this_step = 0

    def __call__(self, prompts: list, completions: list[str], **row_fields) -> list[float | None]:
        base, _ = call_reward(self.base_fn, prompts, completions, row_fields)
        rng = random.Random(f"{self.seed}:{self.step}:{self.calls_this_step}")
        self.calls_this_step += 1
        keys = [sample_key(p, c) for p, c in zip(prompts, completions)]
        shifts: list[int | None] = [None] * len(prompts)  # None = not judged (δ = 0)
        pending: dict[str, list[int]] = {}  # key -> the samples sharing it (one judge call each key)
        for i, (b, key) in enumerate(zip(base, keys)):
            if b is None:
                self.counts["base_none"] += 1
            elif key in self.cache:
                shifts[i] = self.cache[key]
                self.counts["cache_hits"] += 1
            elif key in pending:  # a duplicate within this batch rides on the first one's call
                pending[key].append(i)
                self.counts["cache_hits"] += 1
            elif rng.random() < self.call_fraction:
                pending[key] = [i]
            else:
                self.counts["not_called"] += 1
        firsts = [group[0] for group in pending.values()]
        answers = self._ask([prompts[i] for i in firsts], [completions[i] for i in firsts])
        for (key, group), delta in zip(pending.items(), answers):
            if delta is None:
                self.counts["failed"] += len(group)
                continue
            for i in group:
                shifts[i] = delta
            if len(self.cache) < self.cache_size:
                self.cache[key] = delta
        scale = self.current_scale()
        self._record(shifts, base, completions, row_fields)
        return [None if b is None else b + scale * (d or 0) for b, d in zip(base, shifts)]

    def _ask(self, prompts: list, completions: list[str]) -> list[int | None]:
        """The judge's shifts for uncached samples; any failure becomes None (counted by the caller)."""
        if not prompts:
            return []
        self.counts["calls"] += len(prompts)
        self.calls_total += len(prompts)
        try:
            values = list(self.judge.shift(prompts, completions, knowledge=self.knowledge))
        except Exception as exc:  # noqa: BLE001 - a judge outage must not stop training; counted as failed
            log.warning("lmgt: judge.shift raised %s: %s; %d samples get δ = 0", type(exc).__name__, exc,
                        len(prompts))
            return [None] * len(prompts)
        if len(values) != len(prompts):
            raise RewardError(f"lmgt: judge.shift returned {len(values)} values for {len(prompts)} samples")
        return [int(v) if v in (-1, 0, 1) and not isinstance(v, bool) else None for v in values]

    def _record(self, shifts, base, completions, row_fields) -> None:
        valid = [b for b in base if b is not None]
        mean = sum(valid) / len(valid) if valid else 0.0
        answers = row_fields.get("answer")
        for i, delta in enumerate(shifts):
            if delta is None:
                continue
            self.counts[{1: "shift_plus", 0: "shift_zero", -1: "shift_minus"}[delta]] += 1
            if delta == 0:
                continue
            if base[i] is not None and base[i] != mean:
                self.agree["base_n"] += 1
                self.agree["base"] += (delta > 0) == (base[i] > mean)
            if self.task is not None and answers is not None and answers[i] is not None:
                correct = bool(self.task.verify(completions[i], str(answers[i])))
                self.agree["verifier_n"] += 1
                self.agree["verifier"] += (delta > 0) == correct

    def after_step(self, step: int) -> dict:
        """Metrics of the step just finished, then advance the decay schedule to ``step + 1``."""
        metrics = {f"lmgt/{k}": float(self.counts[k]) for k in
                   ("shift_plus", "shift_zero", "shift_minus", "not_called", "failed", "calls", "cache_hits")}
        metrics["lmgt/scale"] = self.current_scale()
        metrics["lmgt/calls_total"] = float(self.calls_total)
        metrics["lmgt/cache_size"] = float(len(self.cache))
        for source in ("base", "verifier"):
            if self.agree[f"{source}_n"]:
                metrics[f"lmgt/agreement_{source}"] = self.agree[source] / self.agree[f"{source}_n"]
        self.step = step + 1
        self._reset()
        return metrics

    def state_dict(self) -> dict:
        return {"step": self.step, "calls_total": self.calls_total, "cache": dict(self.cache)}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.calls_total = int(state["step"]), int(state["calls_total"])
        self.cache = {str(k): int(v) for k, v in state["cache"].items()}


JUDGE_PROMPT_CHOICES = ("auto", "standard", "compact")


def judge_prompt_set(spec: str, choice: str) -> str:
    """The judge prompt set for ``choice``: ``auto`` is ``compact`` for the embedded tiny model
    (``local:tiny``, 256 positions) and ``standard`` for every other judge."""
    if choice == "auto":
        return "compact" if spec.strip() == "local:tiny" else "standard"
    return choice


def build_judge_for(spec: str | None, *, reward: str, judge_model: str | None = None, device: str = "auto",
                    judge_prompts: str = "auto"):
    """``rlxf.judges.build_judge(spec, model=judge_model, device=device, prompts=…)``, looked up at
    call time so tests can replace it; a clear error without a judge."""
    if not spec:
        raise RewardError(f"reward {reward!r} needs a judge: pass --judge SPEC (local:PATH, local:tiny, or an "
                          "OpenAI-compatible base URL http://host:port/v1)")
    try:
        build = importlib.import_module("rlxf.judges").build_judge
    except (ImportError, AttributeError) as exc:
        raise RewardError(f"reward {reward!r}: rlxf.judges.build_judge is not available ({exc})") from None
    try:
        return build(spec, model=judge_model, device=device, prompts=judge_prompt_set(spec, judge_prompts))
    except ValueError as exc:  # JudgeError: a bad spec or options
        raise RewardError(f"reward {reward!r}: --judge {spec!r}: {exc}") from None


@register_reward("lmgt", factory=True)
def _lmgt_factory(task=None, *, base: str = "verifiable", judge: str | None = None, judge_model: str | None = None,
                  judge_prompts: str = "auto", judge_device: str = "auto", scale: float = 1.0, decay: float = 0.0,
                  call_fraction: float = 1.0, knowledge: str | None = None, seed: int = 0, **context):
    """LMGT: base reward (--lmgt-base) + scale · judge shift δ ∈ {−1, 0, +1} (needs --judge).

    Its own options (the online recipes fill them from ``--lmgt-*`` and ``--judge*``): ``base`` (any
    reward spec, built with the same context), ``judge``/``judge_model``/``judge_prompts``, ``scale``,
    ``decay``, ``call_fraction``, ``knowledge`` (a text file of prior knowledge), ``seed``;
    ``judge_device`` is where a local judge runs."""
    if base == "lmgt":
        raise RewardError("--lmgt-base cannot be lmgt itself; use verifiable, reward_model, likelihood ...")
    base_fn = get_reward(base, task=task, seed=seed, **context)
    judge_obj = build_judge_for(judge, reward="lmgt", judge_model=judge_model, device=judge_device,
                                judge_prompts=judge_prompts)
    text = None
    if knowledge:
        path = Path(knowledge)
        if not path.is_file():
            raise RewardError(f"--lmgt-knowledge: file not found: {path}")
        text = path.read_text(encoding="utf-8")
    return LMGTReward(base_fn, judge_obj, scale=scale, decay=decay, call_fraction=call_fraction, knowledge=text,
                      seed=seed, task=task)


def d_rlaif_rewards(scores: Sequence[float | None]) -> list[float | None]:
    """d-RLAIF: a 1–10 judge score s (= Σ i·P(i)) mapped linearly to [−1, 1] as (s − 5.5) / 4.5.

    The d-RLAIF paper normalises the score to [−1, 1]; the linear map is rlxf's reading [D].
    """
    return [None if s is None else (float(s) - 5.5) / 4.5 for s in scores]


class DirectJudgeReward:
    """d-RLAIF (Lee et al., arXiv 2309.00267): the judge's 1–10 score, normalised, is the reward."""

    def __init__(self, judge, *, rubric: str | None = None):
        self.judge, self.rubric = judge, rubric
        self.reward_name = "d_rlaif"

    def __call__(self, prompts: list, completions: list[str], **_row_fields) -> list[float | None]:
        return d_rlaif_rewards(self.judge.score(prompts, completions, rubric=self.rubric))


@register_reward("d_rlaif", factory=True)
def _d_rlaif_factory(*, judge: str | None = None, judge_model: str | None = None, judge_prompts: str = "auto",
                     judge_device: str = "auto"):
    """d-RLAIF: the judge's 1–10 score mapped to [−1, 1] is the reward, no reward model (needs --judge)."""
    return DirectJudgeReward(build_judge_for(judge, reward="d_rlaif", judge_model=judge_model, device=judge_device,
                                             judge_prompts=judge_prompts))
