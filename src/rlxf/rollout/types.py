"""The rollout contract: :class:`SamplingParams` in, :class:`Rollouts` out, :class:`RolloutEngine` between.

Every recipe that samples calls ``engine.generate(prompt_ids, params)`` and reads a
:class:`Rollouts`; it never calls ``model.generate`` itself. An engine is anything with that
method (the :class:`RolloutEngine` protocol, structural typing), so a faster engine or a vLLM
adapter replaces :class:`rlxf.rollout.HFEngine` without touching recipes. docs/rollout.md has the
shapes, the log-prob convention and what a new engine must guarantee.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

FINISH_REASONS = ("stop", "length")


@dataclass(frozen=True)
class SamplingParams:
    """How to sample completions. Every field is validated on construction."""

    max_new_tokens: int = 64
    """Most tokens generated per completion (EOS and stop-string tokens count)."""
    temperature: float = 1.0
    """Sample from ``softmax(logits / temperature)``; 0 means greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches ``top_p`` (1 = off)."""
    top_k: int = 0
    """Keep only the ``top_k`` most likely tokens (0 = off)."""
    n: int = 1
    """Samples per prompt (the group size of GRPO/RLOO)."""
    stop: tuple[str, ...] = ()
    """Stop strings: a completion ends with the token that completes one of them (it is kept)."""
    seed: int | None = None
    """Seeds the engine's random generator, so the same call returns the same samples; None uses
    the global torch RNG of the model's device (reproducible under ``torch.manual_seed``)."""

    def __post_init__(self) -> None:
        _check_int("max_new_tokens", self.max_new_tokens, minimum=1)
        _check_int("top_k", self.top_k, minimum=0, hint="0 turns top-k off")
        _check_int("n", self.n, minimum=1, hint="n is the number of samples per prompt")
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0, hint="or None for the global torch RNG")
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be a finite number >= 0 (0 = greedy), "
                             f"got {self.temperature!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if isinstance(self.stop, str):
            raise TypeError(f"SamplingParams.stop must be a tuple of strings, got the string "
                            f"{self.stop!r}; write stop=({self.stop!r},)")
        if not isinstance(self.stop, (tuple, list)):
            raise TypeError(f"SamplingParams.stop must be a tuple of strings, got {type(self.stop).__name__}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"SamplingParams.stop entries must be non-empty strings, got {s!r}")
        object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def greedy(self) -> bool:
        """True when sampling is argmax (temperature 0)."""
        return self.temperature == 0

    @property
    def logp_temperature(self) -> float:
        """The temperature the recorded log-probs use: ``temperature``, or 1 for greedy decoding."""
        return 1.0 if self.greedy else float(self.temperature)


@dataclass
class Rollouts:
    """Sampled completions for a batch of prompts, ``N = num_prompts * group_size`` rows.

    Rows are ordered prompt by prompt, ``group_size`` samples each: row ``i`` answers prompt
    ``prompt_index[i] = i // group_size``, as ``rlxf.losses.group_advantages`` expects.
    ``P`` is the longest prompt, ``C`` the longest completion (never padded beyond that).
    """

    prompt_ids: Tensor
    """``[N, P]`` long, left-padded with the pad id."""
    prompt_mask: Tensor
    """``[N, P]`` long, 1 on prompt tokens, 0 on padding."""
    completion_ids: Tensor
    """``[N, C]`` long, right-padded with the pad id."""
    completion_mask: Tensor
    """``[N, C]`` long, 1 on generated tokens up to and including EOS or the last token of a stop
    string, 0 after (every row has at least one token)."""
    logps: Tensor
    """``[N, C]`` float32, log-prob of each sampled token under ``softmax(logits / τ)`` (τ =
    ``SamplingParams.logp_temperature``) on the unfiltered logits; 0 on padding."""
    finish_reason: list[str]
    """``[N]``: ``"stop"`` (EOS or a stop string) or ``"length"`` (``max_new_tokens`` reached)."""
    text: list[str]
    """``[N]`` decoded completions (special tokens skipped: EOS is not in it; a stop string is)."""
    prompt_index: Tensor
    """``[N]`` long, which prompt of the call each row answers (``0, 0, …, 1, 1, …``)."""
    group_size: int = 1
    """Samples per prompt (``SamplingParams.n``)."""
    context_mask: Tensor | None = None
    """``[N, C]`` long or None. Multi-turn rollouts (:mod:`rlxf.rollout.multiturn`): 1 on every token
    of the episode after the prompt — the model's turns *and* the environment's observations — which
    the model attends to; ``completion_mask`` is then 1 on the model's own tokens only (the loss
    mask), and observation tokens carry log-prob 0. None: the same as ``completion_mask``."""

    def __post_init__(self) -> None:
        n = self.prompt_ids.shape[0]
        pairs = (("prompt_mask", self.prompt_mask, self.prompt_ids),
                 ("completion_mask", self.completion_mask, self.completion_ids),
                 ("logps", self.logps, self.completion_ids))
        if self.context_mask is not None:
            pairs += (("context_mask", self.context_mask, self.completion_ids),)
        for name, tensor, like in pairs:
            if tensor.shape != like.shape:
                raise ValueError(f"Rollouts.{name} has shape {tuple(tensor.shape)}, expected "
                                 f"{tuple(like.shape)}")
        for name in ("completion_ids", "finish_reason", "text", "prompt_index"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"Rollouts.{name} has {len(getattr(self, name))} rows, prompt_ids has {n}")
        bad = sorted(set(self.finish_reason) - set(FINISH_REASONS))
        if bad:
            raise ValueError(f"Rollouts.finish_reason values {bad} not in {FINISH_REASONS}")

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def num_tokens(self) -> int:
        """Generated tokens in all rows (the sum of ``completion_mask``; EOS counts, padding does not)."""
        return int(self.completion_mask.sum())

    def completion_lengths(self) -> Tensor:
        """``[N]`` long: generated tokens per row."""
        return self.completion_mask.sum(-1)

    def attended_mask(self) -> Tensor:
        """``[N, C]``: the completion tokens the model attends to (``context_mask`` when set, else
        ``completion_mask``)."""
        return self.completion_mask if self.context_mask is None else self.context_mask

    def sequences(self) -> tuple[Tensor, Tensor]:
        """``(input_ids, attention_mask)``, both ``[N, P + C]``: prompt then completion.

        The attention mask covers observation tokens too (:meth:`attended_mask`). Padding is on
        both sides; ``rlxf.models.token_logps`` accepts that, and
        ``token_logps(model, input_ids, attention_mask, temperature=τ)[:, P - 1:]`` is aligned with
        ``logps`` and ``completion_mask`` (it recomputes them on the training side).
        """
        input_ids = torch.cat([self.prompt_ids, self.completion_ids], dim=1)          # [N, P + C]
        attention_mask = torch.cat([self.prompt_mask, self.attended_mask()], dim=1)   # [N, P + C]
        return input_ids, attention_mask

    def rows(self, start: int, stop: int) -> Rollouts:
        """Rows ``start:stop`` (whole prompts' groups when both are multiples of ``group_size``);
        ``prompt_index`` restarts at 0."""
        picked = {f.name: getattr(self, f.name)[start:stop] for f in fields(self)
                  if isinstance(getattr(self, f.name), (Tensor, list))}
        picked["prompt_index"] = picked["prompt_index"] - (picked["prompt_index"][0] if stop > start else 0)
        return replace(self, **picked)

    def to(self, device: str | torch.device) -> Rollouts:
        """A copy with every tensor on ``device`` (lists are shared)."""
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                 if isinstance(getattr(self, f.name), Tensor)}
        return replace(self, **moved)


@runtime_checkable
class RolloutEngine(Protocol):
    """Anything that samples completions: ``generate(prompt_ids, params) -> Rollouts``.

    ``prompt_ids`` are token ids without padding, one list per prompt (they already carry the BOS
    and chat template the tokenizer adds). The engine samples ``params.n`` completions per prompt
    from the current weights of the policy and returns them in prompt order.
    """

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Rollouts: ...


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(name: str, value, *, minimum: int, hint: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        extra = f" ({hint})" if hint else ""
        raise ValueError(f"SamplingParams.{name} must be an integer >= {minimum}{extra}, got {value!r}")
