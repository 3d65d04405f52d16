"""Acceptance: GRPO with a calculator tool teaches the embedded tiny model 3-digit multiplication
(docs/methods/tools.md), on a smaller budget than ``configs/grpo_calculator_tiny.yaml``.

The config's settings (the same 32-step SFT warm-up on tool-call demonstrations, batches of 16
prompts × 8 episodes, lr 1e-3, one thread) for 10 GRPO steps instead of 40, evaluated on 64 held-out
problems at the start (after the warm-up) and the end. Measured 2026-12-07 on the 2-core CPU
(torch 2.13.0): held-out accuracy 0.453 → 0.656 (+20 points), 43 s of CPU time for the whole run (the
wall time is that on an idle machine; the machine was shared when measured). Before the warm-up the
accuracy is 0: the tiny model cannot multiply in its head and has never seen the tool.
The full run's curve (0.42 → 0.8+ in 40 steps) is in the docs page.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rlxf.config import build_config, load_yaml
from rlxf.configs.registry import get_recipe

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "grpo_calculator_tiny.yaml"


def test_grpo_with_a_calculator_learns_multiplication(tmp_path):
    entry = get_recipe("grpo")
    values = {**load_yaml(CONFIG), "max_steps": 10, "eval_every": 0, "eval_generate": 64, "progress": False,
              "output_dir": str(tmp_path / "run")}
    summary = entry.train_fn()(build_config(entry.config_class(), values)).summary
    warmup = summary["env"]["sft_warmup"]
    assert warmup["before"]["task_accuracy"] == 0.0 and warmup["before"]["tool_calls"] == 0.0
    # measured: 0.453 after the warm-up → 0.656 after 10 GRPO steps; asserts ≥ start + 0.10
    assert summary["final/task_accuracy"] >= summary["start/task_accuracy"] + 0.10, summary["eval_final"]
