"""rlxf.rewards: the contract's safe call, the registry, built-ins vs slow references, model-based rewards."""

import math
import random
import sys

import pytest
import torch

from rlxf.rewards import (
    REWARDS,
    LikelihoodReward,
    RewardError,
    RewardModelReward,
    call_reward,
    combine,
    exact_match,
    format_reward,
    get_reward,
    kimi_length_reward,
    list_rewards,
    numeric_match,
    overlong_penalty,
    parse_number,
    rlpr_reward,
    split_reasoning,
    task_reward,
    vr_cli_reward,
    weighted,
)
from rlxf.tasks import get_task

# ---------------------------------------------------------------------------------------------
# Slow references: Python loops over plain floats.
# ---------------------------------------------------------------------------------------------


def ref_kimi(lengths, correct, group_size):
    out = []
    for start in range(0, len(lengths), group_size):
        group = lengths[start:start + group_size]
        lo, hi = min(group), max(group)
        for length, ok in zip(group, correct[start:start + group_size]):
            if hi == lo:
                out.append(0.0)
                continue
            lam = 0.5 - (length - lo) / (hi - lo)
            out.append(lam if ok else min(0.0, lam))
    return out


def ref_overlong(length, max_len, buffer, factor):
    if length <= max_len - buffer:
        return 0.0
    if length <= max_len:
        return ((max_len - buffer) - length) / buffer * factor
    return -factor


# ---------------------------------------------------------------------------------------------
# length terms
# ---------------------------------------------------------------------------------------------


def test_kimi_hand_computed():
    # group 1: λ = [0.5, 0, -0.5]; the wrong one keeps min(0, λ) = -0.5
    # group 2: all lengths equal -> 0 for everyone, right or wrong
    # group 3: λ = [0.5, -0.5]; the short wrong answer is clipped to 0, the long right one keeps -0.5
    lengths = [10, 20, 30, 7, 7, 7, 10, 30]
    correct = [True, True, False, True, False, True, False, True]
    got = kimi_length_reward(lengths[:6], correct[:6], group_size=3)
    assert got == pytest.approx([0.5, 0.0, -0.5, 0.0, 0.0, 0.0])
    assert kimi_length_reward(lengths[6:], correct[6:], group_size=2) == pytest.approx([0.0, -0.5])


@pytest.mark.parametrize("group_size", [1, 2, 5, 8])
def test_kimi_matches_loop_on_random_inputs(group_size):
    rng = random.Random(group_size)
    n = group_size * 6
    lengths = [rng.randint(1, 12) for _ in range(n)]  # small range: ties and all-equal groups happen
    correct = [rng.random() < 0.5 for _ in range(n)]
    expected = ref_kimi(lengths, correct, group_size)
    assert kimi_length_reward(lengths, correct, group_size) == pytest.approx(expected, abs=1e-12)
    as_tensors = kimi_length_reward(torch.tensor(lengths), torch.tensor(correct), group_size)
    assert as_tensors == pytest.approx(expected, abs=1e-12)
    assert all(v <= 0.0 for v, ok in zip(expected, correct) if not ok)


def test_kimi_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of group_size"):
        kimi_length_reward([1, 2, 3], [True] * 3, group_size=2)
    with pytest.raises(ValueError, match="None"):
        kimi_length_reward([1, 2], [True, None], group_size=2)
    with pytest.raises(ValueError, match="2 lengths but 3"):
        kimi_length_reward([1, 2], [True] * 3, group_size=2)


def test_overlong_boundaries():
    # L_max = 20, L_cache = 5: free up to 15, linear to -1 at 20, -1 beyond
    assert overlong_penalty([0, 15, 16, 18, 20, 21, 100], max_len=20, buffer=5) == pytest.approx(
        [0.0, 0.0, -0.2, -0.6, -1.0, -1.0, -1.0])
    assert overlong_penalty([16, 21], max_len=20, buffer=5, factor=0.5) == pytest.approx([-0.1, -0.5])
    assert overlong_penalty([20, 21], max_len=20, buffer=0) == pytest.approx([0.0, -1.0])
    rng = random.Random(0)
    lengths = [rng.randint(0, 40) for _ in range(200)]
    assert overlong_penalty(torch.tensor(lengths), 30, 8, 0.7) == pytest.approx(
        [ref_overlong(n, 30, 8, 0.7) for n in lengths], abs=1e-12)
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty([1], max_len=10, buffer=11)


# ---------------------------------------------------------------------------------------------
# verifiable rewards
# ---------------------------------------------------------------------------------------------


def test_exact_match():
    completions = [" 2+3=5. #5", " 2+3=6. #6", "  hello \n  world ", "#  a  b ", "#5", "anything"]
    answers = ["5", "5", "hello world", "a b", 5, None]
    assert exact_match([""] * 6, completions, answer=answers) == [1.0, 0.0, 1.0, 1.0, 1.0, None]
    with pytest.raises(RewardError, match="'answer'"):
        exact_match(["p"], ["c"])


def test_numeric_match():
    completions = ["#1,234.0", "so x = -3.5", " 30-42=-12. #-12", "no number here", "#7", "#3.14"]
    answers = ["1234", "-3.5", -12, "3", "not a number", "3.14159"]
    assert numeric_match([""] * 6, completions, answer=answers) == [1.0, 1.0, 1.0, 0.0, None, 0.0]
    loose = get_reward("numeric_match", abs_tol=0.01)
    assert loose([""], ["#3.14"], answer=["3.14159"]) == [1.0]
    assert [parse_number(t) for t in ("23-12", "x=-5", "1,2,3", "1e-3", "\u22127")] == [12, -5, 3, 0.001, -7]


def test_format_and_task_rewards():
    search = format_reward(r"#\d+")
    full = format_reward(r" .*#\d+", fullmatch=True)
    texts = [" 1+1=2. #2", "no marker", " x #2 trailing"]
    assert search([""] * 3, texts) == [1.0, 0.0, 1.0]
    assert full([""] * 3, texts) == [1.0, 0.0, 0.0]
    with pytest.raises(RewardError, match="not a valid regular expression"):
        format_reward("(")
    task = get_task("arithmetic")
    problems = task.problems("eval", 4)
    good = [task.solve(p, verbose=False) for p in problems]
    bad = [task.solve(p, verbose=True, wrong=True) for p in problems]
    verify = task_reward("arithmetic")
    assert verify([""] * 8, good + bad, answer=[p.answer for p in problems] * 2) == [1.0] * 4 + [0.0] * 4
    assert get_reward("verifiable", task="arithmetic", model=object())(
        [""], [good[0]], answer=[problems[0].answer]) == [1.0]
    assert get_reward("verifiable") is exact_match


# ---------------------------------------------------------------------------------------------
# call_reward: failure isolation and programming errors
# ---------------------------------------------------------------------------------------------


def fragile(prompts, completions, answer):
    out = []
    for completion, a in zip(completions, answer):
        if a == "boom":
            raise ValueError("cannot score this one")
        out.append({"nan": math.nan, "inf": math.inf, "text": "high", "none": None}.get(a, float(len(completion))))
    return out


def test_call_reward_isolates_failures():
    answers = ["x", "boom", "nan", "x", "inf", "text", "none"]
    values, stats = call_reward(fragile, ["p"] * 7, ["a", "bb", "c", "dddd", "e", "f", "g"], {"answer": answers})
    assert values == [1.0, None, None, 4.0, None, None, None]
    assert stats["retried"] is True
    assert (stats["none"], stats["errors"], stats["nonfinite"]) == (5, 2, 2)  # errors: raise + non-number
    assert stats["first_error"].startswith("batch of 7: ValueError: cannot score this one")

    values, stats = call_reward(fragile, ["p"] * 3, ["a", "b", "c"], {"answer": ["x", "nan", "x"]})
    assert values == [1.0, None, 1.0]
    assert (stats["retried"], stats["errors"], stats["nonfinite"], stats["none"]) == (False, 0, 1, 1)
    assert "sample 1" in stats["first_error"]
    values, _ = call_reward(lambda p, c: torch.tensor([0.5, 2.0]), ["p", "q"], ["a", "b"])
    assert values == [0.5, 2.0]


def test_call_reward_programming_errors():
    with pytest.raises(RewardError, match=r"'short' returned 1 values for 2 completions"):
        call_reward(lambda p, c: [1.0], ["p", "q"], ["a", "b"], name="short")
    with pytest.raises(RewardError, match="returned float"):
        call_reward(lambda p, c: 1.0, ["p"], ["a"])
    with pytest.raises(RewardError, match="row field 'answer' has 1 values for 2"):
        call_reward(exact_match, ["p", "q"], ["a", "b"], {"answer": ["a"]})
    with pytest.raises(RewardError, match="'answer'"):  # raised inside the function: not isolated
        call_reward(exact_match, ["p"], ["a"])


def test_combine_sums_and_exposes_components():
    fmt = format_reward(r"#\d+")

    def sometimes_none(prompts, completions, **_):
        return [None if c.startswith("?") else 1.0 for c in completions]

    reward = combine([(exact_match, 1.0), (fmt, 0.5, "format"), (sometimes_none, 2.0, "extra")])
    completions = ["#5", "#6", "?#5", "no"]
    values = reward(["p"] * 4, completions, answer=["5", "5", "5", "no"])
    assert values == [1.0 + 0.5 + 2.0, 0.5 + 2.0, None, 1.0 + 2.0]
    assert reward.last_components["exact_match"] == [1.0, 0.0, 1.0, 1.0]
    assert reward.last_components["extra"] == [1.0, 1.0, None, 1.0]
    assert reward.last_stats["extra"]["none"] == 1
    both = weighted({"a": (fragile, 1.0), "b": (fmt, 1.0)})
    assert both(["p"] * 2, ["#1", "#22"], answer=["x", "boom"]) == [2.0 + 1.0, None]
    assert both.last_stats["a"]["errors"] == 1
    with pytest.raises(ValueError, match="unique"):
        combine([(fmt, 1.0), (fmt, 2.0)])


# ---------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------

USER_CODE = """
LIMIT = 3

def short_is_good(prompts, completions, **fields):
    return [1.0 if len(c) <= LIMIT else 0.0 for c in completions]
"""


def test_registry_names_and_factories():
    builtins = {"exact_match", "numeric_match", "verifiable", "format", "likelihood", "reward_model"}
    assert builtins <= set(list_rewards())
    assert REWARDS["exact_match"].target is exact_match and not REWARDS["exact_match"].factory
    assert get_reward("format", pattern="^#")([""] * 2, ["#1", "1#"]) == [1.0, 0.0]
    with pytest.raises(RewardError, match=r"needs 'pattern'"):
        get_reward("format")
    with pytest.raises(RewardError, match="unknown reward 'nope'.*exact_match.*module:function"):
        get_reward("nope")
    with pytest.raises(RewardError, match="scorer='reference' needs a scoring model: pass ref_model"):
        get_reward("likelihood", tokenizer=object(), model=object(), scorer="reference")
    with pytest.raises(RewardError, match="needs a scoring model"):
        get_reward("likelihood", tokenizer=object())
    with pytest.raises(RewardError, match="needs a trained reward model"):
        get_reward("reward_model")


def test_user_function_from_module_and_file(tmp_path, monkeypatch):
    (tmp_path / "rlxf_test_user_rewards.py").write_text(USER_CODE)
    monkeypatch.syspath_prepend(str(tmp_path))
    by_module = get_reward("rlxf_test_user_rewards:short_is_good")
    by_file = get_reward(f"{tmp_path / 'rlxf_test_user_rewards.py'}:short_is_good")
    for fn in (by_module, by_file):
        assert fn(["p", "p"], ["abc", "abcd"]) == [1.0, 0.0]
    monkeypatch.delitem(sys.modules, "rlxf_test_user_rewards")

    with pytest.raises(RewardError, match="module 'no_such_module_xyz' not found.*PYTHONPATH"):
        get_reward("no_such_module_xyz:fn")
    with pytest.raises(RewardError, match="has no attribute 'missing'.*short_is_good"):
        get_reward("rlxf_test_user_rewards:missing")
    with pytest.raises(RewardError, match="'LIMIT' is a int, not a function"):
        get_reward(f"{tmp_path}/rlxf_test_user_rewards.py:LIMIT")
    with pytest.raises(RewardError, match="file .*nothere.py' not found"):
        get_reward(f"{tmp_path}/nothere.py:fn")
    (tmp_path / "broken.py").write_text("import not_installed_pkg_xyz\n")
    with pytest.raises(RewardError, match="running .*broken.py raised ModuleNotFoundError"):
        get_reward(f"{tmp_path}/broken.py:fn")
    (tmp_path / "uses_missing.py").write_text("import not_installed_pkg_xyz\n")
    with pytest.raises(RewardError, match="imports 'not_installed_pkg_xyz', which is not installed"):
        get_reward("uses_missing:fn")


# ---------------------------------------------------------------------------------------------
# likelihood rewards on the embedded tiny model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    from rlxf.models import load_policy, load_tokenizer

    return load_policy("tiny", device="cpu", dtype="float32"), load_tokenizer("tiny")


def test_pure_transforms():
    improvements = [-5.0, 0.0, 0.049, 0.05, 0.99, 1.0, 1.99, 2.0, 50.0]
    assert [vr_cli_reward(i) for i in improvements] == [0.0, 0.0, 0.0, 0.5, 0.5, 0.9, 0.9, 1.0, 1.0]
    assert rlpr_reward(0.9, 0.2, True, 0.1) == pytest.approx(0.9 * 0.7 + 0.1)
    assert rlpr_reward(0.1, 0.5, False, 0.1) == 0.0
    assert split_reasoning(" 1+2=3. #3", "#") == " 1+2=3. "
    assert split_reasoning("no marker", "#") == "no marker"


def slow_answer_logps(model, tokenizer, prompt, reasoning, answer_text):
    """One sequence, plain forward, float64 log_softmax."""
    context = tokenizer(prompt)["input_ids"] + (tokenizer(reasoning, add_special_tokens=False)["input_ids"]
                                                if reasoning else [])
    target = tokenizer(answer_text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([context + target])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)  # [T, V]
    return [logprobs[len(context) - 1 + k, tok].item() for k, tok in enumerate(target)]


@pytest.mark.slow
def test_likelihood_matches_slow_reference(tiny):
    from rlxf.models import Reference

    model, tokenizer = tiny
    task = get_task("arithmetic")
    problems = task.problems("eval", 3)
    prompts = [p.prompt for p in problems] * 2 + ["1+1=?"]
    completions = ([task.solve(p, verbose=False) for p in problems]
                   + [task.solve(p, verbose=True, wrong=True) for p in problems] + ["no marker"])
    answers = [p.answer for p in problems] * 2 + [None]
    per_row = [slow_answer_logps(model, tokenizer, p, split_reasoning(c, "#"), f"#{a}")
               for p, c, a in zip(prompts[:6], completions[:6], answers[:6])]
    base = [slow_answer_logps(model, tokenizer, p, "", f"#{a}") for p, a in zip(prompts[:6], answers[:6])]

    rlpr = LikelihoodReward(model, tokenizer, batch_size=4)
    values = rlpr(prompts, completions, answer=answers)
    mean_prob = [sum(math.exp(x) for x in lp) / len(lp) for lp in per_row]
    base_prob = [sum(math.exp(x) for x in lp) / len(lp) for lp in base]
    assert rlpr.last_raw[:6] == pytest.approx(mean_prob, abs=1e-5)
    assert rlpr.last_baseline[:6] == pytest.approx(base_prob, abs=1e-5)
    assert values[:6] == pytest.approx([rlpr_reward(p, b, True, 0.1) for p, b in zip(mean_prob, base_prob)],
                                       abs=1e-5)
    assert values[6] is None and rlpr.last_stats["scored"] == 6
    assert len(rlpr._baselines) == 3  # one per unique (prompt, answer)

    vr_cli = LikelihoodReward(model, tokenizer, kind="vr_cli")
    ppl = [math.exp(-sum(lp) / len(lp)) for lp in per_row]
    ppl_base = [math.exp(-sum(lp) / len(lp)) for lp in base]
    assert vr_cli(prompts[:6], completions[:6], answer=answers[:6]) == [
        vr_cli_reward(100 * (b - p) / b) for p, b in zip(ppl, ppl_base)]
    assert vr_cli.last_raw == pytest.approx(ppl, rel=1e-5)

    verifree = LikelihoodReward(Reference.build(model, "copy"), tokenizer, kind="verifree", batch_size=2)
    assert verifree(prompts[:6], completions[:6], answer=answers[:6]) == pytest.approx(
        [math.exp(sum(lp)) for lp in per_row], abs=1e-5)
    assert verifree.last_stats["baseline_mean"] is None
    with pytest.raises(RewardError, match="row field 'answer'"):
        verifree(prompts[:1], completions[:1], reference=["x"])
    frozen = Reference.build(model, "copy")
    context = {"tokenizer": tokenizer, "task": "arithmetic", "policy": model, "ref_model": frozen}
    policy_scored = get_reward("likelihood", scorer="policy", **context)
    assert policy_scored.model is model and policy_scored.cache_baseline is False
    assert policy_scored(prompts[:6], completions[:6], answer=answers[:6]) == pytest.approx(values[:6], abs=1e-6)
    ref_scored = get_reward("likelihood", **context)
    assert ref_scored.model is frozen and ref_scored.cache_baseline is True
    assert get_reward("likelihood", tokenizer=tokenizer, model=model).cache_baseline is False


def test_likelihood_prefers_correct_reasoning(tiny):
    """RLPR's raw mean probability of the reference answer separates correct from wrong reasoning.

    Measured on the shipped tiny model, 32 eval problems, concise style: AUC 0.771 (correct vs
    wrong completions). Half of the wrong completions are final-answer copy slips whose reasoning
    is identical to the correct one (the answer is replaced by the reference, so they tie); on the
    18 problems whose wrong completion has different reasoning, correct scores higher in 18/18.
    """
    model, tokenizer = tiny
    task = get_task("arithmetic")
    problems = task.problems("eval", 32)
    good = [task.solve(p, verbose=False) for p in problems]
    bad = [task.solve(p, verbose=False, wrong=True) for p in problems]
    reward = LikelihoodReward(model, tokenizer)
    reward([p.prompt for p in problems] * 2, good + bad, answer=[p.answer for p in problems] * 2)
    pos, neg = reward.last_raw[:32], reward.last_raw[32:]
    auc = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg) / (32 * 32)
    assert auc > 0.7
    differs = [i for i in range(32) if split_reasoning(good[i], "#") != split_reasoning(bad[i], "#")]
    assert len(differs) >= 12
    assert sum(pos[i] > neg[i] for i in differs) / len(differs) >= 0.9


# ---------------------------------------------------------------------------------------------
# reward model
# ---------------------------------------------------------------------------------------------


def test_reward_model_reward_matches_manual_scores(tiny_random_model_dir, tmp_path):
    from rlxf.models import load_reward_model, load_tokenizer, reward_scores, save_pretrained

    model = load_reward_model(str(tiny_random_model_dir), device="cpu", dtype="float32")
    tokenizer = load_tokenizer(str(tiny_random_model_dir))
    prompts = ["1+1=?", "12+30-7=?", "sort 3 1=?", "9-9=?", "5+5=?"]
    completions = [" 1+1=2. #2", " 12+30=42, 42-7=35. #35", " #1 3", "", " #10"]
    reward = RewardModelReward(model, tokenizer, batch_size=2, normalize_bias=0.25)
    got = reward(prompts, completions)
    eos = tokenizer.eos_token_id
    expected = []
    for prompt, completion in zip(prompts, completions):  # one row at a time: no padding at all
        ids = tokenizer(prompt)["input_ids"] + tokenizer(completion, add_special_tokens=False)["input_ids"] + [eos]
        ids = torch.tensor([ids])
        with torch.no_grad():
            expected.append(reward_scores(model, ids, torch.ones_like(ids)).item() - 0.25)
    assert got == pytest.approx(expected, abs=1e-5)
    saved = save_pretrained(model, tokenizer, tmp_path / "rm")  # the score head is random: keep this one
    by_path = get_reward("reward_model", path=str(saved), device="cpu", batch_size=8)
    assert by_path(prompts, completions) == pytest.approx([g + 0.25 for g in got], abs=1e-5)
