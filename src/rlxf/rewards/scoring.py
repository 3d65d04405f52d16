"""Running a scorer model (causal LM or reward model) over token sequences for model-based rewards.

Shared by :mod:`rlxf.rewards.likelihood` and :mod:`rlxf.rewards.reward_model`: batches are formed
from length-sorted rows (little padding), right-padded, and scored in eval mode (dropout off) with
each module's training flag restored afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from rlxf.models.loading import eval_mode  # noqa: F401  (re-exported for the reward modules)
from rlxf.rewards.base import RewardError


def model_device(model) -> torch.device:
    """Device of the first parameter of ``model`` (or of ``model.model`` for a ``Reference``)."""
    module = model if isinstance(model, nn.Module) else getattr(model, "model", None)
    if not isinstance(module, nn.Module):
        raise RewardError(f"{type(model).__name__} holds no model to score with (a reference in mode "
                         "'none'?); pass a model, or a Reference built with mode 'copy' or 'lora'")
    return next(module.parameters()).device


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids``, ``attention_mask``: ``[B, T]`` long, T = the longest sequence, padding on the right."""
    width = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)  # [B, T]
    attention_mask = torch.zeros_like(input_ids)                               # [B, T]
    for row, seq in enumerate(sequences):
        input_ids[row, :len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        attention_mask[row, :len(seq)] = 1
    return input_ids, attention_mask


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Row indices in batches of ``batch_size``, longest first, so each batch pads little."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def pad_id_of(tokenizer) -> int:
    """The tokenizer's pad id (any id works: padding is masked), else its EOS id, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0
