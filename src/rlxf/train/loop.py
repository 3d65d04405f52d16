"""THE training loop every recipe runs on: resume → evaluate → step → log / evaluate / checkpoint →
final model → summary → report, with torchrun and fault handling in one place.

A recipe does not write a loop. It builds a :class:`Loop` — the model, optimiser and scheduler, a
``step(step) -> metrics`` that performs one optimiser step (offline) or one rollout step (online),
an ``evaluate() -> metrics`` and what else must be checkpointed — and calls :func:`run`:

    run(Loop(...)) -> RunResult(summary, output_dir)

What :func:`run` does, in order:

1. ``--resume``: loads the newest complete checkpoint (model, optimiser, scheduler, the loop's state,
   every ``components`` entry's ``state_dict`` and every ``files`` entry) and continues from its step;
2. at step 0, evaluates (``start/<metric>``);
3. each step: reads the learning rate the step will use, calls ``step(step)``; keys starting with
   ``_`` (``_train_seconds``, ``_sample_tokens`` ...) are summed into the run's cost counters instead
   of being logged; logs every ``log_every`` steps and at the end, evaluates every ``eval_every``
   steps and at the end (``best/<metric>`` by the direction in ``headline``), checkpoints every
   ``save_every`` steps and at the end (atomic, :mod:`rlxf.runtime.checkpoint`); an online run's
   reward health (:mod:`rlxf.train.reward_health`) counts each step's failed rewards and stops the
   run when the reward keeps failing;
4. writes ``final/`` (rank 0), ``summary.json`` (headline metrics that no evaluation measured are
   listed under ``not_measured``, never written as null) and the report.

Under torchrun (:mod:`rlxf.runtime.distributed`) every rank runs the loop; rank 0 alone evaluates
(its metrics are broadcast), logs and writes; the replicas' parameters are compared at the end.
With ``--fsdp`` (:mod:`rlxf.runtime.fsdp`) the model is gathered whole on every rank for the
evaluation, every rank writes its shards of a checkpoint, and rank 0 writes ``final/`` from the
gathered fp32 weights.
A step that raises :class:`TrainingError` (e.g. a non-finite loss) stops the run with its message,
which names the last good checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from rlxf.reporting import MetricsLogger, Panel, Progress, write_report, write_summary
from rlxf.runtime import (distributed, fsdp, latest_checkpoint, load_checkpoint, save_checkpoint,
                          save_sharded_checkpoint)
from rlxf.train.common import TrainingError, autocast_context, peak_memory_mb

log = logging.getLogger("rlxf")

# Test-only fault injection: exit abruptly (like SIGKILL, no cleanup) once this step completes.
FAULT_ENV = "RLXF_FAULT_EXIT_AFTER_STEP"


@dataclass
class Loop:
    """Everything :func:`run` needs from a recipe.

    step: performs step ``step`` (0-based) and returns its metrics (``_``-prefixed keys are cost
    counters). evaluate: held-out metrics (called under ``no_grad``, the model in eval mode and the
    run's autocast). headline: eval metric -> "max" or "min", recorded as start/final/best.
    components: name -> object with ``state_dict``/``load_state_dict`` (data order, sampler, KL
    controller ...), saved in the checkpoint's state. files: file name -> module whose
    ``state_dict`` is saved beside the model (``critic.pt``, ``reward.pt``). save_final(path):
    writes the final model. summary(start_eval, last_eval): extra summary.json fields, called
    after the last step. reward_health: an online run's
    :class:`~rlxf.train.reward_health.RewardHealth`, which reads each step's reward counts, may stop
    the run, and adds ``reward_health`` to summary.json.
    """

    cfg: Any
    recipe: str
    out: Path
    model: torch.nn.Module
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    total_steps: int
    step: Callable[[int], dict]
    evaluate: Callable[[], dict]
    headline: dict[str, str]
    panels: list[Panel]
    title: str
    save_final: Callable[[Path], None]
    components: dict[str, Any] = field(default_factory=dict)
    files: dict[str, Any] = field(default_factory=dict)
    summary: Callable[[dict, dict], dict] | None = None
    progress_metric: str = "loss"
    reward_health: Any = None


@dataclass
class RunResult:
    summary: dict
    output_dir: Path


COUNTERS = ("train_seconds", "train_tokens", "sample_seconds", "sample_tokens")


def run(loop: Loop) -> RunResult:
    """Train to ``loop.total_steps`` and write the run's files; see the module docstring."""
    cfg, ckpt_root = loop.cfg, loop.out / "checkpoints"
    state: dict = {"start": {}, "best": {}, "last_eval": None, **dict.fromkeys(COUNTERS, 0)}
    step = _resume(loop, ckpt_root, state) if cfg.resume else 0
    metrics_log = (MetricsLogger(loop.out, resume_step=step if step > 0 else None, tensorboard=cfg.tensorboard)
                   if distributed.is_main() else NullLogger())
    fault_step = int(os.environ.get(FAULT_ENV, "0") or 0)
    if step == 0:
        t0 = time.time()
        log.info("evaluating on the held-out set before the first step")
        state["start"] = state["last_eval"] = _evaluate(loop, state, metrics_log, 0)
        log.info("start evaluation took %.1f s", time.time() - t0)
    loop.model.train()
    bar = Progress(loop.total_steps, desc=loop.recipe, initial=step, enabled=cfg.progress and distributed.is_main())
    wall0 = time.time()
    try:
        while step < loop.total_steps:
            lr = loop.scheduler.get_last_lr()[0]  # the rate this step's updates use
            metrics = loop.step(step)
            step += 1
            stop = loop.reward_health.after_step(step, metrics) if loop.reward_health is not None else None
            for key in [k for k in metrics if k.startswith("_")]:
                value = metrics.pop(key)
                if key[1:] in state:
                    state[key[1:]] += value
            bar.update(1, **_progress_postfix(loop, metrics))
            if step % cfg.log_every == 0 or step == loop.total_steps or stop:
                metrics_log.log(step, {**metrics, "lr": lr})
            if stop:
                raise TrainingError(f"{stop} The steps so far are in {loop.out / 'metrics.jsonl'}.")
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == loop.total_steps:
                state["last_eval"] = _evaluate(loop, state, metrics_log, step)
            if (cfg.save_every and step % cfg.save_every == 0) or step == loop.total_steps:
                _checkpoint(loop, ckpt_root, step, state)
            if fault_step and step == fault_step:
                os._exit(137)
    finally:
        bar.close()
        metrics_log.close()
    distributed.check_replicas(loop.model)
    final_dir = loop.out / "final"
    with fsdp.exporting(loop.model, fsdp.full_state_dict(loop.model)):   # --fsdp: rank 0 writes the full weights
        distributed.on_main(lambda: loop.save_final(final_dir))
    summary = _summary(loop, state, wall0, final_dir)
    distributed.on_main(lambda: _write(loop, summary))
    log.info("summary: %s", json.dumps({k: v for k, v in summary.items() if "/" in k}))
    return RunResult(summary=summary, output_dir=loop.out)


def _progress_postfix(loop: Loop, metrics: dict) -> dict:
    """The progress line's metrics: the recipe's headline train metric, and an online run's reward
    failures and Nones this step."""
    postfix = {loop.progress_metric: metrics.get(loop.progress_metric, float("nan"))}
    if loop.reward_health is not None:
        postfix.update(reward_errors=int(metrics.get("reward_errors", 0)),
                       reward_none=int(metrics.get("reward_none", 0)))
    return postfix


def _resume(loop: Loop, ckpt_root: Path, state: dict) -> int:
    ckpt = latest_checkpoint(ckpt_root)
    if ckpt is None:
        log.info("--resume: no complete checkpoint in %s, starting from scratch", ckpt_root)
        return 0
    saved = load_checkpoint(ckpt, model=loop.model, optimizer=loop.optimizer, scheduler=loop.scheduler)
    for name, component in loop.components.items():
        component.load_state_dict(saved[name])
    for name, module in loop.files.items():
        module.load_state_dict(torch.load(ckpt / name, weights_only=True))
    state.update({k: saved.get(k, v) for k, v in state.items()})
    if loop.reward_health is not None and "reward_health" in saved:
        loop.reward_health.load_state_dict(saved["reward_health"])
    log.info("resumed from %s (step %d of %d)", ckpt, saved["step"], loop.total_steps)
    return saved["step"]


def _evaluate(loop: Loop, state: dict, metrics_log, at_step: int) -> dict:
    def evaluate() -> dict:
        with torch.no_grad(), autocast_context(loop.cfg, loop.model):
            return loop.evaluate()

    loop.model.eval()
    with fsdp.gathered():   # --fsdp: rank 0 evaluates on whole weights, with no collective to wait on
        metrics = distributed.on_main(evaluate)  # every rank gets rank 0's metrics
    loop.model.train()
    metrics_log.log(at_step, metrics, split="eval")
    for key, better in loop.headline.items():
        value, best = metrics.get(key), state["best"].get(key)
        if value is not None and (best is None or (value > best if better == "max" else value < best)):
            state["best"][key] = value
    return metrics


def _checkpoint(loop: Loop, ckpt_root: Path, step: int, state: dict) -> None:
    components = {name: component.state_dict() for name, component in loop.components.items()}
    if loop.reward_health is not None:
        components["reward_health"] = loop.reward_health.state_dict()
    files = {name: module.state_dict() for name, module in loop.files.items()} or None
    if fsdp.is_sharded(loop.model):   # every process writes its shards (torch.distributed.checkpoint)
        save_sharded_checkpoint(ckpt_root, step, model=loop.model, tokenizer=loop.tokenizer, optimizer=loop.optimizer,
                                scheduler=loop.scheduler, state={**components, **state},
                                keep=loop.cfg.keep_checkpoints, extra=files)
        return
    distributed.on_main(lambda: save_checkpoint(
        ckpt_root, step, model=loop.model, tokenizer=loop.tokenizer, optimizer=loop.optimizer,
        scheduler=loop.scheduler, state={**components, **state}, keep=loop.cfg.keep_checkpoints, extra=files))


def _summary(loop: Loop, state: dict, wall0: float, final_dir: Path) -> dict:
    cfg, last = loop.cfg, state["last_eval"] or {}
    device = fsdp.compute_device(loop.model)   # the GPU under --fsdp-cpu-offload too
    measured = [k for k in loop.headline if any(_finite(v.get(k)) for v in (state["start"], last, state["best"]))]
    summary = {"recipe": loop.recipe, "steps": loop.total_steps, "model": cfg.model, "dataset": cfg.dataset,
               **{f"start/{k}": state["start"].get(k) for k in measured},
               **{f"final/{k}": last.get(k) for k in measured},
               **{f"best/{k}": state["best"].get(k) for k in measured},
               "eval_start": state["start"], "eval_final": last, "wall_seconds": round(time.time() - wall0, 2)}
    if len(measured) < len(loop.headline):   # never a null headline: say which the evaluation did not measure
        summary["not_measured"] = [k for k in loop.headline if k not in measured]
    if loop.reward_health is not None:
        summary["reward_health"] = loop.reward_health.summary()
    for phase in ("sample", "train"):
        if state[f"{phase}_seconds"]:
            summary[f"{phase}_seconds"] = round(state[f"{phase}_seconds"], 2)
            summary[f"{phase}_tokens_per_s"] = round(state[f"{phase}_tokens"] / max(state[f"{phase}_seconds"], 1e-9), 1)
    if not state["sample_seconds"]:  # an offline run: its throughput is the training throughput
        summary["tokens_per_s"] = summary.get("train_tokens_per_s")
    summary["peak_memory_mb"] = peak_memory_mb(device)
    summary["final_model"] = str(final_dir)
    extra = loop.summary(state["start"], last) if loop.summary else {}
    if distributed.active():  # the recipe may add its own data-parallel fields (rows per process ...)
        extra["data_parallel"] = {"processes": distributed.world_size(), **extra.get("data_parallel", {}),
                                  "peak_memory_mb_by_rank": distributed.gather(summary["peak_memory_mb"])}
    summary.update(extra)
    return summary


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _write(loop: Loop, summary: dict) -> None:
    from rlxf.config import to_dict

    write_summary(loop.out, summary)
    write_report(loop.out, title=loop.title, panels=loop.panels, summary=summary, config=to_dict(loop.cfg))


class NullLogger:
    """The metrics logger of ranks other than 0 under torchrun (rank 0 writes metrics.jsonl)."""

    def log(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


__all__ = ["COUNTERS", "FAULT_ENV", "Loop", "NullLogger", "RunResult", "TrainingError", "run"]
