"""Users, tokens, browser sessions and queues of the labeling database.

A token is 32 random bytes (``secrets.token_urlsafe``), shown once; the database keeps only its
SHA-256, and a presented token is hashed and compared in constant time (``hmac.compare_digest``).
A browser session is a second random token in an HTTP-only cookie, stored hashed too, with its own
CSRF token that every cookie-authenticated POST must echo in ``X-CSRF-Token``
(docs/labeling.md#safety).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import delete, insert, select
from sqlalchemy.exc import IntegrityError

from rlxf.labeling.schema import members, queues, sessions, transaction, users
from rlxf.runtime.http import RequestError

ROLES = ("owner", "labeler")
KINDS = ("compare", "rate", "edit")
SCALES = {"compare": ("",), "rate": ("thumbs", "1-7"), "edit": ("",)}
SESSION_SECONDS = 12 * 3600
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class LabelingError(RequestError):
    """A request or command the labeling store refuses; ``status`` is its HTTP status."""


@dataclass(frozen=True)
class User:
    id: int
    name: str
    role: str


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise LabelingError(f"{what} {name!r} is not a valid name: use 1-64 letters, digits, '_', '.' or '-', "
                            "starting with a letter or digit")
    return name


def add_user(engine, name: str, *, role: str | None = None, queue_names: tuple[str, ...] = ("default",)) -> str:
    """Create user ``name`` with ``role`` (default labeler), or give an existing one a new token
    (and ``role`` when given; its sessions end); make it a member of ``queue_names`` (created as
    compare queues when missing). Returns the new token."""
    check_name(name, "user")
    if role is not None and role not in ROLES:
        raise LabelingError(f"role {role!r} is unknown; use one of {', '.join(ROLES)}")
    token = secrets.token_urlsafe(32)
    with transaction(engine) as conn:
        row = conn.execute(select(users.c.id, users.c.role).where(users.c.name == name)).first()
        if row is None:
            user_id = conn.execute(insert(users).values(name=name, role=role or "labeler", token_hash=hash_token(token),
                                                        created_at=time.time())).inserted_primary_key[0]
        else:
            user_id = row.id
            conn.execute(users.update().where(users.c.id == user_id).values(token_hash=hash_token(token),
                                                                             role=role or row.role))
            conn.execute(delete(sessions).where(sessions.c.user_id == user_id))  # the old token's sessions end
        for queue in queue_names:
            queue_id = ensure_queue(conn, queue)
            if conn.execute(select(members).where(members.c.queue_id == queue_id,
                                                  members.c.user_id == user_id)).first() is None:
                conn.execute(insert(members).values(queue_id=queue_id, user_id=user_id))
    return token


def user_for_token(engine, token: str) -> User | None:
    """The user whose token this is, or None."""
    if not token or len(token) > 512:
        return None
    digest = hash_token(token)
    with transaction(engine) as conn:
        row = conn.execute(select(users).where(users.c.token_hash == digest)).first()
    if row is None or not hmac.compare_digest(row.token_hash, digest):
        return None
    return User(row.id, row.name, row.role)


def start_session(engine, user: User) -> tuple[str, str]:
    """A new browser session of ``user``: ``(cookie value, CSRF token)``."""
    cookie, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    now = time.time()
    with transaction(engine) as conn:
        conn.execute(delete(sessions).where(sessions.c.expires_at <= now))
        conn.execute(insert(sessions).values(token_hash=hash_token(cookie), user_id=user.id, csrf=csrf,
                                             expires_at=now + SESSION_SECONDS))
    return cookie, csrf


def session_user(engine, cookie: str) -> tuple[User, str] | None:
    """``(user, CSRF token)`` of a live session cookie, or None."""
    if not cookie or len(cookie) > 512:
        return None
    digest = hash_token(cookie)
    with transaction(engine) as conn:
        row = conn.execute(select(sessions.c.token_hash, sessions.c.csrf, sessions.c.expires_at, users.c.id,
                                  users.c.name, users.c.role).join(users, users.c.id == sessions.c.user_id)
                           .where(sessions.c.token_hash == digest)).first()
    if row is None or row.expires_at <= time.time() or not hmac.compare_digest(row.token_hash, digest):
        return None
    return User(row.id, row.name, row.role), row.csrf


def end_session(engine, cookie: str) -> None:
    with transaction(engine) as conn:
        conn.execute(delete(sessions).where(sessions.c.token_hash == hash_token(cookie)))


def ensure_queue(conn, name: str, *, kind: str = "compare", scale: str = "", overlap: int = 1,
                 lease_seconds: float = 600.0, assign: tuple[str, ...] = ()) -> int:
    """The id of queue ``name``, created with these settings when missing; an existing queue must
    have the same kind and scale (its overlap and lease time are updated). ``assign``: user names
    made members."""
    check_name(name, "queue")
    if kind not in KINDS:
        raise LabelingError(f"queue kind {kind!r} is unknown; use one of {', '.join(KINDS)}")
    scale = scale or SCALES[kind][0]
    if scale not in SCALES[kind]:
        raise LabelingError(f"a {kind} queue takes scale {' or '.join(repr(s) for s in SCALES[kind])}, "
                            f"got {scale!r}")
    if not (isinstance(overlap, int) and 1 <= overlap <= 100):
        raise LabelingError(f"overlap (labelers per item) must be an integer in 1..100, got {overlap!r}")
    if not (1 <= lease_seconds <= 7 * 24 * 3600):
        raise LabelingError(f"lease time must be 1 s .. 7 days, got {lease_seconds!r}")
    row = conn.execute(select(queues).where(queues.c.name == name)).first()
    if row is None:
        try:
            queue_id = conn.execute(insert(queues).values(
                name=name, kind=kind, scale=scale, overlap=overlap, lease_seconds=float(lease_seconds),
                created_at=time.time())).inserted_primary_key[0]
        except IntegrityError:
            raise LabelingError(f"queue {name!r} was created at the same time; retry", status=409) from None
    else:
        queue_id = row.id
    _assign(conn, queue_id, assign)
    return queue_id


def configure_queue(conn, name: str, *, kind: str, scale: str, overlap: int, lease_seconds: float,
                    assign: tuple[str, ...] = ()) -> int:
    """:func:`ensure_queue`, and an existing queue must match ``kind``/``scale``; its overlap and
    lease time become these."""
    queue_id = ensure_queue(conn, name, kind=kind, scale=scale, overlap=overlap, lease_seconds=lease_seconds,
                            assign=assign)
    row = conn.execute(select(queues).where(queues.c.id == queue_id)).first()
    scale = scale or SCALES[kind][0]
    if (row.kind, row.scale) != (kind, scale):
        raise LabelingError(f"queue {name!r} holds {row.kind} items{f' on scale {row.scale}' if row.scale else ''}; "
                            f"push {kind} items to another queue (--queue)", status=409)
    conn.execute(queues.update().where(queues.c.id == queue_id).values(overlap=overlap,
                                                                       lease_seconds=float(lease_seconds)))
    return queue_id


def _assign(conn, queue_id: int, names: tuple[str, ...]) -> None:
    """Make ``names`` members of the queue; ``*`` stands for every labeler."""
    if "*" in names:
        every = conn.execute(select(users.c.name).where(users.c.role == "labeler")).scalars()
        names = tuple(dict.fromkeys([n for n in names if n != "*"] + list(every)))
    for name in names:
        user_id = conn.execute(select(users.c.id).where(users.c.name == name)).scalar()
        if user_id is None:
            raise LabelingError(f"no user {name!r} to assign; create it first with rlxf label add-user {name}",
                                status=404)
        if conn.execute(select(members).where(members.c.queue_id == queue_id,
                                              members.c.user_id == user_id)).first() is None:
            conn.execute(insert(members).values(queue_id=queue_id, user_id=user_id))
