"""rlxf.data.long2short: shortest-correct SFT rows and long-vs-short DPO pairs (Kimi k1.5, SPECS §9)."""

from __future__ import annotations

import math

import pytest

from rlxf.data import long_short_pairs, shortest_correct_rows, validate_rows

PROMPTS = ["p0", "p1", "p2"]
COMPLETIONS = [["long right", "right", "wrong answer"],  # shortest correct: "right"
               ["abc", "xyz", "abcdef"],                 # tie at 3 characters: the first, "abc"
               ["nope", "no"]]                           # nothing correct: skipped
CORRECT = [[True, True, False], [True, True, True], [False, False]]


# -- shortest rejection sampling ----------------------------------------------------------------

def test_shortest_correct_rows_by_characters_with_ties_and_skips():
    rows, stats = shortest_correct_rows(PROMPTS, COMPLETIONS, CORRECT, answer=["a0", "a1", "a2"])
    assert rows == [{"prompt": "p0", "completion": "right", "completion_length": 5, "answer": "a0"},
                    {"prompt": "p1", "completion": "abc", "completion_length": 3, "answer": "a1"}]
    assert stats == {"prompts": 3, "rows": 2, "no_correct": 1, "mean_chosen_length": 4.0,
                     "mean_correct_length": (10 + 5 + 3 + 3 + 6) / 5}
    assert validate_rows(rows, kind="sft")[1] == 0


def test_shortest_correct_rows_by_tokens():
    lengths = [[2, 9, 1], [4, 3, 3], [1, 1]]  # tokens disagree with characters
    rows, _ = shortest_correct_rows(PROMPTS, COMPLETIONS, CORRECT, lengths)
    assert [(r["completion"], r["completion_length"]) for r in rows] == [("long right", 2), ("xyz", 3)]


def test_shortest_correct_rows_with_no_correct_sample_at_all():
    rows, stats = shortest_correct_rows(["p"], [[]], [[]])
    assert rows == [] and stats["no_correct"] == 1 and math.isnan(stats["mean_chosen_length"])


# -- long vs short pairs ------------------------------------------------------------------------

def test_long_short_pairs_hand_built_case():
    completions = [["c10", "w12", "c15", "c14", "w8", "w10", "c10b", "w30"]]
    correct = [[True, False, True, True, False, False, True, False]]
    lengths = [[10, 12, 15, 14, 8, 10, 10, 30]]
    rows, stats = long_short_pairs(["p"], completions, correct, lengths, ratio=1.5, id=[7])

    def pair(rejected, kind, length):
        return {"prompt": "p", "chosen": "c10", "rejected": rejected, "pair_kind": kind, "chosen_score": 1.0,
                "rejected_score": 0.0 if kind == "wrong_longer" else 0.5, "chosen_length": 10,
                "rejected_length": length, "id": 7}

    # w8 (shorter) and w10 (as long) are not rejected; c14 < 1.5 × 10; c15 = 1.5 × 10 exactly is;
    # c10b ties with the chosen c10 (the earlier one wins) and is not longer
    assert rows == [pair("w12", "wrong_longer", 12), pair("c15", "correct_long", 15),
                    pair("w30", "wrong_longer", 30)]
    assert stats == {"prompts": 1, "pairs": 3, "wrong_longer": 2, "correct_long": 1, "no_correct": 0,
                     "no_rejected": 0, "duplicates_dropped": 0, "capped": 0}
    assert validate_rows(rows, kind="preference")[1] == 0


def test_ratio_boundary_survives_float_rounding():
    # 1.1 * 10 == 11.000000000000002 in floating point; 11 tokens must still count as 1.1x
    rows, _ = long_short_pairs(["p"], [["a", "b"]], [[True, True]], [[10, 11]], ratio=1.1)
    assert [r["rejected"] for r in rows] == ["b"]
    rows, _ = long_short_pairs(["p"], [["a", "b"]], [[True, True]], [[10, 14]], ratio=1.5)
    assert rows == []


def test_pairs_skip_prompts_dedupe_and_cap():
    prompts = ["solved", "unsolved", "nothing to reject", "capped"]
    completions = [["ok", "wrong!", "wrong!", "way too long ok"],
                   ["x", "yy"],
                   ["short ok", "no"],
                   ["ok", "bad 1", "bad 2", "bad 3"]]
    correct = [[True, False, False, True], [False, False], [True, False], [True, False, False, False]]
    rows, stats = long_short_pairs(prompts, completions, correct, max_pairs_per_prompt=2)
    assert [(r["prompt"], r["rejected"], r["pair_kind"]) for r in rows] == [
        ("solved", "wrong!", "wrong_longer"), ("solved", "way too long ok", "correct_long"),
        ("capped", "bad 1", "wrong_longer"), ("capped", "bad 2", "wrong_longer")]
    assert stats == {"prompts": 4, "pairs": 4, "wrong_longer": 3, "correct_long": 1, "no_correct": 1,
                     "no_rejected": 1, "duplicates_dropped": 1, "capped": 1}


def test_pairs_are_deterministic():
    first = long_short_pairs(PROMPTS, COMPLETIONS, CORRECT)
    assert long_short_pairs(PROMPTS, COMPLETIONS, CORRECT) == first


# -- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("builder", [shortest_correct_rows, long_short_pairs])
def test_ragged_or_malformed_inputs_are_explained(builder):
    with pytest.raises(ValueError, match=r"correct must be a list with one entry per prompt \(3 prompts\), got 2"):
        builder(PROMPTS, COMPLETIONS, CORRECT[:2])
    with pytest.raises(ValueError, match=r"prompt 1: correct\[1\] must be a list with one entry per sample \(3\)"):
        builder(PROMPTS, COMPLETIONS, [CORRECT[0], [True, True], CORRECT[2]])
    with pytest.raises(ValueError, match=r"prompt 0: lengths\[0\] must be a list with one entry per sample"):
        builder(PROMPTS, COMPLETIONS, CORRECT, [[1, 2], [1, 2, 3], [1, 2]])
    with pytest.raises(ValueError, match=r"lengths\[2\]\[1\]=-1 is not a non-negative integer"):
        builder(PROMPTS, COMPLETIONS, CORRECT, [[1, 2, 3], [1, 2, 3], [1, -1]])
    with pytest.raises(ValueError, match=r"correct\[0\]\[2\]='no' is not a bool"):
        builder(PROMPTS, COMPLETIONS, [[True, True, "no"], CORRECT[1], CORRECT[2]])
    with pytest.raises(ValueError, match=r"completions\[0\]\[0\] is a list, not a string.*pass lengths"):
        builder(["p"], [[[{"role": "assistant", "content": "hi"}]]], [[True]])
    with pytest.raises(ValueError, match="answer must be a list with one entry per prompt"):
        builder(PROMPTS, COMPLETIONS, CORRECT, answer=["a"])
    with pytest.raises(ValueError, match="extra field 'prompt' would overwrite"):
        builder(PROMPTS, COMPLETIONS, CORRECT, prompt=PROMPTS)


def test_bad_pair_settings_are_explained():
    with pytest.raises(ValueError, match="ratio must be a number >= 1"):
        long_short_pairs(PROMPTS, COMPLETIONS, CORRECT, ratio=0.9)
    with pytest.raises(ValueError, match="max_pairs_per_prompt must be a positive integer or None"):
        long_short_pairs(PROMPTS, COMPLETIONS, CORRECT, max_pairs_per_prompt=0)


def test_conversational_completions_with_token_lengths():
    long_reply = [{"role": "assistant", "content": "a long answer"}]
    short_reply = [{"role": "assistant", "content": "short"}]
    prompt = [{"role": "user", "content": "q"}]
    rows, _ = long_short_pairs([prompt], [[long_reply, short_reply]], [[True, True]], [[20, 5]])
    assert rows[0]["chosen"] == short_reply and rows[0]["rejected"] == long_reply
    assert validate_rows(rows, kind="preference")[1] == 0
