"""CPU timing of ``--share-prompt`` (each prompt encoded once for chosen and rejected) vs the plain path.

    python benchmarks/share_prompt_cpu.py [--prompt 256 --completion 64 --pairs 4 --steps 3]

A random-init Qwen2-shaped model (hidden 256, 4 layers, vocab 2048), one DPO forward + backward per
step (no optimizer); prints the median step time of each path and checks they give the same loss.
The GPU figure comes from ``benchmarks/vs_trl.py`` (variant ``dpo/rlxf --share-prompt``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--completion", type=int, default=64)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args(argv)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rlxf.losses import dpo_loss
    from rlxf.models import sequence_logps, shared_prompt_logps, token_logps

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=2048, hidden_size=256, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=768,
                                         tie_word_embeddings=True, pad_token_id=0))
    n, P, C = args.pairs, args.prompt, args.completion
    prompts = torch.randint(3, 2048, (n, P))
    chosen, rejected = torch.randint(3, 2048, (n, C)), torch.randint(3, 2048, (n, C))
    full = torch.cat([torch.cat([prompts, chosen], 1), torch.cat([prompts, rejected], 1)])   # [2n, P+C]
    labels = torch.zeros(2 * n, P + C - 1, dtype=torch.long)
    labels[:, P - 1:] = 1
    pairs = torch.stack([chosen, rejected], 1).flatten(0, 1)                                  # [2n, C]
    ref = torch.zeros(n)

    def plain():
        seq = sequence_logps(token_logps(model, full, torch.ones_like(full), label_mask=labels), labels)
        return dpo_loss(seq[:n], seq[n:], ref, ref, beta=0.1).mean()

    def shared():
        ones = torch.ones_like(pairs)
        seq = sequence_logps(shared_prompt_logps(model, prompts, torch.ones_like(prompts), pairs, ones), ones)
        return dpo_loss(seq[0::2], seq[1::2], ref, ref, beta=0.1).mean()

    results = {}
    for name, fn in (("plain", plain), ("shared prompt", shared)):
        times, loss = [], None
        for i in range(args.steps + 1):
            t0 = time.perf_counter()
            loss = fn()
            loss.backward()
            model.zero_grad(set_to_none=True)
            if i:
                times.append(time.perf_counter() - t0)
        results[name] = (statistics.median(times), float(loss))
    tokens_plain, tokens_shared = 2 * n * (P + C), n * P + 2 * n * C
    for name, (t, loss) in results.items():
        print(f"{name:14s} {1e3 * t:8.1f} ms/step  loss {loss:.6f}")
    print(f"speed-up {results['plain'][0] / results['shared prompt'][0]:.2f}x; tokens through the body "
          f"{tokens_plain} -> {tokens_shared} ({tokens_shared / tokens_plain:.0%}); torch threads {torch.get_num_threads()}")
    assert abs(results["plain"][1] - results["shared prompt"][1]) < 1e-4


if __name__ == "__main__":
    main()
