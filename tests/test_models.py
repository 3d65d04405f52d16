"""rlxf.models: load/save round trips, pad tokens, LoRA, references, reward models, devices/dtypes."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from rlxf.models import (Reference, apply_lora, ensure_pad_token, load_policy, load_reward_model,
                         load_tokenizer, resolve_device, resolve_dtype, reward_scores, save_pretrained,
                         token_logps)


def batch(lengths=(9, 6, 4), seed=0):
    """Right-padded random rows (pad id 0) and their attention mask, both [B, T]."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, n in enumerate(lengths):
        input_ids[i, :n] = torch.randint(3, 103, (n,), generator=gen)
        attention_mask[i, :n] = 1
    return input_ids, attention_mask


def hf_logits(path, input_ids, attention_mask):
    """Logits of the model at ``path`` loaded by plain transformers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask).logits


@pytest.fixture
def policy(tiny_random_model_dir):
    return load_policy(str(tiny_random_model_dir), device="cpu", dtype="float32")


def train_steps(model, input_ids, attention_mask, steps=3, lr=1e-2):
    """A few Adam steps raising the log-likelihood of the batch."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        loss = -token_logps(model, input_ids, attention_mask)[attention_mask[:, 1:].bool()].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


# --- loading and saving -------------------------------------------------------------------------

def test_save_load_round_trip_with_plain_transformers(policy, tokenizer, tmp_path):
    input_ids, attention_mask = batch()
    out = save_pretrained(policy, tokenizer, tmp_path / "final")
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert not list(out.glob("*.bin"))
    with torch.no_grad():
        expected = policy(input_ids=input_ids, attention_mask=attention_mask).logits
    assert torch.equal(hf_logits(out, input_ids, attention_mask), expected)
    # saving again replaces the stale directory; no temporary directories are left behind
    (out / "stale.txt").write_text("old")
    save_pretrained(policy, tokenizer, out)
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_failed_save_keeps_previous_checkpoint(policy, tokenizer, tmp_path, monkeypatch):
    out = save_pretrained(policy, tokenizer, tmp_path / "final")

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tokenizer, "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_pretrained(policy, tokenizer, out)
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_load_tokenizer_and_policy_defaults(tiny_random_model_dir):
    tokenizer = load_tokenizer(str(tiny_random_model_dir))
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 2
    model = load_policy(str(tiny_random_model_dir), pad_token_id=tokenizer.pad_token_id)
    assert model.device.type == resolve_device("auto").type
    assert next(model.parameters()).dtype == resolve_dtype("auto")
    assert model.config.pad_token_id == 0


def test_tokenizer_without_pad_uses_eos(tokenizer, caplog):
    tokenizer.pad_token = None
    with caplog.at_level(logging.WARNING, logger="rlxf.models"):
        assert ensure_pad_token(tokenizer) is False
    assert tokenizer.pad_token == tokenizer.eos_token and tokenizer.pad_token_id == 2
    assert "pad token" in caplog.text


def test_tokenizer_without_pad_or_eos_gets_new_token_and_model_resizes(tiny_random_model_dir):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(103)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core)
    assert tokenizer.pad_token is None and tokenizer.eos_token is None
    assert ensure_pad_token(tokenizer) is True
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id == 103 and len(tokenizer) == 104
    model = load_policy(str(tiny_random_model_dir), device="cpu", dtype="float32",
                        resize_to=len(tokenizer))
    assert model.get_input_embeddings().num_embeddings == 104
    input_ids = torch.tensor([[5, 7, 103, 103]])
    logits = model(input_ids=input_ids).logits
    assert logits.shape == (1, 4, 104)
    # never shrinks: a tokenizer smaller than the embedding table leaves it alone
    small = load_policy(str(tiny_random_model_dir), device="cpu", dtype="float32", resize_to=50)
    assert small.get_input_embeddings().num_embeddings == 103


def test_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_policy(str(tmp_path / "nope" / "model"), device="cpu")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_policy(str(tmp_path), device="cpu")


def test_unreachable_hub_is_a_clear_error(monkeypatch):
    from transformers import AutoModelForCausalLM

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and "
                      "couldn't find them in the cached files.")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", offline)
    with pytest.raises(OSError, match="offline or unreachable.*'tiny'"):
        load_policy("some-org/some-model", device="cpu")


def test_resolve_device_and_dtype():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cuda", "mps", "cpu")
    with pytest.raises(ValueError, match="not a device name"):
        resolve_device("gpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"available: \[.*'cpu'\]"):
            resolve_device("cuda")
    assert resolve_device("cpu") and resolve_dtype("bf16") == torch.bfloat16
    assert resolve_dtype("float32") == torch.float32 and resolve_dtype("fp16", "cpu") == torch.float16
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype(torch.bfloat16) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype 'fp8' is not supported"):
        resolve_dtype("fp8")


# --- LoRA and references ------------------------------------------------------------------------

def test_lora_trains_adapters_only_and_reference_stays_put(policy, tiny_random_model_dir):
    input_ids, attention_mask = batch()
    with torch.no_grad():
        base = token_logps(policy, input_ids, attention_mask)
    peft_model = apply_lora(policy, r=4, alpha=8)
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)

    reference = Reference.build(peft_model, "lora")
    before = reference.token_logps(input_ids, attention_mask)
    torch.testing.assert_close(before, base, rtol=0, atol=1e-6)
    peft_model.train()
    train_steps(peft_model, input_ids, attention_mask)
    after = reference.token_logps(input_ids, attention_mask)
    with torch.no_grad():
        policy_after = token_logps(peft_model, input_ids, attention_mask)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    assert (policy_after - base).abs().max() > 1e-2
    assert peft_model.training                              # the reference call restored train mode


def test_apply_lora_unknown_target_lists_linear_modules(policy):
    with pytest.raises(ValueError, match=r"\['c_attn'\] not found.*'q_proj'"):
        apply_lora(policy, target_modules=("c_attn",))


def test_lora_save_adapter_and_merged(policy, tokenizer, tmp_path):
    input_ids, attention_mask = batch()
    peft_model = apply_lora(policy, r=4)
    train_steps(peft_model, input_ids, attention_mask)
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(input_ids=input_ids, attention_mask=attention_mask).logits
    out = save_pretrained(peft_model, tokenizer, tmp_path / "final", merge_lora=True)
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    assert (out / "merged" / "model.safetensors").exists() and (out / "merged" / "tokenizer.json").exists()
    merged_config = json.loads((out / "merged" / "config.json").read_text())
    assert merged_config["model_type"] == "llama"
    torch.testing.assert_close(hf_logits(out / "merged", input_ids, attention_mask), expected,
                               rtol=1e-4, atol=1e-5)
    # the live model still has its adapters
    with torch.no_grad():
        again = peft_model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert torch.equal(again, expected)
    # an adapter directory loads back through load_policy (base + adapter)
    reloaded = load_policy(str(out), device="cpu", dtype="float32").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=input_ids, attention_mask=attention_mask).logits,
                                   expected, rtol=1e-4, atol=1e-5)


def test_copy_reference_is_frozen(policy):
    input_ids, attention_mask = batch()
    reference = Reference.build(policy, "copy")
    assert reference.model is not policy and not reference.model.training
    assert not any(p.requires_grad for p in reference.model.parameters())
    before = reference.token_logps(input_ids, attention_mask)
    assert before.grad_fn is None
    policy.train()
    train_steps(policy, input_ids, attention_mask)
    with torch.no_grad():
        policy_after = token_logps(policy, input_ids, attention_mask)
    torch.testing.assert_close(reference.token_logps(input_ids, attention_mask), before, rtol=0, atol=0)
    assert (policy_after - before).abs().max() > 1e-2


def test_reference_none_and_bad_modes(policy):
    input_ids, attention_mask = batch()
    reference = Reference.build(policy, "none")
    assert not reference.enabled
    with pytest.raises(RuntimeError, match="reference-free"):
        reference.token_logps(input_ids, attention_mask)
    with pytest.raises(ValueError, match="needs a LoRA policy"):
        Reference.build(policy, "lora")
    with pytest.raises(ValueError, match="not one of"):
        Reference.build(policy, "shared")


# --- reward models ------------------------------------------------------------------------------

def test_reward_model_from_causal_lm_reads_last_real_token(tiny_random_model_dir):
    reward_model = load_reward_model(str(tiny_random_model_dir), device="cpu", dtype="float32")
    assert reward_model.score.out_features == 1 and reward_model.config.pad_token_id == 0
    input_ids, attention_mask = batch()
    with torch.no_grad():
        scores = reward_scores(reward_model, input_ids, attention_mask)
        assert scores.shape == (3,) and scores.dtype == torch.float32
        # extra right padding changes nothing
        extra_ids = torch.cat([input_ids, torch.zeros(3, 5, dtype=torch.long)], dim=1)
        extra_mask = torch.cat([attention_mask, torch.zeros(3, 5, dtype=torch.long)], dim=1)
        torch.testing.assert_close(reward_scores(reward_model, extra_ids, extra_mask), scores,
                                   rtol=0, atol=1e-6)
        # each row scores as it does alone, and as transformers' own pooling (pad id 0) reads it
        for i, n in enumerate(attention_mask.sum(-1).tolist()):
            alone = reward_scores(reward_model, input_ids[i:i + 1, :n], attention_mask[i:i + 1, :n])
            torch.testing.assert_close(alone, scores[i:i + 1], rtol=0, atol=1e-6)
        hf = reward_model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]
        torch.testing.assert_close(hf, scores, rtol=0, atol=1e-6)


def test_reward_model_pad_equal_to_eos_still_reads_last_real_token(tiny_random_model_dir):
    reward_model = load_reward_model(str(tiny_random_model_dir), device="cpu", dtype="float32",
                                     pad_token_id=2)
    input_ids = torch.tensor([[1, 20, 30, 2, 2, 2], [1, 40, 2, 2, 2, 2]])   # EOS then EOS-as-pad
    attention_mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])
    with torch.no_grad():
        scores = reward_scores(reward_model, input_ids, attention_mask)
        alone = reward_scores(reward_model, input_ids[:1, :4], attention_mask[:1, :4])
    torch.testing.assert_close(scores[:1], alone, rtol=0, atol=1e-6)


def test_reward_model_lora_keeps_score_head_trainable(tiny_random_model_dir):
    reward_model = load_reward_model(str(tiny_random_model_dir), device="cpu", dtype="float32")
    peft_model = apply_lora(reward_model, r=4, task_type="SEQ_CLS")
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert any("score" in name for name in trainable)
    assert all("lora_" in name or "score" in name for name in trainable)
    input_ids, attention_mask = batch()
    scores = reward_scores(peft_model, input_ids, attention_mask)
    scores.sum().backward()
    score_grads = [p.grad for name, p in peft_model.named_parameters() if "score" in name and p.requires_grad]
    assert score_grads and all(g is not None and g.abs().sum() > 0 for g in score_grads)


def test_compile_layers_finds_the_decoder_stack(tiny_random_model_dir):
    """compile_layers wraps exactly the decoder layers (the compile itself happens lazily, on CUDA runs)."""
    from transformers import AutoModelForCausalLM

    from rlxf.models import compile_layers

    model = AutoModelForCausalLM.from_pretrained(str(tiny_random_model_dir))
    assert compile_layers(model) == model.config.num_hidden_layers
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
    assert model.lm_head._compiled_call_impl is None
