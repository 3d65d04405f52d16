"""``rlxf long2short-data``: sample the tiny model, verify, write SFT rows and long-vs-short DPO pairs.

Small builds on the embedded tiny model (16 arithmetic prompts x 8 samples, about a second each;
seed 0 gives 9 SFT rows and 5 pairs, one prompt with 2).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from rlxf.cli import build_parser, main
from rlxf.config import ConfigError, build_config, load_yaml
from rlxf.data import DataError, load_rows, validate_rows
from rlxf.workflows.long2short import Long2ShortDataConfig, build_long2short_data
from rlxf.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"model": "tiny", "num_prompts": 16, "samples": 8, "threads": 1, "seed": 0}


pytestmark = pytest.mark.usefixtures("one_thread")


def build(out: Path, **overrides) -> dict:
    return build_long2short_data(build_config(Long2ShortDataConfig, {**SMALL, "output_dir": str(out), **overrides}))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("l2s") / "data"
    torch.set_num_threads(1)
    return out, build(out)


# -- the files -------------------------------------------------------------------------------------

def test_files_load_as_sft_and_preference_data(built):
    out, stats = built
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "pairs.jsonl", "sft.jsonl", "stats.json"]
    sft, skipped = validate_rows(load_rows(str(out / "sft.jsonl"), kind="sft"), kind="sft")
    assert skipped == 0 and len(sft) == stats["sft_rows"] > 0
    pairs, skipped = validate_rows(load_rows(str(out / "pairs.jsonl"), kind="preference"), kind="preference")
    assert skipped == 0 and len(pairs) == stats["pairs"] > 0
    assert json.loads((out / "stats.json").read_text()) == stats
    assert build_config(Long2ShortDataConfig, load_yaml(out / "config.yaml")) == build_config(
        Long2ShortDataConfig, {**SMALL, "output_dir": str(out)})


def test_rows_follow_the_kimi_rules(built):
    out, _ = built
    task = get_task("arithmetic")
    sft = read_jsonl(out / "sft.jsonl")
    assert {tuple(row) for row in sft} == {("prompt", "completion", "completion_length", "answer")}
    assert len({row["prompt"] for row in sft}) == len(sft)  # one row per prompt
    assert all(task.verify(row["completion"], row["answer"]) for row in sft)
    shortest = {row["prompt"]: row for row in sft}
    for pair in read_jsonl(out / "pairs.jsonl"):
        chosen = shortest[pair["prompt"]]  # chosen = that prompt's SFT row
        assert (pair["chosen"], pair["chosen_length"]) == (chosen["completion"], chosen["completion_length"])
        assert pair["rejected_length"] > pair["chosen_length"]
        if pair["pair_kind"] == "wrong_longer":
            assert not task.verify(pair["rejected"], pair["answer"]) and pair["rejected_score"] == 0.0
        else:
            assert pair["pair_kind"] == "correct_long" and pair["rejected_score"] == 0.5
            assert task.verify(pair["rejected"], pair["answer"])
            assert pair["rejected_length"] >= 1.5 * pair["chosen_length"]


def test_stats_add_up(built):
    out, stats = built
    sft, pairs = read_jsonl(out / "sft.jsonl"), read_jsonl(out / "pairs.jsonl")
    assert stats["prompts"] == 16 and stats["samples"] == 16 * 8 and stats["samples_per_prompt"] == 8
    assert stats["prompts_with_correct"] + stats["prompts_without_correct"] == stats["prompts"]
    assert stats["sft_rows"] == stats["prompts_with_correct"] == len(sft)
    assert stats["correct_rate"] == pytest.approx(stats["correct"] / stats["samples"])
    assert stats["prompts_with_correct"] <= stats["correct"] <= stats["samples"]
    assert stats["prompts_all_correct"] <= stats["prompts_with_correct"]
    assert sum(stats["pairs_by_kind"].values()) == stats["pairs"] == len(pairs)
    assert stats["pairs_by_kind"]["wrong_longer"] == sum(p["pair_kind"] == "wrong_longer" for p in pairs)
    assert stats["prompts_without_rejected"] == len({r["prompt"] for r in sft} - {p["prompt"] for p in pairs})
    assert stats["mean_length_chosen"] == pytest.approx(sum(r["completion_length"] for r in sft) / len(sft))
    assert stats["mean_length_rejected"] == pytest.approx(sum(p["rejected_length"] for p in pairs) / len(pairs))
    n_correct, n_wrong = stats["correct"], stats["samples"] - stats["correct"]
    assert stats["mean_length_all"] * stats["samples"] == pytest.approx(
        stats["mean_length_correct"] * n_correct + stats["mean_length_wrong"] * n_wrong)
    assert 0 < stats["mean_length_all"] <= 48 and 0 <= stats["truncated_rate"] <= 1
    assert stats["seconds"] >= stats["generation_seconds"] > 0


def test_same_seed_same_files_other_seed_other_samples(built, tmp_path):
    out, stats = built
    again = build(tmp_path / "again")
    for name in ("sft.jsonl", "pairs.jsonl"):
        assert (tmp_path / "again" / name).read_text() == (out / name).read_text()
    assert {k: v for k, v in again.items() if "seconds" not in k} == {
        k: v for k, v in stats.items() if "seconds" not in k}
    build(tmp_path / "other", seed=1)
    assert (tmp_path / "other" / "sft.jsonl").read_text() != (out / "sft.jsonl").read_text()


def test_max_pairs_per_prompt_caps_pairs(built, tmp_path):
    _, stats = built
    capped = build(tmp_path / "capped", max_pairs_per_prompt=1)
    assert capped["pairs"] == stats["pairs"] - capped["pairs_capped"] == stats["prompts_with_correct"] - stats[
        "prompts_without_rejected"]
    assert max(sum(p["prompt"] == q for p in read_jsonl(tmp_path / "capped" / "pairs.jsonl"))
               for q in {p["prompt"] for p in read_jsonl(tmp_path / "capped" / "pairs.jsonl")}) == 1


# -- other datasets ---------------------------------------------------------------------------------

def test_file_dataset_is_verified_by_exact_match_on_answer(tmp_path):
    rows = get_task("arithmetic").prompt_rows("train", 12, seed=3)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "answer": r["answer"]}) + "\n" for r in rows))
    stats = build(tmp_path / "out", dataset=str(data), num_prompts=8)
    assert stats["prompts"] == 8 and stats["correct"] > 0
    sft = read_jsonl(tmp_path / "out" / "sft.jsonl")
    assert all(re.search(r"#\s*" + re.escape(row["answer"]) + r"\s*$", row["completion"]) for row in sft)


def test_conversational_prompts_get_assistant_message_completions(tmp_path):
    rows = get_task("arithmetic").prompt_rows("train", 6, seed=0)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": r["prompt"]}],
                                        "answer": r["answer"]}) + "\n" for r in rows))
    stats = build(tmp_path / "out", dataset=str(data), num_prompts=0)
    assert stats["prompts"] == 6 and stats["sft_rows"] > 0 and stats["pairs"] > 0  # seed 0: 4 rows, 1 pair
    for name, kind, field in (("sft.jsonl", "sft", "completion"), ("pairs.jsonl", "preference", "rejected")):
        validated, _ = validate_rows(load_rows(str(tmp_path / "out" / name), kind=kind), kind=kind)
        assert all(row["prompt"][0]["role"] == "user" and row[field][0]["role"] == "assistant" for row in validated)


def test_dataset_without_answers_is_a_clear_error_before_the_model_loads(tmp_path, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "2+2=?"}\n{"prompt": "3+3=?", "answer": "6"}\n')
    with pytest.raises(DataError, match=r"1 of 2 rows have no 'answer'.*prompts.jsonl:1.*task:NAME"):
        build(tmp_path / "out", dataset=str(data), model=str(tmp_path / "no-model"))
    argv = ["long2short-data", "--dataset", str(data), "--output-dir", str(tmp_path / "out")]
    assert main(argv) == 1
    assert "rlxf: error:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# -- config and command line ------------------------------------------------------------------------

@pytest.mark.parametrize("values,match", [
    ({"samples": 0}, "samples 0 is out of range: it must be an integer >= 1"),
    ({"ratio": 0.9}, "ratio 0.9 is out of range: it must be a finite number >= 1"),
    ({"temperature": 0.0}, "temperature 0.0 is out of range: it must be a finite number > 0"),
    ({"num_prompts": 0}, "task: dataset"),
    ({"max_pairs_per_prompt": -1}, "max_pairs_per_prompt -1 is out of range: it must be an integer >= 0"),
])
def test_bad_config_values_are_config_errors(values, match):
    with pytest.raises(ConfigError, match=match):
        build_config(Long2ShortDataConfig, values)


def test_an_earlier_build_is_not_overwritten_without_overwrite(built, tmp_path, capsys):
    out, _ = built
    before = (out / "sft.jsonl").read_text()
    assert main(["long2short-data", "--output-dir", str(out), "--model", str(tmp_path / "no-model")]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert (out / "sft.jsonl").read_text() == before


def test_cli_builds_and_prints_the_paths(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["long2short-data", "--num-prompts", "4", "--samples", "2", "--threads", "1", "--output-dir", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert str(out / "sft.jsonl") in printed and str(out / "pairs.jsonl") in printed
    assert json.loads((out / "stats.json").read_text())["samples"] == 8
    assert main(argv + ["--overwrite"]) == 0


def test_help_lists_every_field(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["long2short-data", "--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(Long2ShortDataConfig):
        assert "--" + f.name.replace("_", "-") in out
        assert re.sub(r"\s+", "", f.metadata["help"]) in re.sub(r"\s+", "", out)


def test_docs_option_table_matches_the_defaults():
    text = (ROOT / "docs" / "methods" / "long2short.md").read_text()
    rows = dict(re.findall(r"^\| `(--[a-z0-9-]+)` \| `([^`]*)` \|", text, flags=re.MULTILINE))
    fields = {"--" + f.name.replace("_", "-"): f.default for f in dataclasses.fields(Long2ShortDataConfig)}
    assert set(rows) == set(fields)
    assert build_config(Long2ShortDataConfig, {k[2:]: v for k, v in rows.items()}) == Long2ShortDataConfig()
