"""How well does a judge agree with the arithmetic task's ground-truth preferences? (docs/judges.md)

Labels held-out preference pairs of the built-in arithmetic task (``chosen`` is correct and/or
more concise than ``rejected``) with one or more judges and reports, overall and per pair kind:

- agreement with the ground truth (P(chosen ≻ rejected) > 0.5; exactly 0.5 counts as a miss)
  when the chosen answer is always shown first, always second, and with both-orders averaging;
- the position bias: mean probability the judge gives the answer shown first (0.5 = none);
- failures (None judgements) and wall time.

The single-order runs are asked first and cached; the both-orders run then needs no new calls.

    python examples/judge_agreement.py                      # local:tiny, and HTTP against an in-process
                                                            # `rlxf serve --model tiny` on loopback
    python examples/judge_agreement.py --judge http://127.0.0.1:8000/v1   # any running server
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from statistics import mean

import torch

from rlxf.judges import Judge
from rlxf.judges.http import HTTPBackend
from rlxf.judges.local import LocalBackend
from rlxf.tasks import get_task

SERVE = "serve:tiny"  # start `rlxf serve` in this process and judge over HTTP


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--judge", action="append", help=f"local:PATH, an http(s) URL, or {SERVE!r} "
                        f"(repeatable; default: local:tiny and {SERVE})")
    parser.add_argument("--pairs", type=int, default=256, help="held-out pairs (default 256)")
    parser.add_argument("--kind", default="mixed", help="pair kind: mixed, correctness, conciseness")
    parser.add_argument("--prompts", default="compact", help="judge prompt set: compact (default) or standard")
    parser.add_argument("--device", default="cpu", help="device of local judges and the in-process server")
    parser.add_argument("--top-logprobs", type=int, default=20, help="first-token alternatives an HTTP judge "
                        "reads (default 20, the OpenAI limit; the in-process server allows as many)")
    parser.add_argument("--concurrency", type=int, default=4, help="parallel HTTP requests")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--output", help="write the results as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    rows = get_task("arithmetic").preference_rows("eval", args.pairs, kind=args.kind)
    results = {}
    for spec in args.judge or ["local:tiny", SERVE]:
        backend, server = _backend(spec, args)
        try:
            results[spec] = measure(backend, rows, prompts=args.prompts)
        finally:
            if server is not None:
                server.shutdown()
                server.server_close()
        _print(spec, results[spec])
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"pairs": args.pairs, "kind": args.kind, "prompts": args.prompts, "results": results}, f,
                      indent=2)
    return results


def measure(backend, rows: list[dict], *, prompts: str) -> dict:
    """Agreement and position bias of ``backend`` as a judge on preference ``rows``."""
    prompt, chosen, rejected = ([r[k] for r in rows] for k in ("prompt", "chosen", "rejected"))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache:
        single = Judge(backend, both_orders=False, cache_dir=cache, prompts=prompts)
        chosen_first = single.prefer(prompt, chosen, rejected)         # P(chosen ≻ rejected), chosen shown first
        rejected_first = single.prefer(prompt, rejected, chosen)       # P(rejected ≻ chosen), chosen shown second
        both = Judge(backend, both_orders=True, cache_dir=cache, prompts=prompts)
        averaged = both.prefer(prompt, chosen, rejected)
    seconds = time.perf_counter() - start
    chosen_second = [None if p is None else 1.0 - p for p in rejected_first]
    groups = {"all": list(range(len(rows)))}
    for i, row in enumerate(rows):
        groups.setdefault(row["pair_kind"], []).append(i)
    table = {}
    for name, idx in groups.items():
        table[name] = {
            "pairs": len(idx),
            "agree_chosen_first": _agreement(chosen_first, idx),
            "agree_chosen_second": _agreement(chosen_second, idx),
            "agree_both_orders": _agreement(averaged, idx),
            "ties_both_orders": sum(averaged[i] == 0.5 for i in idx),
            "mean_p_chosen_both_orders": _mean(averaged, idx),
            "p_first_position": _mean([*chosen_first, *rejected_first],
                                      idx + [len(rows) + i for i in idx]),
        }
    return {"table": table, "failures": {"chosen_first": sum(p is None for p in chosen_first),
                                         "chosen_second": sum(p is None for p in rejected_first),
                                         "both_orders": sum(p is None for p in averaged)},
            "both_orders_stats": both.stats, "seconds": round(seconds, 2)}


def _agreement(probs: list[float | None], idx: list[int]) -> float | None:
    values = [probs[i] > 0.5 for i in idx if probs[i] is not None]
    return round(mean(values), 4) if values else None


def _mean(probs: list[float | None], idx: list[int]) -> float | None:
    values = [probs[i] for i in idx if probs[i] is not None]
    return round(mean(values), 4) if values else None


def _backend(spec: str, args):
    if spec == SERVE:
        from rlxf.serve import make_server

        server, _ = make_server("tiny", "127.0.0.1", 0, device=args.device,
                                max_top_logprobs=max(20, args.top_logprobs))
        return HTTPBackend(server.base_url, concurrency=args.concurrency, top_logprobs=args.top_logprobs), server
    if spec.startswith("local:"):
        return LocalBackend.from_pretrained(spec[len("local:"):], device=args.device), None
    return HTTPBackend(spec, concurrency=args.concurrency, top_logprobs=args.top_logprobs), None


def _print(spec: str, result: dict) -> None:
    print(f"\n## {spec}  ({result['seconds']} s, failures {result['failures']})\n")
    print("| pairs | n | agree (chosen first) | agree (chosen second) | agree (both orders) | ties | "
          "mean P(chosen) | mean P(first position) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in result["table"].items():
        print(f"| {name} | {r['pairs']} | {r['agree_chosen_first']} | {r['agree_chosen_second']} | "
              f"{r['agree_both_orders']} | {r['ties_both_orders']} | {r['mean_p_chosen_both_orders']} | "
              f"{r['p_first_position']} |")
    stats = result["both_orders_stats"]
    print(f"\nboth-orders judge stats: calls {stats['calls']}, cache hits {stats['cache_hits']}, failures "
          f"{stats['failures']}, p_first_before {stats['p_first_before']}, p_first_after {stats['p_first_after']}")


if __name__ == "__main__":
    main()
