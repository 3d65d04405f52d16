"""One GRPO-family rollout step (``rlxf grpo``, ``dr_grpo``, ``dapo``, ``rloo``, ``cooper``).

    sample_groups: the sampler picks prompts, the engine samples G completions each, the reward
      pipeline scores them ([DAPO] groups with equal rewards are dropped and more are sampled)
    → _prepare: group advantages (or REINFORCE++'s, --advantage), the loss mask, reference / old log-probs
    → _optimise: ``ppo_epochs × mini_batches`` updates of the registered policy loss (``--policy-loss``)
      + β·KL, aggregated by ``loss_agg``, micro-batched
    → _metrics: rewards, lengths, clip fraction, entropy, KL, throughput (combined over processes)

Under torchrun each process samples its share of every step's prompts; with dynamic sampling the
processes draw the same number of rollout batches (they agree after each one whether every process
has its share of informative groups), so the prompt order stays in lockstep.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from rlxf.losses import aggregate, get_policy_loss, group_advantages, kl_penalty, policy_clip_fraction
from rlxf.losses.reinforce_pp import reinforce_pp_returns
from rlxf.recipes.online import episode_metrics, generate, reference_answer_nll, reward_tensor
from rlxf.recipes.ppo_step import global_whiten
from rlxf.runtime import distributed, fsdp
from rlxf.train import TrainingError, autocast_context, clip_and_step
from rlxf.train.online import global_units, step_metrics

if TYPE_CHECKING:
    from rlxf.recipes.grpo import GRPOConfig


@dataclass
class StepContext:
    """What every GRPO step uses (built once by :func:`rlxf.recipes.grpo.train`)."""

    cfg: object
    model: torch.nn.Module
    engine: object
    prompts: object
    sampler: object
    pipeline: object
    reference: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    params: object
    tokenizer: object


def grpo_step(ctx: StepContext, step: int) -> dict:
    """One rollout step: sample → score → advantages → ``ppo_epochs × mini_batches`` updates."""
    with fsdp.gathered():   # --fsdp: whole weights while sampling and scoring (no collective inside)
        rollouts, _, rewards_list, correct, parts, info = sample_groups(
            ctx.engine, ctx.prompts, ctx.sampler, ctx.pipeline, ctx.cfg, step, ctx.params)  # this rank's share
    _update_sampler(ctx, info.pop("sampler_feedback"))
    t0 = time.time()
    batch = _prepare(ctx, rollouts, rewards_list)
    stats, grad_norms = _optimise(ctx, step, batch)
    train_seconds = time.time() - t0
    return step_metrics(_metrics(ctx, batch, rollouts, info, correct, parts, stats, grad_norms, train_seconds))


def _update_sampler(ctx: StepContext, feedback: list) -> None:
    """Pass rates (and, for APS, the reference-answer NLL) of this step's prompts to the sampler."""
    if not feedback:
        return
    idx, rates = zip(*feedback)
    nll = None
    if ctx.cfg.sampler == "aps":
        ctx.model.eval()
        nll = reference_answer_nll(ctx.model, ctx.tokenizer, [ctx.prompts.rows[i] for i in idx])
        ctx.model.train()
    ctx.sampler.update(list(idx), list(rates), nll)


def _prepare(ctx: StepContext, rollouts, rewards_list) -> dict:
    """Advantages, the loss mask and the fixed log-probs (reference for β > 0 or REINFORCE++'s KL;
    π_old when several updates are taken per batch) of one rollout batch, on the model's device."""
    cfg, model = ctx.cfg, ctx.model
    device = next(model.parameters()).device
    rewards, valid = reward_tensor(rewards_list, cfg.group_size)                          # [N], [N]
    rollouts = rollouts.to(device)
    input_ids, attention_mask = rollouts.sequences()                                      # [N, P+C]
    P = rollouts.prompt_ids.shape[1]
    loss_mask = rollouts.completion_mask.float() * valid.to(device).unsqueeze(-1).float()  # [N, C]
    if cfg.mask_truncated:
        finished = torch.tensor([r == "stop" for r in rollouts.finish_reason], device=device)
        loss_mask = loss_mask * finished.unsqueeze(-1).float()
    rows = torch.arange(input_ids.shape[0], device=device)
    ref_logps = old_logps = None
    with torch.no_grad(), autocast_context(cfg, model):
        if len(rows) and (cfg.beta > 0 or cfg.kl_in_reward > 0):  # a process may hold no rows this step
            ref_logps = torch.cat([completion_logps(None, input_ids[s], attention_mask[s], P, cfg,
                                                    reference=ctx.reference) for s in _slices(rows, cfg)])
        if len(rows) and cfg.ppo_epochs * cfg.mini_batches > 1:
            model.eval()
            old_logps = torch.cat([completion_logps(model, input_ids[s], attention_mask[s], P, cfg)
                                   for s in _slices(rows, cfg)])
            model.train()
    advantages, kl_reward = _advantages(cfg, rewards.to(device), loss_mask, rollouts.logps, ref_logps)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "prompt_len": P, "mask": loss_mask,
            "advantages": advantages, "rewards": rewards, "valid": valid, "ref_logps": ref_logps,
            "old_logps": old_logps, "kl_reward": kl_reward}


def _advantages(cfg, rewards, loss_mask, sample_logps, ref_logps) -> tuple[torch.Tensor, float | None]:
    """``--advantage``: group-relative [N], or REINFORCE++'s [N, C] whitened over every process's tokens;
    and the mean k1 KL put in the reward (None without one)."""
    if cfg.advantage == "group":
        return group_advantages(rewards, cfg.group_size, scale=cfg.advantage_scale,
                                leave_one_out=cfg.leave_one_out), None                        # [N]
    kl = None
    if cfg.kl_in_reward > 0 and ref_logps is not None:
        kl = kl_penalty(sample_logps.to(ref_logps.dtype), ref_logps, kind="k1")  # [N, C] log π_old − log π_ref
    returns = reinforce_pp_returns(rewards, loss_mask, kl=kl, beta=cfg.kl_in_reward,
                                   group_size=cfg.group_size if cfg.advantage == "reinforce_pp_baseline" else None)
    kl_mean = float((kl * loss_mask).sum() / loss_mask.sum().clamp(min=1)) if kl is not None else None
    return global_whiten(returns, loss_mask), kl_mean                                         # [N, C]


def _slices(rows: torch.Tensor, cfg) -> list[torch.Tensor]:
    return [rows[i:i + cfg.micro_batch_size] for i in range(0, len(rows), cfg.micro_batch_size)]


def _order(cfg, N: int, generator: torch.Generator) -> torch.Tensor:
    """The rows of one pass, shuffled for mini-batches (whole groups together with --share-prompt)."""
    if cfg.mini_batches == 1:
        return torch.arange(N)
    if cfg.share_prompt:
        G = cfg.group_size
        return (torch.randperm(N // G, generator=generator)[:, None] * G + torch.arange(G)).flatten()
    return torch.randperm(N, generator=generator)


def _optimise(ctx: StepContext, step: int, batch: dict) -> tuple[list[dict], list[float]]:
    """``ppo_epochs`` passes of ``mini_batches`` optimiser updates over the batch, micro-batched."""
    cfg, model = ctx.cfg, ctx.model
    device = next(model.parameters()).device
    N = batch["input_ids"].shape[0]
    mini = N // cfg.mini_batches
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    stats, grad_norms = [], []
    for _ in range(cfg.ppo_epochs):
        order = _order(cfg, N, generator)
        for m in range(cfg.mini_batches):
            rows_m = order[m * mini:(m + 1) * mini].to(device)
            # the mean over every process's tokens (token-mean) or sequences (other modes): global_units
            local = float(batch["mask"][rows_m].sum()) if cfg.loss_agg == "token-mean" else float(len(rows_m))
            units_total = global_units(local)
            bad = False  # a process may hold fewer rows: one check per mini-batch keeps the collectives aligned
            for s in _slices(rows_m, cfg):
                micro = {k: (v[s] if torch.is_tensor(v) and k not in ("rewards", "valid") else v)
                         for k, v in batch.items()}
                with autocast_context(cfg, model):
                    loss, terms = policy_loss_terms(model, micro, cfg, units_total=units_total)
                if not bool(torch.isfinite(loss)):
                    bad = True
                    break
                loss.backward()
                stats.append({"loss": loss.item(), **terms})
            if distributed.any_true(bad):   # every rank stops together
                raise TrainingError(f"non-finite loss at step {step + 1}; lower --lr and resume from the "
                                    f"last good checkpoint (--resume)")
            distributed.average_gradients(model.parameters())
            norm = clip_and_step(model.parameters(), ctx.optimizer, ctx.scheduler, cfg.max_grad_norm)
            if cfg.max_grad_norm > 0:
                grad_norms.append(norm)
    return stats, grad_norms


def _metrics(ctx: StepContext, batch: dict, rollouts, info: dict, correct, parts, stats, grad_norms,
             train_seconds: float) -> dict:
    cfg = ctx.cfg
    N = batch["input_ids"].shape[0]
    if N == 0:  # this process holds none of the step's groups (an uneven split under --dp-rollouts rank0)
        # loss: a share of the global normaliser's sum, so this process's share is 0 (not missing)
        return {"loss": 0.0, "groups_sampled": info["groups_sampled"], **_reward_counts(info), "_rows": 0,
                "_sample_seconds": info["sample_seconds"], "_train_seconds": train_seconds,
                "_sample_tokens": info["sample_tokens"], "_train_tokens": 0, **ctx.sampler.stats()}
    rewards, valid = batch["rewards"], batch["valid"]
    groups = rewards.view(-1, cfg.group_size)
    valid_rewards = rewards[valid]
    train_tokens = int(batch["attention_mask"].sum()) * cfg.ppo_epochs
    metrics = {
        "reward/mean": valid_rewards.mean().item() if valid_rewards.numel() else float("nan"),
        "reward/std": valid_rewards.std().item() if valid_rewards.numel() > 1 else 0.0,
        "frac_zero_adv": (groups.max(-1).values == groups.min(-1).values).float().mean().item(),
        "completion_length": rollouts.completion_lengths().float().mean().item(),
        "truncated_fraction": sum(r == "length" for r in rollouts.finish_reason) / N,
        "sample_tokens_per_s": info["sample_tokens"] / max(info["sample_seconds"], 1e-9),
        "train_tokens_per_s": train_tokens / max(train_seconds, 1e-9),
        "groups_sampled": info["groups_sampled"], **_reward_counts(info), "_rows": N,
        **episode_metrics(info.get("episodes", {})),
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
    if batch["kl_reward"] is not None:
        metrics["kl"] = batch["kl_reward"]  # REINFORCE++: the k1 KL in the reward
    for k in {k for s in stats for k in s}:
        vals = [s[k] for s in stats if k in s]
        metrics[k] = max(vals) if k == "ratio_max" else sum(vals) / len(vals)
    metrics.update(ctx.sampler.stats())
    return metrics


def _reward_counts(info: dict) -> dict:
    """This process's reward counts of the step: failed, None and scored samples (every draw)."""
    return {"reward_errors": info["reward_errors"], "reward_none": info["reward_none"],
            "_reward_samples": info["reward_samples"]}


REWARD_COUNTS = ("reward_none", "reward_errors", "reward_samples")


def sample_groups(engine, prompts, sampler, pipeline, cfg: GRPOConfig, step: int, params):
    """Roll out, score and (DAPO) filter until ``batch_size`` informative groups are collected.

    Returns ``(rollouts, rows, rewards, correct, parts, info)`` for the kept groups, in group order:
    under torchrun, this process's share of them (``--dp-rollouts``: sampled here, or by process 0).
    """
    rank, world = distributed.rank(), distributed.world_size()
    if world == 1:
        return _sample_share(engine, prompts, sampler, pipeline, cfg, step, params, first=0, share=cfg.batch_size)
    if cfg.dp_rollouts == "shard":  # every rank draws the same order and takes its share
        share = cfg.batch_size // world
        params = replace(params, seed=(cfg.seed * 1_000_003 + step) * 1009 + rank)  # independent, resumable
        return _sample_share(engine, prompts, sampler, pipeline, cfg, step, params, first=rank * share,
                             share=share, lockstep=True)
    whole = None
    if rank == 0:  # exactly what one process would sample, with the same RNG
        whole = _sample_share(engine, prompts, sampler, pipeline, cfg, step, params, first=0,
                              share=cfg.batch_size)
        whole = (whole[0].to("cpu"), *whole[1:])
    rollouts, rows, rewards, correct, parts, info = distributed.broadcast_object(whole)
    G = cfg.group_size
    groups = len(rows) // G
    start, stop = (groups * rank // world) * G, (groups * (rank + 1) // world) * G
    if rank:  # process 0 reports the sampling; every process applies the sampler feedback
        info = {**dict.fromkeys(("sample_seconds", "sample_tokens", "groups_sampled", *REWARD_COUNTS), 0),
                "sampler_feedback": info["sampler_feedback"]}
    return (rollouts.rows(start, stop), rows[start:stop], rewards[start:stop], correct[start:stop],
            {name: values[start:stop] for name, values in parts.items()}, info)


def _sample_share(engine, prompts, sampler, pipeline, cfg: GRPOConfig, step: int, params, *, first: int,
                  share: int, lockstep: bool = False):
    """Prompts ``first:first+share`` of each draw of ``batch_size``; ``lockstep``: the processes agree
    after each draw whether every one of them has its share (a collective)."""
    G = cfg.group_size
    overlong = (cfg.max_new_tokens, cfg.overlong_buffer, cfg.overlong_factor) if cfg.overlong_buffer else None
    kept: list[tuple] = []   # (rollouts, row slice, scores, rows) per kept group
    info = {"sample_seconds": 0.0, "sample_tokens": 0, "groups_sampled": 0, **dict.fromkeys(REWARD_COUNTS, 0),
            "sampler_feedback": []}
    for _ in range(cfg.max_sample_batches if cfg.dynamic_sampling else 1):
        indices = sampler.sample(cfg.batch_size)[first:first + share]
        t0 = time.time()
        out, episodes = generate(engine, prompts, indices, params)
        info["sample_seconds"] += time.time() - t0
        info["sample_tokens"] += out.num_tokens()
        for key, values in episodes.items():
            info.setdefault("episodes", {}).setdefault(key, []).extend(values)
        rows = [prompts.rows[i] for i in indices for _ in range(G)]
        scores = pipeline(rows, out.text, out.completion_lengths().tolist(), step=step, group_size=G,
                          overlong=overlong, env_rewards=episodes.get("env_rewards"))
        for key, stat in zip(REWARD_COUNTS, ("none", "failed", "samples")):
            info[key] += scores.stats.get(stat, 0)
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
        if distributed.all_true(len(kept) >= share) if lockstep else len(kept) >= share:
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
    C = max(int(r.attended_mask()[idx].sum(-1).max()) for r, idx in selections)
    pad = lambda t, w, left, value: torch.nn.functional.pad(  # noqa: E731
        t, (w - t.shape[1], 0) if left else (0, w - t.shape[1]), value=value)
    multi_turn = selections[0][0].context_mask is not None   # multi-turn rollouts carry their context mask
    names = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "logps") + (
        ("context_mask",) if multi_turn else ())
    pieces = {k: [] for k in names}
    text, finish = [], []
    for r, idx in selections:
        pad_id = int(r.prompt_ids[r.prompt_mask == 0][0]) if (r.prompt_mask == 0).any() else 0
        pieces["prompt_ids"].append(pad(r.prompt_ids[idx], P, True, pad_id))
        pieces["prompt_mask"].append(pad(r.prompt_mask[idx], P, True, 0))
        for name in names[2:]:
            pieces[name].append(pad(getattr(r, name)[idx][:, :C], C, False, 0))
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
    per_token = get_policy_loss(cfg.policy_loss)(logps, old, batch["advantages"], mask, eps_low=cfg.eps_low,
                                                 eps_high=cfg.eps_high)                      # [b, C]
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
        stats = {"clip_fraction": float(policy_clip_fraction(cfg.policy_loss)(
                     logps, old, batch["advantages"], mask, eps_low=cfg.eps_low, eps_high=cfg.eps_high)),
                 "entropy": (-(logps * mask).sum() / n_tok).item(),
                 "ratio_max": (torch.exp(logps - old) * mask).max().item()}
        if kl is not None:
            stats["kl"] = ((kl * mask).sum() / n_tok).item()
    return loss, stats


