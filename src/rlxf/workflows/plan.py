"""``rlxf plan <recipe> --model DIR [recipe flags] [--nproc N] [--quantize nf4] [--gpu-gb G | --card NAME]``:
the estimated per-GPU memory of a run, read from the model's config.json (no weights are loaded),
and whether it fits a card (docs/distributed.md#will-it-fit).

The recipe's own flags (``--batch-size``, ``--max-length``, ``--lora-r``, ``--fsdp`` …) take the
recipe's defaults, so a plan describes the run the same command line would start; the estimate
itself is :func:`rlxf.runtime.memory.estimate`.
"""

from __future__ import annotations

from rlxf.configs.registry import get_recipe
from rlxf.runtime.memory import GB, HEADROOM, Estimate, Workload, card_bytes, estimate, fits, read_shape

PAIRED = ("dpo", "rpo", "orpo", "rm")   # two sequences (chosen, rejected) per row


def workload(recipe: str, cfg, *, nproc: int = 1, quantize: str | None = None) -> Workload:
    """One process's share of a step of ``recipe`` under ``cfg`` (its config), on ``nproc`` processes."""
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    if cfg.batch_size % nproc:
        raise ValueError(f"--batch-size {cfg.batch_size} must be a multiple of --nproc {nproc} (each process "
                         f"takes batch_size / nproc rows)")
    if quantize not in (None, "none", "nf4"):
        raise ValueError(f"--quantize {quantize!r}: use nf4 (or leave it out)")
    if quantize == "nf4" and cfg.lora_r <= 0:
        raise ValueError("--quantize nf4 freezes the base weights in 4 bits: it trains LoRA adapters, so add --lora-r")
    targets = cfg.lora_targets.split(",") if cfg.lora_targets != "all-linear" else None
    common = dict(param_bytes=2 if cfg.dtype in ("bfloat16", "float16", "bf16", "fp16") else 4,
                  lora_r=cfg.lora_r, quantize=None if quantize in (None, "none") else quantize,
                  gradient_checkpointing=cfg.gradient_checkpointing, fsdp=cfg.fsdp, nproc=nproc,
                  cpu_offload=cfg.fsdp_cpu_offload)
    if targets is not None:
        common["lora_targets"] = tuple(t.strip() for t in targets if t.strip())
    else:
        from rlxf.runtime.memory import LORA_TARGETS

        common["lora_targets"] = LORA_TARGETS
    if get_recipe(recipe).kind == "offline":
        return _offline(recipe, cfg, nproc, common)
    return _online(recipe, cfg, nproc, common)


def _offline(recipe: str, cfg, nproc: int, common: dict) -> Workload:
    seqs = 2 if recipe in PAIRED else 1
    rows = cfg.batch_size // nproc
    reference = False
    if recipe in ("dpo", "rpo"):
        from rlxf.losses.registry import get_preference_loss

        reference = get_preference_loss(cfg.loss).needs_reference and not cfg.precompute_ref and not cfg.lora_r
    nograd_rows = cfg.eval_batch_size
    if recipe in ("dpo", "rpo", "orpo"):   # their no-grad passes stop at one micro-batch's tokens (nograd_batches)
        nograd_rows = min(nograd_rows, cfg.batch_size)
    return Workload(train_tokens=rows * seqs * cfg.max_length, scored_tokens=0 if recipe == "rm" else None,
                    nograd_tokens=nograd_rows * seqs * cfg.max_length, reference_copy=reference, **common)


def _online(recipe: str, cfg, nproc: int, common: dict) -> Workload:
    rows = cfg.batch_size // nproc * cfg.group_size
    length = cfg.max_prompt_length + cfg.max_new_tokens
    micro = min(getattr(cfg, "micro_batch_size", rows), rows)
    reference = bool(getattr(cfg, "needs_reference", cfg.beta > 0)) and not cfg.lora_r
    return Workload(train_tokens=micro * length, scored_tokens=micro * cfg.max_new_tokens,
                    nograd_tokens=micro * length, kv_tokens=rows * length, reference_copy=reference, **common)


def plan(recipe: str, cfg, *, nproc: int = 1, quantize: str | None = None, card: str | None = None,
         gpu_gb: float | None = None) -> tuple[Estimate, str]:
    """(estimate, the report ``rlxf plan`` prints) for ``recipe`` with ``cfg`` on ``nproc`` GPUs."""
    capacity = card_bytes(card, gpu_gb)
    shape = read_shape(cfg.model)
    est = estimate(shape, workload(recipe, cfg, nproc=nproc, quantize=quantize))
    return est, report(recipe, cfg, shape, est, nproc=nproc, quantize=quantize, capacity=capacity,
                       card=card or (f"{gpu_gb:g} GB" if gpu_gb else None))


def report(recipe: str, cfg, shape, est: Estimate, *, nproc: int, quantize: str | None, capacity: float | None,
           card: str | None) -> str:
    """The plain-text table: the run, each part in GB, the peak, and the verdict for the card."""
    mode = ("FSDP2" + (" + CPU offload" if cfg.fsdp_cpu_offload else "") if cfg.fsdp
            else "replicated data parallel" if nproc > 1 else "one process")
    adapters = (f"LoRA r={cfg.lora_r} ({cfg.lora_targets})" + (" on NF4 weights" if quantize == "nf4" else "")
                if cfg.lora_r else "full fine-tuning")
    lines = [f"rlxf plan {recipe}: {cfg.model}",
             f"  model: {shape.params() / 1e9:.2f}B parameters ({shape.layers} layers, hidden {shape.hidden}, "
             f"MLP {shape.intermediate}, vocab {shape.vocab})",
             f"  run: {adapters}; {mode} on {nproc} GPU{'s' * (nproc > 1)}; dtype {cfg.dtype}; batch {cfg.batch_size}"
             + (f" x group {cfg.group_size}" if hasattr(cfg, "group_size") else "")
             + f"; gradient checkpointing {'on' if cfg.gradient_checkpointing else 'off'}",
             "  per-GPU memory (GB):"]
    width = max(len(name) for name in [*est.parts, *est.host, "peak"])
    lines += [f"    {name:<{width}}  {size / GB:8.2f}" for name, size in est.parts.items()]
    lines.append(f"    {'peak':<{width}}  {est.peak / GB:8.2f}")
    if est.host:
        lines.append(f"  host memory per process (GB): {sum(est.host.values()) / GB:.2f} ("
                     + ", ".join(f"{k} {v / GB:.2f}" for k, v in est.host.items()) + ")")
    if capacity is not None:
        verdict = "fits" if fits(est, capacity) else "does NOT fit"
        lines.append(f"  {card} ({capacity / GB:.1f} GB, keeping {HEADROOM:.0%} free): {verdict}")
    return "\n".join(lines)


__all__ = ["plan", "report", "workload"]
