"""Multi-GPU scaling in one command per machine: FSDP2 and replicated data parallel on 1, 2, 4 and 8
GPUs, DPO and GRPO, at the Qwen2.5-0.5B shape and at the Llama-3-8B shape, and a sharded checkpoint
resumed on another GPU count.

    python benchmarks/scaling.py --out runs/scaling                  # every power-of-two count the machine has
    python benchmarks/scaling.py --out runs/scaling --gpus 1,2 --shapes 0.5b
    python benchmarks/scaling.py --out /tmp/sc --cpu --quick         # rehearsal: gloo, small shapes, 1 and 2 processes

For each shape, recipe, mode and GPU count it runs ``rlxf <recipe>`` (under ``torchrun
--nproc-per-node N`` when N > 1) with the same flags and the same global batch, and records:
training tokens/s (DPO) or seconds a step and sampled tokens/s (GRPO), the peak memory of each
process, the scaling efficiency (throughput on N over N × the throughput on 1 of the same row) and
the held-out metrics at the end (equal across counts up to run-to-run noise). Modes: ``fsdp``
(``--fsdp``: parameters, gradients and AdamW state sharded) and ``dp`` (replicated, gradients
averaged after the backward pass) at 0.5B; at 8B ``fsdp`` full fine-tuning where ``rlxf plan``
says it fits the card on N GPUs, else ``lora-dp`` (LoRA r = 16, replicated; FSDP2 does not take
LoRA). The resume check runs FSDP2 DPO on the largest count, stops it after half its steps
(``RLXF_FAULT_EXIT_AFTER_STEP``), resumes it on half as many processes (2 → 1) and compares every
logged loss after the stop with the uninterrupted run's.

Writes ``results.json`` (every run: command, summary figures, per-process peaks), ``results.md``
(the tables) and ``scaling.png`` (throughput against GPUs) under ``--out``; ``--deadline`` skips
the runs that would start after it. Random-init weights, the built-in arithmetic task over the
tiny character tokenizer.
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
sys.path.insert(0, str(ROOT / "benchmarks"))

from data_parallel import build_model as build_qwen, run as launch  # noqa: E402
from real_sizes import SHAPE_8B, SHAPE_QUICK, build_model_dir  # noqa: E402

OFFLINE = {"dpo": "--batch-size=64 --max-steps=20 --eval-every=0 --eval-size=64 --task-size=1280 --lr=1e-5"}
ONLINE = {"grpo": "--batch-size=32 --group-size=8 --max-new-tokens=128 --max-steps=6 --eval-every=0 "
                  "--eval-size=32 --eval-generate=32 --task-size=512 --lr=1e-6"}
QUICK = {"dpo": "--batch-size=8 --max-steps=4 --eval-every=0 --eval-size=16 --task-size=32 --lr=1e-5",
         "grpo": "--batch-size=4 --group-size=2 --max-new-tokens=8 --max-steps=2 --eval-every=0 "
                 "--eval-size=4 --eval-generate=4 --task-size=16 --lr=1e-6"}


def build(shape: str, quick: bool, work: Path, device: str) -> Path:
    """The model directory of ``shape`` (built once under ``work``)."""
    if shape == "0.5b":
        path = work / ("qwen-quick" if quick else "qwen2.5-0.5b-shape")
        dims = (dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2) if quick else
                dict(hidden=896, intermediate=4864, layers=24, heads=14, kv_heads=2))
        build_qwen(path, argparse.Namespace(**dims))
        return path
    path = work / ("llama-quick" if quick else "llama-3-8b-shape")
    build_model_dir(path, SHAPE_QUICK if quick else SHAPE_8B, device)
    return path


def fits(recipe: str, flags: list[str], nproc: int, gpu_gb: float) -> bool:
    """Whether ``rlxf plan`` says the run fits a card of ``gpu_gb`` on ``nproc`` GPUs."""
    keep = [f for f in flags if not f.startswith(("--device", "--progress", "--output-dir"))]
    proc = subprocess.run([sys.executable, "-m", "rlxf", "plan", recipe, *keep, f"--nproc={nproc}", f"--gpu-gb={gpu_gb}"],
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, capture_output=True, text=True)
    return proc.returncode == 0 and "does NOT fit" not in proc.stdout


def rows(args, models: dict[str, Path], gpu_gb: float) -> list[dict]:
    """Every (shape, recipe, mode, count, flags) of the table, in run order."""
    device = "--device=cpu" if args.cpu else "--device=cuda"
    out = []
    for shape in args.shapes:
        for recipe in args.recipes:
            base = (QUICK if args.quick else {**OFFLINE, **ONLINE})[recipe].split()
            base = [f"--model={models[shape]}", *base, device, "--progress=False", "--seed=0"]
            if shape == "8b" and not args.quick:
                base += ["--gradient-checkpointing", "--dtype=bfloat16"] if recipe == "dpo" else ["--dtype=bfloat16"]
            for n in args.gpus:
                if shape == "0.5b":
                    modes = {"fsdp": ["--fsdp"], "dp": []}
                elif fits(recipe, [*base, "--fsdp"], n, gpu_gb):
                    modes = {"fsdp": ["--fsdp"]}
                else:
                    modes = {"lora-dp": ["--lora-r=16"]}
                for mode, extra in modes.items():
                    out.append(dict(shape=shape, recipe=recipe, mode=mode, processes=n, flags=[*base, *extra]))
    return out


def resume_check(args, models: dict[str, Path], out: Path) -> dict:
    """FSDP2 DPO on the largest count, stopped after half its steps, resumed on half the processes."""
    n = max(args.gpus)
    m = max(n // 2, 1) if n > 1 else 2
    steps = 4 if args.quick else 20
    base = [f"--model={models['0.5b']}", *(QUICK if args.quick else OFFLINE)["dpo"].split(),
            "--device=cpu" if args.cpu else "--device=cuda", "--progress=False", "--seed=0", "--fsdp",
            f"--save-every={steps // 2}"]
    whole = launch("dpo", base, n, out / f"resume-whole-{n}")
    stopped = launch("dpo", base, n, out / f"resume-{n}-to-{m}", env={"RLXF_FAULT_EXIT_AFTER_STEP": str(steps // 2)})
    # one process resumes without torchrun and so without --fsdp: it reads the sharded checkpoint whole
    again = [f for f in base if m > 1 or f != "--fsdp"]
    resumed = launch("dpo", [*again, "--resume"], m, out / f"resume-{n}-to-{m}")
    rec = {"written_on": n, "resumed_on": m, "stopped_after_step": steps // 2, "whole": whole,
           "stopped_rc": stopped["rc"], "resumed": resumed}
    if "error" not in whole and "error" not in resumed:
        a, b = (_losses(out / name) for name in (f"resume-whole-{n}", f"resume-{n}-to-{m}"))
        after = [s for s in a if s > steps // 2 and s in b]
        rec["steps_compared"] = after
        rec["max_rel_diff_loss"] = max((abs(a[s] - b[s]) / max(abs(a[s]), 1e-12) for s in after), default=None)
    return rec


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r and "step" in r}


def efficiency(runs: list[dict]) -> None:
    """Add ``speed_up`` and ``efficiency`` against the 1-GPU run of the same shape, recipe and mode."""
    one = {(r["shape"], r["recipe"], r["mode"]): r for r in runs if r["processes"] == 1 and "throughput" in r}
    for r in runs:
        base = one.get((r["shape"], r["recipe"], r["mode"]))
        if base and "throughput" in r:
            r["speed_up"] = round(r["throughput"] / base["throughput"], 3)
            r["efficiency"] = round(r["speed_up"] / r["processes"], 3)


def write(out: Path, results: dict) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2))
    m = results["meta"]
    lines = [f"# Scaling — {m['device']} × up to {max(m['gpus'])}, {m['date']}", "", f"`{m['command']}`", "",
             *(["`--quick`: small stand-ins of the two shapes (2 layers) and a few steps; the figures test the "
                "commands, not the scaling.", ""] if m.get("quick") else []),
             "| shape | recipe | mode | GPUs | tokens/s (DPO) or s/step (GRPO) | sampled tok/s | speed-up | efficiency "
             "| peak MB per process | held-out at the end |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        if "error" in r or "throughput" not in r:
            lines.append(f"| {r['shape']} | {r['recipe']} | {r['mode']} | {r['processes']} | "
                         f"{r.get('error', 'skipped (deadline)')} | | | | | |")
            continue
        speed = f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else f"{r['step_s']:.2f} s"
        final = ", ".join(f"{k.split('/', 1)[1]} {v:.4g}" for k, v in r["final"].items()
                          if k in ("final/loss", "final/accuracy", "final/task_accuracy"))
        lines.append(f"| {r['shape']} | {r['recipe']} | {r['mode']} | {r['processes']} | {speed} | "
                     f"{r.get('sample_tokens_per_s', '')} | {r.get('speed_up', '')} | {r.get('efficiency', '')} | "
                     f"{[round(p) for p in r['peak_memory_mb_by_rank'] if p is not None]} | {final} |")
    res = results.get("resume")
    if res:
        lines += ["", f"Resume: FSDP2 DPO written on {res['written_on']} processes, stopped after step "
                  f"{res['stopped_after_step']}, resumed on {res['resumed_on']}: largest relative difference of the "
                  f"logged loss against the uninterrupted run over steps {res.get('steps_compared')}: "
                  f"{res.get('max_rel_diff_loss')}"]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def plot(out: Path, runs: list[dict]) -> None:
    """Speed-up over one GPU against GPUs, one line per shape and mode, the ideal line dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    counts = sorted({r["processes"] for r in runs})
    for ax, recipe, label in ((axes[0], "dpo", "DPO (training tokens/s)"), (axes[1], "grpo", "GRPO (steps/s)")):
        ax.plot(counts, counts, ":", color="grey", label="ideal")
        series = sorted({(r["shape"], r["mode"]) for r in runs if r["recipe"] == recipe and "speed_up" in r})
        for style, (shape, mode) in zip(("-o", "--s", "-.^", ":v"), series):
            pts = sorted((r["processes"], r["speed_up"]) for r in runs
                         if (r["shape"], r["mode"], r["recipe"]) == (shape, mode, recipe) and "speed_up" in r)
            ax.plot([p for p, _ in pts], [v for _, v in pts], style, label=f"{shape} {mode}")
        ax.set_xlabel("GPUs")
        ax.set_ylabel("speed-up over 1 GPU")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_title(label)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/scaling")
    p.add_argument("--gpus", default=None, help="comma-separated counts (default: 1, 2, 4, 8 up to the machine's)")
    p.add_argument("--shapes", default="0.5b,8b")
    p.add_argument("--recipes", default="dpo,grpo")
    p.add_argument("--cpu", action="store_true", help="gloo processes on the CPU (a rehearsal of the commands)")
    p.add_argument("--quick", action="store_true", help="small shapes and budgets")
    p.add_argument("--no-resume", action="store_true", help="skip the resume-on-another-count check")
    p.add_argument("--deadline", type=float, default=None, help="seconds after which no new run starts")
    args = p.parse_args(argv)
    t0 = time.time()
    import torch

    available = 2 if args.cpu else torch.cuda.device_count()
    if not available:
        raise SystemExit("no CUDA device: run with --cpu for the gloo rehearsal")
    args.gpus = ([int(x) for x in args.gpus.split(",")] if args.gpus else
                 [n for n in (1, 2, 4, 8) if n <= available])
    args.shapes, args.recipes = args.shapes.split(","), args.recipes.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("TMPDIR", "/tmp"))
    gpu_gb = 0.0 if args.cpu else torch.cuda.get_device_properties(0).total_memory / 1e9
    models = {s: build(s, args.quick, work, "cpu" if args.cpu else "cuda") for s in args.shapes}
    device = "CPU (gloo)" if args.cpu else torch.cuda.get_device_name(0)
    results = {"meta": {"device": device, "gpus": args.gpus, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        "torch": torch.__version__, "command": "python benchmarks/scaling.py " + " ".join(argv or sys.argv[1:]),
                        "card_gb": round(gpu_gb, 1), "quick": args.quick}, "runs": []}
    for row in rows(args, models, gpu_gb if gpu_gb else 1e9):
        name = f"{row['shape']}-{row['recipe']}-{row['mode']}-{row['processes']}"
        if args.deadline and time.time() - t0 > args.deadline:
            results["runs"].append({**row, "skipped": "deadline"})
            continue
        results["runs"].append({**row, **launch(row["recipe"], row["flags"], row["processes"], out / name)})
        print(name, {k: results["runs"][-1].get(k) for k in ("step_s", "tokens_per_s", "error")}, flush=True)
        efficiency(results["runs"])
        write(out, results)
    if not args.no_resume and "0.5b" in args.shapes and not (args.deadline and time.time() - t0 > args.deadline):
        results["resume"] = resume_check(args, models, out)
        write(out, results)
    plot(out, results["runs"])
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
