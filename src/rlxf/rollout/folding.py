"""Stand-ins for a LoRA (or QLoRA) policy's adapted and 4-bit linear layers, in two kinds.

:class:`rlxf.rollout.StaticEngine` decodes through the modules of the policy's base model. A LoRA
layer computes ``W x + s·B(A x)`` (``s`` = peft's ``scaling``: ``α/r``, or ``α/√r`` with rsLoRA),
and a QLoRA policy's ``W`` is 4-bit. Before each ``generate`` the engine fills one stand-in per such
layer, swaps the stand-ins in for the call, and swaps the policy's own layers back afterwards
(``adapters=`` of the engine picks the kind):

- ``"fold"`` (:class:`FoldedLinears`): a plain ``nn.Linear`` holding ``W + s·BA`` (``W``
  dequantised; :func:`rlxf.models.quantize.folded_weight`) for every adapted layer, and a
  dequantised copy of every other 4-bit layer. Each projection is one matmul, and the decode step
  can fuse them; the price is one copy of the adapted layers in the compute dtype (q, k, v, o at
  Llama-3-8B: 1.3 G weights, 2.7 GB in bf16), or of every linear layer for a 4-bit base (≈ 14 GB
  at 8B: QLoRA saves memory in training, not while sampling this way).
- ``"lowrank"`` (:class:`LowRankLinears`): a :class:`LowRankLinear` per adapted layer computing
  ``base(x) + (x Aᵀ)(s·B)ᵀ``, where ``base`` is the layer's own base layer (the plain ``nn.Linear``
  with its weight, or the 4-bit bitsandbytes layer, called as is) and ``A``, ``s·B`` are copies of
  the active adapters' factors in the compute dtype (``r × in`` and ``out × r``). Other 4-bit layers
  stay as they are. No weight-sized copy; each adapted projection costs two skinny matmuls more a
  step, and a 4-bit base runs bitsandbytes' 4-bit matmul at every step.

The policy is never modified: merging ``s·BA`` into ``W`` in place and subtracting it after would
round a bf16 ``W`` twice and move the reference ("adapters off") a little at every rollout. The
stand-ins are kept between calls and refilled in place, so the engine's captured CUDA graphs, which
read their storage, stay valid; ``release()`` frees them. docs/qlora.md weighs the two kinds.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rlxf.configs.choices import ADAPTER_MODES
from rlxf.models.loading import is_peft_model
from rlxf.models.quantize import fold_support, folded_weight, is_4bit_linear


def needs_folding(model: nn.Module) -> bool:
    """True for a PEFT model or one with 4-bit linear layers: the static engine decodes it through stand-ins."""
    return is_peft_model(model) or any(is_4bit_linear(m) for m in model.modules())


def folding_support(model: nn.Module) -> str | None:
    """None when every adapted layer of ``model`` folds into a plain weight (and so also runs as a
    :class:`LowRankLinear`); else why not."""
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


class _StandIns:
    """One model's stand-ins: build once, :meth:`refresh` before each call, use under :meth:`swapped`.

    A subclass says which layers it replaces (:meth:`_replaces`), builds a stand-in for one
    (:meth:`_stand_in`) and fills it from the layer's current weights in place (:meth:`_fill`).
    """

    def __init__(self, model: nn.Module):
        from peft.tuners.lora import LoraLayer

        self.base = model.get_base_model() if is_peft_model(model) else model
        self.dtype = self.base.get_input_embeddings().weight.dtype
        adapted = {name for name, m in self.base.named_modules() if isinstance(m, LoraLayer)}
        self.targets = []                                                     # (parent, attribute, layer)
        for name, module in self.base.named_modules():
            parent_name, _, attr = name.rpartition(".")
            if self._replaces(name in adapted, is_4bit_linear(module) and parent_name not in adapted):
                self.targets.append((self.base.get_submodule(parent_name), attr, module))
        self.stand_ins: list[nn.Module] | None = None

    def refresh(self) -> None:
        """Write the current weights of every target into its stand-in (allocated at the first call)."""
        if self.stand_ins is None:
            self.stand_ins = [self._stand_in(layer) for _, _, layer in self.targets]
        self.stand_ins = [self._fill(layer, stand_in)
                          for (_, _, layer), stand_in in zip(self.targets, self.stand_ins)]

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

    def _replaces(self, adapted: bool, bare_4bit: bool) -> bool:
        raise NotImplementedError

    def _stand_in(self, layer: nn.Module) -> nn.Module:
        raise NotImplementedError

    def _fill(self, layer: nn.Module, stand_in: nn.Module) -> nn.Module:
        """Fill ``stand_in`` from ``layer`` in place; returns it (or a new one where its shape no longer fits)."""
        raise NotImplementedError


class FoldedLinears(_StandIns):
    """``adapters="fold"``: a plain ``nn.Linear`` holding ``W + s·BA`` per adapted layer, and a
    dequantised copy of every other 4-bit layer."""

    def _replaces(self, adapted: bool, bare_4bit: bool) -> bool:
        return adapted or bare_4bit

    def _stand_in(self, layer: nn.Module) -> nn.Linear:
        base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
        device = base.weight.device
        stand_in = nn.Linear(base.in_features, base.out_features, bias=False, device="meta")
        stand_in.weight = nn.Parameter(torch.empty(base.out_features, base.in_features, dtype=self.dtype,
                                                   device=device), requires_grad=False)
        if base.bias is not None:
            stand_in.bias = nn.Parameter(base.bias.detach().to(self.dtype), requires_grad=False)
        return stand_in

    def _fill(self, layer: nn.Module, stand_in: nn.Linear) -> nn.Linear:
        folded_weight(layer, out=stand_in.weight.data)
        return stand_in


class LowRankLinear(nn.Module):
    """``base(x) + (x Aᵀ)(s·B)ᵀ``: a LoRA layer's base layer (shared, not copied) plus its low-rank
    update from copies of the factors. ``lora_a`` ``[R, in]`` and ``lora_b`` ``[out, R]`` stack the
    active adapters along the rank (``R = Σ r_a``; each ``B_a`` scaled by its ``s_a``); they are
    parameters without gradients, so the engine's check of parameter addresses covers them."""

    def __init__(self, base: nn.Module, rank: int, dtype: torch.dtype):
        super().__init__()
        self.base = base
        device = base.weight.device
        self.lora_a = nn.Parameter(torch.zeros(rank, base.in_features, dtype=dtype, device=device),
                                   requires_grad=False)
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=dtype, device=device),
                                   requires_grad=False)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + F.linear(F.linear(x.to(self.lora_a.dtype), self.lora_a), self.lora_b).to(x.dtype)


class LowRankLinears(_StandIns):
    """``adapters="lowrank"``: a :class:`LowRankLinear` per adapted layer; other 4-bit layers stay as they are."""

    def _replaces(self, adapted: bool, bare_4bit: bool) -> bool:
        return adapted

    def _stand_in(self, layer: nn.Module) -> LowRankLinear:
        return LowRankLinear(layer.get_base_layer(), sum(a.shape[0] for a, _, _ in _low_rank_factors(layer)),
                             self.dtype)

    @torch.no_grad()
    def _fill(self, layer: nn.Module, stand_in: LowRankLinear) -> LowRankLinear:
        factors = _low_rank_factors(layer)
        if sum(a.shape[0] for a, _, _ in factors) != stand_in.lora_a.shape[0]:
            stand_in = self._stand_in(layer)        # the active adapters' total rank changed
        start = 0
        for a, b, scale in factors:
            stand_in.lora_a[start:start + a.shape[0]].copy_(a)
            stand_in.lora_b[:, start:start + a.shape[0]].copy_(b.float() * scale)
            start += a.shape[0]
        if layer.disable_adapters or layer.merged:   # the base layer alone (a merged W already holds s·BA)
            stand_in.lora_b.zero_()
        return stand_in


def _low_rank_factors(layer: nn.Module) -> list[tuple[Tensor, Tensor, float]]:
    """``(A [r, in], B [out, r], s)`` of each active adapter of a LoRA ``layer``."""
    why_not = fold_support(layer)
    if why_not:
        raise ValueError(f"cannot apply the adapters of {type(layer).__name__} as a low-rank update: {why_not}")
    return [(layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name])
            for name in layer.active_adapters]


def adapter_stand_ins(model: nn.Module, adapters: str) -> _StandIns:
    """The stand-ins of kind ``adapters`` (one of :data:`ADAPTER_MODES`) for ``model``."""
    if adapters not in ADAPTER_MODES:
        raise ValueError(f"adapters must be one of {ADAPTER_MODES}, got {adapters!r}")
    return FoldedLinears(model) if adapters == "fold" else LowRankLinears(model)
