"""Data: load rows, validate them, tokenize with prompt masking, collate, and order batches.

The pipeline a recipe runs::

    rows = load_rows("data/pairs.jsonl", kind="preference")      # or "task:arithmetic", a hub name
    rows, skipped = validate_rows(rows, kind="preference")
    examples, stats = tokenize_preference(rows, tokenizer, max_length=512)
    batcher = EpochBatcher(len(examples), batch_size=8, seed=0)
    batch = collate_preference([examples[i] for i in batcher.next_indices()], tokenizer.pad_token_id)

Formats and policies are documented in docs/data.md.
"""

from rlxf.data.batching import EpochBatcher, collate_kto, collate_preference, collate_sft, token_bounded_slices
from rlxf.data.formats import KINDS, DataError, unpair_rows, validate_rows
from rlxf.data.loading import load_rows
from rlxf.data.tokenize import TokenStats, tokenize_kto, tokenize_preference, tokenize_prompts, tokenize_sft
from rlxf.data.samplers import SAMPLERS, APSSampler, PromptSampler, UniformSampler, get_sampler
from rlxf.data.long2short import long_short_pairs, shortest_correct_rows

__all__ = ["KINDS", "DataError", "EpochBatcher", "TokenStats", "collate_kto", "collate_preference", "collate_sft",
           "load_rows", "token_bounded_slices", "tokenize_kto", "tokenize_preference", "tokenize_prompts",
           "tokenize_sft", "unpair_rows", "validate_rows"]
__all__ += ["SAMPLERS", "APSSampler", "PromptSampler", "UniformSampler", "get_sampler",
            "long_short_pairs", "shortest_correct_rows"]
