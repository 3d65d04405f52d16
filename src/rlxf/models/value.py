"""Per-token value models for PPO: V(s_t) = head(body(x)_t).

Two forms (docs/methods/ppo.md): a **separate** critic — a transformer body with a scalar head, initialised
from a reward model as InstructGPT and TRL do (or from the policy's checkpoint with a fresh head) —
or a **value head** on the policy's own body (shared weights; the value loss then also trains the
policy's body, weighted by the value coefficient).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rlxf.models.loading import is_peft_model


class ValueModel(nn.Module):
    """``forward(input_ids, attention_mask) -> [B, T]`` float32 values, one per position.

    The value of the state before completion token ``t`` (prompt length ``P``) is
    ``values[:, P - 1 + t]``, the same alignment as ``token_logps(...)[:, P - 1:]``.
    """

    def __init__(self, body: nn.Module, head: nn.Module, *, shared: bool):
        super().__init__()
        self.body = body
        self.head = head
        self.shared = shared

    @classmethod
    def from_sequence_classifier(cls, model: nn.Module) -> ValueModel:
        """A separate critic from a sequence-classification model (e.g. a reward model from
        ``rlxf rm``): its transformer body plus its ``score`` head, applied at every position."""
        base = model.get_base_model() if is_peft_model(model) else model
        body = getattr(base, base.base_model_prefix, None)
        head = getattr(base, "score", None)
        if body is None or not isinstance(head, nn.Module):
            raise ValueError(f"{type(base).__name__} has no '{base.base_model_prefix}' body and 'score' head; "
                             "use a *ForSequenceClassification model (as `rlxf rm` trains) as the value model")
        return cls(body, head, shared=False)

    @classmethod
    def value_head(cls, policy: nn.Module) -> ValueModel:
        """A zero-initialised scalar head on the policy's own body (weights shared, not copied).

        The head is trained, so it is float32 even over a bf16 body (a LoRA or QLoRA policy's
        frozen base): the body's hidden states are cast to it."""
        base = policy.get_base_model() if is_peft_model(policy) else policy
        body = getattr(base, base.base_model_prefix, None)
        if body is None:
            raise ValueError(f"cannot find the transformer body of {type(base).__name__} "
                             f"(attribute '{base.base_model_prefix}'); use a separate value model")
        hidden = base.config.hidden_size
        param = next(base.parameters())
        head = nn.Linear(hidden, 1, device=param.device, dtype=torch.float32)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        return cls(body, head, shared=True)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)            # [B, T]
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=False).last_hidden_state                           # [B, T, H]
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1).float()        # [B, T]

    def own_parameters(self):
        """Parameters the critic adds to training: the head only when the body is the policy's."""
        return list(self.head.parameters()) if self.shared else list(self.parameters())


def values_for_completions(value_model: ValueModel, input_ids: Tensor, attention_mask: Tensor,
                           prompt_len: int) -> Tensor:
    """``[B, C]`` values of the states before each completion token (``input_ids`` = prompt ‖ completion)."""
    values = value_model(input_ids, attention_mask)                                     # [B, P + C]
    return values[:, prompt_len - 1:-1]
