"""The GRPO recipe: presets, the pieces of one step, and runs end to end on a small model.

Learning on the embedded tiny model (the acceptance numbers) is in test_learning.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlxf.cli import main
from rlxf.config import ConfigError, build_config
from rlxf.train import FAULT_ENV
from rlxf.recipes.grpo import PRESETS, DAPOConfig, GRPOConfig
from rlxf.recipes.grpo_step import _merge_rows, policy_loss_terms
from rlxf.recipes.online import reward_tensor
from rlxf.reporting import read_metrics
from rlxf.rollout import Rollouts

FAST = {"task_size": 64, "eval_size": 16, "eval_generate": 16, "batch_size": 4, "group_size": 4,
        "max_new_tokens": 12, "progress": False, "log_every": 1, "threads": 1}


def _flags(values: dict) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in values.items()]


# -- config ------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_fill_unset_fields(preset):
    cfg = build_config(GRPOConfig, {"preset": preset})
    for name, value in PRESETS[preset].items():
        if name == "eps_high" and value is None:
            value = cfg.eps_low
        if name == "overlong_buffer" and value == -1:
            value = cfg.max_new_tokens // 4
        assert getattr(cfg, name) == value, name


def test_explicit_values_beat_the_preset():
    cfg = build_config(DAPOConfig, {"eps_high": 0.3, "dynamic_sampling": False, "beta": 0.01})
    assert (cfg.preset, cfg.eps_high, cfg.dynamic_sampling, cfg.beta) == ("dapo", 0.3, False, 0.01)
    assert cfg.loss_agg == "token-mean"


def test_resolved_config_reloads_to_the_same_config(tmp_path):
    from rlxf.config import save_yaml

    cfg = build_config(DAPOConfig, {"max_new_tokens": 40})
    save_yaml(cfg, tmp_path / "c.yaml")
    again = build_config(GRPOConfig, __import__("yaml").safe_load((tmp_path / "c.yaml").read_text()))
    assert again == build_config(GRPOConfig, {**{k: getattr(cfg, k) for k in cfg.__dataclass_fields__}})


@pytest.mark.parametrize("values,match", [
    ({"group_size": 1}, "group-size"),
    ({"mini_batches": 3}, "mini-batches"),
    ({"overlong_buffer": 64}, "overlong-buffer"),
    ({"temperature": 0}, "temperature"),
    ({"reward": "reward_model"}, "reward-model"),
    ({"loss_agg": "mean"}, "loss-agg"),
])
def test_bad_values_are_config_errors(values, match):
    with pytest.raises(ConfigError, match=match):
        build_config(GRPOConfig, values)


# -- pieces ------------------------------------------------------------------------------------

def test_a_none_reward_gets_its_group_mean_and_is_marked_invalid():
    rewards, valid = reward_tensor([1.0, None, 0.0, 1.0, None, None], group_size=3)
    assert rewards.tolist() == [1.0, 0.5, 0.0, 1.0, 1.0, 1.0]
    assert valid.tolist() == [True, False, True, True, False, False]
    rewards, valid = reward_tensor([None, None], group_size=2)
    assert rewards.tolist() == [0.0, 0.0] and not valid.any()


def _rollouts(prompt_lens, completion_lens, group_size, pad=0):
    n, P, C = len(prompt_lens), max(prompt_lens), max(completion_lens)
    prompt_ids = torch.full((n, P), pad)
    prompt_mask = torch.zeros(n, P, dtype=torch.long)
    completion_ids = torch.full((n, C), pad)
    completion_mask = torch.zeros(n, C, dtype=torch.long)
    logps = torch.zeros(n, C)
    for i, (p, c) in enumerate(zip(prompt_lens, completion_lens)):
        prompt_ids[i, P - p:] = torch.arange(3, 3 + p)
        prompt_mask[i, P - p:] = 1
        completion_ids[i, :c] = torch.arange(10 + i, 10 + i + c)
        completion_mask[i, :c] = 1
        logps[i, :c] = -0.1 * (i + 1)
    return Rollouts(prompt_ids, prompt_mask, completion_ids, completion_mask, logps, ["stop"] * n,
                    [f"t{i}" for i in range(n)], torch.arange(n) // group_size, group_size)


def test_merge_rows_keeps_each_row_and_repads():
    a = _rollouts([2, 2, 3, 3], [1, 2, 4, 1], 2)
    b = _rollouts([5, 5], [2, 3], 2)
    merged = _merge_rows([(a, [2, 3]), (b, [0, 1])], 2)
    assert merged.text == ["t2", "t3", "t0", "t1"]
    assert merged.prompt_ids.shape == (4, 5) and merged.completion_ids.shape == (4, 4)
    ids, mask = merged.sequences()
    for row, (src, i) in enumerate([(a, 2), (a, 3), (b, 0), (b, 1)]):
        want = torch.cat([src.prompt_ids[i][src.prompt_mask[i].bool()], src.completion_ids[i][src.completion_mask[i].bool()]])
        assert torch.equal(ids[row][mask[row].bool()], want)
        assert torch.equal(merged.logps[row][merged.completion_mask[row].bool()],
                           src.logps[i][src.completion_mask[i].bool()])
    assert merged.prompt_index.tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_add_up_to_the_whole_batch_gradient(loss_agg, tiny_random_model_dir):
    """Splitting a mini-batch into micro-batches must not change the gradient (STYLE pattern 5)."""
    from rlxf.models import load_policy

    model = load_policy(str(tiny_random_model_dir), dtype="float32", device="cpu")
    cfg = build_config(GRPOConfig, {"loss_agg": loss_agg, "beta": 0.0, "max_new_tokens": 8})
    torch.manual_seed(0)
    N, P, C = 6, 4, 5
    ids = torch.randint(3, 100, (N, P + C))
    att = torch.ones(N, P + C, dtype=torch.long)
    mask = torch.ones(N, C)
    mask[0, 3:] = 0
    mask[4, 1:] = 0
    batch = {"input_ids": ids, "attention_mask": att, "mask": mask, "advantages": torch.randn(N),
             "prompt_len": P, "old_logps": None, "ref_logps": None}
    units = mask.sum() if loss_agg == "token-mean" else N

    def grads(splits):
        model.zero_grad()
        for rows in splits:
            part = {k: (v[rows] if torch.is_tensor(v) else v) for k, v in batch.items()}
            loss, _ = policy_loss_terms(model, part, cfg, units_total=float(units))
            loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    whole = grads([torch.arange(N)])
    split = grads([torch.arange(0, 2), torch.arange(2, 5), torch.arange(5, 6)])
    torch.testing.assert_close(split, whole, rtol=1e-4, atol=1e-7)


@pytest.mark.report
# -- end to end ----------------------------------------------------------------------------------

@pytest.mark.parametrize("preset,extra", [("grpo", {}), ("dr_grpo", {}), ("dapo", {"max_sample_batches": 2}),
                                          ("rloo", {}), ("grpo", {"ppo_epochs": 2, "mini_batches": 2}),
                                          ("grpo", {"sampler": "aps", "length_reward_weight": 0.5,
                                                    "format_weight": 0.1}),
                                          ("grpo", {"engine": "static"}),
                                          ("grpo", {"policy_loss": "gspo", "mini_batches": 2}),
                                          ("grpo", {"policy_loss": "cispo", "loss_agg": "token-mean",
                                                    "advantage": "reinforce_pp_baseline", "ppo_epochs": 2})])
def test_every_preset_runs_and_writes_the_run_files(preset, extra, tiny_random_model_dir, tmp_path):
    out = tmp_path / "run"
    argv = [preset, *_flags({**FAST, "model": tiny_random_model_dir, "output_dir": out, "max_steps": 2, **extra})]
    assert main(argv) == 0
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "report.png", "report.html"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["preset"] == preset and summary["steps"] == 2
    assert summary["start/task_accuracy"] is not None and summary["final/task_accuracy"] is not None
    train = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    for key in ("reward/mean", "accuracy", "entropy", "clip_fraction", "completion_length", "frac_zero_adv",
                "sample_tokens_per_s", "train_tokens_per_s", "loss"):
        assert key in train[-1], key
    if PRESETS[preset]["beta"] or extra.get("beta"):
        assert "kl" in train[-1]
    if "sampler" in extra:
        assert "sampler/proficiency" in train[-1]
    assert (out / "final" / "config.json").exists()


def _half_reward(prompts, completions, **fields):
    """Test reward: raises when a completion's length is 3 mod 4, else 1 for even lengths."""
    out = []
    for c in completions:
        if len(c) % 4 == 3:
            raise ValueError("boom")
        out.append(float(len(c) % 2 == 0))
    return out


def test_a_failing_user_reward_gives_none_that_is_counted(tiny_random_model_dir, tmp_path):
    out = tmp_path / "run"
    argv = ["grpo", *_flags({**FAST, "model": tiny_random_model_dir, "output_dir": out, "max_steps": 2,
                             "reward": f"{__file__}:_half_reward"})]
    assert main(argv) == 0
    train = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]
    assert sum(r["reward_none"] for r in train) > 0   # the failing samples are counted ...
    assert all(r["loss"] is not None for r in train)  # ... and the run goes on
    assert all(r["reward/mean"] is not None for r in train)


def test_dapo_dynamic_sampling_keeps_only_informative_groups(tiny_random_model_dir, tmp_path):
    out = tmp_path / "run"
    argv = ["dapo", *_flags({**FAST, "model": tiny_random_model_dir, "output_dir": out, "max_steps": 2,
                             "reward": f"{__file__}:_half_reward", "max_sample_batches": 3})]
    assert main(argv) == 0
    train = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]
    assert all(r["groups_sampled"] >= 4 for r in train)
    assert all(r["frac_zero_adv"] == 0.0 for r in train)


def test_resume_after_kill_equals_uninterrupted_run(tiny_random_model_dir, tmp_path):
    common = {**FAST, "model": tiny_random_model_dir, "max_steps": 4, "save_every": 2, "eval_every": 2,
              "sampler": "aps", "beta": 0.04}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main(["grpo", *_flags({**common, "output_dir": straight})]) == 0
    cmd = [sys.executable, "-m", "rlxf", "grpo", *_flags({**common, "output_dir": killed})]
    env = {**os.environ, FAULT_ENV: "3", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 137, proc.stderr[-2000:]
    assert main(["grpo", *_flags({**common, "output_dir": killed, "resume": "true"})]) == 0

    def comparable(run):
        skip = ("time", "sample_tokens_per_s", "train_tokens_per_s")
        return [{k: v for k, v in r.items() if k not in skip} for r in read_metrics(run / "metrics.jsonl")]

    a, b = comparable(straight), comparable(killed)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], float):
                assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-7), (x["step"], k)
            else:
                assert x[k] == y[k], (x["step"], k)


def _even_length_reward(prompts, completions, **fields):
    """Test reward: 1 for completions of even length, so groups have non-zero advantages."""
    return [float(len(c) % 2 == 0) for c in completions]


def _first_train_row(tiny_random_model_dir, out, **extra):
    argv = ["grpo", *_flags({**FAST, "model": tiny_random_model_dir, "output_dir": out, "max_steps": 1,
                             "reward": f"{__file__}:_even_length_reward", **extra})]
    assert main(argv) == 0
    return [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"][0]


def test_share_prompt_trains_like_the_unshared_step(tiny_random_model_dir, tmp_path):
    """--share-prompt: same samples; the loss, KL, entropy and gradient norm of the step match the plain path."""
    extra = {"beta": 0.04, "micro_batch_size": 8}
    plain = _first_train_row(tiny_random_model_dir, tmp_path / "plain", **extra)
    shared = _first_train_row(tiny_random_model_dir, tmp_path / "shared", share_prompt=True, **extra)
    assert plain["reward/mean"] == shared["reward/mean"] and plain["grad_norm"] > 0
    for key in ("loss", "kl", "entropy", "grad_norm"):
        assert shared[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-7), key


def test_share_prompt_runs_with_mini_batches_of_whole_groups(tiny_random_model_dir, tmp_path):
    row = _first_train_row(tiny_random_model_dir, tmp_path / "run", share_prompt=True, ppo_epochs=2,
                           mini_batches=2, micro_batch_size=4)
    assert row["grad_norm"] > 0 and row["clip_fraction"] >= 0


def test_share_prompt_needs_whole_groups():
    with pytest.raises(ConfigError, match="multiples of --group-size"):
        build_config(GRPOConfig, {"share_prompt": True, "group_size": 4, "micro_batch_size": 6})
    with pytest.raises(ConfigError, match="--share-prompt"):
        build_config(GRPOConfig, {"share_prompt": True, "gradient_checkpointing": True})
