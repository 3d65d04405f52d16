"""One PPO-RLHF rollout step (``rlxf ppo``): sample → score → KL-in-reward → GAE → updates.

    _rollout: this process's share of the step's prompts, sampled and scored
    → _advantages: old log-probs / reference log-probs / old values, r_t = −β·k_t (+ score at the
      last token), GAE(γ, λ), whitening over every process's valid tokens
    → _optimise: ``ppo_epochs × mini_batches`` updates of the registered policy loss (``--policy-loss``)
      + c_v · clipped value loss, token means over every process's tokens
    → β update (adaptive controller: the mean summed KL over every process's sequences)

Under torchrun every process draws the same prompt order and the same mini-batch permutation of
the step's ``N`` rows; it holds rows ``[rank·n, (rank+1)·n)`` and computes the loss of the rows of
each mini-batch it holds, divided by the mini-batch's token count over all processes / the number
of processes, so the averaged gradient equals the one-process gradient.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from rlxf.losses import gae, get_policy_loss, kl_penalty, policy_clip_fraction, value_loss
from rlxf.recipes.online import reward_tensor
from rlxf.runtime import distributed
from rlxf.train import TrainingError, autocast_context, clip_and_step
from rlxf.train.online import global_units, step_metrics


@dataclass
class PPOContext:
    """What every PPO step uses (built once by :func:`rlxf.recipes.ppo.train`)."""

    cfg: object
    model: torch.nn.Module
    critic: torch.nn.Module
    engine: object
    prompts: object
    sampler: object
    pipeline: object
    reference: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    params: object
    kl_ctl: object
    trainable: list


def ppo_step(ctx: PPOContext, step: int) -> dict:
    """One rollout step; returns its metrics (combined over the processes)."""
    rollouts, scores, sample_seconds = _rollout(ctx, step)
    t0 = time.time()
    batch = _advantages(ctx, rollouts, scores)
    stats = _optimise(ctx, step, batch)
    train_seconds = time.time() - t0
    kl_sums = batch["kl_sum"].tolist()
    if distributed.active():
        kl_sums = [v for part in distributed.gather(kl_sums) for v in part]
    ctx.kl_ctl.update(sum(kl_sums) / len(kl_sums), len(kl_sums))
    return step_metrics(_metrics(ctx, batch, rollouts, scores, stats, sample_seconds, train_seconds))


def _rollout(ctx: PPOContext, step: int):
    """This process's rows of the step: sampled here (``--dp-rollouts shard``) or by process 0, which
    samples the whole step exactly as one process would (``rank0``)."""
    cfg = ctx.cfg
    rank, world = distributed.rank(), distributed.world_size()
    if world > 1 and cfg.dp_rollouts == "rank0":
        whole = None
        if rank == 0:
            rollouts, scores, seconds = _sample(ctx, step, ctx.params, 0, cfg.batch_size)
            whole = (rollouts.to("cpu"), scores, seconds)
        rollouts, scores, seconds = distributed.broadcast_object(whole)
        n = len(rollouts) // world
        mine = scores.rows(rank * n, (rank + 1) * n)
        if rank:  # process 0 reports the sampling and the reward counts
            mine.stats, seconds = {}, 0.0
        return rollouts.rows(rank * n, (rank + 1) * n), mine, seconds
    share = cfg.batch_size // world
    params = ctx.params
    if world > 1:  # independent draws on each process, repeated exactly by a resumed run
        params = replace(params, seed=(cfg.seed * 1_000_003 + step) * 1009 + rank)
    return _sample(ctx, step, params, rank * share, share)


def _sample(ctx: PPOContext, step: int, params, first: int, share: int):
    cfg = ctx.cfg
    indices = ctx.sampler.sample(cfg.batch_size)[first:first + share]
    t0 = time.time()
    rollouts = ctx.engine.generate(ctx.prompts.prompt_ids(indices), params)
    sample_seconds = time.time() - t0
    rows = [ctx.prompts.rows[i] for i in indices for _ in range(cfg.group_size)]
    scores = ctx.pipeline(rows, rollouts.text, rollouts.completion_lengths().tolist(), step=step,
                          group_size=cfg.group_size)
    if all(c is not None for c in scores.correct):
        G = cfg.group_size
        ctx.sampler.update(indices, [sum(scores.correct[g * G:(g + 1) * G]) / G for g in range(len(indices))])
    return rollouts, scores, sample_seconds


def _advantages(ctx: PPOContext, rollouts, scores) -> dict:
    """Fixed quantities of the batch: old/reference log-probs, old values, KL-in-reward, GAE."""
    from rlxf.models import labels_from, token_logps
    from rlxf.models.value import values_for_completions

    cfg, model, critic = ctx.cfg, ctx.model, ctx.critic
    device = next(model.parameters()).device
    score, valid = reward_tensor(scores.rewards, cfg.group_size)                          # [n], [n]
    no_eos = torch.tensor([r == "length" for r in rollouts.finish_reason])
    score = score - cfg.missing_eos_penalty * no_eos.float()
    rollouts = rollouts.to(device)
    input_ids, attention_mask = rollouts.sequences()                                     # [n, P+C]
    P = rollouts.prompt_ids.shape[1]
    mask = rollouts.completion_mask.float() * valid.to(device).unsqueeze(-1).float()     # [n, C]
    labels = labels_from(P - 1, input_ids)                                               # head on completions only
    with torch.no_grad(), autocast_context(cfg, model):
        model.eval()
        critic.eval()
        old_logps = token_logps(model, input_ids, attention_mask, temperature=cfg.temperature,
                                label_mask=labels)[:, P - 1:]
        ref_logps = ctx.reference.token_logps(input_ids, attention_mask, temperature=cfg.temperature,
                                              label_mask=labels)[:, P - 1:]
        old_values = values_for_completions(critic, input_ids, attention_mask, P) * mask  # [n, C]
        model.train()
        critic.train()
    kl = kl_penalty(old_logps, ref_logps, kind=cfg.kl_kind) * mask                       # [n, C]
    beta = ctx.kl_ctl.value
    rewards = -beta * kl                                                                   # [n, C]
    last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & mask.bool()                  # last valid token
    rewards = rewards + last.float() * score.to(device).unsqueeze(-1)
    advantages, returns = gae(rewards, old_values, mask, gamma=cfg.gamma, lam=cfg.lam)
    if cfg.whiten_advantages:
        advantages = global_whiten(advantages, mask)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "prompt_len": P, "labels": labels,
            "mask": mask, "old_logps": old_logps, "old_values": old_values, "advantages": advantages,
            "returns": returns, "score": score, "no_eos": no_eos, "beta": beta, "kl_per_token": kl,
            "kl_sum": (kl_penalty(old_logps, ref_logps, kind="k1") * mask).sum(-1)}     # [n]


def global_whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """:func:`rlxf.losses.masked_whiten` (shift_mean) over the valid tokens of every process: the same
    μ and unbiased σ² as one process holding the whole batch."""
    from rlxf.losses import masked_whiten

    if not distributed.active():
        return masked_whiten(values, mask, eps=eps)
    valid = mask.bool()
    local = torch.stack([valid.sum().double(), torch.where(valid, values, 0.0).sum().double(),
                         torch.where(valid, values.double() ** 2, 0.0).sum()]).cpu()
    count, total, squares = torch.stack(distributed.gather(local)).sum(0).tolist()
    mean = total / max(count, 1.0)
    variance = max(squares - count * mean * mean, 0.0) / max(count - 1, 1.0)
    whitened = (values - mean) * (variance + eps) ** -0.5
    return torch.where(valid, whitened, 0.0)


def _owned_rows(order: torch.Tensor, rank: int, n: int) -> torch.Tensor:
    """The rows of a global mini-batch (``order``) that this process holds, as local indices."""
    mine = order[(order >= rank * n) & (order < (rank + 1) * n)]
    return mine - rank * n


def _optimise(ctx: PPOContext, step: int, batch: dict) -> list[dict]:
    from rlxf.models import token_logps
    from rlxf.models.value import values_for_completions

    cfg, model, critic = ctx.cfg, ctx.model, ctx.critic
    device = next(model.parameters()).device
    rank, world = distributed.rank(), distributed.world_size()
    n, P = batch["input_ids"].shape[0], batch["prompt_len"]
    N = n * world
    mini = N // cfg.mini_batches
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    policy_loss = get_policy_loss(cfg.policy_loss)
    stats: list[dict] = []
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(N, generator=generator)
        for m in range(cfg.mini_batches):
            rows = _owned_rows(order[m * mini:(m + 1) * mini], rank, n).to(device)
            ids, att, msk = batch["input_ids"][rows], batch["attention_mask"][rows], batch["mask"][rows]
            old, adv = batch["old_logps"][rows], batch["advantages"][rows]
            units = global_units(float(msk.sum()))
            if len(rows) == 0:  # none of this mini-batch's rows is here: join the collectives with no gradient
                distributed.any_true(False)
                distributed.average_gradients(ctx.trainable)
                clip_and_step(ctx.trainable, ctx.optimizer, ctx.scheduler, cfg.max_grad_norm)
                continue
            with autocast_context(cfg, model):
                logps = token_logps(model, ids, att, temperature=cfg.temperature,
                                    label_mask=batch["labels"])[:, P - 1:]
                values = values_for_completions(critic, ids, att, P)
                pg = (policy_loss(logps, old, adv, msk, eps_low=cfg.eps, eps_high=cfg.eps_high) * msk).sum() / units
                vf = (value_loss(values, batch["old_values"][rows], batch["returns"][rows], msk,
                                 clip=cfg.value_clip or None) * msk).sum() / units
                loss = pg + cfg.vf_coef * vf
            if distributed.any_true(not bool(torch.isfinite(loss))):
                raise TrainingError(f"non-finite loss at step {step + 1}; lower --lr / --value-lr and resume "
                                    f"from the last good checkpoint (--resume)")
            loss.backward()
            distributed.average_gradients(ctx.trainable)
            grad_norm = clip_and_step(ctx.trainable, ctx.optimizer, ctx.scheduler, cfg.max_grad_norm)
            stats.append(_update_stats(cfg, logps, values, batch, rows, msk, pg, vf, grad_norm))
    return stats


def _update_stats(cfg, logps, values, batch, rows, msk, pg, vf, grad_norm) -> dict:
    with torch.no_grad():
        n_tok = msk.sum().clamp(min=1)
        old, adv = batch["old_logps"][rows], batch["advantages"][rows]
        moved = ((values - batch["old_values"][rows]).abs() > cfg.value_clip).float() * msk
        return {"loss/policy": pg.item(), "loss/value": vf.item(), "grad_norm": grad_norm,
                "clip_fraction": float(policy_clip_fraction(cfg.policy_loss)(logps, old, adv, msk, eps_low=cfg.eps,
                                                                            eps_high=cfg.eps_high)),
                "entropy": (-(logps * msk).sum() / n_tok).item(),
                "value_clip_fraction": moved.sum().item() / n_tok.item() if cfg.value_clip else 0.0}


def _metrics(ctx: PPOContext, batch: dict, rollouts, scores, stats, sample_seconds, train_seconds) -> dict:
    cfg, mask = ctx.cfg, batch["mask"]
    valid_tokens = mask.sum().clamp(min=1).item()
    raw = torch.tensor([v if v is not None else float("nan") for v in scores.rewards])
    train_tokens = int(batch["attention_mask"].sum()) * cfg.ppo_epochs
    metrics = {
        "score": batch["score"].mean().item(),
        "reward/mean": raw[~torch.isnan(raw)].mean().item() if (~torch.isnan(raw)).any() else float("nan"),
        "kl": batch["kl_sum"].mean().item(),
        "kl_coef": batch["beta"],
        "non_score_reward": (-batch["beta"] * batch["kl_per_token"]).sum(-1).mean().item(),
        "eos_fraction": 1.0 - batch["no_eos"].float().mean().item(),
        "completion_length": rollouts.completion_lengths().float().mean().item(),
        "advantage_mean": (batch["advantages"] * mask).sum().item() / valid_tokens,
        "returns_mean": (batch["returns"] * mask).sum().item() / valid_tokens,
        "value_mean": (batch["old_values"] * mask).sum().item() / valid_tokens,
        "sample_tokens_per_s": rollouts.num_tokens() / max(sample_seconds, 1e-9),
        "train_tokens_per_s": train_tokens / max(train_seconds, 1e-9),
        "reward_none": scores.stats.get("none", 0), "reward_errors": scores.stats.get("failed", 0),
        "_reward_samples": scores.stats.get("samples", 0), "_rows": len(rollouts),
        "_sample_seconds": sample_seconds, "_train_seconds": train_seconds,
        "_sample_tokens": rollouts.num_tokens(), "_train_tokens": train_tokens,
    }
    if all(c is not None for c in scores.correct):
        metrics["accuracy"] = sum(scores.correct) / len(scores.correct)
    for k in stats[0] if stats else ():
        metrics[k] = sum(s[k] for s in stats) / len(stats)
    return metrics
