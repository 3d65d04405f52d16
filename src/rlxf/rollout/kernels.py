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
- ``decode_linear(x, weight, bias, silu_mul)``: ``x @ weight.T + bias`` for the few rows of a
  decode step, one program per (N block, K split, M block); SiLU(gate)·up in the epilogue of the
  gate/up projection; small outputs split the K range into float32 partials. Measured no faster
  than cuBLAS on an H100 at 128 rows, so :class:`rlxf.rollout.StaticEngine` uses it only when
  asked (``linear_kernel``). ``rope_decode_attention``/``decode_attention`` can also split the
  cache (flash-decoding, ``split_slots``), which the engine does for few rows over a long cache.

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
# SPLIT_SLOTS: cache slots per program when a call does not say (flash-decoding split, the partials
# merged by a second kernel); 0 = one program walks the whole cache, which measured faster at 128
# rows (docs/performance.md); StaticEngine splits for few rows × KV heads over a long cache
# (see its _attention_split)
ATTENTION_CONFIG = {"BLOCK_N": 128, "num_warps": 4, "num_stages": 2, "SPLIT_SLOTS": 0}
SAMPLE_CONFIG = {"CHUNK": 8192, "num_warps": 8}   # CHUNK: vocabulary entries per first-pass program
# decode_linear settings per (N, K, silu_mul): the best of benchmarks/vs_trl.py's sweep with cold
# weights at 128 rows for the Qwen2.5-0.5B shapes on an H100 (docs/performance.md); other shapes
# take linear_config's rule
LINEAR_CONFIGS: dict = {
    (1152, 896, False): {"BLOCK_N": 16, "BLOCK_K": 128, "SPLIT_K": 1, "num_warps": 4, "num_stages": 4},
    (896, 896, False): {"BLOCK_N": 16, "BLOCK_K": 128, "SPLIT_K": 1, "num_warps": 4, "num_stages": 5},
    (4864, 896, True): {"BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 1, "num_warps": 8, "num_stages": 3},
    (896, 4864, False): {"BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 8, "num_warps": 4, "num_stages": 3},
}


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
    def _decode_attention_kernel(Q, KN, VN, K, V, M, SLOT, POS, COS, SIN, O, PART_M, PART_L, scaling,
                                 split_slots, stride_qb, stride_knb, stride_vnb, stride_kb, stride_kh, stride_kl,
                                 stride_mb, stride_cos, H_KV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr,
                                 D: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
                                 UPCAST: tl.constexpr, ROPE: tl.constexpr, SPLIT: tl.constexpr):
        """One (row, KV head, cache split). ``ROPE``: rotate q and the new k by the row's position,
        write the new k and v to cache slot ``slot`` (split 0) and attend over slots ``0..slot-1``
        plus the new token kept in registers (split 0); otherwise attend over cache slots
        ``0..slot``. ``SPLIT``: this program covers slots ``[s·split_slots, (s+1)·split_slots)`` only
        and writes its unnormalised output, running max and sum to the partial buffers, which
        :func:`_attention_combine_kernel` merges."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        part = tl.program_id(2)
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
            if part == 0:   # the new token: written once, always visible, counted by split 0
                tl.store(K + kv_base + slot * stride_kl + offs_d, k_new)
                tl.store(V + kv_base + slot * stride_kl + offs_d, v_new)
                m_i = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * scaling
                l_i = tl.full([G_PAD], 1.0, tl.float32)
                acc = tl.zeros([G_PAD, D], tl.float32) + v_new.to(tl.float32)[None, :]
            else:
                m_i = tl.full([G_PAD], -1.0e30, tl.float32)
                l_i = tl.zeros([G_PAD], tl.float32)
                acc = tl.zeros([G_PAD, D], tl.float32)
            n_ctx = slot
        else:
            q = tl.load(Q + q_at + offs_d[None, :], mask=rows[:, None], other=0.0)
            m_i = tl.full([G_PAD], -1.0e30, tl.float32)
            l_i = tl.zeros([G_PAD], tl.float32)
            acc = tl.zeros([G_PAD, D], tl.float32)
            n_ctx = slot + 1
        if UPCAST:
            q = q.to(tl.float32)
        lo = 0
        hi = n_ctx
        if SPLIT:
            lo = part * split_slots
            hi = tl.minimum(lo + split_slots, n_ctx)
        for start in range(lo, hi, BLOCK_N):
            n = start + offs_n
            valid = n < hi
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
        if SPLIT:   # partials [B, H_kv, S, G, (D)], float32, merged by the combine kernel
            at = ((b * H_KV + h) * tl.num_programs(2) + part) * G + offs_g
            tl.store(PART_M + at, m_i, mask=rows)
            tl.store(PART_L + at, l_i, mask=rows)
            tl.store(O + at[:, None] * D + offs_d[None, :], acc, mask=rows[:, None])
        else:
            out = acc / l_i[:, None]
            o_at = (b * H_KV + h) * G * D + offs_g[:, None] * D + offs_d[None, :]  # o: [B, H_kv, G, D]
            tl.store(O + o_at, out.to(O.dtype.element_ty), mask=rows[:, None])

    @triton.jit
    def _attention_combine_kernel(PART_O, PART_M, PART_L, O, SPLITS: tl.constexpr, S_PAD: tl.constexpr,
                                  G: tl.constexpr, D: tl.constexpr):
        """One (row·KV head, query head): merge the splits' partial softmax results."""
        bh = tl.program_id(0)
        g = tl.program_id(1)
        offs_s = tl.arange(0, S_PAD)
        offs_d = tl.arange(0, D)
        used = offs_s < SPLITS
        at = (bh * SPLITS + offs_s) * G + g
        m = tl.load(PART_M + at, mask=used, other=-1.0e30)
        l_s = tl.load(PART_L + at, mask=used, other=0.0)
        top = tl.max(m, 0)
        weight = tl.where(used, tl.exp(m - top), 0.0)
        acc = tl.load(PART_O + at[:, None] * D + offs_d[None, :], mask=used[:, None], other=0.0)
        out = tl.sum(acc * weight[:, None], 0) / tl.sum(l_s * weight, 0)
        tl.store(O + (bh * G + g) * D + offs_d, out.to(O.dtype.element_ty))

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

    @triton.jit
    def _k_tile(at, k, rows, inside, EVEN_K: tl.constexpr, UPCAST: tl.constexpr):
        """Rows ``rows`` × columns ``k`` of a row-major matrix at ``at`` (columns past ``inside`` as 0)."""
        if EVEN_K:
            tile = tl.load(at + k[None, :], mask=rows[:, None], other=0.0)
        else:
            tile = tl.load(at + k[None, :], mask=rows[:, None] & inside[None, :], other=0.0)
        if UPCAST:
            tile = tile.to(tl.float32)
        return tile

    @triton.jit
    def _dot_t(acc, x, w, IEEE: tl.constexpr):
        """``acc + x @ w.T`` (fp32 inputs in IEEE precision where asked)."""
        if IEEE:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
        return acc

    @triton.jit
    def _skinny_linear_kernel(X, W, B, O, M, N, K, k_per_split, stride_xm, stride_wn, stride_os, stride_om,
                              HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr, EVEN_K: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              IEEE: tl.constexpr, UPCAST: tl.constexpr):
        """One (N block, K split, M block) tile of ``x @ w.T``: ``acc[m, n] = Σ_k x[m, k]·w[n, k]`` over
        this split's ``k`` range. ``SILU_MUL``: ``w`` is the concatenated [gate; up] weight of
        ``2N`` rows and the tile is ``silu(x·gate + b_gate)·(x·up + b_up)``. The bias is added by split 0."""
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        pid_m = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        rows_m = offs_m < M
        rows_n = offs_n < N
        k_lo = pid_s * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        x_at = X + offs_m.to(tl.int64)[:, None] * stride_xm
        w_at = W + offs_n.to(tl.int64)[:, None] * stride_wn
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k = k0 + offs_k
            inside = k < k_hi
            x = _k_tile(x_at, k, rows_m, inside, EVEN_K, UPCAST)
            acc = _dot_t(acc, x, _k_tile(w_at, k, rows_n, inside, EVEN_K, UPCAST), IEEE)
            if SILU_MUL:   # the up rows start N rows after the gate rows
                acc_up = _dot_t(acc_up, x, _k_tile(w_at + N * stride_wn, k, rows_n, inside, EVEN_K, UPCAST), IEEE)
        if HAS_BIAS:
            if pid_s == 0:
                acc += tl.load(B + offs_n, mask=rows_n, other=0.0).to(tl.float32)[None, :]
                if SILU_MUL:
                    acc_up += tl.load(B + N + offs_n, mask=rows_n, other=0.0).to(tl.float32)[None, :]
        if SILU_MUL:
            # rounded like the eager module: act(gate) and up are model-dtype tensors there
            gate = acc.to(O.dtype.element_ty).to(tl.float32)
            act = (gate / (1.0 + tl.exp(-gate))).to(O.dtype.element_ty).to(tl.float32)
            acc = act * acc_up.to(O.dtype.element_ty).to(tl.float32)
        out_at = O + pid_s.to(tl.int64) * stride_os + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        tl.store(out_at, acc.to(O.dtype.element_ty), mask=rows_m[:, None] & rows_n[None, :])


def _next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def _attention_launch(q, k_new, v_new, k_cache, v_cache, mask, slot, positions, cos, sin, scaling, rope,
                      split_slots=None):
    batch, n_kv, groups, head_dim = q.shape
    if q.stride(-1) != 1 or q.stride(2) != head_dim or q.stride(1) != groups * head_dim:
        q = q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride():
        raise ValueError("decode_attention needs K and V caches with the same strides and contiguous rows")
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    mask = mask.reshape(batch, -1)
    config = dict(ATTENTION_CONFIG)
    default_split = config.pop("SPLIT_SLOTS", 0)
    split_slots = default_split if split_slots is None else split_slots
    splits = triton.cdiv(k_cache.shape[2], split_slots) if split_slots else 1
    if splits > 1:   # flash-decoding: the cache in slices of split_slots slots, merged after
        part_o = torch.empty(batch, n_kv, splits, groups, head_dim, dtype=torch.float32, device=q.device)
        part_m = torch.empty(batch, n_kv, splits, groups, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
    else:
        part_o, part_m, part_l = out, out, out
    _decode_attention_kernel[(batch, n_kv, splits)](
        q, k_new, v_new, k_cache, v_cache, mask, slot, positions, cos, sin, part_o, part_m, part_l, float(scaling),
        split_slots, q.stride(0), k_new.stride(0), v_new.stride(0), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), mask.stride(0), cos.stride(0), H_KV=n_kv, G=groups, G_PAD=max(16, _next_pow2(groups)),
        D=head_dim, IEEE=q.dtype == torch.float32 or INTERPRET, UPCAST=INTERPRET, ROPE=rope, SPLIT=splits > 1,
        **config)
    if splits > 1:
        _attention_combine_kernel[(batch * n_kv, groups)](part_o, part_m, part_l, out, SPLITS=splits,
                                                          S_PAD=max(2, _next_pow2(splits)), G=groups, D=head_dim)
    return out


@torch.library.custom_op("rlxf::decode_attention", mutates_args=())
def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, mask: Tensor, slot: Tensor,
                     scaling: float, split_slots: int | None = None) -> Tensor:
    """Triton kernel of :func:`decode_attention_reference` (same arguments and result).

    ``split_slots``: cache slots per program (flash-decoding: the splits' partial softmax results
    are merged by a second kernel; worth it when few rows × KV heads face a long cache), 0 for one
    program per (row, KV head), None for ``ATTENTION_CONFIG["SPLIT_SLOTS"]``.
    """
    return _attention_launch(q, q, q, k_cache, v_cache, mask, slot, slot, mask, mask, scaling, rope=False,
                             split_slots=split_slots)


@decode_attention.register_fake
def _(q, k_cache, v_cache, mask, slot, scaling, split_slots=None):
    return torch.empty_like(q)


@torch.library.custom_op("rlxf::rope_decode_attention", mutates_args=("k_cache", "v_cache"))
def rope_decode_attention(q: Tensor, k_new: Tensor, v_new: Tensor, k_cache: Tensor, v_cache: Tensor,
                          mask: Tensor, slot: Tensor, positions: Tensor, cos: Tensor, sin: Tensor,
                          scaling: float, split_slots: int | None = None) -> Tensor:
    """RoPE, the cache write and :func:`decode_attention` in one kernel (see
    :func:`rope_decode_attention_reference`): ``q`` [B, H_kv, G, D], ``k_new``/``v_new`` [B, H_kv, D]
    before RoPE (rows may be strided: views of one q/k/v projection), ``positions`` [B] the rows'
    RoPE positions into the ``cos``/``sin`` tables [L, D]; writes cache slot ``slot``; ``split_slots``
    as in :func:`decode_attention`."""
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        if t.stride(-1) != 1 or t.stride(1) != t.shape[-1]:
            raise ValueError(f"rope_decode_attention: {name} needs contiguous heads, got strides {t.stride()}")
    return _attention_launch(q, k_new, v_new, k_cache, v_cache, mask, slot, positions, cos, sin, scaling,
                             rope=True, split_slots=split_slots)


@rope_decode_attention.register_fake
def _(q, k_new, v_new, k_cache, v_cache, mask, slot, positions, cos, sin, scaling, split_slots=None):
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


def linear_config(m: int, n: int, k: int, silu_mul: bool) -> dict:
    """Launch settings of :func:`decode_linear` for an ``[m, k] @ [n, k].T`` product: the measured
    entry of :data:`LINEAR_CONFIGS` for ``(n, k, silu_mul)`` when there is one (``benchmarks/vs_trl.py``
    sweeps them on the GPU), else a rule of thumb: 32 output columns a program, the K range split
    so that about 128 programs run, each over at least 256 of ``k``."""
    block_m = min(128, max(16, _next_pow2(m)))
    tuned = LINEAR_CONFIGS.get((n, k, silu_mul))
    if tuned is not None:
        return {"BLOCK_M": block_m, **tuned}
    block_n = 32
    split = 1
    if not silu_mul:
        while split < 8 and triton.cdiv(n, block_n) * split < 128 and k // (2 * split) >= 256:
            split *= 2
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": 128 if k >= 128 else max(16, _next_pow2(k)),
            "SPLIT_K": split, "num_warps": 4, "num_stages": 3}


def linear_supported(x: Tensor, weight: Tensor) -> str | None:
    """None when :func:`decode_linear` takes this input and weight; else why not."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        return f"needs x [M, K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}"
    if x.dtype != weight.dtype or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"needs x and weight of one float dtype, got {x.dtype} and {weight.dtype}"
    if x.shape[1] < 16:
        return f"K = {x.shape[1]} < 16"
    return None


def _linear_plan(x: Tensor, weight: Tensor, silu_mul: bool, config: dict | None) -> tuple:
    """``(m, n, k, launch settings without SPLIT_K, splits, k per split)`` of a :func:`decode_linear` call."""
    m, k = x.shape
    n = weight.shape[0] // 2 if silu_mul else weight.shape[0]
    cfg = dict(config or linear_config(m, n, k, silu_mul))
    split = cfg.pop("SPLIT_K")
    if silu_mul and split != 1:
        raise ValueError("decode_linear: silu_mul needs SPLIT_K 1 (the activation is not linear)")
    k_per_split = -(-(-(-k // split)) // cfg["BLOCK_K"]) * cfg["BLOCK_K"]   # whole K blocks per split
    return m, n, k, cfg, -(-k // k_per_split), k_per_split


def _linear_launch(x: Tensor, weight: Tensor, bias: Tensor | None, silu_mul: bool, config: dict | None) -> Tensor:
    why_not = linear_supported(x, weight)
    if why_not:
        raise ValueError(f"decode_linear: {why_not}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if weight.stride(-1) != 1:
        raise ValueError(f"decode_linear: the weight needs contiguous rows, got strides {weight.stride()}")
    m, n, k, cfg, split, k_per_split = _linear_plan(x, weight, silu_mul, config)
    block_k = cfg["BLOCK_K"]
    if split == 1:
        out = torch.empty(1, m, n, dtype=x.dtype, device=x.device)
    else:
        out = torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), split, triton.cdiv(m, cfg["BLOCK_M"]))
    _skinny_linear_kernel[grid](
        x, weight, bias if bias is not None else weight, out, m, n, k, k_per_split, x.stride(0), weight.stride(0),
        out.stride(0), out.stride(1), HAS_BIAS=bias is not None, SILU_MUL=silu_mul,
        EVEN_K=k % k_per_split == 0 and k_per_split % block_k == 0, IEEE=x.dtype == torch.float32 or INTERPRET,
        UPCAST=INTERPRET, **cfg)
    return out[0] if split == 1 else out


@torch.library.custom_op("rlxf::decode_linear", mutates_args=())
def decode_linear(x: Tensor, weight: Tensor, bias: Tensor | None, silu_mul: bool = False) -> Tensor:
    """``x @ weight.T + bias`` for the few rows of a decode step (``x`` [M, K], ``weight`` [N, K]).

    Returns either the product ``[M, N]`` in ``x``'s dtype or, when :func:`linear_config` splits
    the K range (small ``N``: too few output tiles to fill the GPU), the float32 partial products
    ``[S, M, N]`` whose sum over dim 0 is the product (the caller's ``.sum(0)`` fuses into the
    next element-wise kernel under ``torch.compile``, where cuBLAS runs its own reduction kernel).
    ``silu_mul``: ``weight`` is the concatenated ``[gate; up]`` weight ``[2N, K]`` and the result
    is ``silu(x @ gate.T + b_gate) * (x @ up.T + b_up)`` ``[M, N]``, rounded like the eager MLP.
    Use :func:`linear_result` to get the ``[M, N]`` product either way.
    """
    return _linear_launch(x, weight, bias, silu_mul, None)


@decode_linear.register_fake
def _(x, weight, bias, silu_mul=False):
    m, n, _, _, split, _ = _linear_plan(x, weight, silu_mul, None)
    if split == 1:
        return x.new_empty(m, n)
    return x.new_empty(split, m, n, dtype=torch.float32)


def linear_result(out: Tensor, dtype: torch.dtype) -> Tensor:
    """The ``[M, N]`` product of a :func:`decode_linear` result, in ``dtype`` (sums split partials)."""
    return out.sum(0).to(dtype) if out.dim() == 3 else out


def decode_linear_reference(x: Tensor, weight: Tensor, bias: Tensor | None, silu_mul: bool = False) -> Tensor:
    """Torch reference of :func:`linear_result` of :func:`decode_linear`."""
    if not silu_mul:
        return torch.nn.functional.linear(x, weight, bias)
    gate, up = torch.nn.functional.linear(x, weight, bias).chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


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
        x, weight, bias = rand(3, 512), rand(96, 512) * 0.05, rand(96)
        for silu_mul, config in ((False, {"BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 2}),
                                 (True, {"BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 1})):
            config = {"BLOCK_M": 16, "num_warps": 4, "num_stages": 2, **config}
            got = linear_result(_linear_launch(x, weight, bias, silu_mul, config), dtype)
            want = decode_linear_reference(x.float(), weight.float(), bias.float(), silu_mul)
            error = max(error, float((got.float() - want).abs().max() / want.abs().max()))   # relative
        tolerance = 1e-3 if dtype == torch.float32 else 5e-2
        if error > tolerance or not torch.equal(tokens, want_tokens):
            _PROBED[key] = f"results differ from the torch reference (max error {error:.3g})"
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
