"""What every offline recipe shares: the base config, optimiser/schedule, and one training loop.

``fit`` is a plain function, not a Trainer class: a recipe hands it a model, its examples, a
``loss_fn(batch) -> (loss, metrics)`` and an ``evaluate() -> metrics`` and gets back the summary.
The loop is: batch → micro-batches → loss → backward → clip → step → log → eval → checkpoint.
Under ``torchrun`` (:mod:`rlxf.runtime.distributed`, docs/distributed.md) each process takes its
share of every micro-batch, the gradients are averaged before the clip, and rank 0 alone evaluates
and writes.

Reliability (DESIGN.md): checkpoints are atomic; ``--resume`` continues from the newest complete
checkpoint and reproduces the uninterrupted run (same batches, RNG and optimiser state); a
non-finite loss stops the run with a message naming the last good checkpoint. A recipe checks its
options, its output directory and its data before it writes anything (:func:`check_output_dir`,
:func:`load_split_rows`, then :func:`start_run_dir`), and writes only into a new or empty directory
or one of its own runs.
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

from rlxf.config import (AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, SEED, ConfigError, between, check_choice,
                         check_numbers, option, save_yaml, to_dict)
from rlxf.reporting import MetricsLogger, Panel, Progress, write_report, write_summary
from rlxf.runtime import distributed, latest_checkpoint, load_checkpoint, save_checkpoint, seed_everything

log = logging.getLogger("rlxf")

# Test-only fault injection: exit abruptly (like SIGKILL, no cleanup) once this step completes.
FAULT_ENV = "RLXF_FAULT_EXIT_AFTER_STEP"


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. non-finite loss); the message says what to do."""


@dataclass(frozen=True)
class RunConfig:
    """Fields shared by every recipe, offline (sft, rm, dpo, rpo, orpo) and online (grpo, ppo)."""

    model: str = option("tiny", "model: 'tiny' (embedded), a local HF directory, or a hub id")
    dataset: str = option("task:arithmetic", "training data: task:NAME, a .jsonl/.json/.parquet/.csv file, "
                          "a saved HF dataset directory or a hub dataset name")
    eval_dataset: str | None = option(None, "held-out data (default: the task's eval split, or a holdout "
                                      "of eval_holdout of a file dataset)")
    eval_split: str = option("test", "split of a hub/saved eval_dataset to use (tasks use their eval split)")
    eval_holdout: float = option(0.05, "fraction of a file dataset held out for eval when no eval_dataset",
                                 bounds=between(0, 1, high_open=True))
    task_size: int = option(4000, "training rows drawn from a built-in task", bounds=AT_LEAST_ONE)
    eval_size: int = option(512, "eval rows drawn from a built-in task (also caps file eval sets)", bounds=AT_LEAST_ONE)
    skip_invalid: bool = option(False, "drop malformed rows (counted in the log) instead of stopping")
    output_dir: str | None = option(None, "where the run writes its files (None = runs/<recipe>)")
    seed: int = option(0, "random seed (data order, init of new heads)", bounds=SEED)
    max_steps: int = option(0, "optimizer steps; 0 = derive from epochs", bounds=NON_NEGATIVE)
    lr: float = option(1e-4, "peak learning rate (AdamW)", bounds=POSITIVE)
    weight_decay: float = option(0.0, "AdamW weight decay", bounds=NON_NEGATIVE)
    adam_beta1: float = option(0.9, "AdamW beta1", bounds=between(0, 1, high_open=True))
    adam_beta2: float = option(0.999, "AdamW beta2", bounds=between(0, 1, high_open=True))
    warmup_steps: int = option(10, "linear warm-up steps", bounds=NON_NEGATIVE)
    schedule: str = option("cosine", "learning-rate schedule after warm-up", choices=("cosine", "linear", "constant"))
    max_grad_norm: float = option(1.0, "gradient clipping norm; 0 disables", bounds=NON_NEGATIVE)
    max_prompt_length: int = option(128, "max prompt tokens (prompts are cut from the left)", bounds=AT_LEAST_ONE)
    log_every: int = option(5, "log train metrics every N steps", bounds=AT_LEAST_ONE)
    eval_every: int = option(50, "evaluate every N steps (and at start and end); 0 = start and end only",
                             bounds=NON_NEGATIVE)
    eval_batch_size: int = option(64, "examples per eval batch", bounds=AT_LEAST_ONE)
    eval_generate: int = option(0, "with a task dataset: greedy accuracy on N held-out task problems at each eval",
                                bounds=NON_NEGATIVE)
    max_new_tokens: int = option(64, "generation budget for eval_generate", bounds=AT_LEAST_ONE)
    save_every: int = option(0, "checkpoint every N steps (and at the end); 0 = end only", bounds=NON_NEGATIVE)
    keep_checkpoints: int = option(2, "how many step checkpoints to keep (0 = all)", bounds=NON_NEGATIVE)
    resume: bool = option(False, "continue from the newest complete checkpoint in output_dir")
    device: str = option("auto", "auto | cpu | cuda | cuda:N | mps")
    dtype: str = option("auto", "parameter dtype: auto (fp32 master weights; with --autocast, bf16 compute on "
                        "CUDA) | float32 | bfloat16 | float16")
    autocast: bool = option(True, "bf16 autocast on CUDA when parameters are fp32 (mixed precision)")
    gradient_checkpointing: bool = option(False, "recompute activations in backward (less memory, slower)")
    compile: bool = option(False, "torch.compile each decoder layer, and the static engine's decode step in "
                           "online recipes (CUDA only; ignored on CPU): fewer kernels and less activation "
                           "memory after a one-off compile of tens of seconds")
    activation_memory_budget: float = option(1.0, "with --compile: share of the compiled layers' activations "
                                             "kept for backward; torch's partitioner recomputes the rest "
                                             "(0.05: memory near --gradient-checkpointing at close to full "
                                             "speed, measured in docs/performance.md); 1 = keep all",
                                             bounds=between(0, 1, low_open=True))
    disable_dropout: bool = option(True, "set dropout to 0 in the trained model (TRL's default)")
    lora_r: int = option(0, "LoRA rank; 0 = full fine-tuning", bounds=NON_NEGATIVE)
    lora_alpha: int = option(16, "LoRA alpha", bounds=POSITIVE)
    lora_dropout: float = option(0.0, "LoRA dropout", bounds=between(0, 1, high_open=True))
    lora_targets: str = option("q_proj,k_proj,v_proj,o_proj", "comma-separated module names LoRA adapts, "
                               "or all-linear")
    merge_lora: bool = option(True, "also write the merged model to final/merged for LoRA runs")
    trust_remote_code: bool = option(False, "allow model repositories to run their own code")
    tensorboard: bool = option(False, "also log to TensorBoard (output_dir/tensorboard)")
    progress: bool = option(True, "show a progress bar")
    threads: int = option(0, "torch CPU threads; 0 = torch default", bounds=NON_NEGATIVE)

    def __post_init__(self):
        check_numbers(self)  # every numeric field of the (sub)class, before any other check uses one
        check_choice(self, "schedule")
        if self.activation_memory_budget < 1 and not self.compile:
            raise ConfigError("--activation-memory-budget applies to the compiled layers: add --compile "
                              "(or use --gradient-checkpointing without it)")

    def resolved_output_dir(self, recipe: str) -> Path:
        return Path(self.output_dir or f"runs/{recipe}")


@dataclass(frozen=True)
class TrainConfig(RunConfig):
    """Fields shared by every offline recipe (sft, rm, dpo, rpo, orpo): a fixed dataset in batches."""

    pair_kind: str = option("mixed", "preference pairs from a task: correct vs wrong, concise vs verbose, or both",
                            choices=("mixed", "correctness", "conciseness"))
    epochs: float = option(1.0, "passes over the training data when max_steps is 0", bounds=NON_NEGATIVE)
    batch_size: int = option(16, "examples (pairs for preference recipes) per micro-batch", bounds=AT_LEAST_ONE)
    grad_accum: int = option(1, "micro-batches per optimizer step", bounds=AT_LEAST_ONE)
    max_length: int = option(256, "max tokens of prompt + completion", bounds=AT_LEAST_ONE)
    truncation: str = option("truncate", "rows longer than max_length: cut them or drop them",
                             choices=("truncate", "drop"))

    def __post_init__(self):
        super().__post_init__()
        for name in ("pair_kind", "truncation"):
            check_choice(self, name)
        if self.epochs <= 0 and self.max_steps == 0:
            raise ConfigError("set --max-steps > 0 or --epochs > 0")
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(f"--max-prompt-length ({self.max_prompt_length}) must be < --max-length "
                              f"({self.max_length})")


# -- set-up pieces -------------------------------------------------------------------------------

def setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


# A run directory is one rlxf created (it writes RUN_MARKER into it before anything else) or one that
# holds a run's files (runs written before the marker existed). rlxf writes into no other non-empty
# directory, so a file it did not write is never overwritten.
RUN_MARKER = ".rlxf-run"
RUN_FILES = ("metrics.jsonl", "checkpoints", "summary.json")


def is_run_dir(out: Path) -> bool:
    """True when ``out`` is an rlxf run directory: it has the marker or a run's files."""
    return (out / RUN_MARKER).is_file() or holds_run(out)


def holds_run(out: Path) -> bool:
    """True when ``out`` holds a started or finished run (:data:`RUN_FILES`): only ``--resume``
    continues it."""
    return any((out / name).exists() for name in RUN_FILES)


def _listing(out: Path, most: int = 8) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir())
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def check_output_dir(cfg: RunConfig, recipe: str) -> Path:
    """The run's output directory, checked without writing anything.

    A new or empty directory, or an rlxf run directory (:func:`is_run_dir`) that holds no started
    run, is accepted; a started run only with ``--resume``. Any other non-empty directory is
    refused, with or without ``--resume``, and the error lists what it holds. Under torchrun this
    is where a process joins the data-parallel group (recipes that cannot run data-parallel, or a
    batch size the processes do not divide, stop here with a clear error); rank 0 checks."""
    try:
        if distributed.check_launch(recipe, getattr(cfg, "batch_size", None)) > 1:
            distributed.init(cfg.device)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None

    def check() -> Path:
        out = cfg.resolved_output_dir(recipe)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"output dir {out} is a file, not a directory; choose another --output-dir "
                              f"(nothing was written)")
        if not out.is_dir() or not any(out.iterdir()):
            return out
        if not is_run_dir(out):
            why = (" --resume continues an rlxf run, and this directory holds none." if cfg.resume else "")
            raise ConfigError(
                f"output dir {out} is not empty and is not an rlxf run directory: it holds {_listing(out)}. "
                f"rlxf writes only into a new or empty directory or into its own runs (recognised by "
                f"{RUN_MARKER}, metrics.jsonl, checkpoints/ or summary.json), so nothing of yours is "
                f"overwritten.{why} Choose another --output-dir, e.g. {out / recipe} (nothing was written)")
        if holds_run(out) and not cfg.resume:
            raise ConfigError(f"output dir {out} already holds a run ({_listing(out)}); pass --resume to continue "
                              f"it, or choose another --output-dir (nothing was overwritten)")
        return out

    return distributed.on_main(check)


def start_run_dir(cfg: RunConfig, out: Path, recipe: str) -> None:
    """Create ``out`` and write the run marker (first), then ``config.yaml``; remove temporary
    checkpoint directories left by a run that was killed while writing one. Call it once the
    inputs have validated (:func:`check_output_dir`, :func:`load_split_rows`): a run that stops on
    bad input writes nothing. Rank 0 writes under torchrun."""
    from rlxf.runtime import remove_stale_checkpoint_dirs

    def write() -> None:
        out.mkdir(parents=True, exist_ok=True)
        marker = out / RUN_MARKER
        if not marker.is_file():
            marker.write_text(json.dumps({"recipe": recipe, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
                              + "\n")
        save_yaml(cfg, out / "config.yaml")
        for stale in remove_stale_checkpoint_dirs(out / "checkpoints"):
            log.info("removed %s, a checkpoint whose write was interrupted", stale)

    distributed.on_main(write)


def prepare_output_dir(cfg: RunConfig, recipe: str) -> Path:
    """:func:`check_output_dir`, then :func:`start_run_dir`: for callers with no inputs to check first."""
    out = check_output_dir(cfg, recipe)
    start_run_dir(cfg, out, recipe)
    return out


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("the model has no trainable parameters")
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             weight_decay=cfg.weight_decay)


def lr_multiplier(step: int, *, warmup: int, total: int, schedule: str) -> float:
    """Linear warm-up to 1, then cosine/linear decay to 0 at ``total`` (or constant)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress


def total_steps(cfg: TrainConfig, num_examples: int) -> int:
    per_step = cfg.batch_size * cfg.grad_accum
    if per_step > num_examples:
        raise ConfigError(f"batch_size × grad_accum = {per_step} exceeds the {num_examples} training examples; "
                          f"lower --batch-size/--grad-accum or add data")
    if cfg.max_steps:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * (num_examples // per_step)))


def autocast_context(cfg: RunConfig, device: torch.device, dtype: torch.dtype):
    if device.type == "cuda" and cfg.autocast and dtype == torch.float32:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def mean_metrics(items: list[dict]) -> dict:
    keys = {k for m in items for k in m}
    return {k: sum(m[k] for m in items if k in m) / sum(1 for m in items if k in m) for k in sorted(keys)}


def load_model_for_training(cfg: RunConfig, *, reward_model: bool = False):
    """(model, tokenizer) on the configured device/dtype, with LoRA and checkpointing applied."""
    from rlxf.models import (apply_lora, ensure_pad_token, load_policy, load_reward_model, load_tokenizer,
                             resolve_device, resolve_dtype)

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        device = distributed.init(cfg.device) if distributed.active() else resolve_device(cfg.device)
        # training keeps fp32 master weights by default; bf16 compute comes from autocast on CUDA
        dtype = torch.float32 if cfg.dtype == "auto" else resolve_dtype(cfg.dtype, device)
    except ValueError as exc:
        raise ConfigError(f"--device/--dtype: {exc}") from None
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    added_pad = ensure_pad_token(tokenizer)
    resize = len(tokenizer) if added_pad else None
    if reward_model:
        model = load_reward_model(cfg.model, dtype=dtype, device=device, trust_remote_code=cfg.trust_remote_code,
                                  pad_token_id=tokenizer.pad_token_id, resize_to=resize)
    else:
        model = load_policy(cfg.model, dtype=dtype, device=device, trust_remote_code=cfg.trust_remote_code,
                            resize_to=resize)
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
    if cfg.lora_r > 0:
        targets = cfg.lora_targets if cfg.lora_targets == "all-linear" else tuple(
            t.strip() for t in cfg.lora_targets.split(",") if t.strip())
        try:
            model = apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                               target_modules=targets, task_type="SEQ_CLS" if reward_model else "CAUSAL_LM")
        except ValueError as exc:
            raise ConfigError(f"--lora-targets: {exc}") from None
    return model, tokenizer


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to 0 (as TRL does by default): policy log-probs stay
    deterministic and comparable with the reference's."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def load_split_rows(cfg: RunConfig, kind: str) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows), validated. Tasks use their eval split; files a holdout or eval_dataset.

    Every invalid row of the training and eval data, unreadable lines included, is reported in one
    :class:`~rlxf.data.DataError`; with ``--skip-invalid`` they are dropped, counted and logged. A
    file's holdout is drawn after validation, from its valid rows."""
    from rlxf.data import DataError, load_rows

    opts = dict(kind=kind, seed=cfg.seed, pair_kind=getattr(cfg, "pair_kind", "mixed"),
                verbose_fraction=getattr(cfg, "verbose_fraction", 0.0), keep_invalid=True)
    sources = {"training": (cfg.dataset, load_rows(cfg.dataset, split="train", task_size=cfg.task_size, **opts))}
    if cfg.eval_dataset:
        split = "eval" if cfg.eval_dataset.startswith("task:") else cfg.eval_split
        sources["eval"] = (cfg.eval_dataset, load_rows(cfg.eval_dataset, split=split, task_size=cfg.eval_size,
                                                       limit=cfg.eval_size, **opts))
    elif cfg.dataset.startswith("task:"):
        sources["eval"] = (cfg.dataset, load_rows(cfg.dataset, split="eval", task_size=cfg.eval_size, **opts))
    validated, errors = {}, []
    for name, (spec, rows) in sources.items():
        try:
            validated[name] = _validated(rows, kind, cfg, f"{name} rows of {spec}")
        except DataError as exc:
            errors.append(str(exc))
    if errors:
        raise DataError("\n".join(errors))
    train = validated["training"]
    if "eval" in validated:
        return train, validated["eval"]
    n_eval = min(cfg.eval_size, int(len(train) * cfg.eval_holdout))
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    return [train[i] for i in sorted(order[n_eval:])], [train[i] for i in order[:n_eval]]


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
    from rlxf.recipes.evaluation import task_accuracy

    name = cfg.dataset.split(":", 1)[1]
    return {"task_accuracy": task_accuracy(model, tokenizer, name, n=cfg.eval_generate,
                                           max_new_tokens=cfg.max_new_tokens)}


# -- the loop ------------------------------------------------------------------------------------

@dataclass
class FitResult:
    summary: dict
    output_dir: Path


def fit(cfg: TrainConfig, *, recipe: str, out: Path, model, tokenizer, train_examples: list,
        collate: Callable[[list], dict], loss_fn: Callable[[dict], tuple[torch.Tensor, dict]],
        evaluate: Callable[[], dict], panels: list[Panel], headline: dict[str, str],
        save_final: Callable[[Path], None], extra_summary: Callable[[], dict] | None = None) -> FitResult:
    """Train ``model`` on ``train_examples``; see the module docstring.

    ``headline``: eval metric name -> "max" or "min" (which way is better); each is recorded as
    ``start/<m>``, ``final/<m>`` and ``best/<m>`` in summary.json.
    ``save_final(path)`` writes the final model (HF format) to ``path``.
    """
    from rlxf.data import EpochBatcher

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    steps = total_steps(cfg, len(train_examples))
    # data parallel (torchrun): each rank takes its slice of every micro-batch (runtime/distributed.py)
    rank, world = distributed.rank(), distributed.world_size()
    distributed.broadcast_parameters(model)
    batcher = EpochBatcher(len(train_examples), cfg.batch_size * cfg.grad_accum, seed=cfg.seed)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, warmup=cfg.warmup_steps, total=steps, schedule=cfg.schedule))
    ckpt_root = out / "checkpoints"
    state: dict = {"start": {}, "best": {}, "last_eval": None, "tokens": 0, "train_seconds": 0.0}
    step = 0
    if cfg.resume:
        ckpt = latest_checkpoint(ckpt_root)
        if ckpt is None:
            log.info("--resume: no complete checkpoint in %s, starting from scratch", ckpt_root)
        else:
            saved = load_checkpoint(ckpt, model=model, optimizer=optimizer, scheduler=scheduler)
            step = saved["step"]
            batcher.load_state_dict(saved["batcher"])
            state = {k: saved.get(k, v) for k, v in state.items()}
            log.info("resumed from %s (step %d of %d)", ckpt, step, steps)
    metrics_log = (MetricsLogger(out, resume_step=step if step > 0 else None, tensorboard=cfg.tensorboard)
                   if distributed.is_main() else NullLogger())
    fault_step = int(os.environ.get(FAULT_ENV, "0") or 0)

    def run_eval(at_step: int) -> dict:
        def run() -> dict:
            with torch.no_grad(), autocast_context(cfg, device, dtype):
                return evaluate()

        model.eval()
        metrics = distributed.on_main(run)     # every rank gets rank 0's metrics
        model.train()
        metrics_log.log(at_step, metrics, split="eval")
        return metrics

    def checkpoint(at_step: int) -> None:
        distributed.on_main(lambda: save_checkpoint(
            ckpt_root, at_step, model=model, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler,
            state={"batcher": batcher.state_dict(), **state}, keep=cfg.keep_checkpoints))

    if step == 0:
        state["start"] = state["last_eval"] = run_eval(0)
        state["best"] = {k: v for k, v in state["start"].items() if k in headline}
    model.train()
    bar = Progress(steps, desc=recipe, initial=step, enabled=cfg.progress and distributed.is_main())
    wall0 = time.time()
    try:
        while step < steps:
            t0 = time.time()
            indices = batcher.next_indices()
            micro, tokens = [], 0
            for start in range(0, len(indices), cfg.batch_size):
                rows = indices[start:start + cfg.batch_size]
                share = len(rows) // world
                batch = collate([train_examples[i] for i in rows[rank * share:(rank + 1) * share]])
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                tokens += int(batch["attention_mask"].sum())
                with autocast_context(cfg, device, dtype):
                    loss, metrics = loss_fn(batch)
                bad = not bool(torch.isfinite(loss))
                if distributed.any_true(bad):      # a collective under torchrun: every rank stops together
                    good = latest_checkpoint(ckpt_root)
                    raise TrainingError(
                        f"non-finite loss ({loss.item() if bad else 'on another process'}) at step {step + 1}; "
                        + (f"last good checkpoint: {good} (resume from it with a lower --lr)" if good
                           else "no checkpoint was written yet; lower --lr or check the data") )
                (loss / cfg.grad_accum).backward()
                micro.append({"loss": loss.item(), **metrics})
            distributed.average_gradients(model.parameters())
            grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                         if cfg.max_grad_norm > 0 else torch.tensor(float("nan")))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if world > 1:  # metrics of the whole step: the ranks' means (equal shares), tokens summed
                tokens = sum(distributed.gather(tokens))
                train_metrics = mean_metrics(distributed.gather(mean_metrics(micro)))
            else:
                train_metrics = mean_metrics(micro)
            seconds = time.time() - t0
            state["tokens"] += tokens
            state["train_seconds"] += seconds
            bar.update(1, loss=train_metrics["loss"])
            if step % cfg.log_every == 0 or step == steps:
                metrics_log.log(step, {**train_metrics, "lr": scheduler.get_last_lr()[0],
                                       "grad_norm": float(grad_norm), "tokens_per_s": tokens / max(seconds, 1e-9)})
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == steps:
                state["last_eval"] = run_eval(step)
                for key, better in headline.items():
                    value, best = state["last_eval"].get(key), state["best"].get(key)
                    if value is not None and (best is None or (value > best if better == "max" else value < best)):
                        state["best"][key] = value
            if (cfg.save_every and step % cfg.save_every == 0) or step == steps:
                checkpoint(step)
            if fault_step and step == fault_step:
                os._exit(137)
    finally:
        bar.close()
        metrics_log.close()
    distributed.check_replicas(model)
    final_dir = out / "final"
    distributed.on_main(lambda: save_final(final_dir))
    summary = {
        "recipe": recipe,
        "steps": steps,
        "model": cfg.model,
        "dataset": cfg.dataset,
        **{f"start/{k}": state["start"].get(k) for k in headline},
        **{f"final/{k}": (state["last_eval"] or {}).get(k) for k in headline},
        **{f"best/{k}": state["best"].get(k) for k in headline},
        "eval_start": state["start"],
        "eval_final": state["last_eval"],
        "wall_seconds": round(time.time() - wall0, 2),
        "train_seconds": round(state["train_seconds"], 2),
        "tokens_per_s": round(state["tokens"] / max(state["train_seconds"], 1e-9), 1),
        "peak_memory_mb": peak_memory_mb(device),
        "final_model": str(final_dir),
        **(extra_summary() if extra_summary else {}),
    }
    if world > 1:
        summary["data_parallel"] = {"processes": world, "rows_per_process": cfg.batch_size // world,
                                    "peak_memory_mb_by_rank": distributed.gather(summary["peak_memory_mb"])}

    def write() -> None:
        write_summary(out, summary)
        write_report(out, title=f"rlxf {recipe}: {cfg.model} on {cfg.dataset}", panels=panels, summary=summary,
                     config=to_dict(cfg))

    distributed.on_main(write)
    log.info("summary: %s", json.dumps({k: v for k, v in summary.items() if "/" in k}))
    return FitResult(summary=summary, output_dir=out)


class NullLogger:
    """The metrics logger of ranks other than 0 under torchrun (rank 0 writes metrics.jsonl)."""

    def log(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def peak_memory_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    try:
        import resource

        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB
    except (ImportError, AttributeError):
        return None
