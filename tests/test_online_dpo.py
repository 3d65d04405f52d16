"""rlxf online-dpo: pair labelling, config checks, a run end to end (learning: test_learning_online.py)."""

from __future__ import annotations

import json

import pytest
import torch

from rlxf.cli import main
from rlxf.config import ConfigError, build_config
from rlxf.configs.online_dpo import OnlineDPOConfig
from rlxf.recipes.online_dpo import label_pairs


def test_the_higher_reward_is_chosen_and_ties_and_missing_rewards_are_dropped():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.2, 0.9, 3.0, 1.0])
    valid = torch.tensor([True] * 8 + [False, True])
    chosen, rejected, kept = label_pairs(rewards, valid)
    assert kept.tolist() == [True, True, False, True, False]
    assert chosen.tolist() == [0, 3, 7] and rejected.tolist() == [1, 2, 6]


def test_config_checks():
    assert build_config(OnlineDPOConfig, {}).group_size == 2
    with pytest.raises(ConfigError, match="group-size must be 2"):
        build_config(OnlineDPOConfig, {"group_size": 4})
    with pytest.raises(ConfigError, match="--reward d_rlaif"):
        build_config(OnlineDPOConfig, {"judge": "local:tiny"})
    cfg = build_config(OnlineDPOConfig, {"judge": "local:tiny", "reward": "d_rlaif"})
    assert cfg.reward == "d_rlaif"


def test_online_dpo_runs_and_writes_the_run_files(tiny_random_model_dir, tmp_path):
    out = tmp_path / "run"
    argv = ["online-dpo", "--model", str(tiny_random_model_dir), "--task-size", "64", "--eval-size", "16",
            "--eval-generate", "16", "--batch-size", "4", "--max-new-tokens", "12", "--max-steps", "2",
            "--progress", "false", "--log-every", "1", "--threads", "1", "--output-dir", str(out)]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recipe"] == "online-dpo" and summary["steps"] == 2
    assert summary["start/task_accuracy"] is not None
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    assert all(k in train[-1] for k in ("reward/mean", "pairs_kept", "loss", "groups_sampled"))
