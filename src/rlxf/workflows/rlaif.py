"""``rlxf rlaif``: preference labels from an AI judge, then a reward model or DPO/RPO on them.

RLAIF (Lee et al., arXiv 2309.00267) and the RL stage of Constitutional AI (Bai et al., arXiv 2212.08073):

    prompt → the policy samples 2 responses (temperature > 0)
      → principle ~ uniform(principles); p = judge.prefer(prompt, y1, y2, principle)
           (P(y1 better); the judge asks in both orders and averages — position-bias control)
      → orient: chosen = the judge-preferred response, p* = max(p, 1 − p)
      → [drop the pair when |p − 0.5| < δ  (--threshold; 0 keeps every pair)]
    → preferences.jsonl: prompt, chosen, rejected, chosen_score = p*, rejected_score = 1 − p*,
      chosen_probability = p* (soft label), judge_probability = p, principle
    → --train rm: reward model with the soft-label BT loss L_soft (docs/losses.md), or
      --train dpo | rpo: the preference recipe on the file (rpo reads the scores), or none.

Pairs whose two responses are identical, or where one is empty, are dropped before judging (the
judge cannot prefer one of two equal texts); failed judgements (None) are dropped after; both are
counted in stats.json. For a task dataset (or rows with ``answer``) each response is also verified,
and the judge's agreement with the verifier is reported on the pairs where exactly one response is
correct: ``agreement`` (the chosen one is the correct one) and ``agreement_soft`` (mean probability
the judge gave the correct one).

Deviations, stated: DPO trains on the binarised (oriented) pairs; the soft-target DPO variant
(``BCE(β·h, p)``, cDPO with ε = 1 − p*, docs/methods/rlaif.md) is not wired (use ``--threshold`` to keep only
confident pairs). CoT judging and the CAI CoT clamp to [0.4, 0.6] are the judge's business (not
used here).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from rlxf.config import AT_LEAST_ONE, ConfigError, between, build_config, check_choice, option, save_yaml
from rlxf.configs.registry import get_recipe
from rlxf.rewards.lmgt import JUDGE_PROMPT_CHOICES, judge_prompt_set
from rlxf.workflows.ai_feedback import (PolicyChat, SamplingOptions, as_completion, build_judge, load_prompt_rows,
                                      prepare_output, train_values, verifier, write_jsonl)

log = logging.getLogger("rlxf.rlaif")

OUTPUT_FILES = ("preferences.jsonl", "stats.json")
TRAIN_RECIPES = ("rm", "dpo", "rpo")  # recipes of the registry (rlxf.configs.registry) that train on the labels
LABEL_BINS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclass(frozen=True)
class RLAIFConfig(SamplingOptions):
    """Options of ``rlxf rlaif``."""

    judge: str = option("local:tiny", "judge spec: local:PATH (local:tiny = the embedded model) or an "
                        "OpenAI-compatible base URL http://host:port/v1")
    judge_model: str | None = option(None, "model name sent to an HTTP judge")
    judge_api_key_env: str = option("OPENAI_API_KEY", "environment variable holding the HTTP judge's API key")
    judge_concurrency: int = option(4, "most judge requests in flight at once (HTTP)", bounds=AT_LEAST_ONE)
    judge_both_orders: bool = option(True, "ask the judge in both orders and average (position-bias control)")
    judge_cache: bool = option(False, "cache judge requests on disk in OUTPUT/judge_cache")
    judge_prompts: str = option("auto", "judge prompt set: standard, compact (short-context judges), auto = "
                                "compact for local:tiny, else standard", choices=JUDGE_PROMPT_CHOICES)
    principle_in_prompt: bool = option(True, "show the sampled principle's comparison question to the judge "
                                       "(false: the prompt set's own question; the principle is still recorded)")
    threshold: float = option(0.0, "δ: drop pairs with |p − 0.5| < δ (0 keeps every pair; 0.5 keeps none)",
                              bounds=between(0, 0.5))
    output_dir: str = option("runs/rlaif", "where preferences.jsonl, stats.json, config.yaml and the training run go")
    train: str = option("rm", "train on the labels: rm (soft-label Bradley-Terry), dpo, rpo, or none",
                        choices=("rm", "dpo", "rpo", "none"))
    train_eval: str = option("auto", "held-out data of the training run: task = the task's correct-vs-wrong "
                             "eval pairs (ground truth), holdout = a share of preferences.jsonl, auto = task "
                             "for a task dataset", choices=("auto", "task", "holdout"))
    train_config: str | None = option(None, "YAML file of options for the training recipe (model, dataset and "
                                      "output_dir default to the policy, preferences.jsonl and OUTPUT/<recipe>)")

    def __post_init__(self):
        super().__post_init__()
        for name in ("train", "train_eval", "judge_prompts"):
            check_choice(self, name)
        if self.temperature <= 0:
            raise ConfigError(f"--temperature must be > 0: the two responses of a pair are sampled, got "
                              f"{self.temperature}")
        if self.train_eval == "task" and not self.dataset.startswith("task:"):
            raise ConfigError("--train-eval task needs a task: dataset (use holdout for files)")


def label_pairs(judge, prompts: list, first: list[str], second: list[str], principles, *,
                rng: random.Random, show_principle: bool = True) -> tuple[list[float | None], list[str]]:
    """P(first better) per pair from ``judge.prefer`` under a principle drawn per pair, and the names.

    Pairs that drew the same principle are judged in one call; with ``show_principle=False`` the
    judge gets ``principle=None`` (its prompt set's own question).
    """
    picked = [principles[rng.randrange(len(principles))] for _ in prompts]
    probs: list[float | None] = [None] * len(prompts)
    for principle in {p.name: p for p in picked}.values():
        idx = [i for i, p in enumerate(picked) if p.name == principle.name]
        values = judge.prefer([prompts[i] for i in idx], [first[i] for i in idx], [second[i] for i in idx],
                              principle=principle.comparison if show_principle else None)
        if len(values) != len(idx):
            raise ConfigError(f"judge.prefer returned {len(values)} values for {len(idx)} pairs")
        for i, v in zip(idx, values):
            probs[i] = None if v is None or not math.isfinite(float(v)) else min(1.0, max(0.0, float(v)))
    return probs, [p.name for p in picked]


def build_preference_rows(rows: list[dict], first: list[str], second: list[str], probs: list[float | None],
                          principle_names: list[str], *, threshold: float, verify) -> tuple[list[dict], dict]:
    """Oriented preference rows and the label statistics (see the module docstring)."""
    counts = Counter()
    out = []
    for row, a, b, p, name in zip(rows, first, second, probs, principle_names):
        if p is None:
            counts["failed"] += 1
            continue
        if abs(p - 0.5) < threshold:
            counts["below_threshold"] += 1
            continue
        chosen, rejected, p_max = (a, b, p) if p >= 0.5 else (b, a, 1.0 - p)
        prompt = row["prompt"]
        extra = {k: v for k, v in row.items() if k != "prompt" and not k.startswith("_")}
        pair = {"prompt": prompt, "chosen": as_completion(chosen, prompt), "rejected": as_completion(rejected, prompt),
                "chosen_score": p_max, "rejected_score": 1.0 - p_max, "chosen_probability": p_max,
                "judge_probability": p, "principle": name, **extra}
        chosen_ok, rejected_ok = verify(chosen, row), verify(rejected, row)
        if chosen_ok is not None:
            pair["chosen_correct"], pair["rejected_correct"] = chosen_ok, rejected_ok
        out.append(pair)
    return out, dict(counts)


def label_stats(pairs: list[dict]) -> dict:
    """Distribution of the soft labels p* and agreement with the verifier (when rows were verified)."""
    labels = [r["chosen_probability"] for r in pairs]
    stats: dict = {"label_mean": sum(labels) / len(labels) if labels else None,
                   "first_sample_preferred": sum(r["judge_probability"] > 0.5 for r in pairs),
                   "ties": sum(r["judge_probability"] == 0.5 for r in pairs)}
    hist = {}
    for lo, hi in zip(LABEL_BINS, LABEL_BINS[1:]):
        hist[f"[{lo:.1f},{hi:.1f}{']' if hi == 1.0 else ')'}"] = sum(lo <= p < hi or (hi == 1.0 and p == 1.0)
                                                                     for p in labels)
    stats["label_histogram"] = hist
    verified = [r for r in pairs if "chosen_correct" in r]
    if verified:
        decisive = [r for r in verified if r["chosen_correct"] != r["rejected_correct"]]
        stats.update({
            "verified_pairs": len(verified), "both_correct": sum(r["chosen_correct"] and r["rejected_correct"]
                                                                 for r in verified),
            "both_wrong": sum(not r["chosen_correct"] and not r["rejected_correct"] for r in verified),
            "decisive_pairs": len(decisive),
            "agreement": sum(r["chosen_correct"] for r in decisive) / len(decisive) if decisive else None,
            "agreement_soft": (sum(r["chosen_probability"] if r["chosen_correct"] else 1 - r["chosen_probability"]
                                   for r in decisive) / len(decisive)) if decisive else None,
        })
    return stats


def train(cfg: RLAIFConfig) -> dict:
    """Sample, label and write ``preferences.jsonl``; then train (``--train``). Returns the stats."""
    from rlxf.judges.constitution import load_principles, select_principle
    from rlxf.recipes.common import setup_logging

    setup_logging()
    started = time.perf_counter()
    out = Path(cfg.output_dir)
    prepare_output(out, OUTPUT_FILES, overwrite=cfg.overwrite)
    principles = select_principle(load_principles(cfg.principles), cfg.principle)
    rows, task = load_prompt_rows(cfg)
    verify = verifier(task, rows)
    policy = PolicyChat(cfg)
    log.info("rlaif: sampling 2 responses for each of %d prompts from %s", len(rows), cfg.model)
    samples = policy.generate([row["prompt"] for row in rows], n=2)
    counts = Counter()
    keep = []
    for i, (a, b) in enumerate(samples):
        if not a.strip() or not b.strip():
            counts["empty"] += 1
        elif a == b:
            counts["identical"] += 1
        else:
            keep.append(i)
    judge = build_judge(cfg.judge, model=cfg.judge_model, api_key_env=cfg.judge_api_key_env,
                        concurrency=cfg.judge_concurrency, both_orders=cfg.judge_both_orders,
                        cache_dir=str(out / "judge_cache") if cfg.judge_cache else None, device=cfg.device,
                        prompts=judge_prompt_set(cfg.judge, cfg.judge_prompts))
    kept_rows = [rows[i] for i in keep]
    first, second = [samples[i][0] for i in keep], [samples[i][1] for i in keep]
    label_started = time.perf_counter()
    probs, names = label_pairs(judge, [r["prompt"] for r in kept_rows], first, second, principles,
                               rng=random.Random(cfg.seed), show_principle=cfg.principle_in_prompt)
    pairs, label_counts = build_preference_rows(kept_rows, first, second, probs, names, threshold=cfg.threshold,
                                                verify=verify)
    write_jsonl(out / "preferences.jsonl", pairs)
    save_yaml(cfg, out / "config.yaml")
    stats = {"model": cfg.model, "dataset": cfg.dataset, "judge": cfg.judge, "prompts": len(rows),
             "pairs_sampled": len(rows), "identical": counts["identical"], "empty": counts["empty"],
             "judged": len(keep), "failed": label_counts.get("failed", 0),
             "below_threshold": label_counts.get("below_threshold", 0), "threshold": cfg.threshold,
             "pairs": len(pairs), **label_stats(pairs), "principles": dict(Counter(names)),
             "judge_stats": dict(getattr(judge, "stats", {}) or {}),
             "label_seconds": round(time.perf_counter() - label_started, 3)}
    log.info("rlaif: %d pairs written (%d failed judgements, %d identical, %d below threshold); agreement with "
             "the verifier %s on %s decisive pairs", len(pairs), stats["failed"], stats["identical"],
             stats["below_threshold"], stats.get("agreement"), stats.get("decisive_pairs"))
    if cfg.train != "none":
        if not pairs:
            raise ConfigError("rlaif: no preference pairs were produced; nothing to train")
        policy.release()
        stats["train"] = _train_on_pairs(cfg, out)
    stats["seconds"] = round(time.perf_counter() - started, 3)
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def _train_on_pairs(cfg: RLAIFConfig, out: Path) -> dict:
    recipe = get_recipe(cfg.train)
    values = train_values(cfg, out / "preferences.jsonl", out / cfg.train, None)
    use_task = cfg.train_eval == "task" or (cfg.train_eval == "auto" and cfg.dataset.startswith("task:"))
    if use_task:  # held-out ground truth: the task's correct-vs-wrong pairs
        values.update(eval_dataset=cfg.dataset, pair_kind="correctness")
    if cfg.train_config:
        from rlxf.config import load_yaml

        values.update(load_yaml(cfg.train_config))
    train_cfg = build_config(recipe.config_class(), values, where=cfg.train_config or "rlxf rlaif")
    result = recipe.train_fn()(train_cfg)
    return {"recipe": cfg.train, "output_dir": str(result.output_dir),
            **{k: v for k, v in result.summary.items() if "/" in k}}
