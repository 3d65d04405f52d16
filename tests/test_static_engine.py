"""rlxf.rollout.StaticEngine: same greedy tokens as HFEngine (tiny Llama, random Qwen2/Qwen3 with
GQA and q/k biases or norms), sampling log-probs equal the training side's token_logps, fallback for
unsupported models, and the CPU path of the static decode loop (the CUDA graph is exercised by
``tests/test_gpu.py`` and ``benchmarks/vs_trl.py``)."""

from __future__ import annotations

import pytest
import torch

from rlxf.rollout import HFEngine, SamplingParams, StaticEngine
from rlxf.rollout.static_engine import static_engine_support

from test_rollout import check_invariants, training_side_logps

PROMPTS = ("12+34=", "7=", "hello world!")  # different lengths: left padding is exercised
WEIGHT_SCALE = 10.0


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _sharpen(model):
    """Scale the matrices so random logits are not flat (greedy paths then vary and end on EOS)."""
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(WEIGHT_SCALE)
    return model.eval()


@pytest.fixture(scope="module")
def tiny():
    from rlxf.models import load_policy

    return load_policy("tiny", dtype="float32", device="cpu").eval()


def _random(kind: str):
    """A sharpened random model: ``qwen2`` (q/k/v biases) and ``qwen3`` (q/k norms) with grouped KV
    heads, or ``llama`` with the embedded tiny model's attention (4 heads of 32, no grouping) in 2
    layers instead of its 4."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=103, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=96, max_position_embeddings=512,
                  tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if kind == "llama":
        return _sharpen(LlamaForCausalLM(LlamaConfig(**{**common, "hidden_size": 128, "num_key_value_heads": 4})))
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=16, **common))
    with torch.no_grad():  # non-zero q/k/v biases (Qwen2) and norm weights (Qwen3) must be used
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(0.3 * torch.randn_like(param))
    return _sharpen(model)


@pytest.fixture
def prompts(tokenizer):
    return [tokenizer(p)["input_ids"] for p in PROMPTS]


@pytest.mark.parametrize("kind", ["tiny", "qwen2", "qwen3"])
def test_greedy_tokens_equal_hf_engine(kind, tiny, tokenizer, prompts):
    model = tiny if kind == "tiny" else _random(kind)
    assert static_engine_support(model) is None
    params = SamplingParams(max_new_tokens=24, temperature=0.0, n=2)
    ref = HFEngine(model, tokenizer).generate(prompts, params)
    engine = StaticEngine(model, tokenizer, sync_every=3)
    out = engine.generate(prompts, params)
    check_invariants(out, params)
    assert engine.stats["fallback_calls"] == 0
    assert torch.equal(out.completion_ids, ref.completion_ids)
    assert torch.equal(out.completion_mask, ref.completion_mask)
    assert out.text == ref.text and out.finish_reason == ref.finish_reason
    torch.testing.assert_close(out.logps, ref.logps, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["tiny", "qwen2"])
def test_sampling_logps_equal_training_logps(kind, tiny, tokenizer, prompts):
    model = tiny if kind == "tiny" else _random(kind)
    params = SamplingParams(max_new_tokens=16, temperature=1.0, n=3, seed=7)
    out = StaticEngine(model, tokenizer).generate(prompts, params)
    check_invariants(out, params)
    for row, expected in enumerate(training_side_logps(model, out, temperature=1.0)):
        got = out.logps[row][out.completion_mask[row].bool()]
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_same_seed_same_samples_as_hf_engine(tiny, tokenizer, prompts):
    """Sampling uses HFEngine's sampler on the same logits: with a seed, the same draws."""
    params = SamplingParams(max_new_tokens=12, temperature=0.8, top_k=20, top_p=0.9, n=2, seed=3)
    ref = HFEngine(tiny, tokenizer).generate(prompts, params)
    out = StaticEngine(tiny, tokenizer, sync_every=1).generate(prompts, params)
    assert torch.equal(out.completion_ids, ref.completion_ids)


def test_micro_batches_stop_strings_and_weight_updates(tiny, tokenizer, prompts):
    params = SamplingParams(max_new_tokens=10, temperature=0.0, n=2, stop=("1",))
    engine = StaticEngine(tiny, tokenizer, max_batch_size=4)
    ref = HFEngine(tiny, tokenizer, max_batch_size=4).generate(prompts, params)
    out = engine.generate(prompts, params)
    assert torch.equal(out.completion_ids, ref.completion_ids) and out.text == ref.text
    # weights are read in place: a change to the policy shows in the next call
    model = _random("qwen2")
    engine = StaticEngine(model, tokenizer)
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
    before = engine.generate(prompts, greedy).completion_ids
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)  # tied: also the embedding
    after = engine.generate(prompts, greedy).completion_ids
    assert torch.equal(after, HFEngine(model, tokenizer).generate(prompts, greedy).completion_ids)
    assert not torch.equal(before, after)


def test_falls_back_for_unsupported_models(tokenizer, prompts):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=103, n_embd=32, n_layer=1, n_head=2, n_positions=64,
                                       eos_token_id=2, bos_token_id=1)).eval()
    assert static_engine_support(model) is not None
    engine = StaticEngine(model, tokenizer)
    params = SamplingParams(max_new_tokens=5, temperature=0.0)
    out = engine.generate(prompts, params)
    assert engine.stats["fallback_calls"] == 1
    assert torch.equal(out.completion_ids, HFEngine(model, tokenizer).generate(prompts, params).completion_ids)


# -- device sampling (sampling inside the captured step) and fused projections, run eagerly on CPU --

@pytest.mark.parametrize("kind,attention", [("tiny", "sdpa"), ("qwen2", "sdpa"), ("qwen3", "sdpa"),
                                            ("tiny", "matmul"), ("qwen2", "matmul")])
def test_device_sampling_and_fused_projections_greedy_equal_hf_engine(kind, attention, tiny, tokenizer, prompts):
    model = tiny if kind == "tiny" else _random(kind)
    params = SamplingParams(max_new_tokens=24, temperature=0.0, n=2)
    ref = HFEngine(model, tokenizer).generate(prompts, params)
    engine = StaticEngine(model, tokenizer, sync_every=3, device_sampling=True, fuse_projections=True,
                          decode_attention=attention, graph_steps=5)  # 23 decodes: 4 blocks of 5 + 3 single
    for _ in range(2):  # the second call reuses the state and its fused buffers
        out = engine.generate(prompts, params)
        check_invariants(out, params)
        assert torch.equal(out.completion_ids, ref.completion_ids)
        assert torch.equal(out.completion_mask, ref.completion_mask)
        assert out.text == ref.text and out.finish_reason == ref.finish_reason
        torch.testing.assert_close(out.logps, ref.logps, rtol=1e-4, atol=1e-4)
    assert engine.stats["device_sampling_calls"] == 2
    assert engine._states[next(iter(engine._states))].fused is not None


def test_fused_projections_follow_weight_updates(tokenizer, prompts):
    model = _random("qwen2")
    engine = StaticEngine(model, tokenizer, device_sampling=True, fuse_projections=True)
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
    before = engine.generate(prompts, greedy).completion_ids
    with torch.no_grad():
        for layer in model.model.layers:   # in place, as an optimizer step: only the fused copies see it
            layer.self_attn.k_proj.weight.mul_(-2.0)
            layer.mlp.up_proj.weight.mul_(-1.5)
    after = engine.generate(prompts, greedy).completion_ids
    assert torch.equal(after, HFEngine(model, tokenizer).generate(prompts, greedy).completion_ids)
    assert not torch.equal(before, after)


def test_every_cached_shape_shares_one_copy_of_the_fused_weights(tokenizer, prompts):
    """Two batch shapes (an evaluation call and a training call) keep two KV caches and graphs but one
    fused q/k/v and gate/up copy (at the 8B shape that copy is 9 GB); it follows weight updates."""
    model = _random("qwen2")
    engine = StaticEngine(model, tokenizer, device_sampling=True, fuse_projections=True, max_cached_graphs=2)
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
    engine.generate(prompts, greedy)
    engine.generate(prompts[:1], greedy)                          # a second (batch, L) state
    assert len(engine._states) == 2
    copies = {tuple(id(buffer) for buffer in layer) for state in engine._states.values() for layer in state.fused}
    assert len(copies) == len(model.model.layers)                 # each layer's (w_qkv, b_qkv, w_gate_up, b) once
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight.mul_(-1.5)
    for batch in (prompts, prompts[:1]):                          # both states see the update
        assert torch.equal(engine.generate(batch, greedy).completion_ids,
                           HFEngine(model, tokenizer).generate(batch, greedy).completion_ids)
    engine.release()
    assert engine._fused is None


def test_device_sampling_draws_from_the_softmax_and_is_seeded(tokenizer):
    """Gumbel-max draws: the first token's frequencies match softmax(z/τ); same seed, same draws;
    the caller's random state is untouched by a seeded call; log-probs equal the training side's."""
    model = _random("qwen2")
    prompt = [tokenizer("12+")["input_ids"]]
    temperature = 1.5
    engine = StaticEngine(model, tokenizer, device_sampling=True)
    params = SamplingParams(max_new_tokens=1, temperature=temperature, n=4000, seed=11)
    state = torch.get_rng_state()
    out = engine.generate(prompt, params)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(engine.generate(prompt, params).completion_ids, out.completion_ids)
    other = engine.generate(prompt, SamplingParams(max_new_tokens=1, temperature=temperature, n=4000, seed=12))
    assert not torch.equal(other.completion_ids, out.completion_ids)
    with torch.no_grad():
        logits = model(torch.tensor(prompt)).logits[0, -1].double()
    counts = torch.bincount(out.completion_ids[:, 0], minlength=logits.numel()).double()
    frequencies = counts.cpu() / counts.sum().cpu()
    probs = torch.softmax(logits.cpu() / temperature, -1)
    # total variation is about 0.4·Σ sqrt(p(1-p)/n) for exact draws; allow 2.5 times that, and check
    # that the wrong temperature (1) is rejected by the same bound
    bound = (probs * (1 - probs) / counts.sum().cpu()).sqrt().sum()
    assert 0.5 * (frequencies - probs).abs().sum() < bound
    assert 0.5 * (frequencies - torch.softmax(logits.cpu(), -1)).abs().sum() > bound
    multi = engine.generate([tokenizer(p)["input_ids"] for p in PROMPTS],
                            SamplingParams(max_new_tokens=12, temperature=1.0, n=3, seed=5))
    check_invariants(multi, SamplingParams(max_new_tokens=12, temperature=1.0, n=3))
    for row, expected in enumerate(training_side_logps(model, multi, temperature=1.0)):
        got = multi.logps[row][multi.completion_mask[row].bool()]
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_device_sampling_is_skipped_for_top_k_top_p_and_stop_strings(tiny, tokenizer, prompts):
    engine = StaticEngine(tiny, tokenizer, device_sampling=True)
    for params in (SamplingParams(max_new_tokens=4, top_k=5, seed=1),
                   SamplingParams(max_new_tokens=4, top_p=0.9, seed=1),
                   SamplingParams(max_new_tokens=4, stop=("1",), seed=1)):
        engine.generate(prompts, params)
    assert engine.stats["device_sampling_calls"] == 0


def test_device_sampling_with_many_eos_ids_stops_at_the_first_token(tiny, tokenizer, prompts):
    """Every token an EOS id: each row ends at its first token (the in-step EOS test is a comparison
    table, which CUDA-graph capture allows for any number of ids)."""
    vocab = tiny.get_input_embeddings().num_embeddings
    engine = StaticEngine(tiny, tokenizer, device_sampling=True, eos_token_ids=list(range(vocab)))
    out = engine.generate(prompts, SamplingParams(max_new_tokens=40, temperature=1.0, n=2, seed=0))
    assert out.completion_ids.shape[1] == 1 and out.finish_reason == ["stop"] * 6

