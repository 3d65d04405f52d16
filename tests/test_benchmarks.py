"""The GPU benchmark scripts on the CPU, so the one GPU run is not the first run: benchmarks/vs_trl.py
--quick (every workload end to end on a tiny config, TRL variants too when TRL is installed),
real_sizes.py and notebook_configs.py on their small shapes, and real_sizes' memory-peak reader."""

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


def _load(name: str):
    path = SCRIPT.with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peak_breakdown_finds_what_was_live_at_the_peak():
    """real_sizes.peak_breakdown replays a memory-snapshot trace: the peak is the most bytes live at
    once (not the sum of all allocations), blocks freed before it do not count, and live blocks are
    grouped by their innermost rlxf frame."""
    breakdown = _load("real_sizes").peak_breakdown

    def frame(path, line, name):
        return {"filename": path, "line": line, "name": name}

    head = [frame("/x/torch/nn/functional.py", 10, "linear"), frame("/repo/src/rlxf/models/logprobs.py", 42, "head")]
    ref = [frame("/repo/src/rlxf/train/reference.py", 7, "precompute")]
    weights = [frame("/site/transformers/modeling_utils.py", 99, "load")]   # no rlxf frame: innermost frame
    MB = 10**6
    trace = [
        {"action": "alloc", "addr": 1, "size": 100 * MB, "frames": weights},
        {"action": "alloc", "addr": 2, "size": 500 * MB, "frames": ref},         # freed before the peak
        {"action": "free_requested", "addr": 2, "size": 500 * MB},
        {"action": "free_completed", "addr": 2, "size": 500 * MB},               # the same free, once
        {"action": "alloc", "addr": 3, "size": 300 * MB, "frames": head},
        {"action": "alloc", "addr": 4, "size": 250 * MB, "frames": head},
        {"action": "segment_alloc", "addr": 9, "size": 10_000 * MB},              # not a block
        {"action": "free_completed", "addr": 3, "size": 300 * MB},
        {"action": "alloc", "addr": 5, "size": 50 * MB, "frames": []},
    ]
    out = breakdown({"device_traces": [trace]}, top=5)
    assert out["peak_gb"] == 0.65 and out["live_blocks"] == 3
    sites = {s["site"]: (s["gb"], s["blocks"]) for s in out["sites"]}
    assert sites == {"rlxf/models/logprobs.py:42 head": (0.55, 2), "modeling_utils.py:99 load": (0.1, 1)}
    assert breakdown({"device_traces": []}) == {"peak_gb": 0.0, "live_blocks": 0, "sites": []}


@pytest.mark.slow
def test_real_sizes_and_notebook_configs_run_their_wiring_on_the_cpu(tmp_path):
    """The GPU scripts of the real-size runs, on their small CPU shapes: each child process runs, and
    the figures the GPU tables are read from are written (device time is not spent on a broken script)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rs, nb = tmp_path / "rs", tmp_path / "nb"
    subprocess.run([sys.executable, str(SCRIPT.with_name("real_sizes.py")), "--out", str(rs), "--quick", "--cpu",
                    "--only", "^rlxf (dpo lora|engine lora)$"], check=True, env=env, capture_output=True)
    variants = json.loads((rs / "results.json").read_text())["variants"]
    assert set(variants) == {"rlxf dpo lora", "rlxf engine lora"}, variants
    assert variants["rlxf dpo lora"]["s_per_step"] > 0 and len(variants["rlxf dpo lora"]["step_s"]) == 2
    assert set(variants["rlxf engine lora"]["settings"]) == {"fused", "unfused"}
    assert all(r["tokens_per_s"] > 0 for r in variants["rlxf engine lora"]["settings"].values())
    assert (rs / "engine-profile-fused.txt").read_text().strip()
    subprocess.run([sys.executable, str(SCRIPT.with_name("notebook_configs.py")), "--out", str(nb), "--quick", "--cpu",
                    "--steps", "3", "--only", "^dpo zephyr-7b qlora$"], check=True, env=env, capture_output=True)
    runs = json.loads((nb / "results.json").read_text())["runs"]
    assert set(runs) == {"dpo zephyr-7b qlora"}, runs
    run = runs["dpo zephyr-7b qlora"]
    assert run["exit"] == 0 and run["s_per_step"] > 0 and run["merged"]
    assert not (nb / "runs" / "dpo-zephyr-7b-qlora" / "final" / "merged").exists()   # freed once checked
