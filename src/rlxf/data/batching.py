"""Batches: right-sized collation and a resumable, deterministic batch order.

Collation pads on the right to the longest sequence *in the batch* (never to a global maximum).
Masks: ``attention_mask`` is 1 on real tokens; ``completion_mask`` is 1 on completion tokens
(the ones a loss is taken over, eos included) and 0 on prompt and padding.

:class:`EpochBatcher` yields index batches from a fresh permutation per epoch, seeded by
``seed + epoch``; its state is ``(epoch, position)``, so a run resumed from a checkpoint sees
exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import math

import torch

from rlxf.data.formats import DataError


# -- collation ----------------------------------------------------------------------------------

def token_bounded_slices(lengths: list[int], *, max_rows: int, max_tokens: int) -> list[slice]:
    """Cut rows ``0..N-1`` (in order) into consecutive slices of at most ``max_rows`` rows whose
    padded size, rows × the longest of their ``lengths``, stays within ``max_tokens``.

    Forward passes without gradients (reference log-probs, evaluation) use it so that their
    activations never outgrow what a training micro-batch holds: ``max_rows`` alone lets a batch
    of long rows take many times a training step's memory. A row longer than ``max_tokens`` gets a
    slice of its own. Greedy: each slice takes rows while both bounds hold.
    """
    if max_rows < 1 or max_tokens < 1:
        raise ValueError(f"max_rows and max_tokens must be >= 1, got {max_rows} and {max_tokens}")
    slices, start, longest = [], 0, 0
    for i, length in enumerate(lengths):
        longest_with = max(longest, length)
        rows = i - start
        if rows and (rows + 1 > max_rows or (rows + 1) * longest_with > max_tokens):
            slices.append(slice(start, i))
            start, longest_with = i, length
        longest = longest_with
    if start < len(lengths):
        slices.append(slice(start, len(lengths)))
    return slices


def collate_sft(examples: list[dict], pad_id: int | None) -> dict:
    """Stack SFT examples (``input_ids``, ``completion_mask``) into ``[B, T]`` long tensors."""
    _check_batch(examples, pad_id)
    input_ids, attention_mask = _pad([e["input_ids"] for e in examples], pad_id)  # [B, T]
    completion_mask, _ = _pad([e["completion_mask"] for e in examples], 0)  # [B, T]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def collate_preference(examples: list[dict], pad_id: int | None) -> dict:
    """Stack preference examples: B chosen sequences (prompt + chosen), then B rejected ones.

    Returns ``input_ids``, ``attention_mask``, ``completion_mask`` ``[2B, T]`` long; the same pairs
    split for prompt sharing: ``prompt_ids``/``prompt_mask`` ``[B, P]`` (left-padded) and
    ``pair_completion_ids``/``pair_completion_mask`` ``[2B, C]`` (right-padded, rows chosen_0,
    rejected_0, chosen_1, …);
    ``chosen_scores``, ``rejected_scores`` ``[B]`` float (NaN where absent); ``margin`` ``[B]``
    float (0 where absent, i.e. no margin); ``chosen_probability`` ``[B]`` float (the soft label
    P(chosen ≻ rejected); 1 where absent, i.e. a hard label); ``has_scores`` (every pair has both
    scores, so the score tensors hold no NaN), ``has_margin`` (at least one pair has a margin) and
    ``has_soft_label`` (at least one pair has a ``chosen_probability``).
    """
    _check_batch(examples, pad_id)
    sequences, masks = [], []
    for side in ("chosen_ids", "rejected_ids"):
        for e in examples:
            sequences.append(e["prompt_ids"] + e[side])
            masks.append([0] * len(e["prompt_ids"]) + [1] * len(e[side]))
    input_ids, attention_mask = _pad(sequences, pad_id)  # [2B, T]
    completion_mask, _ = _pad(masks, 0)  # [2B, T]
    # the same pairs split for prompt sharing (rlxf.models.shared_prompt_logps): prompts left-padded,
    # completions right-padded and interleaved chosen_0, rejected_0, chosen_1, …
    prompts = [e["prompt_ids"] for e in examples]
    prompt_ids, prompt_mask = _pad([p[::-1] for p in prompts], pad_id)
    prompt_ids, prompt_mask = prompt_ids.flip(-1), prompt_mask.flip(-1)  # [B, P] left-padded
    pair_completion_ids, pair_completion_mask = _pad(
        [e[side] for e in examples for side in ("chosen_ids", "rejected_ids")], pad_id)  # [2B, C]
    chosen_scores = _floats([e.get("chosen_score") for e in examples], missing=math.nan)  # [B]
    rejected_scores = _floats([e.get("rejected_score") for e in examples], missing=math.nan)  # [B]
    margin = _floats([e.get("margin") for e in examples], missing=0.0)  # [B]
    soft_label = _floats([e.get("chosen_probability") for e in examples], missing=1.0)  # [B]
    return {
        "input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask,
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
        "pair_completion_ids": pair_completion_ids, "pair_completion_mask": pair_completion_mask,
        "chosen_scores": chosen_scores, "rejected_scores": rejected_scores, "margin": margin,
        "chosen_probability": soft_label,
        "has_scores": all(e.get("chosen_score") is not None and e.get("rejected_score") is not None
                          for e in examples),
        "has_margin": any(e.get("margin") is not None for e in examples),
        "has_soft_label": any(e.get("chosen_probability") is not None for e in examples),
    }


def collate_kto(examples: list[dict], pad_id: int | None) -> dict:
    """Stack KTO examples and their mismatched twins for the KL reference point.

    Returns ``input_ids``, ``attention_mask``, ``completion_mask`` ``[B, T]`` (prompt_i + completion_i),
    ``kl_input_ids``, ``kl_attention_mask``, ``kl_completion_mask`` ``[B, T']`` (prompt_i +
    completion_{i−1}: the batch's completions rotated by one, as TRL builds them) and ``label``
    ``[B]`` bool. A batch of one has no other completion: its KL rows are its own (z_0 then
    measures the policy's drift on that example).
    """
    _check_batch(examples, pad_id)
    out = {"label": torch.tensor([bool(e["label"]) for e in examples], dtype=torch.bool)}
    rotated = [examples[i - 1]["completion_ids"] for i in range(len(examples))]
    for prefix, completions in (("", [e["completion_ids"] for e in examples]), ("kl_", rotated)):
        sequences = [e["prompt_ids"] + c for e, c in zip(examples, completions)]
        masks = [[0] * len(e["prompt_ids"]) + [1] * len(c) for e, c in zip(examples, completions)]
        out[f"{prefix}input_ids"], out[f"{prefix}attention_mask"] = _pad(sequences, pad_id)  # [B, T]
        out[f"{prefix}completion_mask"], _ = _pad(masks, 0)  # [B, T]
    return out


def _check_batch(examples: list[dict], pad_id: int | None) -> None:
    if pad_id is None:
        raise DataError("the tokenizer has no pad token, so batches cannot be padded; set "
                        "tokenizer.pad_token (for example to tokenizer.eos_token) before collating")
    if not examples:
        raise DataError("cannot collate an empty batch")


def _pad(sequences: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence; return ``(padded, attention_mask)``, both ``[N, T]`` long."""
    width = max(len(s) for s in sequences)
    padded = torch.full((len(sequences), width), value, dtype=torch.long)  # [N, T]
    mask = torch.zeros((len(sequences), width), dtype=torch.long)  # [N, T]
    for i, seq in enumerate(sequences):
        padded[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, :len(seq)] = 1
    return padded, mask


def _floats(values: list, *, missing: float) -> torch.Tensor:
    return torch.tensor([missing if v is None else float(v) for v in values], dtype=torch.float32)


# -- batch order --------------------------------------------------------------------------------

class EpochBatcher:
    """Infinite, deterministic, resumable index batches over ``num_examples`` examples.

    Epoch ``e`` uses ``torch.randperm(num_examples)`` drawn from a generator seeded with
    ``seed + e``; batches are consecutive slices of it. With ``drop_last`` the incomplete tail of
    each permutation is skipped; otherwise the last batch of an epoch is smaller.
    """

    def __init__(self, num_examples: int, batch_size: int, *, seed: int, drop_last: bool = True):
        if num_examples <= 0:
            raise DataError(f"EpochBatcher needs at least one example, got num_examples={num_examples}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if drop_last and batch_size > num_examples:
            raise DataError(f"batch_size={batch_size} is larger than the dataset ({num_examples} examples), "
                            f"so drop_last=True leaves no batch; lower the batch size or add data")
        self.num_examples, self.batch_size, self.seed, self.drop_last = num_examples, batch_size, seed, drop_last
        self.epoch, self.position = 0, 0
        self._order: list[int] | None = None  # permutation of the current epoch, built lazily

    @property
    def batches_per_epoch(self) -> int:
        if self.drop_last:
            return self.num_examples // self.batch_size
        return math.ceil(self.num_examples / self.batch_size)

    def next_indices(self) -> list[int]:
        """The next batch of example indices (moves to the next epoch when one is used up)."""
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        if self._order is None:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            self._order = torch.randperm(self.num_examples, generator=generator).tolist()
        start = self.position * self.batch_size
        self.position += 1
        return self._order[start:start + self.batch_size]

    def __iter__(self):
        while True:
            yield self.next_indices()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_examples": self.num_examples, "batch_size": self.batch_size, "drop_last": self.drop_last}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``(epoch, position)``; the data size, batch size, seed and drop_last must match."""
        for key in ("seed", "num_examples", "batch_size", "drop_last"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"cannot resume the batch order: checkpoint has {key}={state[key]!r}, this run "
                                 f"has {getattr(self, key)!r}; resume with the same data and settings")
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None
