"""The PPO-RLHF recipe and the value model, end to end on a small model.

Learning on the embedded tiny model (SFT → RM → PPO) is in test_learning.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlxf.cli import main
from rlxf.config import ConfigError, build_config
from rlxf.train import FAULT_ENV
from rlxf.recipes.ppo import PPOConfig
from rlxf.reporting import read_metrics

FAST = {"task_size": 64, "eval_size": 16, "eval_generate": 16, "batch_size": 8, "group_size": 1,
        "max_new_tokens": 12, "progress": False, "log_every": 1, "threads": 1, "ppo_epochs": 2, "mini_batches": 2}


def _flags(values: dict) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in values.items()]


def test_value_model_reads_the_state_before_each_completion_token(tiny_random_model_dir):
    from rlxf.models import load_reward_model
    from rlxf.models.value import ValueModel, values_for_completions

    rm = load_reward_model(str(tiny_random_model_dir), dtype="float32", device="cpu")
    torch.nn.init.normal_(rm.score.weight)
    critic = ValueModel.from_sequence_classifier(rm)
    ids = torch.tensor([[0, 0, 5, 6, 7, 8, 9, 0], [0, 4, 5, 6, 7, 8, 9, 10]])
    att = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1, 1, 1]])
    P = 4
    values = values_for_completions(critic, ids, att, P)                       # [2, 4]
    assert values.shape == (2, 4)
    for b in range(2):
        for t in range(4):
            upto = slice(0, P + t)   # the prompt and the first t completion tokens
            keep = att[b, upto].bool()
            seq = ids[b, upto][keep].unsqueeze(0)
            want = rm(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[0, 0]
            assert values[b, t].item() == pytest.approx(want.item(), rel=1e-4, abs=1e-5), (b, t)


def test_value_head_shares_the_policy_body_and_starts_at_zero(tiny_random_model_dir):
    from rlxf.models import load_policy
    from rlxf.models.value import ValueModel

    policy = load_policy(str(tiny_random_model_dir), dtype="float32", device="cpu")
    critic = ValueModel.value_head(policy)
    assert critic.body is policy.model
    assert critic.own_parameters() == list(critic.head.parameters())
    ids = torch.randint(3, 100, (2, 6))
    assert torch.equal(critic(ids, torch.ones_like(ids)), torch.zeros(2, 6))


@pytest.mark.parametrize("values,match", [
    ({"value_model": "reward_model"}, "reward-model"),
    ({"value_model": "policy", "reward": "verifiable", "mini_batches": 3}, "mini-batches"),
    ({"value_model": "policy", "reward": "verifiable", "kl_coef": -1}, "kl_coef -1.0 is out of range"),
])
def test_bad_values_are_config_errors(values, match):
    with pytest.raises(ConfigError, match=match):
        build_config(PPOConfig, values)


def test_clip_range_follows_the_policy_loss():
    base = {"value_model": "policy", "reward": "verifiable"}
    assert (build_config(PPOConfig, base).eps, build_config(PPOConfig, base).eps_high) == (0.2, 0.2)
    cfg = build_config(PPOConfig, {**base, "policy_loss": "gspo_token"})
    assert (cfg.eps, cfg.eps_high) == (3e-4, 4e-4)
    cfg = build_config(PPOConfig, {**base, "eps": 0.1})
    assert (cfg.eps, cfg.eps_high) == (0.1, 0.1)
    cfg = build_config(PPOConfig, {**base, "policy_loss": "cispo"})
    assert (cfg.eps, cfg.eps_high) == (1.0, 4.0)
    with pytest.raises(ConfigError, match="eps_low must lie in \\[0, 1\\)"):
        build_config(PPOConfig, {**base, "eps": 1.0})


@pytest.mark.report
@pytest.mark.parametrize("extra", [
    {"reward": "reward_model", "value_model": "reward_model"},
    {"reward": "verifiable", "value_model": "policy", "policy_loss": "gspo_token"},
    {"reward": "verifiable", "value_model": "head", "kl_target": 0.5, "group_size": 2},
])
def test_ppo_runs_and_writes_the_run_files(extra, tiny_random_model_dir, tmp_path):
    out = tmp_path / "run"
    if extra.get("reward") == "reward_model":
        extra = {**extra, "reward_model": tiny_random_model_dir}   # a causal-LM checkpoint gets a fresh head
    argv = ["ppo", *_flags({**FAST, "model": tiny_random_model_dir, "output_dir": out, "max_steps": 2, **extra})]
    assert main(argv) == 0
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "report.png", "report.html"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recipe"] == "ppo" and summary["start/reward"] is not None
    train = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    for key in ("score", "kl", "kl_coef", "non_score_reward", "loss/policy", "loss/value", "clip_fraction",
                "eos_fraction", "completion_length", "entropy"):
        assert key in train[-1] and train[-1][key] is not None, key
    if extra.get("kl_target"):
        assert train[1]["kl_coef"] != train[0]["kl_coef"]   # the adaptive controller moved β
    else:
        assert train[1]["kl_coef"] == train[0]["kl_coef"] == 0.05


def test_resume_after_kill_equals_uninterrupted_run(tiny_random_model_dir, tmp_path):
    common = {**FAST, "model": tiny_random_model_dir, "max_steps": 4, "save_every": 2, "eval_every": 2,
              "reward": "verifiable", "value_model": "policy", "kl_target": 0.5}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main(["ppo", *_flags({**common, "output_dir": straight})]) == 0
    cmd = [sys.executable, "-m", "rlxf", "ppo", *_flags({**common, "output_dir": killed})]
    env = {**os.environ, FAULT_ENV: "3", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 137, proc.stderr[-2000:]
    assert main(["ppo", *_flags({**common, "output_dir": killed, "resume": "true"})]) == 0

    def comparable(run):
        skip = ("time", "sample_tokens_per_s", "train_tokens_per_s")
        return [{k: v for k, v in r.items() if k not in skip} for r in read_metrics(run / "metrics.jsonl")]

    a, b = comparable(straight), comparable(killed)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in x:
            if isinstance(x[k], float):
                assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-6), (x["step"], k)
            else:
                assert x[k] == y[k], (x["step"], k)
