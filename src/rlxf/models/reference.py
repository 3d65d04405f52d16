"""The frozen reference policy π_ref, in the cheapest form the run allows.

Modes (docs/performance.md):

- ``"none"``: reference-free losses (ORPO, SimPO-style, GRPO with β = 0) skip it entirely; asking it
  for log-probs is a bug in the recipe and raises.
- ``"copy"``: a frozen deep copy of the policy taken at build time (eval mode, no grads).
- ``"lora"``: the LoRA policy itself run under ``disable_adapter()`` — the base weights are frozen
  by LoRA, so "adapters off" *is* the initial policy, with no second copy of the weights.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from rlxf.models.loading import is_peft_model
from rlxf.models.logprobs import token_logps
from rlxf.runtime import fsdp

MODES = ("none", "copy", "lora")


class Reference:
    """A frozen reference model; build it with :meth:`build` (from the policy) or :meth:`from_model`."""

    def __init__(self, mode: str, model: nn.Module | None):
        if mode not in MODES:
            raise ValueError(f"reference mode {mode!r} is not one of {MODES}")
        self.mode = mode
        self.model = model

    @classmethod
    def build(cls, policy: nn.Module, mode: str) -> Reference:
        """Reference for ``policy``: ``"none"``, ``"copy"`` (frozen deepcopy) or ``"lora"`` (adapters off)."""
        if mode == "none":
            return cls("none", None)
        if mode == "copy":
            if fsdp.is_sharded(policy):   # --fsdp: a sharded frozen copy (every process calls this)
                return cls("copy", fsdp.frozen_copy(policy))
            return cls.from_model(copy.deepcopy(policy))
        if mode == "lora":
            if not is_peft_model(policy):
                raise ValueError("reference mode 'lora' needs a LoRA policy (wrap it with "
                                 "rlxf.models.apply_lora first), or use mode 'copy'")
            return cls("lora", policy)
        raise ValueError(f"reference mode {mode!r} is not one of {MODES}")

    @classmethod
    def from_model(cls, model: nn.Module) -> Reference:
        """Freeze ``model`` in place (eval mode, ``requires_grad=False``) and use it as the reference.

        For a reference that is not the policy's initial state (e.g. a separately loaded SFT model).
        """
        model.eval()
        model.requires_grad_(False)
        return cls("copy", model)

    @property
    def enabled(self) -> bool:
        """False for the reference-free mode ``"none"``."""
        return self.mode != "none"

    @torch.no_grad()
    def token_logps(self, input_ids: Tensor, attention_mask: Tensor, *, temperature: float = 1.0,
                    chunk_size: int = 1024, label_mask: Tensor | None = None) -> Tensor:
        """π_ref's per-token log-probs ``[B, T-1]`` (contract of :func:`rlxf.models.logprobs.token_logps`)."""
        if self.model is None:
            raise RuntimeError("this run is reference-free (reference mode 'none'), so it has no "
                               "reference log-probs; use reference 'copy' or 'lora' for losses that "
                               "need π_ref (DPO, KL penalties)")
        with self._reference_weights():
            return token_logps(self.model, input_ids, attention_mask, temperature=temperature,
                               chunk_size=chunk_size, label_mask=label_mask)

    @torch.no_grad()
    def shared_prompt_logps(self, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                            completion_mask: Tensor, *, temperature: float = 1.0) -> Tensor:
        """π_ref's log-probs with each prompt encoded once (:func:`rlxf.models.shared_prompt_logps`)."""
        from rlxf.models.logprobs import shared_prompt_logps

        if self.model is None:
            raise RuntimeError("this run is reference-free (reference mode 'none'), so it has no "
                               "reference log-probs")
        with self._reference_weights():
            return shared_prompt_logps(self.model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                                       temperature=temperature)

    @contextmanager
    def _reference_weights(self):
        """In ``"lora"`` mode: adapters off and dropout off for the call, training state restored after."""
        if self.mode != "lora":
            yield
            return
        modes = {module: module.training for module in self.model.modules()}
        self.model.eval()
        try:
            with self.model.disable_adapter():
                yield
        finally:
            for module, training in modes.items():
                module.training = training

    def __repr__(self) -> str:
        return f"Reference(mode={self.mode!r})"
