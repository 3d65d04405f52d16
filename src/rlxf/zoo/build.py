"""Build the embedded tiny model from scratch: ``rlxf zoo build [--output DIR]``.

The model is a 4-layer Llama (hidden 128, 4 heads, ~0.87M parameters) with the character tokenizer of
:mod:`rlxf.zoo.tokenizer`. It is pre-trained with a plain next-token loss on completions of the
built-in tasks (``arithmetic`` and ``sorting``): mostly concise worked solutions, some verbose ones,
some wrapped in the chat template, so it speaks every format rlxf's tasks use. Training stops early
on purpose: the model is imperfect at arithmetic (greedy held-out accuracy well below 100%), which
leaves headroom for preference and RL training to show a gain.

Everything is seeded; on the same hardware and torch version the build is bit-for-bit repeatable
(CPU, fixed thread count). The build takes a few minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rlxf.tasks.accuracy import task_accuracy
from rlxf.tasks import get_task
from rlxf.zoo.tokenizer import build_tokenizer


@dataclass(frozen=True)
class BuildConfig:
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    max_positions: int = 256
    steps: int = 5700
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.01
    verbose_fraction: float = 0.15
    chat_fraction: float = 0.2
    tasks: tuple = ("arithmetic", "sorting")
    rows_per_task: int = 60000
    eval_every: int = 300
    seed: int = 0
    threads: int = 2


def _examples(cfg: BuildConfig, tokenizer, rng: random.Random):
    examples = []
    for name in cfg.tasks:
        task = get_task(name)
        for row in task.sft_rows("train", cfg.rows_per_task, seed=cfg.seed, verbose_fraction=cfg.verbose_fraction):
            if rng.random() < cfg.chat_fraction:
                prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"].strip()}],
                                                           tokenize=True, add_generation_prompt=True)
                if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "keys"):
                    prompt_ids = prompt_ids["input_ids"]
                completion = row["completion"].lstrip()
            else:
                prompt_ids = tokenizer(row["prompt"])["input_ids"]
                completion = row["completion"]
            completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            examples.append((list(prompt_ids), completion_ids))
    rng.shuffle(examples)
    # length bucketing: sort within pools of 32 batches, then shuffle the batches (less padding)
    pool = 32 * cfg.batch_size
    batches = []
    for start in range(0, len(examples) - pool + 1, pool):
        chunk = sorted(examples[start:start + pool], key=lambda e: len(e[0]) + len(e[1]))
        batches += [chunk[i:i + cfg.batch_size] for i in range(0, pool, cfg.batch_size)]
    rng.shuffle(batches)
    return batches


def _batch(examples, pad_id):
    width = max(len(p) + len(c) for p, c in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (p, c) in enumerate(examples):
        seq = p + c
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, len(p): len(seq)] = torch.tensor(c)
        mask[i, : len(seq)] = 1
    return ids, mask, labels


def build(output: Path, cfg: BuildConfig = BuildConfig(), log=print, snapshots: Path | None = None) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = random.Random(cfg.seed)
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_positions, tie_word_embeddings=True, rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"tiny model: {n_params / 1e6:.2f}M parameters")
    batches = _examples(cfg, tokenizer, rng)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))

    # constant after warm-up: the model after k steps does not depend on the total step count,
    # so one long run shows which length gives the intended (imperfect) accuracy
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / cfg.warmup))
    t0 = time.time()
    model.train()
    for step in range(cfg.steps):
        ids, mask, labels = _batch(batches[step % len(batches)], tokenizer.pad_token_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == cfg.steps - 1:
            log(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - t0:.0f}s")
        if snapshots is not None and (step + 1) % cfg.eval_every == 0:
            acc = {name: task_accuracy(model, tokenizer, name, n=200) for name in cfg.tasks}
            log(f"step {step + 1}: greedy held-out accuracy {acc}")
            model.save_pretrained(snapshots / f"step-{step + 1}", safe_serialization=True)
            model.train()
    accuracy = {name: task_accuracy(model, tokenizer, name, n=200) for name in cfg.tasks}
    log(f"greedy held-out accuracy: {accuracy}")
    output.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)
    info = {"parameters": n_params, "build_config": asdict(cfg), "greedy_eval_accuracy": accuracy,
            "build_seconds": round(time.time() - t0, 1), "torch": torch.__version__}
    (output / "build_info.json").write_text(json.dumps(info, indent=2))
    return info


def main(argv=None):
    parser = argparse.ArgumentParser(prog="rlxf zoo build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "tiny",
                        help="where to write the model (default: the package's shipped tiny/ directory)")
    parser.add_argument("--steps", type=int, default=BuildConfig.steps, help="pre-training steps")
    args = parser.parse_args(argv)
    build(args.output, BuildConfig(steps=args.steps))


if __name__ == "__main__":
    main()
