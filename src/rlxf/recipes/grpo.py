"""``rlxf grpo``: group-relative policy optimisation and its named variants (SPECS.md §5, §9).

One step, top to bottom:

    sampler picks ``batch_size`` prompts → engine samples ``group_size`` completions each
      (π_old = the current weights, temperature τ)
    → rewards (base reward [+ format] [+ Kimi length] [+ DAPO overlong]; None = masked out)
    → [DAPO dynamic sampling: drop groups whose rewards are all equal, sample more prompts]
    → advantages per group: Â_i = (r_i − mean_G r) [/ std_G r]   (RLOO: leave-one-out mean)
    → ``ppo_epochs`` × ``mini_batches`` updates of
         ℓ_{i,t} = −min(ρ Â, clip(ρ, 1−ε_low, 1+ε_high) Â) + β · KL_k3(π_θ ‖ π_ref)
      aggregated by ``loss_agg`` (token-mean | seq-mean-token-mean | seq-mean-token-sum-norm …)

Presets fill the fields left unset (``None``) and are the only place a method name decides a
number; every resolved value is written to config.yaml:

| preset  | advantage scale | leave-one-out | loss_agg                | ε_high | β    | dynamic sampling | overlong |
|---------|-----------------|---------------|-------------------------|--------|------|------------------|----------|
| grpo    | group (z-score) | no            | seq-mean-token-mean     | ε_low  | 0.04 | no               | no       |
| dr_grpo | none            | no            | seq-mean-token-sum-norm | ε_low  | 0    | no               | no       |
| dapo    | group           | no            | token-mean              | 0.28   | 0    | yes              | yes      |
| rloo    | none            | yes           | seq-mean-token-mean     | ε_low  | 0    | no               | no       |

Deviations, stated: ``entropy`` is the sampled-token estimate −mean log π(y_t) (exact in
expectation at τ = 1, no full-vocabulary pass); with one update per batch the old log-probs are
the detached current ones (ρ ≡ 1, TRL's shortcut), otherwise they are recomputed once before the
updates; a sample whose reward is None is excluded from its group's statistics and from the loss.
RLOO here is the leave-one-out baseline inside the GRPO loss (TRL's RLOOTrainer uses the same
baseline with a sequence-level REINFORCE loss; with one update per batch and ρ ≡ 1 the gradients
differ only by the aggregation).

Under ``torchrun`` (docs/distributed.md) each process samples its share of every step's prompts,
the token-mean normaliser counts every process's tokens and the gradients are averaged before each
optimiser step; dynamic sampling, the APS sampler and rewards that learn after each step are refused.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, replace

import torch

from rlxf.config import (AT_LEAST_ONE, NON_NEGATIVE, Bounds, ConfigError, between, check_choice, option, save_yaml,
                         to_dict)
from rlxf.losses import (AGGREGATION_MODES, ADVANTAGE_SCALES, KL_KINDS, aggregate, clip_fraction,
                         clipped_policy_loss, group_advantages, kl_penalty)
from rlxf.recipes.common import (FAULT_ENV, NullLogger, TrainingError, autocast_context, build_optimizer,
                                 check_output_dir, load_model_for_training, load_split_rows, lr_multiplier,
                                 peak_memory_mb, setup_logging, start_run_dir)
from rlxf.recipes.online import (OnlineConfig, RewardPipeline, build_engine, evaluate_greedy, load_prompts,
                                 reference_answer_nll, reward_tensor)
from rlxf.reporting import MetricsLogger, Panel, Progress, write_report, write_summary
from rlxf.runtime import distributed, latest_checkpoint, load_checkpoint, save_checkpoint

log = logging.getLogger("rlxf.grpo")

PRESETS: dict[str, dict] = {
    "grpo": dict(advantage_scale="group", leave_one_out=False, loss_agg="seq-mean-token-mean", eps_high=None,
                 beta=0.04, dynamic_sampling=False, overlong_buffer=0),
    "dr_grpo": dict(advantage_scale="none", leave_one_out=False, loss_agg="seq-mean-token-sum-norm",
                    eps_high=None, beta=0.0, dynamic_sampling=False, overlong_buffer=0),
    "dapo": dict(advantage_scale="group", leave_one_out=False, loss_agg="token-mean", eps_high=0.28, beta=0.0,
                 dynamic_sampling=True, overlong_buffer=-1),
    "rloo": dict(advantage_scale="none", leave_one_out=True, loss_agg="seq-mean-token-mean", eps_high=None,
                 beta=0.0, dynamic_sampling=False, overlong_buffer=0),
}


@dataclass(frozen=True)
class GRPOConfig(OnlineConfig):
    """Config of ``rlxf grpo``; fields left as None take the preset's value (see the module docstring)."""

    preset: str = option("grpo", "named variant that fills unset fields", choices=tuple(PRESETS))
    advantage_scale: str | None = option(None, "divide group-centred rewards by the group std, the batch std, "
                                         "or nothing (None = preset)", choices=ADVANTAGE_SCALES)
    leave_one_out: bool | None = option(None, "RLOO baseline: mean of the other G−1 rewards (None = preset)")
    loss_agg: str | None = option(None, "how per-token losses become one number (None = preset)",
                                  choices=AGGREGATION_MODES)
    eps_low: float = option(0.2, "clip range below 1: ρ ≥ 1 − eps_low", bounds=between(0, 1, high_open=True))
    eps_high: float | None = option(None, "clip range above 1: ρ ≤ 1 + eps_high (None = preset; DAPO 0.28)",
                                    bounds=NON_NEGATIVE)
    beta: float | None = option(None, "KL-in-loss coefficient β (0 = no reference model; None = preset)",
                                bounds=NON_NEGATIVE)
    kl_kind: str = option("k3", "KL estimator in the loss", choices=KL_KINDS)
    dynamic_sampling: bool | None = option(None, "DAPO: keep only groups whose rewards differ and sample more "
                                           "prompts to refill the batch (None = preset)")
    max_sample_batches: int = option(3, "dynamic sampling: most rollout batches drawn per step", bounds=AT_LEAST_ONE)
    overlong_buffer: int | None = option(None, "DAPO overlong shaping: penalise the last N tokens before "
                                         "max_new_tokens (0 = off, -1 = max_new_tokens // 4; None = preset)",
                                         bounds=Bounds(low=0, special=(-1,)))
    overlong_factor: float = option(1.0, "DAPO overlong penalty at max_new_tokens", bounds=NON_NEGATIVE)
    mask_truncated: bool = option(False, "drop completions that hit max_new_tokens from the loss (overlong filtering)")
    ppo_epochs: int = option(1, "passes over each rollout batch (μ; > 1 makes ρ ≠ 1 and clipping active)",
                             bounds=AT_LEAST_ONE)
    mini_batches: int = option(1, "optimizer steps per pass over a rollout batch", bounds=AT_LEAST_ONE)
    micro_batch_size: int = option(256, "completions per forward/backward (memory; does not change the maths)",
                                   bounds=AT_LEAST_ONE)
    share_prompt: bool = option(False, "encode each group's prompt once for its G completions in the training "
                                "passes (KV cache; same values and gradients); mini-batches then shuffle whole "
                                "groups; needs micro-batches of whole groups; not with --gradient-checkpointing "
                                "or --compile")
    reference: str = option("auto", "reference for the KL term or the likelihood scorer: auto (copy, or base "
                            "without adapters for LoRA), copy, lora", choices=("auto", "copy", "lora"))
    lr: float = option(1e-4, "learning rate (AdamW); tuned for the tiny model — use ~1e-6 for real LLMs")
    max_steps: int = option(60, "rollout steps", bounds=AT_LEAST_ONE)
    adam_beta2: float = option(0.99, "AdamW beta2")

    def __post_init__(self):
        super().__post_init__()
        for name in ("preset", "kl_kind", "reference"):
            check_choice(self, name)
        preset = PRESETS[self.preset]
        for name, value in preset.items():
            if getattr(self, name) is None:
                if name == "eps_high" and value is None:
                    value = self.eps_low
                object.__setattr__(self, name, value)
        if self.overlong_buffer == -1:
            object.__setattr__(self, "overlong_buffer", max(1, self.max_new_tokens // 4))
        for name in ("advantage_scale", "loss_agg"):
            check_choice(self, name)
        if self.group_size < 2:
            raise ConfigError(f"--group-size must be >= 2 for group-relative advantages, got {self.group_size}")
        if self.overlong_buffer >= self.max_new_tokens:
            raise ConfigError(f"--overlong-buffer must be in [0, max_new_tokens={self.max_new_tokens}) "
                              f"(or -1 for max_new_tokens // 4), got {self.overlong_buffer}")
        if (self.batch_size * self.group_size) % self.mini_batches:
            raise ConfigError(f"--mini-batches {self.mini_batches} must divide batch_size × group_size = "
                              f"{self.batch_size * self.group_size}")
        if self.reference == "lora" and self.lora_r == 0:
            raise ConfigError("--reference lora needs a LoRA run (--lora-r > 0)")
        if self.share_prompt:
            if self.gradient_checkpointing or self.compile:
                raise ConfigError("--share-prompt needs the KV cache, which transformers turns off under "
                                  "--gradient-checkpointing, and is not tested with --compile; drop one of them")
            mini = self.batch_size * self.group_size // self.mini_batches
            if self.micro_batch_size % self.group_size or mini % self.group_size:
                raise ConfigError(f"--share-prompt needs whole groups per micro-batch and mini-batch: "
                                  f"--micro-batch-size {self.micro_batch_size} and the mini-batch size {mini} must "
                                  f"be multiples of --group-size {self.group_size}")

    @property
    def needs_reference(self) -> bool:
        return self.beta > 0 or (self.reward == "likelihood" and self.likelihood_scorer == "reference")


@dataclass(frozen=True)
class DrGRPOConfig(GRPOConfig):
    """``rlxf dr_grpo``: the ``dr_grpo`` preset."""

    preset: str = option("dr_grpo", "named variant that fills unset fields", choices=tuple(PRESETS))


@dataclass(frozen=True)
class DAPOConfig(GRPOConfig):
    """``rlxf dapo``: the ``dapo`` preset."""

    preset: str = option("dapo", "named variant that fills unset fields", choices=tuple(PRESETS))


@dataclass(frozen=True)
class RLOOConfig(GRPOConfig):
    """``rlxf rloo``: the ``rloo`` preset."""

    preset: str = option("rloo", "named variant that fills unset fields", choices=tuple(PRESETS))


# -- one step's pieces --------------------------------------------------------------------------

def sample_groups(engine, prompts, sampler, pipeline, cfg: GRPOConfig, step: int, params):
    """Roll out, score and (DAPO) filter until ``batch_size`` informative groups are collected.

    Returns ``(rollouts, rows, rewards, correct, parts, info)`` for the kept groups, in group order.
    """
    G = cfg.group_size
    overlong = (cfg.max_new_tokens, cfg.overlong_buffer, cfg.overlong_factor) if cfg.overlong_buffer else None
    kept: list[tuple] = []   # (rollouts, row slice, scores, rows) per kept group
    info = {"sample_seconds": 0.0, "sample_tokens": 0, "groups_sampled": 0, "reward_none": 0,
            "sampler_feedback": []}
    rank, world = distributed.rank(), distributed.world_size()
    share = cfg.batch_size // world                    # every rank draws the same order and takes its share
    if world > 1:   # independent draws on each rank, repeated exactly by a resumed run (rank 0 keeps the RNG)
        params = replace(params, seed=(cfg.seed * 1_000_003 + step) * 1009 + rank)
    for _ in range(cfg.max_sample_batches if cfg.dynamic_sampling else 1):
        indices = sampler.sample(cfg.batch_size)[rank * share:(rank + 1) * share]
        t0 = time.time()
        out = engine.generate(prompts.prompt_ids(indices), params)
        info["sample_seconds"] += time.time() - t0
        info["sample_tokens"] += out.num_tokens()
        rows = [prompts.rows[i] for i in indices for _ in range(G)]
        scores = pipeline(rows, out.text, out.completion_lengths().tolist(), step=step, group_size=G,
                          overlong=overlong)
        info["reward_none"] += scores.stats.get("none", 0)
        info["groups_sampled"] += len(indices)
        rewards, _ = reward_tensor(scores.rewards, G)
        last = []
        for g, index in enumerate(indices):
            sl = slice(g * G, (g + 1) * G)
            if all(c is not None for c in scores.correct[sl]):
                info["sampler_feedback"].append((index, sum(scores.correct[sl]) / G))
            last.append((out, sl, scores, rows))
            if not cfg.dynamic_sampling or bool(rewards[sl].max() > rewards[sl].min()):
                kept.append((out, sl, scores, rows))
        if len(kept) >= share:
            break
    if not kept:  # every group uninformative after max_sample_batches: train on the last (zero advantage)
        kept = last
    kept = kept[:share]
    merged = _merge_rows([(o, list(range(sl.start, sl.stop))) for o, sl, _, _ in kept], G)
    pick = lambda values: [v for (_, sl, sc, _) in kept for v in values(sc)[sl]]  # noqa: E731
    rows = [r for (_, sl, sc, batch_rows) in kept for r in batch_rows[sl]]
    parts = {name: pick(lambda sc, n=name: sc.parts[n]) for name in kept[0][2].parts}
    return merged, rows, pick(lambda sc: sc.rewards), pick(lambda sc: sc.correct), parts, info


def _merge_rows(selections, group_size):
    """One :class:`Rollouts` from ``[(rollouts, row indices), ...]``, padding to the widest piece."""
    from rlxf.rollout import Rollouts

    P = max(r.prompt_ids.shape[1] for r, _ in selections)
    C = max(int(r.completion_mask[idx].sum(-1).max()) for r, idx in selections)
    pad = lambda t, w, left, value: torch.nn.functional.pad(  # noqa: E731
        t, (w - t.shape[1], 0) if left else (0, w - t.shape[1]), value=value)
    pieces = {k: [] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "logps")}
    text, finish = [], []
    for r, idx in selections:
        pad_id = int(r.prompt_ids[r.prompt_mask == 0][0]) if (r.prompt_mask == 0).any() else 0
        pieces["prompt_ids"].append(pad(r.prompt_ids[idx], P, True, pad_id))
        pieces["prompt_mask"].append(pad(r.prompt_mask[idx], P, True, 0))
        pieces["completion_ids"].append(pad(r.completion_ids[idx][:, :C], C, False, 0))
        pieces["completion_mask"].append(pad(r.completion_mask[idx][:, :C], C, False, 0))
        pieces["logps"].append(pad(r.logps[idx][:, :C], C, False, 0.0))
        text += [r.text[i] for i in idx]
        finish += [r.finish_reason[i] for i in idx]
    n = sum(len(idx) for _, idx in selections)
    return Rollouts(**{k: torch.cat(v) for k, v in pieces.items()}, finish_reason=finish, text=text,
                    prompt_index=torch.arange(n) // group_size, group_size=group_size)


def completion_logps(model, input_ids, attention_mask, P: int, cfg: GRPOConfig, *, reference=None):
    """``[b, C]`` log-probs of the completion tokens of ``[b, P+C]`` rollout rows (prompt width ``P``).

    The output head runs over completion positions only. With ``--share-prompt`` the rows come in
    whole groups of ``G`` and each group's prompt is encoded once (:func:`rlxf.models.shared_prompt_logps`);
    ``reference`` (a :class:`rlxf.models.Reference`) scores under π_ref instead of ``model``.
    """
    from rlxf.models import labels_from, shared_prompt_logps, token_logps

    if cfg.share_prompt:
        G = cfg.group_size
        args = (input_ids[::G, :P], attention_mask[::G, :P], input_ids[:, P:], attention_mask[:, P:])
        if reference is not None:
            return reference.shared_prompt_logps(*args, temperature=cfg.temperature)
        return shared_prompt_logps(model, *args, temperature=cfg.temperature)
    labels = labels_from(P - 1, input_ids)
    if reference is not None:
        return reference.token_logps(input_ids, attention_mask, temperature=cfg.temperature,
                                     label_mask=labels)[:, P - 1:]
    return token_logps(model, input_ids, attention_mask, temperature=cfg.temperature, label_mask=labels)[:, P - 1:]


def policy_loss_terms(model, batch: dict, cfg: GRPOConfig, *, units_total: float):
    """Loss of one micro-batch, scaled so micro-batches add up to the mini-batch's aggregate.

    batch: input_ids/attention_mask [b, P+C], mask/old_logps/ref_logps [b, C], advantages [b].
    ``units_total``: tokens (token-mean) or sequences (other modes) in the whole mini-batch.
    """
    logps = completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["prompt_len"], cfg)  # [b, C]
    mask = batch["mask"]
    old = batch["old_logps"] if batch["old_logps"] is not None else logps.detach()
    per_token = clipped_policy_loss(logps, old, batch["advantages"], eps_low=cfg.eps_low, eps_high=cfg.eps_high)
    kl = None
    if cfg.beta > 0:
        kl = kl_penalty(logps, batch["ref_logps"], kind=cfg.kl_kind)                  # [b, C]
        per_token = per_token + cfg.beta * kl
    units = mask.sum() if cfg.loss_agg == "token-mean" else mask.new_tensor(mask.shape[0])
    if units == 0:
        return logps.sum() * 0.0, {}
    loss = aggregate(per_token, mask, mode=cfg.loss_agg, max_len=cfg.max_new_tokens) * (units / units_total)
    with torch.no_grad():
        n_tok = mask.sum().clamp(min=1)
        stats = {"clip_fraction": float(clip_fraction(logps, old, batch["advantages"], mask, eps_low=cfg.eps_low,
                                                eps_high=cfg.eps_high)),
                 "entropy": (-(logps * mask).sum() / n_tok).item(),
                 "ratio_max": (torch.exp(logps - old) * mask).max().item()}
        if kl is not None:
            stats["kl"] = ((kl * mask).sum() / n_tok).item()
    return loss, stats


# -- the recipe ---------------------------------------------------------------------------------

def train(cfg: GRPOConfig, *, recipe: str | None = None):
    from rlxf.data.samplers import get_sampler
    from rlxf.models import Reference, save_pretrained
    from rlxf.recipes.common import FitResult
    from rlxf.rollout import SamplingParams

    recipe = recipe or cfg.preset
    setup_logging()
    if distributed.launched_world_size() > 1 and (why := data_parallel_limits(cfg)):
        raise ConfigError(why)
    out = check_output_dir(cfg, recipe)
    rows = load_split_rows(cfg, "prompt")
    start_run_dir(cfg, out, recipe)    # only once the inputs are valid
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model_for_training(cfg)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    prompts, eval_prompts = load_prompts(cfg, tokenizer, rows)
    log.info("%d training prompts, %d eval prompts; preset %s: %s", len(prompts), len(eval_prompts), cfg.preset,
             {k: getattr(cfg, k) for k in PRESETS[cfg.preset]})
    reference = None
    if cfg.needs_reference:
        mode = cfg.reference if cfg.reference != "auto" else ("lora" if cfg.lora_r else "copy")
        reference = Reference.build(model, mode)
    pipeline = RewardPipeline(cfg, tokenizer=tokenizer, task=prompts.task, policy=model,
                              ref_model=reference)
    if distributed.active() and hasattr(pipeline.base, "after_step"):   # the same answer on every rank
        raise ConfigError(f"--reward {cfg.reward} learns or counts across the whole batch after each step, which "
                          f"data parallel does not support yet; run it as one process (without torchrun)")
    distributed.broadcast_parameters(model)
    engine = build_engine(cfg, model, tokenizer, max_batch_size=max(256, cfg.batch_size * cfg.group_size))
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            top_k=cfg.top_k, n=cfg.group_size)
    sampler = get_sampler(cfg.sampler, len(prompts), seed=cfg.seed)
    optimizer = build_optimizer(model, cfg)
    updates_per_step = cfg.ppo_epochs * cfg.mini_batches
    total_updates = cfg.max_steps * updates_per_step
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, warmup=cfg.warmup_steps * updates_per_step, total=total_updates,
                                           schedule=cfg.schedule))
    headline = {"task_accuracy": "max", "reward": "max"}
    ckpt_root = out / "checkpoints"
    state = {"start": {}, "best": {}, "last_eval": None, "sample_seconds": 0.0, "train_seconds": 0.0,
             "sample_tokens": 0, "train_tokens": 0}
    step = 0
    if cfg.resume and (ckpt := latest_checkpoint(ckpt_root)) is not None:
        saved = load_checkpoint(ckpt, model=model, optimizer=optimizer, scheduler=scheduler)
        step = saved["step"]
        sampler.load_state_dict(saved["sampler"])
        if hasattr(pipeline.base, "load_state_dict"):
            pipeline.base.load_state_dict(torch.load(ckpt / "reward.pt", weights_only=True))
        state = {k: saved.get(k, v) for k, v in state.items()}
        log.info("resumed from %s (step %d of %d)", ckpt, step, cfg.max_steps)
    metrics_log = (MetricsLogger(out, resume_step=step if step > 0 else None, tensorboard=cfg.tensorboard)
                   if distributed.is_main() else NullLogger())
    fault_step = int(os.environ.get(FAULT_ENV, "0") or 0)

    def evaluate() -> dict:
        with autocast_context(cfg, device, dtype):
            metrics = evaluate_greedy(engine, eval_prompts, pipeline, max_new_tokens=cfg.max_new_tokens,
                                      batch_size=max(cfg.eval_batch_size, 64))
            if hasattr(pipeline.base, "evaluate"):  # a learned reward reports its own held-out quality
                metrics.update(pipeline.base.evaluate())
        return metrics

    def run_eval(at_step: int) -> dict:
        model.eval()
        metrics = distributed.on_main(evaluate)     # rank 0 evaluates under torchrun; every rank gets it
        model.train()
        metrics_log.log(at_step, metrics, split="eval")
        for key, better in headline.items():
            value, best = metrics.get(key), state["best"].get(key)
            if value is not None and (best is None or (value > best if better == "max" else value < best)):
                state["best"][key] = value
        return metrics

    if step == 0:
        state["start"] = state["last_eval"] = run_eval(0)
    model.train()
    bar = Progress(cfg.max_steps, desc=recipe, initial=step, enabled=cfg.progress and distributed.is_main())
    wall0 = time.time()
    try:
        while step < cfg.max_steps:
            metrics = grpo_step(cfg, step, model=model, engine=engine, prompts=prompts, sampler=sampler,
                                pipeline=pipeline, reference=reference, optimizer=optimizer, scheduler=scheduler,
                                params=params, device=device, dtype=dtype, tokenizer=tokenizer)
            if hasattr(pipeline.base, "after_step"):  # stateful rewards (COOPER, LMGT) learn/log after each step
                metrics.update(pipeline.base.after_step(step))
            step += 1
            for key in ("sample_seconds", "train_seconds", "sample_tokens", "train_tokens"):
                state[key] += metrics.pop(f"_{key}")
            bar.update(1, reward=metrics.get("reward/mean", float("nan")))
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                metrics_log.log(step, metrics)
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps:
                state["last_eval"] = run_eval(step)
            if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.max_steps:
                extra = {"reward.pt": pipeline.base.state_dict()} if hasattr(pipeline.base, "state_dict") else None
                distributed.on_main(lambda: save_checkpoint(
                    ckpt_root, step, model=model, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler,
                    state={"sampler": sampler.state_dict(), **state}, keep=cfg.keep_checkpoints, extra=extra))
            if fault_step and step == fault_step:
                os._exit(137)
    finally:
        bar.close()
        metrics_log.close()
    distributed.check_replicas(model)
    final_dir = out / "final"
    distributed.on_main(lambda: save_pretrained(model, tokenizer, final_dir,
                                                merge_lora=cfg.merge_lora and cfg.lora_r > 0))
    summary = online_summary(cfg, recipe, state, headline, wall0, device, final_dir)
    if distributed.active():
        world = distributed.world_size()
        summary["data_parallel"] = {"processes": world, "prompts_per_process": cfg.batch_size // world,
                                    "peak_memory_mb_by_rank": distributed.gather(summary.get("peak_memory_mb"))}

    def write() -> None:
        write_summary(out, summary)
        write_report(out, title=f"rlxf {recipe} ({cfg.preset}): {cfg.model} on {cfg.dataset}", panels=PANELS,
                     summary=summary, config=to_dict(cfg))

    distributed.on_main(write)
    log.info("summary: %s", json.dumps({k: v for k, v in summary.items() if "/" in k}))
    return FitResult(summary=summary, output_dir=out)


def grpo_step(cfg: GRPOConfig, step: int, *, model, engine, prompts, sampler, pipeline, reference, optimizer,
              scheduler, params, device, dtype, tokenizer) -> dict:
    """One rollout step: sample → score → advantages → ``ppo_epochs × mini_batches`` updates."""
    G = cfg.group_size
    rollouts, rows, rewards_list, correct, parts, info = sample_groups(
        engine, prompts, sampler, pipeline, cfg, step, params)     # under torchrun: this rank's share
    feedback = info.pop("sampler_feedback")
    if feedback:
        idx, rates = zip(*feedback)
        nll = None
        if cfg.sampler == "aps":
            model.eval()
            nll = reference_answer_nll(model, tokenizer, [prompts.rows[i] for i in idx])
            model.train()
        sampler.update(list(idx), list(rates), nll)
    rewards, valid = reward_tensor(rewards_list, G)                                       # [N], [N]
    advantages = group_advantages(rewards, G, scale=cfg.advantage_scale, leave_one_out=cfg.leave_one_out)
    rollouts = rollouts.to(device)
    input_ids, attention_mask = rollouts.sequences()                                      # [N, P+C]
    P = rollouts.prompt_ids.shape[1]
    loss_mask = rollouts.completion_mask.float() * valid.to(device).unsqueeze(-1).float()  # [N, C]
    if cfg.mask_truncated:
        finished = torch.tensor([r == "stop" for r in rollouts.finish_reason], device=device)
        loss_mask = loss_mask * finished.unsqueeze(-1).float()
    N = input_ids.shape[0]
    t0 = time.time()
    micro = cfg.micro_batch_size

    def slices(rows):
        return [rows[i:i + micro] for i in range(0, len(rows), micro)]

    with torch.no_grad(), autocast_context(cfg, device, dtype):
        ref_logps = old_logps = None
        if cfg.beta > 0:
            ref_logps = torch.cat([completion_logps(None, input_ids[s], attention_mask[s], P, cfg, reference=reference)
                                   for s in slices(torch.arange(N, device=device))])
        if updates_needed := cfg.ppo_epochs * cfg.mini_batches > 1:
            model.eval()
            old_logps = torch.cat([completion_logps(model, input_ids[s], attention_mask[s], P, cfg)
                                   for s in slices(torch.arange(N, device=device))])
            model.train()
    del updates_needed
    step_stats: list[dict] = []
    adv = advantages.to(device)
    mini = N // cfg.mini_batches
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    grad_norms = []
    for _ in range(cfg.ppo_epochs):
        if cfg.mini_batches == 1:
            order = torch.arange(N)
        elif cfg.share_prompt:  # shuffle whole groups, so every micro-batch holds complete groups
            order = (torch.randperm(N // G, generator=generator)[:, None] * G + torch.arange(G)).flatten()
        else:
            order = torch.randperm(N, generator=generator)
        for m in range(cfg.mini_batches):
            rows_m = order[m * mini:(m + 1) * mini].to(device)
            units_total = loss_mask[rows_m].sum() if cfg.loss_agg == "token-mean" else float(len(rows_m))
            if cfg.loss_agg == "token-mean" and distributed.active():
                # the mean over every rank's tokens: each rank divides by the total / W, and the averaged
                # gradient is then Σ_ranks Σ_tokens / total (sequence modes: equal shares, nothing to do)
                units_total = sum(distributed.gather(float(units_total))) / distributed.world_size()
            units_total = max(float(units_total), 1.0)
            for s in slices(rows_m):
                batch = {"input_ids": input_ids[s], "attention_mask": attention_mask[s], "mask": loss_mask[s],
                         "advantages": adv[s], "prompt_len": P,
                         "old_logps": None if old_logps is None else old_logps[s],
                         "ref_logps": None if ref_logps is None else ref_logps[s]}
                with autocast_context(cfg, device, dtype):
                    loss, stats = policy_loss_terms(model, batch, cfg, units_total=units_total)
                if distributed.any_true(not bool(torch.isfinite(loss))):   # every rank stops together
                    raise TrainingError(f"non-finite loss at step {step + 1}; lower --lr and resume from the "
                                        f"last good checkpoint (--resume)")
                loss.backward()
                step_stats.append({"loss": loss.item(), **stats})
            distributed.average_gradients(model.parameters())
            if cfg.max_grad_norm > 0:
                grad_norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    train_seconds = time.time() - t0
    train_tokens = int(attention_mask.sum()) * cfg.ppo_epochs
    lengths = rollouts.completion_lengths().float()
    groups = rewards.view(-1, G)
    valid_rewards = rewards[valid]
    metrics = {
        "reward/mean": valid_rewards.mean().item() if valid_rewards.numel() else float("nan"),
        "reward/std": valid_rewards.std().item() if valid_rewards.numel() > 1 else 0.0,
        "frac_zero_adv": (groups.max(-1).values == groups.min(-1).values).float().mean().item(),
        "completion_length": lengths.mean().item(),
        "truncated_fraction": sum(r == "length" for r in rollouts.finish_reason) / N,
        "lr": scheduler.get_last_lr()[0],
        "sample_tokens_per_s": info["sample_tokens"] / max(info["sample_seconds"], 1e-9),
        "train_tokens_per_s": train_tokens / max(train_seconds, 1e-9),
        "groups_sampled": info["groups_sampled"],
        "reward_none": info["reward_none"],
        "_sample_seconds": info["sample_seconds"], "_train_seconds": train_seconds,
        "_sample_tokens": info["sample_tokens"], "_train_tokens": train_tokens,
    }
    if all(c is not None for c in correct):
        metrics["accuracy"] = sum(correct) / len(correct)
    for name, values in parts.items():
        if name != "base":
            kept = [v for v in values if v is not None]
            metrics[f"reward/{name}"] = sum(kept) / max(1, len(kept))
    if grad_norms:
        metrics["grad_norm"] = sum(grad_norms) / len(grad_norms)
    keys = {k for s in step_stats for k in s}
    for k in keys:
        vals = [s[k] for s in step_stats if k in s]
        metrics[k] = max(vals) if k == "ratio_max" else sum(vals) / len(vals)
    metrics.update(sampler.stats())
    return combine_rank_metrics(distributed.gather(metrics)) if distributed.active() else metrics


def combine_rank_metrics(per_rank: list[dict]) -> dict:
    """One step's metrics from every rank's: counts summed, times the slowest rank's, throughputs
    recomputed from those, ``ratio_max`` the largest, everything else the mean over ranks (equal shares)."""
    summed = ("groups_sampled", "reward_none", "_sample_tokens", "_train_tokens")
    slowest = ("_sample_seconds", "_train_seconds")
    out = {}
    for key in {k for m in per_rank for k in m}:
        values = [m[key] for m in per_rank if key in m and m[key] is not None]
        if not values:
            out[key] = None
        elif key in summed:
            out[key] = sum(values)
        elif key in slowest or key == "ratio_max":
            out[key] = max(values)
        else:
            out[key] = sum(values) / len(values)
    out["sample_tokens_per_s"] = out["_sample_tokens"] / max(out["_sample_seconds"], 1e-9)
    out["train_tokens_per_s"] = out["_train_tokens"] / max(out["_train_seconds"], 1e-9)
    return out


def data_parallel_limits(cfg: GRPOConfig) -> str | None:
    """Why this configuration cannot run data-parallel (None: it can). Each rank samples its share of
    every step's prompts from the same prompt order; what needs the whole batch in one place is refused."""
    if cfg.dynamic_sampling:
        return ("--dynamic-sampling resamples until enough informative groups are kept, which would make the "
                "processes' prompt orders drift apart; data parallel does not support it yet (run it as one "
                "process, without torchrun, or pass --dynamic-sampling false)")
    if cfg.sampler != "uniform":
        return (f"--sampler {cfg.sampler} adapts to each step's pass rates, which every process would see only "
                f"a share of; data parallel supports --sampler uniform (or run it as one process)")
    return None


PANELS = [
    Panel("held-out accuracy (greedy)", ["task_accuracy"], split="eval", ylabel="accuracy"),
    Panel("reward and sample accuracy", ["reward/mean", "accuracy"], split="train"),
    Panel("KL to reference", ["kl"], split="train"),
    Panel("completion length", ["completion_length"], ylabel="tokens"),
    Panel("entropy (sampled-token estimate)", ["entropy"], split="train", ylabel="nats/token"),
    Panel("clip fraction / zero-advantage groups", ["clip_fraction", "frac_zero_adv"], split="train"),
    Panel("throughput", ["sample_tokens_per_s", "train_tokens_per_s"], split="train", ylabel="tokens/s"),
    Panel("learned reward model (COOPER)", ["rm/accuracy", "rm/agreement"]),
    Panel("LMGT judge shifts (counts per step)", ["lmgt/shift_plus", "lmgt/shift_zero", "lmgt/shift_minus"],
          split="train"),
    Panel("LMGT agreement of δ with the verifier / base reward", ["lmgt/agreement_verifier", "lmgt/agreement_base"],
          split="train", ylabel="fraction"),
]


def online_summary(cfg, recipe, state, headline, wall0, device, final_dir) -> dict:
    """summary.json of an online run: start/final/best of the headline eval metrics and the costs."""
    last = state["last_eval"] or {}
    return {
        "recipe": recipe,
        "preset": getattr(cfg, "preset", None),
        "steps": cfg.max_steps,
        "model": cfg.model,
        "dataset": cfg.dataset,
        "reward": cfg.reward,
        **{f"start/{k}": state["start"].get(k) for k in headline},
        **{f"final/{k}": last.get(k) for k in headline},
        **{f"best/{k}": state["best"].get(k) for k in headline},
        "start/completion_length": state["start"].get("completion_length"),
        "final/completion_length": last.get("completion_length"),
        "eval_start": state["start"],
        "eval_final": last,
        "wall_seconds": round(time.time() - wall0, 2),
        "sample_seconds": round(state["sample_seconds"], 2),
        "train_seconds": round(state["train_seconds"], 2),
        "sample_tokens_per_s": round(state["sample_tokens"] / max(state["sample_seconds"], 1e-9), 1),
        "train_tokens_per_s": round(state["train_tokens"] / max(state["train_seconds"], 1e-9), 1),
        "peak_memory_mb": peak_memory_mb(device),
        "final_model": str(final_dir),
    }
