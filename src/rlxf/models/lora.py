"""LoRA adapters through ``peft`` (imported lazily: only LoRA runs pay for it).

A LoRA policy doubles as its own reference model: ``Reference.build(policy, "lora")`` runs the same
weights with the adapters disabled, so no second copy of the base model is kept.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

_TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS")
_SEQ_CLS_HEADS = ("score", "classifier")


def apply_lora(model: nn.Module, *, r: int = 8, alpha: float = 16, dropout: float = 0.0,
               target_modules: Sequence[str] | str = ("q_proj", "k_proj", "v_proj", "o_proj"),
               task_type: str = "CAUSAL_LM"):
    """Wrap ``model`` in LoRA adapters of rank ``r`` (scale ``alpha / r``); return the ``PeftModel``.

    Only the adapter weights are trainable. ``task_type="SEQ_CLS"`` (reward/value models) also
    keeps the freshly initialised head (``score`` or ``classifier``) fully trainable via
    ``modules_to_save``. ``target_modules`` are leaf names of linear layers (``"all-linear"`` is
    passed through to peft); a name the model does not have raises ``ValueError`` listing the
    names it does have.
    """
    from peft import LoraConfig, get_peft_model

    if task_type not in _TASK_TYPES:
        raise ValueError(f"task_type {task_type!r} is not supported; use one of {_TASK_TYPES}")
    if r <= 0:
        raise ValueError(f"LoRA rank r must be positive, got {r}")
    if isinstance(target_modules, str):
        targets: str | list[str] = target_modules
    else:
        targets = list(target_modules)
        available = linear_module_names(model)
        missing = [name for name in targets if name not in available]
        if missing:
            raise ValueError(
                f"LoRA target module(s) {missing} not found in {type(model).__name__}; its linear "
                f"modules are {sorted(available)} (set target_modules to some of these, or 'all-linear')")
    modules_to_save = None
    if task_type == "SEQ_CLS":
        modules_to_save = [name for name in _SEQ_CLS_HEADS
                           if isinstance(getattr(model, name, None), nn.Module)]
        if not modules_to_save:
            raise ValueError(f"task_type='SEQ_CLS' but {type(model).__name__} has no 'score' or "
                             "'classifier' head; load it with load_reward_model")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        task_type=task_type, modules_to_save=modules_to_save)
    return get_peft_model(model, config)


def linear_module_names(model: nn.Module) -> set[str]:
    """Leaf names (``q_proj``, ``lm_head``, ...) of the model's linear layers (incl. GPT-2 ``Conv1D``)."""
    from transformers.pytorch_utils import Conv1D

    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
            if name and isinstance(module, (nn.Linear, Conv1D))}
