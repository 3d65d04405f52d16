"""THE one place where logits become token log-probs (and where reward models' scores are read).

Every log-prob in rlxf — sampling (rollout engines call :func:`logps_from_logits`; the static
engine's in-graph sampler writes the same float32 formula inline), old-policy, reference and
current-policy (:func:`token_logps`, :func:`shared_prompt_logps`) — follows this module, so
temperature and precision are applied the same way everywhere (docs/rollout.md: with sampling
temperature τ, logits are divided by τ for policy *and* reference log-probs; otherwise ratios and
KL are biased).

Memory (docs/performance.md): :func:`token_logps` runs the model body once to get
the final hidden states, then applies the output head only to the scored positions (``label_mask``;
padding is always skipped), ``chunk_size`` rows at a time, so the full-vocabulary float32 logits of
the batch ``[B, T, V]`` never exist. A plain ``nn.Linear`` head goes through the fused
:class:`_LinearLabelLogps` (only log-sum-exps kept; backward recomputes one chunk's logits at a
time and writes the gradient directly); other heads through ``torch.utils.checkpoint`` per chunk.
:func:`shared_prompt_logps` additionally encodes a prompt once for several completions.

Deviation from TRL, stated: TRL divides logits by ``τ + 1e-7``; rlxf divides by ``τ`` exactly (and
rejects τ <= 0). Both sides of every ratio use the same function, so the choice cancels.
"""

from __future__ import annotations

import inspect
import logging
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from rlxf.models.loading import is_peft_model
from rlxf.runtime import fsdp

logger = logging.getLogger("rlxf.models")
_WARNED_FALLBACK: set[str] = set()
# classes whose body output does not feed the output head directly (found at run time)
_FORCE_FULL_FORWARD: set[type] = set()


def logps_from_logits(logits: Tensor, labels: Tensor, *, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature)[label], computed in float32.

    logits: ``[..., V]`` (any float dtype), labels: ``[...]`` (int64) → ``[...]`` float32.
    """
    _check_temperature(temperature)
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def top_logps_from_logits(logits: Tensor, k: int, *, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """The ``k`` most likely tokens under ``softmax(logits / temperature)``, most likely first.

    logits: ``[..., V]`` → ``(logps, token_ids)``, both ``[..., min(k, V)]`` (float32, int64).
    Used for OpenAI-style ``top_logprobs`` (``rlxf serve``).
    """
    _check_temperature(temperature)
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logps = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    values, indices = logps.topk(min(k, logps.shape[-1]), dim=-1)
    return values, indices


def token_logps(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, *,
                temperature: float = 1.0, chunk_size: int = 1024, label_mask: Tensor | None = None,
                fused_head: bool = True) -> Tensor:
    """Per-token log-probs of the next token: ``out[b, t] = log p(input_ids[b, t+1] | input_ids[b, :t+1])``.

    input_ids: ``[B, T]`` int64; attention_mask: ``[B, T]`` (1 = real token, 0 = padding; ``None`` =
    all real). Returns ``[B, T-1]`` float32, computed from ``logits / temperature``.

    Alignment: ``out[:, t]`` scores token ``t+1``. A mask given on ``input_ids`` positions
    (``completion_mask: [B, T]``, 1 on completion tokens) therefore aligns with the output as
    ``completion_mask[:, 1:]``, e.g. ``sequence_logps(out, completion_mask[:, 1:])``.
    Positions whose label is padding (``attention_mask[:, t+1] == 0``) are not computed and hold 0.

    ``label_mask`` (optional, ``[B, T-1]`` or broadcastable to it, aligned with the output, e.g.
    ``completion_mask[:, 1:]``): only these positions reach the output head; the others hold 0.
    Pass it whenever only some tokens are scored (completions): the head is a large share of a
    small model's FLOPs (28% for Qwen2.5-0.5B), and prompt positions would waste it.

    ``fused_head`` (default on): when the head is a plain ``nn.Linear`` with no final-logit
    transform, the head and the log-softmax run as one autograd function (:class:`_LinearLabelLogps`)
    that keeps only each row's log-sum-exp for the backward pass and recomputes each chunk's logits
    there, writing the gradient directly (``softmax − one-hot``) instead of autograd replaying a
    checkpointed chunk. Off: each chunk goes through ``torch.utils.checkpoint`` (any head works).

    Padding may be on either side: position ids are derived from ``attention_mask`` (as
    ``generate`` does), so real tokens get the same log-probs as without padding. Works on plain
    transformers models and PEFT (LoRA) models with their active adapters. Final-logit transforms
    from the config (``final_logit_softcapping``, ``logit_scale``, ``logits_scaling``) are applied
    before the temperature. A model whose body cannot be separated from its output head falls back
    to a full forward (logged once per model class) and then materialises ``[B, T, V]`` logits in
    the model's dtype.
    """
    if fsdp.needs_root_call(model):  # sharded (--fsdp): gather the root's parameters around body + head
        return fsdp.call(model, token_logps, model, input_ids, attention_mask, temperature=temperature,
                         chunk_size=chunk_size, label_mask=label_mask, fused_head=fused_head)
    _check_temperature(temperature)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                         f"{tuple(input_ids.shape)}")
    batch, length = input_ids.shape
    out = torch.zeros(batch, max(length - 1, 0), dtype=torch.float32, device=input_ids.device)
    if length < 2:
        return out
    scored = attention_mask[:, 1:].bool()                                   # [B, T-1]
    if label_mask is not None:
        try:
            scored = scored & label_mask.to(device=scored.device).bool()
        except RuntimeError as err:
            raise ValueError(f"label_mask shape {tuple(label_mask.shape)} does not broadcast to the "
                             f"log-prob shape {tuple(scored.shape)} ([B, T-1]; pass completion_mask[:, 1:])"
                             ) from err
        scored = scored.expand(batch, length - 1)
    label_mask = scored
    labels = input_ids[:, 1:][label_mask]                                   # [N]

    split = None if _model_class(model) in _FORCE_FULL_FORWARD else _split_head(model)
    if split is None:
        _warn_fallback(model)
        logits = model(**_forward_kwargs(model, input_ids, attention_mask)).logits  # [B, T, V]
        flat_logits = logits.reshape(batch * length, -1)                    # [B*T, V], a view
        rows, cols = label_mask.nonzero(as_tuple=True)                      # [N] each
        flat_index = rows * length + cols                                   # row of the logits at t
        pieces = [logps_from_logits(flat_logits[flat_index[i:i + chunk_size]], labels[i:i + chunk_size],
                                    temperature=temperature)
                  for i in range(0, labels.numel(), chunk_size)]
    else:
        body, head, transform = split
        hidden = _last_hidden_state(body(**_forward_kwargs(body, input_ids, attention_mask)))  # [B, T, H]
        in_features = getattr(head, "in_features", hidden.shape[-1])
        if hidden.shape[-1] != in_features:
            _FORCE_FULL_FORWARD.add(_model_class(model))
            return token_logps(model, input_ids, attention_mask, temperature=temperature,
                               chunk_size=chunk_size, label_mask=label_mask, fused_head=fused_head)
        hidden = hidden[:, :-1][label_mask]                                 # [N, H]
        if not labels.numel():
            return out
        picked = _head_label_logps(hidden, labels, head, transform, temperature=temperature,
                                   chunk_size=chunk_size, fused_head=fused_head)
        return out.masked_scatter(label_mask, picked)
    if not pieces:
        return out
    return out.masked_scatter(label_mask, torch.cat(pieces))


def shared_prompt_logps(model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                        completion_mask: Tensor, *, temperature: float = 1.0, chunk_size: int = 1024,
                        fused_head: bool = True) -> Tensor:
    """Log-probs of ``G`` completions per prompt with each prompt encoded **once**.

    prompt_ids, prompt_mask: ``[B, P]`` left-padded (every row's last position is a real token);
    completion_ids, completion_mask: ``[B·G, C]`` right-padded, grouped by prompt (rows
    ``i·G … i·G+G-1`` continue prompt ``i``). Returns ``[B·G, C]`` float32: ``out[r, t] = log p(
    completion[r, t] | prompt, completion[r, :t])``, 0 where ``completion_mask`` is 0 — the same values
    as :func:`token_logps` on the concatenated sequences, and the same gradients.

    How: the body runs over the prompts with a KV cache, the cache rows are repeated ``G`` times, and
    the completions run against it (positions continue from each prompt's length). Gradients flow
    through the cached keys and values into the prompt pass, so the prompt's activations are
    computed and stored once instead of ``G`` times: for DPO (``G = 2``) that saves the prompt
    share of the tokens, half of it per pair. Needs a model whose body takes ``past_key_values``
    (transformers decoder models) and no activation checkpointing (transformers turns the cache off
    under it); :func:`token_logps` is the general path.
    """
    if fsdp.needs_root_call(model):
        return fsdp.call(model, shared_prompt_logps, model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                         temperature=temperature, chunk_size=chunk_size, fused_head=fused_head)
    _check_temperature(temperature)
    if prompt_ids.dim() != 2 or completion_ids.dim() != 2 or prompt_mask.shape != prompt_ids.shape \
            or completion_mask.shape != completion_ids.shape:
        raise ValueError("shared_prompt_logps: prompt_ids/prompt_mask must be [B, P] and "
                         "completion_ids/completion_mask [B*G, C]")
    batch = prompt_ids.shape[0]
    rows, width = completion_ids.shape
    if batch == 0 or rows % batch:
        raise ValueError(f"shared_prompt_logps: {rows} completion rows is not a multiple of {batch} prompts")
    if not bool(prompt_mask[:, -1].bool().all()):
        raise ValueError("shared_prompt_logps: prompts must be left-padded (the last position real in every row)")
    group = rows // batch
    split = _split_head(model)
    base = model.get_base_model() if is_peft_model(model) else model
    if split is None or getattr(base, "is_activation_checkpointing",
                                getattr(base, "is_gradient_checkpointing", False)):
        raise ValueError("shared_prompt_logps needs a transformers decoder whose body can be separated "
                         "from its head, without activation checkpointing; use token_logps")
    body, head, transform = split
    from transformers import DynamicCache

    prompt_pos = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)                  # [B, P]
    cache = DynamicCache()
    # transformers renamed `past_key_values` to `cache` (5.2x); the object is updated in place either way
    accepted = inspect.signature(type(body).forward).parameters
    cache_kw = "cache" if "cache" in accepted else "past_key_values"
    prompt_hidden = _last_hidden_state(body(input_ids=prompt_ids, attention_mask=prompt_mask,
                                            position_ids=prompt_pos, use_cache=True,
                                            **{cache_kw: cache}))                 # [B, P, H]
    if cache.get_seq_length() != prompt_ids.shape[1]:
        raise ValueError(f"shared_prompt_logps: {type(body).__name__} did not fill the KV cache; use token_logps")
    cache.batch_repeat_interleave(group)                                           # [B·G] rows
    lengths = prompt_mask.long().sum(-1).repeat_interleave(group)                  # [B·G]
    completion_pos = lengths[:, None] + torch.arange(width, device=completion_ids.device)  # [B·G, C]
    full_mask = torch.cat([prompt_mask.repeat_interleave(group, dim=0), completion_mask], dim=1)
    completion_hidden = _last_hidden_state(body(
        input_ids=completion_ids, attention_mask=full_mask, position_ids=completion_pos,
        use_cache=True, **{cache_kw: cache}))                                      # [B·G, C, H]
    # token t is predicted from the hidden state before it: the prompt's last one for t = 0
    first = prompt_hidden[:, -1:].repeat_interleave(group, dim=0)                  # [B·G, 1, H]
    hidden = torch.cat([first, completion_hidden[:, :-1]], dim=1)                  # [B·G, C, H]
    scored = completion_mask.bool()
    out = torch.zeros(rows, width, dtype=torch.float32, device=completion_ids.device)
    labels = completion_ids[scored]
    if not labels.numel():
        return out
    picked = _head_label_logps(hidden[scored], labels, head, transform, temperature=temperature,
                               chunk_size=chunk_size, fused_head=fused_head)
    return out.masked_scatter(scored, picked)


def _head_label_logps(hidden: Tensor, labels: Tensor, head: nn.Module, transform, *, temperature: float,
                      chunk_size: int, fused_head: bool) -> Tensor:
    """``[N, H]`` hidden states → ``[N]`` label log-probs through ``head`` (fused or checkpointed chunks)."""
    if fused_head and transform.keywords.get("identity") and type(head) is nn.Linear:
        return _LinearLabelLogps.apply(hidden, head.weight, head.bias, labels, 1.0 / temperature, chunk_size)
    chunk_fn = partial(_head_logps, head=head, transform=transform, temperature=temperature)
    use_checkpoint = torch.is_grad_enabled() and (
        hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    pieces = []
    for i in range(0, labels.numel(), chunk_size):
        h, y = hidden[i:i + chunk_size], labels[i:i + chunk_size]
        pieces.append(checkpoint(chunk_fn, h, y, use_reentrant=False) if use_checkpoint else chunk_fn(h, y))
    return torch.cat(pieces)


def labels_from(start: int, input_ids: Tensor) -> Tensor:
    """``[1, T-1]`` label mask selecting the output positions ``t >= start`` of :func:`token_logps`.

    For left-padded prompts of width ``P`` followed by completions, ``labels_from(P - 1, ids)``
    selects exactly the completion tokens, so ``token_logps(..., label_mask=labels_from(P - 1,
    ids))[:, P - 1:]`` runs the output head over completion positions only.
    """
    return (torch.arange(input_ids.shape[1] - 1, device=input_ids.device) >= start)[None]


def sequence_logps(token_logps: Tensor, mask: Tensor) -> Tensor:
    """Masked sum over tokens: ``Σ_t mask[b, t] · token_logps[b, t]`` → ``[B]``.

    token_logps: ``[B, T-1]`` from :func:`token_logps`; mask: ``[B, T-1]`` 0/1, aligned with it
    (``completion_mask[:, 1:]``). A row with no tokens sums to 0.
    """
    _check_mask(token_logps, mask)
    return torch.where(mask.bool(), token_logps, 0.0).sum(-1)


def mean_logps(token_logps: Tensor, mask: Tensor) -> Tensor:
    """Masked mean over tokens (ORPO's length-normalised log-prob) → ``[B]``.

    Same inputs as :func:`sequence_logps`. A row with no tokens raises ``ValueError`` (its mean is
    undefined; returning NaN would poison the loss silently).
    """
    _check_mask(token_logps, mask)
    counts = mask.bool().sum(-1)                                            # [B]
    empty = (counts == 0).nonzero().flatten()
    if empty.numel():
        raise ValueError(f"mean_logps: row(s) {empty.tolist()} have no tokens in the mask; "
                         "every sequence needs at least one completion token")
    return sequence_logps(token_logps, mask) / counts.to(token_logps.dtype)


def reward_scores(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Scalar scores of a sequence-classification reward model, read at each row's last real token.

    input_ids, attention_mask: ``[B, T]``. Returns ``[B]`` float32 (``logits[:, 0]``). The last real
    token is the last position where ``attention_mask`` is 1, so the score does not depend on how
    much padding follows (right padding), nor on whether the pad id equals the EOS id. Models
    without a separable ``score`` head fall back to ``model(...).logits[:, 0]``, where transformers
    locates the last token from ``config.pad_token_id``.
    """
    if fsdp.needs_root_call(model):
        return fsdp.call(model, reward_scores, model, input_ids, attention_mask)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                         f"{tuple(input_ids.shape)}")
    mask = attention_mask.bool()
    if not bool(mask.any(-1).all()):
        raise ValueError("reward_scores: a row has no real tokens (attention_mask all 0)")
    base = model.get_base_model() if is_peft_model(model) else model
    head = getattr(base, "score", None)
    body = getattr(base, "base_model", None)
    if not isinstance(head, nn.Module) or body is None or body is base:
        _warn_fallback(model)
        logits = model(**_forward_kwargs(model, input_ids, attention_mask)).logits  # [B, num_labels]
        return logits[:, 0].float()
    hidden = _last_hidden_state(body(**_forward_kwargs(body, input_ids, attention_mask)))  # [B, T, H]
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    last = torch.where(mask, positions, -1).amax(-1)                        # [B]
    last_hidden = hidden[torch.arange(input_ids.shape[0], device=hidden.device), last]  # [B, H]
    return head(last_hidden)[:, 0].float()


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def _head_logps(hidden: Tensor, labels: Tensor, *, head: nn.Module, transform, temperature: float) -> Tensor:
    """[N, H] hidden states → [N] label log-probs; the [N, V] logits live only inside this call."""
    logits = transform(head(hidden).float())                               # [N, V] float32
    return logps_from_logits(logits, labels, temperature=temperature)


class _LinearLabelLogps(torch.autograd.Function):
    """``log softmax(h Wᵀ + b)·τ⁻¹)[y]`` for ``[N, H]`` hidden states, chunk by chunk, without keeping logits.

    Forward: per chunk of ``chunk`` rows, the ``[c, V]`` logits are formed in the compute dtype (the
    autocast dtype when autocast is on, else the weight's), reduced in float32 to the label's
    log-prob and the log-sum-exp, and dropped; only the ``[N]`` log-sum-exps are saved. Backward:
    per chunk, the logits are recomputed and ``G = ∂out/∂logits = (one-hot(y) − softmax)/τ`` (times
    the incoming gradient) is formed from them and the saved log-sum-exp in one element-wise pass
    (compiled on CUDA); the hidden-state gradient is ``G W`` and the head's weight gradient ``Gᵀ h``
    is accumulated in the weight's dtype. Peak extra memory is a few ``[c, V]`` blocks.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                inv_temperature: float, chunk: int) -> Tensor:
        device_type = hidden.device.type
        dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                 else weight.dtype)
        h = hidden.to(dtype)
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        out = torch.empty(labels.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        pick = _elementwise("pick", hidden.device)
        with torch.autocast(device_type, enabled=False):
            for i in range(0, labels.shape[0], chunk):
                logits = F.linear(h[i:i + chunk], w, b)                      # [c, V] compute dtype
                out[i:i + chunk], lse[i:i + chunk] = pick(logits, labels[i:i + chunk], inv_temperature)
        ctx.save_for_backward(h, w, b, labels, lse)
        ctx.inv_temperature, ctx.chunk = inv_temperature, chunk
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        h, w, b, labels, lse = ctx.saved_tensors
        hidden_dtype, weight_dtype, bias_dtype = ctx.dtypes
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        inv_t, chunk = ctx.inv_temperature, ctx.chunk
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(w.shape, dtype=weight_dtype, device=w.device) if need_w else None
        grad_b = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device) if need_b else None
        grad_out = grad_out.float()
        dlogits = _elementwise("dlogits", h.device)
        with torch.autocast(h.device.type, enabled=False):
            for i in range(0, labels.shape[0], chunk):
                logits = F.linear(h[i:i + chunk], w, b)                      # [c, V]
                grad = dlogits(logits, lse[i:i + chunk], grad_out[i:i + chunk], labels[i:i + chunk], inv_t)
                if need_b:
                    grad_b += grad.float().sum(0)
                if need_h:
                    grad_h[i:i + chunk] = grad @ w
                if need_w:
                    part = grad.t() @ h[i:i + chunk]                        # [V, H]
                    grad_w += part if part.dtype == weight_dtype else part.to(weight_dtype)
        if need_h:
            grad_h = grad_h.to(hidden_dtype)
        if need_b:
            grad_b = grad_b.to(bias_dtype)
        return grad_h, grad_w, grad_b, None, None, None


def _pick_logps(logits: Tensor, labels: Tensor, inv_temperature: float) -> tuple[Tensor, Tensor]:
    """``[c, V]`` logits → (label log-prob ``[c]``, log-sum-exp ``[c]``), both float32, of ``logits/τ``."""
    z = logits.float() * inv_temperature
    lse = torch.logsumexp(z, dim=-1)
    return z.gather(-1, labels[:, None])[:, 0] - lse, lse


def _dlogits(logits: Tensor, lse: Tensor, grad_out: Tensor, labels: Tensor, inv_temperature: float) -> Tensor:
    """Gradient of ``Σ grad_out · logp[y]`` w.r.t. the logits: ``(one-hot(y) − softmax(z/τ)) · grad_out / τ``.

    Written element-wise (no scatter), so on CUDA it compiles into one pass over the ``[c, V]`` block;
    returned in the logits' dtype.
    """
    probs = torch.exp(logits.float() * inv_temperature - lse[:, None])          # [c, V]
    vocab = torch.arange(logits.shape[-1], device=logits.device)
    onehot = vocab[None, :] == labels[:, None]
    scale = (grad_out * inv_temperature)[:, None]
    return ((onehot.float() - probs) * scale).to(logits.dtype)


_ELEMENTWISE = {"pick": _pick_logps, "dlogits": _dlogits}
_COMPILED_ELEMENTWISE: dict[str, object] = {}


def _elementwise(name: str, device: torch.device):
    """The element-wise part of the fused head: ``torch.compile``-d on CUDA (one kernel per chunk
    instead of five passes over a float32 ``[c, V]`` block), plain eager elsewhere or if compiling
    is unavailable."""
    fn = _ELEMENTWISE[name]
    if device.type != "cuda" or _COMPILED_ELEMENTWISE.get(name) is fn:
        return fn
    if name not in _COMPILED_ELEMENTWISE:
        _COMPILED_ELEMENTWISE[name] = torch.compile(fn, dynamic=True)  # compiles lazily, at the first call
    compiled = _COMPILED_ELEMENTWISE[name]

    def call(*args):
        try:
            return compiled(*args)
        except torch.OutOfMemoryError:
            raise
        except Exception as err:  # no working compiler (e.g. no Triton): eager is correct, only slower
            logger.warning("fused head: torch.compile failed (%s: %s); using eager element-wise ops from now on",
                           type(err).__name__, err)
            _COMPILED_ELEMENTWISE[name] = fn
            return fn(*args)

    return call


def _split_head(model: nn.Module):
    """Return ``(body, head, transform)`` for a model whose logits are ``transform(head(body(x)))``.

    None when the model cannot be split that way (no output embeddings, no base model, PEFT
    prompt-learning methods that prepend virtual tokens).
    """
    base = model
    if is_peft_model(model):
        peft_config = getattr(model, "active_peft_config", None)
        if peft_config is None or getattr(peft_config, "is_prompt_learning", False):
            return None
        base = model.get_base_model()
    get_head = getattr(base, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    body = getattr(base, "base_model", None)
    if not isinstance(head, nn.Module) or not isinstance(body, nn.Module) or body is base:
        return None
    config = getattr(base, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    scale = getattr(config, "logit_scale", None)
    divide = getattr(config, "logits_scaling", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    identity = not ((isinstance(scale, (int, float)) and scale != 1.0)
                    or (isinstance(divide, (int, float)) and divide != 1.0)
                    or (isinstance(softcap, (int, float)) and softcap))
    return body, head, partial(_transform_logits, scale=scale, divide=divide, softcap=softcap,
                               identity=identity)


def _transform_logits(logits: Tensor, *, scale, divide, softcap, identity: bool = False) -> Tensor:
    """Final-logit transforms some architectures apply after the head (Cohere, Granite, Gemma 2/3)."""
    if isinstance(scale, (int, float)) and scale != 1.0:
        logits = logits * scale
    if isinstance(divide, (int, float)) and divide != 1.0:
        logits = logits / divide
    if isinstance(softcap, (int, float)) and softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _forward_kwargs(module: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> dict:
    """Arguments for a transformers forward: position ids from the mask (padding on either side)."""
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
    accepted = _accepted_kwargs(type(module))
    if accepted is None or "position_ids" in accepted:
        kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    if accepted is None or "use_cache" in accepted:
        kwargs["use_cache"] = False
    return kwargs


_ACCEPTED: dict[type, frozenset[str] | None] = {}


def _accepted_kwargs(cls: type) -> frozenset[str] | None:
    """Keyword names ``cls.forward`` accepts; None when it takes ``**kwargs`` (anything goes)."""
    if cls not in _ACCEPTED:
        params = inspect.signature(cls.forward).parameters.values()
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            _ACCEPTED[cls] = None
        else:
            _ACCEPTED[cls] = frozenset(p.name for p in params)
    return _ACCEPTED[cls]


def _model_class(model: nn.Module) -> type:
    return type(model.get_base_model() if is_peft_model(model) else model)


def _last_hidden_state(outputs) -> Tensor:
    hidden = getattr(outputs, "last_hidden_state", None)
    return hidden if hidden is not None else outputs[0]


def _warn_fallback(model: nn.Module) -> None:
    name = type(model).__name__
    if name not in _WARNED_FALLBACK:
        _WARNED_FALLBACK.add(name)
        logger.warning("%s: cannot separate the model body from its output head; computing "
                       "log-probs/scores from a full forward (more memory: full logits)", name)


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _check_mask(token_logps: Tensor, mask: Tensor) -> None:
    if mask.shape != token_logps.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != token_logps shape {tuple(token_logps.shape)}; "
                         "pass the completion mask shifted by one (completion_mask[:, 1:])")
