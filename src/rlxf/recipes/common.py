"""What every recipe shares before its first step: the base configs, loading the model for
training, the train/eval rows, and task accuracy at eval.

The loop itself is :func:`rlxf.train.run` (offline recipes through :func:`rlxf.train.offline.fit`).
A recipe checks its options, its output directory and its data before it writes anything
(:func:`rlxf.train.rundir.check_output_dir`, :func:`load_split_rows`, then
:func:`rlxf.train.rundir.start_run_dir`), and writes only into a new or empty directory or one of
its own runs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from rlxf.config import ConfigError, save_yaml, to_dict
from rlxf.configs.base import RunConfig, TrainConfig
from rlxf.reporting import MetricsLogger, Panel, Progress, write_report, write_summary
from rlxf.runtime import distributed, latest_checkpoint, load_checkpoint, save_checkpoint, seed_everything

log = logging.getLogger("rlxf")

# -- set-up pieces -------------------------------------------------------------------------------

def setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def load_model_for_training(cfg: RunConfig, *, reward_model: bool = False):
    """(model, tokenizer) on the configured device/dtype, with LoRA and checkpointing applied."""
    from rlxf.models import (apply_lora, ensure_pad_token, load_policy, load_reward_model, load_tokenizer,
                             resolve_device)

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    sharded = getattr(cfg, "fsdp", False)
    try:
        device = distributed.init(cfg.device, single=sharded) if distributed.active() or sharded \
            else resolve_device(cfg.device)
        dtype = training_dtype(cfg, device)
    except ValueError as exc:
        raise ConfigError(f"--device/--dtype: {exc}") from None
    t0 = time.time()
    log.info("loading model %s onto %s (%s%s)%s", cfg.model, device, str(dtype).removeprefix("torch."),
             f", linear layers in 4-bit {cfg.quantize}" if cfg.quantize != "none" else "",
             "" if cfg.model == "tiny" or Path(cfg.model).expanduser().exists() else
             " from the Hugging Face Hub cache, downloading it first if it is not there")
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    added_pad = ensure_pad_token(tokenizer)
    resize = len(tokenizer) if added_pad else None
    # --fsdp: loaded into host memory, then each layer moves to the GPU as it is sharded, so the whole
    # model never has to fit one GPU (with --fsdp-cpu-offload the shards stay in host memory)
    load_device = torch.device("cpu") if sharded else device
    if reward_model:
        model = load_reward_model(cfg.model, dtype=dtype, device=load_device, trust_remote_code=cfg.trust_remote_code,
                                  pad_token_id=tokenizer.pad_token_id, resize_to=resize, quantize=cfg.quantize,
                                  double_quant=cfg.double_quant)
    else:
        model = load_policy(cfg.model, dtype=dtype, device=load_device, trust_remote_code=cfg.trust_remote_code,
                            resize_to=resize, quantize=cfg.quantize, double_quant=cfg.double_quant)
    log.info("model %s loaded in %.1f s: %.2fM parameters", cfg.model, time.time() - t0,
             sum(p.numel() for p in model.parameters()) / 1e6)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if cfg.compile:
        from rlxf.models import compile_layers

        if device.type == "cuda":
            if cfg.gradient_checkpointing:
                log.info("compile with --gradient-checkpointing reruns whole layers in backward; "
                         "--activation-memory-budget 0.05 without it measured faster at similar memory "
                         "(docs/performance.md)")
            budget = cfg.activation_memory_budget if cfg.activation_memory_budget < 1 else None
            log.info("compile: %d decoder layers compiled", compile_layers(model, activation_memory_budget=budget))
        else:
            log.warning("--compile is ignored on %s (CUDA only)", device.type)
    if cfg.disable_dropout:
        disable_dropout(model)
    if sharded:
        shard_model(model, device, cpu_offload=cfg.fsdp_cpu_offload)
        return model, tokenizer
    if cfg.lora_r > 0:
        targets = cfg.lora_targets if cfg.lora_targets == "all-linear" else tuple(
            t.strip() for t in cfg.lora_targets.split(",") if t.strip())
        try:
            model = apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                               target_modules=targets, task_type="SEQ_CLS" if reward_model else "CAUSAL_LM")
        except ValueError as exc:
            raise ConfigError(f"--lora-targets: {exc}") from None
    return model, tokenizer


def shard_model(model: torch.nn.Module, device: torch.device, *, cpu_offload: bool) -> None:
    """``--fsdp``: the same starting weights on every process, then FSDP2 shards
    (:func:`rlxf.runtime.fsdp.shard`)."""
    from rlxf.runtime import fsdp

    distributed.broadcast_parameters(model)
    try:
        layers = len(fsdp.decoder_layers(model))
        fsdp.shard(model, device, cpu_offload=cpu_offload)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    log.info("FSDP2: %d decoder layers and the root sharded over %d process(es)%s", layers,
             distributed.world_size(), ", shards offloaded to the CPU" if cpu_offload else "")


def training_dtype(cfg: RunConfig, device: torch.device) -> torch.dtype:
    """The dtype the model loads in: ``--dtype``, or for ``auto`` fp32 master weights (bf16 compute
    comes from autocast on CUDA), except that a LoRA run on CUDA keeps its frozen base in bf16 (the
    base gets no updates, so fp32 copies of it would only double its memory; peft keeps the
    adapters in fp32). ``--quantize`` loads the unquantised weights in bf16 whatever this says."""
    from rlxf.models import resolve_dtype

    if cfg.dtype != "auto":
        return resolve_dtype(cfg.dtype, device)
    if cfg.lora_r > 0 and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to 0 (as TRL does by default): policy log-probs stay
    deterministic and comparable with the reference's."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


MIN_EVAL_ROWS = 32   # below this a held-out metric is noisy: one row moves an accuracy by > 3 points


def load_split_rows(cfg: RunConfig, kind: str) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows), validated. Tasks use their eval split; files a holdout or eval_dataset.

    Every invalid row of the training and eval data, unreadable lines included, is reported in one
    :class:`~rlxf.data.DataError`; with ``--skip-invalid`` they are dropped, counted and logged.
    Training rows follow ``--seed``. The held-out rows follow ``--eval-seed`` alone, so runs with
    different ``--seed`` evaluate on the same rows: a task's eval split (whose problems never occur
    in its train split), ``--eval-dataset``, or a holdout of a file's valid rows. An eval set of
    fewer than :data:`MIN_EVAL_ROWS` rows is a warning and an empty one an error
    (:func:`check_eval_size`); ``--eval-holdout 0`` without ``--eval-dataset`` asks for none."""
    from rlxf.data import DataError, load_rows

    opts = dict(kind=kind, pair_kind=getattr(cfg, "pair_kind", "mixed"),
                verbose_fraction=getattr(cfg, "verbose_fraction", 0.0), keep_invalid=True)
    sources = {"training": (cfg.dataset, load_rows(cfg.dataset, split="train", task_size=cfg.task_size,
                                                   seed=cfg.seed, **opts))}
    if cfg.eval_dataset:
        split = "eval" if cfg.eval_dataset.startswith("task:") else cfg.eval_split
        sources["eval"] = (cfg.eval_dataset, load_rows(cfg.eval_dataset, split=split, task_size=cfg.eval_size,
                                                       limit=cfg.eval_size, seed=cfg.eval_seed, **opts))
    elif cfg.dataset.startswith("task:"):
        sources["eval"] = (cfg.dataset, load_rows(cfg.dataset, split="eval", task_size=cfg.eval_size,
                                                  seed=cfg.eval_seed, **opts))
    validated, errors = {}, []
    for name, (spec, rows) in sources.items():
        try:
            validated[name] = _validated(rows, kind, cfg, f"{name} rows of {spec}")
        except DataError as exc:
            errors.append(str(exc))
    if errors:
        raise DataError("\n".join(errors))
    train = validated["training"]
    if "eval" not in validated:
        return _holdout(cfg, train, skipped=len(sources["training"][1]) - len(train))
    spec, evals = sources["eval"][0], validated["eval"]
    if cfg.eval_dataset:
        check_eval_size(len(evals), f"--eval-dataset {spec}", f"Use an eval set of at least {MIN_EVAL_ROWS} rows"
                        + (f" and raise --eval-size (it caps the eval set at {cfg.eval_size})"
                           if cfg.eval_size < MIN_EVAL_ROWS else "") + ".")
    else:
        check_eval_size(len(evals), f"the eval split of {spec}, --eval-size {cfg.eval_size}",
                        f"Raise --eval-size to at least {MIN_EVAL_ROWS}.")
    return train, evals


def _holdout(cfg: RunConfig, train: list[dict], *, skipped: int) -> tuple[list[dict], list[dict]]:
    """A file dataset's (train rows, eval rows): ``--eval-holdout`` of its valid rows, drawn with
    ``--eval-seed``; ``--eval-holdout 0`` keeps every row for training and evaluates nothing."""
    if cfg.eval_holdout == 0:
        log.warning("no held-out evaluation: --eval-holdout 0 and no --eval-dataset, so every row of %s trains "
                    "and summary.json holds no held-out metric", cfg.dataset)
        return train, []
    n_eval = min(cfg.eval_size, int(len(train) * cfg.eval_holdout))
    source = (f"--eval-holdout {cfg.eval_holdout:g} of the {len(train)} valid training rows of {cfg.dataset}"
              + (f" ({skipped} skipped by --skip-invalid)" if skipped else ""))
    check_eval_size(n_eval, source, f"Pass --eval-dataset FILE with at least {MIN_EVAL_ROWS} rows, raise "
                    f"--eval-holdout or add rows (--eval-holdout 0 trains on every row without held-out metrics).")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.eval_seed)).tolist()
    return [train[i] for i in sorted(order[n_eval:])], [train[i] for i in order[:n_eval]]


def check_eval_size(n: int, source: str, fix: str) -> None:
    """Raise :class:`~rlxf.data.DataError` when the eval set (``n`` rows from ``source``) is empty;
    warn when it has fewer than :data:`MIN_EVAL_ROWS` rows. ``fix`` says what to do."""
    from rlxf.data import DataError

    if n == 0:
        raise DataError(f"the eval set is empty: {source} gives no rows, so no held-out metric could be "
                        f"measured. {fix}")
    if n < MIN_EVAL_ROWS:
        log.warning("the eval set has %d row%s (%s), fewer than %d: the held-out metrics will be noisy (each row "
                    "moves an accuracy by %.0f points). %s", n, "" if n == 1 else "s", source, MIN_EVAL_ROWS, 100 / n,
                    fix)


def _validated(rows: list[dict], kind: str, cfg: RunConfig, what: str) -> list[dict]:
    from rlxf.data import validate_rows

    valid, skipped = validate_rows(rows, kind=kind, skip_invalid=cfg.skip_invalid)
    if skipped:
        log.warning("skipped %d of %d %s (--skip-invalid); the rows and why are logged above", skipped,
                    len(rows), what)
    return valid


def win_rates_by_kind(margins: torch.Tensor, kinds: list, *, prefix: str = "accuracy") -> dict:
    """``{"<prefix>/<kind>": fraction of margins > 0 (ties ½)}`` per pair kind; {} without kinds.

    margins: [N] (chosen minus rejected, in whatever score the recipe ranks by); kinds: N labels.
    """
    if len(kinds) != margins.numel() or all(k is None for k in kinds):
        return {}
    wins = (margins > 0).float() + 0.5 * (margins == 0).float()  # [N]
    out = {}
    for kind in sorted({k for k in kinds if k is not None}):
        picked = torch.tensor([k == kind for k in kinds])
        out[f"{prefix}/{kind}"] = wins[picked].mean().item()
    return out


def task_eval_metrics(cfg: TrainConfig, model, tokenizer) -> dict:
    """``{"task_accuracy": …}`` for task datasets when ``eval_generate`` > 0, else ``{}``."""
    if cfg.eval_generate <= 0 or not cfg.dataset.startswith("task:"):
        return {}
    from rlxf.tasks.accuracy import task_accuracy

    name = cfg.dataset.split(":", 1)[1]
    return {"task_accuracy": task_accuracy(model, tokenizer, name, n=cfg.eval_generate,
                                           max_new_tokens=cfg.max_new_tokens, seed=cfg.eval_seed)}


# -- the loop ------------------------------------------------------------------------------------
