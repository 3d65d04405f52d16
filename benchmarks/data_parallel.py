"""Data-parallel scaling of an rlxf recipe: the same run on 1 and on N GPUs (torchrun), same global batch.

    python benchmarks/data_parallel.py --out runs/dp --gpus 2        # on a machine with 2 GPUs

Builds a random-init model of the Qwen2.5-0.5B shape with rlxf's character tokenizer in a local
directory (``--hidden`` etc. change the shape), then runs ``rlxf <recipe>`` once as one process and
once under ``torchrun --nproc-per-node N`` with identical flags, and compares the training tokens/s
(``summary.json``: tokens over the seconds of the training steps, eval excluded) or, for the GRPO
family, the seconds a step (sampling + training), peak memory per process and the final held-out
metrics. Writes ``results.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_model(path: Path, args) -> None:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from rlxf.zoo.tokenizer import build_tokenizer

    if (path / "config.json").exists():
        return
    config = Qwen2Config(vocab_size=151936, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                         max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)


def rlxf_command(recipe: str, flags: list[str], nproc: int) -> list[str]:
    """``python -m rlxf RECIPE FLAGS``, under ``torchrun --nproc-per-node N`` for N > 1 or ``--fsdp``."""
    rlxf = ["-m", "rlxf", recipe, *flags]
    if nproc == 1 and "--fsdp" not in flags:   # --fsdp runs under torchrun, one process included
        return [sys.executable, *rlxf]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *rlxf]


def run(recipe: str, flags: list[str], nproc: int, out: Path, env: dict | None = None) -> dict:
    """Run one rlxf command (its log beside ``out``); its summary figures, or ``error`` with its last line."""
    cmd = rlxf_command(recipe, [*flags, f"--output-dir={out}"], nproc)
    path = os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
    t0 = time.time()
    proc = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": path, **(env or {})}, capture_output=True, text=True)
    (out.parent / f"{out.name}.log").write_text(proc.stdout + proc.stderr)
    rec = {"processes": nproc, "command": " ".join(cmd[1:]), "rc": proc.returncode, "wall_s": round(time.time() - t0, 1)}
    if proc.returncode or not (out / "summary.json").exists():
        rec["error"] = (proc.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
        return rec
    summary = json.loads((out / "summary.json").read_text())
    rec.update(train_seconds=summary["train_seconds"], peak_memory_mb=summary["peak_memory_mb"],
               data_parallel=summary.get("data_parallel"),
               peak_memory_mb_by_rank=(summary.get("data_parallel") or {}).get("peak_memory_mb_by_rank")
               or [summary["peak_memory_mb"]],
               final={k: v for k, v in summary.items() if k.startswith("final/")})
    if "sample_seconds" in summary:      # online recipes: a step is sampling + training
        seconds = summary["sample_seconds"] + summary["train_seconds"]
        rec.update(sample_seconds=summary["sample_seconds"], sample_tokens_per_s=summary["sample_tokens_per_s"],
                   train_tokens_per_s=summary["train_tokens_per_s"], step_s=seconds / summary["steps"],
                   throughput=summary["steps"] / seconds)
    else:                                # offline recipes: training tokens over the training steps' seconds
        rec.update(tokens_per_s=summary["tokens_per_s"], step_s=summary["train_seconds"] / summary["steps"],
                   throughput=summary["tokens_per_s"])
    return rec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/dp")
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--recipe", default="dpo")
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--intermediate", type=int, default=4864)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--heads", type=int, default=14)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--flags", default="--batch-size=64 --max-steps=30 --eval-every=0 --eval-size=64 "
                   "--task-size=4000 --progress=False --lr=1e-5 --device=cuda",
                   help="flags passed to both runs")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = Path(os.environ.get("TMPDIR", "/tmp")) / f"rlxf-dp-model-{args.hidden}-{args.layers}"
    build_model(model, args)
    flags = [f"--model={model}", *args.flags.split()]
    results = {"recipe": args.recipe, "flags": flags, "runs": []}
    for nproc in (1, args.gpus):
        rec = run(args.recipe, flags, nproc, out / f"{args.recipe}-{nproc}")
        if "error" in rec:
            raise SystemExit(f"{rec['command']} failed ({rec['rc']}): {rec['error']} (log: {out / args.recipe}-{nproc}.log)")
        results["runs"].append(rec)
        (out / "results.json").write_text(json.dumps(results, indent=2))
    one, many = results["runs"]
    offline = "tokens_per_s" in one
    results["speed_up"] = (many["tokens_per_s"] / one["tokens_per_s"] if offline else one["step_s"] / many["step_s"])
    results["scaling_efficiency"] = results["speed_up"] / args.gpus
    (out / "results.json").write_text(json.dumps(results, indent=2))
    if offline:
        print("| processes | train tokens/s | train s | peak MB (per process) | final metrics |")
        print("|---|---|---|---|---|")
    else:
        print("| processes | s a step | sample s | train s | sampled tokens/s | peak MB (per process) | final metrics |")
        print("|---|---|---|---|---|---|---|")
    for r in results["runs"]:
        peaks = (r["data_parallel"] or {}).get("peak_memory_mb_by_rank") or [r["peak_memory_mb"]]
        if offline:
            print(f"| {r['processes']} | {r['tokens_per_s']:,.0f} | {r['train_seconds']} | {peaks} | {r['final']} |")
        else:
            print(f"| {r['processes']} | {r['step_s']:.3f} | {r['sample_seconds']} | {r['train_seconds']} | "
                  f"{r['sample_tokens_per_s']:,.0f} | {peaks} | {r['final']} |")
    print(f"speed-up {results['speed_up']:.2f}x on {args.gpus} GPUs ({results['scaling_efficiency']:.0%} efficiency)")


if __name__ == "__main__":
    main()
