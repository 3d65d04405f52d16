"""FSDP2 with CPU offload trains a model whose fp32 weights, gradients and AdamW state do not fit one GPU.

Run on one GPU under torchrun (FSDP2 needs a process group, even of one process)::

    torchrun --standalone --nproc-per-node 1 benchmarks/fsdp_offload.py --out $OUT

The model is a random-init Llama shape (default: hidden 4096, 24 layers, MLP 14336, 32/8 heads,
vocabulary 32,000: 5.50B parameters), built on the meta device and initialised in place, so no
checkpoint is read or written. Full fine-tuning in fp32 master weights with AdamW needs 16 bytes a
parameter, 88 GB, before any activation: more than an 80 GB card. Two runs of the same training
step (rlxf's log-prob path ``rlxf.models.token_logps`` on a random batch, backward, gradient
clipping and AdamW through ``rlxf.train.clip_and_step``), sharded by ``rlxf.runtime.fsdp.shard``,
the function behind ``--fsdp``:

1. ``--fsdp`` alone: expected to run out of GPU memory; the error and the memory at that point
   are recorded.
2. ``--fsdp --fsdp-cpu-offload``: the shards, gradients and AdamW state live in pinned host memory;
   the optimiser steps on the CPU. Steps/s, tokens/s, peak GPU memory and peak host memory are
   recorded, beside ``rlxf plan``'s estimate of both (``rlxf.runtime.memory``).

Writes ``results.json`` and ``results.md`` under ``--out``. Finishes in about 3–5 minutes on one
H100 (most of it the CPU optimiser step). ``--cpu`` runs the same code on a tiny shape on the CPU
(gloo, no offload) as a smoke test.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from rlxf.models import token_logps  # noqa: E402
from rlxf.runtime import fsdp  # noqa: E402
from rlxf.runtime.memory import GB, ModelShape, Workload, estimate  # noqa: E402
from rlxf.train import build_optimizer, clip_and_step  # noqa: E402


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for results.json and results.md")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=2, help="sequences a step")
    p.add_argument("--seq", type=int, default=1024, help="tokens a sequence")
    p.add_argument("--steps", type=int, default=4, help="timed steps after one warm-up step")
    p.add_argument("--skip-baseline", action="store_true", help="do not try the run without offload")
    p.add_argument("--cpu", action="store_true", help="smoke test: a tiny shape on the CPU, no offload")
    return p.parse_args(argv)


def build(args, device: torch.device, *, offload: bool):
    """The Llama model on the meta device, sharded with rlxf's --fsdp function, then materialised
    (host memory for the shards when offloading) and initialised with N(0, 0.02)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                         intermediate_size=args.intermediate, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, tie_word_embeddings=False, use_cache=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    fsdp.shard(model, device, cpu_offload=offload)
    model.to_empty(device="cpu" if offload else device)
    with torch.no_grad():   # drawn on the compute device (fast), copied into the shard wherever it lives
        for index, (name, param) in enumerate(model.named_parameters()):
            local = param.to_local()
            if "norm" in name:
                local.fill_(1.0)
            else:
                draw = torch.empty(local.shape, dtype=local.dtype, device=device)
                local.copy_(draw.normal_(0, 0.02, generator=torch.Generator(device=device).manual_seed(index)))
                del draw
        rotary = type(model.model.rotary_emb)(config=config)
        for name, buffer in rotary.named_buffers():
            setattr(model.model.rotary_emb, name, buffer.to(device))
    model.gradient_checkpointing_disable()
    return model, config


def train(args, model, device: torch.device, *, offload: bool) -> dict:
    """One warm-up and ``args.steps`` timed steps of -mean token log-prob on random tokens."""
    cfg = SimpleNamespace(lr=1e-5, adam_beta1=0.9, adam_beta2=0.999, weight_decay=0.0, fsdp_cpu_offload=offload)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    generator = torch.Generator().manual_seed(1)
    home = torch.device("cpu") if offload else device
    times, norms = [], []
    for step in range(args.steps + 1):
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator).to(home)
        sync(device)
        t0 = time.perf_counter()
        loss = -token_logps(model, ids, torch.ones_like(ids)).mean()
        loss.backward()
        norms.append(clip_and_step(model.parameters(), optimizer, scheduler, 1.0))
        sync(device)
        if step:
            times.append(time.perf_counter() - t0)
    step_s = sorted(times)[len(times) // 2]
    return {"status": "ok", "step_s_median": round(step_s, 3), "step_s": [round(t, 3) for t in times],
            "tokens_per_s": round(args.batch * args.seq / step_s, 1), "loss_last": loss.item(),
            "grad_norms": [round(n, 4) for n in norms], **memory(device)}


def memory(device: torch.device) -> dict:
    out = {"host_peak_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB, 2)}
    if device.type == "cuda":
        out["gpu_peak_allocated_gb"] = round(torch.cuda.max_memory_allocated(device) / GB, 2)
        out["gpu_peak_reserved_gb"] = round(torch.cuda.max_memory_reserved(device) / GB, 2)
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def attempt(args, device: torch.device, *, offload: bool) -> dict:
    """Build and train; an out-of-memory error is a result, recorded with the memory at that point."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    model = None
    try:
        model, _ = build(args, device, offload=offload)
        built_s = time.perf_counter() - t0
        result = {**train(args, model, device, offload=offload), "build_s": round(built_s, 1)}
    except torch.OutOfMemoryError as exc:
        result = {"status": "out of memory", "error": str(exc).splitlines()[0][:300], **memory(device)}
    finally:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    return result


def planned(args, *, offload: bool) -> dict:
    shape = ModelShape(hidden=args.hidden, layers=args.layers, intermediate=args.intermediate, heads=args.heads,
                       kv_heads=args.kv_heads, head_dim=args.hidden // args.heads, vocab=args.vocab, tied=False)
    est = estimate(shape, Workload(train_tokens=args.batch * args.seq, fsdp=True, nproc=1, cpu_offload=offload))
    return {"params": shape.params(), "gpu_gb": round(est.peak / GB, 2), "host_gb": round(sum(est.host.values()) / GB, 2),
            "parts_gb": {k: round(v / GB, 2) for k, v in {**est.parts, **est.host}.items()}}


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [f"# FSDP2 CPU offload — {meta['device']}, {meta['date']}", "",
             f"`{meta['command']}` · torch {meta['torch']} · {meta['params'] / 1e9:.2f}B-parameter Llama shape "
             f"(hidden {meta['shape']['hidden']}, {meta['shape']['layers']} layers), fp32 master weights, AdamW, "
             f"{meta['tokens_per_step']} tokens a step", "",
             "| run | status | s/step (median) | tokens/s | peak GPU GB (allocated) | planned GPU GB | "
             "peak host GB | planned host GB |", "|---|---|---|---|---|---|---|---|"]
    for name, row in results["runs"].items():
        plan = results["planned"][name]
        lines.append(f"| {name} | {row['status']} | {row.get('step_s_median', '–')} | {row.get('tokens_per_s', '–')} | "
                     f"{row.get('gpu_peak_allocated_gb', '–')} | {plan['gpu_gb']} | {row.get('host_peak_gb', '–')} | "
                     f"{plan['host_gb']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse(argv)
    if args.cpu:
        args.hidden, args.layers, args.intermediate, args.heads, args.kv_heads, args.vocab = 64, 2, 128, 4, 2, 101
        args.seq, args.steps = 32, 2
    if not fsdp.under_torchrun():
        raise SystemExit("run under torchrun: torchrun --standalone --nproc-per-node 1 benchmarks/fsdp_offload.py "
                         "--out DIR")
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {} if args.skip_baseline else {"--fsdp (no offload)": attempt(args, device, offload=False)}
    if cuda:
        runs["--fsdp --fsdp-cpu-offload"] = attempt(args, device, offload=True)
    plans = {name: planned(args, offload="cpu-offload" in name) for name in runs}
    results = {"meta": {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        "command": " ".join(["torchrun --standalone --nproc-per-node 1 benchmarks/fsdp_offload.py",
                                             *(argv if argv is not None else sys.argv[1:])]),
                        "device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
                        "params": plans and next(iter(plans.values()))["params"],
                        "shape": {k: getattr(args, k) for k in ("hidden", "layers", "intermediate", "heads",
                                                                  "kv_heads", "vocab")},
                        "tokens_per_step": args.batch * args.seq},
               "runs": runs, "planned": plans}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown(results))
    print(markdown(results))
    dist.destroy_process_group()
    return results


if __name__ == "__main__":
    main()
