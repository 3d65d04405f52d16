"""``rlxf ppo``: PPO for RLHF with a critic (InstructGPT / "N+ implementation details", SPECS.md §1).

One step, top to bottom:

    sampler picks ``batch_size`` prompts → engine samples ``group_size`` completions each (π_old)
    → score s_i (reward model read at the last token, or any reward function)
      [− missing_eos_penalty when the completion hit max_new_tokens without EOS]
    → per-token reward  r_t = −β·k_t (KL to π_ref, no gradient),  r_T += s_i   (KL-in-reward)
    → GAE(γ, λ) on the old values → advantages (whitened over valid tokens) and returns
    → ``ppo_epochs`` × ``mini_batches`` updates of
         L = token-mean( −min(ρ Â, clip(ρ, 1±ε) Â) ) + c_v · token-mean( ½ max((V−G)², (V_clip−G)²) )
    → β update (fixed, or the adaptive controller towards ``kl_target``)

The critic is a separate model (default: initialised from the reward model, as InstructGPT and
TRL do; or from the policy checkpoint with a fresh head) or a value head on the policy's body.
Deviations, stated: the score sits on the last generated token (EOS), as verl/OpenRLHF do, not
on the first padding position as TRL's port of the N+ code; one AdamW optimiser holds both policy
and critic parameters (the critic may get its own ``value_lr``); logged ``kl`` is the summed k1
per sequence, TRL's ``objective/kl``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass

import torch

from rlxf.config import (AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, UNIT, ConfigError, between, check_choice, option,
                         to_dict)
from rlxf.losses import (KL_KINDS, AdaptiveKLController, FixedKLController, aggregate, clip_fraction,
                         clipped_policy_loss, gae, kl_penalty, masked_whiten, value_loss)
from rlxf.recipes.common import (FAULT_ENV, TrainingError, autocast_context, check_output_dir,
                                 load_model_for_training, load_split_rows, lr_multiplier, setup_logging,
                                 start_run_dir)
from rlxf.recipes.grpo import online_summary
from rlxf.recipes.online import (OnlineConfig, RewardPipeline, build_engine, evaluate_greedy, load_prompts,
                                 reward_tensor)
from rlxf.reporting import MetricsLogger, Panel, Progress, write_report, write_summary
from rlxf.runtime import latest_checkpoint, load_checkpoint, save_checkpoint

log = logging.getLogger("rlxf.ppo")
VALUE_MODELS = ("reward_model", "policy", "head")


@dataclass(frozen=True)
class PPOConfig(OnlineConfig):
    """Config of ``rlxf ppo`` (defaults: TRL's PPO where it has one, scaled for the tiny model)."""

    reward: str = option("reward_model", "reward: reward_model (needs --reward-model) or any reward spec "
                         "(verifiable, likelihood, module:function, ...)")
    group_size: int = option(1, "completions sampled per prompt")
    batch_size: int = option(64, "prompts per rollout step")
    value_model: str = option("reward_model", "critic: a copy of the reward model's body+head, a copy of the "
                              "policy checkpoint with a new head, or a head on the policy's own body",
                              choices=VALUE_MODELS)
    kl_coef: float = option(0.05, "β of the per-token KL penalty in the reward (initial value if adaptive)",
                            bounds=NON_NEGATIVE)
    kl_kind: str = option("k1", "KL estimator in the reward", choices=KL_KINDS)
    kl_target: float = option(0.0, "adaptive KL controller target (summed KL per sequence); 0 = fixed β",
                              bounds=NON_NEGATIVE)
    kl_horizon: float = option(10000.0, "adaptive KL controller horizon (samples)", bounds=POSITIVE)
    gamma: float = option(1.0, "discount γ", bounds=UNIT)
    lam: float = option(0.95, "GAE λ", bounds=UNIT)
    eps: float = option(0.2, "policy clip range ε", bounds=between(0, 1, low_open=True, high_open=True))
    value_clip: float = option(0.2, "value clip range ε_v (0 = unclipped)", bounds=NON_NEGATIVE)
    vf_coef: float = option(0.1, "value loss coefficient c_v", bounds=NON_NEGATIVE)
    whiten_advantages: bool = option(True, "whiten advantages over valid tokens of the batch")
    missing_eos_penalty: float = option(1.0, "subtract this from the score of completions without EOS (0 = off)",
                                        bounds=NON_NEGATIVE)
    ppo_epochs: int = option(4, "passes over each rollout batch", bounds=AT_LEAST_ONE)
    mini_batches: int = option(4, "optimizer steps per pass", bounds=AT_LEAST_ONE)
    value_lr: float = option(0.0, "critic learning rate (0 = same as --lr)", bounds=NON_NEGATIVE)
    reference: str = option("auto", "reference for the KL: auto (copy, or base without adapters for LoRA), "
                            "copy, lora", choices=("auto", "copy", "lora"))
    lr: float = option(3e-5, "policy learning rate (AdamW); tuned for the tiny model — TRL uses 3e-6")
    max_steps: int = option(40, "rollout steps", bounds=AT_LEAST_ONE)
    temperature: float = option(0.7, "sampling temperature (TRL's PPO default; log-probs use it too)")

    def __post_init__(self):
        super().__post_init__()
        for name in ("value_model", "kl_kind", "reference"):
            check_choice(self, name)
        if self.value_model == "reward_model" and not self.reward_model:
            raise ConfigError("--value-model reward_model initialises the critic from --reward-model DIR; "
                              "pass it, or use --value-model policy / head")
        if (self.batch_size * self.group_size) % self.mini_batches:
            raise ConfigError(f"--mini-batches {self.mini_batches} must divide batch_size × group_size = "
                              f"{self.batch_size * self.group_size}")
        if self.reference == "lora" and self.lora_r == 0:
            raise ConfigError("--reference lora needs a LoRA run (--lora-r > 0)")


def build_value_model(cfg: PPOConfig, policy, tokenizer, device, dtype):
    from rlxf.models import load_reward_model
    from rlxf.models.value import ValueModel

    if cfg.value_model == "head":
        return ValueModel.value_head(policy)
    source = cfg.reward_model if cfg.value_model == "reward_model" else cfg.model
    critic = load_reward_model(source, dtype=dtype, device=device, trust_remote_code=cfg.trust_remote_code,
                               pad_token_id=tokenizer.pad_token_id,
                               resize_to=policy.get_input_embeddings().num_embeddings)
    return ValueModel.from_sequence_classifier(critic)


def train(cfg: PPOConfig, *, recipe: str = "ppo"):
    from rlxf.data.samplers import get_sampler
    from rlxf.models import Reference, save_pretrained
    from rlxf.recipes.common import FitResult
    from rlxf.rollout import SamplingParams

    setup_logging()
    out = check_output_dir(cfg, recipe)
    rows = load_split_rows(cfg, "prompt")
    start_run_dir(cfg, out, recipe)    # only once the inputs are valid
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model_for_training(cfg)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    prompts, eval_prompts = load_prompts(cfg, tokenizer, rows)
    mode = cfg.reference if cfg.reference != "auto" else ("lora" if cfg.lora_r else "copy")
    reference = Reference.build(model, mode)
    critic = build_value_model(cfg, model, tokenizer, device, dtype)
    critic.train()
    pipeline = RewardPipeline(cfg, tokenizer=tokenizer, task=prompts.task, policy=model,
                              ref_model=reference)
    engine = build_engine(cfg, model, tokenizer, max_batch_size=max(256, cfg.batch_size * cfg.group_size))
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            top_k=cfg.top_k, n=cfg.group_size)
    sampler = get_sampler(cfg.sampler, len(prompts), seed=cfg.seed)
    policy_params = [p for p in model.parameters() if p.requires_grad]
    critic_params = [p for p in critic.own_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": policy_params, "lr": cfg.lr}, {"params": critic_params, "lr": cfg.value_lr or cfg.lr}],
        betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
    updates = cfg.ppo_epochs * cfg.mini_batches
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, warmup=cfg.warmup_steps * updates, total=cfg.max_steps * updates,
                                           schedule=cfg.schedule))
    kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target
              else FixedKLController(cfg.kl_coef))
    headline = {"task_accuracy": "max", "reward": "max"}
    ckpt_root = out / "checkpoints"
    state = {"start": {}, "best": {}, "last_eval": None, "sample_seconds": 0.0, "train_seconds": 0.0,
             "sample_tokens": 0, "train_tokens": 0, "kl_coef": kl_ctl.value}
    step = 0
    if cfg.resume and (ckpt := latest_checkpoint(ckpt_root)) is not None:
        saved = load_checkpoint(ckpt, model=model, optimizer=optimizer, scheduler=scheduler)
        critic.load_state_dict(torch.load(ckpt / "critic.pt", weights_only=True))
        step = saved["step"]
        sampler.load_state_dict(saved["sampler"])
        state = {k: saved.get(k, v) for k, v in state.items()}
        kl_ctl.value = state["kl_coef"]
        log.info("resumed from %s (step %d of %d)", ckpt, step, cfg.max_steps)
    metrics_log = MetricsLogger(out, resume_step=step if step > 0 else None, tensorboard=cfg.tensorboard)
    fault_step = int(os.environ.get(FAULT_ENV, "0") or 0)

    def run_eval(at_step: int) -> dict:
        model.eval()
        with autocast_context(cfg, device, dtype):
            metrics = evaluate_greedy(engine, eval_prompts, pipeline, max_new_tokens=cfg.max_new_tokens,
                                      batch_size=max(cfg.eval_batch_size, 64))
        model.train()
        metrics_log.log(at_step, metrics, split="eval")
        for key in headline:
            value, best = metrics.get(key), state["best"].get(key)
            if value is not None and (best is None or value > best):
                state["best"][key] = value
        return metrics

    if step == 0:
        state["start"] = state["last_eval"] = run_eval(0)
    model.train()
    bar = Progress(cfg.max_steps, desc=recipe, initial=step, enabled=cfg.progress)
    wall0 = time.time()
    try:
        while step < cfg.max_steps:
            metrics = ppo_step(cfg, step, model=model, critic=critic, engine=engine, prompts=prompts,
                               sampler=sampler, pipeline=pipeline, reference=reference, optimizer=optimizer,
                               scheduler=scheduler, params=params, kl_ctl=kl_ctl, device=device, dtype=dtype,
                               trainable=policy_params + critic_params)
            if hasattr(pipeline.base, "after_step"):  # stateful rewards (LMGT, COOPER) advance per step
                metrics.update(pipeline.base.after_step(step))
            step += 1
            state["kl_coef"] = kl_ctl.value
            for key in ("sample_seconds", "train_seconds", "sample_tokens", "train_tokens"):
                state[key] += metrics.pop(f"_{key}")
            bar.update(1, score=metrics.get("score", float("nan")))
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                metrics_log.log(step, metrics)
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps:
                state["last_eval"] = run_eval(step)
            if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.max_steps:
                save_checkpoint(ckpt_root, step, model=model, tokenizer=tokenizer, optimizer=optimizer,
                                scheduler=scheduler, state={"sampler": sampler.state_dict(), **state},
                                keep=cfg.keep_checkpoints, extra={"critic.pt": critic.state_dict()})
            if fault_step and step == fault_step:
                os._exit(137)
    finally:
        bar.close()
        metrics_log.close()
    final_dir = out / "final"
    save_pretrained(model, tokenizer, final_dir, merge_lora=cfg.merge_lora and cfg.lora_r > 0)
    summary = online_summary(cfg, recipe, state, headline, wall0, device, final_dir)
    summary["final_kl_coef"] = kl_ctl.value
    write_summary(out, summary)
    write_report(out, title=f"rlxf {recipe}: {cfg.model} on {cfg.dataset} ({cfg.reward})", panels=PANELS,
                 summary=summary, config=to_dict(cfg))
    log.info("summary: %s", json.dumps({k: v for k, v in summary.items() if "/" in k}))
    return FitResult(summary=summary, output_dir=out)


def ppo_step(cfg: PPOConfig, step: int, *, model, critic, engine, prompts, sampler, pipeline, reference,
             optimizer, scheduler, params, kl_ctl, device, dtype, trainable) -> dict:
    """One rollout step: sample → score → KL-in-reward → GAE → ``ppo_epochs × mini_batches`` updates."""
    from rlxf.models import labels_from, token_logps
    from rlxf.models.value import values_for_completions

    indices = sampler.sample(cfg.batch_size)
    t0 = time.time()
    rollouts = engine.generate(prompts.prompt_ids(indices), params)
    sample_seconds = time.time() - t0
    rows = [prompts.rows[i] for i in indices for _ in range(cfg.group_size)]
    lengths = rollouts.completion_lengths().tolist()
    scores = pipeline(rows, rollouts.text, lengths, step=step, group_size=cfg.group_size)
    if all(c is not None for c in scores.correct):
        G = cfg.group_size
        sampler.update(indices, [sum(scores.correct[g * G:(g + 1) * G]) / G for g in range(len(indices))])
    score, valid = reward_tensor(scores.rewards, cfg.group_size)                          # [N], [N]
    no_eos = torch.tensor([r == "length" for r in rollouts.finish_reason])
    score = score - cfg.missing_eos_penalty * no_eos.float()
    rollouts = rollouts.to(device)
    input_ids, attention_mask = rollouts.sequences()                                     # [N, P+C]
    P = rollouts.prompt_ids.shape[1]
    mask = rollouts.completion_mask.float() * valid.to(device).unsqueeze(-1).float()     # [N, C]
    N = input_ids.shape[0]
    t1 = time.time()
    with torch.no_grad(), autocast_context(cfg, device, dtype):
        model.eval()
        critic.eval()
        completion_labels = labels_from(P - 1, input_ids)                                  # head on completions only
        old_logps = token_logps(model, input_ids, attention_mask, temperature=cfg.temperature,
                                label_mask=completion_labels)[:, P - 1:]
        ref_logps = reference.token_logps(input_ids, attention_mask, temperature=cfg.temperature,
                                          label_mask=completion_labels)[:, P - 1:]
        old_values = values_for_completions(critic, input_ids, attention_mask, P) * mask  # [N, C]
        model.train()
        critic.train()
    kl = kl_penalty(old_logps, ref_logps, kind=cfg.kl_kind) * mask                       # [N, C]
    beta = kl_ctl.value
    rewards = -beta * kl                                                                   # [N, C]
    last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & mask.bool()                  # last valid token
    rewards = rewards + last.float() * score.to(device).unsqueeze(-1)
    advantages, returns = gae(rewards, old_values, mask, gamma=cfg.gamma, lam=cfg.lam)
    if cfg.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    mini = N // cfg.mini_batches
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    stats: list[dict] = []
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(N, generator=generator).to(device)
        for m in range(cfg.mini_batches):
            rows_m = order[m * mini:(m + 1) * mini]
            ids, att, msk = input_ids[rows_m], attention_mask[rows_m], mask[rows_m]
            with autocast_context(cfg, device, dtype):
                logps = token_logps(model, ids, att, temperature=cfg.temperature,
                                    label_mask=completion_labels)[:, P - 1:]
                values = values_for_completions(critic, ids, att, P)
                pg = aggregate(clipped_policy_loss(logps, old_logps[rows_m], advantages[rows_m], eps_low=cfg.eps,
                                                   eps_high=cfg.eps), msk)
                vf = aggregate(value_loss(values, old_values[rows_m], returns[rows_m], msk,
                                          clip=cfg.value_clip or None), msk)
                loss = pg + cfg.vf_coef * vf
            if not torch.isfinite(loss):
                raise TrainingError(f"non-finite loss at step {step + 1}; lower --lr / --value-lr")
            loss.backward()
            grad_norm = (torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm) if cfg.max_grad_norm > 0
                         else torch.tensor(float("nan")))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                n_tok = msk.sum().clamp(min=1)
                stats.append({"loss/policy": pg.item(), "loss/value": vf.item(), "grad_norm": float(grad_norm),
                              "clip_fraction": float(clip_fraction(logps, old_logps[rows_m], advantages[rows_m],
                                                                   msk, eps_low=cfg.eps, eps_high=cfg.eps)),
                              "entropy": (-(logps * msk).sum() / n_tok).item(),
                              "value_clip_fraction": (((values - old_values[rows_m]).abs() > cfg.value_clip).float()
                                                      * msk).sum().item() / n_tok.item() if cfg.value_clip else 0.0})
    train_seconds = time.time() - t1
    kl_sum = (kl_penalty(old_logps, ref_logps, kind="k1") * mask).sum(-1)                  # [N]
    kl_ctl.update(kl_sum.mean().item(), N)
    raw = torch.tensor([v if v is not None else float("nan") for v in scores.rewards])
    metrics = {
        "score": score.mean().item(),
        "reward/mean": raw[~torch.isnan(raw)].mean().item() if (~torch.isnan(raw)).any() else float("nan"),
        "kl": kl_sum.mean().item(),
        "kl_coef": beta,
        "non_score_reward": (-beta * kl).sum(-1).mean().item(),
        "eos_fraction": 1.0 - no_eos.float().mean().item(),
        "completion_length": rollouts.completion_lengths().float().mean().item(),
        "advantage_mean": (advantages * mask).sum().item() / mask.sum().clamp(min=1).item(),
        "returns_mean": (returns * mask).sum().item() / mask.sum().clamp(min=1).item(),
        "value_mean": (old_values * mask).sum().item() / mask.sum().clamp(min=1).item(),
        "lr": scheduler.get_last_lr()[0],
        "sample_tokens_per_s": rollouts.num_tokens() / max(sample_seconds, 1e-9),
        "train_tokens_per_s": int(attention_mask.sum()) * cfg.ppo_epochs / max(train_seconds, 1e-9),
        "_sample_seconds": sample_seconds, "_train_seconds": train_seconds,
        "_sample_tokens": rollouts.num_tokens(), "_train_tokens": int(attention_mask.sum()) * cfg.ppo_epochs,
    }
    if all(c is not None for c in scores.correct):
        metrics["accuracy"] = sum(scores.correct) / len(scores.correct)
    for k in stats[0]:
        metrics[k] = sum(s[k] for s in stats) / len(stats)
    return metrics


PANELS = [
    Panel("held-out reward (greedy)", ["reward"], split="eval"),
    Panel("held-out accuracy (greedy)", ["task_accuracy"], split="eval", ylabel="accuracy"),
    Panel("score and total reward", ["score", "non_score_reward"], split="train"),
    Panel("KL to reference (summed per sequence)", ["kl"], split="train"),
    Panel("losses", ["loss/policy", "loss/value"], split="train"),
    Panel("completion length", ["completion_length"], ylabel="tokens"),
    Panel("EOS fraction / clip fraction", ["eos_fraction", "clip_fraction", "value_clip_fraction"], split="train"),
]
