"""CPU timing of ``--share-prompt`` (each prompt encoded once for chosen and rejected) vs the plain path.

    python benchmarks/share_prompt_cpu.py [--prompt 256 --completion 64 --pairs 4 --group 2 --steps 3]

A random-init Qwen2-shaped model (hidden 256, 4 layers, vocab 2048), one forward + backward per step
(no optimizer) of ``--pairs`` prompts with ``--group`` completions each: the DPO loss for a group of
2 (chosen, rejected), the summed log-probs otherwise (a GRPO-shaped group). Prints the median step
time of each path and checks they give the same loss.
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
    p.add_argument("--group", type=int, default=2, help="completions per prompt (2 = a DPO pair)")
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args(argv)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rlxf.losses import dpo_loss
    from rlxf.models import sequence_logps, shared_prompt_logps, token_logps

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=2048, hidden_size=256, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=768,
                                         tie_word_embeddings=True, pad_token_id=0))
    n, P, C, G = args.pairs, args.prompt, args.completion, args.group
    prompts = torch.randint(3, 2048, (n, P))
    completions = torch.randint(3, 2048, (n * G, C))                                     # grouped by prompt
    full = torch.cat([prompts.repeat_interleave(G, 0), completions], 1)                   # [nG, P+C]
    labels = torch.zeros(n * G, P + C - 1, dtype=torch.long)
    labels[:, P - 1:] = 1
    ref = torch.zeros(n)

    def loss_of(seq):  # seq [nG] in group order
        if G == 2:
            return dpo_loss(seq[0::2], seq[1::2], ref, ref, beta=0.1).mean()
        return -seq.mean()

    def plain():
        return loss_of(sequence_logps(token_logps(model, full, torch.ones_like(full), label_mask=labels), labels))

    def shared():
        ones = torch.ones_like(completions)
        return loss_of(sequence_logps(shared_prompt_logps(model, prompts, torch.ones_like(prompts), completions,
                                                          ones), ones))

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
    tokens_plain, tokens_shared = n * G * (P + C), n * P + n * G * C
    for name, (t, loss) in results.items():
        print(f"{name:14s} {1e3 * t:8.1f} ms/step  loss {loss:.6f}")
    print(f"speed-up {results['plain'][0] / results['shared prompt'][0]:.2f}x; tokens through the body "
          f"{tokens_plain} -> {tokens_shared} ({tokens_shared / tokens_plain:.0%}); torch threads {torch.get_num_threads()}")
    assert abs(results["plain"][1] - results["shared prompt"][1]) < 1e-4 * max(1.0, abs(results["plain"][1]))


if __name__ == "__main__":
    main()
