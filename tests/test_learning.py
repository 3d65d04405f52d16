"""Acceptance: each objective learns the built-in preference task on the embedded tiny model.

The demo budget (150 steps of 16 pairs, task:arithmetic with mixed pairs: correct vs wrong,
concise vs verbose, or both) on held-out pairs. Implicit-reward accuracy for DPO/RPO, log-odds
accuracy for ORPO, pairwise accuracy for the reward model. Each run takes about a minute on a
2-core CPU.
"""

from __future__ import annotations

import importlib

import pytest

from rlxf.cli import RECIPES, _config_class
from rlxf.config import build_config

pytestmark = pytest.mark.slow

BUDGET = {"model": "tiny", "dataset": "task:arithmetic", "batch_size": 16, "max_steps": 150, "eval_every": 0,
          "progress": False}


def _run(recipe: str, tmp_path, **overrides) -> dict:
    cfg = build_config(_config_class(recipe), {**BUDGET, "output_dir": str(tmp_path / recipe), **overrides})
    return importlib.import_module(RECIPES[recipe][0]).train(cfg).summary


@pytest.mark.parametrize("recipe", ["dpo", "rpo"])
def test_dpo_and_rpo_reach_90_percent_implicit_reward_accuracy(recipe, tmp_path):
    summary = _run(recipe, tmp_path)
    assert summary["start/accuracy"] == pytest.approx(0.5, abs=0.02)  # policy == reference at step 0
    assert summary["final/accuracy"] >= 0.90, summary["eval_final"]
    assert summary["final/rewards/margin"] > summary["start/rewards/margin"] + 0.3  # RPO bounds it by design
    final = summary["eval_final"]
    assert final["accuracy/conciseness"] >= 0.95 and final["accuracy/correctness"] >= 0.65


def test_orpo_raises_log_odds_accuracy_above_90_percent(tmp_path):
    summary = _run("orpo", tmp_path)
    # the tiny model's own likelihood already prefers most chosen answers; ORPO widens the odds ratio
    assert summary["final/accuracy"] >= 0.90
    assert summary["final/accuracy"] >= summary["start/accuracy"] + 0.02
    assert summary["final/log_odds_ratio"] > summary["start/log_odds_ratio"] + 0.2


def test_reward_model_learns_style_pairs_but_not_yet_arithmetic_correctness(tmp_path):
    """Measured limitation, kept visible: in this budget the RM separates concise from verbose
    answers perfectly, but judging arithmetic correctness from the last token stays near chance
    (docs/methods/reward-model.md), so overall held-out accuracy is ~0.83, below the 0.90 target."""
    summary = _run("rm", tmp_path)
    final = summary["eval_final"]
    assert summary["final/accuracy"] >= summary["start/accuracy"] + 0.2
    assert final["accuracy/conciseness"] >= 0.95 and final["accuracy/both"] >= 0.95
    assert summary["final/accuracy"] >= 0.78
