"""Likelihood (perplexity) rewards: how much a completion's reasoning makes the reference answer likely.

docs/rewards.md (likelihood rewards). For a completion, the reasoning z
is its text before the last ``split_marker`` (the whole completion when there is none); the
policy's own final answer is dropped and replaced by the reference answer
y* = ``answer_template.format(answer=row answer)`` + EOS, whose tokens are scored by a causal LM
(the *scorer*) conditioned on the prompt x and z. Kinds (``kind=``):

- ``"rlpr"`` (default; RLPR, arXiv 2506.18254)::

      p(z)  = (1/|y*|) Σ_i π(y*_i | x, z, y*_<i)        mean token PROBABILITY
      r̂     = clip(p(z) − p(""), 0, 1)                   baseline p("") = same without reasoning
      R     = (1 − c_fmt) · r̂ + c_fmt · format_ok        c_fmt = format_coef (0.1)

  format_ok = 1 when the completion contains ``split_marker`` followed by non-blank text.
- ``"vr_cli"`` (VR-CLI, arXiv 2503.22828)::

      PPL(z) = exp(−(1/|y*|) Σ_i log π(y*_i | x, z, y*_<i))
      I      = 100 · (PPL("") − PPL(z)) / PPL("")        percent improvement
      R      = 0 if I < 0.05;  0.5 if I < 1;  0.9 if I < 2;  1.0 otherwise

  Deviation, stated: the reference code adds 1e-10 to R; rlxf does not (it changes no ordering and
  group normalisation removes it).
- ``"verifree"`` (VeriFree, arXiv 2505.21493): R = π(y* | x, z) = exp(Σ_i log π(y*_i|·)),
  the sequence probability, no baseline. (VeriFree's extra reference-answer SFT term weighted by R
  is a loss term for the recipe, not a reward.)

The scorer is whatever model is passed: a frozen reference (VR-CLI; the policy cannot raise its
own reward by inflating likelihoods) or the current policy (RLPR and VeriFree score with π_old at
rollout time). The recipe decides and should log which. Tokenisation: prompt ids =
``tokenizer(prompt)["input_ids"]`` (with special tokens, as generation sees it), then
``tokenizer(z, add_special_tokens=False)`` and ``tokenizer(y*, add_special_tokens=False)`` + EOS,
encoded separately so that y* has the same tokens for every completion and for the baseline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from rlxf.models import token_logps
from rlxf.rewards.base import RewardError
from rlxf.rewards.registry import register_reward
from rlxf.rewards.scoring import eval_mode, length_sorted_batches, model_device, pad_id_of, right_pad

KINDS = ("rlpr", "vr_cli", "verifree")
VR_CLI_THRESHOLDS = ((2.0, 1.0), (1.0, 0.9), (0.05, 0.5))  # (lower bound of I in %, reward), high first


def split_reasoning(completion: str, marker: str) -> str:
    """The reasoning z: text before the last ``marker``, or the whole completion without one."""
    cut = completion.rfind(marker) if marker else -1
    return completion if cut < 0 else completion[:cut]


def has_final_answer(completion: str, marker: str) -> bool:
    """format_ok: the completion contains ``marker`` followed by non-blank text."""
    cut = completion.rfind(marker) if marker else -1
    return cut >= 0 and completion[cut + len(marker):].strip() != ""


def vr_cli_reward(improvement: float) -> float:
    """VR-CLI thresholds on the percent perplexity improvement I (VR-CLI, arXiv 2503.22828): {0, 0.5, 0.9, 1.0}."""
    for lower, reward in VR_CLI_THRESHOLDS:
        if improvement >= lower:
            return reward
    return 0.0


def rlpr_reward(prob: float, baseline_prob: float, format_ok: bool, format_coef: float = 0.1) -> float:
    """RLPR: (1 − c) · clip(p − p_base, 0, 1) + c · format_ok (RLPR, arXiv 2506.18254, shaping "threshold_0")."""
    improvement = min(max(prob - baseline_prob, 0.0), 1.0)
    return (1.0 - format_coef) * improvement + format_coef * float(format_ok)


@torch.no_grad()
def answer_token_logps(model, tokenizer, prompts: Sequence[str], reasonings: Sequence[str],
                       answers: Sequence[str], *, batch_size: int = 64) -> list[Tensor]:
    """Per-token log-probs of each answer (+ EOS) given prompt + reasoning.

    Row i scores ``tokenizer(answers[i], add_special_tokens=False) + [eos]`` after
    ``tokenizer(prompts[i]) + tokenizer(reasonings[i], add_special_tokens=False)``; returns N float32
    CPU tensors, row i of shape ``[|y*_i|]``: log π(y*_t | x, z, y*_<t). ``model`` is a causal LM
    or an object with ``token_logps(input_ids, attention_mask)`` (a :class:`rlxf.models.Reference`);
    log-probs come from :func:`rlxf.models.token_logps` at temperature 1.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("answer_token_logps: the tokenizer has no EOS token; the reference answer "
                         "is scored up to and including EOS")
    contexts, targets = [], []
    for i, (prompt, reasoning, answer) in enumerate(zip(prompts, reasonings, answers, strict=True)):
        context = list(tokenizer(prompt)["input_ids"])
        if reasoning:
            context += tokenizer(reasoning, add_special_tokens=False)["input_ids"]
        if not context:
            raise ValueError(f"answer_token_logps: row {i} has an empty prompt and no reasoning and the "
                             "tokenizer adds no BOS token, so the answer's first token has no context")
        contexts.append(context)
        targets.append(list(tokenizer(answer, add_special_tokens=False)["input_ids"]) + [eos])
    pad_id, device = pad_id_of(tokenizer), model_device(model)
    out: list[Tensor | None] = [None] * len(contexts)
    lengths = [len(c) + len(t) for c, t in zip(contexts, targets)]
    for rows in length_sorted_batches(lengths, batch_size):
        input_ids, attention_mask = right_pad([contexts[i] + targets[i] for i in rows], pad_id)  # [B, T]
        logps = _scorer_logps(model, input_ids.to(device), attention_mask.to(device)).cpu()  # [B, T-1]
        for b, i in enumerate(rows):
            start = len(contexts[i]) - 1  # logps[:, t] scores token t+1
            out[i] = logps[b, start:start + len(targets[i])].clone()
    return out


class LikelihoodReward:
    """Likelihood reward of the reference answer given the completion's reasoning (module docstring).

    Contract function: ``reward(prompts, completions, **row_fields) -> list[float | None]``; rows
    whose ``answer_field`` is None get None. The no-reasoning baseline (rlpr, vr_cli) is computed
    once per unique (prompt, answer) in a call and cached across calls when ``cache_baseline``
    (right for a frozen scorer; with the moving policy as scorer pass ``cache_baseline=False`` or
    call :meth:`clear_cache` after each update, else the baseline goes stale).

    After a call: ``last_raw`` (per row: mean prob / PPL / sequence prob, None for skipped rows),
    ``last_baseline`` (same quantity without reasoning; None for verifree) and ``last_stats``
    (``raw_mean``, ``baseline_mean``, ``reward_mean``, ``scored``).
    """

    def __init__(self, model, tokenizer, *, kind: str = "rlpr", answer_field: str = "answer",
                 answer_template: str = "#{answer}", split_marker: str = "#", batch_size: int = 64,
                 format_coef: float = 0.1, cache_baseline: bool = True):
        if kind not in KINDS:
            raise RewardError(f"likelihood reward: kind must be one of {KINDS}, got {kind!r}")
        if not 0.0 <= format_coef <= 1.0:
            raise RewardError(f"likelihood reward: format_coef must be in [0, 1], got {format_coef}")
        if "{answer}" not in answer_template:
            raise RewardError(f"likelihood reward: answer_template {answer_template!r} must contain "
                              "'{answer}' (where the row's answer goes), e.g. '#{answer}'")
        if batch_size < 1:
            raise RewardError(f"likelihood reward: batch_size must be >= 1, got {batch_size}")
        model_device(model)  # fails early and clearly for a reference-free Reference
        self.model, self.tokenizer, self.kind = model, tokenizer, kind
        self.answer_field, self.answer_template, self.split_marker = answer_field, answer_template, split_marker
        self.batch_size, self.format_coef, self.cache_baseline = batch_size, format_coef, cache_baseline
        self.reward_name = f"likelihood_{kind}"
        self._baselines: dict[tuple[str, str], float] = {}
        self.last_raw: list[float | None] = []
        self.last_baseline: list[float | None] = []
        self.last_stats: dict = {}

    def __call__(self, prompts: list[str], completions: list[str], **row_fields) -> list[float | None]:
        if self.answer_field not in row_fields:
            raise RewardError(f"likelihood reward needs the row field {self.answer_field!r} (the reference "
                              f"answer); rows have {sorted(row_fields) or 'no fields'}; set answer_field=")
        answers = row_fields[self.answer_field]
        rows = [i for i, a in enumerate(answers) if a is not None]
        targets = [self.answer_template.format(answer=answers[i]) for i in rows]
        row_prompts = [prompts[i] for i in rows]
        reasonings = [split_reasoning(completions[i], self.split_marker) for i in rows]
        raw = [self._aggregate(lp) for lp in self._logps(row_prompts, reasonings, targets)]
        baseline = (self._baseline(row_prompts, targets) if self.kind != "verifree"
                    else [None] * len(rows))
        rewards = [self._transform(r, b, completions[i]) for r, b, i in zip(raw, baseline, rows)]

        self.last_raw, self.last_baseline = [None] * len(prompts), [None] * len(prompts)
        out: list[float | None] = [None] * len(prompts)
        for i, r, b, reward in zip(rows, raw, baseline, rewards):
            self.last_raw[i], self.last_baseline[i], out[i] = r, b, reward
        self.last_stats = {"raw_mean": _mean(raw), "baseline_mean": _mean([b for b in baseline if b is not None]),
                           "reward_mean": _mean(rewards), "scored": len(rows)}
        return out

    def clear_cache(self) -> None:
        """Forget cached baselines (call after the scorer's weights change)."""
        self._baselines.clear()

    # -- pieces -------------------------------------------------------------------------------
    def _logps(self, prompts, reasonings, targets) -> list[Tensor]:
        return answer_token_logps(self.model, self.tokenizer, prompts, reasonings, targets,
                                  batch_size=self.batch_size)

    def _aggregate(self, logps: Tensor) -> float:
        """[|y*|] log-probs → mean prob (rlpr), perplexity (vr_cli) or sequence prob (verifree)."""
        logps = logps.double()
        if self.kind == "rlpr":
            return logps.exp().mean().item()
        if self.kind == "vr_cli":
            return math.exp(-logps.mean().item())
        return math.exp(logps.sum().item())

    def _baseline(self, prompts: list[str], targets: list[str]) -> list[float]:
        keys = list(zip(prompts, targets))
        cache = self._baselines if self.cache_baseline else {}
        missing = list(dict.fromkeys(k for k in keys if k not in cache))
        if missing:
            logps = self._logps([p for p, _ in missing], [""] * len(missing), [t for _, t in missing])
            cache.update({key: self._aggregate(lp) for key, lp in zip(missing, logps)})
        return [cache[k] for k in keys]

    def _transform(self, raw: float, baseline: float | None, completion: str) -> float:
        if self.kind == "rlpr":
            return rlpr_reward(raw, baseline, has_final_answer(completion, self.split_marker), self.format_coef)
        if self.kind == "vr_cli":
            return vr_cli_reward(100.0 * (baseline - raw) / baseline)
        return raw


@register_reward("likelihood", factory=True)
def _likelihood_factory(tokenizer, model=None, ref_model=None, policy=None, scorer: str | None = None,
                        kind: str = "rlpr", answer_field: str = "answer", answer_template: str = "#{answer}",
                        split_marker: str = "#", batch_size: int = 64, format_coef: float = 0.1,
                        cache_baseline: bool | None = None):
    """Likelihood of the reference answer given the reasoning (options: scorer, kind, format_coef, ...).

    Scorer: ``scorer="reference"`` uses ``ref_model``; ``"policy"`` uses ``policy`` (else ``model``);
    unset, it uses ``ref_model`` if given, else ``model``, else ``policy``. ``cache_baseline``
    defaults to True only when the scorer is known to be frozen (it is ``ref_model``, or it is not
    the ``policy`` passed alongside).
    """
    if scorer == "reference":
        scoring_model = ref_model
    elif scorer == "policy":
        scoring_model = policy if policy is not None else model
    elif scorer is None:
        scoring_model = next((m for m in (ref_model, model, policy) if m is not None), None)
    else:
        raise RewardError(f"likelihood reward: scorer must be 'reference' (frozen ref_model) or 'policy', "
                          f"got {scorer!r}")
    if scoring_model is None:
        needed = {"reference": "ref_model", "policy": "policy or model"}.get(scorer, "ref_model, model or policy")
        raise RewardError(f"likelihood reward{f' with scorer={scorer!r}' if scorer else ''} needs a scoring "
                          f"model: pass {needed} to get_reward")
    if cache_baseline is None:
        cache_baseline = scoring_model is ref_model or (policy is not None and scoring_model is not policy)
    return LikelihoodReward(scoring_model, tokenizer, kind=kind, answer_field=answer_field,
                            answer_template=answer_template, split_marker=split_marker,
                            batch_size=batch_size, format_coef=format_coef, cache_baseline=cache_baseline)


def _scorer_logps(model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    if isinstance(model, nn.Module):
        with eval_mode(model):
            return token_logps(model, input_ids, attention_mask, temperature=1.0)
    return model.token_logps(input_ids, attention_mask, temperature=1.0)


def _mean(values: list) -> float | None:
    return sum(values) / len(values) if values else None
