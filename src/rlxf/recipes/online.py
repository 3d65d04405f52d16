"""What the online recipes (``grpo``, ``ppo``) share: their config, prompts, rewards, evaluation.

An online step is: sampler picks prompts → the rollout engine samples completions from the
current policy → reward functions score them → (the recipe turns scores into advantages and
updates the policy). This module holds everything up to the scores, plus greedy evaluation on
held-out prompts, so each recipe file is only its own objective.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from rlxf.config import ConfigError
from rlxf.configs.online import OnlineConfig

log = logging.getLogger("rlxf.online")



def build_engine(cfg: OnlineConfig, model, tokenizer, *, max_batch_size: int):
    """The rollout engine sampling from ``model`` in place: ``StaticEngine`` (static KV cache, CUDA-graph
    decode; it falls back to ``HFEngine`` for architectures it does not cover) on CUDA with
    ``--engine auto``, else ``HFEngine``; ``--adapter-sampling`` says how the static engine serves a
    LoRA/QLoRA policy. Both return the same ``Rollouts`` (greedy tokens equal, tested)."""
    from rlxf.rollout import HFEngine, StaticEngine

    device = next(model.parameters()).device
    # --fsdp: the HF engine, on the weights fsdp.gathered() unshards around each sampling step
    use_static = cfg.engine == "static" or (cfg.engine == "auto" and device.type == "cuda" and not cfg.fsdp)
    if use_static:
        return StaticEngine(model, tokenizer, max_batch_size=max_batch_size,
                            compile=cfg.compile and device.type == "cuda", adapters=cfg.adapter_sampling)
    return HFEngine(model, tokenizer, max_batch_size=max_batch_size)


def generate(engine, prompts: PromptSet, indices: list[int], params) -> tuple[object, dict]:
    """``(Rollouts, episode info)`` for ``prompts[indices]``, ``params.n`` samples each: one
    ``engine.generate`` call, or multi-turn episodes when ``engine`` is an
    :class:`~rlxf.rollout.multiturn.EnvRollout` (its environments reset with the rows). The info
    holds per-sample ``env_rewards``, ``turns`` and ``tool_calls`` for episodes, else nothing."""
    if hasattr(engine, "generate_episodes"):
        rows = [{k: v for k, v in prompts.rows[i].items() if k != "prompt_ids"} for i in indices]
        episodes = engine.generate_episodes(rows, params)
        return episodes.rollouts, {"env_rewards": episodes.env_rewards, "turns": episodes.turns,
                                   "tool_calls": episodes.tool_calls}
    return engine.generate(prompts.prompt_ids(indices), params), {}


def episode_metrics(episodes: dict) -> dict:
    """Mean turns and tool calls per episode (nothing for single-turn rollouts)."""
    if not episodes:
        return {}
    n = max(1, len(episodes["turns"]))
    return {"turns": sum(episodes["turns"]) / n, "tool_calls": sum(episodes["tool_calls"]) / n}


# -- prompts ------------------------------------------------------------------------------------

@dataclass
class PromptSet:
    """Tokenised prompt rows; ``rows[i]`` keeps every field of the row for reward functions."""

    rows: list[dict]
    task: object | None = None  # rlxf.tasks.Task when the dataset is a built-in task

    def __len__(self) -> int:
        return len(self.rows)

    def prompt_ids(self, indices: list[int]) -> list[list[int]]:
        return [self.rows[i]["prompt_ids"] for i in indices]


def load_prompts(cfg: OnlineConfig, tokenizer, rows: tuple[list[dict], list[dict]] | None = None
                 ) -> tuple[PromptSet, PromptSet]:
    """(train prompts, eval prompts), tokenised; prompts longer than max_prompt_length are dropped.

    ``rows``: the validated ``(train rows, eval rows)`` when the recipe loaded them before writing
    anything (:func:`rlxf.recipes.common.load_split_rows`); None loads them here."""
    from rlxf.data import tokenize_prompts
    from rlxf.recipes.common import MIN_EVAL_ROWS, check_eval_size, load_split_rows
    from rlxf.tasks import get_task

    train_rows, eval_rows = rows if rows is not None else load_split_rows(cfg, "prompt")
    task = get_task(cfg.dataset.split(":", 1)[1]) if cfg.dataset.startswith("task:") else None
    train, _ = tokenize_prompts(train_rows, tokenizer, max_prompt_length=cfg.max_prompt_length)
    evals = tokenize_prompts(eval_rows[:cfg.eval_generate], tokenizer,
                             max_prompt_length=cfg.max_prompt_length)[0] if eval_rows else []
    if len(eval_rows) >= MIN_EVAL_ROWS > len(evals):  # the rows were enough; what is evaluated is not
        check_eval_size(len(evals), f"--eval-generate {cfg.eval_generate} of the {len(eval_rows)} eval rows, "
                        f"the prompts within --max-prompt-length {cfg.max_prompt_length}",
                        f"Raise --eval-generate to at least {MIN_EVAL_ROWS}.")
    if len(train) < cfg.batch_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} exceeds the {len(train)} usable training prompts; "
                          f"lower it or add data")
    return PromptSet(train, task), PromptSet(evals, task)


# -- rewards ------------------------------------------------------------------------------------

@dataclass
class Scores:
    """Scores of one rollout batch (N rows)."""

    rewards: list[float | None]   # the total reward used for advantages (None = no opinion)
    correct: list[bool | None]    # verifier outcome (None when there is no verifier)
    parts: dict[str, list[float | None]] = field(default_factory=dict)  # components, for logging
    stats: dict[str, float] = field(default_factory=dict)

    def rows(self, start: int, stop: int) -> Scores:
        """The scores of rows ``start:stop`` (``stats`` are the whole batch's)."""
        return Scores(self.rewards[start:stop], self.correct[start:stop],
                      {name: values[start:stop] for name, values in self.parts.items()}, dict(self.stats))


class RewardPipeline:
    """Base reward (+ format, Kimi length and overlong terms) with failures isolated per sample and
    counted (``health``: :class:`~rlxf.train.reward_health.RewardHealth`; ``Scores.stats`` adds
    ``samples`` and ``failed`` to :func:`~rlxf.rewards.call_reward`'s counts).

    ``correct`` comes from the task's verifier for ``task:`` datasets, else from exact match
    against an ``answer`` field when rows have one; it feeds accuracy, the length reward and the
    samplers, never the base reward directly unless the base reward is the verifier.
    """

    def __init__(self, cfg: OnlineConfig, *, tokenizer, task, policy, ref_model=None):
        from rlxf.rewards import get_reward, reward_name
        from rlxf.train.reward_health import RewardHealth

        self.cfg, self.task, self.tokenizer = cfg, task, tokenizer
        context = {"tokenizer": tokenizer, "model": policy, "policy": policy, "ref_model": ref_model,
                   "scorer": cfg.likelihood_scorer, "task": task, "kind": cfg.likelihood_kind,
                   "path": cfg.reward_model, "device": next(policy.parameters()).device, **cfg.reward_options(),
                   "unsafe_reward_code": cfg.unsafe_reward_code}
        self.base = get_reward(cfg.reward, reward_args=cfg.reward_args, **context)
        self.format = get_reward("format", pattern=r"#\s*-?\d") if cfg.format_weight else None
        self.name = reward_name(self.base)
        self.health = RewardHealth(self.name, max_failure_share=cfg.max_reward_failure_share,
                                   patience=cfg.reward_failure_patience)

    def verify(self, completions: list[str], rows: list[dict]) -> list[bool | None]:
        from rlxf.rewards import exact_match

        if self.task is not None:
            return [bool(self.task.verify(c, r["answer"])) for c, r in zip(completions, rows)]
        if all("answer" in r for r in rows):
            values = exact_match([r["prompt"] for r in rows], completions, answer=[r["answer"] for r in rows])
            return [v is not None and v > 0.5 for v in values]
        return [None] * len(rows)

    def __call__(self, rows: list[dict], completions: list[str], lengths: list[int], *, step: int,
                 group_size: int, overlong: tuple[int, int, float] | None = None,
                 env_rewards: list[float] | None = None) -> Scores:
        """Score one rollout batch; ``env_rewards`` (multi-turn episodes: each episode's summed step
        rewards) are added to the total as the part ``env``."""
        from rlxf.rewards import call_reward, kimi_length_reward, overlong_penalty

        prompts = [r["prompt"] for r in rows]
        fields = _row_fields(rows)
        base, stats = call_reward(self.health.traced(self.base, step=step + 1, split="train"), prompts, completions,
                                  fields, name=self.name)
        stats = {**stats, "samples": len(completions), "failed": stats["errors"] + stats["nonfinite"]}
        correct = self.verify(completions, rows)
        parts = {"base": base}
        total = list(base)
        if self.format is not None:
            fmt, _ = call_reward(self.format, prompts, completions, fields)
            parts["format"] = fmt
            total = [_add(t, self.cfg.format_weight, f) for t, f in zip(total, fmt)]
        if self.cfg.length_reward_weight and step >= self.cfg.length_reward_warmup:
            if any(c is None for c in correct):
                raise ConfigError("--length-reward-weight needs a verifier (a task: dataset or rows with 'answer')")
            length = kimi_length_reward(lengths, correct, group_size)
            parts["length"] = length
            total = [_add(t, self.cfg.length_reward_weight, v) for t, v in zip(total, length)]
        if overlong is not None:
            max_len, buffer, factor = overlong
            penalty = overlong_penalty(lengths, max_len, buffer, factor=factor)
            parts["overlong"] = penalty
            total = [_add(t, 1.0, v) for t, v in zip(total, penalty)]
        if env_rewards is not None:
            parts["env"] = list(env_rewards)
            total = [_add(t, 1.0, v) for t, v in zip(total, env_rewards)]
        return Scores(rewards=total, correct=correct, parts=parts, stats=stats)


def _add(total, weight, value):
    return None if total is None or value is None else total + weight * value


def _row_fields(rows: list[dict]) -> dict[str, list]:
    """Row fields (except prompt and token ids) as per-row lists, the reward-function contract."""
    keys = [k for k in rows[0] if k not in ("prompt", "prompt_ids") and not k.startswith("_")]
    return {k: [r.get(k) for r in rows] for k in keys}


def reward_tensor(rewards: list[float | None], group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards [N] float32, valid [N] bool): a None reward is replaced by its group's mean of
    valid rewards (so its advantage is 0) and marked invalid, so the recipe masks it out of the
    loss; a group with no valid reward gets 0 everywhere."""
    values = torch.tensor([math.nan if r is None else float(r) for r in rewards])   # [N]
    valid = ~torch.isnan(values)
    groups = values.view(-1, group_size)                                                 # [P, G]
    vmask = valid.view(-1, group_size)
    counts = vmask.sum(-1, keepdim=True).clamp(min=1)
    means = torch.where(vmask, groups, torch.zeros_like(groups)).sum(-1, keepdim=True) / counts
    filled = torch.where(vmask, groups, means.expand_as(groups))
    return filled.reshape(-1), valid


# -- evaluation ---------------------------------------------------------------------------------

@torch.no_grad()
def evaluate_greedy(engine, prompts: PromptSet, pipeline: RewardPipeline, *, max_new_tokens: int,
                    batch_size: int = 256) -> dict:
    """Greedy completions for the eval prompts: accuracy (verifier), mean base reward, mean length
    (and ``reward_errors`` when the reward failed on some); nothing without eval prompts."""
    from rlxf.rollout import SamplingParams

    if not len(prompts):
        return {}
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, n=1)
    texts, lengths, truncated, episodes = [], [], 0, {}
    for start in range(0, len(prompts), batch_size):
        idx = list(range(start, min(len(prompts), start + batch_size)))
        out, info = generate(engine, prompts, idx, params)
        for key, values in info.items():
            episodes.setdefault(key, []).extend(values)
        texts += out.text
        lengths += out.completion_lengths().tolist()
        truncated += sum(r == "length" for r in out.finish_reason)
    metrics = {"completion_length": sum(lengths) / len(lengths), "truncated_fraction": truncated / len(lengths),
               **episode_metrics(episodes)}
    correct = pipeline.verify(texts, prompts.rows)
    if all(c is not None for c in correct):
        metrics["task_accuracy"] = sum(correct) / len(correct)
    from rlxf.rewards import call_reward

    scorer = getattr(pipeline.base, "eval_fn", pipeline.base)  # a training-only shaping term (LMGT) is left out
    values, stats = call_reward(pipeline.health.traced(scorer, step=None, split="eval"),
                                [r["prompt"] for r in prompts.rows], texts, _row_fields(prompts.rows),
                                name=pipeline.name)
    if stats["errors"] + stats["nonfinite"]:
        metrics["reward_errors"] = stats["errors"] + stats["nonfinite"]
    valid = [v for v in values if v is not None]
    if valid:
        metrics["reward"] = sum(valid) / len(valid)
    return metrics


@torch.no_grad()
def reference_answer_nll(model, tokenizer, rows: list[dict], *, field_name: str = "reference") -> list[float] | None:
    """Mean token NLL of each row's reference completion under ``model`` (APS difficulty input);
    None when rows carry no reference."""
    from rlxf.models import token_logps

    if not all(isinstance(r.get(field_name), str) for r in rows):
        return None
    device = next(model.parameters()).device
    seqs, starts = [], []
    for r in rows:
        completion = tokenizer(r[field_name], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seqs.append(list(r["prompt_ids"]) + completion)
        starts.append(len(r["prompt_ids"]))
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    logps = token_logps(model, ids.to(device), mask.to(device)).cpu()          # [B, T-1]
    target = torch.zeros_like(logps)
    for i, (s, start) in enumerate(zip(seqs, starts)):
        target[i, start - 1:len(s) - 1] = 1
    return (-(logps * target).sum(-1) / target.sum(-1)).tolist()
