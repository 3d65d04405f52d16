"""FSDP2 sharding (``--fsdp``, rlxf.runtime.fsdp; docs/distributed.md#sharded-training-fsdp2).

Fast checks run in this process on a one-process gloo group: sharded log-probs and gradients equal
the plain model's, gathered weights, the frozen reference copy and the full export equal the
model's. The slow ones start torchrun: two processes with ``--fsdp`` give the one-process DPO and
GRPO numbers, a run killed mid-way and resumed (on two processes, or on one without torchrun from
the two-process sharded checkpoint) gives the uninterrupted metrics, and ``final/`` is a plain
Hugging Face model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlxf.cli import main
from rlxf.reporting import read_metrics

SRC = str(Path(__file__).parents[1] / "src")
FAST = {"task_size": 96, "eval_size": 32, "eval_batch_size": 32, "progress": False, "log_every": 1,
        "warmup_steps": 2, "threads": 1}
GRPO = {"model": "tiny", "task_size": 64, "eval_size": 16, "eval_generate": 16, "batch_size": 4, "group_size": 4,
        "progress": False, "log_every": 1, "threads": 1, "beta": 0.04, "ppo_epochs": 2,
        "dp_rollouts": "rank0", "device": "cpu", "lr": 3e-4}
NOT_COMPARED = ("time", "tokens_per_s", "sample_tokens_per_s", "train_tokens_per_s")


def _flags(values: dict) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in values.items()]


def _torchrun(args: list[str], nproc: int = 2, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "rlxf", *args]
    full_env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=300)


def _assert_same_metrics(one: Path, two: Path, skip: tuple[str, ...] = ()) -> int:
    """Every logged float of run ``two`` equals run ``one``'s (rel 1e-4) except ``skip``; returns how
    many were compared."""
    a, b = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
    compared, differ = 0, []
    for ra, rb in zip(a, b):
        for key, value in ra.items():
            if isinstance(value, float) and key not in NOT_COMPARED + skip:
                if rb[key] != pytest.approx(value, rel=1e-4, abs=1e-6):
                    differ.append((ra["step"], ra["split"], key, value, rb[key]))
                compared += 1
    assert not differ, differ
    return compared


# -- in this process: a one-process gloo group -------------------------------------------------------

@pytest.fixture
def group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=103, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=True, pad_token_id=0)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def test_sharded_logps_gradients_gathered_weights_and_exports_equal_the_plain_model(group):
    """The sharded model's log-probs and gradients (body and head called apart, inside the root's
    hooks), its gathered generation, its frozen copy and its full export equal the plain model's."""
    from rlxf.models import token_logps
    from rlxf.runtime import fsdp

    plain, sharded = _tiny_llama(), _tiny_llama()
    fsdp.shard(sharded, torch.device("cpu"))
    assert fsdp.is_sharded(sharded) and not fsdp.is_sharded(plain)
    ids = torch.randint(3, 100, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0                                               # left padding in one row
    expected = token_logps(plain, ids, mask)
    got = token_logps(sharded, ids, mask)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    expected.sum().backward()
    got.sum().backward()
    grads = {n: p.grad.full_tensor() for n, p in sharded.named_parameters()}
    for name, param in plain.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-5, atol=1e-6)
    reference = fsdp.frozen_copy(sharded)
    assert not any(p.requires_grad for p in reference.parameters())
    with torch.no_grad():
        torch.testing.assert_close(token_logps(reference, ids, mask), expected.detach(), rtol=1e-5, atol=1e-6)
    with fsdp.gathered():
        assert not any(type(p).__name__ == "DTensor" for p in sharded.parameters())   # whole, plain weights
        out = sharded.generate(ids[1:2, :4], max_new_tokens=5, do_sample=False)
    assert type(next(sharded.parameters())).__name__ == "DTensor"                      # sharded again after
    torch.testing.assert_close(out, plain.generate(ids[1:2, :4], max_new_tokens=5, do_sample=False))
    full = fsdp.full_state_dict(sharded)
    assert "lm_head.weight" not in full                                                # tied: stored once
    for name, tensor in plain.state_dict().items():
        if name != "lm_head.weight":
            torch.testing.assert_close(full[name], tensor)


def test_models_of_an_ended_process_group_are_not_gathered(tmp_path):
    """A sharded model left over from an earlier run in the same process (its group destroyed) is
    skipped by gathered(), which would otherwise all-gather over a dead group."""
    import torch.distributed as dist

    from rlxf.runtime import fsdp

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'a'}", rank=0, world_size=1)
    stale = fsdp.shard(_tiny_llama(), torch.device("cpu"))
    dist.destroy_process_group()
    with fsdp.gathered():
        pass
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'b'}", rank=0, world_size=1)
    try:
        current = fsdp.shard(_tiny_llama(), torch.device("cpu"))
        with fsdp.gathered():
            assert type(next(current.parameters())).__name__ != "DTensor"     # gathered
            assert type(next(stale.parameters())).__name__ == "DTensor"       # left alone
    finally:
        dist.destroy_process_group()


def test_plain_models_pass_straight_through_and_unknown_layouts_are_refused():
    from rlxf.runtime import fsdp

    model = _tiny_llama()
    assert fsdp.call(model, lambda x: x + 1, torch.ones(2)).tolist() == [2.0, 2.0]
    with fsdp.gathered():
        pass
    assert fsdp.full_state_dict(model) is None and fsdp.export_state_dict(model) is None
    assert len(fsdp.decoder_layers(model)) == 2
    with pytest.raises(ValueError, match="_no_split_modules"):
        fsdp.decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="drop --fsdp-cpu-offload"):
        fsdp.shard(model, torch.device("cpu"), cpu_offload=True)


@pytest.mark.parametrize("argv,message", [
    (["dpo", "--fsdp-cpu-offload"], "add --fsdp"),
    (["dpo", "--fsdp", "--lora-r=8"], "LoRA"),
    (["dpo", "--fsdp", "--compile"], "--compile"),
    (["grpo", "--fsdp", "--engine=static"], "--engine hf"),
])
def test_unsupported_combinations_are_refused_before_anything_is_written(argv, message, tmp_path, capsys):
    assert main([*argv, f"--output-dir={tmp_path / 'run'}"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("recipe", ["dpo", "grpo"])
def test_fsdp_needs_torchrun(recipe, tmp_path, capsys, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert main([recipe, "--fsdp", f"--output-dir={tmp_path / 'run'}"]) == 2
    assert "torchrun --standalone --nproc-per-node N" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_recipes_with_a_second_trained_model_refuse_fsdp(monkeypatch):
    from rlxf.train.rundir import FSDP_REFUSED, check_fsdp_launch

    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", "29500")):
        monkeypatch.setenv(name, value)
    assert FSDP_REFUSED == ("ppo", "cooper")
    for recipe in FSDP_REFUSED:
        with pytest.raises(ValueError, match=f"`{recipe}` does not support --fsdp"):
            check_fsdp_launch(recipe, ("dpo", recipe))
    check_fsdp_launch("dpo", ("dpo",))
    with pytest.raises(ValueError, match="`cai` does not support --fsdp"):
        check_fsdp_launch("cai", ("dpo",))


# -- torchrun: two processes against one --------------------------------------------------------------

@pytest.mark.slow
def test_dpo_on_two_sharded_processes_killed_and_resumed_on_one_gives_the_one_process_run(
        tiny_random_model_dir, tmp_path):
    """2 processes with --fsdp, killed after step 2 (its sharded step-2 checkpoint complete), then
    resumed by one process without torchrun: every logged metric equals the uninterrupted
    one-process run's, and final/ loads in plain transformers with its weights."""
    common = {**FAST, "model": str(tiny_random_model_dir), "batch_size": 4, "grad_accum": 2, "max_steps": 3,
              "eval_every": 3, "save_every": 1, "keep_checkpoints": 0}
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["dpo", *_flags({**common, "output_dir": one})]) == 0
    proc = _torchrun(["dpo", "--fsdp", *_flags({**common, "output_dir": two})],
                     env={"RLXF_FAULT_EXIT_AFTER_STEP": "2"})
    assert proc.returncode != 0
    step2 = two / "checkpoints" / "step-2"
    assert (step2 / "sharded").is_dir() and (step2 / "state.json").exists()
    assert not (two / "checkpoints" / "step-3").exists() and not (two / "summary.json").exists()
    assert main(["dpo", *_flags({**common, "output_dir": two, "resume": True})]) == 0
    assert _assert_same_metrics(one, two) >= 12
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(two / "final")
    expected = load_file(one / "final" / "model.safetensors")
    for name, tensor in model.state_dict().items():
        if name in expected:
            torch.testing.assert_close(tensor, expected[name], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_grpo_on_two_sharded_processes_killed_and_resumed_gives_the_one_process_run(tmp_path):
    """GRPO with a reference copy (β > 0) and two updates a step: process 0 samples (--dp-rollouts
    rank0) on the gathered weights, both train on their shares; killed after step 1 and resumed on
    two processes, the run logs the one-process numbers (rewards, losses, KL, held-out accuracy)."""
    common = {**GRPO, "max_steps": 2, "eval_every": 2, "save_every": 1}
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["grpo", *_flags({**common, "output_dir": one})]) == 0
    killed = _torchrun(["grpo", "--fsdp", *_flags({**common, "output_dir": two})],
                       env={"RLXF_FAULT_EXIT_AFTER_STEP": "1"})
    assert killed.returncode != 0 and (two / "checkpoints" / "step-1" / "sharded").is_dir()
    proc = _torchrun(["grpo", "--fsdp", *_flags({**common, "output_dir": two, "resume": True})])
    assert proc.returncode == 0, proc.stderr[-3000:]
    # per-process statistics of each share's tokens, averaged over the processes as in replicated data
    # parallel (docs/distributed.md, "Logged metrics"): not the whole batch's, so not compared
    share_stats = ("reward/std", "clip_fraction", "kl", "entropy")
    assert _assert_same_metrics(one, two, skip=share_stats) >= 20
    train = [r for r in read_metrics(one / "metrics.jsonl") if r["split"] == "train"]
    assert any(r["reward/mean"] > 0 for r in train) and any(r["grad_norm"] > 0 for r in train)   # not trivial
    summary = json.loads((two / "summary.json").read_text())
    assert summary["data_parallel"]["processes"] == 2
    shutil.rmtree(tmp_path)
