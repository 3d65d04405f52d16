"""Supervised fine-tuning: ``rlxf sft``.

Loss: token-mean negative log-likelihood of the completion tokens (prompt tokens masked), over the
micro-batch. Eval: held-out loss and perplexity, and, for a built-in task, greedy accuracy.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from rlxf.configs.sft import SFTConfig
from rlxf.recipes.common import load_model_for_training, load_split_rows, setup_logging, task_eval_metrics
from rlxf.reporting import Panel
from rlxf.train.offline import fit
from rlxf.train.rundir import check_output_dir, start_run_dir

log = logging.getLogger("rlxf.sft")


def completion_nll(model, batch: dict) -> torch.Tensor:
    """Token-mean NLL of completion tokens over the batch (scalar)."""
    from rlxf.models import token_logps

    mask = batch["completion_mask"][:, 1:]  # [B, T-1]
    logps = token_logps(model, batch["input_ids"], batch["attention_mask"], label_mask=mask)  # [B, T-1]
    mask = mask.to(logps.dtype)
    return -(logps * mask).sum() / mask.sum().clamp(min=1)


def train(cfg: SFTConfig):
    from rlxf.data import collate_sft, tokenize_sft
    from rlxf.models import save_pretrained
    from rlxf.runtime import seed_everything

    setup_logging()
    out = check_output_dir(cfg, "sft")
    train_rows, eval_rows = load_split_rows(cfg, "sft")
    start_run_dir(cfg, out, "sft")     # only once the inputs are valid
    seed_everything(cfg.seed)
    model, tokenizer = load_model_for_training(cfg)
    device = next(model.parameters()).device
    train_ex, stats = tokenize_sft(train_rows, tokenizer, max_length=cfg.max_length, truncation=cfg.truncation)
    eval_ex = tokenize_sft(eval_rows, tokenizer, max_length=cfg.max_length, truncation=cfg.truncation)[0] \
        if eval_rows else []
    log.info("train rows: %s", stats.summary())

    def collate(examples):
        return collate_sft(examples, tokenizer.pad_token_id)

    def loss_fn(batch):
        return completion_nll(model, batch), {}

    def evaluate() -> dict:
        metrics = {}
        if eval_ex:
            total, weight = 0.0, 0
            for start in range(0, len(eval_ex), cfg.eval_batch_size):
                batch = collate(eval_ex[start:start + cfg.eval_batch_size])
                batch = {k: v.to(device) for k, v in batch.items()}
                n = int(batch["completion_mask"][:, 1:].sum())
                total += completion_nll(model, batch).item() * n
                weight += n
            metrics["loss"] = total / max(1, weight)
            metrics["perplexity"] = math.exp(min(metrics["loss"], 50))
        metrics.update(task_eval_metrics(cfg, model, tokenizer))
        return metrics

    def save_final(path: Path) -> None:
        save_pretrained(model, tokenizer, path, merge_lora=cfg.merge_lora and cfg.lora_r > 0)

    panels = [Panel("loss (completion NLL)", ["loss"]), Panel("perplexity", ["perplexity"], split="eval"),
              Panel("task accuracy (greedy)", ["task_accuracy"], split="eval"),
              Panel("learning rate", ["lr"], split="train")]
    return fit(cfg, recipe="sft", out=out, model=model, tokenizer=tokenizer, train_examples=train_ex,
               collate=collate, loss_fn=loss_fn, evaluate=evaluate, panels=panels,
               headline={"loss": "min", "task_accuracy": "max"}, save_final=save_final,
               extra_summary=lambda: {"data": {"train_rows": len(train_ex), "eval_rows": len(eval_ex),
                                               "tokenization": stats.as_dict()}})
