"""Where a reward file came from: the strict header of files written by ``rlxf text2reward``.

A file written by ``rlxf text2reward`` starts, byte for byte, with :data:`HEADER` (no byte-order
mark, nothing before it). :func:`classify` reads a ``.py`` file and answers:

- ``"model-written"`` — the first line is :data:`HEADER` (or the exact legacy first line
  ``# rlxf: sandboxed``): the file always runs in the sandbox, never in the training process;
- ``"user"`` — no line of the file looks like an rlxf marker: the user's own code, loaded in-process
  like any module they import;
- anything in between raises :class:`ProvenanceError`: a line anywhere in the file that looks like
  an rlxf marker (``# rlxf: ...``, ``#rlxf-...``, ``rlxf-provenance``) but is not the exact first
  line, a header after a byte-order mark, a variant such as ``# rlxf: sandboxed (reviewed)``. Such
  a file is refused, never run in-process: the rule fails safe.
"""

from __future__ import annotations

import re
from pathlib import Path

HEADER = "# rlxf-provenance: model-written; tool=rlxf text2reward; format=1"
LEGACY_HEADER = "# rlxf: sandboxed"
_MARKER = re.compile(r"^\s*#\s*rlxf\s*[:\-_]|rlxf-provenance", re.IGNORECASE)
_BOM = b"\xef\xbb\xbf"


class ProvenanceError(ValueError):
    """A file whose rlxf header is malformed: it is neither plainly the user's nor plainly rlxf's."""


def classify(path: str | Path) -> str:
    """``"model-written"`` or ``"user"`` for the file at ``path``; raises :class:`ProvenanceError`."""
    path = Path(path)
    raw = path.read_bytes()
    bom = raw.startswith(_BOM)
    text = raw[len(_BOM):].decode("utf-8", errors="replace") if bom else raw.decode("utf-8", errors="replace")
    lines = text.splitlines()
    first = lines[0] if lines else ""
    if not bom and first in (HEADER, LEGACY_HEADER):
        for number, line in enumerate(lines[1:], start=2):
            if _MARKER.search(line):
                raise ProvenanceError(_message(path, number, line, "a second rlxf marker after the header"))
        return "model-written"
    for number, line in enumerate(lines, start=1):
        if _MARKER.search(line):
            why = "a byte-order mark before it" if bom and number == 1 else (
                "not the exact first line" if number > 1 else "not exactly the rlxf header")
            raise ProvenanceError(_message(path, number, line, why))
    return "user"


def _message(path: Path, number: int, line: str, why: str) -> str:
    return (f"{path}:{number}: {line.strip()[:80]!r} looks like an rlxf provenance marker but is {why}. rlxf "
            f"runs a file written by `rlxf text2reward` only in its sandbox, and recognises it only by the exact "
            f"first line {HEADER!r}; it refuses anything in between rather than guess. Regenerate the file with "
            "`rlxf text2reward`, run it explicitly sandboxed with --reward sandbox:FILE.py:FUNCTION, or, if this "
            "is your own code, remove or reword that line")
