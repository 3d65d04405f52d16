"""rlxf.rollout.kernels: the decode-attention and sampling Triton kernels against their torch references,
and StaticEngine running them (same greedy tokens as HFEngine, exact sampling distribution, seeds).

On a machine without CUDA the kernels run in Triton's interpreter (``tests/conftest.py`` sets
``TRITON_INTERPRET=1`` before rlxf is imported); on a GPU they run compiled. The interpreter's bf16
``dot`` is wrong, so there the kernel upcasts its dot operands (``rlxf.rollout.kernels.INTERPRET``).
"""

from __future__ import annotations

import pytest
import torch

from rlxf.rollout import kernels
from rlxf.rollout import HFEngine, SamplingParams, StaticEngine

from test_rollout import check_invariants, training_side_logps
from test_static_engine import PROMPTS, _random

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOGP_TOL = 1e-3 if DEVICE == "cuda" else 1e-4   # HF and the static step reduce in different orders on a GPU


def _interpreter_runs_dynamic_loops() -> bool:
    """Triton < 3.9's interpreter cannot take a loop bound loaded from memory under NumPy >= 2.4."""
    if not kernels.available(DEVICE):
        return False
    q = torch.zeros(1, 1, 1, 16, device=DEVICE)
    cache = torch.zeros(1, 1, 4, 16, device=DEVICE)
    try:
        kernels.decode_attention(q, cache, cache, torch.zeros(1, 1, 1, 4, device=DEVICE),
                                 torch.tensor([2], device=DEVICE), 1.0)
    except Exception:  # noqa: BLE001 - any failure means the kernels cannot be exercised here
        return False
    return True


pytestmark = pytest.mark.skipif(not _interpreter_runs_dynamic_loops(),
                                reason="Triton (>= 3.9 for the CPU interpreter) not available")


def _cache(batch, n_kv, groups, head_dim, length, dtype, pad):
    torch.manual_seed(0)
    q = torch.randn(batch, n_kv, groups, head_dim, dtype=dtype, device=DEVICE)
    k = torch.randn(batch, n_kv, length, head_dim, dtype=dtype, device=DEVICE)
    v = torch.randn(batch, n_kv, length, head_dim, dtype=dtype, device=DEVICE)
    mask = torch.zeros(batch, 1, 1, length, dtype=dtype, device=DEVICE)
    for row, hidden in enumerate(pad):           # left padding: the first slots of a row are hidden
        mask[row, ..., :hidden] = float("-inf")
    return q, k, v, mask


@pytest.fixture(params=[0, 64], ids=["one program per row and head", "split over the cache"])
def split_slots(request, monkeypatch):
    """The kernel as one program walking the whole cache, and as flash-decoding splits of 64 slots
    (two 32-slot blocks each; the last split of a 192-slot cache is partly or wholly past the fill)."""
    monkeypatch.setitem(kernels.ATTENTION_CONFIG, "SPLIT_SLOTS", request.param)
    if request.param:
        monkeypatch.setitem(kernels.ATTENTION_CONFIG, "BLOCK_N", 32)
    return request.param


# bfloat16 cases in the CPU interpreter: in the slow set (30 cases, 11 s together on a 2-core CPU); float32
# covers the same shapes in the quick subset
BF16_SLOW = pytest.param(torch.bfloat16, marks=pytest.mark.slow)


@pytest.mark.parametrize("dtype", [torch.float32, BF16_SLOW])
@pytest.mark.parametrize("n_kv,groups,head_dim", [(2, 7, 64), (4, 1, 16), (1, 2, 32)])
@pytest.mark.parametrize("slot", [0, 127, 191])
def test_decode_attention_matches_reference(dtype, n_kv, groups, head_dim, slot, split_slots):
    q, k, v, mask = _cache(3, n_kv, groups, head_dim, 192, dtype, pad=(0, 0, 0) if slot == 0 else (0, 5, slot))
    # slots after `slot` hold garbage that must not be read: make it huge
    k[:, :, slot + 1:] = 1e4
    slot_t = torch.tensor([slot], device=DEVICE)
    got = kernels.decode_attention(q, k, v, mask, slot_t, head_dim ** -0.5)
    want = kernels.decode_attention_reference(q, k, v, mask, slot_t, head_dim ** -0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, BF16_SLOW])
@pytest.mark.parametrize("n_kv,groups,head_dim", [(2, 7, 64), (1, 2, 32)])
@pytest.mark.parametrize("slot", [0, 128, 191])
def test_rope_decode_attention_rotates_writes_the_cache_and_attends(dtype, n_kv, groups, head_dim, slot,
                                                                    split_slots):
    batch, length = 3, 192
    q, k, v, mask = _cache(batch, n_kv, groups, head_dim, length, dtype, pad=(0, 0, 0) if slot == 0 else (0, 1, slot))
    mask[..., slot:] = float("-inf")      # not yet written: the kernel must show the new slot itself
    k[:, :, slot + 1:] = 1e4
    # q, k and v as strided views of one projection row, as the engine passes them
    width = (n_kv * groups + 2 * n_kv) * head_dim
    row = torch.randn(batch, width, dtype=dtype, device=DEVICE)
    q_new, k_new, v_new = row.split((n_kv * groups * head_dim, n_kv * head_dim, n_kv * head_dim), -1)
    q_new = q_new.view(batch, n_kv, groups, head_dim)
    k_new, v_new = k_new.view(batch, n_kv, head_dim), v_new.view(batch, n_kv, head_dim)
    angles = torch.arange(length, device=DEVICE)[:, None] * 0.1 / (1 + torch.arange(head_dim // 2, device=DEVICE))
    cos = torch.cat((angles.cos(), angles.cos()), -1).to(dtype)
    sin = torch.cat((angles.sin(), angles.sin()), -1).to(dtype)
    positions = torch.tensor([slot, max(slot - 1, 0), max(slot - slot, 0)], device=DEVICE)
    slot_t = torch.tensor([slot], device=DEVICE)
    k_ref, v_ref = k.clone(), v.clone()
    want = kernels.rope_decode_attention_reference(q_new, k_new, v_new, k_ref, v_ref, mask, slot_t, positions,
                                                   cos, sin, head_dim ** -0.5)
    got = kernels.rope_decode_attention(q_new, k_new, v_new, k, v, mask, slot_t, positions, cos, sin,
                                        head_dim ** -0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(k.float(), k_ref.float(), rtol=tol, atol=tol)   # the written slot
    assert torch.equal(v, v_ref)


def test_decode_attention_runs_under_torch_compile():
    q, k, v, mask = _cache(2, 2, 3, 16, 64, torch.float32, pad=(0, 4))
    slot = torch.tensor([20], device=DEVICE)
    fn = torch.compile(lambda *a: kernels.decode_attention(*a, 0.25) * 2.0, backend="eager", fullgraph=True)
    torch.testing.assert_close(fn(q, k, v, mask, slot),
                               2.0 * kernels.decode_attention_reference(q, k, v, mask, slot, 0.25),
                               rtol=1e-5, atol=1e-5)


def test_attention_supported_names_the_shape_it_refuses():
    assert kernels.attention_supported(64, 7) is None
    assert "power of two" in kernels.attention_supported(80, 2)
    assert "per KV head" in kernels.attention_supported(64, 128)


def _scalars(inv_t=1.0, logp_inv_t=1.0):
    return (torch.tensor(inv_t, dtype=torch.float32, device=DEVICE),
            torch.tensor(logp_inv_t, dtype=torch.float32, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sample_tokens_greedy_and_logps_match_reference(dtype):
    torch.manual_seed(1)
    logits = (3 * torch.randn(4, 9000, device=DEVICE)).to(dtype)   # two vocabulary chunks
    logits[1, 8999] = 50.0                                            # maximum in the last, partial chunk
    logits[2, 7] = logits[2, 8500] = 60.0                             # a tie across chunks: the first wins
    logits[3, 4100] = logits[3, 4200] = 60.0                          # a tie inside a chunk
    inv_t, logp_inv_t = _scalars(1.0, 1 / 0.7)
    seed = torch.tensor([3], device=DEVICE)
    tokens, logps = kernels.sample_tokens(logits, seed, seed, inv_t, logp_inv_t, True)
    want_tokens, want_logps = kernels.sample_tokens_reference(logits, None, inv_t, logp_inv_t)
    assert tokens.tolist() == want_tokens.tolist() and tokens.tolist()[1:] == [8999, 7, 4100]
    torch.testing.assert_close(logps, want_logps, rtol=1e-5, atol=1e-5)


def test_sample_tokens_uses_philox_uniforms_keyed_by_seed_plus_step():
    torch.manual_seed(2)
    logits = torch.randn(3, 9000, device=DEVICE)
    inv_t, logp_inv_t = _scalars(1 / 1.3, 1.0)
    seed, step = torch.tensor([40], device=DEVICE), torch.tensor([2], device=DEVICE)
    tokens, logps = kernels.sample_tokens(logits, seed, step, inv_t, logp_inv_t, False)
    uniforms = kernels.philox_uniforms(42, 3, 9000).to(DEVICE)
    want_tokens, want_logps = kernels.sample_tokens_reference(logits, uniforms, inv_t, logp_inv_t)
    assert tokens.tolist() == want_tokens.tolist()
    torch.testing.assert_close(logps, want_logps, rtol=1e-5, atol=1e-5)
    again, _ = kernels.sample_tokens(logits, seed, step + 1, inv_t, logp_inv_t, False)
    assert kernels.sample_tokens(logits, seed, step, inv_t, logp_inv_t, False)[0].tolist() == tokens.tolist()
    assert again.tolist() != tokens.tolist()


@pytest.mark.slow
def test_sample_tokens_draws_from_the_tempered_softmax():
    """400 rows of the same logits are 400 independent draws: frequencies match softmax(z/τ).

    Four distinct logits, not in sorted order: the tempered and untempered distributions are 0.15
    apart (total variation) against a bound of 0.068, the same 2.2x separation that 1500 draws over
    16 random logits give, at a quarter of the interpreter's time. Measured at this seed: 0.028 from
    softmax(z/τ), 0.171 from softmax(z)."""
    rows = 400
    row = torch.tensor([0.0, 3.0, -1.0, 1.0], device=DEVICE)
    temperature = 1.5
    inv_t, logp_inv_t = _scalars(1 / temperature, 1.0)
    tokens, _ = kernels.sample_tokens(row.expand(rows, -1).contiguous(), torch.tensor([9], device=DEVICE),
                                      torch.tensor([0], device=DEVICE), inv_t, logp_inv_t, False)
    frequencies = torch.bincount(tokens.cpu(), minlength=row.numel()).double() / rows
    probs = torch.softmax(row.double().cpu() / temperature, -1)
    bound = (probs * (1 - probs) / rows).sqrt().sum()   # ≈ 2.5× the expected total variation
    assert 0.5 * (frequencies - probs).abs().sum() < bound
    assert 0.5 * (frequencies - torch.softmax(row.double().cpu(), -1)).abs().sum() > bound


# -- the skinny-matmul kernel -------------------------------------------------------------------------

def _eager_mlp_product(x, weight, bias):
    """silu(gate)·up rounded the way the eager module rounds it (each op in the input dtype)."""
    gate, up = torch.nn.functional.linear(x, weight, bias).chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n,k,silu_mul,bias", [
    (3, 48, 64, False, True),      # rows and columns that fill no block
    (16, 40, 96, True, True),      # K not a multiple of BLOCK_K
    (33, 64, 512, False, False),   # split over K (partials)
    (128, 96, 1024, False, True),
    (7, 32, 640, True, False),
])
def test_decode_linear_matches_reference(dtype, m, n, k, silu_mul, bias):
    torch.manual_seed(0)
    x = torch.randn(m, k, dtype=dtype, device=DEVICE)
    weight = torch.randn(2 * n if silu_mul else n, k, dtype=dtype, device=DEVICE) / k ** 0.5
    b = torch.randn(weight.shape[0], dtype=dtype, device=DEVICE) if bias else None
    out = kernels.decode_linear(x, weight, b, silu_mul)
    got = kernels.linear_result(out, dtype)
    assert got.shape == (m, n) and got.dtype == dtype
    if out.dim() == 3:                                # split partials are float32 and sum to the product
        assert out.dtype == torch.float32 and out.shape[1:] == (m, n)
    if dtype == torch.float32:
        want = kernels.decode_linear_reference(x.double(), weight.double(), None if b is None else b.double(),
                                               silu_mul)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    else:   # against the eager bf16 module: the same roundings, accumulation order aside
        want = _eager_mlp_product(x, weight, b) if silu_mul else torch.nn.functional.linear(x, weight, b)
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("config", [
    {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 1, "num_warps": 4, "num_stages": 2},
    {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 3, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 8, "num_warps": 8, "num_stages": 2},
])
def test_decode_linear_launch_settings_give_the_same_product(config):
    """Every setting the GPU sweep may pick (M, N, K blocks; K splits, one of them with a ragged last split)."""
    torch.manual_seed(1)
    x, weight, b = (torch.randn(20, 320, device=DEVICE), torch.randn(72, 320, device=DEVICE) / 18,
                    torch.randn(72, device=DEVICE))
    got = kernels.linear_result(kernels._linear_launch(x, weight, b, False, config), torch.float32)
    torch.testing.assert_close(got, torch.nn.functional.linear(x, weight, b), rtol=1e-5, atol=1e-5)


def test_decode_linear_tuned_entry_is_used_and_fake_shape_matches(monkeypatch):
    x, weight = torch.randn(4, 256, device=DEVICE), torch.randn(24, 256, device=DEVICE)
    monkeypatch.setitem(kernels.LINEAR_CONFIGS, (24, 256, False),
                        {"BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 4, "num_warps": 4, "num_stages": 2})
    assert kernels.linear_config(4, 24, 256, False)["SPLIT_K"] == 4
    out = kernels.decode_linear(x, weight, None)
    assert out.shape == (4, 4, 24)
    compiled = torch.compile(lambda a, w: kernels.linear_result(kernels.decode_linear(a, w, None), a.dtype),
                             backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, weight), x @ weight.T, rtol=1e-5, atol=1e-5)


def test_decode_linear_refuses_bad_input_with_the_reason():
    x = torch.randn(4, 64, device=DEVICE)
    with pytest.raises(ValueError, match=r"weight \[N, K\]"):
        kernels.decode_linear(x, torch.randn(8, 32, device=DEVICE), None)
    with pytest.raises(ValueError, match="one float dtype"):
        kernels.decode_linear(x, torch.randn(8, 64, device=DEVICE, dtype=torch.float64), None)
    with pytest.raises(ValueError, match="silu_mul needs SPLIT_K 1"):
        kernels._linear_launch(x, torch.randn(16, 64, device=DEVICE), None, True,
                               {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 2})


def test_engine_refuses_the_linear_kernel_it_cannot_run(tokenizer):
    model = _random("qwen2").to(DEVICE)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    params = SamplingParams(max_new_tokens=3, temperature=0.0)
    engine = StaticEngine(model, tokenizer, decode_attention="sdpa", fuse_projections=True, linear_kernel=True)
    with pytest.raises(ValueError, match=r"linear_kernel=\['down', 'gate_up', 'o', 'qkv'\] cannot run here: it runs "
                                         "with the Triton attention"):
        engine.generate(prompts, params)
    engine = StaticEngine(model, tokenizer, decode_attention="triton", fuse_projections=False, linear_kernel=True)
    with pytest.raises(ValueError, match="fuse_projections is off"):
        engine.generate(prompts, params)
    model.model.layers[1].mlp.act_fn = torch.nn.GELU()
    engine = StaticEngine(model, tokenizer, decode_attention="triton", fuse_projections=True, linear_kernel=True)
    with pytest.raises(ValueError, match="layer 1's MLP activation is GELU, not SiLU"):
        engine.generate(prompts, params)
    # left to choose, the engine keeps the torch matmuls for it (and still decodes)
    engine = StaticEngine(model, tokenizer, decode_attention="triton", fuse_projections=True)
    engine.generate(prompts, params)
    assert engine._states[next(iter(engine._states))].spec["linear_kernel"] == frozenset()
    with pytest.raises(ValueError, match="a subset of"):
        StaticEngine(model, tokenizer, linear_kernel=("mlp",))


# -- the engine with the kernels ----------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("kind,linear", [
    ("llama", False), ("qwen2", False), ("qwen3", False),
    # the matmul kernel on the grouped-KV models (each layer costs seconds in the Triton interpreter)
    ("qwen2", True), ("qwen3", True), ("qwen2", ("gate_up", "down")),
], ids=["llama-cuBLAS", "qwen2-cuBLAS", "qwen3-cuBLAS", "qwen2-linear kernel", "qwen3-linear kernel",
        "qwen2-MLP kernels"])
def test_engine_with_kernels_greedy_equals_hf_engine(kind, linear, tokenizer):
    # llama: the embedded tiny model's attention layout (test_static_engine runs the tiny model itself)
    model = _random(kind).to(DEVICE)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    # 10 tokens: three captured 4-step chunks and several finished-row checks (the Triton interpreter is slow)
    params = SamplingParams(max_new_tokens=10, temperature=0.0, n=2)
    ref = HFEngine(model, tokenizer).generate(prompts, params)
    engine = StaticEngine(model, tokenizer, sync_every=3, device_sampling=True, decode_attention="triton",
                          sampling_kernel=True, graph_steps=4, fuse_projections=True, linear_kernel=linear)
    out = engine.generate(prompts, params)
    check_invariants(out, params)
    spec = engine._states[next(iter(engine._states))].spec
    from rlxf.rollout.static_engine import LINEAR_PROJECTIONS

    wanted = LINEAR_PROJECTIONS if linear is True else (linear or ())
    assert spec["attention"] == "triton" and spec["linear_kernel"] == frozenset(wanted)
    assert torch.equal(out.completion_ids, ref.completion_ids)
    assert torch.equal(out.completion_mask, ref.completion_mask)
    torch.testing.assert_close(out.logps, ref.logps, rtol=LOGP_TOL, atol=LOGP_TOL)


@pytest.mark.slow
def test_engine_sampling_kernel_is_seeded_and_logps_match_training_side(tokenizer):
    model = _random("qwen2").to(DEVICE)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    engine = StaticEngine(model, tokenizer, device_sampling=True, sampling_kernel=True)
    params = SamplingParams(max_new_tokens=10, temperature=1.0, n=3, seed=5)
    out = engine.generate(prompts, params)
    check_invariants(out, params)
    assert torch.equal(engine.generate(prompts, params).completion_ids, out.completion_ids)
    other = engine.generate(prompts, SamplingParams(max_new_tokens=10, temperature=1.0, n=3, seed=6))
    assert not torch.equal(other.completion_ids, out.completion_ids)
    for row, expected in enumerate(training_side_logps(model, out, temperature=1.0)):
        got = out.logps[row][out.completion_mask[row].bool()]
        torch.testing.assert_close(got, expected.to(got.device), rtol=LOGP_TOL, atol=LOGP_TOL)


def test_engine_refuses_triton_attention_it_cannot_run(tokenizer, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    odd = LlamaForCausalLM(LlamaConfig(vocab_size=103, hidden_size=48, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64, pad_token_id=0, eos_token_id=2)).eval().to(DEVICE)
    params = SamplingParams(max_new_tokens=2, temperature=0.0)
    with pytest.raises(ValueError, match="head_dim 24 is not a power of two"):
        StaticEngine(odd, tokenizer, decode_attention="triton").generate([[5, 6]], params)
    monkeypatch.setattr(kernels, "available", lambda device: False)
    with pytest.raises(RuntimeError, match="needs Triton"):
        StaticEngine(_random("qwen2").to(DEVICE), tokenizer, decode_attention="triton").generate([[5, 6]], params)
    with pytest.raises(RuntimeError, match="sampling_kernel=True needs Triton"):
        StaticEngine(_random("qwen2").to(DEVICE), tokenizer, sampling_kernel=True).generate([[5, 6]], params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_probe_passes_where_the_kernels_run(dtype):
    assert kernels.probe(DEVICE, dtype, 2, 7, 64) is None
    assert kernels.probe(DEVICE, dtype, 1, 2, 24) is None     # attention unsupported: only the sampler is checked


def test_engine_falls_back_to_torch_when_the_kernels_fail_their_check(tokenizer, monkeypatch, caplog):
    """Default choice: a failed first check (say, a Triton that cannot build them for this GPU) gives a
    warning and the torch path; an explicit request raises with the reason."""
    from rlxf.rollout import static_engine

    model = _random("qwen2").to(DEVICE)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    monkeypatch.setattr(static_engine, "_kernels_by_default", lambda device: True)
    monkeypatch.setattr(kernels, "probe", lambda *args: "CompilationError: no bf16 dot on this GPU")
    engine = StaticEngine(model, tokenizer, device_sampling=True)
    with caplog.at_level("WARNING", logger="rlxf.rollout"):
        out = engine.generate(prompts, params)
    state = next(iter(engine._states.values()))
    assert state.spec["attention"] in ("sdpa", "matmul") and not state.spec["sampling_kernel"]
    assert "failed a first check" in caplog.text and "no bf16 dot" in caplog.text
    assert torch.equal(out.completion_ids, HFEngine(model, tokenizer).generate(prompts, params).completion_ids)
    with pytest.raises(RuntimeError, match="failed its first check.*no bf16 dot"):
        StaticEngine(model, tokenizer, decode_attention="triton", sampling_kernel=False).generate(prompts, params)
    with pytest.raises(RuntimeError, match="failed their first check.*no bf16 dot"):
        StaticEngine(model, tokenizer, sampling_kernel=True).generate(prompts, params)


@pytest.mark.slow
def test_engine_splits_the_cache_for_few_rows_and_keeps_hf_greedy_tokens(tokenizer, monkeypatch):
    """Few rows × KV heads over a long cache: the attention kernel splits the cache (flash-decoding);
    many rows, or a short cache, keep one program per (row, KV head). Split or not, the engine's
    greedy tokens equal HFEngine's."""
    from rlxf.rollout import static_engine

    assert static_engine._attention_split(2, 2, 2048) == static_engine._SPLIT_SLOTS
    assert static_engine._attention_split(128, 2, 2048) == 0 and static_engine._attention_split(2, 2, 192) == 0
    # the H100 sweep's crossovers: 64 programs split from a 1024-slot cache, 128 programs (in 256-slot
    # slices) from a 2048-slot one, 256 programs never
    assert static_engine._attention_split(32, 2, 1088) == 128 and static_engine._attention_split(32, 2, 512) == 0
    assert static_engine._attention_split(64, 2, 2112) == 256 and static_engine._attention_split(64, 2, 1088) == 0
    assert static_engine._attention_split(16, 8, 4096) == 256 and static_engine._attention_split(128, 2, 8192) == 0
    monkeypatch.setattr(static_engine, "_SPLIT_SLOTS", 16)    # caches of a few dozen slots here: several splits
    model = _random("qwen2").to(DEVICE)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    params = SamplingParams(max_new_tokens=10, temperature=0.0, n=2)
    engine = StaticEngine(model, tokenizer, device_sampling=True, decode_attention="triton", graph_steps=4)
    out = engine.generate(prompts, params)
    state = engine._states[next(iter(engine._states))]
    assert state.spec["split_slots"] == 16 and state.length > 2 * 16  # the cache really is cut in several slices
    ref = HFEngine(model, tokenizer).generate(prompts, params)
    assert torch.equal(out.completion_ids, ref.completion_ids)
    torch.testing.assert_close(out.logps, ref.logps, rtol=LOGP_TOL, atol=LOGP_TOL)
