"""Triton kernels for the decode step of :class:`rlxf.rollout.StaticEngine`, with torch references.

Each is registered as a ``torch.library`` custom op, so that ``torch.compile`` calls it as one
opaque kernel and CUDA graphs capture it:

- ``rope_decode_attention(q, k_new, v_new, k_cache, v_cache, mask, slot, positions, cos, sin,
  scaling)`` (the engine's) and ``decode_attention(q, k_cache, v_cache, mask, slot, scaling)``:
  one query token per row attending over the static KV cache. One program per (row, KV head)
  holds the ``G`` query heads that share that KV head (grouped-query attention without repeating
  K/V), walks only the filled cache slots in blocks (the loop bound is read from the device, so
  one captured graph serves every step), applies the additive mask and keeps an online softmax in
  fp32 (flash-decoding without the split over the cache). The RoPE variant first rotates q and the
  new k by each row's position, writes the new k and v to cache slot ``slot`` (in place) and keeps
  the new token in registers. Together they replace two batched matmuls over the whole cache, a
  softmax, the RoPE and cache-write kernels, and the reads of the unfilled slots.
- ``sample_tokens(logits, seed, step, inv_temperature, logp_inv_temperature, greedy)``: one pass
  over the logits, split into (row, vocabulary chunk) programs whose partial results a second,
  small kernel combines per row, that draws the token (greedy: the first maximal logit; sampling:
  Gumbel-max ``argmax(z/τ − log(−log U))`` with ``U`` from Philox keyed by ``seed + step``, four
  uniforms per counter, which samples ``softmax(z/τ)`` exactly) and returns its log-prob under
  ``logp_inv_temperature`` (``z·s − logsumexp(z·s)``). It replaces the separate argmax, noise,
  log-sum-exp and gather passes over the ``[B, V]`` logits.

The ``*_reference`` functions compute the same in torch; tests compare them with the kernels
through Triton's interpreter on the CPU (``TRITON_INTERPRET=1``) and compiled on a GPU. Triton is
optional: :func:`available` says whether the kernels can run on a device, :func:`probe` checks
them once against the references on a device, dtype and head shape, and the engine keeps its
torch path when either says no.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

try:  # optional: the CPU wheels of torch come without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"   # the interpreter's bf16 dot is wrong: upcast there
# launch settings (benchmarks/vs_trl.py sweeps them on the GPU; docs/performance.md has the results)
ATTENTION_CONFIG = {"BLOCK_N": 128, "num_warps": 4, "num_stages": 2}
SAMPLE_CONFIG = {"CHUNK": 8192, "num_warps": 8}   # CHUNK: vocabulary entries per first-pass program


def available(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run on ``device``: CUDA with Triton, or the CPU under Triton's
    interpreter (``TRITON_INTERPRET=1`` set before rlxf is imported; slow, for tests)."""
    if triton is None:
        return False
    kind = torch.device(device).type
    return kind == "cuda" or (kind == "cpu" and INTERPRET)


def attention_supported(head_dim: int, groups: int) -> str | None:
    """None when :func:`decode_attention` handles this head shape; else why not."""
    if head_dim < 16 or head_dim & (head_dim - 1):
        return f"head_dim {head_dim} is not a power of two >= 16"
    if groups > 64:
        return f"{groups} query heads per KV head (> 64)"
    return None


# -- references (torch) -------------------------------------------------------------------------

def decode_attention_reference(q: Tensor, k_cache: Tensor, v_cache: Tensor, mask: Tensor, slot: Tensor,
                               scaling: float) -> Tensor:
    """Torch reference: ``q`` [B, H_kv, G, D] over cache slots ``0..slot`` of ``[B, H_kv, L, D]``.

    ``mask`` is the additive ``[B, 1, 1, L]`` (0 visible, −inf hidden) mask; slots after ``slot`` are
    hidden whatever it says. Softmax in fp32; returns ``[B, H_kv, G, D]`` in ``q``'s dtype.
    """
    length = k_cache.shape[2]
    after = torch.arange(length, device=q.device) > slot.reshape(())
    scores = torch.matmul(q.float(), k_cache.float().transpose(-1, -2)) * scaling     # [B, H_kv, G, L]
    scores = (scores + mask.float()).masked_fill(after, float("-inf"))
    return torch.matmul(scores.softmax(-1), v_cache.float()).to(q.dtype)


def rope_decode_attention_reference(q: Tensor, k_new: Tensor, v_new: Tensor, k_cache: Tensor, v_cache: Tensor,
                                    mask: Tensor, slot: Tensor, positions: Tensor, cos: Tensor, sin: Tensor,
                                    scaling: float) -> Tensor:
    """Torch reference of :func:`rope_decode_attention`: rotate ``q`` [B, H_kv, G, D] and ``k_new``
    [B, H_kv, D] by ``positions`` (in fp32, rounded to the input dtype), write the new k and v to
    slot ``slot`` of the caches (in place) and attend over slots ``0..slot`` (the new one visible)."""
    c = cos[positions].float()[:, None, :]                                              # [B, 1, D]
    s = sin[positions].float()[:, None, :]
    half = q.shape[-1] // 2

    def rotate(x):
        x = x.float()
        return (x * c + torch.cat((-x[..., half:], x[..., :half]), -1) * s)

    q = rotate(q.flatten(1, 2)).view(q.shape).to(q.dtype)
    k_cache.index_copy_(2, slot.reshape(1), rotate(k_new).to(k_cache.dtype)[:, :, None])
    v_cache.index_copy_(2, slot.reshape(1), v_new.to(v_cache.dtype)[:, :, None])
    mask = mask.clone()
    mask.reshape(mask.shape[0], -1)[:, int(slot)] = 0.0
    return decode_attention_reference(q, k_cache, v_cache, mask, slot, scaling)


def sample_tokens_reference(logits: Tensor, noise_u: Tensor | None, inv_temperature: Tensor,
                            logp_inv_temperature: Tensor) -> tuple[Tensor, Tensor]:
    """Torch reference of :func:`sample_tokens` given the uniforms ``noise_u`` [B, V] (None: greedy)."""
    x = logits.float()
    if noise_u is None:
        tokens = x.argmax(-1)
    else:
        gumbel = -torch.log(-torch.log(noise_u.clamp(min=1e-30)))
        tokens = (x * inv_temperature + gumbel).argmax(-1)
    z = x * logp_inv_temperature
    return tokens, z.gather(-1, tokens[:, None])[:, 0] - torch.logsumexp(z, -1)


# -- kernels --------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _decode_attention_kernel(Q, KN, VN, K, V, M, SLOT, POS, COS, SIN, O, scaling,
                                 stride_qb, stride_knb, stride_vnb, stride_kb, stride_kh, stride_kl, stride_mb,
                                 stride_cos, H_KV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr,
                                 D: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
                                 UPCAST: tl.constexpr, ROPE: tl.constexpr):
        """One (row, KV head). ``ROPE``: rotate q and the new k by the row's position, write the new
        k and v to cache slot ``slot`` and attend over slots ``0..slot-1`` plus the new token kept in
        registers; otherwise attend over cache slots ``0..slot``."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        offs_g = tl.arange(0, G_PAD)
        offs_d = tl.arange(0, D)
        offs_n = tl.arange(0, BLOCK_N)
        rows = offs_g < G
        q_at = b.to(tl.int64) * stride_qb + (h * G + offs_g[:, None]) * D      # q: [B, H_kv, G, D] rows
        kv_base = b.to(tl.int64) * stride_kb + h * stride_kh
        slot = tl.load(SLOT)
        if ROPE:
            # x·cos + rotate_half(x)·sin, rotate_half(x) = (−x[D/2:], x[:D/2])
            turned = (offs_d + D // 2) % D
            sign = tl.where(offs_d < D // 2, -1.0, 1.0)
            pos = tl.load(POS + b)
            cos = tl.load(COS + pos * stride_cos + offs_d).to(tl.float32)
            sin = tl.load(SIN + pos * stride_cos + offs_d).to(tl.float32)
            q = tl.load(Q + q_at + offs_d[None, :], mask=rows[:, None], other=0.0).to(tl.float32)
            q_turned = tl.load(Q + q_at + turned[None, :], mask=rows[:, None], other=0.0).to(tl.float32)
            q = (q * cos[None, :] + sign[None, :] * q_turned * sin[None, :]).to(Q.dtype.element_ty)
            kn_at = KN + b.to(tl.int64) * stride_knb + h * D
            k_new = tl.load(kn_at + offs_d).to(tl.float32)
            k_new = (k_new * cos + sign * tl.load(kn_at + turned).to(tl.float32) * sin).to(K.dtype.element_ty)
            v_new = tl.load(VN + b.to(tl.int64) * stride_vnb + h * D + offs_d).to(V.dtype.element_ty)
            tl.store(K + kv_base + slot * stride_kl + offs_d, k_new)
            tl.store(V + kv_base + slot * stride_kl + offs_d, v_new)
            # the new token first: it is always visible
            m_i = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * scaling
            l_i = tl.full([G_PAD], 1.0, tl.float32)
            acc = tl.zeros([G_PAD, D], tl.float32) + v_new.to(tl.float32)[None, :]
            n_ctx = slot
        else:
            q = tl.load(Q + q_at + offs_d[None, :], mask=rows[:, None], other=0.0)
            m_i = tl.full([G_PAD], -1.0e30, tl.float32)
            l_i = tl.zeros([G_PAD], tl.float32)
            acc = tl.zeros([G_PAD, D], tl.float32)
            n_ctx = slot + 1
        if UPCAST:
            q = q.to(tl.float32)
        for start in range(0, n_ctx, BLOCK_N):
            n = start + offs_n
            valid = n < n_ctx
            k = tl.load(K + kv_base + n[:, None] * stride_kl + offs_d[None, :], mask=valid[:, None], other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            bias = tl.load(M + b * stride_mb + n, mask=valid, other=float("-inf")).to(tl.float32)
            s = s * scaling + bias[None, :]
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + kv_base + n[:, None] * stride_kl + offs_d[None, :], mask=valid[:, None], other=0.0)
            if UPCAST:
                v = v.to(tl.float32)
            if IEEE:
                pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        out = acc / l_i[:, None]
        o_at = (b * H_KV + h) * G * D + offs_g[:, None] * D + offs_d[None, :]  # o: [B, H_kv, G, D]
        tl.store(O + o_at, out.to(O.dtype.element_ty), mask=rows[:, None])

    @triton.jit
    def _chunk_uniforms(seed, row, chunk, n_chunks, CHUNK: tl.constexpr):
        """``CHUNK`` uniforms for one (row, chunk): one Philox call gives four (``tl.rand4x``), so a
        quarter of the counters; element ``4i + k`` takes output ``(0, 2, 1, 3)[k]`` of counter ``i``."""
        counters = (row * n_chunks + chunk) * (CHUNK // 4) + tl.arange(0, CHUNK // 4)
        u0, u1, u2, u3 = tl.rand4x(seed, counters)
        return tl.reshape(tl.join(tl.join(u0, u1), tl.join(u2, u3)), [CHUNK])

    @triton.jit
    def _sample_partial_kernel(LOGITS, KEYS, IDX, ZSEL, ZMAX, ZSUM, SEED, STEP, INV_T, LOGP_INV_T,
                               vocab, stride_row, n_chunks, GREEDY: tl.constexpr, CHUNK: tl.constexpr):
        """One (row, vocabulary chunk): the chunk's best key, its index and z, and z's max and Σexp."""
        row = tl.program_id(0)
        chunk = tl.program_id(1)
        idx = chunk * CHUNK + tl.arange(0, CHUNK)
        valid = idx < vocab
        x = tl.load(LOGITS + row.to(tl.int64) * stride_row + idx, mask=valid, other=0.0).to(tl.float32)
        if GREEDY:
            key = x
        else:
            seed = tl.load(SEED) + tl.load(STEP)
            u = tl.maximum(_chunk_uniforms(seed, row, chunk, n_chunks, CHUNK), 1.0e-30)
            key = x * tl.load(INV_T) - tl.log(-tl.log(u))                   # + Gumbel(0, 1)
        key = tl.where(valid, key, float("-inf"))
        best = tl.argmax(key, 0)                                            # the first maximal key
        z = tl.where(valid, x * tl.load(LOGP_INV_T), float("-inf"))
        z_max = tl.max(z, 0)
        out = row * n_chunks + chunk
        tl.store(KEYS + out, tl.max(key, 0))
        tl.store(IDX + out, chunk * CHUNK + best)
        tl.store(ZSEL + out, tl.sum(tl.where(tl.arange(0, CHUNK) == best, z, 0.0), 0))
        tl.store(ZMAX + out, z_max)
        tl.store(ZSUM + out, tl.sum(tl.exp(z - z_max), 0))

    @triton.jit
    def _sample_combine_kernel(KEYS, IDX, ZSEL, ZMAX, ZSUM, TOKENS, LOGPS, n_chunks, CHUNKS: tl.constexpr):
        """One row: the chunk with the best key (the first on ties) gives the token; log-sum-exp of z."""
        row = tl.program_id(0)
        c = tl.arange(0, CHUNKS)
        valid = c < n_chunks
        at = row * n_chunks + c
        keys = tl.load(KEYS + at, mask=valid, other=float("-inf"))
        win = tl.argmax(keys, 0)
        z_max = tl.load(ZMAX + at, mask=valid, other=float("-inf"))
        top = tl.max(z_max, 0)
        total = tl.sum(tl.where(valid, tl.load(ZSUM + at, mask=valid, other=0.0) * tl.exp(z_max - top), 0.0), 0)
        hit = c == win
        token = tl.sum(tl.where(hit, tl.load(IDX + at, mask=valid, other=0), 0), 0)
        z_sel = tl.sum(tl.where(hit, tl.load(ZSEL + at, mask=valid, other=0.0), 0.0), 0)
        tl.store(TOKENS + row, token.to(tl.int64))
        tl.store(LOGPS + row, z_sel - (top + tl.log(total)))

def _next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def _attention_launch(q, k_new, v_new, k_cache, v_cache, mask, slot, positions, cos, sin, scaling, rope):
    batch, n_kv, groups, head_dim = q.shape
    if q.stride(-1) != 1 or q.stride(2) != head_dim or q.stride(1) != groups * head_dim:
        q = q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride():
        raise ValueError("decode_attention needs K and V caches with the same strides and contiguous rows")
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    mask = mask.reshape(batch, -1)
    _decode_attention_kernel[(batch, n_kv)](
        q, k_new, v_new, k_cache, v_cache, mask, slot, positions, cos, sin, out, float(scaling),
        q.stride(0), k_new.stride(0), v_new.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        mask.stride(0), cos.stride(0), H_KV=n_kv, G=groups, G_PAD=max(16, _next_pow2(groups)), D=head_dim,
        IEEE=q.dtype == torch.float32 or INTERPRET, UPCAST=INTERPRET, ROPE=rope, **ATTENTION_CONFIG)
    return out


@torch.library.custom_op("rlxf::decode_attention", mutates_args=())
def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, mask: Tensor, slot: Tensor,
                     scaling: float) -> Tensor:
    """Triton kernel of :func:`decode_attention_reference` (same arguments and result)."""
    return _attention_launch(q, q, q, k_cache, v_cache, mask, slot, slot, mask, mask, scaling, rope=False)


@decode_attention.register_fake
def _(q, k_cache, v_cache, mask, slot, scaling):
    return torch.empty_like(q)


@torch.library.custom_op("rlxf::rope_decode_attention", mutates_args=("k_cache", "v_cache"))
def rope_decode_attention(q: Tensor, k_new: Tensor, v_new: Tensor, k_cache: Tensor, v_cache: Tensor,
                          mask: Tensor, slot: Tensor, positions: Tensor, cos: Tensor, sin: Tensor,
                          scaling: float) -> Tensor:
    """RoPE, the cache write and :func:`decode_attention` in one kernel (see
    :func:`rope_decode_attention_reference`): ``q`` [B, H_kv, G, D], ``k_new``/``v_new`` [B, H_kv, D]
    before RoPE (rows may be strided: views of one q/k/v projection), ``positions`` [B] the rows'
    RoPE positions into the ``cos``/``sin`` tables [L, D]; writes cache slot ``slot``."""
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        if t.stride(-1) != 1 or t.stride(1) != t.shape[-1]:
            raise ValueError(f"rope_decode_attention: {name} needs contiguous heads, got strides {t.stride()}")
    return _attention_launch(q, k_new, v_new, k_cache, v_cache, mask, slot, positions, cos, sin, scaling,
                             rope=True)


@rope_decode_attention.register_fake
def _(q, k_new, v_new, k_cache, v_cache, mask, slot, positions, cos, sin, scaling):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


@torch.library.custom_op("rlxf::sample_tokens", mutates_args=())
def sample_tokens(logits: Tensor, seed: Tensor, step: Tensor, inv_temperature: Tensor,
                  logp_inv_temperature: Tensor, greedy: bool) -> tuple[Tensor, Tensor]:
    """Draw one token per row of ``logits`` [B, V] and its log-prob, in one pass (see the module doc).

    ``seed`` and ``step`` are one-element int64 device tensors (the Philox key is their sum, so
    each step of a captured graph draws fresh noise); the temperatures are float32 scalars.
    Returns ``(tokens [B] int64, logps [B] float32)``.
    """
    batch, vocab = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    chunk, warps = SAMPLE_CONFIG["CHUNK"], SAMPLE_CONFIG["num_warps"]
    chunks = triton.cdiv(vocab, chunk)
    partial = torch.empty(4, batch, chunks, dtype=torch.float32, device=logits.device)
    index = torch.empty(batch, chunks, dtype=torch.int32, device=logits.device)
    tokens = torch.empty(batch, dtype=torch.long, device=logits.device)
    logps = torch.empty(batch, dtype=torch.float32, device=logits.device)
    _sample_partial_kernel[(batch, chunks)](logits, partial[0], index, partial[1], partial[2], partial[3],
                                            seed, step, inv_temperature, logp_inv_temperature, vocab,
                                            logits.stride(0), chunks, GREEDY=greedy, CHUNK=chunk, num_warps=warps)
    _sample_combine_kernel[(batch,)](partial[0], index, partial[1], partial[2], partial[3], tokens, logps, chunks,
                                     CHUNKS=max(16, _next_pow2(chunks)))
    return tokens, logps


@sample_tokens.register_fake
def _(logits, seed, step, inv_temperature, logp_inv_temperature, greedy):
    batch = logits.shape[0]
    return (logits.new_empty(batch, dtype=torch.long), logits.new_empty(batch, dtype=torch.float32))


_PROBED: dict = {}


def probe(device: torch.device | str, dtype: torch.dtype, n_kv: int, groups: int, head_dim: int) -> str | None:
    """Run both kernels once on small inputs of this head shape and dtype and compare them with the
    torch references. None when they run and agree; else what went wrong (a Triton build that
    cannot compile them for this GPU, say). Cached per (device, dtype, shape); cheap, no capture."""
    key = (str(device), dtype, n_kv, groups, head_dim)
    if key in _PROBED:
        return _PROBED[key]
    try:
        generator = torch.Generator().manual_seed(0)
        batch, length, slot = 2, 40, 33

        def rand(*shape):
            return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

        q, k_new, v_new = rand(batch, n_kv, groups, head_dim), rand(batch, n_kv, head_dim), rand(batch, n_kv, head_dim)
        k_cache, v_cache = rand(batch, n_kv, length, head_dim), rand(batch, n_kv, length, head_dim)
        mask = torch.zeros(batch, 1, 1, length, dtype=dtype, device=device)
        mask[1, ..., :3] = float("-inf")
        cos, sin = rand(length, head_dim).cos(), rand(length, head_dim).sin()
        slot_t = torch.tensor([slot], device=device)
        positions = torch.tensor([slot, slot - 3], device=device)
        error = 0.0
        if attention_supported(head_dim, groups) is None:   # else the engine does not use this kernel
            k_ref, v_ref = k_cache.clone(), v_cache.clone()
            want = rope_decode_attention_reference(q, k_new, v_new, k_ref, v_ref, mask, slot_t, positions, cos,
                                                   sin, head_dim ** -0.5)
            got = rope_decode_attention(q, k_new, v_new, k_cache, v_cache, mask, slot_t, positions, cos, sin,
                                        head_dim ** -0.5)
            error = float((got.float() - want.float()).abs().max())
        logits = rand(batch, 1000) * 4
        ones = torch.ones((), dtype=torch.float32, device=device)
        tokens, logps = sample_tokens(logits, slot_t, slot_t, ones, ones, True)
        want_tokens, want_logps = sample_tokens_reference(logits, None, ones, ones)
        tolerance = 1e-3 if dtype == torch.float32 else 5e-2
        if error > tolerance or not torch.equal(tokens, want_tokens):
            _PROBED[key] = f"results differ from the torch reference (attention max error {error:.3g})"
        else:
            _PROBED[key] = None
    except Exception as exc:  # noqa: BLE001 - any failure means: do not use the kernels here
        _PROBED[key] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return _PROBED[key]


def philox_uniforms(seed: int, batch: int, vocab: int) -> Tensor:
    """The uniforms :func:`sample_tokens` draws for ``seed + step == seed`` (for tests), ``[B, V]`` float32."""
    if triton is None:
        raise RuntimeError("philox_uniforms needs Triton")
    chunk = SAMPLE_CONFIG["CHUNK"]
    chunks = triton.cdiv(vocab, chunk)
    out = torch.empty(batch, vocab, dtype=torch.float32, device="cpu" if INTERPRET else "cuda")
    _uniform_kernel[(batch, chunks)](out, seed, vocab, chunks, CHUNK=chunk)
    return out


if triton is not None:

    @triton.jit
    def _uniform_kernel(OUT, seed, vocab, n_chunks, CHUNK: tl.constexpr):
        row = tl.program_id(0)
        chunk = tl.program_id(1)
        idx = chunk * CHUNK + tl.arange(0, CHUNK)
        tl.store(OUT + row * vocab + idx, _chunk_uniforms(seed, row, chunk, n_chunks, CHUNK), mask=idx < vocab)
