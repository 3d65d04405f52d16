"""Probe: does splitting the decode batch over concurrent CUDA streams shorten a step?

Replays the captured 8-step greedy graph of ``StaticEngine(compile=True)`` for the benchmark's
decode shape (Qwen2.5-0.5B, random init, batch 128, 64-token prompts) as one 128-row graph and as
one graph of 128/k rows (ms per token step each), and checks that k engines of 128/k rows give the
128-row engine's tokens. On the H100 (docs/performance.md, session 6) 64 rows cost 89% of 128:
the step is set by the weight reads, so a split cannot pay. ``--concurrent`` also replays the k
graphs back to back (one stream, then k streams): that hung the H100 every time it was tried (two
engines' graphs queued back to back without a synchronisation between them; not understood), so
it is off by default and wants ``--watchdog``.

    python benchmarks/stream_probe.py --out runs/streams --splits 2 --fuse 1 --replays 10
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

import vs_trl as V  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/streams")
    p.add_argument("--replays", type=int, default=20)
    p.add_argument("--splits", default="2,4", help="comma-separated stream counts")
    p.add_argument("--fuse", default="1,0", help="comma-separated: 1 fused projections, 0 unfused")
    p.add_argument("--concurrent", action="store_true", help="also time the parts back to back (hung on the H100)")
    p.add_argument("--diagnose", action="store_true", help="replay the parts one at a time, synchronised")
    p.add_argument("--watchdog", type=float, default=0, help="seconds; dump every thread's stack and exit")
    args = p.parse_args()
    if args.watchdog:
        import faulthandler

        faulthandler.dump_traceback_later(args.watchdog, exit=True)
    from rlxf.rollout import SamplingParams, StaticEngine

    for name in ("cache_size_limit", "recompile_limit"):   # one compiled step per engine and batch
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    b = V.Bench(SimpleNamespace(quick=False, cpu=False, out=args.out, deadline=1e9, match=None))
    model = b.build_model()
    vocab = b.cfg["model"]["vocab_size"]
    prompts = V.decode_prompts(b, 128, 64)
    params = SamplingParams(max_new_tokens=256, temperature=0.0)
    results = {}

    def graph_of(rows, fuse):
        eng = StaticEngine(model, b.tokenizer, compile=True, max_batch_size=len(rows), fuse_projections=fuse,
                           eos_token_ids=[vocab], pad_token_id=0)
        out = eng.generate(rows, params)
        print(f"  [{time.time() - t_start:.0f} s] engine for {len(rows)} rows, fuse={fuse} ready", flush=True)
        state = next(iter(eng._states.values()))
        return eng, state, state.loop_graphs["greedyx8"], out

    def reset(states):
        for s in states:
            s.slot.fill_(64)
            s.positions.fill_(64)
            s.step_index.zero_()

    def time_split(parts, streams):
        """ms per token step; every round (8 steps of each part) ends with a device synchronisation:
        unsynchronised alternating replays of two engines' graphs on one stream hung on the H100
        (2026-11-26, not understood; alternating ``generate`` calls and synchronised replays ran right)."""
        states = [s for _, s, _, _ in parts]
        graphs = [g for _, _, g, _ in parts]
        times = []
        for _ in range(3):
            reset(states)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.replays):
                for g, st in zip(graphs, streams):
                    st.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(st):
                        g.replay()
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) / (args.replays * 8) * 1e3)
        return sorted(times)[1]

    t_start = time.time()
    for fuse in [bool(int(f)) for f in args.fuse.split(",")]:
        full = [graph_of(prompts, fuse)]
        ref = full[0][3].completion_ids
        base = time_split(full, [torch.cuda.current_stream()])
        results[f"fuse={fuse} 1x128"] = base
        print(f"fuse={fuse} 1x128: {base:.3f} ms/step", flush=True)
        for k in [int(k) for k in args.splits.split(",")]:
            n = 128 // k
            parts = [graph_of(prompts[i * n:(i + 1) * n], fuse) for i in range(k)]
            print("  parts ready", flush=True)
            same = all(torch.equal(parts[i][3].completion_ids, ref[i * n:(i + 1) * n]) for i in range(k))
            print(f"  same tokens: {same}", flush=True)
            if args.diagnose:
                gen = [e.generate(prompts[i * n:(i + 1) * n], params).completion_ids for i, (e, _, _, _) in
                       enumerate(parts)]
                gen += [parts[0][0].generate(prompts[:n], params).completion_ids]
                print(f"  alternating generate calls: same tokens "
                      f"{[torch.equal(g, ref[(i % k) * n:(i % k + 1) * n]) for i, g in enumerate(gen)]}", flush=True)
                reset([s for _, s, _, _ in parts])
                for r in range(3):
                    for i, (_, st, g, _) in enumerate(parts):
                        g.replay()
                        torch.cuda.synchronize()
                        print(f"  replay {r} part {i}: slot {[int(x.slot) for _, x, _, _ in parts]} step "
                              f"{[int(x.step_index) for _, x, _, _ in parts]}", flush=True)
            one = time_split(parts[:1], [torch.cuda.current_stream()])
            print(f"  one part: {one:.3f}", flush=True)
            rec = results[f"fuse={fuse} {k}x{n}"] = dict(one_part=one, one_part_share=one / base, same_tokens=same)
            if args.concurrent:
                rec["sequential"] = time_split(parts, [torch.cuda.current_stream()] * k)
                rec["concurrent"] = time_split(parts, [torch.cuda.Stream() for _ in range(k)])
                rec["speedup_vs_1x128"] = base / rec["concurrent"]
            print(f"fuse={fuse} {k}x{n}: {rec}", flush=True)
            del parts
        del full
        torch.cuda.empty_cache()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "streams.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
