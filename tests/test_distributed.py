"""Data parallel under torchrun (gloo on the CPU): two processes give the one-process run's numbers
(offline recipes) or train bit-identical copies on their shares of the prompts (GRPO family), and
errors stop every process with one message instead of a hang (rlxf.runtime.distributed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlxf.cli import main
from rlxf.reporting import read_metrics
from rlxf.runtime import distributed

FAST = {"task_size": 96, "eval_size": 32, "eval_batch_size": 32, "progress": False, "log_every": 1,
        "warmup_steps": 2, "threads": 1}
SRC = str(Path(__file__).parents[1] / "src")


def _flags(values: dict) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in values.items()]


def _torchrun(args: list[str], nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "rlxf", *args]
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("recipe,extra", [("dpo", {"batch_size": 4, "grad_accum": 2})])
def test_two_processes_give_the_one_process_run(recipe, extra, tiny_random_model_dir, tmp_path):
    """Same global batch: each process takes half of every micro-batch, gradients are averaged, so the
    logged losses and metrics, the eval and the final weights equal the one-process run's. (``rm`` gave
    the same by hand; every fit recipe goes through this loop, and CI time is short.)"""
    common = {**FAST, **extra, "model": str(tiny_random_model_dir), "max_steps": 3, "eval_every": 3}
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([recipe, *_flags({**common, "output_dir": one})]) == 0
    proc = _torchrun([recipe, *_flags({**common, "output_dir": two})])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done. Report") == 1                      # rank 0 speaks for the run

    def rows(run):
        return [{k: v for k, v in r.items() if k not in ("time", "tokens_per_s")} for r in read_metrics(run / "metrics.jsonl")]

    a, b = rows(one), rows(two)
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for key, value in ra.items():
            if isinstance(value, float):
                assert rb[key] == pytest.approx(value, rel=1e-4, abs=1e-5), (ra["step"], ra["split"], key)
    summary = json.loads((two / "summary.json").read_text())
    assert summary["data_parallel"]["processes"] == 2
    assert summary["data_parallel"]["rows_per_process"] == extra["batch_size"] // 2
    from safetensors.torch import load_file

    wa, wb = load_file(one / "final" / "model.safetensors"), load_file(two / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-5)


def test_errors_stop_every_process_with_one_message(tiny_random_model_dir, tmp_path):
    """An occupied output dir under torchrun: rank 0's error reaches every process, is printed once, and
    nothing hangs. (A recipe without data parallel and an indivisible batch are refused earlier, from
    the environment alone: test_launch_checks_read_the_environment.)"""
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "metrics.jsonl").write_text('{"step": 1}\n')
    proc = _torchrun(["dpo", *_flags({**FAST, "model": tiny_random_model_dir, "batch_size": 8, "max_steps": 1,
                                      "output_dir": busy})], timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("already holds a run") == 1, proc.stderr[-2000:]  # raised on rank 0, re-raised on 1
    assert (busy / "metrics.jsonl").read_text() == '{"step": 1}\n'           # nothing the user had is lost


def test_launch_checks_read_the_environment(monkeypatch):
    from rlxf.configs.registry import recipe_names

    DP = recipe_names(data_parallel=True)  # noqa: N806
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.check_launch("grpo", 3, supported=DP) == 1 and not distributed.active()
    assert distributed.init("cpu") is None
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert distributed.check_launch("dpo", 8, supported=DP) == 4
    with pytest.raises(ValueError, match="multiple of the 4 processes"):
        distributed.check_launch("orpo", 6, supported=DP)
    assert distributed.check_launch("ppo", 8, supported=DP) == 4 and distributed.check_launch("cooper", 8, supported=DP) == 4
    with pytest.raises(ValueError, match="`cool-rlhf` does not run data-parallel"):
        distributed.check_launch("cool-rlhf", 8, supported=DP)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not an integer"):
        distributed.check_launch("dpo", 8, supported=DP)


_EXIT_SCRIPT = """
import atexit, sys
from pathlib import Path
from rlxf.runtime import distributed

out = Path(sys.argv[1])

class Finalised:
    def __init__(self, path):
        self.path = path

    def __del__(self):
        self.path.write_text("yes")

KEEP = Finalised(out / "finalised")      # collected only by interpreter finalisation
atexit.register(lambda: (out / "atexit").write_text("yes"))
distributed._joined = sys.argv[2] == "joined"
print("unflushed", end="")               # stays in the buffer unless flushed
distributed.exit_process(3)
sys.exit(5)
"""


@pytest.mark.parametrize("joined", [True, False])
def test_a_process_that_joined_a_group_exits_without_finalisation(joined, tmp_path):
    """Gloo's threads can abort a finalising interpreter after a successful run; a joined process
    runs its atexit handlers, flushes its output and ends with its code before finalisation. One
    that never joined a group exits the ordinary way."""
    proc = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT, str(tmp_path), "joined" if joined else "no"],
                          env={**os.environ, "PYTHONPATH": SRC}, capture_output=True, text=True, timeout=120)
    assert proc.stdout == "unflushed", proc.stderr
    assert (tmp_path / "atexit").exists()
    assert proc.returncode == (3 if joined else 5)
    assert (tmp_path / "finalised").exists() is not joined


def test_gradient_buckets_keep_one_dtype_and_every_tensor(monkeypatch):
    monkeypatch.setattr(distributed, "_BUCKET_BYTES", 64)
    grads = [torch.zeros(10), torch.zeros(3, dtype=torch.float64), torch.zeros(20), torch.zeros(2),
             torch.zeros(1, dtype=torch.float64)]
    buckets = distributed._buckets(grads)
    assert sorted(id(g) for b in buckets for g in b) == sorted(id(g) for g in grads)
    assert all(len({g.dtype for g in b}) == 1 for b in buckets)
    assert all(sum(g.numel() * g.element_size() for g in b[:-1]) < 64 for b in buckets)
    with torch.no_grad():   # one process: a no-op that leaves the gradients as they were
        p = torch.nn.Parameter(torch.ones(3))
        p.grad = torch.full((3,), 2.0)
        distributed.average_gradients([p])
        assert torch.equal(p.grad, torch.full((3,), 2.0))


# -- the GRPO family ---------------------------------------------------------------------------------

GRPO_FAST = {"task_size": 64, "eval_size": 16, "eval_generate": 16, "batch_size": 4, "group_size": 4,
             "max_new_tokens": 12, "progress": False, "log_every": 1, "threads": 1}


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_rank_normalisers_make_the_averaged_gradient_the_whole_batch_gradient(loss_agg, tiny_random_model_dir):
    """What each GRPO rank does: its share of the rows, token-mean divided by (all ranks' tokens / W),
    sequence modes by its own row count; the mean of the ranks' gradients is the one-process gradient."""
    from rlxf.config import build_config
    from rlxf.models import load_policy
    from rlxf.recipes.grpo import GRPOConfig
    from rlxf.recipes.grpo_step import policy_loss_terms

    model = load_policy(str(tiny_random_model_dir), dtype="float32", device="cpu")
    cfg = build_config(GRPOConfig, {"loss_agg": loss_agg, "beta": 0.0, "max_new_tokens": 8})
    torch.manual_seed(0)
    N, P, C, W = 8, 4, 5, 2
    mask = torch.ones(N, C)
    mask[0, 2:] = 0
    mask[5, 1:] = 0                                    # the two halves hold different token counts
    batch = {"input_ids": torch.randint(3, 100, (N, P + C)), "attention_mask": torch.ones(N, P + C, dtype=torch.long),
             "mask": mask, "advantages": torch.randn(N), "prompt_len": P, "old_logps": None, "ref_logps": None}

    def grad(rows, units):
        model.zero_grad()
        part = {k: (v[rows] if torch.is_tensor(v) else v) for k, v in batch.items()}
        policy_loss_terms(model, part, cfg, units_total=units)[0].backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    whole = grad(torch.arange(N), float(mask.sum()) if loss_agg == "token-mean" else float(N))
    shares = [torch.arange(r * N // W, (r + 1) * N // W) for r in range(W)]
    units = [float(mask.sum()) / W if loss_agg == "token-mean" else float(len(s)) for s in shares]
    averaged = sum(grad(s, u) for s, u in zip(shares, units)) / W
    torch.testing.assert_close(averaged, whole, rtol=1e-4, atol=1e-7)


def test_grpo_on_two_processes_trains_with_identical_copies(tiny_random_model_dir, tmp_path):
    """Each process samples its share of the step's prompts; the run ends with bit-identical copies
    (the recipe checks this and would fail), one set of files, and summed sample counts."""
    out = tmp_path / "grpo"
    proc = _torchrun(["grpo", *_flags({**GRPO_FAST, "model": tiny_random_model_dir, "output_dir": out,
                                       "max_steps": 2, "device": "cpu"})])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data_parallel"] == {"processes": 2, "prompts_per_process": 2,
                                        "peak_memory_mb_by_rank": summary["data_parallel"]["peak_memory_mb_by_rank"]}
    train = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    assert all(r["groups_sampled"] == 4 for r in train)          # 2 groups on each of 2 processes
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    assert summary["final/task_accuracy"] is not None


def test_grpo_settings_that_need_the_whole_batch_are_refused(tiny_random_model_dir, tmp_path, monkeypatch):
    from rlxf.config import build_config
    from rlxf.recipes.grpo import DAPOConfig, GRPOConfig, data_parallel_limits
    from rlxf.train.online import combine_rank_metrics

    assert data_parallel_limits(build_config(GRPOConfig, {})) is None
    assert data_parallel_limits(build_config(DAPOConfig, {})) is None   # dynamic sampling draws in lockstep
    assert "--sampler aps" in data_parallel_limits(build_config(GRPOConfig, {"sampler": "aps"}))
    monkeypatch.setenv("WORLD_SIZE", "2")                   # refused before any process group is joined
    assert main(["dapo", "--sampler=aps", f"--model={tiny_random_model_dir}", f"--output-dir={tmp_path / 'd'}"]) == 2
    assert not (tmp_path / "d").exists()
    combined = combine_rank_metrics([
        {"loss": 1.0, "ratio_max": 1.5, "groups_sampled": 2, "_sample_tokens": 10, "_sample_seconds": 1.0,
         "_train_tokens": 30, "_train_seconds": 2.0, "accuracy": 0.5},
        {"loss": 3.0, "ratio_max": 1.2, "groups_sampled": 2, "_sample_tokens": 14, "_sample_seconds": 2.0,
         "_train_tokens": 30, "_train_seconds": 3.0}])
    assert combined["loss"] == 2.0 and combined["ratio_max"] == 1.5 and combined["groups_sampled"] == 4
    assert combined["accuracy"] == 0.5 and combined["sample_tokens_per_s"] == 12.0
    assert combined["train_tokens_per_s"] == 20.0


# -- PPO and COOPER: process 0 samples (--dp-rollouts rank0), every process trains on its share ---------

def _metric_rows(run: Path) -> list[dict]:
    return read_metrics(run / "metrics.jsonl")


@pytest.mark.parametrize("recipe,extra", [
    ("ppo", {"reward": "verifiable", "value_model": "policy", "batch_size": 4, "group_size": 2, "mini_batches": 2,
             "ppo_epochs": 2, "kl_target": 1.0}),
    ("cooper", {"batch_size": 4, "group_size": 4, "cooper_pretrain_steps": 4, "cooper_pretrain_batch_size": 8,
                "cooper_eval_size": 8, "beta": 0.01}),
    ("dapo", {"batch_size": 4, "group_size": 4, "temperature": 1.5}),   # dynamic sampling, decided on process 0
])
def test_ppo_cooper_and_dapo_under_two_processes_give_the_one_process_run(recipe, extra, tiny_random_model_dir, tmp_path):
    """Process 0 samples and scores the whole step exactly as one process would; each process trains on
    half of its rows with the global token-mean normaliser (PPO: global whitening and KL controller;
    COOPER: the verifier learns from every process's rollouts), so the eval, the losses and the final
    weights equal the one-process run's."""
    common = {**GRPO_FAST, **extra, "model": str(tiny_random_model_dir), "max_steps": 2, "eval_every": 2,
              "dp_rollouts": "rank0"}
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([recipe, *_flags({**common, "output_dir": one})]) == 0
    proc = _torchrun([recipe, *_flags({**common, "output_dir": two})], timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exact = ("task_accuracy", "reward", "reward/mean", "score", "kl", "loss/policy", "loss/value", "loss",
             "kl_coef", "rm/accuracy", "rm/update_loss", "rm/pairs", "accuracy")
    a, b = _metric_rows(one), _metric_rows(two)
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
    compared = 0
    for ra, rb in zip(a, b):
        for key in exact:
            if isinstance(ra.get(key), float):
                assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-5), (ra["step"], ra["split"], key)
                compared += 1
    assert compared >= 6
    from safetensors.torch import load_file

    wa, wb = load_file(one / "final" / "model.safetensors"), load_file(two / "final" / "model.safetensors")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-5)
    assert json.loads((two / "summary.json").read_text())["data_parallel"]["processes"] == 2


def test_dynamic_sampling_draws_in_lockstep_when_each_process_samples(tiny_random_model_dir, tmp_path):
    """--dp-rollouts shard with DAPO's dynamic sampling: the processes agree after every draw whether
    each has its share of informative groups, so they draw the same number of batches, their prompt
    orders stay together and the run ends with identical replicas (checked by the loop)."""
    args = _flags({**GRPO_FAST, "model": tiny_random_model_dir, "max_steps": 2, "eval_every": 2,
                   "temperature": 1.5, "max_sample_batches": 2, "output_dir": tmp_path / "dapo"})
    proc = _torchrun(["dapo", *args], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train = [r for r in read_metrics(tmp_path / "dapo" / "metrics.jsonl") if r["split"] == "train"]
    assert len(train) == 2 and all(r["groups_sampled"] in (4, 8) for r in train)  # 1 or 2 draws of 2 + 2 groups
