"""The labeling database: tables (SQLAlchemy Core), the engine and versioned migrations.

Any SQLAlchemy URL works; a plain path means a SQLite file. SQLite runs in WAL mode with
``synchronous=FULL`` (a committed label is on disk before the answer is sent, so killing the server
loses none), foreign keys on, and every transaction opened with ``BEGIN IMMEDIATE``: the
transaction that hands out an item holds the write lock from its first read, so two labelers can
never take the same item (docs/labeling.md#database-concurrency-and-durability). Other databases get row locks
(``SELECT … FOR UPDATE SKIP LOCKED``) where the dialect has them.

Migrations: :data:`MIGRATIONS` is an ordered list of ``(version, description, function)``; the
``schema_version`` table records the ones applied, and :func:`migrate` runs the missing ones in
order, each with its record in one transaction (a failing step leaves the previous version). A
database written by a newer rlxf (a version this code does not know) is refused. This replaces
Alembic on purpose: the schema is a few tables, and a list of functions needs no extra dependency,
no ``env.py`` and no script directory shipped as package data.
"""

from __future__ import annotations

import threading
import time
import weakref
from contextlib import contextmanager, nullcontext
from pathlib import Path

from sqlalchemy import (Column, Float, ForeignKey, Index, Integer, MetaData, String, Table, Text, UniqueConstraint,
                        create_engine, event, inspect, select, text)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError

metadata = MetaData()

users = Table(
    "users", metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("role", String(16), nullable=False),            # owner | labeler
    Column("token_hash", String(64), nullable=False, unique=True),  # sha256 hex of the token
    Column("created_at", Float, nullable=False),
)
queues = Table(
    "queues", metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("kind", String(16), nullable=False),            # compare | rate | edit
    Column("scale", String(16), nullable=False),           # rate: thumbs | 1-7; others: ""
    Column("overlap", Integer, nullable=False),            # distinct labelers wanted per item
    Column("lease_seconds", Float, nullable=False),
    Column("created_at", Float, nullable=False),
)
members = Table(
    "members", metadata,
    Column("queue_id", ForeignKey("queues.id", ondelete="CASCADE"), primary_key=True),
    Column("user_id", ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
)
items = Table(
    "items", metadata,
    Column("id", Integer, primary_key=True),
    Column("queue_id", ForeignKey("queues.id", ondelete="CASCADE"), nullable=False),
    Column("key", String(200), nullable=False),            # the pusher's id of the item (unique per queue)
    Column("version", Integer, nullable=False),            # +1 whenever a push changes its content
    Column("prompt", Text, nullable=False),
    Column("completions", Text, nullable=False),           # JSON list of strings
    Column("condition", Text, nullable=True),              # COOL-RLHF domain / condition
    Column("meta", Text, nullable=False),                  # JSON object of the pusher's other fields
    Column("priority", Float, nullable=False),             # handed out highest first
    Column("labels_live", Integer, nullable=False),        # live labels of the current version (kept in step)
    Column("created_at", Float, nullable=False),
    UniqueConstraint("queue_id", "key"),
    Index("ix_items_order", "queue_id", "priority", "id"),
)
leases = Table(
    "leases", metadata,
    Column("item_id", ForeignKey("items.id", ondelete="CASCADE"), primary_key=True),
    Column("user_id", ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    Column("leased_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Index("ix_leases_user", "user_id", "expires_at"),
)
labels = Table(
    "labels", metadata,
    Column("id", Integer, primary_key=True),
    Column("item_id", ForeignKey("items.id", ondelete="CASCADE"), nullable=False),
    Column("item_version", Integer, nullable=False),
    Column("user_id", ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("choice", String(16), nullable=True),           # compare: "0", "1", ..., "tie", "both_bad"
    Column("rating", Integer, nullable=True),              # rate: thumbs 0/1, or 1..7
    Column("edit", Text, nullable=True),                   # edit: the corrected completion
    Column("reason", Text, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("seconds", Float, nullable=True),               # from hand-out to label
    Column("undone_at", Float, nullable=True),             # undo keeps the row, out of every count
    Index("ix_labels_user", "user_id", "id"),
    Index("ix_labels_item", "item_id", "item_version"),
    # one live label per labeler and item version: a replayed POST cannot double it
    Index("ux_labels_live", "item_id", "item_version", "user_id", unique=True,
          sqlite_where=text("undone_at IS NULL"), postgresql_where=text("undone_at IS NULL")),
)
sessions = Table(
    "sessions", metadata,
    Column("token_hash", String(64), primary_key=True),    # sha256 hex of the cookie value
    Column("user_id", ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("csrf", String(64), nullable=False),
    Column("expires_at", Float, nullable=False),
)
schema_version = Table(
    "schema_version", metadata,
    Column("version", Integer, primary_key=True),
    Column("description", Text, nullable=False),
    Column("applied_at", Float, nullable=False),
)


def _create_tables(conn) -> None:
    metadata.create_all(conn, tables=[users, queues, members, items, leases, labels, sessions])


MIGRATIONS: list[tuple[int, str, object]] = [
    (1, "users, queues, members, items, leases, labels, sessions", _create_tables),
]


class SchemaError(RuntimeError):
    """The database cannot be used by this version of rlxf."""


def database_url(spec: str) -> str:
    """A SQLAlchemy URL from ``spec``: a URL as given, a plain path as a SQLite file."""
    if "://" in spec:
        try:
            make_url(spec)
        except ArgumentError as err:
            raise ValueError(f"--db {spec!r} is not a database URL ({err}); give a SQLAlchemy URL such as "
                             "sqlite:///labels.db or postgresql://user@host/db, or a file path") from None
        return spec
    if not spec.strip():
        raise ValueError("--db is empty; give a file path (a SQLite database) or a SQLAlchemy URL")
    return f"sqlite:///{Path(spec).expanduser().resolve()}"


def open_engine(spec: str, *, upgrade: bool = True) -> Engine:
    """An engine for ``spec`` (:func:`database_url`), migrated to the newest schema (``upgrade``)."""
    url = database_url(spec)
    sqlite = make_url(url).get_backend_name() == "sqlite"
    if sqlite:
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False}, pool_size=8,
                               max_overflow=56, pool_timeout=120)
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
        _WRITE_LOCKS[engine] = threading.Lock()
    else:
        try:
            engine = create_engine(url, pool_pre_ping=True)
        except (ImportError, ArgumentError) as err:
            raise ValueError(f"--db {make_url(url)}: cannot open this database ({err}); install its driver "
                             "(PostgreSQL: pip install psycopg2-binary) or check the URL") from None
    if upgrade:
        migrate(engine)
    return engine


_WRITE_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextmanager
def transaction(engine: Engine):
    """``engine.begin()``; on SQLite behind a per-engine lock, so the threads of one server queue
    for the database's write lock in this process instead of in SQLite's busy-wait loop (which
    sleeps and retries, and under load lets some requests wait for seconds). Other processes on
    the same file still wait in SQLite (``busy_timeout`` 60 s)."""
    lock = _WRITE_LOCKS.get(engine, nullcontext())
    with lock, engine.begin() as conn:
        yield conn


def _sqlite_connect(dbapi_connection, _record) -> None:
    dbapi_connection.isolation_level = None  # the "begin" listener opens each transaction itself
    cursor = dbapi_connection.cursor()
    for pragma in ("journal_mode=WAL", "synchronous=FULL", "foreign_keys=ON", "busy_timeout=60000"):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


def current_version(engine: Engine) -> int:
    """The newest migration applied to the database (0 for an empty one)."""
    with engine.connect() as conn:
        if not inspect(conn).has_table("schema_version"):
            return 0
        return _version(conn)


def _version(conn) -> int:
    return conn.execute(select(schema_version.c.version).order_by(schema_version.c.version.desc())).scalar() or 0


def migrate(engine: Engine, *, to: int | None = None) -> int:
    """Apply the missing migrations (up to ``to``, default all); returns the version reached. Each
    step reads the version in its own transaction, so two processes opening a new database at
    once apply every step once."""
    newest = MIGRATIONS[-1][0]
    with engine.begin() as conn:
        schema_version.create(conn, checkfirst=True)
        version = _version(conn)
    if version > newest:
        raise SchemaError(f"the labeling database is at schema version {version}, newer than this rlxf knows "
                          f"({newest}); upgrade rlxf to use it")
    for number, description, step in MIGRATIONS:
        if number <= version or (to is not None and number > to):
            continue
        with engine.begin() as conn:
            if _version(conn) >= number:
                continue
            step(conn)
            conn.execute(schema_version.insert().values(version=number, description=description,
                                                        applied_at=time.time()))
        version = number
    return version
