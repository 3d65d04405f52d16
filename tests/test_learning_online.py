"""Acceptance: the online recipes learn on the embedded tiny model (greedy held-out accuracy on
200 arithmetic problems, which starts at 0.30). Each run takes about a minute on a 2-core CPU.

The measured curves behind these bounds are in docs/index.md ("Measured results").
"""

from __future__ import annotations

import importlib

import pytest

from rlxf.cli import RECIPES, _config_class
from rlxf.config import build_config

pytestmark = pytest.mark.slow

BUDGET = {"model": "tiny", "dataset": "task:arithmetic", "batch_size": 32, "lr": 3e-4, "max_steps": 30,
          "eval_every": 0, "progress": False}


def _run(recipe: str, tmp_path, **overrides) -> dict:
    cfg = build_config(_config_class(recipe), {**BUDGET, "output_dir": str(tmp_path / recipe), **overrides})
    return importlib.import_module(RECIPES[recipe][0]).train(cfg).summary


@pytest.mark.parametrize("recipe", ["grpo", "dr_grpo", "dapo", "rloo"])
def test_every_grpo_variant_improves_held_out_accuracy(recipe, tmp_path):
    summary = _run(recipe, tmp_path)
    assert summary["start/task_accuracy"] == pytest.approx(0.30, abs=0.01)
    assert summary["final/task_accuracy"] >= summary["start/task_accuracy"] + 0.06, summary["eval_final"]
