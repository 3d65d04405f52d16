"""Reward model: ``rlxf rm``.

A scalar head on the last non-pad token (HF ``*ForSequenceClassification``, ``num_labels=1``)
trained on preference pairs with Bradley-Terry (docs/methods/reward-model.md: optional per-pair margin, reward
centering η(r_w + r_l)², soft labels ``chosen_probability`` from an AI labeler (RLAIF L_soft))
or COOL-RLHF's focal ranking loss with log-barrier (InternLM2, arXiv 2403.17297).
Eval: held-out pairwise accuracy (chosen scored above rejected, ties ½) and score margins.

``conditions`` makes it COOL-RLHF's *conditional* RM: each row's prompt is prefixed with its
domain's condition (:mod:`rlxf.data.conditions`) before tokenisation, train and eval alike, and the
mapping is saved with the model (``final/conditions.yaml``) so the ``reward_model`` reward
conditions its inputs the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rlxf.configs.rm import RewardModelConfig
from rlxf.losses import bradley_terry_loss, focal_ranking_loss
from rlxf.recipes.common import load_model_for_training, load_split_rows, setup_logging, win_rates_by_kind
from rlxf.reporting import Panel
from rlxf.train.offline import fit
from rlxf.train.rundir import check_output_dir, start_run_dir


def train(cfg: RewardModelConfig):
    from rlxf.data import collate_preference, tokenize_preference
    from rlxf.data.conditions import apply_conditions, load_conditions, save_conditions
    from rlxf.models import reward_scores, save_pretrained
    from rlxf.runtime import seed_everything

    setup_logging()
    out = check_output_dir(cfg, "rm")
    train_rows, eval_rows = load_split_rows(cfg, "preference")
    conditions = load_conditions(cfg.conditions)
    if conditions is not None:
        train_rows = apply_conditions(train_rows, conditions, default_domain=task_name(cfg.dataset))
        eval_rows = apply_conditions(eval_rows, conditions,
                                     default_domain=task_name(cfg.eval_dataset or cfg.dataset))
    start_run_dir(cfg, out, "rm")      # only once the inputs are valid
    seed_everything(cfg.seed)
    model, tokenizer = load_model_for_training(cfg, reward_model=True)
    device = next(model.parameters()).device
    tok = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length, truncation=cfg.truncation)
    train_ex, stats = tokenize_preference(train_rows, tokenizer, **tok)
    eval_ex = tokenize_preference(eval_rows, tokenizer, **tok)[0] if eval_rows else []

    def collate(examples):
        return collate_preference(examples, tokenizer.pad_token_id)

    def forward(batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scores = reward_scores(model, batch["input_ids"], batch["attention_mask"])  # [2B]
        chosen, rejected = scores.chunk(2)  # [B], [B]
        if cfg.loss == "focal":
            losses = focal_ranking_loss(chosen, rejected, gamma=cfg.focal_gamma, barrier_weight=cfg.barrier_weight,
                                        bound=cfg.barrier_bound)
        else:
            margin = batch["margin"] if cfg.use_margin and batch["has_margin"] else None
            soft = batch["chosen_probability"] if cfg.soft_labels and batch["has_soft_label"] else None
            losses = bradley_terry_loss(chosen, rejected, margin=margin, center_coef=cfg.center_coef,
                                        soft_label=soft)
        return losses, chosen, rejected

    def pair_metrics(chosen, rejected) -> dict:
        diff = (chosen - rejected).detach().float()
        return {"accuracy": ((diff > 0).float() + 0.5 * (diff == 0).float()).mean().item(),
                "margin": diff.mean().item(), "score/chosen": chosen.detach().float().mean().item(),
                "score/rejected": rejected.detach().float().mean().item()}

    def loss_fn(batch):
        losses, chosen, rejected = forward(batch)
        return losses.mean(), pair_metrics(chosen, rejected)

    def evaluate() -> dict:
        if not eval_ex:
            return {}
        losses, chosen, rejected = [], [], []
        for start in range(0, len(eval_ex), cfg.eval_batch_size):
            batch = collate(eval_ex[start:start + cfg.eval_batch_size])
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            l, c, r = forward(batch)
            losses.append(l.float().cpu()), chosen.append(c.float().cpu()), rejected.append(r.float().cpu())
        chosen, rejected = torch.cat(chosen), torch.cat(rejected)  # [N], [N]
        return {"loss": torch.cat(losses).mean().item(), **pair_metrics(chosen, rejected),
                **win_rates_by_kind(chosen - rejected, [e.get("pair_kind") for e in eval_ex])}

    def save_final(path: Path) -> None:
        save_pretrained(model, tokenizer, path, merge_lora=cfg.merge_lora and cfg.lora_r > 0)
        if conditions is not None:
            save_conditions(conditions, path)

    kind_keys = sorted({f"accuracy/{e['pair_kind']}" for e in eval_ex if e.get("pair_kind")})
    panels = [Panel("pairwise accuracy", ["accuracy"], ylabel="fraction"),
              Panel("held-out accuracy by pair kind", kind_keys, split="eval", ylabel="fraction"),
              Panel("score margin", ["margin"]),
              Panel("scores", ["score/chosen", "score/rejected"]), Panel("loss", ["loss"]),
              Panel("learning rate", ["lr"], split="train")]
    return fit(cfg, recipe="rm", out=out, model=model, tokenizer=tokenizer, train_examples=train_ex,
               collate=collate, loss_fn=loss_fn, evaluate=evaluate, panels=panels,
               headline={"accuracy": "max", "margin": "max", "loss": "min"}, save_final=save_final,
               extra_summary=lambda: {"data": {"train_pairs": len(train_ex), "eval_pairs": len(eval_ex),
                                               "tokenization": stats.as_dict()}})


def task_name(dataset: str | None) -> str | None:
    """``NAME`` of a ``task:NAME`` dataset (the default domain of its rows), else None."""
    return dataset.split(":", 1)[1] if dataset and dataset.startswith("task:") else None
