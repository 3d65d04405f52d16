"""On-disk JSON cache for judge calls: one file per key, written atomically.

The key is the SHA-256 of the canonical JSON of what was asked (sorted keys, no whitespace), so a
judgement already made — by this process or an earlier run pointed at the same directory — is
never asked again. Files live at ``<dir>/<key[:2]>/<key>.json``; a write goes to a temporary file
that is renamed into place, so concurrent threads or processes never see half a file. Only
successful answers are stored: a failure is retried the next time it is asked.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path


def cache_key(payload) -> str:
    """SHA-256 hex digest of the canonical JSON of ``payload``."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class JsonCache:
    """``get(key) -> value | None`` and ``put(key, value)`` over a directory of JSON files."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str):
        """The stored value, or None when absent or unreadable (an unreadable file is a miss)."""
        try:
            with open(self._path(key), encoding="utf-8") as f:
                return json.load(f)["value"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, key: str, value) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"value": value}, f)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
