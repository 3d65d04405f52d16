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


def test_many_bad_lines_report_the_first_ten_and_count_the_rest(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("{oops\n" * 13)
    with pytest.raises(DataError) as info:
        load_rows(str(path), kind="sft")
    message = str(info.value)
    assert "13 of 13 rows are invalid" in message and f"{path}:10:" in message and f"{path}:11:" not in message
    assert "... and 3 more" in message


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
    rows = [{"prompt": "p", "completion": ""}] * 12 + [{"prompt": "p", "completion": "c"}]
    valid, skipped = validate_rows(rows, kind="sft", skip_invalid=True)
    assert len(valid) == 1 and skipped == 12
    with pytest.raises(DataError) as info:
        validate_rows(rows, kind="sft")
    assert "12 of 13 sft rows are invalid:" in str(info.value) and "... and 2 more" in str(info.value)
    assert "row 9:" in str(info.value) and "row 10:" not in str(info.value)


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


# -- encodings, byte-order marks and unreadable lines --------------------------------------------

LATIN1_ROW = b'{"prompt": "caf\xe9?", "chosen": " a", "rejected": " b"}\n'
E_ACUTE = LATIN1_ROW.index(b"\xe9")  # 0-based byte position of the Latin-1 byte in the line


def test_latin1_jsonl_names_file_line_byte_offset_and_iconv(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(json.dumps(PAIRS[0]).encode() + b"\n" + LATIN1_ROW)
    offset = len(json.dumps(PAIRS[0])) + 1 + E_ACUTE
    with pytest.raises(DataError) as info:
        load_rows(str(path), kind="preference")
    message = str(info.value)
    assert f"{path}:2: byte 0xe9 at byte offset {offset} (byte {E_ACUTE + 1} of line 2) is not valid UTF-8" in message
    assert f"iconv -f latin1 -t utf-8 {path} > {tmp_path / 'pairs.utf8.jsonl'}" in message


@pytest.mark.parametrize("name, good", [
    ("pairs.json", b'[\n{"prompt": "p", "chosen": "a", "rejected": "b"},\n'),
    ("pairs.csv", b"prompt,chosen,rejected\np,a,b\n"),
])
def test_undecodable_bytes_in_json_and_csv_name_the_line(tmp_path, name, good):
    path = tmp_path / name
    bad_line = b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}]\n' if name.endswith(".json") \
        else b"caf\xe9,a,b\n"
    path.write_bytes(good + bad_line)
    offset = len(good) + bad_line.index(b"\xe9")
    with pytest.raises(DataError, match=rf"{path}:3: byte 0xe9 at byte offset {offset} "):
        load_rows(str(path), kind="preference")


def test_several_undecodable_lines_are_all_listed(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(LATIN1_ROW * 12)
    with pytest.raises(DataError) as info:
        load_rows(str(path), kind="preference")
    message = str(info.value)
    assert "12 lines hold bytes that are not valid UTF-8" in message
    assert f"{path}:10:" in message and f"{path}:11:" not in message and "... and 2 more lines" in message


def test_undecodable_bytes_are_not_skipped_by_skip_invalid(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(json.dumps(PAIRS[0]).encode() + b"\n" + LATIN1_ROW)
    with pytest.raises(DataError, match="not valid UTF-8"):
        validate_rows(load_rows(str(path), kind="preference", keep_invalid=True), kind="preference",
                      skip_invalid=True)


def test_utf16_file_is_recognised(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(json.dumps(PAIRS[0]).encode("utf-16"))
    with pytest.raises(DataError, match=rf"UTF-16.*iconv -f utf-16 -t utf-8 {path}"):
        load_rows(str(path), kind="preference")


@pytest.mark.parametrize("name", ["pairs.jsonl", "pairs.json", "pairs.csv"])
def test_a_utf8_byte_order_mark_is_dropped_in_every_text_format(tmp_path, name):
    path = tmp_path / name
    rows = [{"prompt": "café?", "chosen": " a", "rejected": " b"}]
    if name.endswith(".jsonl"):
        text = json.dumps(rows[0], ensure_ascii=False) + "\r\n"
    elif name.endswith(".json"):
        text = json.dumps(rows, ensure_ascii=False)
    else:
        text = "prompt,chosen,rejected\r\ncafé?, a, b\r\n"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    loaded = load_rows(str(path), kind="preference")
    assert [{k: v for k, v in r.items() if k != "_where"} for r in loaded] == rows
    assert validate_rows(loaded, kind="preference")[1] == 0


def _column_of(line: str, fault: str) -> int:
    return line.index(fault) + 1


def test_every_bad_row_is_reported_with_its_line_and_column(tmp_path):
    """Invalid JSON does not hide the other bad rows, and the column is the fault's, 1-based."""
    good = json.dumps(PAIRS[0])
    missing_comma = '{"prompt": "2+2=?", "chosen": "4", "rejected": "5" "id": 7}'
    truncated = '{"prompt": "2+2=?", "chosen": " #4", "rejected":'
    lines = [good, missing_comma, '{"prompt": "2+2=?", "chosen": " #4"}', truncated, "[1, 2]", good]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        validate_rows(load_rows(str(path), kind="preference", keep_invalid=True), kind="preference")
    message = str(info.value)
    assert "4 of 6 preference rows are invalid" in message
    assert _column_of(missing_comma, '"id"') == 52  # the attack's "fault at column 52"
    assert f"{path}:2: invalid JSON: Expecting ',' delimiter (column 52)" in message
    assert f"{path}:3: field 'rejected' missing" in message
    assert f"{path}:4: invalid JSON: Expecting value (column {len(truncated) + 1})" in message
    assert f"{path}:5: expected a JSON object, got a list" in message
    assert "--skip-invalid" in message and "skip_invalid=True" in message


def test_skip_invalid_also_drops_unreadable_lines_and_counts_them(tmp_path, caplog):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join([json.dumps(PAIRS[0]), "{oops", json.dumps(PAIRS[1]), "\n", "null"]) + "\n")
    with caplog.at_level(logging.WARNING, logger="rlxf.data"):
        valid, skipped = validate_rows(load_rows(str(path), kind="preference", keep_invalid=True),
                                       kind="preference", skip_invalid=True)
    assert [r["prompt"] for r in valid] == ["1+2=?", "5+5=?"] and skipped == 2
    assert f"{path}:2: invalid JSON" in caplog.text and f"{path}:6: expected a JSON object, got null" in caplog.text


def test_limit_counts_readable_rows_only(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("{oops\n" + json.dumps(PAIRS[0]) + "\n" + json.dumps(PAIRS[1]) + "\n")
    rows = load_rows(str(path), kind="preference", keep_invalid=True, limit=1)
    assert [r["_where"] for r in rows] == [f"{path}:1", f"{path}:2"]


def test_csv_extra_cells_and_an_unclosed_quote_are_reported(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected\np,a,b\n1,000,a,b\n\np,a,b\n")
    rows = load_rows(str(path), kind="preference", keep_invalid=True)
    assert [r["_where"] for r in rows] == [f"{path}:2", f"{path}:3", f"{path}:5"]
    with pytest.raises(DataError, match=rf"{path}:3: 4 cells, but the header names 3 columns"):
        validate_rows(rows, kind="preference")
    path.write_text('prompt,chosen,rejected\np,a,b\n"p,a,b\np,a,b\n')
    with pytest.raises(DataError, match=rf"{path}:3: could not read the CSV record .*never closed"):
        load_rows(str(path), kind="preference")


def test_json_items_that_are_not_objects_are_invalid_rows(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([PAIRS[0], "text", PAIRS[1]]))
    rows = load_rows(str(path), kind="preference", keep_invalid=True)
    valid, skipped = validate_rows(rows, kind="preference", skip_invalid=True)
    assert len(valid) == 2 and skipped == 1
    with pytest.raises(DataError, match=rf"{path}\[1\]: expected a JSON object, got a string"):
        load_rows(str(path), kind="preference")


def test_an_integer_too_large_for_a_float_is_an_invalid_score(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 1' + "0" * 400 + "}\n")
    with pytest.raises(DataError, match=rf"{path}:1: field 'margin' must be finite"):
        validate_rows(load_rows(str(path), kind="preference"), kind="preference")


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
