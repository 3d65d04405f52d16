"""HFEngine: the reference rollout engine, a plain KV-cache decode loop on any transformers causal LM.

Per micro-batch of at most ``max_batch_size`` rows (each prompt repeated ``n`` times):

1. left-pad the prompts; one prefill forward with ``use_cache=True`` (logits of the last position
   only, where the model supports ``logits_to_keep``);
2. each step: filter (top-k, then top-p) the temperature-scaled logits, sample one token per row
   (argmax at temperature 0), record its log-prob, feed it back with the cache. Position ids follow
   the attention mask (``cumsum - 1``), so a left-padded row sees the positions it would see alone;
3. a row finishes on an EOS id or when its decoded tail contains a stop string; finished rows
   receive the pad id and record nothing; the loop ends when every row has finished or after
   ``max_new_tokens`` steps.

Log-prob convention (SPECS.md §0). The recorded log-prob of a sampled token is
``logps_from_logits(logits, token, temperature=τ)`` on the *unfiltered* logits: its log-prob under
the temperature-scaled policy ``softmax(logits / τ)``, which is what
:func:`rlxf.models.token_logps` recomputes on the training side (old, reference and current
policy), so ratios start at exactly 1. With ``top_p < 1`` or ``top_k > 0`` the tokens are actually
drawn from the truncated, renormalised distribution, which differs from ``softmax(logits / τ)``; the
recorded value is *not* that sampling probability (the same choice as TRL and verl: the filtered
distribution is not differentiable in the policy's own terms). Greedy decoding (τ = 0) records
log-probs at τ = 1.

Not done here (the fast engine's job, DESIGN.md "Performance architecture"): a static KV cache
and CUDA graphs, dropping finished rows from the batch, encoding a prompt once for its ``n``
samples. The policy is used in place (no copy), in eval mode under ``torch.no_grad()``; its
previous train/eval mode is restored afterwards.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral

import torch
from torch import Tensor, nn

from rlxf.models.loading import eval_mode, is_peft_model
from rlxf.models.logprobs import logps_from_logits
from rlxf.rollout.types import Rollouts, SamplingParams

# A stop string of L characters spans at most 4·L tokens even with byte-level fallback tokens
# (UTF-8 is at most 4 bytes a character); the slack covers a token that starts before it.
_BYTES_PER_CHAR = 4
_STOP_WINDOW_SLACK = 2


class HFEngine:
    """Sample completions from a transformers causal LM (implements :class:`RolloutEngine`).

    ``model``: the policy itself (weights shared, not copied; a PEFT model samples with its active
    adapters). ``tokenizer``: decodes completions and stop-string windows. ``max_batch_size``: rows
    (prompts × n) per forward. ``eos_token_ids``: ids that end a completion; default the
    tokenizer's EOS plus ``model.generation_config.eos_token_id`` (as ``model.generate`` uses).
    ``pad_token_id``: fills prompts on the left and finished completions on the right; default the
    tokenizer's pad id, else the first EOS id.
    """

    def __init__(self, model: nn.Module, tokenizer, *, max_batch_size: int = 256,
                 eos_token_ids: Sequence[int] | None = None, pad_token_id: int | None = None):
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.eos_token_ids = (tuple(int(t) for t in eos_token_ids) if eos_token_ids is not None
                              else _default_eos_ids(model, tokenizer))
        if not self.eos_token_ids:
            raise ValueError("HFEngine: no EOS token id (the tokenizer and the model's generation config "
                             "name none); pass eos_token_ids=[...]")
        if pad_token_id is None:
            pad_token_id = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = int(pad_token_id if pad_token_id is not None else self.eos_token_ids[0])
        self._forward_names = _forward_parameters(model)

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Rollouts:
        """Sample ``params.n`` completions for each prompt; see :class:`Rollouts` for the result."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        prompts = _check_prompts(prompt_ids, self.model.get_input_embeddings().num_embeddings)
        device = self.model.get_input_embeddings().weight.device
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=device).manual_seed(params.seed)
        rows = [prompt for prompt in prompts for _ in range(params.n)]
        with torch.no_grad(), eval_mode(self.model):
            batches = [self._generate_batch(rows[i:i + self.max_batch_size], params, generator, device)
                       for i in range(0, len(rows), self.max_batch_size)]
        return self._assemble(rows, batches, params, device)

    # -- one micro-batch ----------------------------------------------------------------------

    def _generate_batch(self, rows: list[list[int]], params: SamplingParams,
                        generator: torch.Generator | None, device: torch.device) -> _Batch:
        batch = len(rows)
        steps = params.max_new_tokens
        input_ids, prompt_mask = left_padded(rows, self.pad_token_id, device)  # [B, P]
        position_ids = (prompt_mask.cumsum(-1) - 1).clamp(min=0)               # [B, P]
        logits, cache = self._forward(input_ids, prompt_mask, position_ids, None)  # [B, V]
        attention_mask = prompt_mask                                           # [B, P + step], grows
        new_column = torch.ones(batch, 1, dtype=torch.long, device=device)
        next_position = position_ids[:, -1:] + 1                               # [B, 1]

        completion_ids = torch.full((batch, steps), self.pad_token_id, dtype=torch.long, device=device)
        logps = torch.zeros(batch, steps, dtype=torch.float32, device=device)
        completion_mask = torch.zeros(batch, steps, dtype=torch.long, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        eos_ids = torch.tensor(self.eos_token_ids, device=device)
        stop_checker = _StopChecker(self.tokenizer, params.stop, batch) if params.stop else None
        used = steps
        for step in range(steps):
            tokens = _sample(logits, params, generator)                        # [B]
            token_logps = logps_from_logits(logits, tokens, temperature=params.logp_temperature)
            active = ~finished
            completion_ids[:, step] = torch.where(active, tokens, self.pad_token_id)
            logps[:, step] = torch.where(active, token_logps, 0.0)
            completion_mask[:, step] = active.long()
            finished = finished | (active & torch.isin(tokens, eos_ids))
            if stop_checker is not None:
                finished = finished | stop_checker.update(completion_ids[:, step], active, device)
            if step == steps - 1 or bool(finished.all()):
                used = step + 1
                break
            # finished rows too: they feed pad tokens whose outputs nobody reads
            attention_mask = torch.cat([attention_mask, new_column], dim=1)
            logits, cache = self._forward(completion_ids[:, step:step + 1], attention_mask,
                                          next_position, cache)
            next_position = next_position + 1

        completion_ids, logps = completion_ids[:, :used], logps[:, :used]
        completion_mask = completion_mask[:, :used]
        hit_eos = torch.isin(completion_ids, eos_ids) & completion_mask.bool()  # [B, C]
        return _Batch(prompt_ids=input_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                      completion_mask=completion_mask, logps=logps, finished=finished.tolist(),
                      ends_with_eos=hit_eos.any(-1).tolist())

    def _forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, cache):
        """One forward; returns the last position's logits ``[B, V]`` and the KV cache."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": True}
        names = self._forward_names
        if names is None or "position_ids" in names:
            kwargs["position_ids"] = position_ids
        if names is not None and "logits_to_keep" in names:
            kwargs["logits_to_keep"] = 1
        if cache is not None:
            # newer transformers call the cache argument ``cache``, older ones ``past_key_values``
            kwargs["cache" if names is not None and "cache" in names else "past_key_values"] = cache
        out = self.model(**kwargs)
        cache = getattr(out, "cache", None)
        if cache is None:
            cache = getattr(out, "past_key_values", None)
        if cache is None:
            raise RuntimeError(f"{type(self.model).__name__} returned no KV cache with use_cache=True; "
                               "HFEngine needs a causal LM that supports incremental decoding")
        return out.logits[:, -1], cache

    # -- output ---------------------------------------------------------------------------------

    def _assemble(self, rows: list[list[int]], batches: list[_Batch], params: SamplingParams,
                  device: torch.device) -> Rollouts:
        prompt_width = max(b.prompt_ids.shape[1] for b in batches)
        completion_width = max(b.completion_ids.shape[1] for b in batches)
        pad = self.pad_token_id
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
        text = decode_texts(self.tokenizer, token_lists)
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


@dataclass
class _Batch:
    prompt_ids: Tensor        # [B, P_b] left-padded
    prompt_mask: Tensor       # [B, P_b]
    completion_ids: Tensor    # [B, C_b] right-padded
    completion_mask: Tensor   # [B, C_b]
    logps: Tensor             # [B, C_b] float32
    finished: list[bool]      # ended on EOS or a stop string
    ends_with_eos: list[bool]  # last kept token is an EOS id (left out of the text)


class _StopChecker:
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


def _sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> Tensor:
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


def _check_prompts(prompt_ids, vocab_size: int) -> list[list[int]]:
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


def _default_eos_ids(model: nn.Module, tokenizer) -> tuple[int, ...]:
    ids = []
    candidates = [getattr(tokenizer, "eos_token_id", None),
                  getattr(getattr(model, "generation_config", None), "eos_token_id", None)]
    for value in candidates:
        for token in (value if isinstance(value, (list, tuple)) else [value]):
            if token is not None and int(token) not in ids:
                ids.append(int(token))
    return tuple(ids)


def _forward_parameters(model: nn.Module) -> frozenset[str] | None:
    """Named keyword parameters of the model's forward (the base model's, for PEFT); None if it
    names none (``forward(self, **kwargs)``)."""
    base = model.get_base_model() if is_peft_model(model) else model
    params = inspect.signature(type(base).forward).parameters
    names = frozenset(name for name, p in params.items() if name != "self" and p.kind not in (
        inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL))
    return names or None


def _pad_left(tensor: Tensor, width: int, value) -> Tensor:
    return torch.nn.functional.pad(tensor, (width - tensor.shape[1], 0), value=value)


def _pad_right(tensor: Tensor, width: int, value) -> Tensor:
    return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]), value=value)
