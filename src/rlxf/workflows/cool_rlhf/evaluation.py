"""A round's evaluation: the RM's held-out pairwise accuracy, and the policy's greedy verifier
accuracy, mean RM reward and hacking indicators on held-out prompts; plus sampling a policy and
loading an RM as the reward RL uses."""

from __future__ import annotations

from pathlib import Path

from rlxf.workflows.cool_rlhf.data import read_jsonl, write_jsonl


def evaluate_round(cfg, folder: Path, data: dict, *, rm_dir: str, policy_dir: str, previous: dict | None) -> dict:
    """The round's row of ``rounds.jsonl`` (see docs/methods/cool-rlhf.md#metrics)."""
    from rlxf.data.online_labels import hacking_stats, high_scored
    from rlxf.tasks import get_task

    rm = load_rm(cfg, rm_dir)
    metrics = rm_accuracy(rm, read_jsonl(data["rm_eval"]))
    rows = read_jsonl(data["eval_prompts"])
    texts = [t[0] for t in generate(cfg, policy_dir, rows, n=1, temperature=0.0, seed=cfg.seed)]
    domains = [r["domain"] for r in rows]
    correct = [get_task(r["domain"]).verify(t, r["answer"]) for r, t in zip(rows, texts)]
    scores = rm([r["prompt"] for r in rows], texts, domain=domains)
    write_jsonl(folder / "eval_samples.jsonl", [
        {"prompt": r["prompt"], "domain": r["domain"], "completion": t, "correct": c, "rm_score": s}
        for r, t, c, s in zip(rows, texts, correct, scores)])
    high = high_scored(scores, domains, q=cfg.hack_quantile)
    for domain in [None, *cfg.domains]:
        pick = [i for i, d in enumerate(domains) if domain is None or d == domain]
        suffix = "" if domain is None else f"/{domain}"
        metrics[f"policy_accuracy{suffix}"] = sum(correct[i] for i in pick) / len(pick)
        metrics[f"rm_reward{suffix}"] = _mean([scores[i] for i in pick])
        stats = hacking_stats([scores[i] for i in pick], [correct[i] for i in pick], [high[i] for i in pick])
        metrics.update({f"hack/{key}{suffix}": value for key, value in stats.items()})
    if previous is not None:
        # the previous policy's held-out completions rescored by this round's RM: the same yardstick
        before = read_jsonl(Path(cfg.output_dir) / f"round-{previous['round']}" / "eval_samples.jsonl")
        old_scores = rm([r["prompt"] for r in before], [r["completion"] for r in before],
                        domain=[r["domain"] for r in before])
        metrics["delta/rm_reward"] = metrics["rm_reward"] - _mean(old_scores)
        metrics["delta/accuracy"] = metrics["policy_accuracy"] - previous["policy_accuracy"]
        metrics["hack/divergence"] = float(metrics["delta/rm_reward"] > 0 and metrics["delta/accuracy"] < 0)
    return metrics


def rm_accuracy(rm, pairs: list[dict]) -> dict:
    """Pairwise accuracy (ties ½) of ``rm`` (a ``reward_model`` reward, :func:`load_rm`) on held-out
    pairs: overall, per domain and per (domain, pair kind)."""
    domains = [p["domain"] for p in pairs]
    chosen = rm([p["prompt"] for p in pairs], [p["chosen"] for p in pairs], domain=domains)
    rejected = rm([p["prompt"] for p in pairs], [p["rejected"] for p in pairs], domain=domains)
    wins = [1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected)]
    out = {"rm_accuracy": sum(wins) / len(wins)}
    groups: dict[str, list[float]] = {}
    for p, w in zip(pairs, wins):
        groups.setdefault(p["domain"], []).append(w)
        groups.setdefault(f"{p['domain']}/{p.get('pair_kind')}", []).append(w)
    out.update({f"rm_accuracy/{key}": sum(v) / len(v) for key, v in sorted(groups.items())})
    return out


def generate(cfg, policy_dir: str, rows: list[dict], *, n: int, temperature: float, seed: int) -> list[list[str]]:
    """``n`` completions per prompt row from the policy in ``policy_dir`` (seeded, so re-runs agree)."""
    import torch

    from rlxf.data import DataError, tokenize_prompts
    from rlxf.models import ensure_pad_token, load_policy, load_tokenizer, resolve_device
    from rlxf.rollout import HFEngine, SamplingParams

    device = resolve_device(cfg.device)
    tokenizer = load_tokenizer(policy_dir)
    resize = len(tokenizer) if ensure_pad_token(tokenizer) else None
    model = load_policy(policy_dir, device=device, resize_to=resize)
    examples, stats = tokenize_prompts(rows, tokenizer, max_prompt_length=256)
    if stats.dropped:
        raise DataError(f"{stats.dropped} prompts are longer than 256 tokens")
    engine = HFEngine(model, tokenizer, max_batch_size=256)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=temperature, n=n, seed=seed)
    texts = engine.generate([e["prompt_ids"] for e in examples], params).text
    del model, engine
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return [texts[i * n:(i + 1) * n] for i in range(len(examples))]


def load_rm(cfg, rm_dir: str):
    """The (conditional) RM in ``rm_dir`` as the ``reward_model`` reward that RL uses:
    ``rm(prompts, completions, domain=[...]) -> scores``."""
    from rlxf.models import resolve_device
    from rlxf.rewards import get_reward

    return get_reward("reward_model", path=rm_dir, device=resolve_device(cfg.device))


def _mean(values: list) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None

