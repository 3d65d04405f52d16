"""rlxf.models.logprobs: the chunked log-prob path equals the naive full-logits path (values and grads)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from rlxf.models import (apply_lora, logps_from_logits, mean_logps, reward_scores, sequence_logps,
                         token_logps)
from rlxf.models.logprobs import _split_head

LENGTHS = (11, 7, 4, 9)


def naive_token_logps(model, input_ids, attention_mask, temperature=1.0):
    """Full logits → float64 log_softmax → gather the next token: the obviously correct version."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.double()  # [B, T, V]
    logps = torch.log_softmax(logits / temperature, dim=-1)[:, :-1]
    return logps.gather(-1, input_ids[:, 1:, None]).squeeze(-1)                     # [B, T-1]


def right_padded_batch(lengths=LENGTHS, seed=0, vocab=103):
    """Random token rows of the given lengths, right-padded with pad id 0."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, n in enumerate(lengths):
        input_ids[i, :n] = torch.randint(3, vocab, (n,), generator=gen)
        attention_mask[i, :n] = 1
    return input_ids, attention_mask


@pytest.fixture
def model(tiny_random_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_random_model_dir), dtype=torch.float32)


@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logps_matches_naive(model, chunk_size, temperature):
    input_ids, attention_mask = right_padded_batch()
    fast = token_logps(model, input_ids, attention_mask, temperature=temperature, chunk_size=chunk_size)
    naive = naive_token_logps(model, input_ids, attention_mask, temperature)
    real = attention_mask[:, 1:].bool()
    assert fast.shape == (len(LENGTHS), max(LENGTHS) - 1)
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast[real].double(), naive[real], rtol=0, atol=2e-5)
    assert torch.all(fast[~real] == 0)


def test_temperature_changes_logps(model):
    input_ids, attention_mask = right_padded_batch()
    cold = token_logps(model, input_ids, attention_mask, temperature=0.5)
    warm = token_logps(model, input_ids, attention_mask, temperature=1.0)
    assert (cold - warm).abs().max() > 1e-3
    with pytest.raises(ValueError, match="temperature"):
        token_logps(model, input_ids, attention_mask, temperature=0.0)


def test_padding_does_not_affect_real_positions(model):
    input_ids, attention_mask = right_padded_batch()
    batched = token_logps(model, input_ids, attention_mask, chunk_size=5)
    for i, n in enumerate(LENGTHS):
        alone = token_logps(model, input_ids[i:i + 1, :n], attention_mask[i:i + 1, :n])
        torch.testing.assert_close(batched[i, :n - 1], alone[0], rtol=0, atol=1e-5)
        # more right padding, different pad contents: same values
        extra_ids = torch.cat([input_ids[i:i + 1, :n], torch.full((1, 6), 57)], dim=1)
        extra_mask = torch.cat([attention_mask[i:i + 1, :n], torch.zeros(1, 6, dtype=torch.long)], dim=1)
        padded = token_logps(model, extra_ids, extra_mask)
        torch.testing.assert_close(padded[0, :n - 1], alone[0], rtol=0, atol=1e-5)


def test_left_padding_matches_unpadded(model):
    """Position ids come from the mask, so a left-padded row scores like the unpadded row."""
    right_ids, right_mask = right_padded_batch()
    width = right_ids.shape[1]
    left_ids, left_mask = torch.zeros_like(right_ids), torch.zeros_like(right_mask)
    for i, n in enumerate(LENGTHS):
        left_ids[i, width - n:] = right_ids[i, :n]
        left_mask[i, width - n:] = 1
    left = token_logps(model, left_ids, left_mask)
    for i, n in enumerate(LENGTHS):
        alone = token_logps(model, right_ids[i:i + 1, :n], right_mask[i:i + 1, :n])
        torch.testing.assert_close(left[i, width - n:], alone[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [3, 4096])
def test_gradients_match_naive(model, tiny_random_model_dir, chunk_size):
    from transformers import AutoModelForCausalLM

    reference_model = AutoModelForCausalLM.from_pretrained(str(tiny_random_model_dir), dtype=torch.float32)
    input_ids, attention_mask = right_padded_batch()
    completion_mask = attention_mask.clone()
    completion_mask[:, :2] = 0                                                 # prompt = first 2 tokens
    mask = completion_mask[:, 1:]

    fast = token_logps(model, input_ids, attention_mask, temperature=0.7, chunk_size=chunk_size)
    (sequence_logps(fast, mask).sum()).backward()
    naive = naive_token_logps(reference_model, input_ids, attention_mask, temperature=0.7)
    (sequence_logps(naive, mask).sum()).backward()

    grads = dict(reference_model.named_parameters())
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        torch.testing.assert_close(param.grad, grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_no_grad_gives_plain_tensor(model):
    input_ids, attention_mask = right_padded_batch()
    with torch.no_grad():
        out = token_logps(model, input_ids, attention_mask, chunk_size=4)
    assert out.grad_fn is None and not out.requires_grad


def test_lora_adapters_are_active(model):
    input_ids, attention_mask = right_padded_batch()
    with torch.no_grad():
        base = token_logps(model, input_ids, attention_mask)
    peft_model = apply_lora(model, r=4)
    assert _split_head(peft_model) is not None                                # chunked path, not fallback
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:                                               # B = 0 at init
                param.normal_(0, 0.5)
        lora = token_logps(peft_model, input_ids, attention_mask, chunk_size=7)
        naive = naive_token_logps(peft_model, input_ids, attention_mask)
    real = attention_mask[:, 1:].bool()
    assert (lora - base)[real].abs().max() > 1e-3
    torch.testing.assert_close(lora[real].double(), naive[real], rtol=0, atol=2e-5)


def test_final_logit_softcapping_is_applied():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=103, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, intermediate_size=64,
                          final_logit_softcapping=0.5, pad_token_id=0)
    torch.manual_seed(0)
    gemma = Gemma2ForCausalLM(config).eval()
    input_ids, attention_mask = right_padded_batch()
    with torch.no_grad():
        fast = token_logps(gemma, input_ids, attention_mask, temperature=0.7, chunk_size=5)
        naive = naive_token_logps(gemma, input_ids, attention_mask, temperature=0.7)
    real = attention_mask[:, 1:].bool()
    torch.testing.assert_close(fast[real].double(), naive[real], rtol=0, atol=2e-5)


class _LogitsOnly(nn.Module):
    """A model with no separable head: only full logits come out."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask, position_ids=None, use_cache=None):
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return SimpleNamespace(logits=out.logits)


def test_fallback_full_forward_warns_and_matches(model, caplog):
    input_ids, attention_mask = right_padded_batch()
    with caplog.at_level(logging.WARNING, logger="rlxf.models"):
        fast = token_logps(_LogitsOnly(model), input_ids, attention_mask, temperature=0.7, chunk_size=4)
    assert "full forward" in caplog.text
    naive = naive_token_logps(model, input_ids, attention_mask, temperature=0.7)
    real = attention_mask[:, 1:].bool()
    torch.testing.assert_close(fast[real].double(), naive[real].detach(), rtol=0, atol=2e-5)


def test_logps_from_logits_matches_log_softmax():
    logits = torch.randn(5, 3, 11, dtype=torch.bfloat16)
    labels = torch.randint(0, 11, (5, 3))
    out = logps_from_logits(logits, labels, temperature=0.7)
    expected = torch.log_softmax(logits.double() / 0.7, -1).gather(-1, labels[..., None]).squeeze(-1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)


def test_sequence_and_mean_logps_by_hand():
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -float("inf"), -4.0]])
    mask = torch.tensor([[0, 1, 1], [1, 0, 0]])
    torch.testing.assert_close(sequence_logps(logps, mask), torch.tensor([-5.0, -0.5]))
    torch.testing.assert_close(mean_logps(logps, mask), torch.tensor([-2.5, -0.5]))
    torch.testing.assert_close(sequence_logps(logps, torch.zeros_like(mask)), torch.zeros(2))


def test_mean_logps_rejects_empty_rows_and_bad_shapes():
    logps = torch.randn(3, 4)
    mask = torch.ones(3, 4, dtype=torch.long)
    mask[1] = 0
    with pytest.raises(ValueError, match=r"row\(s\) \[1\]"):
        mean_logps(logps, mask)
    with pytest.raises(ValueError, match="completion_mask"):
        sequence_logps(logps, torch.ones(3, 5))


def test_reward_scores_requires_real_tokens(tiny_random_model_dir):
    from rlxf.models import load_reward_model

    reward_model = load_reward_model(str(tiny_random_model_dir), device="cpu", dtype="float32")
    input_ids, attention_mask = right_padded_batch()
    attention_mask[2] = 0
    with pytest.raises(ValueError, match="no real tokens"):
        reward_scores(reward_model, input_ids, attention_mask)


# -- fused head and label masks (issue 5: log-probs without the full-vocabulary tensor) -----------

@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_linear_label_logps_matches_float64_reference(bias, temperature):
    """The fused head's values and all three gradients against log_softmax in float64."""
    from rlxf.models.logprobs import _LinearLabelLogps

    gen = torch.Generator().manual_seed(3)
    n, h, v = 37, 16, 50
    hidden = torch.randn(n, h, generator=gen, requires_grad=True)
    weight = torch.randn(v, h, generator=gen, requires_grad=True)
    b = torch.randn(v, generator=gen, requires_grad=True) if bias else None
    labels = torch.randint(0, v, (n,), generator=gen)
    upstream = torch.randn(n, generator=gen)
    out = _LinearLabelLogps.apply(hidden, weight, b, labels, 1 / temperature, 8)   # chunks of 8 rows
    grads = torch.autograd.grad((out * upstream).sum(), [hidden, weight] + ([b] if bias else []))
    params = [t.detach().double().requires_grad_() for t in [hidden, weight] + ([b] if bias else [])]
    logits = torch.nn.functional.linear(params[0], params[1], params[2] if bias else None) / temperature
    ref = torch.log_softmax(logits, -1).gather(-1, labels[:, None])[:, 0]
    ref_grads = torch.autograd.grad((ref * upstream.double()).sum(), params)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_label_mask_scores_only_masked_positions_with_same_values_and_grads(model, tiny_random_model_dir):
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_pretrained(str(tiny_random_model_dir), dtype=torch.float32)
    input_ids, attention_mask = right_padded_batch()
    completion = attention_mask.clone()
    completion[:, :3] = 0
    mask = completion[:, 1:]
    masked = token_logps(model, input_ids, attention_mask, label_mask=mask, temperature=0.7, chunk_size=5)
    full = token_logps(other, input_ids, attention_mask, temperature=0.7, fused_head=False)
    torch.testing.assert_close(masked[mask.bool()], full[mask.bool()], rtol=0, atol=1e-6)
    assert torch.all(masked[~mask.bool()] == 0)
    sequence_logps(masked, mask).sum().backward()
    sequence_logps(full, mask).sum().backward()
    reference = dict(other.named_parameters())
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, reference[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    # a [1, T-1] mask broadcasts over the batch (the GRPO layout: every row's completion starts at P)
    row = torch.zeros(1, input_ids.shape[1] - 1, dtype=torch.long)
    row[:, 4:] = 1
    with torch.no_grad():
        part = token_logps(model, input_ids, attention_mask, label_mask=row)
        whole = token_logps(model, input_ids, attention_mask)
    keep = row.bool().expand_as(whole) & attention_mask[:, 1:].bool()
    torch.testing.assert_close(part[keep], whole[keep], rtol=0, atol=1e-6)
    assert torch.all(part[~keep] == 0)
    with pytest.raises(ValueError, match="label_mask shape"):
        token_logps(model, input_ids, attention_mask, label_mask=torch.ones(3, 2))


def test_fused_head_matches_checkpointed_head_under_bf16_autocast(model):
    """The fused head computes in the autocast dtype like the checkpointed path: same values, close grads."""
    input_ids, attention_mask = right_padded_batch()
    results = []
    for fused in (True, False):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logps = token_logps(model, input_ids, attention_mask, fused_head=fused)
        sequence_logps(logps, attention_mask[:, 1:]).sum().backward()
        results.append((logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (fused_logps, fused_grads), (plain_logps, plain_grads) = results
    torch.testing.assert_close(fused_logps, plain_logps, rtol=0, atol=1e-4)
    for name, grad in fused_grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=0.02, atol=2e-3, msg=name)


# -- prompts encoded once for several completions (shared_prompt_logps) ---------------------------

def _prompt_groups(seed=1, plens=(5, 3, 7), clens=((4, 6), (2, 5), (6, 1)), vocab=103):
    """Left-padded prompts, right-padded completions grouped by prompt, and the full sequences."""
    gen = torch.Generator().manual_seed(seed)
    group = len(clens[0])
    width, cwidth = max(plens), max(max(c) for c in clens)
    prompt_ids = torch.zeros(len(plens), width, dtype=torch.long)
    prompt_mask = torch.zeros_like(prompt_ids)
    completion_ids = torch.zeros(len(plens) * group, cwidth, dtype=torch.long)
    completion_mask = torch.zeros_like(completion_ids)
    full = []
    for i, n in enumerate(plens):
        prompt = torch.randint(3, vocab, (n,), generator=gen)
        prompt_ids[i, width - n:], prompt_mask[i, width - n:] = prompt, 1
        for j, m in enumerate(clens[i]):
            completion = torch.randint(3, vocab, (m,), generator=gen)
            completion_ids[i * group + j, :m], completion_mask[i * group + j, :m] = completion, 1
            full.append((prompt, completion))
    return prompt_ids, prompt_mask, completion_ids, completion_mask, full


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_shared_prompt_logps_equal_token_logps_values_and_grads(kind, model, tiny_random_model_dir):
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from rlxf.models import shared_prompt_logps

    def build():
        if kind == "llama":
            return AutoModelForCausalLM.from_pretrained(str(tiny_random_model_dir), dtype=torch.float32)
        torch.manual_seed(0)
        return Qwen2ForCausalLM(Qwen2Config(vocab_size=103, hidden_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                                            tie_word_embeddings=True, pad_token_id=0))

    shared_model, plain_model = build(), build()
    prompt_ids, prompt_mask, completion_ids, completion_mask, full = _prompt_groups()
    shared = shared_prompt_logps(shared_model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                                 temperature=0.8, chunk_size=5)
    sequence_logps(shared, completion_mask).sum().backward()
    width = max(len(p) + len(c) for p, c in full)
    ids = torch.zeros(len(full), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.zeros(len(full), width - 1, dtype=torch.long)
    for r, (p, c) in enumerate(full):
        ids[r, :len(p) + len(c)], mask[r, :len(p) + len(c)] = torch.cat([p, c]), 1
        labels[r, len(p) - 1:len(p) + len(c) - 1] = 1
    plain = token_logps(plain_model, ids, mask, label_mask=labels, temperature=0.8)
    sequence_logps(plain, labels).sum().backward()
    for r, (p, c) in enumerate(full):
        torch.testing.assert_close(shared[r, :len(c)], plain[r, len(p) - 1:len(p) + len(c) - 1], rtol=0, atol=1e-5)
        assert torch.all(shared[r, len(c):] == 0)
    reference = dict(plain_model.named_parameters())
    for name, param in shared_model.named_parameters():
        torch.testing.assert_close(param.grad, reference[name].grad, rtol=1e-4, atol=1e-5, msg=name)


def test_shared_prompt_logps_rejects_bad_layouts(model):
    from rlxf.models import shared_prompt_logps

    prompt_ids, prompt_mask, completion_ids, completion_mask, _ = _prompt_groups()
    with pytest.raises(ValueError, match="multiple"):
        shared_prompt_logps(model, prompt_ids, prompt_mask, completion_ids[:5], completion_mask[:5])
    with pytest.raises(ValueError, match="left-padded"):
        shared_prompt_logps(model, prompt_ids, prompt_mask.flip(-1), completion_ids, completion_mask)
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="checkpointing"):
        shared_prompt_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask)


def test_fused_head_falls_back_to_eager_when_the_compiled_kernel_fails(monkeypatch, caplog):
    """torch.compile fails only at the first call (e.g. no Triton): that call and later ones run eagerly."""
    from rlxf.models import logprobs

    def broken(*args):
        raise RuntimeError("no triton")

    monkeypatch.setattr(logprobs, "_COMPILED_ELEMENTWISE", {"pick": broken})
    logits, labels = torch.randn(3, 11), torch.tensor([1, 4, 9])
    with caplog.at_level(logging.WARNING, logger="rlxf.models"):
        picked, lse = logprobs._elementwise("pick", torch.device("cuda"))(logits, labels, 1.0)
    torch.testing.assert_close(picked, torch.log_softmax(logits, -1)[torch.arange(3), labels])
    assert "torch.compile failed" in caplog.text
    assert logprobs._elementwise("pick", torch.device("cuda")) is logprobs._pick_logps
