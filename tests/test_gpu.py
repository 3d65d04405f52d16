"""GPU-only checks (skipped on CPU; CI has no GPU). Run on a CUDA machine with `pytest -m gpu`."""

from __future__ import annotations

import math

import pytest
import torch

from rlxf.config import build_config
from rlxf.configs.registry import get_recipe

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("recipe", ["dpo", "orpo", "rm", "sft", "grpo", "ppo"])
def test_recipe_trains_on_cuda_with_bf16_autocast(recipe, tiny_random_model_dir, tmp_path):
    online = get_recipe(recipe).kind == "online"
    extra = ({"reward": "verifiable", "value_model": "policy"} if recipe == "ppo" else {}) if online else {}
    cfg = build_config(get_recipe(recipe).config_class(), {
        "model": str(tiny_random_model_dir), "output_dir": str(tmp_path / recipe), "device": "cuda",
        "max_steps": 3, "task_size": 64, "eval_size": 32, "batch_size": 8, "progress": False, **extra})
    summary = get_recipe(recipe).train_fn()(cfg).summary
    assert summary["peak_memory_mb"] > 0
    assert math.isfinite(summary["final/reward"] if online else summary["final/loss"])


def test_lora_adapters_over_a_bf16_base_run_their_matmuls_in_bf16_on_cuda(tiny_random_model_dir, tmp_path):
    """A LoRA DPO step on CUDA runs under bf16 autocast: peft's fp32 adapters multiply in bf16 (as a
    transformers Trainer with bf16=True runs them), and the adapters stay fp32 for the optimiser."""
    from rlxf.models import apply_lora, load_policy
    from rlxf.train.common import autocast_context

    class Cfg:
        autocast = True

    model = apply_lora(load_policy(str(tiny_random_model_dir), device="cuda"), r=4)
    seen = []
    lora_a = next(m for n, m in model.named_modules() if n.endswith("lora_A.default"))
    lora_a.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    ids = torch.randint(3, 100, (2, 17), device="cuda")
    with autocast_context(Cfg, model):
        model(input_ids=ids).logits.float().mean().backward()
    assert seen == [torch.bfloat16]
    assert lora_a.weight.dtype == torch.float32 and lora_a.weight.grad.dtype == torch.float32


def test_token_logps_cuda_matches_cpu(tiny_random_model_dir):
    from transformers import AutoModelForCausalLM

    from rlxf.models import token_logps

    model = AutoModelForCausalLM.from_pretrained(tiny_random_model_dir)
    ids = torch.randint(3, 100, (4, 33))
    mask = torch.ones_like(ids)
    cpu = token_logps(model, ids, mask, chunk_size=16)
    gpu = token_logps(model.cuda(), ids.cuda(), mask.cuda(), chunk_size=16).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-4)


def test_static_engine_cuda_graph_matches_hf_engine():
    """The captured decode step replays the same greedy tokens as HFEngine, and sees in-place weight updates."""
    from rlxf.models import load_policy
    from rlxf.rollout import HFEngine, SamplingParams, StaticEngine
    from rlxf.zoo.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    model = load_policy("tiny", dtype="float32", device="cuda").eval()
    prompts = [tokenizer(p)["input_ids"] for p in ("12+34=", "7=", "hello world!")]
    params = SamplingParams(max_new_tokens=24, temperature=0.0, n=2)
    engine = StaticEngine(model, tokenizer)
    out = engine.generate(prompts, params)
    assert engine.stats["graph_captures"] == 2  # 23 decodes: a graph of 8 steps and one of 1 step
    ref = HFEngine(model, tokenizer).generate(prompts, params)
    assert torch.equal(out.completion_ids.cpu(), ref.completion_ids.cpu())
    torch.testing.assert_close(out.logps, ref.logps, rtol=1e-3, atol=1e-3)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(1.5)  # in place: the captured graph must read the new values
    again = engine.generate(prompts, params)
    assert engine.stats["graph_captures"] == 2
    ref = HFEngine(model, tokenizer).generate(prompts, params)
    assert torch.equal(again.completion_ids.cpu(), ref.completion_ids.cpu())


def test_static_engine_device_sampling_in_graph_is_seeded_and_exact():
    """Sampling inside the captured graph: a seed reproduces the draws, another seed changes them, the
    caller's CUDA random state is untouched, and the first token follows softmax(z/τ)."""
    from rlxf.models import load_policy
    from rlxf.rollout import SamplingParams, StaticEngine
    from rlxf.zoo.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    model = load_policy("tiny", dtype="float32", device="cuda").eval()
    prompt = [tokenizer("12+34=")["input_ids"]]
    engine = StaticEngine(model, tokenizer)
    params = SamplingParams(max_new_tokens=6, temperature=1.5, n=4096, seed=3)
    state = torch.cuda.get_rng_state()
    out = engine.generate(prompt, params)
    assert torch.equal(torch.cuda.get_rng_state(), state)
    assert engine.stats["device_sampling_calls"] == 1
    assert torch.equal(engine.generate(prompt, params).completion_ids, out.completion_ids)
    other = engine.generate(prompt, SamplingParams(max_new_tokens=6, temperature=1.5, n=4096, seed=4))
    assert not torch.equal(other.completion_ids, out.completion_ids)
    with torch.no_grad():
        logits = model(torch.tensor(prompt, device="cuda")).logits[0, -1].double()
    counts = torch.bincount(out.completion_ids[:, 0], minlength=logits.numel()).double()
    frequencies = counts.cpu() / counts.sum().cpu()
    probs = torch.softmax(logits.cpu() / 1.5, -1)
    # total variation is about 0.4·Σ sqrt(p(1-p)/n) for exact draws; allow 2.5 times that, and check
    # that the wrong temperature (1) is rejected by the same bound
    bound = (probs * (1 - probs) / counts.sum().cpu()).sqrt().sum()
    assert 0.5 * (frequencies - probs).abs().sum() < bound
    assert 0.5 * (frequencies - torch.softmax(logits.cpu(), -1)).abs().sum() > bound


def test_fused_head_gradients_on_cuda_match_the_checkpointed_head(tiny_random_model_dir):
    """The fused head's compiled element-wise kernels give the checkpointed path's values and grads."""
    from transformers import AutoModelForCausalLM

    from rlxf.models import sequence_logps, token_logps

    ids = torch.randint(3, 100, (4, 40), device="cuda")
    mask = torch.ones_like(ids)
    labels = torch.zeros(4, 39, dtype=torch.long, device="cuda")
    labels[:, 10:] = 1
    results = []
    for fused in (True, False):
        model = AutoModelForCausalLM.from_pretrained(tiny_random_model_dir).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logps = token_logps(model, ids, mask, label_mask=labels, temperature=0.8, chunk_size=64,
                                fused_head=fused)
        sequence_logps(logps, labels).sum().backward()
        results.append((logps.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=2e-3)
    for name, grad in results[0][1].items():
        other = results[1][1][name]
        relative = float((grad - other).norm() / other.norm().clamp(min=1e-12))
        assert relative < 0.02, f"{name}: relative gradient difference {relative:.4f} (bf16 rounding is ~0.004)"


@pytest.mark.parametrize("attention", ["sdpa", "matmul", "triton"])
def test_compiled_static_engine_greedy_matches_hf_engine(attention):
    from rlxf.models import load_policy
    from rlxf.rollout import HFEngine, SamplingParams, StaticEngine
    from rlxf.zoo.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    model = load_policy("tiny", dtype="float32", device="cuda").eval()
    prompts = [tokenizer(p)["input_ids"] for p in ("12+34=", "7=", "hello world!")]
    params = SamplingParams(max_new_tokens=24, temperature=0.0, n=2)
    out = StaticEngine(model, tokenizer, compile=True, decode_attention=attention).generate(prompts, params)
    ref = HFEngine(model, tokenizer).generate(prompts, params)
    assert torch.equal(out.completion_ids.cpu(), ref.completion_ids.cpu())
    torch.testing.assert_close(out.logps, ref.logps, rtol=1e-3, atol=1e-3)


def test_static_engine_stops_early_without_a_host_sync_per_check():
    """Every token is an EOS: all rows finish at the first token. The asynchronous all-finished check
    stops the loop long before max_new_tokens, and the result is the one-token completion."""
    from rlxf.models import load_policy
    from rlxf.rollout import SamplingParams, StaticEngine
    from rlxf.zoo.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    model = load_policy("tiny", dtype="float32", device="cuda").eval()
    vocab = model.get_input_embeddings().num_embeddings
    engine = StaticEngine(model, tokenizer, eos_token_ids=list(range(vocab)), sync_every=16)
    prompts = [tokenizer(p)["input_ids"] for p in ("12+34=", "7=")]
    out = engine.generate(prompts, SamplingParams(max_new_tokens=200, temperature=1.0, n=3, seed=0))
    assert out.completion_ids.shape[1] == 1 and out.finish_reason == ["stop"] * 6
    state = next(iter(engine._states.values()))
    assert int(state.step_index) <= 33      # stopped at the second check (33 steps), not at 200
