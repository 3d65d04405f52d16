"""A labeler's work: the next item (under a lease), a label, undo, progress.

Hand-out rule (docs/labeling.md#hand-out-rules): an item of one of the caller's queues goes to the
caller when the caller has no live label on its current version and its live labels plus the
unexpired leases of others stay below the queue's ``overlap``; highest priority first, then oldest.
A caller who already holds an unexpired lease gets that item again (``GET /api/next`` is safe to
repeat). A label needs the caller's lease on the item (404 otherwise: another labeler's item id
reveals nothing) and at most one live label per labeler and item version exists (409 on a replay).
Undo marks the caller's newest live label undone and leases its item back to the caller.
"""

from __future__ import annotations

import json
import time

from sqlalchemy import and_, delete, exists, func, insert, select
from sqlalchemy.exc import IntegrityError

from rlxf.labeling.accounts import LabelingError, User
from rlxf.labeling.items import MAX_TEXT
from rlxf.labeling.schema import items, labels, leases, members, queues, transaction

MAX_REASON = 2000
_LABEL_FIELDS = {"id", "choice", "rating", "edit", "reason"}


def _live_labels(item_id, version, user_id=None):
    where = [labels.c.item_id == item_id, labels.c.item_version == version, labels.c.undone_at.is_(None)]
    return where + ([labels.c.user_id == user_id] if user_id is not None else [])


def _item_columns():
    return (items.c.id, items.c.version, items.c.prompt, items.c.completions, items.c.condition,
            queues.c.name.label("queue"), queues.c.kind, queues.c.scale, queues.c.lease_seconds)


def next_item(engine, user: User, *, now: float | None = None) -> dict:
    """The caller's next item with its lease, or ``{"id": None}`` when none is left; both carry
    ``progress``."""
    now = time.time() if now is None else now
    with transaction(engine) as conn:
        held = conn.execute(select(*_item_columns(), leases.c.leased_at).select_from(
            leases.join(items, items.c.id == leases.c.item_id).join(queues, queues.c.id == items.c.queue_id)
            .join(members, and_(members.c.queue_id == queues.c.id, members.c.user_id == user.id)))
            .where(leases.c.user_id == user.id, leases.c.expires_at > now)
            .order_by(leases.c.leased_at.desc()).limit(1)).first()
        if held is not None:
            conn.execute(leases.update().where(leases.c.item_id == held.id, leases.c.user_id == user.id)
                         .values(expires_at=now + held.lease_seconds))
            return {**_item(held, now + held.lease_seconds), "progress": _progress(conn, user)}
        conn.execute(delete(leases).where(leases.c.expires_at <= now))
        query = _candidate(user, now)
        if conn.dialect.name != "sqlite":  # SQLite: BEGIN IMMEDIATE already serialises; others lock the row
            query = query.with_for_update(skip_locked=True, of=items)
        row = conn.execute(query).first()
        if row is None:
            return {"id": None, "progress": _progress(conn, user)}
        conn.execute(insert(leases).values(item_id=row.id, user_id=user.id, leased_at=now,
                                           expires_at=now + row.lease_seconds))
        return {**_item(row, now + row.lease_seconds), "progress": _progress(conn, user)}


def _candidate(user: User, now: float):
    others = (select(func.count()).select_from(leases)
              .where(leases.c.item_id == items.c.id, leases.c.expires_at > now).scalar_subquery())
    mine = exists().where(*_live_labels(items.c.id, items.c.version, user.id))
    query = (select(*_item_columns()).select_from(
        items.join(queues, queues.c.id == items.c.queue_id)
        .join(members, and_(members.c.queue_id == items.c.queue_id, members.c.user_id == user.id)))
        .where(items.c.labels_live < queues.c.overlap, ~mine, items.c.labels_live + others < queues.c.overlap)
        .order_by(items.c.priority.desc(), items.c.id).limit(1))
    return query


def _item(row, expires_at: float) -> dict:
    return {"id": row.id, "version": row.version, "queue": row.queue, "kind": row.kind, "scale": row.scale,
            "prompt": row.prompt, "completions": json.loads(row.completions), "condition": row.condition,
            "lease_expires_at": expires_at}


def _progress(conn, user: User) -> dict:
    """``done``: the caller's live labels; ``remaining``: items of the caller's queues still short
    of labels that the caller has not labelled (the one in hand included)."""
    done = conn.execute(select(func.count()).select_from(labels).where(labels.c.user_id == user.id,
                                                                       labels.c.undone_at.is_(None))).scalar()
    short = items.c.labels_live < queues.c.overlap
    mine = and_(members.c.queue_id == items.c.queue_id, members.c.user_id == user.id)
    open_items = conn.execute(select(func.count()).select_from(
        items.join(queues, queues.c.id == items.c.queue_id).join(members, mine)).where(short)).scalar()
    open_and_mine = conn.execute(select(func.count()).select_from(
        labels.join(items, and_(items.c.id == labels.c.item_id, items.c.version == labels.c.item_version))
        .join(queues, queues.c.id == items.c.queue_id).join(members, mine))
        .where(labels.c.user_id == user.id, labels.c.undone_at.is_(None), short)).scalar()
    return {"done": done, "remaining": open_items - open_and_mine}


def parse_label(body) -> dict:
    """A ``POST /api/label`` body checked for shape (the item decides which answer it takes)."""
    if not isinstance(body, dict):
        raise LabelingError("the body must be a JSON object {\"id\", \"choice\" | \"rating\" | \"edit\"}")
    unknown = sorted(set(body) - _LABEL_FIELDS)
    if unknown:
        raise LabelingError(f"unknown field(s) {', '.join(map(repr, unknown))}; a label has "
                            f"{', '.join(sorted(_LABEL_FIELDS))}", param=unknown[0])
    item_id = body.get("id")
    if isinstance(item_id, bool) or not isinstance(item_id, int) or not 1 <= item_id < 2**63:
        raise LabelingError("id must be the positive integer id of the item from GET /api/next", param="id")
    answers = [k for k in ("choice", "rating", "edit") if body.get(k) is not None]
    if len(answers) != 1:
        raise LabelingError("give exactly one of choice (compare), rating (rate) or edit (edit)", param="choice")
    reason = body.get("reason")
    if reason is not None and (not isinstance(reason, str) or len(reason) > MAX_REASON):
        raise LabelingError(f"reason must be a string of at most {MAX_REASON} characters", param="reason")
    return {"id": item_id, "answer": answers[0], "value": body[answers[0]], "reason": reason or None}


def _answer(kind: str, scale: str, n_completions: int, label: dict) -> dict:
    """The label's stored columns; :class:`LabelingError` when it does not fit the item."""
    wanted = {"compare": "choice", "rate": "rating", "edit": "edit"}[kind]
    value = label["value"]
    if label["answer"] != wanted:
        raise LabelingError(f"item {label['id']} is a {kind} item: answer it with {wanted!r}", param=label["answer"])
    if kind == "compare":
        if value in ("tie", "both_bad"):
            return {"choice": value}
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n_completions:
            raise LabelingError(f"choice must be a completion index 0..{n_completions - 1}, \"tie\" or "
                                f"\"both_bad\", got {json.dumps(value)[:60]}", param="choice")
        return {"choice": str(value)}
    if kind == "rate":
        low, high = (0, 1) if scale == "thumbs" else (1, 7)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise LabelingError(f"rating must be an integer {low}..{high} on this {scale} queue"
                                + (" (1 = thumbs up, 0 = down)" if scale == "thumbs" else ""), param="rating")
        return {"rating": value}
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_TEXT:
        raise LabelingError(f"edit must be a non-empty string of at most {MAX_TEXT} characters", param="edit")
    return {"edit": value}


def submit_label(engine, user: User, body, *, now: float | None = None) -> dict:
    """Store a label of the caller's leased item; returns ``{"label_id"}`` (``GET /api/next`` brings
    the next item with the progress)."""
    label = parse_label(body)
    now = time.time() if now is None else now
    with transaction(engine) as conn:
        row = conn.execute(select(items.c.id, items.c.version, items.c.completions, queues.c.kind, queues.c.scale,
                                  leases.c.leased_at)
                           .select_from(leases.join(items, items.c.id == leases.c.item_id)
                                        .join(queues, queues.c.id == items.c.queue_id))
                           .where(leases.c.item_id == label["id"], leases.c.user_id == user.id)).first()
        if row is None:
            done = conn.execute(select(labels.c.id).join(items, items.c.id == labels.c.item_id).where(
                *_live_labels(label["id"], items.c.version, user.id))).first()
            if done is not None:
                raise LabelingError(f"item {label['id']} is already labelled by you; POST /api/undo first to change "
                                    "it", status=409, code="already_labelled")
            raise LabelingError(f"no item {label['id']} is handed to you; GET /api/next for your next item",
                                status=404, code="not_yours", param="id")
        columns = _answer(row.kind, row.scale, len(json.loads(row.completions)), label)
        try:
            label_id = conn.execute(insert(labels).values(
                item_id=row.id, item_version=row.version, user_id=user.id, reason=label["reason"], created_at=now,
                seconds=max(0.0, now - row.leased_at), **columns)).inserted_primary_key[0]
        except IntegrityError:
            raise LabelingError(f"item {label['id']} is already labelled by you", status=409,
                                code="already_labelled") from None
        conn.execute(delete(leases).where(leases.c.item_id == row.id, leases.c.user_id == user.id))
        conn.execute(items.update().where(items.c.id == row.id).values(labels_live=items.c.labels_live + 1))
        return {"label_id": label_id}


def undo_last(engine, user: User, *, now: float | None = None) -> dict:
    """Undo the caller's newest live label; its item is leased back to the caller and returned."""
    now = time.time() if now is None else now
    with transaction(engine) as conn:
        last = conn.execute(select(labels.c.id, labels.c.item_id, labels.c.item_version, items.c.version,
                                   queues.c.lease_seconds)
                            .join(items, items.c.id == labels.c.item_id).join(queues, queues.c.id == items.c.queue_id)
                            .where(labels.c.user_id == user.id, labels.c.undone_at.is_(None))
                            .order_by(labels.c.id.desc()).limit(1)).first()
        if last is None:
            raise LabelingError("there is no label of yours to undo", status=409, code="nothing_to_undo")
        conn.execute(labels.update().where(labels.c.id == last.id).values(undone_at=now))
        if last.item_version == last.version:
            conn.execute(items.update().where(items.c.id == last.item_id).values(labels_live=items.c.labels_live - 1))
        conn.execute(delete(leases).where(leases.c.item_id == last.item_id, leases.c.user_id == user.id))
        conn.execute(insert(leases).values(item_id=last.item_id, user_id=user.id, leased_at=now,
                                           expires_at=now + last.lease_seconds))
    item = next_item(engine, user, now=now)
    return {"undone": last.id, **item}

