"""Human labels for a COOL-RLHF round (``--labels http://HOST:PORT`` or a labeling database):
push the round's samples to a labeling queue, wait for the labelers, turn their choices into
preference rows (docs/labeling.md#live-rounds).

Each label prompt's distinct samples become one compare item (the domain's condition shown above
the prompt) in the queue ``cool-r<K>-<tag>`` (tag: a hash of the output directory, so two loops do not
share a queue), assigned to ``--human-labelers``. Pushing is idempotent, so a re-run of an interrupted
round waits for the same items and keeps the labels already made. The loop polls the queue until every
item has ``--human-overlap`` labels or ``--human-timeout`` seconds pass; then ``--human-on-timeout
partial`` goes on with the labels that came, ``fail`` stops. A label choosing completion i gives
the pairs (i ≻ j) for every other j; ``tie`` and ``both_bad`` give none.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

from rlxf.config import ConfigError

log = logging.getLogger("rlxf.cool_rlhf")
POLL_SECONDS = 2.0


def queue_name(cfg, k: int) -> str:
    tag = hashlib.sha256(str(Path(cfg.output_dir).resolve()).encode()).hexdigest()[:10]
    return f"cool-r{k}-{tag}"


def round_items(groups, conditions: dict[str, str]) -> list[dict]:
    """One compare item per group with two or more distinct samples."""
    rows = []
    for i, group in enumerate(groups):
        texts = list(dict.fromkeys(group.texts))
        if len(texts) >= 2:
            rows.append({"key": f"g{i}", "prompt": group.prompt, "completions": texts,
                         "condition": conditions.get(group.domain) or group.domain, "cool_domain": group.domain,
                         "answer": group.answer})
    return rows


def human_labels(cfg, groups, k: int, conditions: dict[str, str], *, poll: float = POLL_SECONDS) -> tuple[list, dict]:
    """Round ``k``'s preference rows from human labels, and the round's ``human/...`` stats."""
    from rlxf.labeling.client import LabelSourceError, connect

    queue = queue_name(cfg, k)
    items = round_items(groups, conditions)
    try:
        client = connect(cfg.labels)
        assign = tuple(n.strip() for n in cfg.human_labelers.split(",") if n.strip())
        client.push(queue, items, kind="compare", overlap=cfg.human_overlap, assign=assign)
        stats, waited = _wait(client, queue, len(items), cfg, k, poll)
        rows = client.labels(queue)
        client.close()
    except LabelSourceError as err:
        raise ConfigError(f"--labels {cfg.labels}: {err}") from None
    pairs = preference_rows(rows, k)
    log.info("cool-rlhf: round %d: %d human labels on %d/%d items -> %d pairs (alpha %s)", k, stats["labels"],
             stats["complete"], len(items), len(pairs), _alpha_text(stats))
    return pairs, {"human/items": len(items), "human/complete": stats["complete"], "human/labels": stats["labels"],
                   "human/labelers": len(stats["labelers"]), "human/alpha": stats["alpha"],
                   "human/wait_seconds": round(waited, 1), "human/timed_out": float(stats["complete"] < len(items))}


def _wait(client, queue: str, n_items: int, cfg, k: int, poll: float) -> tuple[dict, float]:
    start = time.monotonic()
    shown = None
    while True:
        stats = client.stats(queue)
        waited = time.monotonic() - start
        if stats["complete"] >= n_items:
            return stats, waited
        if (stats["complete"], stats["labels"]) != shown:
            shown = (stats["complete"], stats["labels"])
            log.info("cool-rlhf: round %d: human labels %d/%d items (%d labels, alpha %s); waiting up to %.0f s more "
                     "(queue %s)", k, stats["complete"], n_items, stats["labels"], _alpha_text(stats),
                     cfg.human_timeout - waited, queue)
        if waited >= cfg.human_timeout:
            if cfg.human_on_timeout == "fail":
                raise ConfigError(f"round {k}: {stats['complete']} of {n_items} items were labelled within "
                                  f"--human-timeout {cfg.human_timeout:g} s (queue {queue}); re-run the same command "
                                  "to keep waiting (labels made meanwhile count), or pass --human-on-timeout partial")
            log.warning("cool-rlhf: round %d: timeout after %.0f s with %d of %d items labelled; going on with them",
                        k, waited, stats["complete"], n_items)
            return stats, waited
        time.sleep(min(poll, max(0.0, cfg.human_timeout - waited)))


def preference_rows(rows: list[dict], k: int) -> list[dict]:
    """Compare labels as COOL-RLHF preference rows (``pair_kind`` ``human``), provenance kept."""
    pairs = []
    for row in rows:
        if row["kind"] != "compare" or row["choice"] in ("tie", "both_bad"):
            continue
        best = int(row["choice"])
        meta = row["meta"]
        for j, other in enumerate(row["completions"]):
            if j != best:
                pairs.append({"prompt": row["prompt"], "chosen": row["completions"][best], "rejected": other,
                              "domain": meta.get("cool_domain"), "answer": meta.get("answer"), "pair_kind": "human",
                              "round": k, "labeler": row["labeler"], "labeled_at": row["labeled_at"]})
    return pairs


def _alpha_text(stats: dict) -> str:
    return "n/a" if stats["alpha"] is None else f"{stats['alpha']:.3f}"
