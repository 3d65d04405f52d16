"""The loop's files: the fixed data under ``data/`` (conditions, RM pairs, prompts), each round's
label prompts, the pool of labels collected so far, and the JSON / JSONL writers."""

from __future__ import annotations

import json
import random
from pathlib import Path

from rlxf.config import ConfigError
from rlxf.workflows.cool_rlhf.config import CoolRLHFConfig


def prepare_data(cfg: CoolRLHFConfig, out: Path) -> dict[str, Path]:
    """Write the loop's fixed data under ``out/data`` (deterministic in the config): the conditions,
    round 0's RM pairs, held-out pairs and prompts, and the RL prompts; rows interleave the domains."""
    from rlxf.data.conditions import load_conditions, save_conditions
    from rlxf.tasks import get_task

    conditions = load_conditions(cfg.conditions)
    missing = [d for d in cfg.domains if d not in conditions]
    if missing:
        raise ConfigError(f"--conditions {cfg.conditions}: no condition for domain(s) {', '.join(missing)}")
    folder = out / "data"
    folder.mkdir(parents=True, exist_ok=True)
    save_conditions({d: conditions[d] for d in cfg.domains}, folder)
    paths = {"conditions": folder / "conditions.yaml"}
    builders = {
        "rm_train": lambda t: t.preference_rows("train", cfg.rm_pairs, cfg.seed, kind="mixed"),
        "rm_eval": lambda t: t.preference_rows("eval", cfg.eval_pairs, cfg.seed, kind="mixed"),
        "rl_prompts": lambda t: t.prompt_rows("train", cfg.rl_prompts, cfg.seed),
        "eval_prompts": lambda t: t.prompt_rows("eval", cfg.eval_prompts, cfg.seed),
    }
    for name, build in builders.items():
        per_domain = [[{**row, "domain": d} for row in build(get_task(d))] for d in cfg.domains]
        paths[name] = write_jsonl(folder / f"{name}.jsonl", interleave(per_domain))
    return paths


def label_prompt_rows(cfg: CoolRLHFConfig, domain: str, round_index: int) -> list[dict]:
    """Round K's label prompts of ``domain``: train-split problems right after the RL prompts
    (problem lists are prefix-stable in n, so they never overlap RL's or an earlier round's)."""
    from rlxf.tasks import get_task

    task = get_task(domain)
    start = cfg.rl_prompts + (round_index - 1) * cfg.label_prompts
    problems = task.problems("train", start + cfg.label_prompts, cfg.seed)[start:]
    return [{"prompt": p.prompt, "answer": p.answer, "reference": task.solve(p, verbose=False), "domain": domain}
            for p in problems]


def label_pool(out: Path, data: dict, k: int) -> list[dict]:
    """Every label up to round ``k``: round 0's pairs, then each round's labels and targeted pairs."""
    rows = read_jsonl(data["rm_train"])
    for j in range(1, k + 1):
        for name in ("labels.jsonl", "fast_pairs.jsonl"):
            rows += read_jsonl(out / f"round-{j}" / name)
    return rows


def replay_labels(cfg, pool: list[dict], *, n: int, k: int) -> list[dict]:
    rng = random.Random(f"cool-rlhf:replay:{cfg.seed}:{k}")
    return rng.sample(pool, min(n, len(pool)))


def interleave(per_domain: list[list[dict]]) -> list[dict]:
    """Round-robin over the domains, so any prefix of the rows mixes them."""
    longest = max(len(rows) for rows in per_domain)
    return [rows[i] for i in range(longest) for rows in per_domain if i < len(rows)]


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)
    return path


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)

