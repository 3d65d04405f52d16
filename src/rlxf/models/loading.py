"""Load and save models and tokenizers in Hugging Face format; pick devices and dtypes.

Safety rules (docs/security.md): weights load from safetensors only
(``use_safetensors=True``, never pickle), ``trust_remote_code`` is off unless the caller turns it on,
and :func:`save_pretrained` writes to a temporary directory that is renamed into place, so a crash
mid-save never leaves a half-written model where a complete one is expected.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path

import torch

from rlxf.models.quantize import keep_4bit_layout
from rlxf.runtime import fsdp
from rlxf.runtime.hub import HUB_ID, HubUnavailable, hub_problem, model_fix
from rlxf.zoo import resolve_model_name

logger = logging.getLogger("rlxf.models")

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
_HUB_ID = HUB_ID   # "org/name" or "name" on the Hub; anything else is a path
_OFFLINE_HINTS = ("couldn't connect", "could not connect", "offline", "connection", "network",
                  "name or service not known", "temporary failure in name resolution")


# ---------------------------------------------------------------------------------------------
# devices and dtypes
# ---------------------------------------------------------------------------------------------

def available_devices() -> list[str]:
    """Names of the devices this process can use, e.g. ``["cuda:0", "cuda:1", "cpu"]``."""
    names = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    if _mps_available():
        names.append("mps")
    names.append("cpu")
    return names


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """Turn ``"auto" | "cpu" | "cuda" | "cuda:N" | "mps"`` into a ``torch.device``.

    ``auto`` picks CUDA, then MPS, then CPU. An explicit device that is not available raises
    ``ValueError`` naming the devices that are.
    """
    text = str(spec).strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        device = torch.device(text)
    except RuntimeError as err:
        raise ValueError(f"device {spec!r} is not a device name; use 'auto' or one of "
                         f"{available_devices()}") from err
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index is not None and device.index >= count):
            raise ValueError(f"device {spec!r} is not available on this machine; available: "
                             f"{available_devices()} (use 'auto' to pick one)")
    elif device.type == "mps" and not _mps_available():
        raise ValueError(f"device {spec!r} is not available on this machine; available: "
                         f"{available_devices()} (use 'auto' to pick one)")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {spec!r} is not supported; use 'auto' or one of {available_devices()}")
    return device


def resolve_dtype(spec: str | torch.dtype = "auto", device: str | torch.device | None = None) -> torch.dtype:
    """Turn ``"auto" | "float32"/"fp32" | "bfloat16"/"bf16" | "float16"/"fp16"`` into a ``torch.dtype``.

    ``auto`` is bfloat16 on a CUDA device that supports it, float32 otherwise (CPU, MPS, older GPUs).
    ``device=None`` means the device ``resolve_device("auto")`` would pick.
    """
    if isinstance(spec, torch.dtype):
        if spec not in _DTYPES.values():
            raise ValueError(f"dtype {spec} is not supported; use one of {sorted(set(_DTYPES))} or 'auto'")
        return spec
    text = str(spec).strip().lower().removeprefix("torch.")
    if text == "auto":
        device = resolve_device(device if device is not None else "auto")
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if text not in _DTYPES:
        raise ValueError(f"dtype {spec!r} is not supported; use 'auto' or one of {sorted(_DTYPES)}")
    return _DTYPES[text]


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


# ---------------------------------------------------------------------------------------------
# tokenizers
# ---------------------------------------------------------------------------------------------

def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False):
    """Load a tokenizer (``tiny`` = the embedded model's) and make sure it has a pad token.

    See :func:`ensure_pad_token`: when it had to add a new ``<pad>`` token, load the model with
    ``load_policy(..., resize_to=len(tokenizer))`` so the embeddings cover it.
    """
    from transformers import AutoTokenizer

    source = _check_source(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise _load_error(name_or_path, source, err, what="tokenizer") from err
    ensure_pad_token(tokenizer)
    return tokenizer


def ensure_pad_token(tokenizer) -> bool:
    """Give ``tokenizer`` a pad token; return True if a new token was added to its vocabulary.

    No pad token but an EOS token: EOS becomes the pad token (a warning is logged; masks, not token
    ids, mark padding everywhere in rlxf, so a real EOS is never mistaken for padding). Neither: a
    ``<pad>`` special token is added, and the model's embeddings must then be resized to
    ``len(tokenizer)`` (``load_policy(..., resize_to=len(tokenizer))``).
    """
    if tokenizer.pad_token is not None:
        return False
    if tokenizer.eos_token is not None:
        logger.warning("tokenizer has no pad token; using its EOS token %r as the pad token",
                       tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
        return False
    logger.warning("tokenizer has neither a pad nor an EOS token; using a '<pad>' special token "
                   "(if it is new, load the model with resize_to=len(tokenizer))")
    return tokenizer.add_special_tokens({"pad_token": "<pad>"}) > 0


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------

def load_policy(name_or_path: str, *, dtype: str | torch.dtype | None = None,
                device: str | torch.device | None = None, trust_remote_code: bool = False,
                resize_to: int | None = None, pad_token_id: int | None = None, quantize: str = "none",
                double_quant: bool = False):
    """Load a causal LM (``AutoModelForCausalLM``, safetensors only) onto ``device`` in ``dtype``.

    ``name_or_path`` is ``tiny``, a local HF directory, or a Hub id. A directory holding only a
    LoRA adapter (``adapter_config.json``, as rlxf saves for LoRA runs) loads its base model and
    attaches the adapter (trainable). ``dtype``/``device`` default to ``"auto"`` (see
    :func:`resolve_dtype`, :func:`resolve_device`). ``resize_to`` grows the token embeddings to
    that many rows when the tokenizer gained tokens (never shrinks: many checkpoints pad their
    vocabulary beyond the tokenizer). ``pad_token_id`` is written into the model and generation
    configs. ``quantize="nf4"`` stores the linear layers' weights in 4-bit NF4 (QLoRA, through
    bitsandbytes; ``double_quant`` also quantises their scales) and everything else in bfloat16,
    whatever ``dtype`` says (docs/qlora.md); such a model trains only through LoRA adapters.
    """
    from transformers import AutoModelForCausalLM

    device = resolve_device(device if device is not None else "auto")
    dtype = resolve_dtype(dtype if dtype is not None else "auto", device)
    source = _check_source(name_or_path)
    adapter_dir = _adapter_only_dir(source)
    if adapter_dir is not None:
        return _load_adapter_policy(adapter_dir, dtype=dtype, device=device,
                                    trust_remote_code=trust_remote_code, resize_to=resize_to,
                                    pad_token_id=pad_token_id, quantize=quantize, double_quant=double_quant)
    kwargs, dtype = _quantized_kwargs(quantize, double_quant, dtype, device)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, **_dtype_kwarg(dtype), **kwargs, use_safetensors=True, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise _load_error(name_or_path, source, err, what="model") from err
    if resize_to is not None and resize_to > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(resize_to)
    _set_pad_token_id(model, pad_token_id)
    return keep_4bit_layout(model) if kwargs else model.to(device)


def load_reward_model(name_or_path: str, *, dtype: str | torch.dtype | None = None,
                      device: str | torch.device | None = None, trust_remote_code: bool = False,
                      pad_token_id: int | None = None, resize_to: int | None = None, quantize: str = "none",
                      double_quant: bool = False):
    """Load a scalar reward model (``AutoModelForSequenceClassification``, ``num_labels=1``).

    From a causal-LM checkpoint the body is reused and a fresh ``score`` head is initialised
    (transformers logs that those weights are new: that is expected when training a reward model).
    ``config.pad_token_id`` is set (``pad_token_id`` or the checkpoint's, else its EOS id) so that
    a plain ``model(...)`` call reads the score at the last non-pad token; :func:`rlxf.models.
    logprobs.reward_scores` reads it from the attention mask instead, which is also right when
    pad == EOS. ``resize_to`` grows the embeddings (a pad token was added), and ``quantize`` /
    ``double_quant`` store the body's linear layers in 4-bit NF4 (the ``score`` head stays in
    bfloat16), as in :func:`load_policy`.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    device = resolve_device(device if device is not None else "auto")
    dtype = resolve_dtype(dtype if dtype is not None else "auto", device)
    source = _check_source(name_or_path)
    kwargs, dtype = _quantized_kwargs(quantize, double_quant, dtype, device)
    try:
        config = AutoConfig.from_pretrained(source, num_labels=1, trust_remote_code=trust_remote_code)
        if pad_token_id is not None:
            config.pad_token_id = pad_token_id
        elif getattr(config, "pad_token_id", None) is None:
            eos = getattr(config, "eos_token_id", None)
            config.pad_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos
        model = AutoModelForSequenceClassification.from_pretrained(
            source, config=config, **_dtype_kwarg(dtype), **kwargs, use_safetensors=True,
            trust_remote_code=trust_remote_code)
    except OSError as err:
        raise _load_error(name_or_path, source, err, what="reward model") from err
    if resize_to is not None and resize_to > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(resize_to)
    return keep_4bit_layout(model) if kwargs else model.to(device)


def save_pretrained(model, tokenizer, path: str | os.PathLike, *, merge_lora: bool = False) -> Path:
    """Save ``model`` (+ ``tokenizer`` if given) to ``path`` in HF format (safetensors), atomically.

    Everything is written to ``path.tmp-<random>`` first and then renamed to ``path``; an existing
    ``path`` is moved aside and deleted only after the rename, so at every moment ``path`` is either
    the old complete save or the new one. A PEFT model saves its adapter
    (``adapter_model.safetensors``); with ``merge_lora=True`` the merged model is also written to
    ``path/merged`` (plain transformers can load it; a 4-bit base is dequantised to bfloat16). Merging
    builds new tensors only for the adapted and quantised layers (:func:`rlxf.models.quantize.merged_model`)
    and leaves the live model untouched. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        # --fsdp: the full weights gathered for this save (rlxf.runtime.fsdp.exporting), not the shards
        model.save_pretrained(str(tmp), state_dict=fsdp.export_state_dict(model))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if merge_lora:
            if not is_peft_model(model):
                raise ValueError("merge_lora=True needs a PEFT (LoRA) model; this model has no adapter")
            from rlxf.models.quantize import merged_model

            merged = merged_model(model)
            merged.save_pretrained(str(tmp / "merged"))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp / "merged"))
            del merged
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def is_peft_model(model) -> bool:
    """True if ``model`` is a ``peft.PeftModel`` (checked without importing peft)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def _replace_dir(src: Path, dst: Path) -> None:
    """Rename directory ``src`` to ``dst``, replacing a stale ``dst`` (moved aside, then deleted)."""
    if dst.exists() or dst.is_symlink():
        stale = dst.with_name(f"{dst.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dst, stale)
        os.replace(src, dst)
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink()
    else:
        os.replace(src, dst)


def _check_source(name_or_path: str) -> str:
    """Resolve ``tiny`` and reject a missing local path before transformers tries the Hub."""
    source = resolve_model_name(str(name_or_path))
    path = Path(source).expanduser()
    if path.exists():
        if path.is_dir() and not any((path / f).exists() for f in (
                "config.json", "adapter_config.json", "tokenizer_config.json", "tokenizer.json")):
            raise FileNotFoundError(
                f"{path} is a directory but holds no Hugging Face model (no config.json, "
                "adapter_config.json or tokenizer files)")
        return str(path)
    if not _HUB_ID.match(source):
        raise FileNotFoundError(
            f"model {name_or_path!r} not found: no such local directory, and it is not a "
            "Hugging Face Hub id ('org/name'); pass an existing directory, a Hub id, or 'tiny'")
    problem = hub_problem(source, "model", option="model", fix=model_fix(source))
    if problem:   # fail now rather than after transformers' network retries
        raise HubUnavailable(problem)
    return source


def _load_error(name_or_path: str, source: str, err: OSError, *, what: str) -> Exception:
    text = str(err)
    if any(hint in text.lower() for hint in _OFFLINE_HINTS):
        return OSError(
            f"could not load {what} {name_or_path!r}: the Hugging Face Hub is offline or unreachable "
            "and it is not in the local cache; pass a local model directory or 'tiny' "
            f"(transformers said: {text.splitlines()[0]})")
    if "safetensors" in text.lower():
        return OSError(
            f"could not load {what} {name_or_path!r}: rlxf loads weights from safetensors only "
            "(pickle checkpoints such as pytorch_model.bin can run arbitrary code); convert the "
            f"checkpoint to safetensors first (transformers said: {text.splitlines()[0]})")
    return OSError(f"could not load {what} {name_or_path!r} (no local directory named {source!r}; "
                   f"tried the Hugging Face Hub): {text}")


def _adapter_only_dir(source: str) -> Path | None:
    path = Path(source)
    if path.is_dir() and (path / "adapter_config.json").exists() and not (path / "config.json").exists():
        return path
    return None


def _quantized_kwargs(quantize: str, double_quant: bool, dtype: torch.dtype, device: torch.device
                      ) -> tuple[dict, torch.dtype]:
    """(extra ``from_pretrained`` arguments, dtype of the unquantised weights) for ``quantize``."""
    from rlxf.models.quantize import COMPUTE_DTYPE, quantization_config

    config = quantization_config(quantize, double_quant=double_quant)
    if config is None:
        return {}, dtype
    # accelerate's device map wants a CUDA index, not the bare "cuda" device
    place = (device.index if device.index is not None else torch.cuda.current_device()) if device.type == "cuda" \
        else str(device)
    return {"quantization_config": config, "device_map": {"": place}}, COMPUTE_DTYPE


def _load_adapter_policy(adapter_dir: Path, *, dtype, device, trust_remote_code, resize_to, pad_token_id,
                         quantize="none", double_quant=False):
    import json

    from peft import PeftModel

    base_name = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base_name:
        raise ValueError(f"{adapter_dir}/adapter_config.json does not name its base model "
                         "(base_model_name_or_path)")
    base = load_policy(base_name, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                       resize_to=resize_to, pad_token_id=pad_token_id, quantize=quantize, double_quant=double_quant)
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)
    return model if quantize != "none" else model.to(device)


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    """``from_pretrained``'s dtype argument: ``dtype`` since transformers 4.56, ``torch_dtype`` before."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _set_pad_token_id(model, pad_token_id: int | None) -> None:
    if pad_token_id is None:
        return
    model.config.pad_token_id = pad_token_id
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.pad_token_id = pad_token_id


def compile_layers(model: torch.nn.Module, activation_memory_budget: float | None = None, **compile_kwargs) -> int:
    """``torch.compile`` every decoder layer of ``model`` in place; returns how many were compiled.

    Decoder layers are the members of the model's ``nn.ModuleList`` stacks (``model.model.layers``
    in Llama/Qwen/Mistral, also inside PEFT wrappers). Identical layers share one compiled graph, so
    the compile cost is paid about once. The layer bodies fuse their element-wise work (norms,
    rotary embedding, activation, residual adds), which also saves activation memory; the embedding,
    attention-mask construction and the output head stay eager.

    ``activation_memory_budget`` (0 < b ≤ 1): keep about this share of the layers' activations for
    backward and let torch's min-cut partitioner recompute the rest, cheapest first, inside the
    compiled backward (``torch._functorch.config.activation_memory_budget``, a process-wide torch
    setting read when the layers compile, at their first call). Unlike module-level activation
    checkpointing it does not rerun whole layers: on the H100 DPO benchmark 0.05 took peak memory
    from 12.6 to 5.3 GB at the same step time (docs/performance.md).
    """
    if activation_memory_budget is not None:
        if not 0 < activation_memory_budget <= 1:
            raise ValueError(f"activation_memory_budget must be in (0, 1], got {activation_memory_budget}")
        import torch._functorch.config as functorch_config

        functorch_config.activation_memory_budget = activation_memory_budget
    count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and all(
                type(m).__name__.endswith(("DecoderLayer", "Block")) for m in module):
            for layer in module:
                layer.compile(**compile_kwargs)
                count += 1
    return count


@contextmanager
def eval_mode(model):
    """Dropout off for the duration; every module's own training flag is restored afterwards.

    Anything that is not an ``nn.Module`` (e.g. a ``Reference`` wrapper) passes through unchanged.
    """
    if not isinstance(model, torch.nn.Module):
        yield
        return
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training
