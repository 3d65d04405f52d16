"""``rlxf cai-sft``: Constitutional AI's supervised stage — critique, revise, fine-tune on the revisions.

SL-CAI (Bai et al., arXiv 2212.08073; docs/methods/rlaif.md), one prompt at a time, batched:

    prompt → the policy's answer
      → [round r = 1..rounds]  principle ~ uniform(principles)
           critique request (the principle's)  → critique
           revision request (the same principle's) → revision   (the new answer)
    → cai_sft.jsonl row: prompt, completion = the final revision, the whole chain for inspection
    → unless --generate-only: ``rlxf sft`` on cai_sft.jsonl (rlxf.recipes.sft.train)

The policy writes its own critiques and revisions (the paper's setting) through
:class:`rlxf.workflows.ai_feedback.PolicyChat`; with ``--critic SPEC`` a judge's chat model writes
them instead (distillation from a stronger model; ``rlxf.judges.build_judge(SPEC).backend.chat``).

Deviations, stated: no few-shot critique/revision examples in the context (the paper uses 5); each
round sees the prompt and the latest answer only, not the earlier rounds' critiques (short contexts
for small models); the SFT mix of helpfulness samples the paper adds is left to the user (append
rows to cai_sft.jsonl, or pass ``--sft-config`` with another dataset). A revision that comes back
empty keeps the previous answer (counted in ``revisions_empty``).

With the embedded tiny model the critiques are gibberish: it was trained on arithmetic only. The
pipeline is real and tested; the quality of critiques and revisions comes from the model.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from rlxf.config import AT_LEAST_ONE, ConfigError, build_config, option, save_yaml
from rlxf.workflows.ai_feedback import (PolicyChat, SamplingOptions, as_completion, build_judge, load_prompt_rows,
                                      prepare_output, train_values, user_turn, verifier, write_jsonl)

log = logging.getLogger("rlxf.cai")

OUTPUT_FILES = ("cai_sft.jsonl", "stats.json")


@dataclass(frozen=True)
class CAISFTConfig(SamplingOptions):
    """Options of ``rlxf cai-sft``."""

    rounds: int = option(1, "critique → revision rounds per prompt (the paper studies up to 4)", bounds=AT_LEAST_ONE)
    critic: str | None = option(None, "judge spec (local:PATH or http://host:port/v1) whose chat model writes "
                                "the critiques and revisions instead of the policy")
    critic_model: str | None = option(None, "model name sent to an HTTP --critic")
    output_dir: str = option("runs/cai_sft", "where cai_sft.jsonl, stats.json, config.yaml and the SFT run (sft/) go")
    generate_only: bool = option(False, "write cai_sft.jsonl and stop (no SFT)")
    sft_config: str | None = option(None, "YAML file of `rlxf sft` options for the SFT run (model, dataset and "
                                    "output_dir default to the policy, cai_sft.jsonl and OUTPUT/sft)")

    def __post_init__(self):
        super().__post_init__()


class _Writer:
    """Who writes critiques and revisions: the policy (batched) or a critic's ChatBackend."""

    def __init__(self, cfg: CAISFTConfig, policy: PolicyChat):
        self.cfg, self.policy, self.failed = cfg, policy, 0
        self.backend = None
        if cfg.critic is not None:
            self.backend = build_judge(cfg.critic, model=cfg.critic_model, device=cfg.device).backend

    def __call__(self, conversations: list[list[dict]]) -> list[str | None]:
        if self.backend is None:
            return [group[0] for group in self.policy.generate(conversations)]
        texts = []
        for messages in conversations:
            try:
                text = self.backend.chat(messages, max_tokens=self.cfg.max_new_tokens,
                                         temperature=self.cfg.temperature)
            except Exception as exc:  # noqa: BLE001 - one failed call must not stop the run; counted
                log.warning("critic call failed: %s: %s", type(exc).__name__, exc)
                text = None
            self.failed += text is None
            texts.append(text)
        return texts


def generate_cai_rows(cfg: CAISFTConfig, rows: list[dict], principles, policy: PolicyChat, writer,
                      verify) -> tuple[list[dict], dict]:
    """The critique → revision chains of ``rows``: (SFT rows, counts). See the module docstring."""
    rng = random.Random(cfg.seed)
    prompts = [row["prompt"] for row in rows]
    initial = [group[0] for group in policy.generate(prompts)]
    current, chains = list(initial), [[] for _ in rows]
    counts = Counter()
    for round_index in range(cfg.rounds):
        picked = [principles[rng.randrange(len(principles))] for _ in rows]
        asked = [user_turn(p) + [{"role": "assistant", "content": a}, {"role": "user", "content": pr.critique}]
                 for p, a, pr in zip(prompts, current, picked)]
        critiques = writer(asked)
        live = [i for i, c in enumerate(critiques) if c is not None]
        counts["critiques_failed"] += len(rows) - len(live)
        revise = [asked[i] + [{"role": "assistant", "content": critiques[i]},
                              {"role": "user", "content": picked[i].revision}] for i in live]
        revisions = dict(zip(live, writer(revise))) if live else {}
        for i, pr in enumerate(picked):
            counts[f"principle/{pr.name}"] += 1
            revision = revisions.get(i)
            chains[i].append({"round": round_index + 1, "principle": pr.name, "critique_request": pr.critique,
                              "critique": critiques[i], "revision_request": pr.revision, "revision": revision})
            if revision is None and i in revisions:
                counts["revisions_failed"] += 1
            elif revision is not None and not revision.strip():
                counts["revisions_empty"] += 1
            elif revision is not None:
                current[i] = revision
    out = []
    for row, prompt, first, final, chain in zip(rows, prompts, initial, current, chains):
        if not final.strip():
            counts["dropped_empty"] += 1
            continue
        extra = {k: v for k, v in row.items() if k != "prompt" and not k.startswith("_")}
        sft_row = {"prompt": prompt, "completion": as_completion(final, prompt), **extra,
                   "initial_response": first, "revised": final != first, "chain": chain}
        initial_ok, final_ok = verify(first, row), verify(final, row)
        if initial_ok is not None:
            sft_row["initial_correct"], sft_row["final_correct"] = initial_ok, final_ok
        out.append(sft_row)
    return out, dict(counts)


def train(cfg: CAISFTConfig) -> dict:
    """Generate ``cai_sft.jsonl`` and (unless ``generate_only``) run SFT on it; return the stats."""
    from rlxf.judges.constitution import load_principles, select_principle
    from rlxf.recipes.common import setup_logging

    setup_logging()
    started = time.perf_counter()
    out = Path(cfg.output_dir)
    prepare_output(out, OUTPUT_FILES, overwrite=cfg.overwrite)
    principles = select_principle(load_principles(cfg.principles), cfg.principle)
    rows, task = load_prompt_rows(cfg)
    policy = PolicyChat(cfg)
    writer = _Writer(cfg, policy)
    log.info("cai-sft: %d prompts, %d round(s), %d principles, critiques by %s", len(rows), cfg.rounds,
             len(principles), cfg.critic or "the policy")
    sft_rows, counts = generate_cai_rows(cfg, rows, principles, policy, writer, verifier(task, rows))
    write_jsonl(out / "cai_sft.jsonl", sft_rows)
    save_yaml(cfg, out / "config.yaml")
    stats = {"model": cfg.model, "dataset": cfg.dataset, "prompts": len(rows), "rounds": cfg.rounds,
             "critic": cfg.critic, "sft_rows": len(sft_rows), "revised": sum(r["revised"] for r in sft_rows),
             "dropped_empty": counts.pop("dropped_empty", 0), "revisions_empty": counts.pop("revisions_empty", 0),
             "critiques_failed": counts.pop("critiques_failed", 0),
             "revisions_failed": counts.pop("revisions_failed", 0),
             "contexts_truncated": policy.truncated, "principles": {k.split("/", 1)[1]: v for k, v in counts.items()}}
    verified = [r for r in sft_rows if "final_correct" in r]
    if verified:
        stats["initial_accuracy"] = sum(r["initial_correct"] for r in verified) / len(verified)
        stats["final_accuracy"] = sum(r["final_correct"] for r in verified) / len(verified)
    stats["generation_seconds"] = round(time.perf_counter() - started, 3)
    log.info("cai-sft: %d SFT rows (%d revised), %s", len(sft_rows), stats["revised"],
             {k: stats[k] for k in ("initial_accuracy", "final_accuracy") if k in stats})
    if not cfg.generate_only:
        if not sft_rows:
            raise ConfigError("cai-sft: no SFT rows were produced (every final answer was empty); nothing to train")
        from rlxf.recipes import sft

        policy.release()
        sft_cfg = build_config(sft.SFTConfig, train_values(cfg, out / "cai_sft.jsonl", out / "sft", cfg.sft_config),
                               where=cfg.sft_config or "rlxf cai-sft")
        result = sft.train(sft_cfg)
        stats["sft"] = {"output_dir": str(result.output_dir),
                        **{k: v for k, v in result.summary.items() if "/" in k}}
    stats["seconds"] = round(time.perf_counter() - started, 3)
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats
