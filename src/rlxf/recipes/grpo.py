"""``rlxf grpo``: group-relative policy optimisation and its named variants (docs/methods/grpo.md).

One step, top to bottom:

    sampler picks ``batch_size`` prompts → engine samples ``group_size`` completions each
      (π_old = the current weights, temperature τ)
    → rewards (base reward [+ format] [+ Kimi length] [+ DAPO overlong]; None = masked out)
    → [DAPO dynamic sampling: drop groups whose rewards are all equal, sample more prompts]
    → advantages per group: Â_i = (r_i − mean_G r) [/ std_G r]   (RLOO: leave-one-out mean)
    → ``ppo_epochs`` × ``mini_batches`` updates of
         ℓ_{i,t} = −min(ρ Â, clip(ρ, 1−ε_low, 1+ε_high) Â) + β · KL_k3(π_θ ‖ π_ref)
      aggregated by ``loss_agg`` (token-mean | seq-mean-token-mean | seq-mean-token-sum-norm …)

With ``--env`` (docs/methods/tools.md) the engine runs multi-turn episodes instead
(:class:`rlxf.rollout.multiturn.EnvRollout`, after an optional SFT warm-up on the environment's
demonstrations): the reward scores the final model turn, plus the environment's step rewards, and
the tool's output tokens are in the context but not in the loss mask, so the same step trains on
the model's own tokens only.

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
optimiser step; with dynamic sampling the processes draw rollout batches in lockstep; rewards that
learn after each step (COOPER's verifier) learn from every process's rollouts; the APS sampler is
refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from rlxf.config import ConfigError
from rlxf.configs.grpo import PRESETS, DAPOConfig, DrGRPOConfig, GRPOConfig, RLOOConfig
from rlxf.recipes.common import load_model_for_training, load_split_rows, setup_logging
from rlxf.recipes.env_warmup import env_engine
from rlxf.recipes.grpo_step import StepContext, grpo_step
from rlxf.recipes.online import RewardPipeline, build_engine, evaluate_greedy, load_prompts
from rlxf.reporting import Panel
from rlxf.runtime import distributed
from rlxf.train import Loop, build_optimizer, lr_multiplier, run
from rlxf.train.rundir import check_output_dir, start_run_dir

log = logging.getLogger("rlxf.grpo")

# -- the recipe ---------------------------------------------------------------------------------

def train(cfg: GRPOConfig, *, recipe: str | None = None):
    """Run ``rlxf grpo`` (or a preset's command) on the shared loop; returns the run's result."""
    from rlxf.data.samplers import get_sampler
    from rlxf.models import Reference, save_pretrained
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
    prompts, eval_prompts = load_prompts(cfg, tokenizer, rows)
    log.info("%d training prompts, %d eval prompts; preset %s: %s", len(prompts), len(eval_prompts), cfg.preset,
             {k: getattr(cfg, k) for k in PRESETS[cfg.preset]})
    reference = None
    if cfg.needs_reference:
        reference = Reference.build(model, cfg.reference if cfg.reference != "auto" else
                                    ("lora" if cfg.lora_r else "copy"))
    pipeline = RewardPipeline(cfg, tokenizer=tokenizer, task=prompts.task, policy=model, ref_model=reference)
    if distributed.active() and hasattr(pipeline.base, "after_step") and not getattr(pipeline.base, "data_parallel",
                                                                                       False):
        raise ConfigError(f"--reward {cfg.reward_label} keeps per-process state after each step, which data parallel "
                          f"does not support; run it as one process (without torchrun)")
    distributed.broadcast_parameters(model)
    engine = build_engine(cfg, model, tokenizer, max_batch_size=max(256, cfg.batch_size * cfg.group_size))
    warmup = {}
    if cfg.env is not None:  # multi-turn episodes with a tool (docs/methods/tools.md)
        engine, warmup = env_engine(cfg, model, tokenizer, engine, eval_prompts, pipeline, out)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            top_k=cfg.top_k, n=cfg.group_size)
    sampler = get_sampler(cfg.sampler, len(prompts), seed=cfg.seed)
    optimizer = build_optimizer(model, cfg)
    updates = cfg.ppo_epochs * cfg.mini_batches  # optimiser updates per rollout step
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(
        s, warmup=cfg.warmup_steps * updates, total=cfg.max_steps * updates, schedule=cfg.schedule))
    context = StepContext(cfg=cfg, model=model, engine=engine, prompts=prompts, sampler=sampler, pipeline=pipeline,
                          reference=reference, optimizer=optimizer, scheduler=scheduler, params=params,
                          tokenizer=tokenizer)

    def step(index: int) -> dict:
        metrics = grpo_step(context, index)
        if hasattr(pipeline.base, "after_step"):  # stateful rewards (COOPER, LMGT) learn/log after each step
            metrics.update(pipeline.base.after_step(index))
        return metrics

    def evaluate() -> dict:
        metrics = evaluate_greedy(engine, eval_prompts, pipeline, max_new_tokens=cfg.max_new_tokens,
                                  batch_size=max(cfg.eval_batch_size, 64))
        if hasattr(pipeline.base, "evaluate"):  # a learned reward reports its own held-out quality
            metrics.update(pipeline.base.evaluate())
        return metrics

    files = {"reward.pt": pipeline.base} if hasattr(pipeline.base, "state_dict") else {}
    return run(Loop(cfg=cfg, recipe=recipe, out=out, model=model, tokenizer=tokenizer, optimizer=optimizer,
                    scheduler=scheduler, total_steps=cfg.max_steps, step=step, evaluate=evaluate,
                    headline={"task_accuracy": "max", "reward": "max"}, panels=PANELS,
                    title=f"rlxf {recipe} ({cfg.preset}): {cfg.model} on {cfg.dataset}",
                    save_final=lambda path: save_pretrained(model, tokenizer, path,
                                                            merge_lora=cfg.merge_lora and cfg.lora_r > 0),
                    components={"sampler": sampler}, files=files, progress_metric="reward/mean",
                    summary=lambda start, last: {**online_summary(cfg, start, last), **env_summary(cfg, warmup)},
                    reward_health=pipeline.health))


def data_parallel_limits(cfg: GRPOConfig) -> str | None:
    """Why this configuration cannot run data-parallel (None: it can). Each rank samples its share of
    every step's prompts from the same prompt order (dynamic sampling included: the processes draw in
    lockstep); what needs the whole batch in one place is refused."""
    if cfg.fsdp and cfg.dp_rollouts == "rank0" and cfg.dynamic_sampling:
        return ("--fsdp with --dp-rollouts rank0 and dynamic sampling can leave the processes uneven shares of a "
                "step, and every sharded forward needs all of them; use --dp-rollouts shard (the default)")
    if cfg.sampler != "uniform":
        return (f"--sampler {cfg.sampler} adapts to each step's pass rates, which every process would see only "
                f"a share of; data parallel supports --sampler uniform (or run it as one process)")
    return None


PANELS = [
    Panel("held-out accuracy (greedy)", ["task_accuracy"], split="eval", ylabel="accuracy"),
    Panel("reward and sample accuracy", ["reward/mean", "accuracy"], split="train"),
    Panel("KL to reference", ["kl"], split="train"),
    Panel("completion length", ["completion_length"], ylabel="tokens"),
    Panel("tool use (--env): turns and tool calls per episode", ["turns", "tool_calls"]),
    Panel("entropy (sampled-token estimate)", ["entropy"], split="train", ylabel="nats/token"),
    Panel("clip fraction / zero-advantage groups", ["clip_fraction", "frac_zero_adv"], split="train"),
    Panel("throughput", ["sample_tokens_per_s", "train_tokens_per_s"], split="train", ylabel="tokens/s"),
    Panel("learned reward model (COOPER)", ["rm/accuracy", "rm/agreement"]),
    Panel("LMGT judge shifts (counts per step)", ["lmgt/shift_plus", "lmgt/shift_zero", "lmgt/shift_minus"],
          split="train"),
    Panel("LMGT agreement of δ with the verifier / base reward", ["lmgt/agreement_verifier", "lmgt/agreement_base"],
          split="train", ylabel="fraction"),
]


def env_summary(cfg, warmup: dict) -> dict:
    """summary.json fields of an ``--env`` run: the environment, budgets and the SFT warm-up."""
    if getattr(cfg, "env", None) is None:
        return {}
    return {"env": {"env": cfg.env_label, "max_turns": cfg.max_turns, "max_episode_tokens": cfg.max_episode_tokens,
                    "sft_warmup": warmup or None}}


def online_summary(cfg, start: dict, last: dict) -> dict:
    """summary.json fields of an online run beyond the loop's: the preset, reward and lengths."""
    summary = {"preset": getattr(cfg, "preset", None), "reward": cfg.reward_label,
               "start/completion_length": start.get("completion_length"),
               "final/completion_length": last.get("completion_length")}
    if distributed.active():
        summary["data_parallel"] = {"prompts_per_process": cfg.batch_size // distributed.world_size()}
    return summary
