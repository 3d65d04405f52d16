"""What it costs the rollout engine to get whole weights under ``--fsdp`` (``rlxf.runtime.fsdp.gathered``).

    torchrun --standalone --nproc-per-node 2 benchmarks/fsdp_gather_cpu.py --out DIR

On the CPU (gloo), a random-init Llama shape sharded over the processes like ``--fsdp`` does:
times entering and leaving :func:`~rlxf.runtime.fsdp.gathered` (one all-gather per layer, then
freeing the gathered copies) against one sampling call on the gathered weights (``HFEngine``,
``--rows`` prompts × ``--new`` tokens), and the extra resident memory while gathered. Writes
``results.json`` under ``--out``. CPU timings on a shared machine are indications, not GPU figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from rlxf.rollout import HFEngine, SamplingParams  # noqa: E402
from rlxf.runtime import fsdp  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=103)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlxf.zoo.tokenizer import build_tokenizer

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                         intermediate_size=4 * args.hidden, num_attention_heads=8, num_key_value_heads=8,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    fsdp.shard(model, torch.device("cpu"))
    engine = HFEngine(model, build_tokenizer(), max_batch_size=args.rows)
    prompts = [[1] + [5 + (i * 7 + j) % 90 for j in range(16)] for i in range(args.rows)]
    sampling = SamplingParams(max_new_tokens=args.new, temperature=1.0, n=1, seed=0)
    gather_s, release_s, sample_s, extra_mb = [], [], [], []
    for _ in range(args.repeats):
        dist.barrier()
        rss0 = _rss_mb()
        t0 = time.perf_counter()
        with fsdp.gathered():
            t1 = time.perf_counter()
            extra_mb.append(_rss_mb() - rss0)
            engine.generate(prompts, sampling)
            t2 = time.perf_counter()
        t3 = time.perf_counter()
        gather_s.append(t1 - t0)
        sample_s.append(t2 - t1)
        release_s.append(t3 - t2)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    result = {"processes": dist.get_world_size(), "params": params, "fp32_mb": round(params * 4 / 2**20, 1),
              "gather_s_median": round(med(gather_s), 4), "release_s_median": round(med(release_s), 4),
              "sample_s_median": round(med(sample_s), 4), "rows": args.rows, "new_tokens": args.new,
              "gather_share_of_sampling": round(med(gather_s) / med(sample_s), 4),
              "rss_growth_mb_median": round(med(extra_mb), 1), "threads": torch.get_num_threads(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if dist.get_rank() == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
    dist.destroy_process_group()
    return result


def _rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


if __name__ == "__main__":
    main()
