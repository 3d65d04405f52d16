"""Judges: a model's opinion as labels — pairwise preferences (RLAIF / Constitutional AI), 1–10
ratings (d-RLAIF) and LMGT reward shifts — from a local model or any OpenAI-compatible server.

``build_judge("local:tiny")`` or ``build_judge("http://127.0.0.1:8000/v1")`` gives a :class:`Judge`;
docs/judges.md describes the backends, prompts, caching, retries and position-bias control.
The backends are imported lazily (the HTTP one needs only the standard library).
"""

from rlxf.judges.base import ChatBackend, Judge, JudgeError, build_judge
from rlxf.judges.prompts import COMPACT, PROMPT_SETS, STANDARD, JudgePrompts, get_prompts

__all__ = ["COMPACT", "PROMPT_SETS", "STANDARD", "ChatBackend", "HTTPBackend", "Judge", "JudgeError",
           "JudgePrompts", "LocalBackend", "build_judge", "get_prompts"]


def __getattr__(name: str):
    if name == "LocalBackend":
        from rlxf.judges.local import LocalBackend

        return LocalBackend
    if name == "HTTPBackend":
        from rlxf.judges.http import HTTPBackend

        return HTTPBackend
    raise AttributeError(f"module 'rlxf.judges' has no attribute {name!r}")
