"""The notebook configs at their real shapes on one GPU: ``configs/orpo_llama3_8b_qlora.yaml`` on a
random-init Llama-3-8B shape and ``configs/dpo_zephyr_7b_qlora.yaml`` on a random-init Mistral-7B
shape, each run through the CLI with its own hyper-parameters (4-bit NF4 base, LoRA on every linear
layer, gradient checkpointing, the merged bf16 export at the end). Only the model directory, the
data, the step count and the evaluation size are overridden. Beside each, TRL 1.16 (``DPOTrainer``,
``trl.experimental.orpo.ORPOTrainer``) with peft and bitsandbytes, configured from the same YAML file
(the ``trl ...`` rows; torch AdamW on both sides, where the notebooks name 8-bit or paged AdamW).

    python benchmarks/notebook_configs.py --out runs/notebooks          # all four (~8 min on one H100)
    python benchmarks/notebook_configs.py --out /tmp/nb --quick --cpu   # the wiring on tiny shapes, CPU

The weights are random, so the losses say nothing about quality: the runs measure s/step, peak GPU
memory (``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` over the whole run, loading,
quantisation, evaluation and the merge included) and that the whole path works at this size.
Data: synthetic prompt/chosen/rejected rows over the tiny character tokenizer (one token a
character), sized to each config: 400 + 500 characters a side for the Zephyr recipe
(``max_length`` 1024, ``max_prompt_length`` 512) and 512 + 1024 for the ORPO notebook (whose
``max_length`` 4096 is an upper bound, not a typical row). Writes ``results.json`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from real_sizes import SHAPE_8B, SHAPE_QUICK, _step_times, build_model_dir, ensure_wheels, step_timer  # noqa: E402

# Mistral-7B-v0.1 (Zephyr-7B's base): hidden 4096, 32 layers, MLP 14336, 32/8 heads, vocabulary 32000.
# Built as a Llama-class model: the same layers; Mistral's 4096-token sliding window never applies
# at the recipe's 1024 tokens.
SHAPE_MISTRAL_7B = dict(SHAPE_8B, vocab_size=32000, rope_theta=10000.0, max_position_embeddings=32768)
RUNS = {
    "orpo llama-3-8b qlora": dict(recipe="orpo", config="configs/orpo_llama3_8b_qlora.yaml", shape=SHAPE_8B,
                                  prompt_chars=512, completion_chars=1024, pairs=96),
    "dpo zephyr-7b qlora": dict(recipe="dpo", config="configs/dpo_zephyr_7b_qlora.yaml", shape=SHAPE_MISTRAL_7B,
                                prompt_chars=400, completion_chars=500, pairs=96),
}
# TRL 1.16 with peft and bitsandbytes on the same model, data and hyper-parameters (read from the same
# YAML files), as the notebooks run them, except the optimiser: torch AdamW on both sides.
RUNS.update({f"trl {name}": dict(spec, trl=True) for name, spec in list(RUNS.items())})
# the Zephyr config with its adapters multiplying in fp32 (--autocast false): what bf16 autocast over
# fp32 LoRA adapters changes at the same settings
RUNS["dpo zephyr-7b qlora fp32 adapters"] = dict(RUNS["dpo zephyr-7b qlora"],
                                                 extra=("--autocast", "false", "--merge-lora", "false"))


def write_pairs(path: Path, pairs: int, prompt_chars: int, completion_chars: int) -> None:
    import random

    rng = random.Random(0)
    alphabet = "0123456789+=abcdefghij "

    def text(n: int) -> str:
        return "".join(rng.choice(alphabet) for _ in range(n))

    with path.open("w") as f:
        for _ in range(pairs):
            f.write(json.dumps({"prompt": text(prompt_chars), "chosen": text(completion_chars),
                                "rejected": text(completion_chars)}) + "\n")


def child(name: str, model_dir: str, data: str, out: Path, steps: int, cuda: bool) -> dict:
    """One config through the rlxf CLI (or TRL) in this process; its figures, with the process's peaks."""
    import torch

    spec = RUNS[name]
    runner = trl_child if spec.get("trl") else rlxf_child
    result = runner(name, spec, model_dir, data, out, steps, cuda)
    if cuda:
        result["peak_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        result["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 1e9, 2)
    return result


def _figures(times: list[float]) -> dict:
    """Step times and the steady-state s/step: the median after the first step."""
    return {"step_s": times, "s_per_step": statistics.median(times[1:] or times) if times else None}


def rlxf_child(name: str, spec: dict, model_dir: str, data: str, out: Path, steps: int, cuda: bool) -> dict:
    """``rlxf <recipe> --config <yaml>`` through ``rlxf.cli.main``, overriding model, data and step count."""
    from rlxf.cli import main

    run_dir = out / "runs" / _slug(name)
    argv = [spec["recipe"], "--config", str(ROOT / spec["config"]), "--model", model_dir, "--dataset", data,
            "--eval-dataset", data, "--eval-size", "8", "--max-steps", str(steps), "--log-every", "1",
            "--save-every", "0", "--progress", "false", "--output-dir", str(run_dir),
            "--device", "cuda" if cuda else "cpu", *spec.get("extra", ())]
    t0 = time.time()
    code = main(argv)
    merged = run_dir / "final" / "merged"
    result = {"exit": code, "argv": argv, "wall_s": round(time.time() - t0, 1),
              **_figures(_step_times(run_dir / "metrics.jsonl")), "merged": (merged / "config.json").exists()}
    shutil.rmtree(merged, ignore_errors=True)   # a 15 GB export at these shapes: checked, then freed for the next run
    return result


def trl_child(name: str, spec: dict, model_dir: str, data: str, out: Path, steps: int, cuda: bool) -> dict:
    """TRL's DPOTrainer / ORPOTrainer with a peft LoRA on a bitsandbytes 4-bit model, configured from
    the rlxf YAML: the same NF4 settings, LoRA, batch, accumulation, lengths, β, schedule and seed."""
    import torch
    import yaml
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    cfg = yaml.safe_load((ROOT / spec["config"]).read_text())
    t0 = time.time()
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                               bnb_4bit_use_double_quant=bool(cfg.get("double_quant")))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, quantization_config=quant,
                                                 device_map={"": 0 if cuda else "cpu"})
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lora = LoraConfig(r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"], lora_dropout=cfg["lora_dropout"],
                      target_modules=cfg["lora_targets"].split(","), task_type="CAUSAL_LM")
    timer = step_timer(cuda)
    common = dict(output_dir=str(out / "runs" / _slug(name)), per_device_train_batch_size=cfg["batch_size"],
                  gradient_accumulation_steps=cfg["grad_accum"], max_steps=steps, learning_rate=cfg["lr"],
                  lr_scheduler_type=cfg["schedule"], warmup_steps=cfg.get("warmup_steps", 0),
                  weight_decay=cfg.get("weight_decay", 0.0), max_length=cfg["max_length"],
                  gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
                  bf16=cuda, use_cpu=not cuda, logging_steps=1, save_strategy="no", report_to="none",
                  dataloader_num_workers=0, seed=cfg["seed"], optim="adamw_torch")
    if spec["recipe"] == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        trainer_class, args = ORPOTrainer, ORPOConfig(beta=cfg["orpo_lambda"], **common)
    else:
        from trl import DPOConfig, DPOTrainer

        trainer_class, args = DPOTrainer, DPOConfig(beta=cfg["beta"], **common)
    rows = [json.loads(line) for line in open(data)]
    trainer = trainer_class(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                            peft_config=lora, callbacks=[timer])
    timer.restart()
    trainer.train()
    return {"exit": 0, "argv": [f"{trainer_class.__name__} from {spec['config']}"], "wall_s": round(time.time() - t0, 1),
            **_figures(timer.times), "merged": False}


def write_tables(out: Path, results: dict) -> None:
    meta = results["meta"]
    lines = [f"# Notebook configs at their shapes ({meta['device']}, {meta['date']})", "",
             "| config | s/step | peak allocated GB | peak reserved GB | merged bf16 export | wall s |",
             "|---|---|---|---|---|---|"]
    for name, r in results["runs"].items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error'][:120]} | | | | |")
            continue
        export = "not asked" if RUNS.get(name, {}).get("trl") else ("yes" if r["merged"] else "no")
        lines.append(f"| {name} | {r['s_per_step']:.2f} | {r.get('peak_allocated_gb', '')} | "
                     f"{r.get('peak_reserved_gb', '')} | {export} | {r['wall_s']} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/notebooks")
    p.add_argument("--steps", type=int, default=6, help="optimiser steps a run (s/step: median of steps 2+)")
    p.add_argument("--only", default=None, help="regex: run only the configs whose name matches it (e.g. '^dpo', '^trl')")
    p.add_argument("--quick", action="store_true", help="tiny shapes and data (the wiring)")
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available() and not args.cpu
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.child:
        name = args.child
        result = child(name, str(out / _model_name(name, args.quick)), str(out / f"{_slug(name)}.jsonl"), out,
                       args.steps, cuda)
        (out / f"child-{_slug(name)}.json").write_text(json.dumps(result))
        return 0
    results = {"meta": {"device": torch.cuda.get_device_name() if cuda else "cpu", "date": time.strftime("%Y-%m-%d"),
                        "torch": torch.__version__, "installed_wheels": ensure_wheels(),
                        "command": " ".join([sys.executable, *sys.argv])}, "runs": {}}
    for name, spec in RUNS.items():
        if args.only and not re.search(args.only, name):
            continue
        shape = SHAPE_QUICK if args.quick else spec["shape"]
        built = build_model_dir(out / _model_name(name, args.quick), shape, "cuda" if cuda else "cpu")
        results["meta"].setdefault(_model_name(name, args.quick), built)   # the first run builds it
        scale = 16 if args.quick else 1
        write_pairs(out / f"{_slug(name)}.jsonl", spec["pairs"], spec["prompt_chars"] // scale,
                    spec["completion_chars"] // scale)
        cmd = [sys.executable, __file__, "--out", str(out), "--steps", str(args.steps), "--child", name]
        cmd += ["--quick"] if args.quick else []
        cmd += ["--cpu"] if args.cpu else []
        log = out / f"log-{_slug(name)}.txt"
        with log.open("w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
        result_file = out / f"child-{_slug(name)}.json"
        if proc.returncode or not result_file.exists():
            results["runs"][name] = {"error": f"exit {proc.returncode}: "
                                              + " / ".join(log.read_text().strip().splitlines()[-3:])}
        else:
            results["runs"][name] = json.loads(result_file.read_text())
        write_tables(out, results)
    print((out / "results.md").read_text())
    return 0


def _slug(name: str) -> str:
    return name.replace(" ", "-")


def _model_name(name: str, quick: bool) -> str:
    base = "model-quick" if quick else ("llama3-8b-shape" if "llama" in name else "mistral-7b-shape")
    return base


if __name__ == "__main__":
    sys.exit(main())
