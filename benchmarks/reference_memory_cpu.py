"""Peak memory of the DPO reference pass on the CPU: batches bounded by pairs only vs by tokens.

A mid-size random Llama (hidden 256, MLP 896, 2 layers, vocab 4096) with LoRA r = 16 computes the
reference log-probs of 32 pairs of 256 + 700 tokens through ``rlxf.recipes.preference.
precompute_reference``, once with a training micro-batch of 64 pairs (so the token bound allows 64
pairs a pass, as ``--eval-batch-size 64`` alone did) and once with 2 pairs (the Llama-3-8B
benchmark's micro-batch: 2 pairs a pass). Each runs in its own process; the figure is how much the
process's peak resident memory grew during the pass (Linux ``ru_maxrss``).

    python benchmarks/reference_memory_cpu.py --out /tmp/refmem
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def measure(batch: int) -> float:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlxf.configs.preference import PreferenceConfig
    from rlxf.models import Reference, apply_lora
    from rlxf.recipes.preference import precompute_reference

    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = LlamaConfig(hidden_size=256, intermediate_size=896, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=4096, max_position_embeddings=2048)
    model = apply_lora(LlamaForCausalLM(config), r=16)
    g = torch.Generator().manual_seed(0)
    examples = [{"prompt_ids": torch.randint(3, 4096, (256,), generator=g).tolist(),
                 "chosen_ids": torch.randint(3, 4096, (700,), generator=g).tolist(),
                 "rejected_ids": torch.randint(3, 4096, (700,), generator=g).tolist()} for _ in range(32)]
    cfg = PreferenceConfig(batch_size=batch, max_length=1100, max_prompt_length=300, eval_batch_size=64, lora_r=16)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    precompute_reference(cfg, Reference.build(model, "lora"), examples, 0, Path(tempfile.mkdtemp()),
                         torch.device("cpu"))
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024   # KiB -> MiB


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/reference_memory_cpu")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps({"peak_rss_growth_mib": round(measure(args.child), 1)}))
        return 0
    results = {}
    for batch in (64, 2):
        out = subprocess.run([sys.executable, __file__, "--child", str(batch)], capture_output=True, text=True,
                             check=True).stdout.strip().splitlines()[-1]
        results[f"{batch} pairs a pass"] = json.loads(out)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
