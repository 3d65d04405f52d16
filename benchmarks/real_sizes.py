"""Real model sizes on one GPU: rlxf LoRA / QLoRA DPO and ORPO, TRL + peft (+ bitsandbytes), and
rlxf GRPO with LoRA, side by side at the Llama-3-8B shape (random init), same data, same card.

    python benchmarks/real_sizes.py --out runs/real_sizes            # everything (~12 min on one H100)
    python benchmarks/real_sizes.py --out /tmp/rs --only 'rlxf dpo'  # a subset (regex on the variant name)
    python benchmarks/real_sizes.py --out /tmp/rs --quick --cpu      # the wiring on a small shape, CPU

1. builds the model directory once (``--model-dir``, default ``<out>/llama3-8b-shape``): a random
   Llama-3-8B-shape model (hidden 4096, 32 layers, MLP 14336, 32/8 heads, vocab 128256) saved as
   bf16 safetensors, with the embedded tiny model's character tokenizer;
2. writes ``pairs.jsonl``: 128 preference pairs of 256 + 700 characters a side;
3. runs each variant in its own process (so that each peak is its own): LoRA r = 16 on q, k, v, o,
   2 pairs × 4 accumulation steps, gradient checkpointing, 8 optimiser steps; the steady-state
   s/step is the median of steps 3-8, the peaks are ``torch.cuda.max_memory_allocated`` and
   ``max_memory_reserved`` over the whole process (loading, reference log-probs, training, eval);
   "fp32 adapters" variants run with ``--autocast false`` (the adapters multiply in fp32), "compile"
   ones with ``--compile``, "compile budget" with ``--compile --activation-memory-budget 0.05`` and no
   module checkpointing; the GRPO variants sample with the static engine, ``rlxf grpo lora`` with the
   adapters folded into plain weights and ``rlxf grpo lora lowrank`` with the low-rank update applied
   in the decode step (``--adapter-sampling fold|lowrank``); ``rlxf engine lora`` times the engine
   alone on that sampling shape, with and without its fused projection copies, and profiles a call;
4. records a ``torch.cuda.memory._record_memory_history`` snapshot of the first two steps of the
   rlxf LoRA DPO run (``memory-rlxf-dpo.pickle``: open it at pytorch.org/memory_viz) and what was
   live at its peak, by allocation site (``memory-rlxf-dpo-peak.json``);
5. writes ``results.json`` and ``results.md`` after every variant; a later command with the same
   ``--out`` on the same card adds its variants to them (so the TRL variants can run in a second
   command when their wheels travel separately).

TRL, datasets, dill, multiprocess, xxhash and bitsandbytes need not be installed: their wheels in
``benchmarks/wheels/`` (``pip download --no-deps`` them there; see benchmarks/README.md) are
installed with ``pip install --no-deps`` when an import fails. The rlxf variants run from ``src/``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pickle
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SHAPE_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                tie_word_embeddings=False)
SHAPE_QUICK = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048, rope_theta=500000.0,
                   tie_word_embeddings=False)
WORK = dict(pairs=128, prompt_chars=256, completion_chars=700, batch=2, accum=4, steps=8, timed_from=2,
            lora_r=16, lora_targets="q_proj,k_proj,v_proj,o_proj", max_length=1100, max_prompt_length=300,
            grpo_prompts=16, grpo_group=8, grpo_new_tokens=128, grpo_steps=3)
# in the order they run (a --deadline skips the later ones); "fp32 adapters" is --autocast false (the
# adapters multiply in fp32), "compile" is --compile (each decoder layer through torch.compile)
VARIANTS = ("rlxf dpo lora", "trl dpo peft", "rlxf dpo lora fp32 adapters", "rlxf dpo lora compile", "rlxf orpo lora",
            "rlxf dpo qlora", "trl dpo peft qlora", "rlxf orpo qlora", "rlxf dpo lora compile budget",
            "rlxf orpo lora compile", "rlxf dpo qlora compile", "rlxf orpo qlora compile", "rlxf grpo lora", "rlxf grpo lora lowrank", "rlxf grpo lora compile",
            "rlxf engine lora")
WHEEL_PACKAGES = ("trl", "datasets", "dill", "multiprocess", "xxhash", "fsspec", "pyarrow", "bitsandbytes")


# -- set-up --------------------------------------------------------------------------------------

def ensure_wheels() -> list[str]:
    """Install the carried wheels (``benchmarks/wheels*/``) of packages that do not import; returns
    what was installed."""
    missing = [name for name in WHEEL_PACKAGES if importlib.util.find_spec(name) is None]
    files = [str(f) for f in sorted((ROOT / "benchmarks").glob("wheels*/*.whl"))
             if any(f.name.lower().startswith(name + "-") for name in missing)]
    if files:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *files], check=True)
        importlib.invalidate_caches()
    return [Path(f).name for f in files]


def build_model_dir(path: Path, shape: dict, device: str) -> dict:
    """A random-init Llama model of ``shape`` saved as bf16 safetensors with the tiny tokenizer
    (its ``model_max_length`` set to the shape's context)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from rlxf.zoo import resolve_model_name

    if (path / "config.json").exists():
        return {"model_dir": str(path), "built": False}
    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_name("tiny"))
    tokenizer.model_max_length = shape["max_position_embeddings"]   # the shape's context, not the tiny model's
    config = LlamaConfig(**shape, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, dtype="bfloat16")
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    params = sum(p.numel() for p in model.parameters())
    del model
    return {"model_dir": str(path), "built": True, "build_s": round(time.time() - t0, 1), "parameters": params}


def write_pairs(path: Path, work: dict) -> None:
    """``work["pairs"]`` preference rows over the tiny vocabulary's digits and letters (seeded)."""
    import random

    rng = random.Random(0)
    alphabet = "0123456789+=abcdefghij "

    def text(n: int) -> str:
        return "".join(rng.choice(alphabet) for _ in range(n))

    with path.open("w") as f:
        for _ in range(work["pairs"]):
            f.write(json.dumps({"prompt": text(work["prompt_chars"]), "chosen": text(work["completion_chars"]),
                                "rejected": text(work["completion_chars"])}) + "\n")


# -- the variants (each in a child process) ---------------------------------------------------------

def rlxf_preference(name: str, model_dir: str, data: str, out: Path, work: dict, cuda: bool) -> dict:
    from rlxf.config import build_config
    from rlxf.configs.registry import get_recipe

    loss = "orpo" if "orpo" in name else "dpo"
    entry = get_recipe(loss)
    values = dict(model=model_dir, dataset=data, loss=loss, lora_r=work["lora_r"], lora_alpha=work["lora_r"],
                  lora_targets=work["lora_targets"], batch_size=work["batch"], grad_accum=work["accum"],
                  max_steps=work["steps"], max_length=work["max_length"],
                  max_prompt_length=work["max_prompt_length"], gradient_checkpointing=True, log_every=1,
                  eval_every=0, warmup_steps=0, lr=1e-5, merge_lora=False, progress=False,
                  output_dir=str(out / "runs" / name.replace(" ", "-")), device="cuda" if cuda else "cpu")
    if "qlora" in name:
        values.update(quantize="nf4", double_quant=True)
    if name.endswith("fp32 adapters"):
        values.update(autocast=False)
    if name.endswith(("compile", "compile budget")):
        values.update(compile=cuda)
    if name.endswith("budget"):   # no module checkpointing: the compiled layers keep 5% of their activations
        values.update(gradient_checkpointing=False, activation_memory_budget=0.05 if cuda else 1.0)
    cfg = build_config(entry.config_class(), values)
    snapshot = out / "memory-rlxf-dpo.pickle" if name == "rlxf dpo lora" and cuda else None
    with _memory_history(snapshot, steps=2):
        summary = entry.train_fn()(cfg).summary
    times = _step_times(Path(values["output_dir"]) / "metrics.jsonl")
    return {"s_per_step": statistics.median(times[work["timed_from"]:]), "step_s": times,
            "final_loss": summary.get("final/loss"), "snapshot": snapshot.name if snapshot else None}


def trl_dpo(name: str, model_dir: str, data: str, out: Path, work: dict, cuda: bool) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import DPOConfig, DPOTrainer

    kwargs = {"dtype": torch.bfloat16}
    if "qlora" in name:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        kwargs["device_map"] = {"": 0 if cuda else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if "quantization_config" not in kwargs:
        model = model.to("cuda" if cuda else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in open(data)]
    timer = step_timer(cuda)
    args = DPOConfig(output_dir=str(out / "runs" / name.replace(" ", "-")), per_device_train_batch_size=work["batch"],
                     gradient_accumulation_steps=work["accum"], max_steps=work["steps"], learning_rate=1e-5,
                     max_length=work["max_length"], gradient_checkpointing=True, bf16=cuda, use_cpu=not cuda,
                     logging_steps=1, save_strategy="no", report_to="none", dataloader_num_workers=0, seed=0)
    peft = LoraConfig(r=work["lora_r"], lora_alpha=work["lora_r"], target_modules=work["lora_targets"].split(","),
                      task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=peft, callbacks=[timer])
    timer.restart()
    trainer.train()
    return {"s_per_step": statistics.median(timer.times[work["timed_from"]:]), "step_s": timer.times}


def step_timer(cuda: bool):
    """A transformers ``TrainerCallback`` whose ``times`` are the seconds of each optimiser step
    (CUDA synchronised at each step's end); call ``restart()`` just before ``trainer.train()``."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.last = [], time.perf_counter()

        def restart(self):
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            now = time.perf_counter()
            self.times.append(now - self.last)
            self.last = now

    return StepTimer()


def rlxf_grpo(name: str, model_dir: str, data: str, out: Path, work: dict, cuda: bool) -> dict:
    from rlxf.config import build_config
    from rlxf.configs.registry import get_recipe

    entry = get_recipe("grpo")
    values = dict(model=model_dir, dataset="task:arithmetic", lora_r=work["lora_r"], lora_alpha=work["lora_r"],
                  lora_targets=work["lora_targets"], batch_size=work["grpo_prompts"],
                  group_size=work["grpo_group"], max_new_tokens=work["grpo_new_tokens"],
                  max_steps=work["grpo_steps"], gradient_checkpointing=True, log_every=1, eval_every=0,
                  eval_size=32, eval_generate=work["grpo_prompts"], merge_lora=False, progress=False, device="cuda" if cuda else "cpu",
                  engine="static", adapter_sampling="lowrank" if name.endswith("lowrank") else "fold",
                  compile=cuda and name.endswith("compile"),
                  output_dir=str(out / "runs" / name.replace(" ", "-")))
    cfg = build_config(entry.config_class(), values)
    entry.train_fn()(cfg)
    rows = [r for r in _metrics(Path(values["output_dir"]) / "metrics.jsonl") if r.get("split") == "train"]
    rates = [r["sample_tokens_per_s"] for r in rows if "sample_tokens_per_s" in r]
    return {"sample_tokens_per_s": statistics.median(rates[1:] or rates), "sample_tokens_per_s_by_step": rates}


def rlxf_engine(name: str, model_dir: str, data: str, out: Path, work: dict, cuda: bool) -> dict:
    """The static engine alone on the GRPO variants' sampling shape (a LoRA policy, ``grpo_prompts``
    prompts of 9 tokens × ``grpo_group`` samples × ``grpo_new_tokens``, temperature 1), with and
    without the fused q/k/v and gate/up copies (``rlxf grpo lora compile`` measures the compiled
    step). Each: tokens/s of
    3 timed calls after 2 warm-up calls, the memory the engine holds, and a ``torch.profiler`` table
    of one more call (``engine-profile-<setting>.txt``: the kernels by CUDA time)."""
    import torch
    from transformers import AutoTokenizer

    from rlxf.models.loading import load_policy
    from rlxf.models.lora import apply_lora
    from rlxf.rollout import SamplingParams, StaticEngine

    device = "cuda" if cuda else "cpu"
    model = apply_lora(load_policy(model_dir, dtype="bfloat16", device=device), r=work["lora_r"],
                       alpha=work["lora_r"], target_modules=work["lora_targets"].split(","))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tokenizer(f"{10 + i}+{37 * i % 90}=?")["input_ids"][:9] for i in range(work["grpo_prompts"])]
    params = SamplingParams(max_new_tokens=work["grpo_new_tokens"], temperature=1.0, n=work["grpo_group"])
    settings = {}
    for fuse in (True, False):
        for compiled in (False,):
            label = f"{'fused' if fuse else 'unfused'}{', compiled' if compiled else ''}"
            engine = StaticEngine(model, tokenizer, max_batch_size=len(prompts) * params.n, compile=compiled and cuda,
                                  fuse_projections=fuse, adapters="fold")
            base = torch.cuda.memory_allocated() if cuda else 0
            t0 = time.perf_counter()
            for _ in range(2):
                engine.generate(prompts, params)
            warm_s = time.perf_counter() - t0
            rates = []
            for _ in range(3):
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                tokens = engine.generate(prompts, params).num_tokens()
                if cuda:
                    torch.cuda.synchronize()
                rates.append(tokens / (time.perf_counter() - t0))
            held = (torch.cuda.memory_allocated() - base) / 1e9 if cuda else 0.0
            activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
            with torch.profiler.profile(activities=activities) as prof:
                engine.generate(prompts, params)
                if cuda:
                    torch.cuda.synchronize()
            sort = "cuda_time_total" if cuda else "cpu_time_total"
            slug = label.replace(", ", "-")
            (out / f"engine-profile-{slug}.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=30))
            settings[label] = {"tokens_per_s": statistics.median(rates), "tokens_per_s_by_call": rates,
                               "warmup_s": round(warm_s, 1), "engine_holds_gb": round(held, 2)}
            engine.release()
            del engine
            if cuda:
                torch.cuda.empty_cache()
    best = max(settings.values(), key=lambda r: r["tokens_per_s"])
    return {"sample_tokens_per_s": best["tokens_per_s"], "settings": settings}


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _step_times(path: Path) -> list[float]:
    """Seconds of each training step from metrics.jsonl's ``time`` stamps (one train row a step)."""
    stamps = [r["time"] for r in _metrics(path) if r.get("split") == "train"]
    return [b - a for a, b in zip(stamps, stamps[1:])]


def peak_breakdown(snapshot: dict, top: int = 12, marker: str = "/rlxf/") -> dict:
    """What was live at the peak of a ``torch.cuda.memory._snapshot()`` trace, summed by allocation site.

    Replays the trace's ``alloc`` / ``free_requested`` / ``free_completed`` events (a block counts from
    its allocation to its first free event), finds the event at which the most bytes were live and
    groups the blocks live then by the innermost stack frame whose file path holds ``marker`` (else
    the innermost frame). Returns ``{"peak_gb", "live_blocks", "sites": [{"site", "gb", "blocks"}]}``
    with the ``top`` largest sites; memory allocated before the recording began is not in the trace.
    """
    live: dict[int, tuple[int, str]] = {}
    total = best = 0
    at_peak: dict[int, tuple[int, str]] = {}
    for trace in snapshot.get("device_traces", []):
        for event in trace:
            action, addr = event.get("action"), event.get("addr")
            if action == "alloc":
                live[addr] = (event["size"], _site(event.get("frames") or [], marker))
                total += event["size"]
                if total > best:
                    best, at_peak = total, dict(live)
            elif action in ("free_requested", "free_completed") and addr in live:
                total -= live.pop(addr)[0]
    sites: dict[str, list[int]] = {}
    for size, label in at_peak.values():
        entry = sites.setdefault(label, [0, 0])
        entry[0] += size
        entry[1] += 1
    ranked = sorted(sites.items(), key=lambda kv: -kv[1][0])[:top]
    return {"peak_gb": round(best / 1e9, 3), "live_blocks": len(at_peak),
            "sites": [{"site": label, "gb": round(size / 1e9, 3), "blocks": count} for label, (size, count) in ranked]}


def _site(frames: list[dict], marker: str) -> str:
    """``path:line function`` of the innermost frame under ``marker`` (else the innermost frame)."""
    frame = next((f for f in frames if marker in f.get("filename", "")), frames[0] if frames else None)
    if frame is None:
        return "(no stack)"
    path = frame.get("filename", "?")
    path = path[path.find(marker) + 1:] if marker in path else path.rsplit("/", 1)[-1]
    return f"{path}:{frame.get('line')} {frame.get('name')}"


class _memory_history:
    """Record CUDA allocations from the start until ``steps`` optimiser steps ran, then dump ``path``
    and, beside it, the allocation sites live at the peak (:func:`peak_breakdown`, ``*-peak.json``)."""

    def __init__(self, path: Path | None, steps: int):
        self.path, self.steps, self.count = path, steps, 0

    def __enter__(self):
        if self.path is None:
            return self
        import torch

        import rlxf.train.offline as offline

        self.original = offline.clip_and_step
        torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")

        def counted(*args, **kwargs):
            result = self.original(*args, **kwargs)
            self.count += 1
            if self.count == self.steps:
                snapshot = torch.cuda.memory._snapshot()
                with open(self.path, "wb") as f:
                    pickle.dump(snapshot, f)
                peak = peak_breakdown(snapshot)
                self.path.with_name(self.path.stem + "-peak.json").write_text(json.dumps(peak, indent=2))
                torch.cuda.memory._record_memory_history(enabled=None)
            return result

        offline.clip_and_step = counted
        return self

    def __exit__(self, *exc):
        if self.path is not None:
            import rlxf.train.offline as offline

            offline.clip_and_step = self.original
        return False


RUNNERS = {"rlxf dpo": rlxf_preference, "rlxf orpo": rlxf_preference, "trl dpo": trl_dpo, "rlxf grpo": rlxf_grpo,
           "rlxf engine": rlxf_engine}


def child(name: str, model_dir: str, data: str, out: Path, work: dict, cuda: bool) -> dict:
    """Run one variant in this process; returns its figures (peaks over the whole process)."""
    import torch

    runner = next(fn for prefix, fn in RUNNERS.items() if name.startswith(prefix))
    t0 = time.time()
    result = runner(name, model_dir, data, out, work, cuda)
    result["wall_s"] = round(time.time() - t0, 1)
    if cuda:
        result["peak_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        result["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 1e9, 2)
    return result


# -- the parent: set-up, children, tables -----------------------------------------------------------

def missing_for(name: str) -> str | None:
    """Why ``name`` cannot run here (a package that does not import), or None."""
    needs = ["trl", "datasets", "pyarrow"] if name.startswith("trl") else []
    if "qlora" in name:
        needs.append("bitsandbytes")
    missing = [n for n in needs if importlib.util.find_spec(n) is None]
    return f"not installed: {', '.join(missing)}" if missing else None


def write_tables(out: Path, results: dict) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2))
    lines = [f"# Real model sizes ({results['meta'].get('device')}, {results['meta'].get('date')})", "",
             "| variant | s/step | peak allocated GB | peak reserved GB | sampling tok/s | note |",
             "|---|---|---|---|---|---|"]
    for name, r in results["variants"].items():
        cells = [f"{r['s_per_step']:.2f}" if "s_per_step" in r else "",
                 str(r.get("peak_allocated_gb", "")), str(r.get("peak_reserved_gb", "")),
                 f"{r['sample_tokens_per_s']:.0f}" if "sample_tokens_per_s" in r else "",
                 r.get("error", r.get("skipped", ""))[:120]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    base = results["variants"].get("trl dpo peft", {}).get("s_per_step")
    base_q = results["variants"].get("trl dpo peft qlora", {}).get("s_per_step")
    pairs = [(name, base_q if "qlora" in name else base) for name in results["variants"]
             if name.startswith(("rlxf dpo", "rlxf orpo"))]
    for name, ref in pairs:
        mine = results["variants"].get(name, {}).get("s_per_step")
        if mine and ref:
            lines.append(f"\n{name}: {ref / mine:.2f}x the speed of its TRL counterpart")
    engine = results["variants"].get("rlxf engine lora", {}).get("settings")
    if engine:
        lines += ["", "| static engine, LoRA policy folded | tokens/s | memory the engine holds GB | warm-up s |",
                  "|---|---|---|---|"]
        lines += [f"| {label} | {r['tokens_per_s']:.0f} | {r['engine_holds_gb']} | {r['warmup_s']} |"
                  for label, r in engine.items()]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/real_sizes")
    p.add_argument("--model-dir", default=None, help="where the random model is built (reused if present)")
    p.add_argument("--only", default=None, help="regex: run only the variants whose name matches")
    p.add_argument("--deadline", type=float, default=480, help="seconds; later variants are skipped")
    p.add_argument("--quick", action="store_true", help="a small shape and short runs (the wiring)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even with CUDA")
    p.add_argument("--install-only", action="store_true", help="install the carried wheels and stop")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.install_only:
        print("installed:", ensure_wheels() or "nothing (every package imports)")
        return 0
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = dict(WORK, **(dict(pairs=24, prompt_chars=16, completion_chars=24, steps=3, timed_from=1,
                              max_length=64, max_prompt_length=24, grpo_prompts=2, grpo_group=2,
                              grpo_new_tokens=8, grpo_steps=2) if args.quick else {}))
    model_dir = Path(args.model_dir or out / ("model-quick" if args.quick else "llama3-8b-shape"))
    data = out / "pairs.jsonl"
    import torch

    cuda = torch.cuda.is_available() and not args.cpu
    if args.child:
        result = child(args.child, str(model_dir), str(data), out, work, cuda)
        (out / f"child-{args.child.replace(' ', '-')}.json").write_text(json.dumps(result))
        return 0
    t0 = time.time()
    meta = {"device": torch.cuda.get_device_name() if cuda else "cpu", "date": time.strftime("%Y-%m-%d"),
            "torch": torch.__version__, "work": work, "installed_wheels": ensure_wheels(),
            "command": " ".join([sys.executable, *sys.argv])}
    meta.update(build_model_dir(model_dir, SHAPE_QUICK if args.quick else SHAPE_8B, "cuda" if cuda else "cpu"))
    write_pairs(data, work)
    results = {"meta": meta, "variants": {}}
    previous = out / "results.json"
    if previous.exists():   # a second command on the same machine and --out adds its variants to the first's
        earlier = json.loads(previous.read_text())
        if earlier.get("meta", {}).get("device") == meta["device"]:
            results["variants"] = earlier.get("variants", {})
    for name in VARIANTS:
        if args.only and not re.search(args.only, name):
            continue
        why_not = missing_for(name) or (f"deadline {args.deadline:.0f} s reached" if time.time() - t0 > args.deadline
                                        else None)
        results["variants"][name] = {"skipped": why_not} if why_not else _spawn(name, args, out, model_dir)
        write_tables(out, results)
    return 0


def _spawn(name: str, args, out: Path, model_dir: Path) -> dict:
    cmd = [sys.executable, __file__, "--out", str(out), "--model-dir", str(model_dir), "--child", name]
    cmd += ["--quick"] if args.quick else []
    cmd += ["--cpu"] if args.cpu else []
    log = out / f"log-{name.replace(' ', '-')}.txt"
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    result_file = out / f"child-{name.replace(' ', '-')}.json"
    if proc.returncode or not result_file.exists():
        tail = log.read_text().strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: " + " / ".join(tail)}
    result = json.loads(result_file.read_text())
    fallback = [line for line in log.read_text().splitlines() if "falling back to HFEngine" in line]
    if name.startswith("rlxf grpo"):
        result["engine"] = f"HFEngine ({fallback[0].strip()})" if fallback else "StaticEngine"
    return result


if __name__ == "__main__":
    sys.exit(main())
