"""rlxf.rollout: HFEngine's sampling log-probs equal the training side's, greedy equals
``model.generate``, and finish reasons, masks, stop strings, seeding and validation behave."""

from __future__ import annotations

import pytest
import torch

from rlxf.models import token_logps
from rlxf.rollout import HFEngine, RolloutEngine, Rollouts, SamplingParams

PROMPTS = ("12+34=", "7=", "hello world!")  # different lengths: left padding is exercised
WEIGHT_SCALE = 10.0


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tiny_random_model_dir):
    """The tiny random Llama with its matrices scaled ×10: the raw random model's logits are nearly
    flat, so its greedy path repeats one token and it almost never emits EOS."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_random_model_dir))
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(WEIGHT_SCALE)
    return model.eval()


@pytest.fixture
def prompts(tokenizer):
    return [tokenizer(p)["input_ids"] for p in PROMPTS]


def check_invariants(r: Rollouts, params: SamplingParams, pad_id: int = 0) -> None:
    """What every Rollouts promises, whatever was sampled."""
    n_rows = r.prompt_ids.shape[0]
    assert r.completion_ids.dtype == r.prompt_ids.dtype == torch.long
    assert r.logps.dtype == torch.float32
    lengths = r.completion_mask.sum(-1)
    assert bool((lengths >= 1).all()) and r.completion_ids.shape[1] == int(lengths.max())
    positions = torch.arange(r.completion_ids.shape[1], device=lengths.device)
    assert torch.equal(r.completion_mask, (positions < lengths[:, None]).long())  # ones, then zeros
    padding = r.completion_mask == 0
    assert bool((r.completion_ids[padding] == pad_id).all()) and bool((r.logps[padding] == 0).all())
    assert bool((r.logps[~padding] <= 0).all())
    assert torch.equal(r.prompt_index.cpu(), torch.arange(n_rows // params.n).repeat_interleave(params.n))
    for row, reason in enumerate(r.finish_reason):
        if reason == "length":
            assert int(lengths[row]) == params.max_new_tokens
    assert r.num_tokens() == int(lengths.sum())


def training_side_logps(model, r: Rollouts, temperature: float) -> list[torch.Tensor]:
    """Each row re-encoded without padding as prompt + completion, right-padded, scored by token_logps."""
    sequences, prompt_lengths = [], []
    for row in range(len(r)):
        prompt = r.prompt_ids[row][r.prompt_mask[row].bool()]
        completion = r.completion_ids[row][r.completion_mask[row].bool()]
        sequences.append(torch.cat([prompt, completion]))
        prompt_lengths.append(len(prompt))
    input_ids = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True, padding_value=0)
    attention_mask = torch.zeros_like(input_ids)
    for row, seq in enumerate(sequences):
        attention_mask[row, :len(seq)] = 1
    logps = token_logps(model, input_ids, attention_mask, temperature=temperature)  # [N, T-1]
    return [logps[row, p - 1:len(seq) - 1] for row, (p, seq) in enumerate(zip(prompt_lengths, sequences))]


# -- (a) the engine test: sampling log-probs == training-side log-probs ---------------------------

@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, 0), (0.7, 1.0, 0), (0.7, 0.9, 20)])
def test_sampling_logps_equal_token_logps(model, tokenizer, prompts, temperature, top_p, top_k):
    params = SamplingParams(max_new_tokens=12, temperature=temperature, top_p=top_p, top_k=top_k,
                            n=2, seed=0)
    r = HFEngine(model, tokenizer).generate(prompts, params)
    check_invariants(r, params)
    expected = training_side_logps(model, r, temperature)
    for row, ref in enumerate(expected):
        got = r.logps[row, :len(ref)]
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    # the packed layout of Rollouts.sequences() gives the same numbers
    input_ids, attention_mask = r.sequences()
    prompt_width = r.prompt_ids.shape[1]
    packed = token_logps(model, input_ids, attention_mask, temperature=temperature)[:, prompt_width - 1:]
    torch.testing.assert_close(packed * r.completion_mask, r.logps, atol=1e-5, rtol=0)


# -- (b) greedy == model.generate ------------------------------------------------------------------

def test_greedy_equals_hf_generate(model, tokenizer, prompts):
    params = SamplingParams(max_new_tokens=16, temperature=0)
    r = HFEngine(model, tokenizer).generate(prompts, params)
    check_invariants(r, params)
    input_ids, attention_mask = r.prompt_ids, r.prompt_mask
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=16,
                         do_sample=False, pad_token_id=0, eos_token_id=2)
    assert torch.equal(r.completion_ids, out[:, input_ids.shape[1]:])
    assert len(set(r.text[0])) > 3, "the greedy path should vary (else this test proves little)"
    # greedy log-probs are recorded at temperature 1
    ref = training_side_logps(model, r, 1.0)
    for row in range(len(r)):
        torch.testing.assert_close(r.logps[row, :len(ref[row])], ref[row], atol=1e-5, rtol=0)


def test_micro_batches_do_not_change_greedy_results(model, tokenizer, prompts):
    params = SamplingParams(max_new_tokens=10, temperature=0, n=2)
    whole = HFEngine(model, tokenizer).generate(prompts, params)
    split = HFEngine(model, tokenizer, max_batch_size=4).generate(prompts, params)
    assert torch.equal(whole.completion_ids, split.completion_ids)
    assert torch.equal(whole.prompt_ids, split.prompt_ids)
    torch.testing.assert_close(whole.logps, split.logps, atol=1e-5, rtol=0)
    assert whole.text == split.text and whole.finish_reason == split.finish_reason


def test_absolute_position_model(tokenizer, prompts):
    """GPT-2 has absolute position embeddings (Llama's RoPE hides position offsets): left padding
    is right only if position ids follow the attention mask."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=103, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                       bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                       initializer_range=0.2)).eval()
    engine = HFEngine(model, tokenizer)
    r = engine.generate(prompts, SamplingParams(max_new_tokens=10, temperature=0.7, n=2, seed=0))
    for row, ref in enumerate(training_side_logps(model, r, 0.7)):
        torch.testing.assert_close(r.logps[row, :len(ref)], ref, atol=1e-5, rtol=0)
    greedy = engine.generate(prompts, SamplingParams(max_new_tokens=10, temperature=0))
    out = model.generate(input_ids=greedy.prompt_ids, attention_mask=greedy.prompt_mask, max_new_tokens=10,
                         do_sample=False, pad_token_id=0, eos_token_id=2)
    assert torch.equal(greedy.completion_ids, out[:, greedy.prompt_ids.shape[1]:])


# -- (c) n samples per prompt ------------------------------------------------------------------------

def test_n_samples_per_prompt(model, tokenizer, prompts):
    params = SamplingParams(max_new_tokens=8, n=4, seed=1)
    r = HFEngine(model, tokenizer).generate(prompts, params)
    check_invariants(r, params)
    assert len(r) == 12 and r.group_size == 4 and r.prompt_ids.shape == (12, len(prompts[-1]))
    assert r.prompt_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    for row in range(12):
        assert r.prompt_ids[row][r.prompt_mask[row].bool()].tolist() == prompts[row // 4]
    for group in range(3):
        assert len(set(r.text[4 * group:4 * group + 4])) > 1, "samples of one prompt should differ"


# -- (d) seeding -----------------------------------------------------------------------------------------

def test_seeded_sampling_is_reproducible(model, tokenizer, prompts):
    engine = HFEngine(model, tokenizer)
    first = engine.generate(prompts, SamplingParams(max_new_tokens=8, n=2, seed=7))
    again = engine.generate(prompts, SamplingParams(max_new_tokens=8, n=2, seed=7))
    other = engine.generate(prompts, SamplingParams(max_new_tokens=8, n=2, seed=8))
    assert torch.equal(first.completion_ids, again.completion_ids) and torch.equal(first.logps, again.logps)
    assert first.text == again.text
    assert first.text != other.text
    torch.manual_seed(3)  # seed=None follows the global torch RNG
    global_a = engine.generate(prompts, SamplingParams(max_new_tokens=8))
    torch.manual_seed(3)
    global_b = engine.generate(prompts, SamplingParams(max_new_tokens=8))
    assert global_a.text == global_b.text


# -- (e) finish reasons and masks ------------------------------------------------------------------------

def test_max_new_tokens_gives_length_and_full_mask(model, tokenizer, prompts):
    params = SamplingParams(max_new_tokens=5, temperature=0)
    r = HFEngine(model, tokenizer).generate(prompts, params)
    check_invariants(r, params)
    assert r.finish_reason == ["length"] * 3
    assert r.completion_ids.shape == (3, 5) and bool((r.completion_mask == 1).all())


def test_eos_ends_row_and_mask_covers_it(model, tokenizer, prompts):
    greedy = HFEngine(model, tokenizer).generate(prompts, SamplingParams(max_new_tokens=12, temperature=0))
    eos = int(greedy.completion_ids[0, 3])  # declare a token of row 0's greedy path to be EOS
    first = greedy.completion_ids[0].tolist().index(eos)
    params = SamplingParams(max_new_tokens=12, temperature=0)
    r = HFEngine(model, tokenizer, eos_token_ids=[eos]).generate(prompts, params)
    check_invariants(r, params)
    assert r.finish_reason[0] == "stop"
    assert r.completion_mask[0].tolist() == [1] * (first + 1) + [0] * (r.completion_ids.shape[1] - first - 1)
    assert r.completion_ids[0, :first + 1].tolist() == greedy.completion_ids[0, :first + 1].tolist()
    assert bool((r.completion_ids[0, first + 1:] == 0).all()) and bool((r.logps[0, first + 1:] == 0).all())
    assert r.text[0] == tokenizer.decode(greedy.completion_ids[0, :first], skip_special_tokens=True)


def test_real_eos_when_sampling(model, tokenizer, prompts):
    params = SamplingParams(max_new_tokens=16, n=8, seed=0)
    r = HFEngine(model, tokenizer).generate(prompts, params)
    check_invariants(r, params)
    stopped = [row for row, reason in enumerate(r.finish_reason) if reason == "stop"]
    assert stopped, "this seed samples EOS in some rows"
    for row in stopped:
        tokens = r.completion_ids[row][r.completion_mask[row].bool()].tolist()
        assert tokens[-1] == 2 and 2 not in tokens[:-1]
        assert r.text[row] == tokenizer.decode(tokens[:-1], skip_special_tokens=True)


# -- (f) stop strings ----------------------------------------------------------------------------------

def test_stop_string_ends_completion_and_is_kept(model, tokenizer, prompts):
    params = SamplingParams(max_new_tokens=16, temperature=0)
    plain = HFEngine(model, tokenizer).generate(prompts, params)
    stop = plain.text[0][4:6]
    expected = plain.text[0][:plain.text[0].index(stop) + len(stop)]
    r = HFEngine(model, tokenizer).generate(prompts, SamplingParams(max_new_tokens=16, temperature=0,
                                                                    stop=("never", stop)))
    check_invariants(r, SamplingParams(max_new_tokens=16, temperature=0))
    assert r.text[0] == expected and r.finish_reason[0] == "stop"
    kept = int(r.completion_mask[0].sum())  # the greedy path up to the token that completes the stop string
    assert r.completion_ids[0, :kept].tolist() == plain.completion_ids[0, :kept].tolist()
    assert tokenizer.decode(plain.completion_ids[0, :kept - 1], skip_special_tokens=True) == expected[:-1]
    for row in (1, 2):  # rows without the stop string are untouched
        if stop not in plain.text[row]:
            assert r.text[row] == plain.text[row] and r.finish_reason[row] == plain.finish_reason[row]


def test_stop_string_in_prompt_is_ignored(model, tokenizer, prompts):
    params = SamplingParams(max_new_tokens=8, temperature=0)
    plain = HFEngine(model, tokenizer).generate(prompts[:1], params)
    assert "+3" not in plain.text[0]
    r = HFEngine(model, tokenizer).generate(prompts[:1], SamplingParams(max_new_tokens=8, temperature=0,
                                                                        stop=("+3",)))
    assert r.text == plain.text and r.finish_reason == ["length"]


# -- (g) top-k / top-p limits --------------------------------------------------------------------------

def test_top_k_1_and_tiny_top_p_equal_greedy(model, tokenizer, prompts):
    engine = HFEngine(model, tokenizer)
    greedy = engine.generate(prompts, SamplingParams(max_new_tokens=10, temperature=0))
    top_k = engine.generate(prompts, SamplingParams(max_new_tokens=10, temperature=1.0, top_k=1, seed=0))
    top_p = engine.generate(prompts, SamplingParams(max_new_tokens=10, temperature=1.0, top_p=1e-6, seed=0))
    assert torch.equal(top_k.completion_ids, greedy.completion_ids)
    assert torch.equal(top_p.completion_ids, greedy.completion_ids)


# -- (h) the policy is used in place, in eval mode, and its mode is restored ---------------------------

@pytest.mark.parametrize("training", [True, False])
def test_train_eval_mode_restored(model, tokenizer, prompts, training):
    seen = []
    hook = model.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    model.train(training)
    try:
        r = HFEngine(model, tokenizer).generate(prompts, SamplingParams(max_new_tokens=3))
    finally:
        hook.remove()
        mode_after = model.training
        model.eval()
    assert seen and not any(seen)
    assert mode_after == training
    assert not r.logps.requires_grad


# -- (i) validation ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,error,match", [
    ({"max_new_tokens": 0}, ValueError, "max_new_tokens"),
    ({"max_new_tokens": 2.5}, ValueError, "max_new_tokens"),
    ({"temperature": -0.1}, ValueError, "temperature"),
    ({"temperature": float("nan")}, ValueError, "temperature"),
    ({"top_p": 0.0}, ValueError, "top_p"),
    ({"top_p": 1.5}, ValueError, "top_p"),
    ({"top_k": -1}, ValueError, "top_k"),
    ({"n": 0}, ValueError, "n must be"),
    ({"n": True}, ValueError, "n must be"),
    ({"seed": -1}, ValueError, "seed"),
    ({"stop": "\n"}, TypeError, "tuple of strings"),
    ({"stop": ("ok", "")}, ValueError, "non-empty"),
])
def test_invalid_sampling_params(kwargs, error, match):
    with pytest.raises(error, match=match):
        SamplingParams(**kwargs)


def test_sampling_params_accepts_a_stop_list():
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")


def test_invalid_engine_inputs(model, tokenizer, prompts):
    engine = HFEngine(model, tokenizer)
    params = SamplingParams(max_new_tokens=2)
    for bad, match in [([], "non-empty list"), ([[]], "prompt 0 is empty"),
                       ([[1, 500]], r"outside \[0, 103\)"), (["hello"], "prompt 0 must be a list"),
                       (prompts[0], "prompt 0 must be a list")]:
        with pytest.raises(ValueError, match=match):
            engine.generate(bad, params)
    with pytest.raises(TypeError, match="SamplingParams"):
        engine.generate(prompts, {"max_new_tokens": 2})
    with pytest.raises(ValueError, match="max_batch_size"):
        HFEngine(model, tokenizer, max_batch_size=0)


# -- the container ---------------------------------------------------------------------------------------

def test_engine_satisfies_protocol_and_rollouts_helpers(model, tokenizer, prompts):
    engine = HFEngine(model, tokenizer)
    assert isinstance(engine, RolloutEngine)
    r = engine.generate(prompts, SamplingParams(max_new_tokens=4, n=2, seed=0))
    moved = r.to("cpu")
    assert torch.equal(moved.logps, r.logps) and moved.text == r.text and moved.group_size == 2
    assert r.completion_lengths().tolist() == r.completion_mask.sum(-1).tolist()
    with pytest.raises(ValueError, match="logps"):
        Rollouts(prompt_ids=r.prompt_ids, prompt_mask=r.prompt_mask, completion_ids=r.completion_ids,
                 completion_mask=r.completion_mask, logps=r.logps[:, :1], finish_reason=r.finish_reason,
                 text=r.text, prompt_index=r.prompt_index)


def test_decode_texts_equals_batch_decode_and_falls_back(tokenizer, monkeypatch):
    """The Rust-backend fast path returns exactly what batch_decode returns (special tokens skipped),
    and tokenizers it does not cover (space clean-up on, no backend) go through batch_decode."""
    import copy

    from rlxf.rollout.sampling import decode_texts

    rng = torch.Generator().manual_seed(0)
    vocab = len(tokenizer)
    specials = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    lists = [torch.randint(0, vocab, (n,), generator=rng).tolist() + specials for n in (0, 1, 17, 64)]
    assert decode_texts(tokenizer, lists) == tokenizer.batch_decode(lists, skip_special_tokens=True)
    calls = []
    cleaning = copy.deepcopy(tokenizer)
    cleaning.clean_up_tokenization_spaces = True
    monkeypatch.setattr(type(cleaning), "batch_decode",
                        lambda self, ids, **kw: calls.append(len(ids)) or ["x"] * len(ids))
    assert decode_texts(cleaning, lists) == ["x"] * 4 and calls == [4]

    class Plain:                     # no Rust backend
        def batch_decode(self, ids, skip_special_tokens=False):
            return [f"{len(i)}:{skip_special_tokens}" for i in ids]

    assert decode_texts(Plain(), lists) == ["2:True", "3:True", "19:True", "66:True"]
