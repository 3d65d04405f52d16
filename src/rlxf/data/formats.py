"""Row formats and validation (TRL-compatible).

Three kinds of rows, each in a *standard* form (strings) or a *conversational* form (message
lists rendered with the tokenizer's chat template):

- ``prompt``: ``prompt`` (+ any extra fields, e.g. ``answer``, kept for reward functions);
- ``sft``: ``prompt`` + ``completion``, or ``messages`` whose last message is the assistant's;
- ``preference``: ``prompt`` + ``chosen`` + ``rejected`` (+ optional finite ``chosen_score``,
  ``rejected_score``, ``margin``, and ``chosen_probability`` ∈ [0, 1], a soft label
  P(chosen ≻ rejected) such as an AI labeler's); conversational pairs may omit ``prompt`` when ``chosen`` and
  ``rejected`` are whole conversations sharing a prefix (TRL's "implicit prompt"), which becomes
  the prompt.

:func:`validate_rows` returns rows in one normalised shape per kind, so tokenization never has to
guess: ``sft`` rows always have ``prompt`` + ``completion``; ``preference`` rows always have
``prompt``, ``chosen``, ``rejected``, ``chosen_score``, ``rejected_score``, ``margin``,
``chosen_probability`` (None when absent). A message is ``{"role": ..., "content": str}``.

Every user-facing problem is a :class:`DataError` that says what is wrong, where
(``file:line``, ``file[index]`` or ``task:NAME[index]``, taken from the row's ``_where``) and how
to fix it.
"""

from __future__ import annotations

import logging
import math
from numbers import Real

log = logging.getLogger("rlxf.data")

KINDS = ("sft", "preference", "prompt", "kto")
ROLES = ("system", "developer", "user", "assistant", "tool")
SCORE_FIELDS = ("chosen_score", "rejected_score", "margin")
PROBABILITY_FIELD = "chosen_probability"  # soft label P(chosen ≻ rejected), RLAIF (Lee et al., arXiv 2309.00267)
MAX_REPORTED = 10   # problems listed in full in one error; the rest are counted
UNREADABLE = "_unreadable"  # key of a placeholder row: why its line/item could not be read as a row
SKIP_HINT = "--skip-invalid (skip_invalid=True in Python)"

EXPECTED = {
    "sft": "expected 'prompt' + 'completion', or 'messages' (a list of {'role', 'content'} "
           "ending with an assistant message)",
    "preference": "expected 'prompt' + 'chosen' + 'rejected', or conversational message lists",
    "prompt": "expected 'prompt': a string or a list of {'role', 'content'} messages",
    "kto": "expected 'prompt' + 'completion' + 'label' (true = desirable, false = undesirable), or a pair "
           "'prompt' + 'chosen' + 'rejected' (split into one desirable and one undesirable row)",
}


class DataError(ValueError):
    """A problem with the user's data: the message says what, where and how to fix it."""


class RowProblem(Exception):
    """One row is invalid; ``validate_rows`` collects these into a :class:`DataError`."""


def check_kind(kind: str) -> None:
    """Raise :class:`DataError` unless ``kind`` is one of :data:`KINDS`."""
    if kind not in KINDS:
        raise DataError(f"unknown data kind {kind!r}; use one of {', '.join(KINDS)}")


def row_where(row: dict, index: int) -> str:
    """The location of a row for messages: its ``_where`` or ``row INDEX``."""
    where = row.get("_where") if isinstance(row, dict) else None
    return where if where else f"row {index}"


def describe_problems(problems: list[str], *, total: int, what: str) -> str:
    """``problems`` (``"where: message"`` lines) as one text: every one of the first
    :data:`MAX_REPORTED` in full, then how many more there are."""
    if len(problems) == 1:
        return problems[0]
    shown = "\n".join(f"  {p}" for p in problems[:MAX_REPORTED])
    more = len(problems) - MAX_REPORTED
    tail = f"\n  ... and {more} more (fix the ones above and run again to see them)" if more > 0 else ""
    return f"{len(problems)} of {total} {what} are invalid:\n{shown}{tail}"


def raise_problems(problems: list[str], *, total: int, what: str, hint: str) -> None:
    """Raise one :class:`DataError` listing ``problems`` (:func:`describe_problems`) and ``hint``.

    ``what`` names the items (``"rows"``, ``"lines"``)."""
    if problems:
        raise DataError(f"{describe_problems(problems, total=total, what=what)}\n{hint}")


def validate_rows(rows: list[dict], *, kind: str, skip_invalid: bool = False,
                  skip_hint: str | None = SKIP_HINT) -> tuple[list[dict], int]:
    """Check and normalise ``rows`` of ``kind``; return ``(valid rows, number skipped)``.

    ``skip_invalid=False`` raises :class:`DataError` naming the first :data:`MAX_REPORTED` bad rows
    and the count; ``True`` drops bad rows and returns how many were dropped. Placeholder rows of
    unreadable lines (``load_rows(..., keep_invalid=True)``) are bad rows like any other.
    ``skip_hint`` is how the error tells the caller's user to skip bad rows (None: it does not).
    Normalised rows keep every extra field (``answer``, ``_where`` ...).
    """
    check_kind(kind)
    normalise = _NORMALISERS[kind]
    valid, problems = [], []
    for i, row in enumerate(rows):
        try:
            if isinstance(row, dict) and UNREADABLE in row:
                raise RowProblem(row[UNREADABLE])
            valid.append(normalise(row))
        except RowProblem as problem:
            problems.append(f"{row_where(row, i)}: {problem}")
    if problems and skip_invalid and valid:
        log.warning("dropping invalid rows (--skip-invalid, skip_invalid=True in Python):\n%s",
                    describe_problems(problems, total=len(rows), what=f"{kind} rows"))
    if problems and (not skip_invalid or not valid):
        if skip_invalid:
            hint = f"Every row is invalid: check that the data is of kind {kind!r}."
        elif skip_hint:
            hint = f"Fix or remove these rows, or pass {skip_hint} to drop them (the log counts them)."
        else:
            hint = "Fix or remove these rows."
        raise_problems(problems, total=len(rows), what=f"{kind} rows", hint=hint)
    if not valid:
        raise DataError(f"no valid {kind} rows among {len(rows)} ({EXPECTED[kind]})")
    return valid, len(problems)


# -- per-kind normalisers (raise RowProblem) -----------------------------------------------------

def _normalise_prompt(row: dict) -> dict:
    _check_is_dict(row)
    _require(row, "prompt", "prompt")
    _check_text_or_messages(row["prompt"], "prompt")
    return dict(row)


def _normalise_sft(row: dict) -> dict:
    _check_is_dict(row)
    if "messages" in row and "prompt" not in row and "completion" not in row:
        messages = _check_messages(row["messages"], "messages")
        _check_ends_with_assistant(messages, "messages")
        if len(messages) < 2:
            raise RowProblem("field 'messages' needs at least one message before the final "
                             "assistant message (the prompt)")
        out = {k: v for k, v in row.items() if k != "messages"}
        out["prompt"], out["completion"] = messages[:-1], messages[-1:]
        return out
    _require(row, "prompt", "sft")
    _require(row, "completion", "sft")
    _check_same_form(row, ("prompt", "completion"))
    if isinstance(row["completion"], list):
        _check_ends_with_assistant(row["completion"], "completion")
    return dict(row)


def _normalise_preference(row: dict) -> dict:
    _check_is_dict(row)
    _require(row, "chosen", "preference")
    _require(row, "rejected", "preference")
    out = dict(row)
    if "prompt" not in row or row["prompt"] is None:
        if not (isinstance(row["chosen"], list) and isinstance(row["rejected"], list)):
            raise RowProblem(f"field 'prompt' missing ({EXPECTED['preference']}; only conversational "
                             "'chosen'/'rejected' may carry the prompt as their shared first messages)")
        out["prompt"], out["chosen"], out["rejected"] = split_implicit_prompt(row["chosen"], row["rejected"])
    _check_same_form(out, ("prompt", "chosen", "rejected"))
    if isinstance(out["chosen"], list):
        _check_ends_with_assistant(out["chosen"], "chosen")
        _check_ends_with_assistant(out["rejected"], "rejected")
    for name in SCORE_FIELDS:
        out[name] = _check_score(row.get(name), name)
    out[PROBABILITY_FIELD] = _check_probability(row.get(PROBABILITY_FIELD), PROBABILITY_FIELD)
    return out


def _normalise_kto(row: dict) -> dict:
    """An unpaired row (TRL's format: prompt, completion, label) or a pair, left for `unpair_rows`."""
    _check_is_dict(row)
    if "label" not in row:
        if "chosen" in row or "rejected" in row:
            return _normalise_preference(row)
        raise RowProblem(f"field 'label' missing ({EXPECTED['kto']})")
    if not isinstance(row["label"], bool):
        raise RowProblem(f"field 'label' must be true or false (JSON booleans: true = desirable), got "
                         f"{type(row['label']).__name__} {row['label']!r}")
    return _normalise_sft({k: v for k, v in row.items() if k != "label"}) | {"label": row["label"]}


def unpair_rows(rows: list[dict]) -> list[dict]:
    """KTO rows from normalised ``kto`` rows: each pair becomes a desirable row (its chosen completion) and
    an undesirable one (its rejected completion), as TRL's ``unpair_preference_dataset``; unpaired rows
    pass unchanged. Extra fields are kept on both halves; ``pair_kind`` says where a row came from and
    ``pair_id`` (the same on both halves) which pair."""
    out = []
    for row in rows:
        if "label" in row:
            out.append(row)
            continue
        extra = {k: v for k, v in row.items() if k not in ("chosen", "rejected", *SCORE_FIELDS, PROBABILITY_FIELD)}
        pair = {"pair_id": len(out)}  # the desirable half's position: evaluation ranks the two halves
        out.append({**extra, **pair, "completion": row["chosen"], "label": True})
        out.append({**extra, **pair, "completion": row["rejected"], "label": False})
    return out


_NORMALISERS = {"prompt": _normalise_prompt, "sft": _normalise_sft, "preference": _normalise_preference,
                "kto": _normalise_kto}


def split_implicit_prompt(chosen: list, rejected: list) -> tuple[list, list, list]:
    """Split two conversations sharing a prefix into ``(prompt, chosen tail, rejected tail)``.

    The prompt is the longest common prefix of messages; both tails must be non-empty.
    """
    chosen = _check_messages(chosen, "chosen")
    rejected = _check_messages(rejected, "rejected")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise RowProblem("field 'prompt' missing and 'chosen'/'rejected' share no first message to use "
                         "as the prompt (add 'prompt', or start both conversations with the same messages)")
    if shared == len(chosen) or shared == len(rejected):
        raise RowProblem("'chosen' and 'rejected' do not differ after their shared prompt messages "
                         "(each needs its own final assistant message)")
    return chosen[:shared], chosen[shared:], rejected[shared:]


# -- field checks ---------------------------------------------------------------------------------

def _check_is_dict(row) -> None:
    if not isinstance(row, dict):
        raise RowProblem(f"a row must be an object with named fields, got {type(row).__name__}")


def _require(row: dict, field: str, kind: str) -> None:
    if field not in row or row[field] is None:
        raise RowProblem(f"field '{field}' missing ({EXPECTED[kind]})")


def _check_text_or_messages(value, field: str) -> None:
    if isinstance(value, str):
        if not value.strip():
            raise RowProblem(f"field '{field}' is an empty string")
    elif isinstance(value, list):
        _check_messages(value, field)
    else:
        raise RowProblem(f"field '{field}' must be a string or a list of messages, "
                         f"got {type(value).__name__}")


def _check_same_form(row: dict, fields: tuple[str, ...]) -> None:
    """All ``fields`` are strings (standard form) or all are message lists (conversational)."""
    for field in fields:
        _check_text_or_messages(row[field], field)
    forms = {isinstance(row[f], list) for f in fields}
    if len(forms) > 1:
        listing = ", ".join(f"'{f}' is {'a message list' if isinstance(row[f], list) else 'a string'}"
                            for f in fields)
        raise RowProblem(f"mixed formats: {listing}; use strings for all of them or message lists "
                         "for all of them")


def _check_messages(messages, field: str) -> list:
    if not isinstance(messages, list):
        raise RowProblem(f"field '{field}' must be a list of messages, got {type(messages).__name__}")
    if not messages:
        raise RowProblem(f"field '{field}' is an empty message list")
    for j, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise RowProblem(f"field '{field}' message {j} must be an object with 'role' and 'content', "
                             f"got {message!r:.80}")
        if message["role"] not in ROLES:
            raise RowProblem(f"field '{field}' message {j} has unknown role {message['role']!r} "
                             f"(use one of {', '.join(ROLES)})")
        if not isinstance(message["content"], str):
            raise RowProblem(f"field '{field}' message {j} content must be a string, "
                             f"got {type(message['content']).__name__}")
    return messages


def _check_ends_with_assistant(messages: list, field: str) -> None:
    last = messages[-1]
    if last["role"] != "assistant":
        raise RowProblem(f"field '{field}' must end with an assistant message, ends with role {last['role']!r}")
    if not last["content"].strip():
        raise RowProblem(f"field '{field}' ends with an empty assistant message")


def _check_score(value, field: str) -> float | None:
    """``None`` stays absent; anything else must be a finite real number (bools are not)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Real):
        raise RowProblem(f"field '{field}' must be a number, got {value!r:.40}")
    try:
        value = float(value)
    except OverflowError:  # an integer too large for a float
        raise RowProblem(f"field '{field}' must be finite, got an integer too large for a float") from None
    if not math.isfinite(value):
        raise RowProblem(f"field '{field}' must be finite, got {value}")
    return value


def _check_probability(value, field: str) -> float | None:
    """``None`` stays absent; anything else must be a number in [0, 1]."""
    value = _check_score(value, field)
    if value is not None and not 0.0 <= value <= 1.0:
        raise RowProblem(f"field '{field}' is a probability and must be in [0, 1], got {value}")
    return value
