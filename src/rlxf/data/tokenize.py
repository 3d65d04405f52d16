"""Tokenization with prompt masking and an explicit truncation policy.

Input rows are normalised rows from :func:`rlxf.data.validate_rows`.

Encoding
    - standard (strings): prompt ids = ``tokenizer(prompt)`` with special tokens (so ``<bos>`` when
      the tokenizer adds one); completion ids = ``tokenizer(completion, add_special_tokens=False)``
      + ``[eos]`` unless it already ends with eos.
    - conversational (message lists): prompt ids = ``apply_chat_template(prompt,
      add_generation_prompt=True)``; completion ids = the tail that
      ``apply_chat_template(prompt + completion)`` adds after them. The prompt rendering must be a
      prefix of the full rendering (else :class:`DataError` naming the row). The completion must
      end with eos: when the template closes the turn with eos followed only by whitespace tokens
      (e.g. ``<|im_end|>\\n``) the whitespace is dropped, since generation stops at eos; otherwise
      eos is appended.

Truncation (``max_length`` bounds prompt + completion; ``max_prompt_length`` bounds the prompt)
    - ``"truncate"``: a prompt that alone has >= ``max_length`` tokens is dropped. A prompt longer
      than an explicit ``max_prompt_length`` keeps its last ``max_prompt_length`` tokens. When
      prompt + completion still exceeds ``max_length``, the prompt is left-truncated only as far
      as needed and never below its limit (``max_prompt_length``, default ``max_length // 2``),
      then the completion is cut on the right (losing its eos). Any cut counts as ``truncated``.
    - ``"drop"``: any row that does not fit is dropped.
    For preference rows the longer of chosen/rejected decides; both share the same prompt.

:class:`TokenStats` counts rows in/out, truncated and dropped; it is logged on the ``rlxf.data``
logger whenever something was truncated or dropped. If every row is dropped, :class:`DataError`
says ``max_length`` is too small and gives the longest prompt.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from rlxf.data.formats import PROBABILITY_FIELD, SCORE_FIELDS, DataError, row_where

logger = logging.getLogger("rlxf.data")
TRUNCATION_POLICIES = ("truncate", "drop")


@dataclass
class TokenStats:
    """What tokenization did to the rows."""

    rows_in: int = 0
    rows_out: int = 0
    truncated: int = 0
    dropped: int = 0

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"{self.rows_out}/{self.rows_in} rows kept, {self.truncated} truncated, "
                f"{self.dropped} dropped")


# -- public API ---------------------------------------------------------------------------------

def tokenize_sft(rows: list[dict], tokenizer, *, max_length: int,
                 truncation: str = "truncate") -> tuple[list[dict], TokenStats]:
    """Encode SFT rows as ``{"input_ids", "completion_mask"}`` (mask 1 on completion tokens incl. eos)."""
    _check_limits(max_length, None, truncation)
    encoded = _encode_rows(rows, tokenizer, completion_fields=("completion",))
    stats, examples, longest_prompt = TokenStats(rows_in=len(rows)), [], 0
    for prompt_ids, (completion_ids,) in encoded:
        longest_prompt = max(longest_prompt, len(prompt_ids))
        fitted = fit_lengths(prompt_ids, [completion_ids], max_length=max_length,
                             max_prompt_length=None, truncation=truncation)
        if _count(stats, fitted):
            prompt_ids, (completion_ids,) = fitted[0], fitted[1]
            examples.append({"input_ids": prompt_ids + completion_ids,
                             "completion_mask": [0] * len(prompt_ids) + [1] * len(completion_ids)})
    _finish(stats, max_length, longest_prompt, "sft", truncation=truncation)
    return examples, stats


def tokenize_kto(rows: list[dict], tokenizer, *, max_length: int, max_prompt_length: int | None = None,
                 truncation: str = "truncate") -> tuple[list[dict], TokenStats]:
    """Encode unpaired KTO rows (`rlxf.data.formats.unpair_rows`) as ``{"prompt_ids", "completion_ids",
    "label", "pair_kind", "pair_id"}``; the completion ends with eos unless truncated."""
    return _fit_rows(rows, tokenizer, ("completion",), "kto", max_length=max_length,
                     max_prompt_length=max_prompt_length, truncation=truncation,
                     build=lambda row, prompt_ids, completions: {
                         "prompt_ids": prompt_ids, "completion_ids": completions[0], "label": row["label"],
                         "pair_kind": row.get("pair_kind"), "pair_id": row.get("pair_id")})


def tokenize_preference(rows: list[dict], tokenizer, *, max_length: int, max_prompt_length: int | None = None,
                        truncation: str = "truncate") -> tuple[list[dict], TokenStats]:
    """Encode preference rows as ``{"prompt_ids", "chosen_ids", "rejected_ids", "chosen_score",
    "rejected_score", "margin", "chosen_probability", "pair_kind"}``; chosen/rejected ids are
    completion ids, each ending with eos unless truncated; scores and the soft label are None when absent; ``pair_kind`` (None when absent) lets
    evaluation report accuracy per kind of pair."""
    return _fit_rows(rows, tokenizer, ("chosen", "rejected"), "preference", max_length=max_length,
                     max_prompt_length=max_prompt_length, truncation=truncation,
                     build=lambda row, prompt_ids, completions: {
                         "prompt_ids": prompt_ids, "chosen_ids": completions[0], "rejected_ids": completions[1],
                         **{name: row.get(name) for name in SCORE_FIELDS},
                         PROBABILITY_FIELD: row.get(PROBABILITY_FIELD), "pair_kind": row.get("pair_kind")})


def _fit_rows(rows: list[dict], tokenizer, fields: tuple[str, ...], kind: str, *, max_length: int,
              max_prompt_length: int | None, truncation: str, build) -> tuple[list[dict], TokenStats]:
    """Encode a prompt and the completion ``fields`` of each row, apply the truncation policy, and
    ``build(row, prompt_ids, completions)`` one example per kept row."""
    _check_limits(max_length, max_prompt_length, truncation)
    encoded = _encode_rows(rows, tokenizer, completion_fields=fields)
    stats, examples, longest_prompt = TokenStats(rows_in=len(rows)), [], 0
    for row, (prompt_ids, completions) in zip(rows, encoded):
        longest_prompt = max(longest_prompt, len(prompt_ids))
        fitted = fit_lengths(prompt_ids, completions, max_length=max_length,
                             max_prompt_length=max_prompt_length, truncation=truncation)
        if _count(stats, fitted):
            examples.append(build(row, fitted[0], fitted[1]))
    _finish(stats, max_length, longest_prompt, kind, truncation=truncation)
    return examples, stats


def tokenize_prompts(rows: list[dict], tokenizer, *, max_prompt_length: int,
                     truncation: str = "drop") -> tuple[list[dict], TokenStats]:
    """Encode prompt rows as ``{"prompt_ids", **row}`` (the row's fields, ``prompt`` included, are
    kept for reward functions).

    Deviation from the other tokenizers: the default policy is ``"drop"``, because a
    left-truncated prompt is a different problem whose reference answer may no longer hold;
    ``"truncate"`` keeps the last ``max_prompt_length`` tokens.
    """
    _check_limits(max_prompt_length, None, truncation)
    encoded = _encode_rows(rows, tokenizer, completion_fields=())
    stats, examples, longest_prompt = TokenStats(rows_in=len(rows)), [], 0
    for row, (prompt_ids, _) in zip(rows, encoded):
        longest_prompt = max(longest_prompt, len(prompt_ids))
        if len(prompt_ids) > max_prompt_length:
            if truncation == "drop":
                stats.dropped += 1
                continue
            prompt_ids = prompt_ids[-max_prompt_length:]
            stats.truncated += 1
        stats.rows_out += 1
        examples.append({**row, "prompt_ids": prompt_ids})
    _finish(stats, max_prompt_length, longest_prompt, "prompt", truncation=truncation,
            limit_name="max_prompt_length")
    return examples, stats


def fit_lengths(prompt_ids: list[int], completions: list[list[int]], *, max_length: int,
                max_prompt_length: int | None, truncation: str):
    """Apply the truncation policy to one prompt and its completions (see the module docstring).

    Returns ``None`` when the row is dropped, else ``(prompt_ids, completions, truncated: bool)``.
    """
    longest = max(len(c) for c in completions)
    prompt_over = max_prompt_length is not None and len(prompt_ids) > max_prompt_length
    if len(prompt_ids) + longest <= max_length and not prompt_over:
        return prompt_ids, completions, False
    if truncation == "drop" or len(prompt_ids) >= max_length:
        return None
    if prompt_over:
        prompt_ids = prompt_ids[-max_prompt_length:]
    if len(prompt_ids) + longest > max_length:
        prompt_limit = max_length // 2 if max_prompt_length is None else max_prompt_length
        keep = min(len(prompt_ids), max(prompt_limit, max_length - longest))
        prompt_ids = prompt_ids[len(prompt_ids) - keep:]
        completions = [c[:max_length - len(prompt_ids)] for c in completions]
    return prompt_ids, completions, True


# -- encoding -----------------------------------------------------------------------------------

def _encode_rows(rows: list[dict], tokenizer, *, completion_fields: tuple[str, ...]):
    """Return ``[(prompt_ids, [completion_ids per field])]`` for each row, in order.

    Standard rows are encoded in one batched tokenizer call per field (fast tokenizers
    parallelise it); conversational rows go through the chat template one by one.
    """
    eos_id = _eos_id(tokenizer) if completion_fields else None
    out: list = [None] * len(rows)
    standard = [i for i, row in enumerate(rows) if isinstance(row["prompt"], str)]
    if standard:
        prompts = _batch_ids(tokenizer, [rows[i]["prompt"] for i in standard], add_special_tokens=True)
        tails = [_batch_ids(tokenizer, [rows[i][f] for i in standard], add_special_tokens=False)
                 for f in completion_fields]
        for k, i in enumerate(standard):
            out[i] = (prompts[k], [_with_eos(t[k], eos_id) for t in tails])
    for i, row in enumerate(rows):
        if out[i] is None:
            out[i] = _encode_conversation(row, tokenizer, completion_fields, eos_id, row_where(row, i))
    return out


def _batch_ids(tokenizer, texts: list[str], *, add_special_tokens: bool) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]


def _with_eos(ids: list[int], eos_id: int) -> list[int]:
    return ids if ids and ids[-1] == eos_id else ids + [eos_id]


def _encode_conversation(row: dict, tokenizer, completion_fields, eos_id, where: str):
    prompt = row["prompt"]
    if not isinstance(prompt, list):
        raise DataError(f"{where}: 'prompt' must be a string or a message list; run validate_rows first")
    prompt_ids = _chat_ids(tokenizer, prompt, add_generation_prompt=True, where=where)
    completions = []
    for field in completion_fields:
        full_ids = _chat_ids(tokenizer, prompt + row[field], add_generation_prompt=False, where=where)
        if full_ids[:len(prompt_ids)] != prompt_ids:
            raise DataError(
                f"{where}: the tokenizer's chat template does not render the prompt (with the generation "
                f"prompt) as a prefix of prompt + '{field}', so the completion tokens cannot be located; "
                f"use the standard string format for this data or a chat template with that property")
        completions.append(_close_with_eos(full_ids[len(prompt_ids):], tokenizer, eos_id))
    return prompt_ids, completions


def _chat_ids(tokenizer, messages: list[dict], *, add_generation_prompt: bool, where: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(f"{where}: conversational rows need a chat template, and the tokenizer has none; "
                        f"set tokenizer.chat_template or use the standard string format")
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                        return_dict=False)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def _close_with_eos(ids: list[int], tokenizer, eos_id: int) -> list[int]:
    """End at eos: drop whitespace-only tokens after a final eos, else append eos."""
    if eos_id in ids:
        last = len(ids) - 1 - ids[::-1].index(eos_id)
        if not tokenizer.decode(ids[last + 1:]).strip():
            return ids[:last + 1]
    return ids + [eos_id]


def _eos_id(tokenizer) -> int:
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if eos_id is None:
        raise DataError("the tokenizer has no eos token, so completions cannot be terminated; "
                        "set tokenizer.eos_token before tokenizing")
    return eos_id


# -- bookkeeping ----------------------------------------------------------------------------------

def _check_limits(max_length: int, max_prompt_length: int | None, truncation: str) -> None:
    if truncation not in TRUNCATION_POLICIES:
        raise ValueError(f"truncation must be one of {TRUNCATION_POLICIES}, got {truncation!r}")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 tokens, got {max_length}")
    if max_prompt_length is not None and not 1 <= max_prompt_length < max_length:
        raise ValueError(f"max_prompt_length must be in [1, max_length={max_length}), got {max_prompt_length}")


def _count(stats: TokenStats, fitted) -> bool:
    """Record one fitted row in ``stats``; True when the row is kept."""
    if fitted is None:
        stats.dropped += 1
        return False
    stats.rows_out += 1
    stats.truncated += int(fitted[2])
    return True


def _finish(stats: TokenStats, limit: int, longest_prompt: int, kind: str, *, truncation: str,
            limit_name: str = "max_length") -> None:
    if stats.rows_in and stats.rows_out == 0:
        hint = " or use truncation='truncate'" if truncation == "drop" else ""
        raise DataError(f"all {stats.rows_in} {kind} rows were dropped: {limit_name}={limit} is too small "
                        f"(the longest prompt has {longest_prompt} tokens); raise {limit_name}{hint}")
    if stats.dropped:
        logger.warning("tokenized %s rows: %s", kind, stats.summary())
    elif stats.truncated:
        logger.info("tokenized %s rows: %s", kind, stats.summary())
