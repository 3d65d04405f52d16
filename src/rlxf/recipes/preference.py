"""Offline preference optimisation: ``rlxf dpo`` (DPO, IPO, cDPO, DPO+NLL), ``rlxf rpo`` and ``rlxf orpo``.

One loop serves every preference loss of the registry (``rlxf.losses.get_preference_loss``;
docs/losses.md, docs/methods/dpo.md, rpo.md, orpo.md):

    pairs → [chosen; rejected] log-probs of the completion tokens (policy, and reference when the loss needs it)
          → PreferenceInputs → the entry named by ``loss`` (dpo | ipo | cdpo | rpo | orpo)
            [+ nll_alpha · length-normalised chosen NLL]
          → AdamW step → eval: implicit-reward accuracy / margins (log-odds accuracy for ORPO)

The reference is the initial policy: a frozen copy for full fine-tuning, the base model with
adapters disabled for LoRA, and absent for a loss that needs none (ORPO). With ``precompute_ref``
(default) reference log-probs are computed once for every train and eval pair, before training,
and cached on disk (``output_dir/cache``) keyed by model and tokenised data, so the reference
never runs again.

Deviations (stated here and in docs/methods/): sequence log-probs are sums unless ``length_norm``
(TRL's IPO length-normalises by default: set ``length_norm true`` to reproduce it); ORPO's NLL is
over completion tokens (the official code's ``disable_prompt_loss``; TRL includes the prompt); RPO
pairs without scores use NeMo-Aligner's defaults 1.0 / 0.0 (logged).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from rlxf.configs.preference import LOSSES, ORPOConfig, PreferenceConfig, RPOConfig
from rlxf.losses import PreferenceInputs, get_preference_loss, preference_metrics
from rlxf.recipes.common import (load_model_for_training, load_split_rows, setup_logging, task_eval_metrics,
                                 win_rates_by_kind)
from rlxf.reporting import Panel
from rlxf.reporting.progress import PhaseProgress
from rlxf.train.offline import fit
from rlxf.train.rundir import check_output_dir, start_run_dir

log = logging.getLogger("rlxf.preference")
RPO_DEFAULT_SCORES = (1.0, 0.0)  # NeMo-Aligner default_chosen_reward / default_rejected_reward


def _cache_key(cfg: PreferenceConfig, examples: list[dict]) -> str:
    h = hashlib.sha256()
    # shared-prompt values differ from the plain path's in the last float bits: keep them apart
    h.update(json.dumps([cfg.model, cfg.length_norm, cfg.dtype] + (["share_prompt"] if cfg.share_prompt else [])
                        ).encode())
    for e in examples:
        h.update(json.dumps([e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]]).encode())
    return h.hexdigest()[:16]


def _pair_logps(logps_fn, batch: dict, length_norm: bool) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(chosen, rejected) sequence log-probs [B] and the per-pair mean log-probs ORPO/NLL need.

    ``logps_fn(input_ids, attention_mask, label_mask=...) -> [2B, T-1]`` is the policy's or the
    reference's :func:`rlxf.models.token_logps`; only completion positions reach the output head.
    """
    from rlxf.models import mean_logps, sequence_logps

    mask = batch["completion_mask"][:, 1:]  # [2B, T-1] aligned with logps
    logps = logps_fn(batch["input_ids"], batch["attention_mask"], label_mask=mask)  # [2B, T-1]
    means = mean_logps(logps, mask)  # [2B]
    seq = means if length_norm else sequence_logps(logps, mask)  # [2B]
    b = seq.shape[0] // 2
    return seq[:b], seq[b:], {"mean_chosen": means[:b], "mean_rejected": means[b:]}


def _shared_pair_logps(logps_fn, batch: dict, length_norm: bool) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """:func:`_pair_logps` with each prompt encoded once (``--share-prompt``).

    ``logps_fn(prompt_ids, prompt_mask, completion_ids, completion_mask) -> [2B, C]`` is
    :func:`rlxf.models.shared_prompt_logps` for the policy or ``Reference.shared_prompt_logps``: the
    reference goes through the same path, so policy and reference agree exactly at the start.
    """
    from rlxf.models import mean_logps, sequence_logps

    mask = batch["pair_completion_mask"]                                    # [2B, C], chosen/rejected interleaved
    logps = logps_fn(batch["prompt_ids"], batch["prompt_mask"], batch["pair_completion_ids"], mask)  # [2B, C]
    means = mean_logps(logps, mask)
    seq = means if length_norm else sequence_logps(logps, mask)
    return seq[0::2], seq[1::2], {"mean_chosen": means[0::2], "mean_rejected": means[1::2]}


def nograd_batches(cfg: PreferenceConfig, examples: list[dict]) -> list[list[int]]:
    """Indices of ``examples`` for forward passes without gradients (reference log-probs, eval), in
    batches of at most ``eval_batch_size`` pairs and at most the padded tokens of one training
    micro-batch (``2 · batch_size · max_length``), so that these passes never need more activation
    memory than a training step (a 64-pair batch of 956-token pairs held ≈ 10 GB of MLP
    activations at the Llama-3-8B shape; docs/performance.md). Pairs are taken shortest first, so
    a batch pads to a length close to its own rows' (on the built-in arithmetic pairs: a third
    fewer padded tokens than in file order); callers put the results back in file order."""
    from rlxf.data import token_bounded_slices

    lengths = [len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in examples]
    order = sorted(range(len(examples)), key=lengths.__getitem__)   # stable: ties keep file order
    slices = token_bounded_slices([2 * lengths[i] for i in order], max_rows=cfg.eval_batch_size,
                                  max_tokens=2 * cfg.batch_size * cfg.max_length)
    return [order[part] for part in slices]


def _in_file_order(batches: list[list[int]], values: torch.Tensor) -> torch.Tensor:
    """``values`` (rows in the order of ``batches``, concatenated) put back in file order."""
    order = torch.tensor([i for batch in batches for i in batch], dtype=torch.long)
    out = torch.empty_like(values)
    out[order] = values
    return out


def precompute_reference(cfg: PreferenceConfig, reference, examples: list[dict], pad_id: int, cache_dir: Path,
                         device: torch.device, *, share: bool = True) -> None:
    """Store ``ref_chosen_logps`` / ``ref_rejected_logps`` in every example (cached on disk). Under
    torchrun each process scores a share of ``examples`` when ``share``, else all of them in the
    batches a single process would use (the held-out pairs: the batches of the evaluation, which
    process 0 runs, so the step-0 margins are exactly 0 on any number of processes; the other
    processes repeat that pass alongside process 0 rather than wait for it)."""
    from rlxf.data import collate_preference
    from rlxf.runtime import distributed, fsdp

    if not examples:
        return
    cache = cache_dir / f"ref_logps-{_cache_key(cfg, examples)}.pt"
    if distributed.broadcast(cache.exists()):                               # rank 0 decides under torchrun
        values = torch.load(cache, weights_only=True)  # [N, 2]
        log.info("reference log-probs: loaded %d pairs from %s", len(values), cache)
    else:
        # under torchrun each process scores a contiguous share and the shares are gathered in order
        rank, world = (distributed.rank(), distributed.world_size()) if share else (0, 1)
        mine = examples[rank * len(examples) // world:(rank + 1) * len(examples) // world]
        rows, batches = [], nograd_batches(cfg, mine)
        progress = PhaseProgress("reference log-probs", len(batches), unit="batches",
                                 detail=f"of up to {cfg.eval_batch_size} pairs, computed once and cached")
        # --fsdp: the shares may take different numbers of batches, so the reference is gathered whole
        # first and no forward is a collective
        with torch.no_grad(), fsdp.gathered(reference.model):
            for part in batches:
                batch = collate_preference([mine[i] for i in part], pad_id)
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                if cfg.share_prompt:
                    chosen, rejected, _ = _shared_pair_logps(reference.shared_prompt_logps, batch, cfg.length_norm)
                else:
                    chosen, rejected, _ = _pair_logps(reference.token_logps, batch, cfg.length_norm)
                rows.append(torch.stack([chosen, rejected], dim=1).float().cpu())
                progress.update()
        progress.close()
        values = _in_file_order(batches, torch.cat(rows)) if rows else torch.zeros(0, 2)
        if world > 1:
            values = torch.cat(distributed.gather(values))

        def save() -> None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            torch.save(values, cache)

        distributed.on_main(save)
    for e, (c, r) in zip(examples, values.tolist()):
        e["ref_chosen_logps"], e["ref_rejected_logps"] = c, r


def train(cfg: PreferenceConfig):
    """Run the preference recipe; returns the ``FitResult`` (summary + output dir)."""
    from rlxf.data import tokenize_preference
    from rlxf.runtime import seed_everything

    setup_logging()
    recipe = cfg.loss
    loss_entry = get_preference_loss(cfg.loss)  # chosen once; forward() calls it
    loss_params = loss_entry.params(cfg)
    out = check_output_dir(cfg, recipe)
    train_rows, eval_rows = load_split_rows(cfg, "preference")
    start_run_dir(cfg, out, recipe)    # only once the inputs are valid
    seed_everything(cfg.seed)
    model, tokenizer = load_model_for_training(cfg)
    device = next(model.parameters()).device
    tok = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length, truncation=cfg.truncation)
    train_ex, stats = tokenize_preference(train_rows, tokenizer, **tok)
    log.info("train pairs: %s", stats.summary())
    eval_ex, eval_stats = tokenize_preference(eval_rows, tokenizer, **tok) if eval_rows else ([], None)
    if loss_entry.needs_scores and not all(e.get("chosen_score") is not None and e.get("rejected_score") is not None
                                           for e in train_ex):
        log.warning("%s: some pairs have no chosen_score/rejected_score; using NeMo defaults %s for them",
                    cfg.loss, RPO_DEFAULT_SCORES)
    reference = _reference(cfg, loss_entry, model, (train_ex, eval_ex), tokenizer.pad_token_id, out / "cache", device)
    step = PreferenceStep(cfg, loss_entry, loss_params, model, tokenizer, reference, eval_ex, device)
    data_info = {"train_pairs": len(train_ex), "eval_pairs": len(eval_ex), "tokenization": stats.as_dict(),
                 "eval_tokenization": eval_stats.as_dict() if eval_stats else None}
    return fit(cfg, recipe=recipe, out=out, model=model, tokenizer=tokenizer, train_examples=train_ex,
               collate=step.collate, loss_fn=step.loss_fn, evaluate=step.evaluate, panels=_panels(loss_entry, eval_ex),
               headline=_headline(loss_entry), save_final=step.save_final, extra_summary=lambda: {"data": data_info})


def _reference(cfg: PreferenceConfig, loss_entry, model, groups: tuple[list[dict], list[dict]], pad_id: int,
               cache_dir: Path, device: torch.device):
    """The frozen reference the loss needs (None for a loss without one). With ``precompute_ref`` its
    log-probs are stored in the examples of each group (training, held-out) first, and a full copy is
    then dropped: the cached values are all the run needs. Each group is batched on its own, as the
    evaluation batches the held-out pairs, so at step 0 (policy = reference) every held-out margin
    is exactly 0."""
    from rlxf.models import Reference

    if not loss_entry.needs_reference:
        return None
    mode = cfg.reference if cfg.reference != "auto" else ("lora" if cfg.lora_r > 0 else "copy")
    reference = Reference.build(model, mode)
    if cfg.precompute_ref:
        train_ex, eval_ex = groups
        precompute_reference(cfg, reference, train_ex, pad_id, cache_dir, device)
        precompute_reference(cfg, reference, eval_ex, pad_id, cache_dir, device, share=False)
        if mode == "copy":
            reference = None  # the cached values are all we need: free the copy
    return reference


class PreferenceStep:
    """The pieces of a preference run that :func:`rlxf.train.offline.fit` calls: ``collate``,
    ``loss_fn``, ``evaluate`` and ``save_final``, over one loss of the registry (``loss_entry``)."""

    def __init__(self, cfg: PreferenceConfig, loss_entry, loss_params: dict, model, tokenizer, reference,
                 eval_ex: list[dict], device: torch.device):
        self.cfg, self.loss_entry, self.loss_params = cfg, loss_entry, loss_params
        self.model, self.tokenizer, self.reference = model, tokenizer, reference
        self.eval_ex, self.device = eval_ex, device
        self.pad_id = tokenizer.pad_token_id

    def policy_logps(self, input_ids, attention_mask, label_mask=None):
        from rlxf.models import token_logps

        return token_logps(self.model, input_ids, attention_mask, label_mask=label_mask)

    def collate(self, examples: list[dict]) -> dict:
        from rlxf.data import collate_preference

        batch = collate_preference(examples, self.pad_id)
        if "ref_chosen_logps" in examples[0]:
            batch["ref_chosen"] = torch.tensor([e["ref_chosen_logps"] for e in examples])  # [B]
            batch["ref_rejected"] = torch.tensor([e["ref_rejected_logps"] for e in examples])  # [B]
        return batch

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict, dict]:
        """Per-pair loss [B], metric tensors, and the pair log-probs."""
        from rlxf.models import shared_prompt_logps

        cfg, loss_entry, reference = self.cfg, self.loss_entry, self.reference
        if cfg.share_prompt:
            chosen, rejected, parts = _shared_pair_logps(partial(shared_prompt_logps, self.model), batch,
                                                         cfg.length_norm)
        else:
            chosen, rejected, parts = _pair_logps(self.policy_logps, batch, cfg.length_norm)
        ref_c = ref_r = chosen_s = rejected_s = None
        if loss_entry.needs_reference:
            if "ref_chosen" in batch:
                ref_c, ref_r = batch["ref_chosen"], batch["ref_rejected"]
            else:
                ref_fn = reference.shared_prompt_logps if cfg.share_prompt else None
                ref_c, ref_r, _ = (_shared_pair_logps(ref_fn, batch, cfg.length_norm) if ref_fn
                                   else _pair_logps(reference.token_logps, batch, cfg.length_norm))
        if loss_entry.needs_scores:
            chosen_s, rejected_s = _scores(batch)
        nll = -parts["mean_chosen"]  # [B] token-mean NLL of the chosen completion
        inputs = PreferenceInputs(chosen_logps=chosen, rejected_logps=rejected, chosen_mean_logps=parts["mean_chosen"],
                                  rejected_mean_logps=parts["mean_rejected"], chosen_nll=nll, ref_chosen_logps=ref_c,
                                  ref_rejected_logps=ref_r, chosen_scores=chosen_s, rejected_scores=rejected_s)
        losses = loss_entry(inputs, **self.loss_params)  # [B]
        if cfg.nll_alpha > 0:
            losses = losses + cfg.nll_alpha * nll
        extra = {}
        if not loss_entry.needs_reference:  # no implicit reward: the policy's own log-odds are the metric
            extra["log_odds_ratio"] = _log_odds(parts["mean_chosen"]) - _log_odds(parts["mean_rejected"])  # [B]
        if cfg.nll_alpha > 0 or loss_entry.includes_nll or not loss_entry.needs_reference:
            extra["nll"] = nll
        pairs = {"pairs": (chosen, rejected, ref_c, ref_r)} if loss_entry.needs_reference else {}
        return losses, extra, pairs

    def loss_fn(self, batch: dict) -> tuple[torch.Tensor, dict]:
        losses, extra, pairs = self.forward(batch)
        metrics = {k: v.mean().item() for k, v in extra.items()}
        if pairs:
            metrics.update(preference_metrics(*(t.detach() for t in pairs["pairs"]), beta=self.cfg.beta))
        else:
            metrics["log_odds_accuracy"] = _win_rate(extra["log_odds_ratio"])
        return losses.mean(), metrics

    def evaluate(self) -> dict:
        eval_ex, cfg = self.eval_ex, self.cfg
        if not eval_ex:
            return {}
        losses, extras, pairs = [], {}, []
        batches = nograd_batches(cfg, eval_ex)
        for part in batches:
            batch = self.collate([eval_ex[i] for i in part])
            batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            l, extra, p = self.forward(batch)
            losses.append(l.float().cpu())
            for k, v in extra.items():
                extras.setdefault(k, []).append(v.float().cpu())
            if p:
                pairs.append(torch.stack([t.float().cpu() for t in p["pairs"]]))
        metrics = {"loss": torch.cat(losses).mean().item()}
        metrics.update({k: torch.cat(v).mean().item() for k, v in extras.items()})
        kinds = [eval_ex[i].get("pair_kind") for part in batches for i in part]   # the rows' order above
        if pairs:
            chosen, rejected, ref_c, ref_r = torch.cat(pairs, dim=1)  # each [N]
            metrics.update(preference_metrics(chosen, rejected, ref_c, ref_r, beta=cfg.beta))
            metrics["accuracy"] = metrics["rewards/accuracy"]
            metrics.update(win_rates_by_kind((chosen - ref_c) - (rejected - ref_r), kinds))
        else:
            log_odds = torch.cat(extras["log_odds_ratio"])  # [N]
            metrics["log_odds_accuracy"] = metrics["accuracy"] = _win_rate(log_odds)
            metrics.update(win_rates_by_kind(log_odds, kinds))
        metrics.update(task_eval_metrics(cfg, self.model, self.tokenizer))
        return metrics

    def save_final(self, path: Path) -> None:
        from rlxf.models import save_pretrained

        save_pretrained(self.model, self.tokenizer, path, merge_lora=self.cfg.merge_lora and self.cfg.lora_r > 0)


def _panels(loss_entry, eval_ex: list[dict]) -> list[Panel]:
    """The report's panels: implicit-reward curves for a loss with a reference, log-odds for one without."""
    kind_keys = sorted({f"accuracy/{e['pair_kind']}" for e in eval_ex if e.get("pair_kind")})
    if not loss_entry.needs_reference:
        panels = [Panel("log-odds accuracy", ["log_odds_accuracy"], ylabel="fraction"),
                  Panel("log odds ratio (chosen − rejected)", ["log_odds_ratio"]),
                  Panel("chosen NLL (token mean)", ["nll"]), Panel("loss", ["loss"])]
    else:
        panels = [Panel("implicit-reward accuracy", ["rewards/accuracy"], ylabel="fraction"),
                  Panel("reward margin", ["rewards/margin"]),
                  Panel("implicit rewards", ["rewards/chosen", "rewards/rejected"]),
                  Panel("log-probs", ["logps/chosen", "logps/rejected"]), Panel("loss", ["loss"])]
    panels += [Panel("held-out accuracy by pair kind", kind_keys, split="eval", ylabel="fraction"),
               Panel("task accuracy (greedy)", ["task_accuracy"], split="eval"),
               Panel("learning rate", ["lr"], split="train")]
    return panels


def _headline(loss_entry) -> dict[str, str]:
    return {"accuracy": "max", "loss": "min", "task_accuracy": "max",
            ("rewards/margin" if loss_entry.needs_reference else "log_odds_ratio"): "max"}


def _scores(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    chosen = torch.nan_to_num(batch["chosen_scores"], nan=RPO_DEFAULT_SCORES[0])  # [B]
    rejected = torch.nan_to_num(batch["rejected_scores"], nan=RPO_DEFAULT_SCORES[1])  # [B]
    return chosen, rejected


def _log_odds(mean_logps: torch.Tensor) -> torch.Tensor:
    """log(P / (1 − P)) for P = exp(mean log-prob) (ORPO's odds), computed stably."""
    logp = mean_logps.clamp(max=-1e-6)
    return logp - torch.log(-torch.expm1(logp))


def _win_rate(values: torch.Tensor) -> float:
    """Fraction of positive values, ties counting ½ (as preference_metrics)."""
    return ((values > 0).float() + 0.5 * (values == 0).float()).mean().item()
