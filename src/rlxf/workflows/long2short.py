"""``rlxf long2short-data``: sample a model, verify, and write Kimi k1.5 long2short SFT data and DPO pairs.

Kimi k1.5 (arXiv 2501.12599; docs/methods/long2short.md) shortens a model's reasoning with data drawn from the model
itself: sample n = 8 responses per question, then

- *shortest rejection sampling*: SFT on the shortest correct response of each question
  (→ ``sft.jsonl``, :func:`rlxf.data.shortest_correct_rows`);
- *long2short DPO*: chosen = the shortest correct response, rejected = the longer wrong ones and
  the correct ones ≥ 1.5× longer (→ ``pairs.jsonl``, :func:`rlxf.data.long_short_pairs`).

The loop is: load prompts → sample ``samples`` completions each with :class:`rlxf.rollout.HFEngine`
→ verify each one → build the rows → write ``sft.jsonl``, ``pairs.jsonl``, ``stats.json`` and
``config.yaml``. ``rlxf sft --dataset OUT/sft.jsonl`` and ``rlxf dpo --dataset OUT/pairs.jsonl``
read the files as they are.

Verification: a ``task:NAME`` dataset uses the task's verifier; any other dataset needs an
``answer`` field on every row and uses exact match on the final answer (text after the last ``#``,
:func:`rlxf.rewards.exact_match`). Length = generated tokens, the EOS token included (what
:meth:`Rollouts.completion_lengths` counts); Kimi measures tokens too.

Determinism: prompts come from ``seed`` (tasks), sampling from ``torch.manual_seed(seed)`` and the
global RNG of the model's device, prompts in fixed chunks of ``batch_size // samples``; the same
config on the same device and software gives the same files.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

from rlxf.config import (AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, SEED, Bounds, ConfigError, check_numbers, option,
                         save_yaml)

log = logging.getLogger("rlxf.long2short")

OUTPUT_FILES = ("sft.jsonl", "pairs.jsonl", "stats.json")


@dataclass(frozen=True)
class Long2ShortDataConfig:
    """Options of ``rlxf long2short-data``."""

    model: str = option("tiny", "model to sample from: 'tiny' (embedded), a local HF directory, or a hub id")
    dataset: str = option("task:arithmetic", "prompts: task:NAME (verified by the task), or a .jsonl/.json/.parquet/"
                          ".csv file, saved HF dataset directory or hub dataset whose rows have 'prompt' and 'answer'")
    split: str = option("train", "split to read: train or eval for a task, the split name of a hub/saved dataset")
    num_prompts: int = option(256, "prompts to sample: drawn from a task, or the first N rows of a file/dataset "
                              "(0 = every row of a file/dataset)", bounds=NON_NEGATIVE)
    samples: int = option(8, "completions sampled per prompt (n; Kimi k1.5 uses 8)", bounds=AT_LEAST_ONE)
    temperature: float = option(1.0, "sampling temperature", bounds=POSITIVE)
    max_new_tokens: int = option(48, "most tokens per sampled completion", bounds=AT_LEAST_ONE)
    ratio: float = option(1.5, "DPO pairs: a correct completion at least ratio x the shortest correct one is rejected",
                          bounds=Bounds(low=1))
    max_pairs_per_prompt: int = option(0, "DPO pairs: keep at most this many pairs per prompt (0 = no limit)",
                                       bounds=NON_NEGATIVE)
    max_prompt_length: int = option(128, "prompts longer than this many tokens are dropped (counted in stats.json)",
                                    bounds=AT_LEAST_ONE)
    batch_size: int = option(256, "sequences (prompts x samples) generated per forward pass", bounds=AT_LEAST_ONE)
    seed: int = option(0, "random seed (task prompts and sampling)", bounds=SEED)
    output_dir: str = option("runs/long2short_data", "where sft.jsonl, pairs.jsonl, stats.json and config.yaml go")
    overwrite: bool = option(False, "replace the files of an earlier build in output_dir")
    device: str = option("auto", "auto | cpu | cuda | cuda:N | mps")
    dtype: str = option("auto", "model dtype: auto (bf16 on CUDA, else fp32) | float32 | bfloat16 | float16")
    trust_remote_code: bool = option(False, "allow model repositories to run their own code")
    threads: int = option(0, "torch CPU threads; 0 = torch default", bounds=NON_NEGATIVE)

    def __post_init__(self):
        check_numbers(self)
        if self.num_prompts == 0 and self.dataset.startswith("task:"):
            raise ConfigError("--num-prompts must be > 0 for a task: dataset (how many problems to draw)")


def build_long2short_data(cfg: Long2ShortDataConfig) -> dict:
    """Sample, verify and write the long2short files; return the stats written to ``stats.json``."""
    from rlxf.data import long_short_pairs, shortest_correct_rows
    from rlxf.recipes.common import setup_logging

    setup_logging()
    started = time.perf_counter()
    out = Path(cfg.output_dir)
    existing = [name for name in OUTPUT_FILES if (out / name).exists()]
    if existing and not cfg.overwrite:
        raise ConfigError(f"output dir {out} already holds {', '.join(existing)}; pass --overwrite to replace "
                          f"them, or choose another --output-dir (nothing was overwritten)")
    rows, verify = _load_prompt_rows(cfg)
    model, tokenizer = _load_model(cfg)
    examples, token_stats = _tokenize(cfg, rows, tokenizer)
    texts, lengths, truncated, generation_seconds = _sample(cfg, model, tokenizer, examples)

    prompts = [e["prompt"] for e in examples]
    correct = [verify(group, e) for group, e in zip(texts, examples)]
    completions = [[_as_completion(text, prompt) for text in group] for group, prompt in zip(texts, prompts)]
    extra = {"answer": [e["answer"] for e in examples]}
    sft_rows, sft_stats = shortest_correct_rows(prompts, completions, correct, lengths, **extra)
    pair_rows, pair_stats = long_short_pairs(prompts, completions, correct, lengths, ratio=cfg.ratio,
                                             max_pairs_per_prompt=cfg.max_pairs_per_prompt or None, **extra)

    stats = _stats(cfg, examples, token_stats, lengths, correct, truncated, sft_rows, sft_stats, pair_rows, pair_stats)
    stats["generation_seconds"] = round(generation_seconds, 3)
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "sft.jsonl", sft_rows)
    _write_jsonl(out / "pairs.jsonl", pair_rows)
    save_yaml(cfg, out / "config.yaml")
    stats["seconds"] = round(time.perf_counter() - started, 3)
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    log.info("correct %.1f%% of %d samples; mean length %.1f all, %.1f shortest correct; %d SFT rows, "
             "%d pairs (%s); %.1f s", 100 * stats["correct_rate"], stats["samples"], stats["mean_length_all"],
             stats["mean_length_chosen"] or math.nan, stats["sft_rows"], stats["pairs"], stats["pairs_by_kind"],
             stats["seconds"])
    return stats


def _load_model(cfg: Long2ShortDataConfig):
    """(policy, tokenizer) on ``cfg.device`` in ``cfg.dtype``, the tokenizer given a pad token."""
    import torch

    from rlxf.models import ensure_pad_token, load_policy, load_tokenizer, resolve_device, resolve_dtype

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, device)
    except ValueError as exc:
        raise ConfigError(f"--device/--dtype: {exc}") from None
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    resize = len(tokenizer) if ensure_pad_token(tokenizer) else None
    model = load_policy(cfg.model, dtype=dtype, device=device, trust_remote_code=cfg.trust_remote_code,
                        resize_to=resize)
    return model, tokenizer


def _tokenize(cfg: Long2ShortDataConfig, rows: list[dict], tokenizer):
    """The prompts as token ids (longer than ``max_prompt_length``: dropped and counted); a DataError
    when none is left."""
    from rlxf.data import DataError, tokenize_prompts

    examples, token_stats = tokenize_prompts(rows, tokenizer, max_prompt_length=cfg.max_prompt_length)
    if not examples:
        raise DataError(f"every prompt of {cfg.dataset} is longer than --max-prompt-length {cfg.max_prompt_length}")
    log.info("sampling %d completions for each of %d prompts from %s", cfg.samples, len(examples), cfg.model)
    return examples, token_stats


def _sample(cfg: Long2ShortDataConfig, model, tokenizer, examples: list[dict]):
    """``cfg.samples`` completions of every prompt: (texts [P][n], lengths [P][n], count of truncated
    completions, sampling seconds)."""
    import torch

    from rlxf.rollout import HFEngine, SamplingParams

    # one RNG stream over fixed chunks: reproducible, and progress is logged per chunk
    torch.manual_seed(cfg.seed)
    engine = HFEngine(model, tokenizer, max_batch_size=cfg.batch_size)
    sampling_started = time.perf_counter()
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, n=cfg.samples)
    chunk = max(1, cfg.batch_size // cfg.samples)
    texts, lengths, truncated = [], [], 0  # [P][n], [P][n], count
    for start in range(0, len(examples), chunk):
        part = examples[start:start + chunk]
        rollouts = engine.generate([e["prompt_ids"] for e in part], params)
        flat_lengths = rollouts.completion_lengths().tolist()
        for p in range(len(part)):
            group = slice(p * cfg.samples, (p + 1) * cfg.samples)
            texts.append(rollouts.text[group])
            lengths.append(flat_lengths[group])
        truncated += sum(reason == "length" for reason in rollouts.finish_reason)
        log.info("sampled %d/%d prompts", min(start + chunk, len(examples)), len(examples))
    return texts, lengths, truncated, time.perf_counter() - sampling_started


def _stats(cfg: Long2ShortDataConfig, examples: list[dict], token_stats, lengths: list[list[int]],
           correct: list[list[bool]], truncated: int, sft_rows: list[dict], sft_stats: dict, pair_rows: list[dict],
           pair_stats: dict) -> dict:
    """The counts and mean lengths of ``stats.json`` (the timings are added by the caller)."""
    all_lengths = [n for group in lengths for n in group]
    correct_flat = [ok for group in correct for ok in group]
    return {
        "model": cfg.model, "dataset": cfg.dataset, "split": cfg.split,
        "prompts": len(examples), "prompts_dropped_too_long": token_stats.dropped,
        "samples_per_prompt": cfg.samples, "samples": len(all_lengths),
        "correct": sum(correct_flat), "correct_rate": sum(correct_flat) / len(correct_flat),
        "truncated_rate": truncated / len(all_lengths),
        "prompts_with_correct": sft_stats["rows"], "prompts_without_correct": sft_stats["no_correct"],
        "prompts_all_correct": sum(all(group) for group in correct),
        "length_unit": "tokens (EOS included)",
        "mean_length_all": _mean(all_lengths),
        "mean_length_correct": _mean([n for n, ok in zip(all_lengths, correct_flat) if ok]),
        "mean_length_wrong": _mean([n for n, ok in zip(all_lengths, correct_flat) if not ok]),
        # the like-for-like baseline of mean_length_chosen: every sample of the same (solved) prompts
        "mean_length_solved_prompts": _mean([n for group, oks in zip(lengths, correct) if any(oks) for n in group]),
        "mean_length_chosen": _none_if_nan(sft_stats["mean_chosen_length"]),
        "mean_length_rejected": _mean([row["rejected_length"] for row in pair_rows]),
        "sft_rows": len(sft_rows), "pairs": len(pair_rows),
        "pairs_by_kind": {"wrong_longer": pair_stats["wrong_longer"], "correct_long": pair_stats["correct_long"]},
        "prompts_without_rejected": pair_stats["no_rejected"],
        "duplicates_dropped": pair_stats["duplicates_dropped"], "pairs_capped": pair_stats["capped"],
    }


def _load_prompt_rows(cfg: Long2ShortDataConfig):
    """(validated prompt rows, verify(texts, row) -> [bool]); a clear DataError when nothing can verify."""
    from rlxf.data import DataError, load_rows, validate_rows
    from rlxf.rewards import exact_match
    from rlxf.tasks import get_task

    is_task = cfg.dataset.startswith("task:")
    rows = load_rows(cfg.dataset, kind="prompt", split=cfg.split, seed=cfg.seed,
                     task_size=cfg.num_prompts if is_task else None,
                     limit=None if is_task or cfg.num_prompts == 0 else cfg.num_prompts)
    rows, _ = validate_rows(rows, kind="prompt", skip_hint=None)  # this command has no --skip-invalid
    if is_task:
        task = get_task(cfg.dataset.split(":", 1)[1])
        return rows, lambda texts, row: [bool(task.verify(t, str(row["answer"]))) for t in texts]
    missing = [row.get("_where", f"row {i}") for i, row in enumerate(rows) if row.get("answer") is None]
    if missing:
        raise DataError(f"{cfg.dataset}: {len(missing)} of {len(rows)} rows have no 'answer' (first: {missing[0]}), "
                        "so the samples cannot be verified. Use a task:NAME dataset (verified by the task) or "
                        "give every row an 'answer' field (compared by exact match with the text after the "
                        "completion's last '#')")

    def verify(texts: list[str], row: dict) -> list[bool]:
        values = exact_match([row["prompt"]] * len(texts), texts, answer=[row["answer"]] * len(texts))
        return [v == 1.0 for v in values]

    return rows, verify


def _as_completion(text: str, prompt):
    """A conversational prompt gets an assistant message, so prompt and completion share a form."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def _mean(values: list) -> float | None:
    return sum(values) / len(values) if values else None


def _none_if_nan(value: float) -> float | None:
    return None if isinstance(value, float) and math.isnan(value) else value
