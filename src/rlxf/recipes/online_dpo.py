"""Online DPO: ``rlxf online-dpo`` (docs/methods/online-dpo.md).

One step, top to bottom:

    sampler picks ``batch_size`` prompts → the engine samples 2 completions each from the current weights
    → the reward (any --reward: a verifier, a reward model, a judge through --reward d_rlaif) scores both
    → the higher-scored completion is chosen, the other rejected; tied pairs are dropped and more prompts
      are sampled to refill the batch (``--dynamic-sampling``, up to ``--max-sample-batches`` draws)
    → log π_θ and log π_ref of both (sums over completion tokens; π_ref = the initial policy)
    → losses.dpo_loss(β) averaged over the kept pairs → AdamW step

Source: Guo et al., "Direct Language Model Alignment from Online AI Feedback" (OAIF, arXiv
2402.04792 Algorithm 1), with a reward or judge as the annotator, as TRL's ``OnlineDPOTrainer``.
Deviations: a tied pair is dropped (TRL keeps it and calls the first completion chosen);
log-probs are at temperature 1 (the policy's own distribution), whatever the sampling temperature.
"""

from __future__ import annotations

import logging
import time

import torch

from rlxf.configs.online_dpo import OnlineDPOConfig
from rlxf.losses import dpo_loss, preference_metrics
from rlxf.recipes.common import load_model_for_training, load_split_rows, setup_logging
from rlxf.recipes.grpo import online_summary
from rlxf.recipes.grpo_step import sample_groups
from rlxf.recipes.online import RewardPipeline, build_engine, evaluate_greedy, load_prompts, reward_tensor
from rlxf.reporting import Panel
from rlxf.train import Loop, TrainingError, build_optimizer, clip_and_step, lr_multiplier, run
from rlxf.train.online import step_metrics
from rlxf.train.rundir import check_output_dir, start_run_dir

log = logging.getLogger("rlxf.online_dpo")

PANELS = [
    Panel("held-out accuracy (greedy)", ["task_accuracy"], split="eval", ylabel="accuracy"),
    Panel("reward and sample accuracy", ["reward/mean", "accuracy"], split="train"),
    Panel("implicit-reward accuracy and margin", ["rewards/accuracy", "rewards/margin"], split="train"),
    Panel("pairs kept (rewards differ)", ["pairs_kept"], split="train", ylabel="fraction"),
    Panel("completion length", ["completion_length"], ylabel="tokens"),
]


def train(cfg: OnlineDPOConfig):
    """Run ``rlxf online-dpo`` on the shared loop; returns the run's result."""
    from rlxf.data.samplers import get_sampler
    from rlxf.models import Reference, save_pretrained
    from rlxf.rollout import SamplingParams

    setup_logging()
    out = check_output_dir(cfg, "online-dpo")
    rows = load_split_rows(cfg, "prompt")
    start_run_dir(cfg, out, "online-dpo")
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model_for_training(cfg)
    prompts, eval_prompts = load_prompts(cfg, tokenizer, rows)
    reference = Reference.build(model, cfg.reference if cfg.reference != "auto" else ("lora" if cfg.lora_r else "copy"))
    pipeline = RewardPipeline(cfg, tokenizer=tokenizer, task=prompts.task, policy=model, ref_model=reference)
    engine = build_engine(cfg, model, tokenizer, max_batch_size=max(256, cfg.batch_size * 2))
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            top_k=cfg.top_k, n=2)
    sampler = get_sampler(cfg.sampler, len(prompts), seed=cfg.seed)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(
        s, warmup=cfg.warmup_steps, total=cfg.max_steps, schedule=cfg.schedule))

    def step(index: int) -> dict:
        rollouts, _, rewards, correct, _, info = sample_groups(engine, prompts, sampler, pipeline, cfg, index, params)
        t0 = time.time()
        metrics = dpo_update(cfg, model, reference, optimizer, scheduler, rollouts, rewards, index)
        metrics.update({"completion_length": rollouts.completion_lengths().float().mean().item(),
                        "groups_sampled": info["groups_sampled"], "_rows": len(rewards),
                        "_sample_seconds": info["sample_seconds"], "_train_seconds": time.time() - t0,
                        "_sample_tokens": info["sample_tokens"], "_train_tokens": 0,
                        "reward_errors": info["reward_errors"], "reward_none": info["reward_none"],
                        "_reward_samples": info["reward_samples"]})
        if all(c is not None for c in correct):
            metrics["accuracy"] = sum(correct) / len(correct)
        return step_metrics(metrics)

    def evaluate() -> dict:
        return evaluate_greedy(engine, eval_prompts, pipeline, max_new_tokens=cfg.max_new_tokens,
                               batch_size=max(cfg.eval_batch_size, 64))

    return run(Loop(cfg=cfg, recipe="online-dpo", out=out, model=model, tokenizer=tokenizer, optimizer=optimizer,
                    scheduler=scheduler, total_steps=cfg.max_steps, step=step, evaluate=evaluate,
                    headline={"task_accuracy": "max", "reward": "max"}, panels=PANELS,
                    title=f"rlxf online-dpo: {cfg.model} on {cfg.dataset}",
                    save_final=lambda path: save_pretrained(model, tokenizer, path,
                                                            merge_lora=cfg.merge_lora and cfg.lora_r > 0),
                    components={"sampler": sampler}, progress_metric="reward/mean",
                    summary=lambda start, last: online_summary(cfg, start, last), reward_health=pipeline.health))


def label_pairs(rewards: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen rows [K], rejected rows [K], kept [P] bool) of rollouts ordered pair by pair.

    rewards, valid: [2P]. A pair is kept when both rewards are valid and differ; the higher one is chosen.
    """
    pairs, ok = rewards.view(-1, 2), valid.view(-1, 2).all(-1)          # [P, 2], [P]
    kept = ok & (pairs[:, 0] != pairs[:, 1])                             # [P]
    first_wins = (pairs[:, 0] > pairs[:, 1]).long()                      # [P]
    base = torch.arange(pairs.shape[0]) * 2
    chosen, rejected = base + 1 - first_wins, base + first_wins
    return chosen[kept], rejected[kept], kept


def dpo_update(cfg, model, reference, optimizer, scheduler, rollouts, rewards_list, step: int) -> dict:
    """One DPO step on the labelled pairs of ``rollouts`` (2 rows per prompt); returns the step's metrics."""
    from rlxf.models import labels_from, sequence_logps, token_logps

    rewards, valid = reward_tensor(rewards_list, 2)                                      # [N], [N]
    chosen, rejected, kept = label_pairs(rewards, valid)
    metrics = {"reward/mean": rewards[valid].mean().item() if valid.any() else float("nan"),
               "pairs_kept": kept.float().mean().item(), "loss": 0.0}
    if len(chosen) == 0:
        return metrics                                                                    # no preference this step
    device = next(model.parameters()).device
    rows = torch.cat([chosen, rejected]).to(device)                                       # [2K]: chosen, rejected
    rollouts = rollouts.to(device)
    input_ids, attention_mask = (t[rows] for t in rollouts.sequences())                   # [2K, P+C]
    P = rollouts.prompt_ids.shape[1]
    mask = rollouts.completion_mask[rows].float()                                         # [2K, C]
    labels = labels_from(P - 1, input_ids)
    logps = sequence_logps(token_logps(model, input_ids, attention_mask, label_mask=labels)[:, P - 1:], mask)
    with torch.no_grad():
        ref = sequence_logps(reference.token_logps(input_ids, attention_mask, label_mask=labels)[:, P - 1:], mask)
    k = len(chosen)
    loss = dpo_loss(logps[:k], logps[k:], ref[:k], ref[k:], beta=cfg.beta).mean()
    if not torch.isfinite(loss):
        raise TrainingError(f"non-finite loss at step {step + 1}; lower --lr and resume from the last good "
                            "checkpoint (--resume)")
    loss.backward()
    norm = clip_and_step(model.parameters(), optimizer, scheduler, cfg.max_grad_norm)
    metrics.update({"loss": loss.item(), "grad_norm": norm,
                    **preference_metrics(logps[:k].detach(), logps[k:].detach(), ref[:k], ref[k:], beta=cfg.beta)})
    return metrics
