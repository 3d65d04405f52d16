"""Acceptance: each objective learns the built-in preference task on the embedded tiny model.

task:arithmetic with mixed pairs (correct vs wrong, concise vs verbose, or both), 16 pairs a step,
scored on 512 held-out pairs: implicit-reward accuracy for DPO/RPO, log-odds accuracy for ORPO,
pairwise accuracy for the reward model. Each run draws only the training pairs its steps use
(``task_size`` = steps × 16), since DPO/RPO precompute reference log-probs for every training pair.

Budgets and values measured 2026-12-07 on a 2-core CPU (torch 2.13.0), final held-out accuracy
(the same with 1 or 2 torch threads):

    DPO   100 steps  0.916   at lr 3e-4 (at the default 2e-4: 0.912 at 150 steps, 0.902 at 120)
    RPO   150 steps  0.918   (120 steps: 0.896; 100 steps at lr 3e-4: 0.865, both below the 0.90 bound)
    ORPO  100 steps  0.951   (start 0.918; 0.953 at 150 steps; 0.939 at 60, too close to its bound)
    RM     40 steps  0.830   (start 0.525; 0.846 at 45 steps, 0.826 at 60, 0.832 at 150 from 4000 pairs)

A run takes 30-90 s on a 2-core CPU.
"""

from __future__ import annotations

import pytest

from rlxf.config import build_config
from rlxf.configs.registry import get_recipe

pytestmark = pytest.mark.slow

BUDGET = {"model": "tiny", "dataset": "task:arithmetic", "batch_size": 16, "max_steps": 150, "task_size": 2400,
          "eval_every": 0, "progress": False}


def _run(recipe: str, tmp_path, **overrides) -> dict:
    entry = get_recipe(recipe)
    cfg = build_config(entry.config_class(), {**BUDGET, "output_dir": str(tmp_path / recipe), **overrides})
    return entry.train_fn()(cfg).summary


# DPO reaches the bound in 100 steps at lr 3e-4 (0.916); RPO there stops at 0.865, so it keeps 150 at 2e-4
DPO_SHORT = {"max_steps": 100, "task_size": 1600, "lr": 3e-4}


@pytest.mark.parametrize("recipe, overrides", [("dpo", DPO_SHORT), ("rpo", {})], ids=["dpo", "rpo"])
def test_dpo_and_rpo_reach_90_percent_implicit_reward_accuracy(recipe, overrides, tmp_path):
    # measured: DPO 0.916, margin 0 → 6.01, conciseness 1.00, correctness 0.76 (100 steps, lr 3e-4);
    #           RPO 0.918, margin 0 → 0.67, conciseness 0.97, correctness 0.80 (150 steps, lr 2e-4)
    summary = _run(recipe, tmp_path, **overrides)
    assert summary["start/accuracy"] == pytest.approx(0.5, abs=0.02)  # policy == reference at step 0
    assert summary["final/accuracy"] >= 0.90, summary["eval_final"]
    assert summary["final/rewards/margin"] > summary["start/rewards/margin"] + 0.3  # RPO bounds it by design
    final = summary["eval_final"]
    assert final["accuracy/conciseness"] >= 0.95 and final["accuracy/correctness"] >= 0.65


def test_orpo_raises_log_odds_accuracy_above_90_percent(tmp_path):
    # measured at 100 steps: accuracy 0.918 → 0.951, log-odds ratio 1.26 → 1.65
    summary = _run("orpo", tmp_path, max_steps=100, task_size=1600)
    # the tiny model's own likelihood already prefers most chosen answers; ORPO widens the odds ratio
    assert summary["final/accuracy"] >= 0.90
    assert summary["final/accuracy"] >= summary["start/accuracy"] + 0.02
    assert summary["final/log_odds_ratio"] > summary["start/log_odds_ratio"] + 0.2


def test_simpo_widens_the_length_normalised_margin_without_a_reference(tmp_path):
    # measured 2026-12-07 on a shared 2-core CPU (35 s): on these 256 pairs accuracy 0.934 → 0.961, log-odds
    # ratio 1.35 → 2.03 (60 steps on 512 pairs, docs/methods/dpo.md: 0.918 → 0.949, 1.26 → 3.05)
    summary = _run("dpo", tmp_path, loss="simpo", max_steps=30, task_size=480, eval_size=256)
    assert summary["final/accuracy"] >= summary["start/accuracy"] + 0.015
    assert summary["final/log_odds_ratio"] > summary["start/log_odds_ratio"] + 0.4


def test_kto_separates_desirable_from_undesirable_completions(tmp_path):
    # measured 2026-12-07 on a shared 2-core CPU (57 s): on these 128 pairs (256 rows) accuracy 0.5 → 0.660,
    # pair accuracy 0.5 → 0.898 (60 steps on 512 pairs, docs/methods/kto.md: accuracy 0.741)
    summary = _run("kto", tmp_path, max_steps=30, task_size=240, eval_size=128)
    assert summary["start/accuracy"] == pytest.approx(0.5)  # policy == reference: every reward ties
    assert summary["final/accuracy"] >= 0.62
    assert summary["final/pair_accuracy"] >= 0.75


def test_reward_model_learns_style_pairs_but_not_yet_arithmetic_correctness(tmp_path):
    """Measured limitation, kept visible: in this budget the RM separates concise from verbose
    answers perfectly, but judging arithmetic correctness from the last token stays at chance
    (0.51; docs/methods/reward-model.md), so overall held-out accuracy is 0.830, below the 0.90
    target. Measured at 40 steps: 0.525 → 0.830, style pairs 1.00, correctness 0.506."""
    summary = _run("rm", tmp_path, max_steps=40, task_size=640)
    final = summary["eval_final"]
    assert summary["final/accuracy"] >= summary["start/accuracy"] + 0.2
    assert final["accuracy/conciseness"] >= 0.95 and final["accuracy/both"] >= 0.95
    assert summary["final/accuracy"] >= 0.78
