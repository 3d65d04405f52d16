"""Models: loading/saving (HF format, safetensors), devices/dtypes, LoRA, the reference model, and
:mod:`rlxf.models.logprobs` — the one place where logits become token log-probs.

``peft`` is imported only when LoRA is used.
"""

from rlxf.models.loading import (
    available_devices,
    compile_layers,
    ensure_pad_token,
    eval_mode,
    is_peft_model,
    load_policy,
    load_reward_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    save_pretrained,
)
from rlxf.models.logprobs import (
    labels_from,
    logps_from_logits,
    mean_logps,
    reward_scores,
    sequence_logps,
    shared_prompt_logps,
    token_logps,
    top_logps_from_logits,
)
from rlxf.models.lora import apply_lora, linear_module_names
from rlxf.models.reference import Reference

__all__ = [
    "Reference",
    "apply_lora",
    "available_devices",
    "compile_layers",
    "ensure_pad_token",
    "eval_mode",
    "is_peft_model",
    "labels_from",
    "linear_module_names",
    "load_policy",
    "load_reward_model",
    "load_tokenizer",
    "logps_from_logits",
    "mean_logps",
    "resolve_device",
    "resolve_dtype",
    "reward_scores",
    "save_pretrained",
    "sequence_logps",
    "shared_prompt_logps",
    "token_logps",
    "top_logps_from_logits",
]
