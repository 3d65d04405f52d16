"""KTO on unpaired feedback: ``rlxf kto`` (docs/methods/kto.md).

    rows {prompt, completion, label} (pairs {prompt, chosen, rejected} are split into a desirable and an
    undesirable row, as TRL's ``unpair_preference_dataset``)
      → a batch: prompt_i + completion_i, and the mismatched prompt_i + completion_{i−1} for the KL
      → sequence log-probs of both under the policy and the frozen reference (the initial model)
      → z_0 = max(0, mean KL of the mismatched rows), detached (averaged over processes under torchrun)
      → losses.kto_loss: λ_y − v(x, y) → mean over the batch → AdamW step
      → eval: KTO loss, z_0, implicit-reward accuracy (desirable above 0, undesirable below), per pair
        kind, the pair accuracy of rows split from pairs (desirable above undesirable), greedy task accuracy

Deviations: the reference runs on every batch (no precompute cache: the KL rows change with the
batch order); the loss is the mean over the batch's examples, so λ_D and λ_U weigh examples, as in
TRL's `KTOTrainer`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from rlxf.configs.kto import KTOConfig
from rlxf.losses.kto import kto_loss, kto_reference_point
from rlxf.recipes.common import (load_model_for_training, load_split_rows, setup_logging, task_eval_metrics,
                                 win_rates_by_kind)
from rlxf.reporting import Panel
from rlxf.runtime import distributed
from rlxf.train.offline import fit
from rlxf.train.rundir import check_output_dir, start_run_dir

log = logging.getLogger("rlxf.kto")


def train(cfg: KTOConfig):
    """Run KTO; returns the ``FitResult`` (summary + output dir)."""
    from rlxf.data import tokenize_kto, unpair_rows
    from rlxf.models import Reference
    from rlxf.runtime import seed_everything

    setup_logging()
    out = check_output_dir(cfg, "kto")
    train_rows, eval_rows = load_split_rows(cfg, "kto")
    train_rows, eval_rows = unpair_rows(train_rows), unpair_rows(eval_rows)
    start_run_dir(cfg, out, "kto")
    seed_everything(cfg.seed)
    model, tokenizer = load_model_for_training(cfg)
    tok = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length, truncation=cfg.truncation)
    train_ex, stats = tokenize_kto(train_rows, tokenizer, **tok)
    eval_ex, eval_stats = tokenize_kto(eval_rows, tokenizer, **tok) if eval_rows else ([], None)
    desirable = sum(e["label"] for e in train_ex)
    log.info("train examples: %d desirable, %d undesirable; %s", desirable, len(train_ex) - desirable,
             stats.summary())
    mode = cfg.reference if cfg.reference != "auto" else ("lora" if cfg.lora_r > 0 else "copy")
    step = KTOStep(cfg, model, tokenizer, Reference.build(model, mode), eval_ex)
    data_info = {"train_examples": len(train_ex), "train_desirable": desirable, "eval_examples": len(eval_ex),
                 "tokenization": stats.as_dict(), "eval_tokenization": eval_stats.as_dict() if eval_stats else None}
    panels = [Panel("implicit-reward accuracy", ["accuracy", "pair_accuracy"], ylabel="fraction"),
              Panel("implicit rewards", ["rewards/desirable", "rewards/undesirable"]),
              Panel("KL reference point z_0", ["kl"]), Panel("loss", ["loss"]),
              Panel("task accuracy (greedy)", ["task_accuracy"], split="eval"),
              Panel("learning rate", ["lr"], split="train")]
    return fit(cfg, recipe="kto", out=out, model=model, tokenizer=tokenizer, train_examples=train_ex,
               collate=step.collate, loss_fn=step.loss_fn, evaluate=step.evaluate, panels=panels,
               headline={"accuracy": "max", "pair_accuracy": "max", "loss": "min", "task_accuracy": "max"},
               save_final=step.save_final,
               extra_summary=lambda: {"data": data_info})


class KTOStep:
    """``collate``, ``loss_fn``, ``evaluate`` and ``save_final`` of a KTO run for :func:`rlxf.train.offline.fit`."""

    def __init__(self, cfg: KTOConfig, model, tokenizer, reference, eval_ex: list[dict]):
        self.cfg, self.model, self.tokenizer, self.reference, self.eval_ex = cfg, model, tokenizer, reference, eval_ex
        self.device = next(model.parameters()).device

    def collate(self, examples: list[dict]) -> dict:
        from rlxf.data import collate_kto

        return collate_kto(examples, self.tokenizer.pad_token_id)

    def _logps(self, batch: dict, prefix: str, *, reference: bool) -> torch.Tensor:
        """[B] summed completion log-probs of the ``prefix`` rows (matched "" or mismatched "kl_")."""
        from rlxf.models import sequence_logps, token_logps

        mask = batch[f"{prefix}completion_mask"][:, 1:]  # [B, T-1] aligned with the log-probs
        ids, att = batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"]
        if reference:
            with torch.no_grad():
                logps = self.reference.token_logps(ids, att, label_mask=mask)
        else:
            logps = token_logps(self.model, ids, att, label_mask=mask)
        return sequence_logps(logps, mask)  # [B]

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """Per-example loss [B] and the tensors the metrics read."""
        cfg = self.cfg
        logps = self._logps(batch, "", reference=False)                    # [B]
        ref_logps = self._logps(batch, "", reference=True)                 # [B]
        with torch.no_grad():
            kl_logps = self._logps(batch, "kl_", reference=False)          # [B] no gradient through z_0
            ref_kl = self._logps(batch, "kl_", reference=True)
        z0 = _global_reference_point(kl_logps, ref_kl)
        losses = kto_loss(logps, ref_logps, batch["label"], z0, beta=cfg.beta,
                          desirable_weight=cfg.desirable_weight, undesirable_weight=cfg.undesirable_weight)
        return losses, {"rewards": cfg.beta * (logps - ref_logps).detach(), "kl": z0, "label": batch["label"]}

    def loss_fn(self, batch: dict) -> tuple[torch.Tensor, dict]:
        losses, parts = self.forward(batch)
        return losses.mean(), _reward_metrics(parts["rewards"], parts["label"]) | {"kl": parts["kl"].item()}

    def evaluate(self) -> dict:
        if not self.eval_ex:
            return {}
        losses, rewards, labels, kls = [], [], [], []
        with torch.no_grad():
            for start in range(0, len(self.eval_ex), self.cfg.eval_batch_size):
                batch = self.collate(self.eval_ex[start:start + self.cfg.eval_batch_size])
                batch = {k: v.to(self.device) for k, v in batch.items()}
                loss, parts = self.forward(batch)
                losses.append(loss.float().cpu())
                rewards.append(parts["rewards"].float().cpu())
                labels.append(parts["label"].cpu())
                kls.append(parts["kl"].item())
        rewards, labels = torch.cat(rewards), torch.cat(labels)
        metrics = {"loss": torch.cat(losses).mean().item(), "kl": sum(kls) / len(kls),
                   **_reward_metrics(rewards, labels)}
        signed = torch.where(labels, rewards, -rewards)  # > 0: the reward points the label's way
        metrics.update(win_rates_by_kind(signed, [e.get("pair_kind") for e in self.eval_ex]))
        metrics.update(_pair_accuracy(rewards, self.eval_ex))
        metrics.update(task_eval_metrics(self.cfg, self.model, self.tokenizer))
        return metrics

    def save_final(self, path: Path) -> None:
        from rlxf.models import save_pretrained

        save_pretrained(self.model, self.tokenizer, path, merge_lora=self.cfg.merge_lora and self.cfg.lora_r > 0)


def _global_reference_point(kl_logps: torch.Tensor, ref_kl: torch.Tensor) -> torch.Tensor:
    """z_0 of the whole step: the mismatched-KL mean averaged over processes, then clamped at 0 (as TRL)."""
    if not distributed.active():
        return kto_reference_point(kl_logps, ref_kl)
    local = (kl_logps - ref_kl).mean().detach().float().cpu()
    return torch.stack(distributed.gather(local)).mean().clamp(min=0).to(kl_logps.device)


def _pair_accuracy(rewards: torch.Tensor, examples: list[dict]) -> dict:
    """``pair_accuracy``: for eval rows split from pairs, the share of pairs whose desirable half has the
    higher implicit reward (ties ½), the accuracy DPO reports; {} when no pair kept both halves."""
    halves: dict = {}
    for reward, e in zip(rewards.tolist(), examples):
        if e.get("pair_id") is not None:
            halves.setdefault(e["pair_id"], {})[e["label"]] = reward
    margins = torch.tensor([h[True] - h[False] for h in halves.values() if len(h) == 2])
    if not len(margins):
        return {}
    return {"pair_accuracy": ((margins > 0).float() + 0.5 * (margins == 0).float()).mean().item()}


def _reward_metrics(rewards: torch.Tensor, labels: torch.Tensor) -> dict:
    """Implicit-reward accuracy (desirable > 0, undesirable < 0, ties ½) and the mean reward of each side."""
    signed = torch.where(labels, rewards, -rewards)
    metrics = {"accuracy": ((signed > 0).float() + 0.5 * (signed == 0).float()).mean().item()}
    if labels.any():
        metrics["rewards/desirable"] = rewards[labels].mean().item()
    if (~labels).any():
        metrics["rewards/undesirable"] = rewards[~labels].mean().item()
    return metrics
