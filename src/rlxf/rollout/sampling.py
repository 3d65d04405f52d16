"""The host-side decode pieces that :class:`~rlxf.rollout.HFEngine` and
:class:`~rlxf.rollout.StaticEngine` share, so both engines check prompts, pad, sample, stop and
assemble :class:`~rlxf.rollout.Rollouts` the same way:

- :func:`check_prompts`: validate ``prompt_ids`` (unpadded token-id lists inside the vocabulary);
- :func:`left_padded`: token-id lists → left-padded ``input_ids`` and ``prompt_mask``;
- :func:`sample_next_tokens`: one token per row from the logits (argmax, or a draw after
  temperature, top-k and top-p);
- :class:`StopChecker`: stop strings in the decoded tail of each row;
- :class:`DecodedBatch`: one micro-batch's outputs; :func:`assemble_rollouts` pads the micro-batches
  to one width, decodes the text (:func:`decode_texts`) and builds the ``Rollouts``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral

import torch
from torch import Tensor

from rlxf.rollout.types import Rollouts, SamplingParams

# A stop string of L characters spans at most 4·L tokens even with byte-level fallback tokens
# (UTF-8 is at most 4 bytes a character); the slack covers a token that starts before it.
_BYTES_PER_CHAR = 4
_STOP_WINDOW_SLACK = 2


@dataclass
class DecodedBatch:
    """One micro-batch of an engine's ``generate``, before the micro-batches are padded together."""

    prompt_ids: Tensor        # [B, P_b] left-padded
    prompt_mask: Tensor       # [B, P_b]
    completion_ids: Tensor    # [B, C_b] right-padded
    completion_mask: Tensor   # [B, C_b]
    logps: Tensor             # [B, C_b] float32
    finished: list[bool]      # ended on EOS or a stop string
    ends_with_eos: list[bool]  # last kept token is an EOS id (left out of the text)


class StopChecker:
    """Finds stop strings in the decoded tail of each row (the last few tokens, not the whole text).

    The check runs after every token, so a stop string is found with the token that completes it;
    only the completion is searched, never the prompt. Tokens are decoded with special tokens kept,
    so a stop string may name one (it is then absent from ``Rollouts.text``, which skips them).
    """

    def __init__(self, tokenizer, stop: tuple[str, ...], batch: int):
        self.tokenizer = tokenizer
        self.stop = stop
        self.window = _BYTES_PER_CHAR * max(map(len, stop)) + _STOP_WINDOW_SLACK
        self.history: list[list[int]] = [[] for _ in range(batch)]

    def update(self, tokens: Tensor, active: Tensor, device: torch.device) -> Tensor:
        """Append this step's tokens; return ``[B]`` bool, True where a row just hit a stop string."""
        rows = active.nonzero().flatten().tolist()
        token_list = tokens.tolist()
        for i in rows:
            self.history[i].append(token_list[i])
        tails = self.tokenizer.batch_decode([self.history[i][-self.window:] for i in rows],
                                            skip_special_tokens=False)
        hit = torch.zeros(len(self.history), dtype=torch.bool)
        for i, tail in zip(rows, tails):
            hit[i] = any(s in tail for s in self.stop)
        return hit.to(device)


def sample_next_tokens(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> Tensor:
    """One token per row from ``[B, V]`` logits: argmax, or a draw after temperature, top-k, top-p."""
    if params.greedy:
        return logits.argmax(-1)
    scaled = logits.float() / params.temperature                               # [B, V]
    if 0 < params.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, params.top_k, dim=-1).values[:, -1:]           # [B, 1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)           # [B, V]
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # probability of the strictly more likely tokens
        drop_sorted = mass_before >= params.top_p                             # never the first token
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return torch.multinomial(scaled.softmax(-1), 1, generator=generator).squeeze(-1)


def left_padded(rows: list[list[int]], pad: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Token-id lists → left-padded ``input_ids`` and ``prompt_mask`` ``[B, P]`` on ``device`` (one tensor build)."""
    width = max(map(len, rows))
    input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows], dtype=torch.long)
    lengths = torch.tensor([len(row) for row in rows])
    prompt_mask = (torch.arange(width)[None, :] >= width - lengths[:, None]).long()
    return input_ids.to(device), prompt_mask.to(device)


def check_prompts(prompt_ids, vocab_size: int) -> list[list[int]]:
    """``prompt_ids`` as plain lists of ints; a ValueError naming the prompt when one is not a
    non-empty list of token ids in ``[0, vocab_size)``."""
    if isinstance(prompt_ids, Tensor) or not isinstance(prompt_ids, Sequence) or not prompt_ids:
        raise ValueError("prompt_ids must be a non-empty list of token-id lists (one per prompt, no padding)")
    prompts = []
    for i, prompt in enumerate(prompt_ids):
        ids = prompt.tolist() if isinstance(prompt, Tensor) else prompt
        if isinstance(ids, (int, str)) or not isinstance(ids, Sequence):
            raise ValueError(f"prompt {i} must be a list of token ids, got {type(prompt).__name__}; "
                             "pass a list of prompts, e.g. [[1, 5, 7]]")
        if not ids:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token (e.g. BOS)")
        if all(type(t) is int for t in ids) and 0 <= min(ids) and max(ids) < vocab_size:  # fast path
            prompts.append(list(ids))
            continue
        bad = [t for t in ids
               if not isinstance(t, Integral) or isinstance(t, bool) or not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab_size}) or not integers: {bad[:5]}")
        prompts.append([int(t) for t in ids])
    return prompts


def assemble_rollouts(tokenizer, pad_token_id: int, rows: list[list[int]], batches: list[DecodedBatch],
                      params: SamplingParams, device: torch.device) -> Rollouts:
    """The micro-batches of one ``generate`` call as one :class:`Rollouts`: prompts left-padded and
    completions right-padded to the widest micro-batch, the text decoded without the final EOS."""
    prompt_width = max(b.prompt_ids.shape[1] for b in batches)
    completion_width = max(b.completion_ids.shape[1] for b in batches)
    pad = pad_token_id
    prompt_ids = torch.cat([_pad_left(b.prompt_ids, prompt_width, pad) for b in batches])      # [N, P]
    prompt_mask = torch.cat([_pad_left(b.prompt_mask, prompt_width, 0) for b in batches])     # [N, P]
    completion_ids = torch.cat([_pad_right(b.completion_ids, completion_width, pad) for b in batches])
    completion_mask = torch.cat([_pad_right(b.completion_mask, completion_width, 0) for b in batches])
    logps = torch.cat([_pad_right(b.logps, completion_width, 0.0) for b in batches])           # [N, C]
    finished = [f for b in batches for f in b.finished]
    ends_with_eos = [e for b in batches for e in b.ends_with_eos]
    lengths = completion_mask.sum(-1).tolist()
    token_lists = [ids[:length - 1] if eos else ids[:length]
                   for ids, length, eos in zip(completion_ids.tolist(), lengths, ends_with_eos)]
    text = decode_texts(tokenizer, token_lists)
    prompt_index = torch.arange(len(rows) // params.n, device=device).repeat_interleave(params.n)
    return Rollouts(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                    completion_mask=completion_mask, logps=logps,
                    finish_reason=["stop" if f else "length" for f in finished], text=text,
                    prompt_index=prompt_index, group_size=params.n)


_LIBRARY_DECODERS = ("transformers.tokenization_utils_tokenizers", "transformers.tokenization_utils_fast")


def decode_texts(tokenizer, token_lists: list[list[int]]) -> list[str]:
    """``tokenizer.batch_decode(token_lists, skip_special_tokens=True)``, through the Rust backend's
    parallel ``decode_batch`` where that is what ``batch_decode`` computes: a fast tokenizer whose
    decode is the library's own (no model-specific override) and that does not clean up spaces
    afterwards (the clean-up rules differ between transformers versions). About 3× faster for 128
    completions of 256 tokens; otherwise the plain ``batch_decode``."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decode = getattr(type(tokenizer), "_decode", None)
    if (backend is not None and decode is not None and decode.__module__ in _LIBRARY_DECODERS
            and not getattr(tokenizer, "clean_up_tokenization_spaces", True)):
        return backend.decode_batch(token_lists, skip_special_tokens=True)
    return tokenizer.batch_decode(token_lists, skip_special_tokens=True)


def _pad_left(tensor: Tensor, width: int, value) -> Tensor:
    return torch.nn.functional.pad(tensor, (width - tensor.shape[1], 0), value=value)


def _pad_right(tensor: Tensor, width: int, value) -> Tensor:
    return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]), value=value)
