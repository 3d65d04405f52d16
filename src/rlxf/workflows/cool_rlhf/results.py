"""The loop's record: ``rounds.jsonl``, ``metrics.jsonl``, ``summary.json`` and the report."""

from __future__ import annotations

from pathlib import Path

from rlxf.config import to_dict
from rlxf.workflows.cool_rlhf.config import ROUNDS_FILE, CoolRLHFConfig, is_human_source
from rlxf.workflows.cool_rlhf.data import write_jsonl


def write_results(cfg: CoolRLHFConfig, out: Path, records: list[dict], *, report: bool = True) -> dict:
    """``rounds.jsonl``, ``metrics.jsonl`` (one eval row per round), ``summary.json`` and (``report``)
    ``report.html``/``report.png``."""
    from rlxf.reporting import MetricsLogger, Panel, write_report, write_summary

    write_jsonl(out / ROUNDS_FILE, records)
    with MetricsLogger(out) as metrics:
        for record in records:
            metrics.log(record["round"], {k: v for k, v in record.items()
                                          if k != "round" and (v is None or isinstance(v, (int, float)))}, split="eval")
    first, last = records[0], records[-1]
    headline = ("rm_accuracy", "policy_accuracy", "rm_reward", "hack/fraction",
                *(f"{m}/{d}" for m in ("rm_accuracy", "policy_accuracy") for d in cfg.domains))
    summary = {"recipe": "cool-rlhf", "model": cfg.model, "domains": cfg.domains, "labels": cfg.labels,
               "rounds_done": len(records) - 1,
               **{f"start/{m}": first.get(m) for m in headline}, **{f"final/{m}": last.get(m) for m in headline},
               "rounds": records, "final_rm": last["rm_dir"], "final_policy": last["policy_dir"],
               "seconds": round(sum(r.get("seconds", 0.0) for r in records), 1)}
    write_summary(out, summary)
    if not report:
        return summary
    d = cfg.domains
    panels = [Panel("RM held-out pairwise accuracy", ["rm_accuracy", *(f"rm_accuracy/{x}" for x in d)],
                    ylabel="accuracy"),
              Panel("RM accuracy on correctness pairs", [f"rm_accuracy/{x}/correctness" for x in d], ylabel="accuracy"),
              Panel("policy verifier accuracy (greedy, held-out)",
                    ["policy_accuracy", *(f"policy_accuracy/{x}" for x in d)], ylabel="accuracy"),
              Panel("policy mean RM reward (the round's RM)", ["rm_reward", *(f"rm_reward/{x}" for x in d)]),
              Panel("hacking: high RM score but wrong", ["hack/fraction", "hack/top_wrong_rate", "hack/wrong_rate"],
                    ylabel="fraction"),
              Panel("RM-reward rise vs accuracy change", ["delta/rm_reward", "delta/accuracy"])]
    if is_human_source(cfg.labels):
        panels += [Panel("human labels per round", ["human/items", "human/complete", "human/labels"], ylabel="count"),
                   Panel("human agreement (Krippendorff's alpha, nominal)", ["human/alpha"], ylabel="alpha")]
    write_report(out, title=f"rlxf cool-rlhf: {cfg.model} on {', '.join(d)} (x axis: round)", panels=panels,
                 summary={k: v for k, v in summary.items() if k != "rounds"}, config=to_dict(cfg))
    return summary

