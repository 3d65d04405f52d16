"""Steps (a)-(c) of a round: sample the label prompts, label the samples (verifier, judge, file, or
humans through a labeling server or database) and flag reward hacking (a high RM score on a sample
the verifier says is wrong)."""

from __future__ import annotations

from pathlib import Path

from rlxf.workflows.cool_rlhf.config import CoolRLHFConfig, is_human_source
from rlxf.workflows.cool_rlhf.data import interleave, label_prompt_rows, read_jsonl, write_jsonl
from rlxf.workflows.cool_rlhf.evaluation import generate, load_rm


def label_samples(cfg, folder: Path, k: int, *, policy_dir: str, rm_dir: str):
    """Sampled label prompts of every domain, verified and scored by the current RM (cached in
    ``round-K/samples.jsonl``, so an interrupted round reuses them)."""
    from rlxf.data.online_labels import SampleGroup
    from rlxf.tasks import get_task

    path = folder / "samples.jsonl"
    if path.is_file():
        return [SampleGroup(**row) for row in read_jsonl(path)]
    rows = interleave([label_prompt_rows(cfg, d, k) for d in cfg.domains])
    texts = generate(cfg, policy_dir, rows, n=cfg.samples_per_prompt, temperature=cfg.temperature,
                     seed=cfg.seed * 1009 + k)
    groups = [SampleGroup(prompt=r["prompt"], domain=r["domain"], answer=r["answer"], reference=r["reference"],
                          texts=t, correct=[get_task(r["domain"]).verify(x, r["answer"]) for x in t])
              for r, t in zip(rows, texts)]
    rm = load_rm(cfg, rm_dir)
    flat_scores = rm([g.prompt for g in groups for _ in g.texts], [x for g in groups for x in g.texts],
                     domain=[g.domain for g in groups for _ in g.texts])
    for i, g in enumerate(groups):
        g.scores = flat_scores[i * cfg.samples_per_prompt:(i + 1) * cfg.samples_per_prompt]
    write_jsonl(path, [g.as_dict() for g in groups])
    return groups


def collect_labels(cfg: CoolRLHFConfig, groups, k: int, data: dict) -> tuple[list[dict], dict]:
    """Round ``k``'s new preference rows from ``cfg.labels`` and their stats."""
    from rlxf.data.online_labels import file_labels, judge_pairs, verifier_pairs

    if cfg.labels == "verifier":
        return verifier_pairs(groups, max_pairs_per_prompt=cfg.max_pairs_per_prompt), {}
    if is_human_source(cfg.labels):
        from rlxf.data.conditions import load_conditions
        from rlxf.workflows.cool_rlhf.human import human_labels

        return human_labels(cfg, groups, k, load_conditions(str(data["conditions"])))
    if cfg.labels == "file":
        from rlxf.data import load_rows

        return file_labels(load_rows(cfg.labels_file, kind="preference"), round_index=k, domains=cfg.domains,
                           where=cfg.labels_file), {}
    from rlxf.data.conditions import load_conditions
    from rlxf.judges import build_judge

    judge = build_judge(cfg.judge, device=cfg.device, prompts=cfg.judge_prompts,
                        cache_dir=str(Path(cfg.output_dir) / "judge_cache"))
    rows, stats = judge_pairs(groups, judge, load_conditions(str(data["conditions"])),
                              max_pairs_per_prompt=cfg.max_pairs_per_prompt, margin=cfg.judge_margin)
    return rows, {f"judge/{key}": value for key, value in stats.items()}


def detect_hacking(cfg, groups) -> tuple[list[list[bool]], dict]:
    """Hacking flags per group and the label samples' stats under the current RM."""
    from rlxf.data.online_labels import hacking_flags, hacking_stats, high_scored

    scores = [s for g in groups for s in g.scores]
    correct = [c for g in groups for c in g.correct]
    high = high_scored(scores, [g.domain for g in groups for _ in g.texts], q=cfg.hack_quantile)
    flags = hacking_flags(high, correct)
    n = cfg.samples_per_prompt
    stats = {f"samples/hack_{key}": v for key, v in hacking_stats(scores, correct, high).items()}
    stats["samples/accuracy"] = sum(bool(c) for c in correct) / len(correct)
    stats["samples/hacked"] = sum(flags)
    return [flags[i * n:(i + 1) * n] for i in range(len(groups))], stats

