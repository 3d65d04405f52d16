"""The offline step on the one loop: a fixed dataset in batches, a ``loss_fn(batch)`` per micro-batch.

:func:`fit` is what every offline recipe (sft, rm, dpo family, orpo) calls: it hands
:func:`rlxf.train.run` a step that draws ``batch_size × grad_accum`` examples (:class:`EpochBatcher`,
resumable), splits them into micro-batches, backpropagates ``loss / grad_accum`` for each, averages
the gradients over the torchrun processes (each takes its slice of every micro-batch), clips and
steps. A non-finite loss on any process stops every process with a message naming the last good
checkpoint.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import torch

from rlxf.reporting import Panel
from rlxf.runtime import distributed, latest_checkpoint
from rlxf.train.common import (TrainingError, autocast_context, build_optimizer, build_scheduler, clip_and_step,
                               mean_metrics)
from rlxf.train.loop import Loop, RunResult, run


def total_steps(cfg, num_examples: int) -> int:
    """Optimiser steps of an offline run: ``--max-steps``, else ``--epochs`` passes over the data."""
    from rlxf.config import ConfigError

    per_step = cfg.batch_size * cfg.grad_accum
    if per_step > num_examples:
        raise ConfigError(f"batch_size × grad_accum = {per_step} exceeds the {num_examples} training examples; "
                          f"lower --batch-size/--grad-accum or add data")
    if cfg.max_steps:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * (num_examples // per_step)))


def fit(cfg, *, recipe: str, out: Path, model, tokenizer, train_examples: list,
        collate: Callable[[list], dict], loss_fn: Callable[[dict], tuple[torch.Tensor, dict]],
        evaluate: Callable[[], dict], panels: list[Panel], headline: dict[str, str],
        save_final: Callable[[Path], None], extra_summary: Callable[[], dict] | None = None) -> RunResult:
    """Train ``model`` on ``train_examples`` with ``loss_fn``; see the module docstring.

    ``headline``: eval metric name -> "max" or "min" (which way is better); each is recorded as
    ``start/<m>``, ``final/<m>`` and ``best/<m>`` in summary.json.
    """
    from rlxf.data import EpochBatcher

    steps = total_steps(cfg, len(train_examples))
    distributed.broadcast_parameters(model)
    batcher = EpochBatcher(len(train_examples), cfg.batch_size * cfg.grad_accum, seed=cfg.seed)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps)
    ckpt_root = out / "checkpoints"
    step = _offline_step(cfg, model, batcher, train_examples, collate, loss_fn, optimizer, scheduler, ckpt_root)

    def summary(start: dict, last: dict) -> dict:
        extra = ({"data_parallel": {"rows_per_process": cfg.batch_size // distributed.world_size()}}
                 if distributed.active() else {})
        return {**extra, **(extra_summary() if extra_summary else {})}

    return run(Loop(cfg=cfg, recipe=recipe, out=out, model=model, tokenizer=tokenizer, optimizer=optimizer,
                      scheduler=scheduler, total_steps=steps, step=step, evaluate=evaluate, headline=headline,
                      panels=panels, title=f"rlxf {recipe}: {cfg.model} on {cfg.dataset}", save_final=save_final,
                      components={"batcher": batcher}, summary=summary))


def _offline_step(cfg, model, batcher, examples, collate, loss_fn, optimizer, scheduler, ckpt_root):
    device = next(model.parameters()).device
    rank, world = distributed.rank(), distributed.world_size()

    def step(index: int) -> dict:
        t0 = time.time()
        indices = batcher.next_indices()
        micro, tokens = [], 0
        for start in range(0, len(indices), cfg.batch_size):
            rows = indices[start:start + cfg.batch_size]
            share = len(rows) // world
            batch = collate([examples[i] for i in rows[rank * share:(rank + 1) * share]])
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            tokens += int(batch["attention_mask"].sum())
            with autocast_context(cfg, model):
                loss, metrics = loss_fn(batch)
            check_finite(loss, index, ckpt_root)
            (loss / cfg.grad_accum).backward()
            micro.append({"loss": loss.item(), **metrics})
        distributed.average_gradients(model.parameters())
        grad_norm = clip_and_step(model.parameters(), optimizer, scheduler, cfg.max_grad_norm)
        if world > 1:  # metrics of the whole step: the ranks' means (equal shares), tokens summed
            tokens = sum(distributed.gather(tokens))
            metrics = mean_metrics(distributed.gather(mean_metrics(micro)))
        else:
            metrics = mean_metrics(micro)
        seconds = time.time() - t0
        return {**metrics, "grad_norm": grad_norm, "tokens_per_s": tokens / max(seconds, 1e-9),
                "_train_seconds": seconds, "_train_tokens": tokens}

    return step


def check_finite(loss: torch.Tensor, index: int, ckpt_root: Path, hint: str = "lower --lr") -> None:
    """Stop every process together when ``loss`` is not finite on any of them."""
    bad = not bool(torch.isfinite(loss))
    if distributed.any_true(bad):  # a collective under torchrun
        good = latest_checkpoint(ckpt_root)
        raise TrainingError(
            f"non-finite loss ({loss.item() if bad else 'on another process'}) at step {index + 1}; "
            + (f"last good checkpoint: {good} (resume from it with --resume and {hint})" if good
               else f"no checkpoint was written yet; {hint} or check the data"))
