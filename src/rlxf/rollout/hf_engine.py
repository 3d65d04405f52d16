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

Log-prob convention (docs/rollout.md). The recorded log-prob of a sampled token is
``logps_from_logits(logits, token, temperature=τ)`` on the *unfiltered* logits: its log-prob under
the temperature-scaled policy ``softmax(logits / τ)``, which is what
:func:`rlxf.models.token_logps` recomputes on the training side (old, reference and current
policy), so ratios start at exactly 1. With ``top_p < 1`` or ``top_k > 0`` the tokens are actually
drawn from the truncated, renormalised distribution, which differs from ``softmax(logits / τ)``; the
recorded value is *not* that sampling probability (the same choice as TRL and verl: the filtered
distribution is not differentiable in the policy's own terms). Greedy decoding (τ = 0) records
log-probs at τ = 1.

Not done here (the fast engine's job, docs/performance.md): a static KV cache
and CUDA graphs, dropping finished rows from the batch, encoding a prompt once for its ``n``
samples. The policy is used in place (no copy), in eval mode under ``torch.no_grad()``; its
previous train/eval mode is restored afterwards.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from rlxf.models.loading import eval_mode, is_peft_model
from rlxf.models.logprobs import logps_from_logits
from rlxf.rollout.sampling import (DecodedBatch, StopChecker, assemble_rollouts, check_prompts, left_padded,
                                   sample_next_tokens)
from rlxf.rollout.types import Rollouts, SamplingParams


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
        prompts = check_prompts(prompt_ids, self.model.get_input_embeddings().num_embeddings)
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
                        generator: torch.Generator | None, device: torch.device) -> DecodedBatch:
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
        stop_checker = StopChecker(self.tokenizer, params.stop, batch) if params.stop else None
        used = steps
        for step in range(steps):
            tokens = sample_next_tokens(logits, params, generator)             # [B]
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
        return DecodedBatch(prompt_ids=input_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
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

    def _assemble(self, rows: list[list[int]], batches: list[DecodedBatch], params: SamplingParams,
                  device: torch.device) -> Rollouts:
        return assemble_rollouts(self.tokenizer, self.pad_token_id, rows, batches, params, device)


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
