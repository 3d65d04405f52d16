"""Small pieces every training step shares: the optimiser, the learning-rate schedule, autocast,
metric averaging, peak memory, and the error that stops a run."""

from __future__ import annotations

import math

import torch


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. non-finite loss); the message says what to do."""


def build_optimizer(model: torch.nn.Module, cfg, params=None) -> torch.optim.Optimizer:
    """AdamW over ``params`` (default: the model's trainable parameters) with the run's lr and betas."""
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    if not params:
        raise TrainingError("the model has no trainable parameters")
    # --fsdp-cpu-offload steps on the CPU: one tensor at a time keeps the temporaries to the largest
    # parameter, where the multi-tensor path would hold a copy of all the moments in host memory
    foreach = False if getattr(cfg, "fsdp_cpu_offload", False) else None
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             weight_decay=cfg.weight_decay, foreach=foreach)


def lr_multiplier(step: int, *, warmup: int, total: int, schedule: str) -> float:
    """Linear warm-up to 1, then cosine/linear decay to 0 at ``total`` (or constant)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress


def build_scheduler(optimizer: torch.optim.Optimizer, cfg, total: int):
    """The run's schedule (``--warmup-steps``, ``--schedule``) over ``total`` optimiser updates."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, warmup=cfg.warmup_steps, total=total, schedule=cfg.schedule))


def autocast_context(cfg, model: torch.nn.Module):
    """bf16 autocast on CUDA (``--autocast``) when ``model`` trains fp32 parameters, else a no-op context.

    Those are the fp32 master weights of full fine-tuning, and the fp32 LoRA adapters peft keeps over
    a bf16 or 4-bit base: under autocast the adapters' matmuls run in bf16 and peft's 4-bit layers
    skip casting each input to fp32 (as a transformers ``Trainer`` with ``bf16=True`` runs them).
    """
    device = next(model.parameters()).device
    if device.type == "cuda" and cfg.autocast and trains_fp32(model):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def trains_fp32(model: torch.nn.Module) -> bool:
    """Whether ``model`` trains float32 parameters over float32, bf16 or 4-bit weights. A float16
    model keeps its own precision (bf16 autocast would re-cast each frozen fp16 weight at every op)."""
    dtypes = {(p.dtype, p.requires_grad) for p in model.parameters()}
    return (torch.float32, True) in dtypes and not any(dtype == torch.float16 for dtype, _ in dtypes)


def mean_metrics(items: list[dict]) -> dict:
    """Key-wise mean over ``items`` (a key missing from some items is averaged over those that have it)."""
    keys = {k for m in items for k in m}
    return {k: sum(m[k] for m in items if k in m) / sum(1 for m in items if k in m) for k in sorted(keys)}


def clip_and_step(params, optimizer, scheduler, max_grad_norm: float) -> float:
    """Clip the gradient norm (when ``max_grad_norm`` > 0), step the optimiser and the schedule, zero
    the gradients; returns the pre-clip norm (NaN when clipping is off)."""
    params = list(params)
    norm = float("nan")
    if max_grad_norm > 0:
        total = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        norm = float(total.full_tensor() if hasattr(total, "full_tensor") else total)   # FSDP2: a DTensor
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def peak_memory_mb(device: torch.device) -> float | None:
    """Peak CUDA memory allocated, or the process's peak resident set on the CPU, in MB."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    try:
        import resource

        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB
    except (ImportError, AttributeError):
        return None
