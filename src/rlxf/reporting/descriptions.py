"""What each logged metric means: the one table behind the captions of ``report.png`` and ``report.html``.

:data:`METRICS` maps a metric name (as in ``metrics.jsonl``) to a :class:`MetricInfo`: what the
number is, why its curve may be flat, and when a run does not log it at all. A name may contain
``<placeholders>`` (``accuracy/<kind>``) that stand for one path segment. A name that means
different things in different recipes maps to several entries, each with ``when``: the entry
applies to runs that also logged that key (the reward model's ``accuracy`` comes with
``score/chosen``); the entry without ``when`` is the fallback.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable


@dataclasses.dataclass(frozen=True)
class MetricInfo:
    """One row of :data:`METRICS`.

    ``what``: what the number is. ``flat``: why its curve can be constant (shown when it is).
    ``absent``: when a run does not log it. ``when``: the entry describes only runs that also
    logged this key (``None``: any run).
    """

    what: str
    flat: str = ""
    absent: str = ""
    when: str | None = None


_KL_GRPO = MetricInfo(
    "mean per-token KL estimate (--kl-kind) from the policy to the reference, weighted by β in the loss",
    absent="logged only with β > 0 (--beta): β = 0 trains without a reference model or KL term")
_KL_PPO = MetricInfo(
    "KL to the reference summed over each completion (--kl-kind), mean over the batch; β·KL is "
    "subtracted from the reward", when="kl_coef")
_ONE_UPDATE = "0 with one update per batch (--ppo-epochs 1, --mini-batches 1): ρ is exactly 1, nothing is clipped"

METRICS: dict[str, MetricInfo | tuple[MetricInfo, ...]] = {
    # -- held-out evaluation (every recipe) ---------------------------------------------------
    "task_accuracy": MetricInfo(
        "greedy accuracy on the held-out problems of the built-in task, checked by its verifier "
        "(exact match on `answer` for a file dataset)",
        absent="logged for a task: dataset (or rows with an `answer`) with --eval-generate N > 0"),
    "reward": (
        MetricInfo("mean σ(score) of the greedy held-out completions under the current VerifyRM",
                   when="rm/accuracy"),
        MetricInfo("mean base reward of the greedy completions on the held-out prompts"),
    ),
    "perplexity": MetricInfo("exp(held-out completion NLL)"),
    # -- losses -------------------------------------------------------------------------------
    "loss": (
        MetricInfo("completion-token NLL (train: batch mean; eval: the whole held-out set)", when="perplexity"),
        MetricInfo("reward-model loss of the pairs (Bradley–Terry or focal, --loss)", when="score/chosen"),
        MetricInfo("ORPO objective: chosen NLL + λ·odds-ratio term", when="log_odds_ratio"),
        MetricInfo("preference loss (--loss: DPO, IPO, cDPO or RPO; + α·NLL with --nll-alpha)",
                   when="rewards/margin"),
        MetricInfo("policy loss: clipped surrogate (+ β·KL), aggregated by --loss-agg", when="frac_zero_adv"),
        MetricInfo("the training objective"),
    ),
    "loss/policy": MetricInfo("PPO clipped policy-gradient loss"),
    "loss/value": MetricInfo("value (critic) loss (clipped with --value-clip > 0)"),
    "nll": MetricInfo("mean token NLL of the chosen completions",
                      absent="DPO/IPO/RPO log it only with --nll-alpha > 0"),
    "lr": MetricInfo("learning rate after the step", flat="--schedule constant, after the warm-up"),
    "grad_norm": MetricInfo("total gradient norm before clipping"),
    "tokens_per_s": MetricInfo("prompt + completion tokens trained per second of the step"),
    # -- pairwise accuracy and scores ---------------------------------------------------------
    "accuracy": (
        MetricInfo("pairwise accuracy: share of pairs the reward model scores chosen above rejected (ties ½)",
                   when="score/chosen"),
        MetricInfo("held-out rewards/accuracy (the report's headline)", when="rewards/accuracy"),
        MetricInfo("held-out log_odds_accuracy (the report's headline)", when="log_odds_ratio"),
        MetricInfo("share of the step's sampled completions the verifier accepts",
                   absent="logged when every prompt has a verifiable answer"),
    ),
    "accuracy/<kind>": MetricInfo("held-out pairwise accuracy on the pairs of one kind (ties ½)",
                                  absent="logged when the held-out pairs carry a pair_kind"),
    "margin": MetricInfo("mean score gap r_chosen − r_rejected"),
    "score/chosen": MetricInfo("mean reward-model score of the chosen completions"),
    "score/rejected": MetricInfo("mean reward-model score of the rejected completions"),
    "rewards/chosen": MetricInfo("mean implicit reward β·(log π − log π_ref) of the chosen completions",
                                 flat="0 while the policy equals the reference"),
    "rewards/rejected": MetricInfo("mean implicit reward β·(log π − log π_ref) of the rejected completions",
                                   flat="0 while the policy equals the reference"),
    "rewards/margin": MetricInfo("mean implicit-reward gap chosen − rejected",
                                 flat="0 while the policy equals the reference"),
    "rewards/accuracy": MetricInfo("share of pairs whose implicit reward ranks chosen above rejected (ties ½)",
                                   flat="0.5 while the policy equals the reference (every pair ties)"),
    "logps/chosen": MetricInfo("mean policy log-prob of the chosen completions"),
    "logps/rejected": MetricInfo("mean policy log-prob of the rejected completions"),
    "log_odds_ratio": MetricInfo("mean log odds(chosen) − log odds(rejected) under the policy"),
    "log_odds_accuracy": MetricInfo("share of pairs with a positive log-odds ratio (ties ½)"),
    # -- online RL: rewards and samples ---------------------------------------------------------
    "reward/mean": (
        MetricInfo("mean raw reward-function value of the step's samples", when="kl_coef"),
        MetricInfo("mean total reward of the step's sampled completions; equals accuracy when the reward "
                   "is the verifier's 0/1"),
    ),
    "reward/std": MetricInfo("standard deviation of the step's rewards"),
    "reward/format": MetricInfo("mean format reward (completion has #<number>)",
                                absent="logged with --format-weight > 0"),
    "reward/length": MetricInfo("mean Kimi length reward (shorter correct completions score higher)",
                                flat="0 while the completions of each group all have the same length",
                                absent="logged with --length-reward-weight > 0, from step --length-reward-warmup"),
    "reward/overlong": MetricInfo("mean DAPO overlong penalty",
                                  flat="0 while no completion reaches the overlong buffer",
                                  absent="logged with --overlong-buffer > 0 (the dapo preset)"),
    "reward/env": MetricInfo("mean of the environment's summed step rewards per episode (--env)",
                             flat="the environment pays nothing per step (calculator, python: 0)",
                             absent="logged with --env"),
    "turns": MetricInfo("model turns per episode (--env)", flat="every episode takes the same turns",
                        absent="logged with --env"),
    "tool_calls": MetricInfo("tool outputs returned per episode: turns that did not end it (--env)",
                             flat="the model calls the tool in every episode (or never)", absent="logged with --env"),
    "score": MetricInfo("mean score after the missing-EOS penalty"),
    "non_score_reward": MetricInfo("mean −β·KL summed per completion (the KL part of the reward)"),
    "kl": (_KL_PPO, _KL_GRPO),
    "kl_coef": MetricInfo("β used this step", flat="fixed β (--kl-target 0)"),
    "entropy": MetricInfo("sampled-token entropy estimate −mean log π(y_t), nats/token"),
    "clip_fraction": MetricInfo("share of tokens whose ratio ρ was clipped", flat=_ONE_UPDATE),
    "value_clip_fraction": MetricInfo("share of tokens whose value estimate was clipped",
                                      flat="0 with --value-clip 0 or one update per batch"),
    "ratio_max": MetricInfo("largest ratio ρ = π/π_old of the step", flat="1 with one update per batch"),
    "frac_zero_adv": MetricInfo("share of groups whose rewards are all equal (they give no gradient)"),
    "completion_length": MetricInfo("mean tokens per completion (train: sampled; eval: greedy on held-out prompts)"),
    "truncated_fraction": MetricInfo("share of completions that hit --max-new-tokens"),
    "eos_fraction": MetricInfo("share of completions that ended with EOS"),
    "groups_sampled": MetricInfo("prompts rolled out this step", flat="the batch size without dynamic sampling"),
    "reward_none": MetricInfo("samples with no reward: the reward function failed or returned None"),
    "reward_errors": MetricInfo("samples whose reward function failed: raised, or returned a non-number, NaN or "
                                "inf (the run stops when it keeps failing: --max-reward-failure-share)"),
    "advantage_mean": MetricInfo("mean GAE advantage", flat="0 with --whiten-advantages"),
    "returns_mean": MetricInfo("mean GAE return"),
    "value_mean": MetricInfo("mean critic value"),
    "sample_tokens_per_s": MetricInfo("generated tokens per second of sampling"),
    "train_tokens_per_s": MetricInfo("tokens per second of the policy update"),
    "sampler/<stat>": MetricInfo("prompt-sampler state (docs/samplers.md)"),
    # -- COOPER (learned verifier reward model) -------------------------------------------------
    "rm/accuracy": MetricInfo("share of held-out rows where the VerifyRM's σ(s) > 0.5 matches the label",
                              absent="logged by rlxf cooper (--reward cooper)"),
    "rm/agreement": MetricInfo("share of the step's rollouts where σ(s) > 0.5 matches the verifier "
                               "(the reward-hacking monitor)", absent="logged by rlxf cooper (--reward cooper)"),
    "rm/auc": MetricInfo("P(score of a correct held-out row > score of a wrong one)"),
    "rm/pair_accuracy": MetricInfo("held-out (correct, wrong) pairs of one problem ranked right"),
    "rm/score_pos": MetricInfo("mean σ(s) of the correct held-out rows"),
    "rm/score_neg": MetricInfo("mean σ(s) of the wrong held-out rows"),
    "rm/score_correct": MetricInfo("mean reward of the rollouts the verifier accepts"),
    "rm/score_wrong": MetricInfo("mean reward of the rollouts the verifier rejects"),
    "rm/groups": MetricInfo("prompt groups scored by the VerifyRM this step"),
    "rm/pairs": MetricInfo("(positive, negative) pairs built for the VerifyRM update"),
    "rm/update_loss": MetricInfo("contrastive loss of the VerifyRM update, before the step",
                                 absent="logged with --cooper-update and at least one pair"),
    "rm/update_pair_accuracy": MetricInfo("share of update pairs with s⁺ > s⁻, before the step"),
    "rm/updates": MetricInfo("VerifyRM updates taken so far"),
    "rm/pretrain_loss": MetricInfo("VerifyRM pretraining BCE (mean of its last 10% of steps)"),
    "rm/pretrain_steps": MetricInfo("VerifyRM pretraining steps"),
    "rm/pretrain_seconds": MetricInfo("VerifyRM pretraining time, seconds"),
    # -- LMGT (judge reward shifting) -------------------------------------------------------------
    "lmgt/shift_plus": MetricInfo("samples the judge approved (δ = +1)", absent="logged with --reward lmgt"),
    "lmgt/shift_zero": MetricInfo("samples the judge was neutral on (δ = 0)", absent="logged with --reward lmgt"),
    "lmgt/shift_minus": MetricInfo("samples the judge disapproved (δ = −1)", absent="logged with --reward lmgt"),
    "lmgt/agreement_verifier": MetricInfo("among δ ≠ 0 on verifiable samples: share where δ agrees with the "
                                          "verifier", absent="logged with --reward lmgt on verifiable samples"),
    "lmgt/agreement_base": MetricInfo("among δ ≠ 0: share where δ's sign matches the base reward above/below "
                                      "its batch mean", absent="logged with --reward lmgt"),
    "lmgt/not_called": MetricInfo("samples left out by --lmgt-call-fraction (δ = 0)"),
    "lmgt/failed": MetricInfo("samples whose judgement failed (δ = 0)"),
    "lmgt/calls": MetricInfo("samples sent to the judge this step"),
    "lmgt/calls_total": MetricInfo("samples sent to the judge since the start"),
    "lmgt/cache_hits": MetricInfo("samples answered from the judgement cache"),
    "lmgt/cache_size": MetricInfo("cached judgements"),
    "lmgt/scale": MetricInfo("shift scale used this step", flat="no decay (--lmgt-decay 0)"),
    # -- COOL-RLHF rounds -----------------------------------------------------------------------
    "rm_accuracy": MetricInfo("pairwise accuracy of the round's RM on held-out task pairs (ties ½)"),
    "rm_accuracy/<domain>": MetricInfo("rm_accuracy on one domain's held-out pairs"),
    "rm_accuracy/<domain>/<kind>": MetricInfo("rm_accuracy on one domain's pairs of one kind"),
    "policy_accuracy": MetricInfo("verifier accuracy of the round's policy, greedy, on held-out prompts"),
    "policy_accuracy/<domain>": MetricInfo("policy_accuracy on one domain"),
    "rm_reward": MetricInfo("mean score the round's RM gives the policy's greedy completions"),
    "rm_reward/<domain>": MetricInfo("rm_reward on one domain"),
    "hack/fraction": MetricInfo("share of completions in the RM's top quantile that the verifier says are wrong"),
    "hack/top_wrong_rate": MetricInfo("wrong among the RM's top-scored completions"),
    "hack/wrong_rate": MetricInfo("wrong among all completions"),
    "delta/rm_reward": MetricInfo("rise of the RM's mean score from the previous round's policy to this one's",
                                  absent="logged from round 1 on"),
    "delta/accuracy": MetricInfo("policy_accuracy change from the previous round", absent="logged from round 1 on"),
}


def _pattern(name: str) -> re.Pattern:
    """``accuracy/<kind>`` → a regex where each ``<placeholder>`` matches one path segment."""
    parts = re.split(r"(<[^<>/]+>)", name)
    return re.compile("".join("[^/]+" if p.startswith("<") else re.escape(p) for p in parts) + r"\Z")


_PATTERNS = [(name, _pattern(name)) for name in METRICS if "<" in name]


def table_name(key: str) -> str | None:
    """The :data:`METRICS` name that describes ``key`` (itself, or a pattern such as
    ``accuracy/<kind>``); ``None`` when the table has no entry."""
    if key in METRICS:
        return key
    return next((name for name, pattern in _PATTERNS if pattern.match(key)), None)


def describe(key: str, logged: Iterable[str] = ()) -> MetricInfo | None:
    """The :class:`MetricInfo` of ``key`` in a run that logged the keys ``logged``; ``None`` if unknown."""
    name = table_name(key)
    if name is None:
        return None
    entries = METRICS[name]
    if isinstance(entries, MetricInfo):
        return entries
    logged = set(logged)
    return next((e for e in entries if e.when is None or e.when in logged), None)
