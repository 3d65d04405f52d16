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


def test_the_warm_up_runs_once_and_is_skipped_on_resume(tmp_path, monkeypatch):
    """``--resume`` from a checkpoint (which holds the warmed-up weights) does not warm up again."""
    from rlxf.recipes import env_warmup

    calls = []
    monkeypatch.setattr(env_warmup, "sft_warmup", lambda *a, **k: calls.append(1) or {"steps": 3})
    monkeypatch.setattr("rlxf.recipes.online.evaluate_greedy", lambda *a, **k: {"task_accuracy": 0.0})
    cfg = build_config(GRPOConfig, {"dataset": "task:multiplication", "env": "calculator", "warmup_sft_steps": 3,
                                    "task_size": 8, "resume": True})
    from rlxf.zoo.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    _, info = env_warmup.env_engine(cfg, None, tokenizer, object(), [], None, tmp_path)
    assert calls == [1] and info["before"] == {"task_accuracy": 0.0}
    (tmp_path / "checkpoints" / "step-4").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-4" / "state.json").write_text("{}")
    engine, info = env_warmup.env_engine(cfg, None, tokenizer, object(), [], None, tmp_path)
    assert calls == [1] and info == {} and engine.max_turns == cfg.max_turns
