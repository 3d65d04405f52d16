"""Putting items into a queue: rows checked field by field, each keyed, re-pushes idempotent.

A row is ``{"prompt", "completions": [...]}`` (compare: 2..16 completions; rate and edit: one, or
``"completion": str``) with optional ``key`` (the pusher's id; default: a hash of the content),
``condition`` (or ``domain``: COOL-RLHF's condition), ``priority`` (a number: higher is labelled
first) and any other JSON fields, kept as the item's metadata and exported with its labels. Pushing
a key again with the same content changes nothing; with new content the item's version goes up and
it is labelled afresh (labels of an older version stay in the database but are not exported: their
text is gone).
"""

from __future__ import annotations

import hashlib
import json
import math
import time

from sqlalchemy import insert, select

from rlxf.labeling.accounts import LabelingError, configure_queue
from rlxf.labeling.schema import items, transaction

MAX_TEXT = 100_000          # characters in a prompt, completion, condition or edit
MAX_COMPLETIONS = 16
MAX_META = 100_000          # characters of an item's other fields as JSON
_RESERVED = ("prompt", "completions", "completion", "key", "condition", "domain", "priority")


def check_row(row, kind: str, where: str) -> dict:
    """One push row as the item fields; :class:`LabelingError` naming the field and the row otherwise."""
    if not isinstance(row, dict):
        raise LabelingError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    prompt = _text(row.get("prompt"), f"{where}: prompt")
    completions = row.get("completions")
    if completions is None and kind != "compare" and "completion" in row:
        completions = [row["completion"]]
    if not isinstance(completions, list):
        raise LabelingError(f"{where}: completions must be a list of strings"
                            + ("" if kind == "compare" else " (or give one 'completion')"))
    wanted = (2, MAX_COMPLETIONS) if kind == "compare" else (1, 1)
    if not wanted[0] <= len(completions) <= wanted[1]:
        raise LabelingError(f"{where}: a {kind} item takes {wanted[0]}" + (f"..{wanted[1]}" if wanted[1] > 1 else "")
                            + f" completions, got {len(completions)}")
    completions = [_text(c, f"{where}: completions[{i}]", empty=True) for i, c in enumerate(completions)]
    condition = row.get("condition", row.get("domain"))
    if condition is not None:
        condition = _text(condition, f"{where}: condition")
    priority = row.get("priority", 0.0)
    if isinstance(priority, bool) or not isinstance(priority, (int, float)) or not math.isfinite(priority):
        raise LabelingError(f"{where}: priority must be a finite number, got {priority!r}")
    meta = {k: v for k, v in row.items() if k not in _RESERVED}
    meta_text = json.dumps(meta, sort_keys=True, ensure_ascii=False, allow_nan=False)
    if len(meta_text) > MAX_META:
        raise LabelingError(f"{where}: the row's other fields take {len(meta_text)} characters as JSON; "
                            f"at most {MAX_META}")
    content = json.dumps([prompt, completions, condition], ensure_ascii=False)
    key = row.get("key")
    if key is None:
        key = hashlib.sha256(content.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    if not isinstance(key, str) or not 1 <= len(key) <= 200:
        raise LabelingError(f"{where}: key must be a string of 1..200 characters, got {key!r}")
    return {"key": key, "prompt": prompt, "completions": json.dumps(completions, ensure_ascii=False),
            "condition": condition, "meta": meta_text, "priority": float(priority)}


def _text(value, where: str, *, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise LabelingError(f"{where} must be a string, got {type(value).__name__}")
    if not value and not empty:
        raise LabelingError(f"{where} is empty")
    if len(value) > MAX_TEXT:
        raise LabelingError(f"{where} has {len(value)} characters; at most {MAX_TEXT}")
    return value


def push_items(engine, queue: str, rows: list, *, kind: str = "compare", scale: str = "", overlap: int = 1,
               lease_seconds: float = 600.0, assign: tuple[str, ...] = (), where: str = "row") -> dict:
    """Add ``rows`` to ``queue`` (created with these settings when missing) in one transaction;
    returns ``{"added", "updated", "unchanged", "keys"}`` (keys in row order). Nothing is stored when
    a row is bad."""
    checked = [check_row(row, kind, f"{where} {i + 1}") for i, row in enumerate(rows)]
    counts = {"added": 0, "updated": 0, "unchanged": 0}
    now = time.time()
    with transaction(engine) as conn:
        queue_id = configure_queue(conn, queue, kind=kind, scale=scale, overlap=overlap,
                                   lease_seconds=lease_seconds, assign=assign)
        for fields in checked:
            old = conn.execute(select(items).where(items.c.queue_id == queue_id,
                                                   items.c.key == fields["key"])).first()
            if old is None:
                conn.execute(insert(items).values(queue_id=queue_id, version=1, created_at=now, labels_live=0,
                                                  **fields))
                counts["added"] += 1
            elif any(getattr(old, name) != fields[name] for name in ("prompt", "completions", "condition")):
                conn.execute(items.update().where(items.c.id == old.id).values(version=old.version + 1, labels_live=0,
                                                                               **fields))
                counts["updated"] += 1
            else:
                conn.execute(items.update().where(items.c.id == old.id).values(priority=fields["priority"],
                                                                               meta=fields["meta"]))
                counts["unchanged"] += 1
    return {**counts, "keys": [f["key"] for f in checked]}
