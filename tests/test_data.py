"""rlxf.data: loading, validation, tokenization with prompt masking, collation, batch order."""

from __future__ import annotations

import csv
import json
import logging

import pytest
import torch

from rlxf.data import (DataError, EpochBatcher, TokenStats, collate_preference, collate_sft, load_rows,
                       tokenize_preference, tokenize_prompts, tokenize_sft, validate_rows)
from rlxf.zoo.tokenizer import build_tokenizer

PAIRS = [
    {"prompt": "1+2=?", "chosen": " #3", "rejected": " #4", "chosen_score": 1.0, "rejected_score": 0.0},
    {"prompt": "5+5=?", "chosen": " #10", "rejected": " #11", "margin": 0.5},
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# -- loading ------------------------------------------------------------------------------------

def test_load_jsonl_sets_where_and_limit(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    rows = load_rows(path, kind="preference")
    assert [r["prompt"] for r in rows] == ["1+2=?", "5+5=?"]
    assert rows[1]["_where"] == f"{path}:2"
    assert len(load_rows(path, kind="preference", limit=1)) == 1


def test_load_json_list_and_data_wrapper(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(PAIRS))
    (tmp_path / "b.json").write_text(json.dumps({"data": PAIRS}))
    for name in ("a.json", "b.json"):
        rows = load_rows(str(tmp_path / name), kind="preference")
        assert len(rows) == 2 and rows[0]["chosen"] == " #3"
        assert rows[1]["_where"].endswith(f"{name}[1]")


def test_load_parquet(tmp_path):
    import pandas as pd

    path = tmp_path / "pairs.parquet"
    pd.DataFrame(PAIRS).to_parquet(path)
    rows = load_rows(str(path), kind="preference")
    assert rows[0]["chosen_score"] == 1.0 and rows[1]["margin"] == 0.5
    valid, skipped = validate_rows(rows, kind="preference")
    assert skipped == 0 and valid[0]["margin"] is None  # a null parquet cell is an absent margin


def test_load_csv_converts_scores(tmp_path):
    path = tmp_path / "pairs.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected", "chosen_score", "rejected_score"])
        writer.writeheader()
        writer.writerow({"prompt": "1+2=?", "chosen": " #3", "rejected": " #4", "chosen_score": "1.5",
                         "rejected_score": ""})
    rows = load_rows(str(path), kind="preference")
    assert rows[0]["chosen_score"] == 1.5 and rows[0]["rejected_score"] is None
    assert rows[0]["prompt"] == "1+2=?" and rows[0]["_where"] == f"{path}:2"


@pytest.mark.parametrize("kind, fields", [("sft", {"prompt", "completion"}),
                                          ("preference", {"prompt", "chosen", "rejected", "chosen_score"}),
                                          ("prompt", {"prompt", "answer"})])
def test_task_rows_each_kind(kind, fields):
    rows = load_rows("task:arithmetic", kind=kind, task_size=5)
    assert len(rows) == 5 and fields <= set(rows[0]) and rows[3]["_where"] == "task:arithmetic[3]"
    valid, skipped = validate_rows(rows, kind=kind)
    assert skipped == 0 and len(valid) == 5


def test_task_split_pair_kind_and_default_size():
    eval_rows = load_rows("task:sorting", kind="prompt", split="eval")
    assert len(eval_rows) == 256
    pairs = load_rows("task:sorting", kind="preference", task_size=20, pair_kind="conciseness")
    assert {r["pair_kind"] for r in pairs} == {"conciseness"}
    with pytest.raises(DataError, match="unknown built-in task"):
        load_rows("task:nope", kind="sft")


def test_bad_json_line_reports_file_and_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(PAIRS[0]) + "\n" + '{"prompt": "x", "chosen": \n')
    with pytest.raises(DataError, match=rf"{path}:2: invalid JSON"):
        load_rows(str(path), kind="preference")


def test_many_bad_lines_report_first_five_and_count(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("{oops\n" * 8)
    with pytest.raises(DataError) as info:
        load_rows(str(path), kind="sft")
    message = str(info.value)
    assert "8 of 8 lines are invalid" in message and f"{path}:5:" in message and f"{path}:6:" not in message


def test_empty_file_and_missing_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match="no rows in"):
        load_rows(str(path), kind="sft")
    with pytest.raises(DataError, match="file not found"):
        load_rows(str(tmp_path / "missing.jsonl"), kind="sft")


def test_saved_hf_dataset_directory_loads(tmp_path):
    import datasets

    datasets.Dataset.from_list(PAIRS[:1] * 3).save_to_disk(str(tmp_path / "ds"))
    rows = load_rows(str(tmp_path / "ds"), kind="preference")
    assert len(rows) == 3 and rows[0]["chosen"] == " #3" and rows[2]["_where"].endswith("[2]")


def test_unknown_hub_name_gives_clear_error(monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # the flags are read when the libraries are imported, which may already have happened
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(DataError) as info:
        load_rows("rlxf-no-such-org/no-such-dataset-0000", kind="sft")
    message = str(info.value)
    assert "treated as a Hugging Face hub dataset" in message and "task:" in message
    assert "local" in message and "unreachable" in message


# -- validation ---------------------------------------------------------------------------------

def test_missing_field_names_field_and_format(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [PAIRS[0], {"prompt": "2+2=?", "rejected": " #5"}])
    with pytest.raises(DataError) as info:
        validate_rows(load_rows(path, kind="preference"), kind="preference")
    message = str(info.value)
    assert f"{path}:2: field 'chosen' missing" in message
    assert "expected 'prompt' + 'chosen' + 'rejected'" in message


def test_skip_invalid_counts_and_many_errors_are_summarised():
    rows = [{"prompt": "p", "completion": ""}] * 7 + [{"prompt": "p", "completion": "c"}]
    valid, skipped = validate_rows(rows, kind="sft", skip_invalid=True)
    assert len(valid) == 1 and skipped == 7
    with pytest.raises(DataError) as info:
        validate_rows(rows, kind="sft")
    assert "7 of 8 sft rows are invalid (first 5 shown)" in str(info.value)
    assert "row 4:" in str(info.value) and "row 5:" not in str(info.value)


@pytest.mark.parametrize("score", [float("nan"), float("inf"), "high", True])
def test_non_finite_or_non_numeric_score_rejected(score):
    with pytest.raises(DataError, match="chosen_score"):
        validate_rows([{**PAIRS[0], "chosen_score": score}], kind="preference")


def test_nan_in_json_file_is_rejected(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b", "margin": NaN}\n')
    with pytest.raises(DataError, match=rf"{path}:1: field 'margin' must be finite"):
        validate_rows(load_rows(str(path), kind="preference"), kind="preference")


def test_message_checks():
    bad_role = {"messages": [{"role": "robot", "content": "hi"}, assistant("ok")]}
    with pytest.raises(DataError, match="unknown role 'robot'"):
        validate_rows([bad_role], kind="sft")
    with pytest.raises(DataError, match="must end with an assistant message"):
        validate_rows([{"messages": [user("hi"), user("again")]}], kind="sft")
    with pytest.raises(DataError, match="mixed formats"):
        validate_rows([{"prompt": "hi", "chosen": [assistant("a")], "rejected": [assistant("b")]}],
                      kind="preference")


def test_sft_messages_split_into_prompt_and_completion():
    (row,), _ = validate_rows([{"messages": [user("hi"), assistant("ok")], "id": 7}], kind="sft")
    assert row == {"prompt": [user("hi")], "completion": [assistant("ok")], "id": 7}


def test_conversational_preference_explicit_and_implicit_prompt(tok):
    explicit = {"prompt": [user("hi")], "chosen": [assistant("ok")], "rejected": [assistant("no")]}
    implicit = {"chosen": [user("hi"), assistant("ok")], "rejected": [user("hi"), assistant("no")]}
    rows, _ = validate_rows([explicit, implicit], kind="preference")
    assert rows[0]["prompt"] == rows[1]["prompt"] == [user("hi")]
    assert rows[1]["chosen"] == [assistant("ok")] and rows[1]["rejected"] == [assistant("no")]
    examples, _ = tokenize_preference(rows, tok, max_length=64)
    assert examples[0] == examples[1]
    assert tok.decode(examples[0]["prompt_ids"]) == "<bos><|user|>hi<|assistant|>"
    assert tok.decode(examples[0]["chosen_ids"]) == "ok<eos>"
    assert examples[0]["rejected_ids"][-1] == tok.eos_token_id
    with pytest.raises(DataError, match="share no first message"):
        validate_rows([{"chosen": [user("a"), assistant("x")], "rejected": [user("b"), assistant("y")]}],
                      kind="preference")


def test_string_preference_without_prompt_is_missing_prompt():
    with pytest.raises(DataError, match="field 'prompt' missing"):
        validate_rows([{"chosen": "a", "rejected": "b"}], kind="preference")


# -- tokenization -------------------------------------------------------------------------------

def test_tokenize_sft_masks_exactly_the_prompt(tok):
    rows, _ = validate_rows([{"prompt": "12+3=?", "completion": " #15"}], kind="sft")
    (example,), stats = tokenize_sft(rows, tok, max_length=64)
    ids, mask = example["input_ids"], example["completion_mask"]
    assert len(ids) == len(mask) and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    completion = [i for i, m in zip(ids, mask) if m]
    prompt = [i for i, m in zip(ids, mask) if not m]
    assert tok.decode(completion) == " #15<eos>"
    assert tok.decode(prompt) == "<bos>12+3=?"
    assert mask == sorted(mask)  # prompt first, then completion
    assert stats == TokenStats(rows_in=1, rows_out=1, truncated=0, dropped=0)


def test_tokenize_sft_conversational(tok):
    rows, _ = validate_rows([{"messages": [user("2+2"), assistant("4")]}], kind="sft")
    (example,), _ = tokenize_sft(rows, tok, max_length=64)
    completion = [i for i, m in zip(example["input_ids"], example["completion_mask"]) if m]
    assert tok.decode(completion) == "4<eos>"
    assert tok.decode(example["input_ids"]) == tok.apply_chat_template(rows[0]["prompt"] + rows[0]["completion"],
                                                                       tokenize=False)


def test_chat_template_without_prefix_property_is_reported(tok):
    bad = build_tokenizer()
    bad.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    rows, _ = validate_rows([{"prompt": [user("hi")], "completion": [assistant("ok")], "_where": "x.jsonl:3"}],
                            kind="sft")
    with pytest.raises(DataError, match="x.jsonl:3: the tokenizer's chat template does not render the prompt"):
        tokenize_sft(rows, bad, max_length=64)


def sft_rows(*pairs):
    return validate_rows([{"prompt": p, "completion": c} for p, c in pairs], kind="sft")[0]


def test_truncation_policy_counts(tok, caplog):
    # lengths with <bos> and <eos>: fits = 3 + 3; long completion = 3 + 21; prompt alone too long = 31 + 3
    rows = sft_rows(("ab", "cd"), ("ab", "c" * 20), ("p" * 30, "cd"))
    with caplog.at_level(logging.INFO, logger="rlxf.data"):
        examples, stats = tokenize_sft(rows, tok, max_length=12, truncation="truncate")
    assert stats == TokenStats(rows_in=3, rows_out=2, truncated=1, dropped=1)
    assert "2/3 rows kept, 1 truncated, 1 dropped" in caplog.text
    cut = examples[1]
    assert len(cut["input_ids"]) == 12 and cut["input_ids"][-1] != tok.eos_token_id  # cut loses its eos
    assert sum(cut["completion_mask"]) == 9

    examples, stats = tokenize_sft(rows, tok, max_length=12, truncation="drop")
    assert stats == TokenStats(rows_in=3, rows_out=1, truncated=0, dropped=2)
    assert stats.as_dict() == {"rows_in": 3, "rows_out": 1, "truncated": 0, "dropped": 2}


def test_truncate_left_truncates_prompt_only_as_needed(tok):
    rows = sft_rows(("x" * 7 + "END", "c" * 10))  # prompt 11 tokens, completion 11 tokens
    (example,), stats = tokenize_sft(rows, tok, max_length=16)
    prompt = [i for i, m in zip(example["input_ids"], example["completion_mask"]) if not m]
    assert len(prompt) == 8 and tok.decode(prompt).endswith("END")  # limit max_length // 2 keeps the tail
    assert len(example["input_ids"]) == 16 and stats.truncated == 1


def test_preference_truncation_and_max_prompt_length(tok):
    rows, _ = validate_rows([{"prompt": "q" * 9, "chosen": "a", "rejected": "b" * 30}], kind="preference")
    (example,), stats = tokenize_preference(rows, tok, max_length=20, max_prompt_length=4)
    assert len(example["prompt_ids"]) == 4 and tok.decode(example["prompt_ids"]) == "qqqq"
    assert example["chosen_ids"][-1] == tok.eos_token_id and len(example["rejected_ids"]) == 16
    assert stats.truncated == 1
    with pytest.raises(DataError, match="all 1 preference rows were dropped"):
        tokenize_preference(rows, tok, max_length=20, max_prompt_length=4, truncation="drop")


def test_all_dropped_raises_with_longest_prompt(tok):
    rows = sft_rows(("p" * 30, "c"), ("p" * 10, "c"))
    with pytest.raises(DataError, match="max_length=8 is too small.*longest prompt has 31 tokens"):
        tokenize_sft(rows, tok, max_length=8)


def test_tokenize_prompts_keeps_fields_and_drops_long(tok):
    rows, _ = validate_rows([{"prompt": "1+1=?", "answer": "2"}, {"prompt": "9" * 40, "answer": "9"}],
                            kind="prompt")
    examples, stats = tokenize_prompts(rows, tok, max_prompt_length=16)
    assert stats == TokenStats(rows_in=2, rows_out=1, truncated=0, dropped=1)
    assert examples[0]["answer"] == "2" and tok.decode(examples[0]["prompt_ids"]) == "<bos>1+1=?"
    (chat,), _ = tokenize_prompts([{"prompt": [user("hi")]}], tok, max_prompt_length=16)
    assert tok.decode(chat["prompt_ids"]) == "<bos><|user|>hi<|assistant|>"


# -- collation ----------------------------------------------------------------------------------

def test_collate_sft_right_sized(tok):
    examples, _ = tokenize_sft(sft_rows(("a", "b"), ("abc", "defg")), tok, max_length=64)
    batch = collate_sft(examples, tok.pad_token_id)
    lengths = [len(e["input_ids"]) for e in examples]
    assert batch["input_ids"].shape == (2, max(lengths)) == batch["completion_mask"].shape
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["input_ids"][0, lengths[0]:].eq(tok.pad_token_id).all()  # right padding
    assert batch["input_ids"].dtype == torch.long
    with pytest.raises(DataError, match="no pad token"):
        collate_sft(examples, None)


def test_collate_preference_shapes_and_scores(tok):
    rows, _ = validate_rows(PAIRS, kind="preference")
    examples, _ = tokenize_preference(rows, tok, max_length=64)
    batch = collate_preference(examples, tok.pad_token_id)
    seqs = [e["prompt_ids"] + e[side] for side in ("chosen_ids", "rejected_ids") for e in examples]
    assert batch["input_ids"].shape == (4, max(map(len, seqs)))
    assert batch["input_ids"][0, :len(seqs[0])].tolist() == seqs[0]  # chosen of pair 0 first
    assert batch["input_ids"][2, :len(seqs[2])].tolist() == seqs[2]  # then rejected of pair 0
    assert batch["completion_mask"].sum(1).tolist() == [4, 5, 4, 5]  # " #3<eos>", " #10<eos>" ...
    assert batch["chosen_scores"][0] == 1.0 and torch.isnan(batch["chosen_scores"][1])
    assert batch["margin"].tolist() == [0.0, 0.5]
    assert batch["has_scores"] is False and batch["has_margin"] is True
    assert collate_preference(examples[:1], tok.pad_token_id)["has_scores"] is True


# -- batch order --------------------------------------------------------------------------------

def test_epoch_batcher_resume_equals_uninterrupted():
    full = EpochBatcher(10, 3, seed=7)
    reference = [full.next_indices() for _ in range(8)]  # crosses two epoch boundaries
    first = EpochBatcher(10, 3, seed=7)
    head = [first.next_indices() for _ in range(4)]
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    resumed = EpochBatcher(10, 3, seed=7)
    resumed.load_state_dict(state)
    assert head + [resumed.next_indices() for _ in range(4)] == reference


def test_epoch_batcher_epochs_differ_and_cover_data():
    batcher = EpochBatcher(12, 4, seed=0)
    assert batcher.batches_per_epoch == 3
    epoch0 = [batcher.next_indices() for _ in range(3)]
    epoch1 = [batcher.next_indices() for _ in range(3)]
    assert sorted(sum(epoch0, [])) == list(range(12)) and epoch0 != epoch1
    tail = EpochBatcher(10, 4, seed=0, drop_last=False)
    assert tail.batches_per_epoch == 3 and [len(tail.next_indices()) for _ in range(3)] == [4, 4, 2]
    with pytest.raises(DataError, match="batch_size=16 is larger than the dataset"):
        EpochBatcher(10, 16, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        EpochBatcher(10, 3, seed=1).load_state_dict(EpochBatcher(10, 2, seed=1).state_dict())


def test_collate_preference_splits_pairs_for_prompt_sharing():
    from rlxf.data import collate_preference

    examples = [{"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10]},
                {"prompt_ids": [11], "chosen_ids": [12], "rejected_ids": [13, 14, 15]}]
    batch = collate_preference(examples, pad_id=0)
    assert batch["prompt_ids"].tolist() == [[5, 6, 7], [0, 0, 11]]                 # left-padded
    assert batch["prompt_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["pair_completion_ids"].tolist() == [[8, 9, 0], [10, 0, 0], [12, 0, 0], [13, 14, 15]]
    assert batch["pair_completion_mask"].tolist() == [[1, 1, 0], [1, 0, 0], [1, 0, 0], [1, 1, 1]]
