"""The SFT warm-up of a multi-turn run (``--env … --warmup-sft-steps N``; docs/methods/tools.md).

A model that has never seen the tool-call format almost never writes a call, so RL has nothing to
reinforce. Before the first rollout, the policy takes ``N`` supervised steps on the environment's
own demonstrations (``env.demonstration(row)`` for the training rows): the conversations are
tokenised exactly as an episode holds them (:func:`rlxf.rollout.multiturn.conversation_ids`) and
the loss is the mean negative log-likelihood of the *assistant* tokens only — the tool's outputs
are masked out here as in the RL loss. It uses its own AdamW (``--warmup-sft-lr``, no schedule) so
the RL optimiser starts fresh, and it is skipped on ``--resume`` from a checkpoint (which already
holds the warmed-up weights).
"""

from __future__ import annotations

import logging
import random
import time

import torch

from rlxf.config import ConfigError

log = logging.getLogger("rlxf.env_warmup")


def demonstrations(env_factory, tokenizer, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
    """``(ids, in_loss)`` of each row's demonstration (rows without one are skipped)."""
    from rlxf.rollout.multiturn import conversation_ids

    out = []
    for row in rows:
        messages = env_factory().demonstration({k: v for k, v in row.items() if k != "prompt_ids"})
        if messages:
            ids, in_loss, _ = conversation_ids(tokenizer, messages)
            out.append((ids, in_loss))
    return out


def demo_batch(demos: list[tuple[list[int], list[int]]], pad_id: int):
    """``(input_ids, attention_mask, target)`` right-padded; ``target [B, T-1]`` marks the
    assistant tokens as next-token targets (aligned with :func:`rlxf.models.token_logps`)."""
    width = max(len(ids) for ids, _ in demos)
    input_ids = torch.full((len(demos), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(demos), width), dtype=torch.long)
    target = torch.zeros((len(demos), width), dtype=torch.float32)
    for i, (ids, in_loss) in enumerate(demos):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention[i, :len(ids)] = 1
        target[i, :len(ids)] = torch.tensor(in_loss, dtype=torch.float32)
    return input_ids, attention, target[:, 1:]


def sft_warmup(model, tokenizer, env_factory, rows: list[dict], cfg) -> dict:
    """``cfg.warmup_sft_steps`` masked SFT steps on the demonstrations; returns what it did."""
    from rlxf.models import token_logps

    demos = demonstrations(env_factory, tokenizer, rows)
    if not demos:
        raise ConfigError(f"--warmup-sft-steps: --env {cfg.env_label} wrote no demonstration for any of the "
                          f"{len(rows)} training rows; check its demonstration(row) or set --warmup-sft-steps 0")
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.warmup_sft_lr, weight_decay=0.0)
    rng = random.Random(cfg.seed)
    t0, losses = time.time(), []
    model.train()
    for step in range(cfg.warmup_sft_steps):
        batch = rng.sample(demos, min(cfg.warmup_sft_batch_size, len(demos)))
        input_ids, attention, target = (t.to(device) for t in demo_batch(batch, tokenizer.pad_token_id))
        logps = token_logps(model, input_ids, attention)                                   # [B, T-1]
        loss = -(logps * target).sum() / target.sum().clamp(min=1)
        loss.backward()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 20 == 0 or step == cfg.warmup_sft_steps - 1:
            log.info("SFT warm-up step %d/%d: loss %.4f", step + 1, cfg.warmup_sft_steps, losses[-1])
    return {"steps": cfg.warmup_sft_steps, "demonstrations": len(demos), "first_loss": losses[0],
            "final_loss": losses[-1], "seconds": round(time.time() - t0, 1)}


def env_engine(cfg, model, tokenizer, engine, eval_prompts, pipeline, out) -> tuple[object, dict]:
    """The multi-turn engine of an ``--env`` run around ``engine``, and the SFT warm-up done first
    (with the held-out accuracy before it, so the warm-up's share of a run's gain is on record)."""
    from rlxf.envs import get_env
    from rlxf.recipes.online import evaluate_greedy
    from rlxf.rollout.multiturn import EnvRollout
    from rlxf.runtime.checkpoint import latest_checkpoint

    factory = get_env(cfg.env, unsafe_code=cfg.unsafe_reward_code)
    engine = EnvRollout(engine, tokenizer, factory, max_turns=cfg.max_turns, max_episode_tokens=cfg.max_episode_tokens)
    if not cfg.warmup_sft_steps or (cfg.resume and latest_checkpoint(out / "checkpoints") is not None):
        return engine, {}
    before = evaluate_greedy(engine, eval_prompts, pipeline, max_new_tokens=cfg.max_new_tokens,
                             batch_size=max(cfg.eval_batch_size, 64))
    from rlxf.recipes.common import load_split_rows

    train_rows, _ = load_split_rows(cfg, "prompt")
    info = sft_warmup(model, tokenizer, factory, train_rows, cfg)
    info["before"] = {k: before[k] for k in ("task_accuracy", "tool_calls", "turns") if k in before}
    log.info("SFT warm-up: %s", info)
    return engine, info
