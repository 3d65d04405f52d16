"""One interface over a labeling server (``http://HOST:PORT`` and an owner token) or a labeling
database (a path or SQLAlchemy URL): push items, read the queue's counts and α, read its labels.
COOL-RLHF's live rounds and ``rlxf label push --server`` use it."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request

TOKEN_ENV = "RLXF_LABEL_TOKEN"  # the owner token for a server, read from the environment (not argv)


class LabelSourceError(RuntimeError):
    """The labeling server or database refused or could not be reached."""


def is_server(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def connect(spec: str, *, token: str | None = None):
    """A :class:`ServerClient` for an ``http(s)://`` URL (owner token: ``token`` or ``RLXF_LABEL_TOKEN``),
    else a :class:`DatabaseClient`."""
    if is_server(spec):
        token = token or os.environ.get(TOKEN_ENV)
        if not token:
            raise LabelSourceError(f"a labeling server needs an owner token: set {TOKEN_ENV}=<token from "
                                   "rlxf label add-user NAME --role owner>")
        return ServerClient(spec, token)
    return DatabaseClient(spec)


class ServerClient:
    """The JSON API of ``rlxf label serve`` (docs/labeling.md#api) over urllib."""

    def __init__(self, url: str, token: str, *, timeout: float = 60.0):
        self.url, self.token, self.timeout = url.rstrip("/"), token, timeout

    def request(self, method: str, path: str, body=None, *, raw: bool = False):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Authorization": f"Bearer {self.token}",
                                                  **({"Content-Type": "application/json"} if data else {})})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = response.read().decode()
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")
            try:
                detail = json.loads(detail)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                pass
            raise LabelSourceError(f"{method} {self.url}{path}: HTTP {err.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as err:
            raise LabelSourceError(f"cannot reach the labeling server {self.url}: {err}") from None
        return payload if raw else json.loads(payload)

    def push(self, queue: str, rows: list[dict], **options) -> dict:
        options = {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}
        return self.request("POST", "/api/owner/items", {"queue": queue, "rows": rows, **options})

    def stats(self, queue: str) -> dict:
        return self.request("GET", f"/api/owner/stats?queue={urllib.parse.quote(queue)}")["queues"][0]

    def labels(self, queue: str | None = None) -> list[dict]:
        where = "" if queue is None else f"&queue={urllib.parse.quote(queue)}"
        text = self.request("GET", f"/api/owner/export?format=labels{where}", raw=True)
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def close(self) -> None:
        pass


class DatabaseClient:
    """The same operations straight on the database (the server may run beside it: SQLite's WAL
    lets both work at once)."""

    def __init__(self, spec: str):
        from rlxf.labeling.schema import open_engine

        self.engine = open_engine(spec)

    def push(self, queue: str, rows: list[dict], **options) -> dict:
        from rlxf.labeling.items import push_items

        return push_items(self.engine, queue, rows, **options)

    def stats(self, queue: str) -> dict:
        from rlxf.labeling.report import queue_stats

        return queue_stats(self.engine, queue)[0]

    def labels(self, queue: str | None = None) -> list[dict]:
        from rlxf.labeling.report import label_rows

        return label_rows(self.engine, queue)

    def close(self) -> None:
        self.engine.dispose()
