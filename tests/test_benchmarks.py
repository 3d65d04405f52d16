"""benchmarks/vs_trl.py --quick: every workload runs end to end on a tiny config on CPU and writes
its results (TRL variants too when TRL is installed), so the one GPU run is not the first run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "vs_trl.py"


@pytest.mark.slow
def test_vs_trl_quick(tmp_path):
    spec = importlib.util.spec_from_file_location("vs_trl", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        results = module.main(["--quick", "--cpu", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert not results["errors"], results["errors"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert {"rlxf", "rlxf (grad ckpt)"} <= set(saved["dpo"])
    assert {"rlxf StaticEngine", "rlxf HFEngine", "HF generate dynamic", "HF generate static"} <= set(saved["decode"])
    assert "rlxf" in saved["grpo"]
    assert saved["meta"]["weights"].startswith("random-init")
    for section in ("dpo", "decode", "grpo"):
        for name, row in saved[section].items():
            assert row.get("pairs_per_s", row.get("tok_per_s", row.get("step_s"))) > 0, (section, name)
    markdown = (tmp_path / "results.md").read_text()
    assert "## Ratios" in markdown and "DPO pairs/s: rlxf / " in markdown
