"""``rlxf grpo --env``: options, and runs end to end with each registered policy loss, a user's
environment file and the static engine. Learning is in test_learning_tools.py."""

from __future__ import annotations

import json

import pytest

from rlxf.cli import main
from rlxf.config import ConfigError, build_config
from rlxf.losses.registry import policy_loss_names
from rlxf.recipes.grpo import GRPOConfig
from rlxf.reporting import read_metrics

FAST = {"model": "tiny", "dataset": "task:multiplication", "task_size": 64, "eval_size": 16, "eval_generate": 16,
        "batch_size": 2, "group_size": 2, "max_new_tokens": 16, "max_episode_tokens": 48, "progress": False,
        "threads": 1, "max_steps": 1}

USER_ENV = '''
class Nudge:
    """Answers every turn with 'ok'; pays 0.25 a turn; ends after two turns."""
    def reset(self, row):
        return [{"role": "user", "content": row["prompt"]}]
    def step(self, turn):
        self.turns = getattr(self, "turns", 0) + 1
        return "ok", 0.25, self.turns >= 2
'''


def _flags(values: dict) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in values.items()]


@pytest.mark.parametrize("values, match", [
    ({"warmup_sft_steps": 5}, "needs --env"),
    ({"env": "nope"}, "not a built-in environment"),
    ({"env": "rlxf.envs:EnvError"}, "no reset or step method"),
    ({"env": "tests/no_such_env.py:Env"}, "not found"),
])
def test_bad_env_options_are_config_errors(values, match):
    with pytest.raises(ConfigError, match=match):
        build_config(GRPOConfig, values)


def test_a_warm_up_needs_demonstrations(tmp_path):
    path = tmp_path / "env.py"
    path.write_text(USER_ENV)
    assert build_config(GRPOConfig, {"env": f"{path}:Nudge"}).env_label == f"{path}:Nudge"
    with pytest.raises(ConfigError, match="no demonstration"):
        build_config(GRPOConfig, {"env": f"{path}:Nudge", "warmup_sft_steps": 3})


@pytest.mark.slow
@pytest.mark.parametrize("policy_loss", policy_loss_names())
def test_calculator_run_with_each_policy_loss(policy_loss, tmp_path):
    out = tmp_path / "run"
    argv = ["grpo", *_flags({**FAST, "env": "calculator", "warmup_sft_steps": 2, "policy_loss": policy_loss,
                             "ppo_epochs": 2, "beta": 0.04, "output_dir": out})]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["env"]["env"] == "calculator" and summary["env"]["sft_warmup"]["steps"] == 2
    assert summary["env"]["sft_warmup"]["before"]["task_accuracy"] == 0.0
    rows = read_metrics(out / "metrics.jsonl")
    train = [r for r in rows if r["split"] == "train"][-1]
    evals = [r for r in rows if r["split"] == "eval"]
    assert {"turns", "tool_calls", "kl", "loss", "reward/env"} <= set(train) and train["loss"] is not None
    assert "tool_calls" in evals[-1] and "task_accuracy" in evals[-1]


@pytest.mark.slow
def test_a_user_environment_file_pays_its_rewards_on_the_static_engine(tmp_path):
    path = tmp_path / "nudge_env.py"
    path.write_text(USER_ENV)
    out = tmp_path / "run"
    assert main(["grpo", *_flags({**FAST, "env": f"{path}:Nudge", "engine": "static", "output_dir": out})]) == 0
    train = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"][-1]
    assert train["turns"] > 1 and 0 < train["reward/env"] <= 0.5   # 0.25 a turn, at most two turns
