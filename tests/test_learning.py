"""Acceptance: each objective learns the built-in preference task on the embedded tiny model.

Held-out (eval split) preference accuracy must reach >= 90% and rise clearly above its start:
implicit-reward accuracy for DPO/RPO, log-odds accuracy for ORPO, pairwise accuracy for the RM.
Budgets are those of the demo (a minute or less each on a 2-core CPU).
"""

from __future__ import annotations

import importlib

import pytest

from rlxf.cli import RECIPES, _config_class
from rlxf.config import build_config

pytestmark = pytest.mark.slow

BUDGET = {"model": "tiny", "dataset": "task:arithmetic", "batch_size": 16, "eval_every": 0, "progress": False,
          "task_size": 2000, "eval_size": 256}


def _run(recipe: str, tmp_path, **overrides) -> dict:
    cfg = build_config(_config_class(recipe), {**BUDGET, "output_dir": str(tmp_path / recipe), **overrides})
    return importlib.import_module(RECIPES[recipe][0]).train(cfg).summary


@pytest.mark.parametrize("recipe,overrides", [
    ("dpo", {"max_steps": 60}),
    ("rpo", {"max_steps": 60}),
    ("orpo", {"max_steps": 60}),
    ("rm", {"max_steps": 60}),
])
def test_objective_reaches_90_percent_held_out_accuracy(recipe, overrides, tmp_path):
    summary = _run(recipe, tmp_path, **overrides)
    start, final = summary["start/accuracy"], summary["final/accuracy"]
    assert final >= 0.90, summary
    assert final - start >= 0.2, summary
