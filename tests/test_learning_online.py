"""Acceptance: the online recipes learn on the embedded tiny model (greedy held-out accuracy on
200 arithmetic problems, which starts at 0.30).

20 steps of 32 prompts at a constant lr 3e-4, at most 32 new tokens a completion (the recipe
default is 48; 32 costs about a quarter less time a run): each run takes about a minute of one
CPU core. Held-out accuracy by step, measured 2026-12-07 on a 2-core CPU
(torch 2.13.0, one thread a run), evaluating every 5 steps (evaluation does not change the
training run):

    step              0     5     10    15    20
    grpo              0.300 0.285 0.310 0.370 0.415
    dr_grpo           0.300 0.275 0.320 0.365 0.380
    dapo              0.300 0.290 0.330 0.370 0.380
    rloo              0.300 0.265 0.305 0.365 0.380
    gspo (β 0)        0.300 0.285 0.345 0.390 0.445
    reinforce_pp      0.300 0.265 0.305 0.370 0.385
    online-dpo        0.300 0.310 0.335 0.380 0.405
    cispo (48, β 0)   0.300 0.285 0.365 0.355 0.395

At step 20 every run is 8-14.5 points up; the tests assert +6 points (+5 for online DPO), above
the ±3.5-point noise of a 200-problem eval. GSPO and CISPO run without the KL term (β 0, as their
papers do; with β 0.04 they end at 0.425 and 0.400). CISPO keeps 48 new tokens: with 32 (and
β 0.04) it ends at 0.335 (40: 0.355), below its bound. At step 15 the GRPO variants are only
6.5-7 points up, so 20 steps is the shortest budget that keeps a margin. The longer curves are
in docs/index.md ("Measured results").
"""

from __future__ import annotations

import pytest

from rlxf.config import build_config
from rlxf.configs.registry import get_recipe

pytestmark = pytest.mark.slow

BUDGET = {"model": "tiny", "dataset": "task:arithmetic", "batch_size": 32, "lr": 3e-4, "max_steps": 20,
          "max_new_tokens": 32, "eval_every": 0, "progress": False}


def _run(recipe: str, tmp_path, **overrides) -> dict:
    entry = get_recipe(recipe)
    cfg = build_config(entry.config_class(), {**BUDGET, "output_dir": str(tmp_path / recipe), **overrides})
    return entry.train_fn()(cfg).summary


@pytest.mark.parametrize("recipe", ["grpo", "dr_grpo", "dapo", "rloo"])
def test_every_grpo_variant_improves_held_out_accuracy(recipe, tmp_path):
    summary = _run(recipe, tmp_path)
    assert summary["start/task_accuracy"] == pytest.approx(0.30, abs=0.01)
    # measured at step 20: grpo 0.415, dr_grpo 0.380, dapo 0.380, rloo 0.380; asserts ≥ start + 0.06
    assert summary["final/task_accuracy"] >= summary["start/task_accuracy"] + 0.06, summary["eval_final"]


@pytest.mark.parametrize("overrides", [{"policy_loss": "gspo", "mini_batches": 4, "beta": 0.0},
                                       {"policy_loss": "cispo", "loss_agg": "token-mean", "mini_batches": 4, "max_new_tokens": 48,
                                        "beta": 0.0},
                                       {"advantage": "reinforce_pp_baseline"}],
                         ids=["gspo", "cispo", "reinforce_pp"])
def test_new_policy_losses_and_reinforce_pp_improve_held_out_accuracy(overrides, tmp_path):
    # the GRPO budget above with each new loss (four mini-batch updates per rollout batch, so the
    # ratios leave 1; no KL term, as in the GSPO and CISPO papers, which also skips the reference
    # pass) or REINFORCE++-baseline advantages; docs/methods/grpo.md has the 60-step figures
    summary = _run("grpo", tmp_path, **overrides)
    assert summary["final/task_accuracy"] >= summary["start/task_accuracy"] + 0.06, summary["eval_final"]


def test_online_dpo_improves_held_out_accuracy_with_the_verifier(tmp_path):
    # two samples per prompt, the verifier picks the chosen one; 20 steps of 32 prompts
    summary = _run("online-dpo", tmp_path)
    assert summary["start/task_accuracy"] == pytest.approx(0.30, abs=0.01)
    assert summary["final/task_accuracy"] >= summary["start/task_accuracy"] + 0.05, summary["eval_final"]
