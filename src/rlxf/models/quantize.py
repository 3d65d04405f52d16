"""QLoRA's 4-bit base weights, and folding LoRA adapters into plain weights (docs/qlora.md).

QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv:2305.14314 §3)
stores the frozen base weights as 4-bit NormalFloat (NF4: blocks of 64 weights, each scaled by its
absmax, the 16 levels the quantiles of a standard normal), optionally quantises the per-block
scales again ("double quantisation", ~0.37 bits a parameter less), computes in bfloat16, and
trains LoRA adapters (in float32 here) on top. The 4-bit storage and matmuls are bitsandbytes'
(``bnb.nn.Linear4bit``, loaded by transformers' ``BitsAndBytesConfig``); bitsandbytes ≥ 0.46 also
runs them on the CPU, which is how the tests exercise this path.

Deviation from the QLoRA recipe as peft's ``prepare_model_for_kbit_training`` applies it: the
non-quantised frozen weights (embeddings, norms, output head) stay in bfloat16 instead of being
up-cast to float32. They are not trained, so float32 copies only cost memory (≈ 2 GB for the
embedding and head of a Llama-3-8B); the adapters, their gradients and optimiser state are float32.

:func:`folded_weight` is the one place that turns an adapted (and possibly quantised) linear layer
into a plain weight ``W + Σ_a s_a·B_a A_a``: :func:`merged_model` uses it to write ``final/merged``
(a plain bfloat16 model for a quantised base), and :class:`rlxf.rollout.StaticEngine` to sample
from a LoRA policy with its fast decode step.
"""

from __future__ import annotations

import copy
import sys

import torch
from torch import Tensor, nn

QUANTIZE_CHOICES = ("none", "nf4")
MIN_BITSANDBYTES = (0, 46)   # the first release whose 4-bit layers run on the CPU as well as on CUDA
COMPUTE_DTYPE = torch.bfloat16


def require_bitsandbytes():
    """Import bitsandbytes, or raise ``ImportError`` saying how to install a release that fits."""
    try:
        import bitsandbytes
    except ImportError as err:
        raise ImportError("--quantize nf4 needs the bitsandbytes package (4-bit NF4 layers); install it with "
                          "`pip install 'bitsandbytes>=0.46'` (it runs on CUDA and on the CPU), or run without "
                          f"--quantize (import failed: {err})") from None
    version = tuple(int(part) for part in bitsandbytes.__version__.split(".")[:2] if part.isdigit())
    if version < MIN_BITSANDBYTES:
        raise ImportError(f"--quantize nf4 needs bitsandbytes >= {'.'.join(map(str, MIN_BITSANDBYTES))}, found "
                          f"{bitsandbytes.__version__}; upgrade with `pip install -U 'bitsandbytes>=0.46'`")
    return bitsandbytes


def quantization_config(kind: str, *, double_quant: bool = False):
    """transformers' ``BitsAndBytesConfig`` for ``kind`` (``"nf4"``), or None for ``"none"``."""
    if kind not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize {kind!r} is not one of {QUANTIZE_CHOICES}")
    if kind == "none":
        if double_quant:
            raise ValueError("double_quant applies to a quantised model: pass quantize='nf4' as well")
        return None
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=COMPUTE_DTYPE)


def is_4bit_linear(module: nn.Module) -> bool:
    """True for a bitsandbytes ``Linear4bit`` (checked without importing bitsandbytes)."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def is_quantized(model: nn.Module) -> bool:
    """True if any linear layer of ``model`` stores 4-bit weights."""
    return any(is_4bit_linear(module) for module in model.modules())


def keep_4bit_layout(model: nn.Module) -> nn.Module:
    """Keep every 4-bit layer of ``model`` in bitsandbytes' standard NF4 layout; returns ``model``.

    On CPUs with AVX512-BF16, bitsandbytes (0.48+) repacks a ``Linear4bit`` weight into a CPU-only
    layout at the layer's first no-gradient forward in eval mode, for a faster inference kernel. rlxf
    runs such forwards before training (reference log-probs, the start evaluation), and a repacked
    layer breaks two things: training through it passes no gradient to its input (the inference
    kernel has no backward), and dequantising it (merged export, static engine) reads the wrong
    layout. So the repacking is switched off on every layer, and a layer already repacked goes back.
    """
    for module in model.modules():
        if is_4bit_linear(module):
            _keep_layer_layout(module)
    return model


def _keep_layer_layout(linear: nn.Module) -> None:
    """:func:`keep_4bit_layout` for one 4-bit layer: no repacking from now on, and the standard layout."""
    if hasattr(linear, "support_avx512bf16_for_cpu"):
        linear.support_avx512bf16_for_cpu = False
    _unpack_for_cpu(linear)


_CPU_PACK_ROWS = 32   # bitsandbytes' CPU layout interleaves 32 output rows


def _unpack_for_cpu(linear: nn.Module) -> None:
    """Put a weight that bitsandbytes repacked for its CPU kernel back into the standard layout, in place.

    The CPU layout (``[N, K/2]`` bytes) holds, for each group of 32 output rows and each pair of input
    columns, 64 four-bit codes as 32 bytes: the first 32 codes in the low nibbles, the last 32 in the
    high ones; its block scales are ``[K/blocksize, N]`` bf16 (double quantisation undone). The
    standard layout is row-major codes, two a byte (the first in the high nibble), with the scales in
    row-major block order. The scales stay as the repacking rounded them, in float32, not quantised again.
    """
    weight = linear.weight
    state = weight.quant_state
    if not getattr(state, "packing_format_for_cpu", False):
        return
    packed = weight.data.view(torch.uint8)
    rows, half = packed.shape
    codes = packed.reshape(-1, _CPU_PACK_ROWS)
    codes = torch.cat([codes & 0xF, codes >> 4], dim=-1)                           # 64 codes a group
    codes = codes.reshape(rows // _CPU_PACK_ROWS, half, _CPU_PACK_ROWS, 2).transpose(1, 2).reshape(-1)
    standard = ((codes[0::2] << 4) | codes[1::2]).to(torch.uint8).reshape(state.original_qshape)
    storage = getattr(state, "original_storage_type", None)
    weight.data = standard.view(storage) if storage is not None else standard
    state.absmax = state.absmax.T.reshape(-1).float()
    state.nested = False
    state.dtype = state.original_dtype
    state.packing_format_for_cpu = False


def dequantized_weight(linear: nn.Module) -> Tensor:
    """The ``[out, in]`` weight of a plain or 4-bit linear layer, dequantised to its compute dtype."""
    if not is_4bit_linear(linear):
        return linear.weight
    import bitsandbytes.functional as bnbf

    _keep_layer_layout(linear)   # a model rlxf did not load may hold repacked layers (keep_4bit_layout)
    weight = linear.weight
    return bnbf.dequantize_4bit(weight.data, weight.quant_state).reshape(linear.out_features, linear.in_features)


def fold_support(module: nn.Module) -> str | None:
    """None when :func:`folded_weight` can fold ``module``'s adapters; else why not (DoRA, lora bias, ...)."""
    from peft.tuners.lora import LoraLayer

    if not isinstance(module, LoraLayer):
        return None
    base = module.get_base_layer()
    if not (isinstance(base, nn.Linear) or is_4bit_linear(base)):
        return f"LoRA on a {type(base).__name__} layer (only linear layers fold)"
    for adapter in module.active_adapters:
        if getattr(module, "use_dora", {}).get(adapter, False):
            return "DoRA adapters (the magnitude vector does not fold into a fixed weight here)"
        if getattr(module, "lora_bias", {}).get(adapter, False):
            return "LoRA bias terms"
        if adapter not in getattr(module, "lora_A", {}):
            return f"adapter {adapter!r} is not a low-rank (lora_A/lora_B) adapter"
        if adapter in getattr(module, "lora_variant", {}):
            return f"a {type(module.lora_variant[adapter]).__name__} adapter (its forward is not W x + s·B(A x))"
    return None


@torch.no_grad()
def folded_weight(module: nn.Module, dtype: torch.dtype | None = None, *, out: Tensor | None = None) -> Tensor:
    """``W + Σ_a (α_a/r_a)·B_a A_a`` ``[out, in]`` of a LoRA layer (LoRA, Hu et al. 2021, arXiv:2106.09685
    eq. 3) over its active adapters; a 4-bit base ``W`` is dequantised first; a plain or 4-bit
    linear layer gives its (dequantised) weight. Adapters that are disabled or already merged add
    nothing. Summed in float32, rounded once to ``dtype`` (default: the base weight's dtype, or the
    compute dtype of a 4-bit one); written into ``out`` when given (same shape).
    """
    from peft.tuners.lora import LoraLayer

    base = module.get_base_layer() if isinstance(module, LoraLayer) else module
    weight = dequantized_weight(base)
    dtype = dtype or weight.dtype
    if isinstance(module, LoraLayer) and not module.disable_adapters and not module.merged:
        why_not = fold_support(module)
        if why_not:
            raise ValueError(f"cannot fold the adapters of {type(module).__name__}: {why_not}")
        total = weight.float()
        for adapter in module.active_adapters:
            total = total + module.get_delta_weight(adapter).float().to(total.device)
        weight = total
    if out is None:
        return weight.to(dtype).clone() if weight.dtype == dtype else weight.to(dtype)
    return out.copy_(weight)


@torch.no_grad()
def merged_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A plain transformers model equal to the PEFT ``model`` with its adapters folded in.

    A 4-bit base is dequantised, so the result loads with plain transformers (no bitsandbytes): in
    bfloat16 (the compute dtype) unless ``dtype`` says otherwise; a full-precision base keeps its
    dtype. The result lives on the CPU, built one tensor at a time (on a CPU-resident ``model`` only
    the folded and dequantised weights are new tensors; the rest are shared with it). A
    head that peft trains whole (``modules_to_save``, e.g. a reward model's ``score``) is taken from
    its trained copy.
    """
    base = model.get_base_model()
    quantized = is_quantized(base)
    config = copy.deepcopy(base.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    if dtype is None:
        dtype = COMPUTE_DTYPE if quantized else base.get_input_embeddings().weight.dtype
    config.dtype = dtype
    with torch.device("meta"):
        fresh = type(base)(config)
    # one layer at a time onto the CPU: merging never holds a second model on the accelerator
    state = {name: _merged_tensor(base, name, dtype).to("cpu") for name in fresh.state_dict()}
    fresh.load_state_dict(state, assign=True, strict=True)
    fresh.tie_weights()
    return fresh.eval()


def _merged_tensor(base: nn.Module, name: str, dtype: torch.dtype) -> Tensor:
    """The merged model's tensor ``name``, read from the PEFT base model ``base``."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    prefix, leaf = name.rpartition(".")[::2]
    module = base.get_submodule(prefix) if prefix else base
    if isinstance(module, ModulesToSaveWrapper):
        module = module.modules_to_save[module.active_adapters[0]] if not module.disable_adapters \
            else module.original_module
    if leaf == "weight" and (isinstance(module, LoraLayer) or is_4bit_linear(module)):
        return folded_weight(module, dtype)
    if isinstance(module, LoraLayer):
        module = module.get_base_layer()
    tensor = getattr(module, leaf)
    return tensor.detach().to(dtype) if tensor.is_floating_point() else tensor.detach()
