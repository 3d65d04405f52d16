"""New preference labels for online RLHF rounds, and the reward-hacking check (COOL-RLHF, arXiv 2403.17297).

Each round of ``rlxf cool-rlhf`` samples the current policy on fresh prompts and turns the samples
into preference rows (``prompt``, ``chosen``, ``rejected``, ``domain``, ``pair_kind``):

- :func:`verifier_pairs` — the task's verifier labels: a correct sample ≻ a wrong one of the same
  prompt (prompts whose samples are all right or all wrong give no pair);
- :func:`judge_pairs` — a judge (:mod:`rlxf.judges`) compares two samples of the same prompt under
  the domain's condition as principle; P(a better) decides the pair, ties within a margin are dropped;
- :func:`file_labels` — rows of a human-labelled ``.jsonl`` for this round.

Reward hacking (:func:`high_scored`, :func:`hacking_flags`, :func:`hacking_stats`): a sample is
*high-scored* when the current RM scores it at or above the ``quantile`` of its domain's scores
(per domain, because each condition gives the RM its own scale), and *hacked* when it is
high-scored while the verifier says it is wrong. :func:`fast_path_pairs` builds COOL-RLHF's
targeted pairs: each hacked sample is rejected against a verified output for the same prompt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import product

from rlxf.data.formats import DataError


@dataclass
class SampleGroup:
    """The samples of one prompt: texts, verifier outcome and current-RM score of each."""

    prompt: str
    domain: str
    answer: str
    reference: str                  # a verified completion (the task's concise solution)
    texts: list[str]
    correct: list[bool | None]
    scores: list[float | None] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"prompt": self.prompt, "domain": self.domain, "answer": self.answer, "reference": self.reference,
                "texts": self.texts, "correct": self.correct, "scores": self.scores}


# -- reward hacking -----------------------------------------------------------------------------

def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` with linear interpolation (numpy's default)."""
    if not values:
        raise ValueError("quantile of no values")
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def high_scored(scores: list[float | None], domains: list[str], *, q: float) -> list[bool]:
    """True where the score is >= the ``q`` quantile of the scores of the same domain (None: False)."""
    thresholds = {}
    for domain in set(domains):
        values = [s for s, d in zip(scores, domains, strict=True) if d == domain and s is not None]
        thresholds[domain] = quantile(values, q) if values else math.inf
    return [s is not None and s >= thresholds[d] for s, d in zip(scores, domains)]


def hacking_flags(high: list[bool], correct: list[bool | None]) -> list[bool]:
    """Reward-hacking samples: high-scored by the RM while the verifier says wrong."""
    return [h and c is False for h, c in zip(high, correct, strict=True)]


def hacking_stats(scores: list[float | None], correct: list[bool | None], high: list[bool]) -> dict:
    """The hacking indicator of one batch of samples.

    ``fraction``: hacked / scored samples; ``top_wrong_rate``: wrong among the high-scored;
    ``wrong_rate``: wrong among all scored; ``lift`` = top_wrong_rate − wrong_rate (> 0: the RM's
    favourites are wrong more often than an average sample); ``score_gap``: mean score of wrong
    minus mean score of right samples (> 0: the RM prefers wrong answers). None where undefined.
    """
    judged = [(s, c, h) for s, c, h in zip(scores, correct, high, strict=True) if s is not None and c is not None]
    if not judged:
        return {"fraction": None, "top_wrong_rate": None, "wrong_rate": None, "lift": None, "score_gap": None}
    top = [c for _, c, h in judged if h]
    wrong_rate = sum(not c for _, c, _ in judged) / len(judged)
    top_wrong = sum(not c for c in top) / len(top) if top else None
    right_scores = [s for s, c, _ in judged if c]
    wrong_scores = [s for s, c, _ in judged if not c]
    gap = (sum(wrong_scores) / len(wrong_scores) - sum(right_scores) / len(right_scores)
           if right_scores and wrong_scores else None)
    return {"fraction": sum(h and not c for _, c, h in judged) / len(judged), "top_wrong_rate": top_wrong,
            "wrong_rate": wrong_rate, "lift": None if top_wrong is None else top_wrong - wrong_rate,
            "score_gap": gap}


# -- pairs --------------------------------------------------------------------------------------

def _row(group: SampleGroup, chosen: str, rejected: str, kind: str, **extra) -> dict:
    return {"prompt": group.prompt, "chosen": chosen, "rejected": rejected, "domain": group.domain,
            "answer": group.answer, "pair_kind": kind, **extra}


def verifier_pairs(groups: list[SampleGroup], *, max_pairs_per_prompt: int) -> list[dict]:
    """Correct ≻ wrong pairs within each prompt's samples (distinct texts), at most
    ``max_pairs_per_prompt`` per prompt; pairs of early samples come first: (c0, w0), (c0, w1),
    (c1, w0), (c1, w1), (c0, w2) ..."""
    rows = []
    for group in groups:
        right = list(dict.fromkeys(t for t, c in zip(group.texts, group.correct) if c is True))
        wrong = list(dict.fromkeys(t for t, c in zip(group.texts, group.correct) if c is False))
        order = sorted(product(range(len(right)), range(len(wrong))), key=lambda ab: (max(ab), ab))
        rows += [_row(group, right[a], wrong[b], "verifier") for a, b in order[:max_pairs_per_prompt]]
    return _dedupe(rows)


def fast_path_pairs(groups: list[SampleGroup], hacked: list[list[bool]]) -> list[dict]:
    """COOL-RLHF fast path: each hacked sample is rejected against a verified output of the same
    prompt — the correct sample the current RM scores highest, else the task's reference solution.

    ``hacked[g][i]``: sample i of group g was flagged by :func:`hacking_flags`.
    """
    rows = []
    for group, flags in zip(groups, hacked, strict=True):
        if not any(flags):
            continue
        right = [(s if s is not None else -math.inf, t) for t, c, s in zip(group.texts, group.correct, group.scores)
                 if c is True]
        chosen = max(right)[1] if right else group.reference
        for text, flag in zip(group.texts, flags):
            if flag and text != chosen:
                rows.append(_row(group, chosen, text, "hacked"))
    return _dedupe(rows)


def judge_pairs(groups: list[SampleGroup], judge, conditions: dict[str, str], *, max_pairs_per_prompt: int,
                margin: float) -> tuple[list[dict], dict]:
    """Pairs labelled by ``judge.prefer`` (both orders averaged by the judge) under the domain's
    condition as principle; consecutive distinct samples of a prompt are compared (1st vs 2nd,
    3rd vs 4th, ...), at most ``max_pairs_per_prompt`` per prompt. A pair is kept when
    |P(a better) − ½| ≥ ``margin``; its ``chosen_probability`` is the judge's P(chosen better).

    Returns ``(rows, {"asked", "failed", "undecided"})``.
    """
    asked: dict[str, list[tuple[SampleGroup, str, str]]] = {}
    for group in groups:
        texts = list(dict.fromkeys(group.texts))
        for i in range(0, min(2 * max_pairs_per_prompt, len(texts) - 1), 2):
            asked.setdefault(group.domain, []).append((group, texts[i], texts[i + 1]))
    rows, stats = [], {"asked": 0, "failed": 0, "undecided": 0}
    for domain, items in asked.items():
        probs = judge.prefer([g.prompt for g, _, _ in items], [a for _, a, _ in items], [b for _, _, b in items],
                             principle=conditions.get(domain))
        stats["asked"] += len(items)
        for (group, a, b), p in zip(items, probs, strict=True):
            if p is None:
                stats["failed"] += 1
            elif abs(p - 0.5) < margin:
                stats["undecided"] += 1
            elif p > 0.5:
                rows.append(_row(group, a, b, "judge", chosen_probability=float(p)))
            else:
                rows.append(_row(group, b, a, "judge", chosen_probability=float(1 - p)))
    return _dedupe(rows), stats


def file_labels(rows: list[dict], *, round_index: int, domains: list[str], where: str) -> list[dict]:
    """The rows of a human-labelled file that belong to round ``round_index``: rows whose ``round``
    field equals it, or, for rows without ``round``, round 1. Each row needs ``domain`` unless
    there is a single domain."""
    out = []
    for i, row in enumerate(rows):
        if row.get("round", 1) != round_index:
            continue
        domain = row.get("domain") or (domains[0] if len(domains) == 1 else None)
        if domain not in domains:
            raise DataError(f"{where}[{i}]: domain {row.get('domain')!r} is not one of the run's domains "
                            f"({', '.join(domains)}); give each row a 'domain' field")
        out.append({k: v for k, v in row.items() if k not in ("round", "_where")} | {"domain": domain})
    return out


def _dedupe(rows: list[dict]) -> list[dict]:
    seen, out = set(), []
    for row in rows:
        key = (row["prompt"], row["chosen"], row["rejected"])
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out
