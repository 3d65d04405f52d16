"""RLAIF / Constitutional AI / LMGT: principles, `rlxf cai-sft`, `rlxf rlaif`, soft-label BT, the LMGT
reward wrapper and a GRPO run with it. Judges are fakes with the rlxf.judges API."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import re
from pathlib import Path

import pytest
import torch
import yaml

from rlxf.cli import main
from rlxf.config import ConfigError, build_config
from rlxf.data import collate_preference, load_rows, tokenize_preference, validate_rows
from rlxf.judges.constitution import DEFAULT_PATH, load_principles, select_principle
from rlxf.losses import bradley_terry_loss
from rlxf.reporting import read_metrics
from rlxf.rewards import RewardError, call_reward
from rlxf.workflows.rlaif import RLAIFConfig, build_preference_rows, label_pairs, label_stats
from rlxf.rewards.lmgt import LMGTReward, d_rlaif_rewards, judge_prompt_set, sample_key
from rlxf.tasks import get_task


def _flags(values: dict) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in values.items()]


def _unit(text: str) -> float:
    """A deterministic number in [0, 1) from a text."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 2**32


class FakeBackend:
    name = "fake"

    def __init__(self):
        self.calls = []

    def chat(self, messages, *, max_tokens=256, temperature=0.0):
        """A critique for [user, assistant, critique request], a revision for the longer conversation."""
        self.calls.append(messages)
        if len(messages) == 3:
            return f"critique of [{messages[1]['content'][:8]}]"
        return f" revised #{len(self.calls)}"

    def option_logprobs(self, messages, options):
        return None


class FakeJudge:
    """prefer: P(a better) = 0.9 if a is shorter, 0.1 if longer, 0.5 on equal length; None when the
    prompt contains 'None'. shift: +1 for 'good', −1 for 'bad', 0 otherwise, None for 'fail'."""

    def __init__(self, **options):
        self.options = options
        self.backend = FakeBackend()
        self.prefer_calls, self.shift_calls = [], []
        self.stats = {"calls": 0}

    def prefer(self, prompts, a, b, *, principle=None):
        self.prefer_calls.append((list(prompts), principle))
        out = []
        for p, x, y in zip(prompts, a, b):
            if "None" in str(p):
                out.append(None)
            else:
                out.append(0.9 if len(x) < len(y) else 0.1 if len(x) > len(y) else 0.5)
        return out

    def score(self, prompts, completions, *, rubric=None):
        return [10.0 if "good" in c else 1.0 if "bad" in c else None for c in completions]

    def shift(self, prompts, completions, *, knowledge=None):
        self.shift_calls.append((list(completions), knowledge))
        return [None if "fail" in c else 1 if "good" in c else -1 if "bad" in c else 0 for c in completions]


class HashJudge(FakeJudge):
    """Varied deterministic preferences for sampled text: P(a better) from a hash of the pair; the
    first pair of the first call fails (None)."""

    def prefer(self, prompts, a, b, *, principle=None):
        self.prefer_calls.append((list(prompts), principle))
        first_call = len(self.prefer_calls) == 1
        return [None if first_call and i == 0 else round(_unit(x + "|" + y), 3) for i, (x, y) in enumerate(zip(a, b))]

    def shift(self, prompts, completions, *, knowledge=None):
        self.shift_calls.append((list(completions), knowledge))
        return [(-1, 0, 1)[int(_unit(c) * 3)] for c in completions]


@pytest.fixture
def fake_judges(monkeypatch):
    """Replace rlxf.judges.build_judge; returns the list of judges built (with their options)."""
    import rlxf.judges

    built = []

    def build(spec, **options):
        judge = (HashJudge if spec == "hash" else FakeJudge)(spec=spec, **options)
        built.append(judge)
        return judge

    monkeypatch.setattr(rlxf.judges, "build_judge", build, raising=False)
    return built


# -- principles ----------------------------------------------------------------------------------

def test_default_principles_load_with_unique_names_and_all_texts():
    principles = load_principles()
    assert len(principles) >= 8 and DEFAULT_PATH.name == "constitution.yaml"
    assert len({p.name for p in principles}) == len(principles)
    assert all(p.critique and p.revision and p.comparison.endswith("?") for p in principles)
    assert [p.name for p in select_principle(principles, "concise")] == ["concise"]
    with pytest.raises(ConfigError, match="--principle 'nope' is not in the principles file; names: correct"):
        select_principle(principles, "nope")


@pytest.mark.parametrize("content,match", [
    ("principles: []", "non-empty list"),
    ("principles:\n  - name: a\n    critique: c\n    revision: r", r"principle 1 \('a'\): field 'comparison' must "
                                                                  "be a non-empty string \\(missing\\)"),
    ("principles:\n  - {name: a, critique: c, revision: r, comparision: q}", "unknown field 'comparision'; did "
                                                                             "you mean 'comparison'"),
    ("principles:\n  - {name: a, critique: c, revision: r, comparison: q}\n"
     "  - {name: a, critique: c, revision: r, comparison: q}", "principle 2 .*used twice"),
    ("principles:\n  - {name: a, critique: '  ', revision: r, comparison: q}", "'critique' must be a non-empty"),
    ("rules: []", "unknown top-level key"),
    ("principles: [oops", "not valid YAML"),
    ("- just a string", "expected a mapping"),
])
def test_bad_principles_files_say_what_and_where(tmp_path, content, match):
    path = tmp_path / "p.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=match):
        load_principles(path)
    with pytest.raises(ConfigError, match="file not found"):
        load_principles(tmp_path / "missing.yaml")


def test_a_bare_list_of_principles_is_accepted_and_whitespace_is_normalised(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("- {name: x, critique: 'a\n  b', revision: r, comparison: 'q?'}\n")
    (p,) = load_principles(path)
    assert (p.name, p.critique) == ("x", "a b")


# -- soft labels ------------------------------------------------------------------------------------

def test_soft_label_bt_equals_the_hand_computed_value():
    # −[0.8 log σ(1) + 0.2 log σ(−1)] = 0.8·log(1 + e^−1) + 0.2·log(1 + e)
    expected = 0.8 * math.log1p(math.exp(-1)) + 0.2 * math.log1p(math.e)
    loss = bradley_terry_loss(torch.tensor([1.0, 0.5], dtype=torch.float64), torch.tensor([0.0, 0.5],
                              dtype=torch.float64), soft_label=torch.tensor([0.8, 1.0], dtype=torch.float64))
    assert loss[0].item() == pytest.approx(expected, abs=1e-12)
    assert loss[1].item() == pytest.approx(math.log(2), abs=1e-12)  # p = 1 is the hard label


def test_chosen_probability_is_validated_tokenized_and_collated(tokenizer, tmp_path):
    rows, _ = validate_rows([{"prompt": "1+1=?", "chosen": " #2", "rejected": " #3", "chosen_probability": 0.75},
                             {"prompt": "2+2=?", "chosen": " #4", "rejected": " #5"}], kind="preference")
    assert [r["chosen_probability"] for r in rows] == [0.75, None]
    examples, _ = tokenize_preference(rows, tokenizer, max_length=32)
    batch = collate_preference(examples, tokenizer.pad_token_id)
    assert batch["chosen_probability"].tolist() == [0.75, 1.0] and batch["has_soft_label"] is True
    with pytest.raises(Exception, match="'chosen_probability' is a probability and must be in \\[0, 1\\], got 1.5"):
        validate_rows([{"prompt": "p", "chosen": "a", "rejected": "b", "chosen_probability": 1.5}], kind="preference")
    csv = tmp_path / "pairs.csv"
    csv.write_text("prompt,chosen,rejected,chosen_probability\np,a,b,0.25\n")
    assert load_rows(str(csv), kind="preference")[0]["chosen_probability"] == 0.25


# -- rlaif: labelling ----------------------------------------------------------------------------

ROWS = [{"prompt": f"{i}+1=?", "answer": str(i + 1)} for i in range(5)]


def test_pairs_are_oriented_scored_filtered_and_failures_dropped():
    task = get_task("arithmetic")
    verify = lambda text, row: task.verify(text, row["answer"])  # noqa: E731
    first = [" #1", " 1+1=2. #2", " #3", " #9", " #5"]
    second = [" 0+1=1. #1", " #2", " #7", " #4", " #6"]
    probs = [0.9, 0.2, 0.55, None, 0.3]
    pairs, counts = build_preference_rows(ROWS, first, second, probs, ["a"] * 5, threshold=0.0, verify=verify)
    assert counts == {"failed": 1}
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [(" #1", " 0+1=1. #1"), (" #2", " 1+1=2. #2"),
                                                             (" #3", " #7"), (" #6", " #5")]
    assert [p["chosen_score"] for p in pairs] == pytest.approx([0.9, 0.8, 0.55, 0.7])
    assert [p["rejected_score"] for p in pairs] == pytest.approx([0.1, 0.2, 0.45, 0.3])
    assert [p["chosen_probability"] for p in pairs] == [p["chosen_score"] for p in pairs]
    assert [p["judge_probability"] for p in pairs] == [0.9, 0.2, 0.55, 0.3]
    assert (pairs[2]["chosen_correct"], pairs[2]["rejected_correct"]) == (True, False)
    assert (pairs[3]["chosen_correct"], pairs[3]["rejected_correct"]) == (False, True)
    validate_rows(pairs, kind="preference")

    kept, counts = build_preference_rows(ROWS, first, second, probs, ["a"] * 5, threshold=0.1, verify=verify)
    assert counts == {"failed": 1, "below_threshold": 1} and [p["judge_probability"] for p in kept] == [0.9, 0.2, 0.3]

    stats = label_stats(pairs)
    assert stats["label_histogram"] == {"[0.5,0.6)": 1, "[0.6,0.7)": 0, "[0.7,0.8)": 1, "[0.8,0.9)": 1,
                                        "[0.9,1.0]": 1}
    assert stats["ties"] == 0 and stats["both_correct"] == 2 and stats["decisive_pairs"] == 2
    assert stats["agreement"] == 0.5  # right on 2+1 (#3 over #7), wrong on 4+1 (#6 over #5)
    assert stats["agreement_soft"] == pytest.approx((0.55 + 0.3) / 2)


def test_label_pairs_draws_one_principle_per_pair_and_batches_by_principle():
    principles = load_principles()
    judge = FakeJudge()
    prompts = [f"{i}=?" for i in range(12)] + ["None here"]
    probs, names = label_pairs(judge, prompts, ["a"] * 13, ["bb"] * 13, principles, rng=random.Random(0))
    assert probs[:12] == [0.9] * 12 and probs[12] is None
    assert len(judge.prefer_calls) == len(set(names)) > 1
    texts = {p.comparison for p in principles}
    assert all(principle in texts for _, principle in judge.prefer_calls)
    _, again = label_pairs(FakeJudge(), prompts, ["a"] * 13, ["bb"] * 13, principles, rng=random.Random(0))
    assert again == names
    hidden = FakeJudge()
    label_pairs(hidden, prompts, ["a"] * 13, ["bb"] * 13, principles, rng=random.Random(0), show_principle=False)
    assert {principle for _, principle in hidden.prefer_calls} == {None}


def test_rlaif_config_checks():
    with pytest.raises(ConfigError, match=r"threshold 0\.7 is out of range: it must be a finite number in \[0, 0\.5\]"):
        build_config(RLAIFConfig, {"threshold": 0.7})
    with pytest.raises(ConfigError, match="--temperature must be > 0"):
        build_config(RLAIFConfig, {"temperature": 0})
    with pytest.raises(ConfigError, match="--train-eval task needs a task"):
        build_config(RLAIFConfig, {"dataset": "x.jsonl", "train_eval": "task"})
    assert judge_prompt_set("local:tiny", "auto") == "compact"
    assert judge_prompt_set("http://h:1/v1", "auto") == "standard"
    assert main(["rlaif", "--threshold=0.9"]) == 2


# -- end to end on a small random model ---------------------------------------------------------------

SAMPLE = {"num_prompts": 10, "max_new_tokens": 8, "threads": 1, "device": "cpu"}


def test_rlaif_end_to_end_writes_pairs_and_trains_a_soft_label_rm(tiny_random_model_dir, tmp_path, fake_judges,
                                                                      monkeypatch):
    import rlxf.recipes.reward_model as rm

    seen = []

    def recording_bt(chosen, rejected, **kwargs):
        seen.append(kwargs.get("soft_label"))
        return bradley_terry_loss(chosen, rejected, **kwargs)

    monkeypatch.setattr(rm, "bradley_terry_loss", recording_bt)
    train_cfg = tmp_path / "train.yaml"
    train_cfg.write_text(yaml.safe_dump({"max_steps": 1, "batch_size": 2, "eval_size": 4, "progress": False,
                                         "warmup_steps": 0}))
    out = tmp_path / "rlaif"
    argv = ["rlaif", *_flags({**SAMPLE, "model": tiny_random_model_dir, "judge": "hash", "output_dir": out,
                              "judge_model": "m", "train_config": train_cfg})]
    assert main(argv) == 0
    (judge,) = fake_judges
    assert judge.options["model"] == "m" and judge.options["prompts"] == "standard"
    stats = json.loads((out / "stats.json").read_text())
    pairs = [json.loads(line) for line in (out / "preferences.jsonl").read_text().splitlines()]
    assert stats["prompts"] == 10 and stats["pairs"] == len(pairs) > 0
    assert stats["judged"] + stats["identical"] + stats["empty"] == 10
    assert stats["pairs"] + stats["failed"] + stats["below_threshold"] == stats["judged"]
    assert stats["failed"] == 1 and stats["judge_stats"] == {"calls": 0}
    for p in pairs:
        assert p["chosen_score"] == p["chosen_probability"] >= 0.5
        assert p["rejected_score"] == pytest.approx(1 - p["chosen_score"])
        assert p["judge_probability"] in (p["chosen_score"], pytest.approx(1 - p["chosen_score"]))
        assert {"chosen_correct", "rejected_correct", "principle", "answer"} <= set(p)
    validate_rows(load_rows(str(out / "preferences.jsonl"), kind="preference"), kind="preference")
    assert "agreement" in stats and "label_histogram" in stats
    # the RM trained on the file's soft labels; the eval pairs (task ground truth) have none
    train_labels = {round(p["chosen_probability"], 6) for p in pairs}
    soft = [s for s in seen if s is not None]
    assert len(soft) == 1 and len(seen) == 3  # eval at 0, one train step, eval at 1
    assert {round(v, 6) for v in soft[0].tolist()} <= train_labels
    assert stats["train"]["recipe"] == "rm" and (out / "rm" / "final").is_dir()
    assert "final/accuracy" in stats["train"]  # held out: the task's correct-vs-wrong pairs
    assert main(argv) == 2  # refuses to overwrite
    assert main([*argv, "--overwrite=true"]) == 0  # replaces the data and the training run


def test_cai_sft_generate_only_with_a_critic_backend(tiny_random_model_dir, tmp_path, fake_judges):
    out = tmp_path / "cai"
    argv = ["cai-sft", *_flags({**SAMPLE, "model": tiny_random_model_dir, "critic": "fake", "rounds": 2,
                                "output_dir": out, "generate_only": True})]
    assert main(argv) == 0
    backend = fake_judges[0].backend
    rows = [json.loads(line) for line in (out / "cai_sft.jsonl").read_text().splitlines()]
    stats = json.loads((out / "stats.json").read_text())
    assert len(rows) == stats["sft_rows"] == 10 and stats["rounds"] == 2
    assert len(backend.calls) == 10 * 2 * 2  # critique + revision, 2 rounds
    principles = {p.name: p for p in load_principles()}
    for row in rows:
        assert len(row["chain"]) == 2
        last = row["chain"][-1]
        assert row["completion"] == last["revision"] and last["revision"].startswith(" revised #")
        assert last["critique"].startswith("critique of")
        assert last["critique_request"] == principles[last["principle"]].critique
        assert last["revision_request"] == principles[last["principle"]].revision
        assert row["initial_response"] != row["completion"] and "final_correct" in row
    # round 2 critiques the round-1 revision (prompt + latest answer only)
    assert backend.calls[20][1]["content"].startswith(" revised #")
    validate_rows(load_rows(str(out / "cai_sft.jsonl"), kind="sft"), kind="sft")
    assert sum(stats["principles"].values()) == 20


def test_cai_sft_with_the_policy_as_critic_then_sft(tiny_random_model_dir, tmp_path):
    sft_cfg = tmp_path / "sft.yaml"
    sft_cfg.write_text(yaml.safe_dump({"max_steps": 1, "batch_size": 2, "progress": False, "warmup_steps": 0,
                                        "eval_holdout": 0.5}))
    out = tmp_path / "cai"
    assert main(["cai-sft", *_flags({**SAMPLE, "num_prompts": 4, "model": tiny_random_model_dir,
                                     "output_dir": out, "sft_config": sft_cfg, "principle": "correct"})]) == 0
    stats = json.loads((out / "stats.json").read_text())
    rows = [json.loads(line) for line in (out / "cai_sft.jsonl").read_text().splitlines()]
    assert stats["principles"] == {"correct": 4} and stats["sft_rows"] + stats["dropped_empty"] == 4
    assert all(r["completion"].strip() for r in rows)
    assert stats["sft"]["output_dir"] == str(out / "sft") and (out / "sft" / "final").is_dir()


# -- LMGT ----------------------------------------------------------------------------------------

def _base(prompts, completions, **_):
    return [None if "nobase" in c else 1.0 if "right" in c else 0.0 for c in completions]


def test_lmgt_adds_scaled_shifts_caches_and_reports():
    judge = FakeJudge()
    reward = LMGTReward(_base, judge, scale=0.5, decay=0.2, knowledge="tips")
    completions = ["right good", "wrong bad", "right", "wrong fail", "nobase good", "right good"]
    values = reward(["p"] * 6, completions)
    assert values == [1.5, -0.5, 1.0, 0.0, None, 1.5]
    assert judge.shift_calls == [(["right good", "wrong bad", "right", "wrong fail"], "tips")]  # dup shares a call
    metrics = reward.after_step(0)
    assert metrics["lmgt/shift_plus"] == 2 and metrics["lmgt/shift_minus"] == 1 and metrics["lmgt/shift_zero"] == 1
    assert metrics["lmgt/failed"] == 1 and metrics["lmgt/calls"] == 4 and metrics["lmgt/cache_hits"] == 1
    assert metrics["lmgt/scale"] == 0.5 and metrics["lmgt/cache_size"] == 3
    # base mean over valid = (1+0+1+0+1)/5 = 0.6: +1 on 1.0 agrees, −1 on 0.0 agrees
    assert metrics["lmgt/agreement_base"] == 1.0 and "lmgt/agreement_verifier" not in metrics

    values = reward(["p"] * 3, ["right good", "wrong fail", "new bad"])
    assert values == [pytest.approx(1 + 0.4), 0.0, pytest.approx(-0.4)]  # scale_1 = 0.5·(1 − 0.2)
    assert judge.shift_calls[-1][0] == ["wrong fail", "new bad"]  # failures are not cached
    metrics = reward.after_step(1)
    assert metrics["lmgt/cache_hits"] == 1 and metrics["lmgt/calls_total"] == 6
    assert reward.current_scale() == pytest.approx(0.5 * 0.8 ** 2)
    assert reward.eval_fn is _base

    again = LMGTReward(_base, FakeJudge())
    again.load_state_dict(reward.state_dict())
    assert again.step == 2 and again.cache == reward.cache
    assert sample_key([{"role": "user", "content": "p"}], "c") != sample_key("p", "c")


def test_lmgt_call_fraction_is_seeded_and_unsent_samples_are_neutral():
    completions = [f"good {i}" for i in range(200)]
    runs = []
    for _ in range(2):
        reward = LMGTReward(_base, FakeJudge(), call_fraction=0.25, seed=3)
        values = reward(["p"] * 200, completions)
        metrics = reward.after_step(0)
        runs.append(values)
        assert metrics["lmgt/calls"] + metrics["lmgt/not_called"] == 200
        assert 25 <= metrics["lmgt/calls"] <= 75
        assert sum(v == 1.0 for v in values) == metrics["lmgt/calls"]
    assert runs[0] == runs[1]


def test_lmgt_agreement_with_the_verifier_and_judge_errors():
    task = get_task("arithmetic")

    class Raising(FakeJudge):
        def shift(self, prompts, completions, *, knowledge=None):
            raise TimeoutError("judge down")

    reward = LMGTReward(lambda p, c, **_: [0.0] * len(c), FakeJudge(), task=task)
    values, _ = call_reward(reward, ["1+1=?", "1+1=?", "1+1=?"], [" good #2", " good #3", " bad #3"],
                            {"answer": ["2", "2", "2"]})
    assert values == [1.0, 1.0, -1.0]
    metrics = reward.after_step(0)
    assert metrics["lmgt/agreement_verifier"] == pytest.approx(2 / 3) and "lmgt/agreement_base" not in metrics
    broken = LMGTReward(_base, Raising())
    assert broken(["p", "p"], ["right", "wrong"]) == [1.0, 0.0]
    assert broken.after_step(0)["lmgt/failed"] == 2
    with pytest.raises(RewardError, match="decay must be in"):
        LMGTReward(_base, FakeJudge(), decay=1.0)
    assert d_rlaif_rewards([10.0, 1.0, 5.5, None]) == [1.0, -1.0, 0.0, None]


GRPO_FAST = {"task_size": 32, "eval_size": 8, "eval_generate": 8, "batch_size": 2, "group_size": 4,
             "max_new_tokens": 8, "progress": False, "log_every": 1, "threads": 1, "max_steps": 2,
             "device": "cpu"}


def test_grpo_with_the_lmgt_reward_logs_shift_metrics(tiny_random_model_dir, tmp_path, fake_judges):
    knowledge = tmp_path / "wiki.txt"
    knowledge.write_text("add left to right")
    out = tmp_path / "grpo"
    assert main(["grpo", *_flags({**GRPO_FAST, "model": tiny_random_model_dir, "output_dir": out,
                                  "reward": "lmgt", "judge": "hash", "lmgt_scale": 0.5,
                                  "lmgt_knowledge": knowledge})]) == 0
    (judge,) = fake_judges
    assert judge.options["prompts"] == "standard" and judge.shift_calls[0][1] == "add left to right"
    train = [m for m in read_metrics(out) if m["split"] == "train"]
    assert len(train) == 2
    for m in train:
        assert m["lmgt/shift_plus"] + m["lmgt/shift_zero"] + m["lmgt/shift_minus"] + m["lmgt/not_called"] \
            + m["lmgt/failed"] == 8
        assert m["lmgt/scale"] == 0.5
        if m["lmgt/shift_plus"] + m["lmgt/shift_minus"]:
            assert 0 <= m["lmgt/agreement_verifier"] <= 1
    assert train[-1]["lmgt/calls_total"] == sum(m["lmgt/calls"] for m in train)
    evals = [m for m in read_metrics(out) if m["split"] == "eval"]
    assert all(0.0 <= m["reward"] <= 1.0 for m in evals)  # evaluation scores the base reward only
    assert main(["grpo", *_flags({**GRPO_FAST, "model": tiny_random_model_dir, "output_dir": tmp_path / "x",
                                  "reward": "lmgt"})]) == 2  # no --judge


# -- documentation stays true to the dataclasses ---------------------------------------------------

def _doc_rows(text: str) -> dict[str, str]:
    return dict(re.findall(r"^\| `(--[a-z0-9-]+)` \| `([^`]*)` \|", text, flags=re.MULTILINE))


def _defaults(*classes) -> dict[str, object]:
    return {"--" + f.name.replace("_", "-"): f.default for cls in classes for f in dataclasses.fields(cls)}


def _check_table(rows: dict[str, str], cls, expected: set[str]) -> None:
    from rlxf.config import coerce

    assert set(rows) == expected
    defaults = _defaults(cls)
    for flag, text in rows.items():
        assert coerce(cls, flag[2:].replace("-", "_"), text) == defaults[flag], flag


def test_option_tables_match_the_config_defaults():
    from rlxf.workflows.ai_feedback import SamplingOptions
    from rlxf.workflows.cai import CAISFTConfig
    from rlxf.recipes.grpo import GRPOConfig

    docs = Path(__file__).resolve().parents[1] / "docs" / "methods"
    text = (docs / "rlaif.md").read_text()
    cai, rest = text.split("Options of `rlxf cai-sft`")[1].split("Options of `rlxf rlaif`")
    rlaif, shared = rest.split("Shared options of")
    shared_flags = set(_defaults(SamplingOptions))
    _check_table(_doc_rows(cai), CAISFTConfig, set(_defaults(CAISFTConfig)) - shared_flags)
    _check_table(_doc_rows(rlaif), RLAIFConfig, set(_defaults(RLAIFConfig)) - shared_flags)
    _check_table(_doc_rows(shared), SamplingOptions, shared_flags)
    lmgt = {"--judge", "--judge-model", "--judge-prompts"}
    lmgt |= {k for k in _defaults(GRPOConfig) if k.startswith("--lmgt-")}
    _check_table(_doc_rows((docs / "lmgt.md").read_text()), GRPOConfig, lmgt)
    # prose mentions only real flags
    from rlxf.recipes.reward_model import RewardModelConfig

    known = set(_defaults(CAISFTConfig, RLAIFConfig, RewardModelConfig, GRPOConfig))
    for name in ("rlaif.md", "lmgt.md"):
        used = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*", (docs / name).read_text()))
        assert used <= known, f"{name}: {sorted(used - known)}"
