"""Multi-turn tool-use rollouts: ``HFEngine`` vs ``StaticEngine`` (docs/methods/tools.md).

    python benchmarks/tools_engines.py --out DIR [--cpu] [--quick] [--rows 64 --group 8 --turns 3]

A random-init Qwen2-shaped model (hidden 896, 24 layers, vocab 151936: the Qwen2.5-0.5B shape; a
small one with ``--quick``) and the character tokenizer's chat template, so no download is needed.
An environment answers every finished turn with a fixed observation until ``--turns`` turns, so
every episode has the same structure whatever the random model writes; a turn ends on EOS or on one
of ~30 frequent ids (so random weights give turns of a realistic length). For each engine: wall
seconds per call of ``--rows × --group`` episodes (median of ``--repeats`` after one warm-up call),
episodes/s and model tokens/s, and whether both engines give the same greedy transcripts. Writes
``DIR/results.json`` and ``DIR/results.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402


class Answer:
    """Answers every turn with a fixed observation; done after ``turns`` turns."""

    turns = 3

    def __init__(self):
        self.k = 0

    def reset(self, row):
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, turn):
        self.k += 1
        return "result: 287663", 0.0, self.k >= self.turns


def build(quick: bool, device: torch.device):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rlxf.zoo.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    shape = (dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=256) if quick else
             dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                  intermediate_size=4864))
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), max_position_embeddings=1024,
                                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                         **shape))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return model.to(device=device, dtype=dtype).eval(), tokenizer


def run_engine(name, model, tokenizer, rows, params, repeats, turns, max_episode_tokens):
    from rlxf.rollout import HFEngine, StaticEngine
    from rlxf.rollout.multiturn import EnvRollout

    engine_cls = {"HFEngine": HFEngine, "StaticEngine": StaticEngine}[name]
    engine = engine_cls(model, tokenizer, eos_token_ids=tuple(range(2, 36)), max_batch_size=len(rows) * params.n)
    Answer.turns = turns
    runner = EnvRollout(engine, tokenizer, Answer, max_turns=turns, max_episode_tokens=max_episode_tokens)
    runner.generate_episodes(rows, params)            # warm-up: compilation, graph capture
    seconds, episodes = [], None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        episodes = runner.generate_episodes(rows, params)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
    median = statistics.median(seconds)
    n = len(episodes.turns)
    return {"seconds": median, "episodes_per_s": n / median,
            "model_tokens_per_s": episodes.rollouts.num_tokens() / median,
            "turns": sum(episodes.turns) / n, "tool_calls": sum(episodes.tool_calls) / n}, episodes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="directory for results.json and results.md")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is available")
    p.add_argument("--quick", action="store_true", help="a small model and batch (a CPU smoke run)")
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    from rlxf.rollout import SamplingParams

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    rows_n, group = (2, 2) if args.quick else (args.rows, args.group)
    model, tokenizer = build(args.quick, device)
    rows = [{"prompt": f"{100 + i}*{900 - i}=?"} for i in range(rows_n)]
    max_episode_tokens = args.turns * (args.max_new_tokens + 32)
    results = {"meta": {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                        "torch": torch.__version__, "weights": "random-init Qwen2 shape",
                        "rows": rows_n, "group": group, "turns": args.turns, "max_new_tokens": args.max_new_tokens}}
    transcripts = {}
    for temperature, label in ((1.0, "sampled"), (0.0, "greedy")):
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=temperature,
                                n=group if temperature else 1, seed=0 if temperature else None)
        for name in ("HFEngine", "StaticEngine"):
            row, episodes = run_engine(name, model, tokenizer, rows, params, 1 if args.quick else args.repeats,
                                       args.turns, max_episode_tokens)
            results.setdefault(label, {})[name] = row
            if label == "greedy":
                transcripts[name] = episodes.transcripts
    results["greedy_transcripts_equal"] = transcripts["HFEngine"] == transcripts["StaticEngine"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    lines = [f"# Multi-turn rollouts ({results['meta']['device']}, torch {torch.__version__})", "",
             "| decoding | engine | s / call | episodes/s | model tokens/s | turns | tool calls |", "|---|---|---|---|---|---|---|"]
    for label in ("sampled", "greedy"):
        for name, row in results[label].items():
            lines.append(f"| {label} | {name} | {row['seconds']:.3f} | {row['episodes_per_s']:.1f} | "
                         f"{row['model_tokens_per_s']:.0f} | {row['turns']:.2f} | {row['tool_calls']:.2f} |")
    lines += ["", f"greedy transcripts equal: {results['greedy_transcripts_equal']}"]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
