"""Items sampled from a checkpoint for ``rlxf label push --model DIR`` (or ``--from-run DIR``): n
completions per prompt of a dataset, with optional active selection by a reward model.

Active selection (``--reward-model DIR``): each item's priority is minus the RM's score gap between
its two best completions, so the items the RM is least sure about are labelled first (uncertainty
sampling; Settles, "Active Learning Literature Survey", 2009, section 3.1, margin sampling).
"""

from __future__ import annotations

import json
from pathlib import Path


def run_model(run_dir: str) -> str:
    """The final model of a finished rlxf run directory (its ``summary.json``'s ``final_model``)."""
    path = Path(run_dir) / "summary.json"
    try:
        final = json.loads(path.read_text()).get("final_model")
    except (OSError, ValueError) as err:
        raise ValueError(f"--from-run {run_dir}: cannot read {path} ({err}); give a finished rlxf run directory "
                         "or --model DIR") from None
    if not final:
        raise ValueError(f"--from-run {run_dir}: {path} names no final_model; did the run finish?")
    return final


def sample_items(model: str, dataset: str, *, n: int = 2, limit: int = 32, max_new_tokens: int = 64,
                 temperature: float = 1.0, seed: int = 0, device: str = "auto",
                 reward_model: str | None = None) -> list[dict]:
    """Push rows ``{"prompt", "completions", "model", ["priority"], ["domain"]}``: ``n`` completions
    of ``model`` for each of the first ``limit`` prompts of ``dataset`` (any rlxf dataset spec)."""
    from rlxf.data import DataError, load_rows, tokenize_prompts
    from rlxf.models import ensure_pad_token, load_policy, load_tokenizer, resolve_device
    from rlxf.rollout import HFEngine, SamplingParams

    rows = load_rows(dataset, kind="prompt", limit=limit, seed=seed)[:limit]
    device = resolve_device(device)
    tokenizer = load_tokenizer(model)
    policy = load_policy(model, device=device, resize_to=len(tokenizer) if ensure_pad_token(tokenizer) else None)
    examples, stats = tokenize_prompts(rows, tokenizer, max_prompt_length=1024)
    if stats.dropped:
        raise DataError(f"{dataset}: {stats.dropped} prompts are longer than 1024 tokens")
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, n=n, seed=seed)
    texts = HFEngine(policy, tokenizer).generate([e["prompt_ids"] for e in examples], params).text
    items = [{"prompt": row["prompt"], "completions": texts[i * n:(i + 1) * n], "model": model,
              **({"domain": row["domain"]} if row.get("domain") else {})} for i, row in enumerate(rows)]
    if reward_model:
        _prioritise(items, reward_model, device)
    return items


def _prioritise(items: list[dict], reward_model: str, device) -> None:
    from rlxf.rewards import get_reward

    rm = get_reward("reward_model", path=reward_model, device=device)
    prompts = [it["prompt"] for it in items for _ in it["completions"]]
    completions = [c for it in items for c in it["completions"]]
    extra = {"domain": [it.get("domain") for it in items for _ in it["completions"]]} if any(
        it.get("domain") for it in items) else {}
    scores = rm(prompts, completions, **extra)
    start = 0
    for it in items:
        own = sorted(scores[start:start + len(it["completions"])], reverse=True)
        start += len(it["completions"])
        it["rm_scores_top2"] = own[:2]
        it["priority"] = -(own[0] - own[1]) if len(own) > 1 else 0.0
