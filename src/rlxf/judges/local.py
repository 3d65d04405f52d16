"""LocalBackend: a transformers causal LM in this process as a judge (``local:PATH`` / ``local:tiny``).

- ``chat``: the conversation rendered with the tokenizer's chat template (generation prompt on),
  sampled by :class:`rlxf.rollout.HFEngine` (greedy at temperature 0).
- ``option_logprobs``: each option's tokens appended to the rendered conversation and scored with
  :func:`rlxf.models.token_logps` (batched forwards: every option of every query in micro-batches
  of ``max_batch_size`` rows). An option's log-prob is the sum over its tokens, so multi-token
  options are exact here (the HTTP backend needs single-token options). The option is tokenized on
  its own (no special tokens) and appended to the prompt ids, which is how a reply starts after a
  generation prompt (a SentencePiece tokenizer that marks a word start encodes "A" as "▁A", the
  form a reply's first word takes).

A conversation (plus the longest option, or plus ``max_tokens`` for ``chat``) longer than the
model's context (``config.max_position_embeddings``) is a failed call (None, counted, logged once):
scoring it anyway would read positions the model never saw.
"""

from __future__ import annotations

import logging
import threading

import torch
from torch import nn

from rlxf.models import eval_mode, load_policy, load_tokenizer, token_logps
from rlxf.rollout import HFEngine, SamplingParams

logger = logging.getLogger("rlxf.judges")


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of ``messages`` followed by the start of the assistant's reply.

    With a chat template: ``apply_chat_template(messages, add_generation_prompt=True)`` (the template
    writes its own BOS). Without one: ``"role: content"`` lines then ``"assistant:"``, encoded with
    the tokenizer's usual special tokens.
    """
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False).input_ids)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return list(tokenizer(text).input_ids)


class LocalBackend:
    """A :class:`~rlxf.judges.ChatBackend` over an in-process model (weights shared, never copied)."""

    def __init__(self, model: nn.Module, tokenizer, *, name: str = "local", max_batch_size: int = 64,
                 max_length: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_length = max_length or getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.engine = HFEngine(model, tokenizer)
        self.stats = {"calls": 0, "failures": 0}
        self._lock = threading.Lock()  # one forward at a time when threads share the backend
        self._warned = False

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, device: str = "auto", **kwargs) -> LocalBackend:
        """Load ``tiny``, a local directory or a Hub id (safetensors) with :func:`rlxf.models.load_policy`."""
        tokenizer = load_tokenizer(name_or_path)
        model = load_policy(name_or_path, device=device, resize_to=len(tokenizer))
        return cls(model, tokenizer, name=f"local:{name_or_path}", **kwargs)

    # -- chat -----------------------------------------------------------------------------------

    def chat(self, messages: list[dict], *, max_tokens: int = 256, temperature: float = 0.0) -> str | None:
        return self.chat_batch([messages], max_tokens=max_tokens, temperature=temperature)[0]

    def chat_batch(self, messages_list: list[list[dict]], *, max_tokens: int = 256,
                   temperature: float = 0.0) -> list[str | None]:
        """One reply per conversation (None where it does not fit the context)."""
        prompts = [chat_prompt_ids(self.tokenizer, m) for m in messages_list]
        fits = [i for i, ids in enumerate(prompts) if self._fits(len(ids) + max_tokens)]
        out: list[str | None] = [None] * len(prompts)
        if fits:
            params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature)
            with self._lock:
                rollouts = self.engine.generate([prompts[i] for i in fits], params)
            for i, text in zip(fits, rollouts.text):
                out[i] = text
        self._count(len(prompts), len(prompts) - len(fits))
        return out

    # -- option log-probs -----------------------------------------------------------------------

    def option_logprobs(self, messages: list[dict], options: list[str]) -> list[float] | None:
        return self.option_logprobs_batch([messages], options)[0]

    def option_logprobs_batch(self, messages_list: list[list[dict]],
                              options: list[str]) -> list[list[float] | None]:
        """``[len(messages_list)][len(options)]`` whole-option log-probs (None where it does not fit)."""
        option_ids = [list(self.tokenizer(o, add_special_tokens=False).input_ids) for o in options]
        empty = [o for o, ids in zip(options, option_ids) if not ids]
        if empty:
            raise ValueError(f"judge options {empty} encode to no tokens")
        longest = max(map(len, option_ids))
        prompts = [chat_prompt_ids(self.tokenizer, m) for m in messages_list]
        fits = [i for i, ids in enumerate(prompts) if self._fits(len(ids) + longest)]
        rows = [(i, k, prompts[i], option_ids[k]) for i in fits for k in range(len(options))]
        scores: dict[tuple[int, int], float] = {}
        device = self.model.get_input_embeddings().weight.device
        with self._lock, torch.no_grad(), eval_mode(self.model):
            for start in range(0, len(rows), self.max_batch_size):
                chunk = rows[start:start + self.max_batch_size]
                width = max(len(p) + len(o) for _, _, p, o in chunk)
                input_ids = torch.zeros(len(chunk), width, dtype=torch.long)          # [B, T]
                mask = torch.zeros(len(chunk), width, dtype=torch.long)               # [B, T]
                for r, (_, _, p, o) in enumerate(chunk):
                    input_ids[r, :len(p) + len(o)] = torch.tensor(p + o)
                    mask[r, :len(p) + len(o)] = 1
                logps = token_logps(self.model, input_ids.to(device), mask.to(device)).cpu()  # [B, T-1]
                for r, (i, k, p, o) in enumerate(chunk):
                    # out[:, t] scores token t+1: the option's tokens sit at len(p) .. len(p)+len(o)-1
                    scores[i, k] = float(logps[r, len(p) - 1:len(p) - 1 + len(o)].sum())
        out: list[list[float] | None] = [None] * len(prompts)
        for i in fits:
            out[i] = [scores[i, k] for k in range(len(options))]
        self._count(len(prompts), len(prompts) - len(fits))
        return out

    # -- helpers --------------------------------------------------------------------------------

    def _fits(self, length: int) -> bool:
        if self.max_length is None or length <= self.max_length:
            return True
        if not self._warned:
            self._warned = True
            logger.warning("%s: a judge prompt needs %d positions but the model has %d; such calls return "
                           "None (use shorter prompts, e.g. prompts='compact', or a longer-context judge)",
                           self.name, length, self.max_length)
        return False

    def _count(self, calls: int, failures: int) -> None:
        with self._lock:
            self.stats["calls"] += calls
            self.stats["failures"] += failures
