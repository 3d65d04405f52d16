"""COOPER: the VerifyRM input, negatives, pair building, the contrastive step, state, and runs end to end.

How accurate the pretrained VerifyRM gets on the embedded tiny model is measured in
docs/methods/cooper.md (too slow for the test suite).
"""

from __future__ import annotations

import io
import json
import random

import pytest
import torch

from rlxf.cli import main
from rlxf.config import ConfigError, build_config
from rlxf.recipes.cooper import CooperConfig
from rlxf.reporting import read_metrics
from rlxf.rewards import RewardError, get_reward
from rlxf.rewards.cooper import (CooperReward, contrastive_loss, corrupt_final_answer, encode_verify_input,
                                 evaluate_verify_rm, pretrain_verify_rm, truncate_before_answer,
                                 verification_examples, verify_logits)
from rlxf.tasks import extract_answer
from rlxf.tasks import get_task

FAST = {"task_size": 64, "eval_size": 16, "eval_generate": 16, "batch_size": 4, "group_size": 4,
        "max_new_tokens": 12, "progress": False, "log_every": 1, "threads": 1,
        "cooper_pretrain_steps": 2, "cooper_pretrain_batch_size": 8, "cooper_eval_size": 16}


pytestmark = pytest.mark.usefixtures("one_thread")


def _flags(values: dict) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in values.items()]


@pytest.fixture(scope="module")
def rm_factory(tiny_random_model_dir):
    """Fresh reward models (same init) from the random tiny checkpoint."""
    from rlxf.models import load_reward_model

    def make(seed: int = 0):
        torch.manual_seed(seed)
        return load_reward_model(str(tiny_random_model_dir), dtype="float32", device="cpu", pad_token_id=0)
    return make


def _reward(rm, tokenizer, **kwargs) -> CooperReward:
    return CooperReward(rm, tokenizer, get_task("arithmetic"), group_size=4, eval_size=16, **kwargs)


# -- input and negatives --------------------------------------------------------------------------

def test_the_paper_template_encodes_without_unknown_tokens_and_keeps_the_answer_when_cut(tokenizer):
    ids = encode_verify_input(tokenizer, "23+45-12=?", "56", " 23+45=68, 68-12=56. #56")
    text = tokenizer.decode(ids)
    assert tokenizer.unk_token_id not in ids
    assert text == ("<bos><question>23+45-12=?</question>\n<reference_answer>56</reference_answer>\n"
                    "<completion> 23+45=68, 68-12=56. #56</completion><eos>")
    cut = encode_verify_input(tokenizer, "1+2=?", "3", "x" * 300 + " #3", max_length=120)
    assert len(cut) == 120 and tokenizer.decode(cut).endswith("xx #3</completion><eos>")


@pytest.mark.parametrize("task_name", ["arithmetic", "sorting"])
def test_corruption_always_changes_the_final_answer_and_the_verifier_rejects_it(task_name):
    task = get_task(task_name)
    rng = random.Random(0)
    for p in task.problems("train", 200, seed=1):
        positive = task.solve(p, verbose=rng.random() < 0.5, rng=rng)
        negative = corrupt_final_answer(positive, rng)
        assert negative is not None and negative != positive
        assert task.verify(positive, p.answer)
        assert not task.verify(negative, p.answer), (positive, negative)  # its first number moved by ≠ 0
        assert negative[:negative.rfind("#")] == positive[:positive.rfind("#")]  # only the answer changed


def test_corruption_reads_the_answer_where_the_verifier_does():
    rng = random.Random(0)
    corrupted = corrupt_final_answer(" 2+3=5. #5\n\nmore #5", rng)
    assert corrupted.endswith("\n\nmore #5") and not corrupted.startswith(" 2+3=5. #5\n")
    assert corrupt_final_answer(" no marker 5", rng) is None
    assert corrupt_final_answer(" 2+3=5. #five", rng) is None
    assert corrupt_final_answer(" #-7", random.Random(1)) != " #-7"


def test_truncation_drops_the_final_answer():
    rng = random.Random(0)
    for _ in range(50):
        stub = truncate_before_answer(" 55+97=152. #152", rng)
        assert stub and " 55+97=152. ".startswith(stub) and extract_answer(stub) is None
    assert truncate_before_answer(" 152", rng) is None and truncate_before_answer("#152", rng) is None


# -- pairs -----------------------------------------------------------------------------------------

def test_the_positive_is_the_first_verified_completion_of_each_group(rm_factory, tokenizer):
    reward = _reward(rm_factory(), tokenizer, pretrain=None)
    prompts = ["2+3=?"] * 4 + ["9-4=?"] * 4
    completions = [" 2+3=6. #6", " 2+3=5. #5", " 2+3=4. #4", " Let me see. 2+3=5. #5",   # first correct: index 1
                   " 9-4=4. #4", " 9-4=6. #6", " 9-4=3. #3", " 9-4=7. #7"]               # none correct
    scores = reward(prompts, completions, answer=["5"] * 4 + ["5"] * 4)
    assert len(scores) == 8 and all(0 < s < 1 for s in scores)
    pairs = reward.build_pairs(step=0)
    assert len(pairs) == 1
    question, answer, positive, negative = pairs[0]
    assert (question, answer, positive) == ("2+3=?", "5", " 2+3=5. #5")
    assert not get_task("arithmetic").verify(negative, "5")
    assert reward.build_pairs(step=0) == pairs  # deterministic given (seed, step)


def test_mixed_negatives_are_slips_or_stubs_and_all_fail_the_verifier(rm_factory, tokenizer):
    task = get_task("arithmetic")
    problems = task.problems("train", 40, seed=2)
    reward = _reward(rm_factory(), tokenizer, pretrain=None, negatives="mixed")
    reward._stash["positives"] = [(p.prompt, p.answer, task.solve(p, verbose=False)) for p in problems]
    pairs = reward.build_pairs(step=3)
    assert len(pairs) == 40 and not any(task.verify(neg, a) for _, a, _, neg in pairs)
    stubs = sum(extract_answer(neg) is None for *_, neg in pairs)
    assert 10 < stubs < 30  # about half are cut before the answer, the rest have a shifted answer


def test_no_positive_means_no_pair_and_no_update(rm_factory, tokenizer):
    reward = _reward(rm_factory(), tokenizer, pretrain=None)
    before = [p.clone() for p in reward.model.parameters()]
    reward(["2+3=?"] * 4, [" #4", " #6", " 2+3=7. #7", " no answer"], answer=["5"] * 4)
    metrics = reward.after_step(0)
    assert metrics["rm/pairs"] == 0 and metrics["rm/groups"] == 1 and "rm/update_loss" not in metrics
    assert all(torch.equal(a, b) for a, b in zip(before, reward.model.parameters()))


def test_a_greedy_eval_batch_is_never_used_for_updates(rm_factory, tokenizer):
    reward = _reward(rm_factory(), tokenizer, pretrain=None)
    reward([f"{i}+1=?" for i in range(8)], [f" #{i + 1}" for i in range(8)], answer=[str(i + 1) for i in range(8)])
    assert reward.after_step(0)["rm/pairs"] == 0


# -- the contrastive step --------------------------------------------------------------------------

def test_contrastive_loss_matches_the_spec_formula():
    pos, neg = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 0.0, 0.5])
    want = -sum(torch.log(torch.sigmoid(p - n)) for p, n in zip(pos, neg)) / 3
    torch.testing.assert_close(contrastive_loss(pos, neg), want)


@pytest.mark.slow
def test_the_contrastive_step_lowers_the_loss_on_a_fixed_batch(rm_factory, tokenizer):
    """Measured: 0.693 → 0.448 after 20 steps at lr 3e-4 (random 2-layer model, 8 pairs; 1 thread)."""
    task, rng = get_task("arithmetic"), random.Random(0)
    pairs = []
    for p in task.problems("train", 8, seed=0):
        positive = task.solve(p, verbose=False, rng=rng)
        pairs.append((p.prompt, p.answer, positive, corrupt_final_answer(positive, rng)))
    reward = _reward(rm_factory(), tokenizer, pretrain=None, lr=3e-4)
    losses = [reward.contrastive_step(pairs)["rm/update_loss"] for _ in range(20)]
    assert losses[0] == pytest.approx(0.693, abs=0.02)  # a fresh head scores both alike
    assert losses[-1] < 0.75 * losses[0] and losses[-1] < losses[9], losses
    assert reward.updates == 20


# -- state, pretraining, evaluation ---------------------------------------------------------------

@pytest.mark.slow
def test_state_round_trip_restores_scores_optimizer_and_skips_pretraining(rm_factory, tokenizer):
    prompts, answers = ["2+3=?"] * 4, ["5"] * 4
    completions = [" 2+3=6. #6", " 2+3=5. #5", " #5", " #4"]
    first = _reward(rm_factory(0), tokenizer, pretrain=None, lr=1e-3)
    first(prompts, completions, answer=answers)
    first.after_step(0)                                   # one update: optimizer state is non-trivial
    second = _reward(rm_factory(1), tokenizer, pretrain={"steps": 50, "lr": 1e-3, "batch_size": 8}, lr=1e-3)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)               # as the loop does: reward.pt in the checkpoint
    buffer.seek(0)
    second.load_state_dict(torch.load(buffer, weights_only=True))
    assert second(prompts, completions, answer=answers) == first(prompts, completions, answer=answers)
    a, b = first.after_step(1), second.after_step(1)      # the next update is identical too
    assert a == b and a["rm/updates"] == 2
    assert all(torch.equal(x, y) for x, y in zip(first.model.parameters(), second.model.parameters()))
    assert "rm/pretrain_steps" not in second.evaluate()  # loading state replaced pretraining


@pytest.mark.slow
def test_pretraining_runs_once_on_first_use_and_leaves_the_global_rng_alone(rm_factory, tokenizer):
    reward = _reward(rm_factory(), tokenizer, pretrain={"steps": 3, "lr": 1e-3, "batch_size": 8})
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    metrics = reward.evaluate()
    assert torch.equal(torch.rand(3), want)
    assert metrics["rm/pretrain_steps"] == 3 and metrics["rm/pretrain_loss"] > 0
    for key in ("rm/accuracy", "rm/auc", "rm/pair_accuracy", "rm/score_pos", "rm/score_neg"):
        assert 0 <= metrics[key] <= 1, key
    assert "rm/pretrain_steps" not in reward.evaluate()


def test_evaluation_metrics_on_hand_made_scores(monkeypatch, tokenizer):
    examples = verification_examples(get_task("arithmetic"), "eval", 8, seed=0)
    assert [e.label for e in examples] == [1, 0] * 4
    logits = torch.tensor([2.0, -1.0, 0.5, 1.0, -0.5, -2.0, 3.0, 0.2])  # pair 2 inverted; rows 3, 4, 7 misread
    monkeypatch.setattr("rlxf.rewards.cooper.verify_logits", lambda *a, **k: logits)
    metrics = evaluate_verify_rm(None, tokenizer, examples)
    assert metrics["rm/accuracy"] == pytest.approx(5 / 8)
    assert metrics["rm/pair_accuracy"] == pytest.approx(3 / 4)
    pos, neg = logits[0::2], logits[1::2]
    assert metrics["rm/auc"] == pytest.approx(float((pos[:, None] > neg[None, :]).float().mean()))


@pytest.mark.slow
def test_pretraining_trains_the_model_and_reports_its_metrics(rm_factory, tokenizer):
    model = rm_factory()
    before = [p.clone() for p in model.parameters()]
    metrics = pretrain_verify_rm(model, tokenizer, get_task("arithmetic"), steps=3, lr=1e-3, batch_size=8, seed=0)
    assert metrics["rm/pretrain_steps"] == 3 and 0 < metrics["rm/pretrain_loss"] < 2
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert pretrain_verify_rm(model, tokenizer, get_task("arithmetic"), steps=0, lr=1e-3, batch_size=8,
                              seed=0) == {"rm/pretrain_steps": 0}


# -- config and registry ---------------------------------------------------------------------------

def test_config_defaults_and_validation():
    cfg = build_config(CooperConfig, {})
    assert (cfg.reward, cfg.cooper_update, cfg.beta, cfg.kl_kind) == ("cooper", True, 0.001, "k3")
    with pytest.raises(ConfigError, match="task dataset"):
        build_config(CooperConfig, {"dataset": "prompts.jsonl"})
    with pytest.raises(ConfigError, match="rlxf grpo"):
        build_config(CooperConfig, {"reward": "verifiable"})
    with pytest.raises(ConfigError, match="cooper_rm_lr 0.0 is out of range"):
        build_config(CooperConfig, {"cooper_rm_lr": 0})
    with pytest.raises(ConfigError, match="cooper-negatives"):
        build_config(CooperConfig, {"cooper_negatives": "llm"})


def test_the_registered_reward_takes_its_own_options(tokenizer):
    """The factory reads no recipe config: its options come as keywords (``rlxf cooper`` builds them
    with CooperConfig.reward_options)."""
    with pytest.raises(RewardError, match="rm_path"):
        get_reward("cooper", tokenizer=tokenizer, task=get_task("arithmetic"))
    with pytest.raises(RewardError, match="task"):
        get_reward("cooper", tokenizer=tokenizer, task=None, **build_config(CooperConfig, {}).reward_options())
    options = build_config(CooperConfig, {"cooper_rm_lr": 1e-4, "output_dir": "x"}).reward_options()
    assert options["rm_lr"] == 1e-4 and options["pretrain"]["steps"] == 800 and str(options["save_dir"]) == "x/verify_rm"


# -- end to end --------------------------------------------------------------------------------------

def _rows(out, split):
    return [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == split]


@pytest.mark.slow
def test_a_cooper_run_logs_rm_metrics_and_checkpoints_the_rm(tiny_random_model_dir, tmp_path):
    out = tmp_path / "run"
    assert main(["cooper", *_flags({**FAST, "model": tiny_random_model_dir, "output_dir": out, "max_steps": 2})]) == 0
    train, evals = _rows(out, "train"), _rows(out, "eval")
    assert [r["step"] for r in train] == [1, 2]
    assert all("rm/pairs" in r and "rm/groups" in r and "rm/score_wrong" in r for r in train)
    assert [r["step"] for r in evals] == [0, 2]
    assert all("rm/accuracy" in r and "rm/auc" in r for r in evals)
    assert evals[0]["rm/pretrain_steps"] == 2
    assert (out / "checkpoints" / "step-2" / "reward.pt").exists()
    assert (out / "verify_rm" / "config.json").exists()
    assert json.loads((out / "summary.json").read_text())["recipe"] == "cooper"


@pytest.mark.slow
def test_cooper_updates_the_rm_and_the_static_baseline_does_not(tmp_path):
    """On the embedded tiny model (≈30% correct), rollouts give positives, hence pairs."""
    common = {**FAST, "model": "tiny", "max_new_tokens": 32, "max_steps": 2, "eval_generate": 8}
    cooper, static = tmp_path / "cooper", tmp_path / "static"
    assert main(["cooper", *_flags({**common, "output_dir": cooper})]) == 0
    # the static run starts from the RM the first run pretrained and saved
    assert main(["cooper", *_flags({**common, "output_dir": static, "cooper_update": "false",
                                    "cooper_rm": cooper / "verify_rm"})]) == 0
    updated, frozen = _rows(cooper, "train"), _rows(static, "train")
    assert sum(r["rm/pairs"] for r in updated) > 0
    assert all(("rm/update_loss" in r) == (r["rm/pairs"] > 0) for r in updated)
    assert sum(r["rm/pairs"] for r in frozen) > 0 and not any("rm/update_loss" in r for r in frozen)
    assert _rows(static, "eval")[0]["rm/accuracy"] == _rows(cooper, "eval")[0]["rm/accuracy"]


@pytest.mark.slow
def test_resume_restores_the_co_trained_rm_exactly(tmp_path):
    common = {**FAST, "model": "tiny", "max_new_tokens": 32, "eval_generate": 8, "save_every": 1, "eval_every": 1}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["cooper", *_flags({**common, "output_dir": straight, "max_steps": 2})]) == 0
    assert main(["cooper", *_flags({**common, "output_dir": resumed, "max_steps": 1})]) == 0
    assert main(["cooper", *_flags({**common, "output_dir": resumed, "max_steps": 2, "resume": "true"})]) == 0
    skip = ("time", "sample_tokens_per_s", "train_tokens_per_s")
    for split in ("train", "eval"):
        a, b = (next(r for r in _rows(run, split) if r["step"] == 2) for run in (straight, resumed))
        assert {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}
    assert any(r.get("rm/updates") for r in _rows(straight, "train"))


def test_the_example_compare_spec_plans_three_cooper_runs(tmp_path):
    from pathlib import Path

    from rlxf.workflows.compare import load_spec, plan_runs

    spec, source = load_spec(Path(__file__).parents[1] / "examples" / "compare_cooper_static.yaml")
    runs = {run.label: run.config for run in plan_runs(spec, output_dir=tmp_path, source=source)}
    assert list(runs) == ["cooper", "static", "cooper_mixed"]
    assert runs["cooper"].cooper_update and runs["cooper"].cooper_rm is None
    assert not runs["static"].cooper_update and runs["static"].cooper_rm.endswith("cooper/verify_rm")
    assert runs["cooper_mixed"].cooper_negatives == "mixed"
