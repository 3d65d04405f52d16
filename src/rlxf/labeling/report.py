"""What the owner reads: per-queue and per-labeler counts and speed, Krippendorff's α, and the
labels exported in the formats the recipes read (docs/labeling.md#export).

Export formats (only live labels of an item's current version; each row keeps ``labeler``,
``labeled_at`` (ISO 8601, UTC), ``item_id``, ``item_key``, ``item_version``, ``queue``,
``label_id`` and, when the item has one, ``domain`` = its condition):

- ``pairs`` (``rlxf dpo``, ``rlxf rm``): a compare label choosing completion i gives one row
  ``{"prompt", "chosen": completions[i], "rejected": completions[j]}`` per other j; ``tie`` and
  ``both_bad`` give none.
- ``kto`` (TRL's unpaired format ``{"prompt", "completion", "label": bool}``): thumbs up/down; a
  1–7 rating above 4 is desirable, below 4 undesirable, 4 is left out; a compare label marks the
  chosen completion desirable and the others undesirable (``both_bad``: all undesirable, ``tie``:
  none).
- ``sft``: an edit label gives ``{"prompt", "completion": edited text}``.
- ``labels``: one row per label with every field (``csv``: the same as CSV).
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from datetime import datetime, timezone

from sqlalchemy import and_, func, select

from rlxf.labeling.accounts import LabelingError
from rlxf.labeling.agreement import krippendorff_alpha
from rlxf.labeling.schema import items, labels, queues, transaction, users

FORMATS = ("pairs", "kto", "sft", "labels", "csv")


def label_rows(engine, queue: str | None = None) -> list[dict]:
    """Every live label of a current item version, oldest first, with its item and labeler."""
    query = (select(labels.c.id, labels.c.choice, labels.c.rating, labels.c.edit, labels.c.reason,
                    labels.c.created_at, labels.c.seconds, users.c.name.label("labeler"), items.c.id.label("item_id"),
                    items.c.key, items.c.version, items.c.prompt, items.c.completions, items.c.condition, items.c.meta,
                    queues.c.name.label("queue"), queues.c.kind, queues.c.scale)
             .select_from(labels.join(items, and_(items.c.id == labels.c.item_id,
                                                  items.c.version == labels.c.item_version))
                          .join(queues, queues.c.id == items.c.queue_id).join(users, users.c.id == labels.c.user_id))
             .where(labels.c.undone_at.is_(None)).order_by(labels.c.id))
    if queue is not None:
        query = query.where(queues.c.name == queue)
    with transaction(engine) as conn:
        rows = conn.execute(query).all()
    return [{"label_id": r.id, "queue": r.queue, "kind": r.kind, "scale": r.scale, "item_id": r.item_id,
             "item_key": r.key, "item_version": r.version, "prompt": r.prompt,
             "completions": json.loads(r.completions), "condition": r.condition, "meta": json.loads(r.meta),
             "labeler": r.labeler, "choice": r.choice, "rating": r.rating, "edit": r.edit, "reason": r.reason,
             "labeled_at": _iso(r.created_at), "seconds": r.seconds} for r in rows]


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def export_rows(rows: list[dict], fmt: str) -> list[dict]:
    """``rows`` of :func:`label_rows` in format ``fmt`` (pairs, kto, sft or labels)."""
    if fmt not in FORMATS or fmt == "csv":
        raise LabelingError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt == "labels":
        return rows
    out = []
    for row in rows:
        provenance = {"labeler": row["labeler"], "labeled_at": row["labeled_at"], "item_id": row["item_id"],
                      "item_key": row["item_key"], "item_version": row["item_version"], "queue": row["queue"],
                      "label_id": row["label_id"], **({"domain": row["condition"]} if row["condition"] else {})}
        out += [{**r, **provenance} for r in _converted(row, fmt)]
    return out


def _converted(row: dict, fmt: str) -> list[dict]:
    prompt, completions, choice = row["prompt"], row["completions"], row["choice"]
    if fmt == "sft":
        return [{"prompt": prompt, "completion": row["edit"]}] if row["kind"] == "edit" else []
    if row["kind"] == "compare" and choice not in ("tie", "both_bad"):
        best = int(choice)
        others = [c for j, c in enumerate(completions) if j != best]
        if fmt == "pairs":
            return [{"prompt": prompt, "chosen": completions[best], "rejected": c} for c in others]
        return ([{"prompt": prompt, "completion": completions[best], "label": True}]
                + [{"prompt": prompt, "completion": c, "label": False} for c in others])
    if fmt == "kto" and row["kind"] == "compare" and choice == "both_bad":
        return [{"prompt": prompt, "completion": c, "label": False} for c in completions]
    if fmt == "kto" and row["kind"] == "rate":
        good = row["rating"] == 1 if row["scale"] == "thumbs" else row["rating"] > 4 if row["rating"] != 4 else None
        return [] if good is None else [{"prompt": prompt, "completion": completions[0], "label": good}]
    return []


def to_csv(rows: list[dict]) -> str:
    """The ``labels`` rows as CSV (lists and objects as JSON)."""
    buffer = io.StringIO()
    fields = ["label_id", "queue", "kind", "scale", "item_id", "item_key", "item_version", "labeler", "labeled_at",
              "seconds", "choice", "rating", "edit", "reason", "condition", "prompt", "completions", "meta"]
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else _cell(v)
                         for k, v in row.items()})
    return buffer.getvalue()


def _cell(value):
    """A CSV cell that a spreadsheet will not run as a formula (OWASP CSV injection)."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def alpha_metric(kind: str, scale: str) -> str | None:
    """Which α a queue reports: nominal for choices and thumbs, interval for 1–7, none for edits."""
    return {"compare": "nominal", "rate": "nominal" if scale == "thumbs" else "interval"}.get(kind)


def label_value(row: dict):
    return row["choice"] if row["kind"] == "compare" else row["rating"]


def queue_stats(engine, queue: str | None = None) -> list[dict]:
    """Per queue: items, complete items (live labels ≥ overlap), labels, α over items with two or
    more labels, and per labeler the count, median seconds per label and labels per hour."""
    with transaction(engine) as conn:
        query = select(queues).order_by(queues.c.name)
        if queue is not None:
            query = query.where(queues.c.name == queue)
        queue_rows = conn.execute(query).all()
        item_counts = dict(conn.execute(select(items.c.queue_id, func.count()).group_by(items.c.queue_id)).all())
    if queue is not None and not queue_rows:
        raise LabelingError(f"no queue {queue!r}", status=404)
    rows = label_rows(engine, queue)
    return [_one_queue(q, item_counts.get(q.id, 0), [r for r in rows if r["queue"] == q.name]) for q in queue_rows]


def _one_queue(q, n_items: int, rows: list[dict]) -> dict:
    by_item: dict[int, list] = {}
    for row in rows:
        by_item.setdefault(row["item_id"], []).append(label_value(row))
    metric = alpha_metric(q.kind, q.scale)
    units = [v for v in by_item.values() if len(v) >= 2]
    alpha = krippendorff_alpha(units, metric) if metric and units else None
    labelers = {}
    for row in rows:
        labelers.setdefault(row["labeler"], []).append(row)
    return {"queue": q.name, "kind": q.kind, "scale": q.scale, "overlap": q.overlap, "items": n_items,
            "complete": sum(len(v) >= q.overlap for v in by_item.values()), "labels": len(rows),
            "alpha": alpha, "alpha_metric": metric, "alpha_items": len(units),
            "labelers": [_labeler(name, own) for name, own in sorted(labelers.items())]}


def _labeler(name: str, rows: list[dict]) -> dict:
    seconds = [r["seconds"] for r in rows if r["seconds"] is not None]
    return {"name": name, "labels": len(rows), "median_seconds": statistics.median(seconds) if seconds else None,
            "labels_per_hour": 3600 / statistics.mean(seconds) if seconds and statistics.mean(seconds) > 0 else None}
