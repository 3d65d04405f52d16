"""COOL-RLHF: the conditional RM's input text, hacking detection, the label/pair builders, and a
two-round loop on a tiny random model (resumed and extended)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlxf.config import ConfigError, build_config
from rlxf.data.conditions import DEFAULT_CONDITIONS, apply_conditions, condition_prompt, load_conditions
from rlxf.data.online_labels import (SampleGroup, fast_path_pairs, file_labels, hacking_flags, hacking_stats,
                                     high_scored, judge_pairs, quantile, verifier_pairs)
from rlxf.workflows.cool_rlhf import CoolRLHFConfig, read_jsonl

RM_FAST = {"max_steps": 2, "batch_size": 4, "eval_every": 0, "warmup_steps": 0, "progress": False, "threads": 1}


def _pairs(n: int = 6) -> list[dict]:
    from rlxf.tasks import get_task

    return [{**row, "domain": d} for d in ("arithmetic", "sorting")
            for row in get_task(d).preference_rows("train", n, 0, kind="mixed")]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- the conditional RM -------------------------------------------------------------------------

def test_condition_prompt_standard_and_conversational():
    assert condition_prompt("2+3=?", "Be exact.") == "Be exact.\n2+3=?"
    chat = [{"role": "user", "content": "2+3=?"}]
    assert condition_prompt(chat, "Be exact.") == [{"role": "system", "content": "Be exact."}, *chat]
    with_system = [{"role": "system", "content": "You add."}, *chat]
    assert condition_prompt(with_system, "Be exact.")[0] == {"role": "system", "content": "Be exact.\nYou add."}
    assert with_system[0]["content"] == "You add."  # the row itself is not modified


def test_default_conditions_ship_as_yaml_and_use_only_tiny_model_characters(tokenizer):
    here = Path(__file__).resolve().parents[1]
    assert load_conditions(str(here / "configs" / "cool_rlhf" / "conditions.yaml")) == DEFAULT_CONDITIONS
    for text in DEFAULT_CONDITIONS.values():
        assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"]


def test_rows_without_a_known_domain_are_refused():
    from rlxf.data import DataError

    with pytest.raises(DataError, match="no domain"):
        apply_conditions([{"prompt": "p", "chosen": "a", "rejected": "b"}], DEFAULT_CONDITIONS)
    with pytest.raises(DataError, match="'poetry' has no condition"):
        apply_conditions([{"prompt": "p", "domain": "poetry"}], DEFAULT_CONDITIONS)
    assert apply_conditions([{"prompt": "p"}], DEFAULT_CONDITIONS, default_domain="sorting")[0]["domain"] == "sorting"


def test_condition_prefix_is_identical_at_rm_training_and_scoring(tiny_random_model_dir, tmp_path):
    """The RM trained with --conditions saves them; the reward_model reward (what RL calls) encodes
    exactly the token ids training encoded, and reproduces the recipe's own held-out accuracy."""
    from rlxf.data import tokenize_preference, validate_rows
    from rlxf.workflows.cool_rlhf import rm_accuracy
    from rlxf.recipes.reward_model import RewardModelConfig, train
    from rlxf.rewards import RewardError, RewardModelReward, get_reward

    rows = _pairs()
    data = _write(tmp_path / "pairs.jsonl", rows)
    cfg = build_config(RewardModelConfig, {**RM_FAST, "model": str(tiny_random_model_dir), "dataset": str(data),
                                           "eval_dataset": str(data), "conditions": "default", "loss": "focal",
                                           "output_dir": str(tmp_path / "rm")})
    summary = train(cfg).summary
    final = Path(summary["final_model"])
    assert load_conditions(str(final / "conditions.yaml")) == DEFAULT_CONDITIONS

    reward = get_reward("reward_model", path=str(final))
    assert reward.conditions == DEFAULT_CONDITIONS
    trained, _ = tokenize_preference(apply_conditions(validate_rows(rows, kind="preference")[0], DEFAULT_CONDITIONS),
                                     reward.tokenizer, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
    prompts = reward.conditioned([r["prompt"] for r in rows], [r["domain"] for r in rows])
    for side in ("chosen", "rejected"):
        scored = [reward.encode(p, r[side]) for p, r in zip(prompts, rows)]
        assert scored == [e["prompt_ids"] + e[f"{side}_ids"] for e in trained]
    text = reward.tokenizer.decode(reward.encode(prompts[0], rows[0]["chosen"]), skip_special_tokens=True)
    assert text.startswith(DEFAULT_CONDITIONS["arithmetic"] + "\n" + rows[0]["prompt"])
    assert rm_accuracy(reward, rows)["rm_accuracy"] == pytest.approx(summary["final/accuracy"])
    # an unconditioned score differs: the condition really reaches the model
    plain = RewardModelReward(reward.model, reward.tokenizer)
    assert plain(["2+3=?"], [" #5"]) != reward(["2+3=?"], [" #5"], domain=["arithmetic"])
    # the task named by the context is the default domain; an unknown domain is a RewardError
    by_task = get_reward("reward_model", path=str(final), task="arithmetic")
    assert by_task(["2+3=?"], [" #5"]) == reward(["2+3=?"], [" #5"], domain=["arithmetic"])
    with pytest.raises(RewardError, match="no domain"):
        reward(["2+3=?"], [" #5"])


# -- hacking detection and pairs ------------------------------------------------------------------

def test_quantile_matches_torch():
    values = [3.0, -1.0, 0.5, 7.0, 2.0]
    for q in (0.0, 0.25, 0.5, 0.75, 0.9, 1.0):
        assert quantile(values, q) == pytest.approx(torch.quantile(torch.tensor(values), q).item())


def test_hacking_detection_on_a_hand_built_batch():
    # domain a: the RM loves two wrong answers; domain s (another scale): its top sample is right
    scores = [0.9, 0.8, 0.1, 0.2, 50.0, 40.0, 10.0, None]
    domains = ["a"] * 4 + ["s"] * 4
    correct = [False, False, True, True, True, False, False, None]
    high = high_scored(scores, domains, q=0.5)
    # a: quantile(0.1, 0.2, 0.8, 0.9; ½) = 0.5 → first two; s: quantile(10, 40, 50; ½) = 40 → 50 and 40
    assert high == [True, True, False, False, True, True, False, False]
    assert hacking_flags(high, correct) == [True, True, False, False, False, True, False, False]
    stats = hacking_stats(scores, correct, high)
    assert stats["fraction"] == pytest.approx(3 / 7)           # the None-scored/None-verified sample is not judged
    assert stats["top_wrong_rate"] == pytest.approx(3 / 4)
    assert stats["wrong_rate"] == pytest.approx(4 / 7)
    assert stats["lift"] == pytest.approx(3 / 4 - 4 / 7)
    assert stats["score_gap"] == pytest.approx((0.9 + 0.8 + 40 + 10) / 4 - (0.1 + 0.2 + 50) / 3)
    assert hacking_stats([None], [True], [False])["fraction"] is None


def _group(texts, correct, scores, prompt="1+1=?", domain="arithmetic"):
    return SampleGroup(prompt=prompt, domain=domain, answer="2", reference=" 1+1=2. #2", texts=texts,
                       correct=correct, scores=scores)


def test_fast_path_rejects_hacked_samples_against_the_best_verified_one():
    with_right = _group([" #3", " #2", " 1+1=2. #2", " #4"], [False, True, True, False], [2.0, 0.5, 1.0, -1.0])
    no_right = _group([" #5", " #6"], [False, False], [3.0, 1.0], prompt="2+3=?")
    untouched = _group([" #7"], [False], [9.0], prompt="3+4=?")
    rows = fast_path_pairs([with_right, no_right, untouched],
                           [[True, False, False, True], [True, True], [False]])
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [
        ("1+1=?", " 1+1=2. #2", " #3"), ("1+1=?", " 1+1=2. #2", " #4"),   # the correct sample the RM scores highest
        ("2+3=?", " 1+1=2. #2", " #5"), ("2+3=?", " 1+1=2. #2", " #6")]   # no correct sample: the reference
    assert {r["pair_kind"] for r in rows} == {"hacked"} and {r["domain"] for r in rows} == {"arithmetic"}


def test_verifier_pairs_put_correct_over_wrong_within_a_prompt():
    group = _group([" #2", " #3", " #2", " #4", " 1+1=2. #2"], [True, False, True, False, True], [0.0] * 5)
    rows = verifier_pairs([group, _group([" #3"], [False], [0.0])], max_pairs_per_prompt=3)
    assert [(r["chosen"], r["rejected"]) for r in rows] == [(" #2", " #3"), (" #2", " #4"), (" 1+1=2. #2", " #3")]


def test_judge_pairs_follow_the_judges_preference_under_the_domain_condition():
    class FakeJudge:
        def __init__(self):
            self.calls = []

        def prefer(self, prompts, a, b, *, principle=None):
            self.calls.append(principle)
            return [0.9, 0.2, 0.55, None][:len(a)]

    groups = [_group(["a1", "b1", "a2", "b2"], [None] * 4, []), _group(["a3", "b3", "a4", "b4"], [None] * 4, [])]
    judge = FakeJudge()
    rows, stats = judge_pairs(groups, judge, DEFAULT_CONDITIONS, max_pairs_per_prompt=2, margin=0.1)
    assert judge.calls == [DEFAULT_CONDITIONS["arithmetic"]]
    assert [(r["chosen"], r["rejected"], r["chosen_probability"]) for r in rows] == [
        ("a1", "b1", 0.9), ("b2", "a2", pytest.approx(0.8))]
    assert stats == {"asked": 4, "failed": 1, "undecided": 1}


def test_file_labels_are_merged_in_their_round():
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b", "domain": "sorting"},
            {"prompt": "q", "chosen": "a", "rejected": "b", "domain": "arithmetic", "round": 2}]
    assert [r["prompt"] for r in file_labels(rows, round_index=1, domains=["arithmetic", "sorting"], where="f")] == ["p"]
    assert file_labels(rows, round_index=2, domains=["arithmetic", "sorting"], where="f")[0]["domain"] == "arithmetic"
    from rlxf.data import DataError

    with pytest.raises(DataError, match="not one of the run's domains"):
        file_labels(rows, round_index=1, domains=["arithmetic"], where="f")


# -- config ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("values,match", [
    ({"datasets": "task:poetry"}, "not a built-in task"),
    ({"datasets": "data.jsonl"}, "not a built-in task"),
    ({"labels": "judge"}, "--judge"),
    ({"labels": "file"}, "--labels-file"),
    ({"hack_quantile": 1.0}, r"hack_quantile 1\.0 is out of range: it must be a finite number in \(0, 1\)"),
    ({"rounds": 0}, "rounds"),
])
def test_bad_values_are_config_errors(values, match):
    with pytest.raises(ConfigError, match=match):
        build_config(CoolRLHFConfig, values)


def test_sub_run_options_are_checked_before_anything_trains(tmp_path):
    from rlxf.workflows.cool_rlhf import train

    small = {"rm_pairs": 4, "eval_pairs": 2, "rl_prompts": 4, "eval_prompts": 2, "policy_batch_size": 2}
    cfg = build_config(CoolRLHFConfig, {**small, "policy_recipe": "ppo", "output_dir": str(tmp_path / "a")})
    with pytest.raises(ConfigError, match="rlxf ppo sub-runs would fail: --mini-batches 4 .*--policy-options"):
        train(cfg)
    options = _write(tmp_path / "o.yaml", [])
    options.write_text("beta: 0.01\nreward: verifiable\n")
    cfg = build_config(CoolRLHFConfig, {**small, "policy_options": str(options), "output_dir": str(tmp_path / "b")})
    with pytest.raises(ConfigError, match="reward is set by rlxf cool-rlhf"):
        train(cfg)
    assert not (tmp_path / "a" / "round-0").exists() and not (tmp_path / "b" / "round-0").exists()


# -- the loop -------------------------------------------------------------------------------------

LOOP_FAST = {"rounds": 2, "rm_steps": 2, "slow_steps": 1, "fast_steps": 1, "policy_steps": 1, "rm_pairs": 8,
             "eval_pairs": 4, "rl_prompts": 8, "eval_prompts": 4, "label_prompts": 3, "samples_per_prompt": 2,
             "policy_batch_size": 2, "group_size": 2, "rm_batch_size": 4, "max_new_tokens": 8, "threads": 1}


def _mtimes(out: Path, pattern: str) -> dict[str, float]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted(out.glob(pattern))}


@pytest.mark.slow
def test_two_rounds_end_to_end_then_rerun_skips_and_resumes(tiny_random_model_dir, tmp_path, monkeypatch):
    from rlxf.cli import main

    # the panels each sub-run and the loop put in their reports (no figure is rendered)
    plots = []
    monkeypatch.setattr("rlxf.reporting.report._plot_png", lambda rows, panels, title: plots.append(panels) or b"")

    out = tmp_path / "cool"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**LOOP_FAST, "model": tiny_random_model_dir,
                                                         "output_dir": out}.items()]
    assert main(["cool-rlhf", *flags]) == 0

    records = read_jsonl(out / "rounds.jsonl")
    assert [r["round"] for r in records] == [0, 1, 2]
    for r in records:
        for domain in ("arithmetic", "sorting"):
            assert 0 <= r[f"rm_accuracy/{domain}"] <= 1 and 0 <= r[f"policy_accuracy/{domain}"] <= 1
            assert f"rm_reward/{domain}" in r and f"hack/fraction/{domain}" in r
        assert 0 <= r["hack/fraction"] <= 1
    for r in records[1:]:
        assert {"delta/rm_reward", "delta/accuracy", "hack/divergence", "samples/hacked", "fast/pairs"} <= set(r)
        assert Path(r["policy_dir"]).is_relative_to(out / f"round-{r['round']}" / "policy")
        assert (out / f"round-{r['round']}" / "rm-slow" / "summary.json").is_file()
    # the random model is never right, so the top-scored samples are hacked and patched against the reference
    assert records[1]["fast/pairs"] > 0 and (out / "round-1" / "rm-fast" / "summary.json").is_file()
    assert records[2]["rm_dir"].startswith(str(out / "round-2" / "rm-fast"))
    for name in ("summary.json", "report.html", "report.png", "metrics.jsonl", "data/conditions.yaml"):
        assert (out / name).is_file(), name
    assert json.loads((out / "summary.json").read_text())["rounds_done"] == 2
    keys = {k for panel in plots[-1] for k in panel.keys}   # the loop's own report, written last
    assert {"rm_accuracy/sorting", "policy_accuracy/arithmetic", "hack/fraction", "delta/rm_reward"} <= keys

    # a re-run retrains nothing; an interrupted round redoes only what it lacks
    before = _mtimes(out, "round-*/**/summary.json")
    assert main(["cool-rlhf", *flags]) == 0
    assert _mtimes(out, "round-*/**/summary.json") == before
    assert read_jsonl(out / "rounds.jsonl") == records
    import shutil

    (out / "round-2" / "round.json").unlink()
    shutil.rmtree(out / "round-2" / "policy")
    assert main(["cool-rlhf", *flags]) == 0
    after = _mtimes(out, "round-*/**/summary.json")
    assert {k: v for k, v in after.items() if "round-2/policy" not in k} == {
        k: v for k, v in before.items() if "round-2/policy" not in k}
    assert after["round-2/policy/summary.json"] != before["round-2/policy/summary.json"]
    assert [r["round"] for r in read_jsonl(out / "rounds.jsonl")] == [0, 1, 2]

    # other settings are refused instead of mixing two loops in one directory
    assert main(["cool-rlhf", *flags, "--rm-lr=0.1"]) == 2


@pytest.mark.report
def test_report_plots_the_round_metrics(tmp_path):
    from rlxf.workflows.cool_rlhf import write_results

    cfg = build_config(CoolRLHFConfig, {"output_dir": str(tmp_path), "datasets": "task:arithmetic"})
    base = {"rm_dir": "rm", "policy_dir": "p", "rm_accuracy": 0.8, "rm_accuracy/arithmetic": 0.8,
            "rm_accuracy/arithmetic/correctness": 0.5, "policy_accuracy": 0.3, "policy_accuracy/arithmetic": 0.3,
            "rm_reward": 1.0, "rm_reward/arithmetic": 1.0, "hack/fraction": 0.2, "hack/top_wrong_rate": 0.8,
            "hack/wrong_rate": 0.7, "hack/score_gap": None}
    records = [{"round": 0, **base}, {"round": 1, **base, "policy_accuracy": 0.2, "rm_reward": 1.5,
                                      "delta/rm_reward": 0.5, "delta/accuracy": -0.1, "hack/divergence": 1.0}]
    summary = write_results(cfg, tmp_path, records)
    assert summary["start/policy_accuracy"] == 0.3 and summary["final/policy_accuracy"] == 0.2
    assert (tmp_path / "report.png").stat().st_size > 10_000
    assert "policy_accuracy" in (tmp_path / "report.html").read_text()
    assert [r["round"] for r in read_jsonl(tmp_path / "rounds.jsonl")] == [0, 1]


def test_docs_option_table_matches_the_config():
    import dataclasses
    import re

    from rlxf.config import coerce

    doc = (Path(__file__).resolve().parents[1] / "docs" / "methods" / "cool-rlhf.md").read_text()
    rows = re.findall(r"^\| `(--[a-z0-9-]+)` \| `([^`]*)` \|", doc, flags=re.MULTILINE)
    defaults = {f.name: f.default for f in dataclasses.fields(CoolRLHFConfig)}
    assert [flag[2:].replace("-", "_") for flag, _ in rows] == list(defaults)
    for flag, text in rows:
        name = flag[2:].replace("-", "_")
        assert coerce(CoolRLHFConfig, name, text) == defaults[name], flag
