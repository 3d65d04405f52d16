"""Plain-weight stand-ins for a LoRA (or QLoRA) policy's adapted and 4-bit linear layers.

:class:`rlxf.rollout.StaticEngine` decodes against ``nn.Linear`` weights. A LoRA policy computes
``W x + s·B(A x)`` in each adapted layer, and a QLoRA policy's ``W`` is 4-bit. Before each
``generate`` the engine writes ``W + s·BA`` (``W`` dequantised) into one plain weight per such layer
(:func:`rlxf.models.quantize.folded_weight`), swaps those layers in for the call, and swaps the
policy's own layers back afterwards. The policy is never modified: merging ``s·BA`` into ``W`` in
place and subtracting it after would round a bf16 ``W`` twice and move the reference ("adapters
off") a little at every rollout.

The stand-ins are kept between calls and refilled in place, so the engine's captured CUDA graphs,
which read their storage, stay valid; :meth:`FoldedLinears.release` frees them. Their memory is one
copy of the adapted layers in the compute dtype (q, k, v, o at Llama-3-8B: 1.3 G weights, 2.7 GB in
bf16), or of every linear layer for a 4-bit base (≈ 14 GB at 8B: QLoRA saves memory in training,
not while sampling through this engine). docs/qlora.md compares this with applying the low-rank
update inside the decode step.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from rlxf.models.loading import is_peft_model
from rlxf.models.quantize import fold_support, folded_weight, is_4bit_linear


def needs_folding(model: nn.Module) -> bool:
    """True for a PEFT model or one with 4-bit linear layers: the static engine decodes it through stand-ins."""
    return is_peft_model(model) or any(is_4bit_linear(m) for m in model.modules())


def folding_support(model: nn.Module) -> str | None:
    """None when every adapted layer of ``model`` folds into a plain weight; else why not."""
    if not is_peft_model(model):
        return None
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    adapted = [(name, m) for name, m in base.named_modules() if hasattr(m, "get_base_layer")]
    for name, module in adapted:
        if not isinstance(module, LoraLayer):
            return f"{name} is a {type(module).__name__} adapter (only LoRA folds)"
        if not isinstance(module.get_base_layer(), nn.Linear) and not is_4bit_linear(module.get_base_layer()):
            return f"{name}: LoRA on a {type(module.get_base_layer()).__name__} (only linear layers fold)"
        why_not = fold_support(module)
        if why_not:
            return f"{name}: {why_not}"
    return None


class FoldedLinears:
    """The stand-ins of one model: build once, :meth:`refresh` before each call, use under :meth:`swapped`."""

    def __init__(self, model: nn.Module):
        from peft.tuners.lora import LoraLayer

        self.base = model.get_base_model() if is_peft_model(model) else model
        self.dtype = self.base.get_input_embeddings().weight.dtype
        adapted = {name for name, m in self.base.named_modules() if isinstance(m, LoraLayer)}
        self.targets = []                                                     # (parent, attribute, layer)
        for name, module in self.base.named_modules():
            parent_name, _, attr = name.rpartition(".")
            if name in adapted or (is_4bit_linear(module) and parent_name not in adapted):
                self.targets.append((self.base.get_submodule(parent_name), attr, module))
        self.stand_ins: list[nn.Linear] | None = None

    def refresh(self) -> None:
        """Write the current ``W + s·BA`` of every target into its stand-in (allocated at the first call)."""
        if self.stand_ins is None:
            self.stand_ins = [self._stand_in(layer) for _, _, layer in self.targets]
        for (_, _, layer), stand_in in zip(self.targets, self.stand_ins):
            folded_weight(layer, out=stand_in.weight.data)

    @contextmanager
    def swapped(self):
        """The base model with the stand-ins in place of the targets; the policy's layers come back after."""
        if self.stand_ins is None:
            self.refresh()
        for (parent, attr, _), stand_in in zip(self.targets, self.stand_ins):
            setattr(parent, attr, stand_in)
        try:
            yield self.base
        finally:
            for parent, attr, layer in self.targets:
                setattr(parent, attr, layer)

    def release(self) -> None:
        """Free the stand-ins (the next :meth:`refresh` allocates them again)."""
        self.stand_ins = None

    def _stand_in(self, layer: nn.Module) -> nn.Linear:
        base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
        device = base.weight.device
        stand_in = nn.Linear(base.in_features, base.out_features, bias=False, device="meta")
        stand_in.weight = nn.Parameter(torch.empty(base.out_features, base.in_features, dtype=self.dtype,
                                                   device=device), requires_grad=False)
        if base.bias is not None:
            stand_in.bias = nn.Parameter(base.bias.detach().to(self.dtype), requires_grad=False)
        return stand_in
