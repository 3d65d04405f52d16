"""Recipes end to end on small models: resume, LoRA, bad input and faults.

Learning curves on the embedded tiny model (the acceptance numbers) are in test_learning.py.
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
from rlxf.config import build_config
from rlxf.train import FAULT_ENV, TrainingError
from rlxf.reporting import read_metrics

FAST = {"task_size": 96, "eval_size": 32, "batch_size": 8, "eval_batch_size": 32, "progress": False,
        "log_every": 1, "warmup_steps": 2, "threads": 1}


def _cfg(recipe: str, model_dir: Path, out: Path, **overrides):
    from rlxf.cli import _config_class

    return build_config(_config_class(recipe), {"model": str(model_dir), "output_dir": str(out), **FAST, **overrides})


def _train(recipe: str, cfg):
    from rlxf.configs.registry import get_recipe

    return get_recipe(recipe).train_fn()(cfg)


def _flags(values: dict) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in values.items()]


@pytest.mark.report
@pytest.mark.parametrize("recipe,extra", [
    ("dpo", {}), ("dpo", {"loss": "ipo"}), ("dpo", {"loss": "cdpo"}), ("dpo", {"nll_alpha": 1.0}),
    ("rpo", {}), ("rpo", {"rpo_distance": "sq"}), ("orpo", {}), ("rm", {}), ("rm", {"loss": "focal"}),
    ("sft", {"eval_generate": 4, "max_new_tokens": 8}),
])
def test_every_recipe_writes_the_run_files(recipe, extra, tiny_random_model_dir, tmp_path):
    out = tmp_path / "run"
    result = _train(recipe, _cfg(recipe, tiny_random_model_dir, out, max_steps=3, **extra))
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "report.png", "report.html"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["final_model"] == str(out / "final")
    assert summary["recipe"] == result.summary["recipe"]
    rows = read_metrics(out / "metrics.jsonl")
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train_rows)
    assert (out / "checkpoints" / "step-3" / "state.json").exists()
    assert (out / "final" / "config.json").exists()


@pytest.mark.slow
def test_resume_after_kill_equals_uninterrupted_run(tiny_random_model_dir, tmp_path):
    common = {**FAST, "model": str(tiny_random_model_dir), "max_steps": 12, "save_every": 4, "eval_every": 4}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main(["dpo", *_flags({**common, "output_dir": straight})]) == 0
    cmd = [sys.executable, "-m", "rlxf", "dpo", *_flags({**common, "output_dir": killed})]
    env = {**os.environ, FAULT_ENV: "6", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 137, proc.stderr[-2000:]
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step-4"]  # step 6 never saved
    assert not (killed / "summary.json").exists()
    assert main(["dpo", *_flags({**common, "output_dir": killed, "resume": "true"})]) == 0

    def comparable(run):
        return [{k: v for k, v in r.items() if k not in ("time", "tokens_per_s")} for r in read_metrics(run)]

    a, b = comparable(straight), comparable(killed)
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
    for ra, rb in zip(a, b):
        for key, value in ra.items():
            if isinstance(value, float):
                assert rb[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (ra["step"], key)
    sa = json.loads((straight / "summary.json").read_text())
    sb = json.loads((killed / "summary.json").read_text())
    for key in ("final/accuracy", "final/loss", "start/accuracy", "final/rewards/margin"):
        assert sb[key] == pytest.approx(sa[key], rel=1e-4, abs=1e-6), key


@pytest.mark.slow
def test_lora_dpo_saves_adapter_and_a_merged_model_transformers_can_load(tiny_random_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    _train("dpo", _cfg("dpo", tiny_random_model_dir, out, max_steps=4, lora_r=4, lr=1e-2))
    final = out / "final"
    assert (final / "adapter_model.safetensors").exists() and (final / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(final / "merged")
    base = AutoModelForCausalLM.from_pretrained(tiny_random_model_dir)
    ids = torch.tensor([[1, 9, 10, 71, 11, 12]])
    assert not torch.allclose(merged(ids).logits, base(ids).logits)  # the adapter was trained and merged
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]
    assert rows[-1]["rewards/margin"] != 0.0  # reference = base with adapters disabled, policy moved away


def test_malformed_rows_stop_with_file_and_line(tiny_random_model_dir, tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    good = {"prompt": "1+1=?", "chosen": " #2", "rejected": " #3"}
    data.write_text("\n".join([json.dumps(good)] * 20 + ['{"prompt": "2+2=?", "chosen": " #4"}']) + "\n")
    code = main(["dpo", *_flags({**FAST, "model": tiny_random_model_dir, "dataset": data,
                                 "output_dir": tmp_path / "run", "max_steps": 1})])
    assert code == 1
    err = capsys.readouterr().err
    assert "pairs.jsonl:21" in err and "rejected" in err


def test_malformed_json_line_and_skip_invalid(tiny_random_model_dir, tmp_path, capsys, caplog):
    data = tmp_path / "pairs.jsonl"
    good = json.dumps({"prompt": "1+1=?", "chosen": " #2", "rejected": " #3"})
    data.write_text("\n".join([good] * 20 + ['{"prompt": "2+2=?", "chosen": " #4", "rejected":']) + "\n")
    args = {**FAST, "model": tiny_random_model_dir, "dataset": data, "max_steps": 1, "eval_holdout": 0.1}
    assert main(["dpo", *_flags({**args, "output_dir": tmp_path / "a"})]) == 1
    assert "pairs.jsonl:21" in capsys.readouterr().err
    with caplog.at_level("WARNING"):
        assert main(["dpo", *_flags({**args, "output_dir": tmp_path / "b", "skip_invalid": "true"})]) == 0
    assert "pairs.jsonl:21: invalid JSON" in caplog.text and "skipped 1 of 21 training rows" in caplog.text


def test_a_run_stopped_by_bad_data_reports_every_bad_row_and_writes_nothing(tiny_random_model_dir, tmp_path,
                                                                            capsys):
    good = json.dumps({"prompt": "1+1=?", "chosen": " #2", "rejected": " #3"})
    train, evals = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    trailing_comma = '{"prompt": "x", "chosen": " a", "rejected": " b",}'
    train.write_text("\n".join([good] * 10 + [trailing_comma, '{"prompt": "2+2=?", "chosen": " #4"}']) + "\n")
    evals.write_text(good + "\n" + '{"prompt": "3+3=?", "chosen": 6, "rejected": " #7"}' + "\n")
    out = tmp_path / "run"
    code = main(["dpo", *_flags({**FAST, "model": tiny_random_model_dir, "dataset": train, "eval_dataset": evals,
                                 "output_dir": out, "max_steps": 1})])
    assert code == 1
    err = capsys.readouterr().err
    column = trailing_comma.index("}") + 1
    assert f"{train}:11: invalid JSON: Expecting property name enclosed in double quotes (column {column})" in err
    assert f"{train}:12: field 'rejected' missing" in err and f"{evals}:2: field 'chosen' must be" in err
    assert "--skip-invalid" in err and "skip_invalid=True" in err
    assert not out.exists()


def test_a_latin1_file_is_a_clear_error_and_writes_nothing(tiny_random_model_dir, tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_bytes('{"prompt": "café", "chosen": " a", "rejected": " b"}\n'.encode("latin-1") * 30)
    out = tmp_path / "run"
    assert main(["dpo", *_flags({**FAST, "model": tiny_random_model_dir, "dataset": data, "output_dir": out})]) == 1
    err = capsys.readouterr().err
    assert f"{data}:1: byte 0xe9 at byte offset 15 (byte 16 of line 1) is not valid UTF-8" in err
    assert f"iconv -f latin1 -t utf-8 {data}" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.slow
def test_resume_removes_the_temporary_directory_of_a_killed_checkpoint_write(tiny_random_model_dir, tmp_path):
    from rlxf.runtime.checkpoint import PARTIAL_MARKER

    out = tmp_path / "run"
    cfg = _cfg("dpo", tiny_random_model_dir, out, max_steps=2, save_every=1)
    _train("dpo", cfg)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, look_alike = out / "checkpoints" / f"step-3.tmp-{dead.pid}", out / "checkpoints" / f"step-4.tmp-{dead.pid}"
    for path in (stale, look_alike):
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"\0" * 1024)
    (stale / PARTIAL_MARKER).write_text("{}\n")
    _train("dpo", _cfg("dpo", tiny_random_model_dir, out, max_steps=2, save_every=1, resume=True))
    assert not stale.exists() and look_alike.is_dir()


def test_empty_dataset_is_a_clear_error(tiny_random_model_dir, tmp_path, capsys):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    assert main(["sft", *_flags({**FAST, "model": tiny_random_model_dir, "dataset": data,
                                 "output_dir": tmp_path / "run"})]) == 1
    assert "no rows" in capsys.readouterr().err


def test_prompts_longer_than_max_length_are_dropped_and_counted(tiny_random_model_dir, tmp_path):
    data = tmp_path / "sft.jsonl"
    rows = [{"prompt": "1+1=?", "completion": " #2"}] * 30 + [{"prompt": "9" * 300, "completion": " #9"}] * 3
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "run"
    _train("sft", _cfg("sft", tiny_random_model_dir, out, dataset=str(data), max_steps=2, max_length=64,
                       max_prompt_length=32, eval_holdout=0.0))
    stats = json.loads((out / "summary.json").read_text())["data"]["tokenization"]
    assert stats["dropped"] == 3 and stats["rows_out"] == 30


def test_tokenizer_without_pad_token_trains(tiny_random_model_dir, tmp_path):
    import shutil

    model_dir = tmp_path / "nopad"
    shutil.copytree(tiny_random_model_dir, model_dir)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    out = tmp_path / "run"
    _train("dpo", _cfg("dpo", model_dir, out, max_steps=2))
    assert (out / "final" / "config.json").exists()


def test_non_finite_loss_stops_and_names_the_last_checkpoint(tiny_random_model_dir, tmp_path, monkeypatch):
    import rlxf.recipes.sft as sft

    calls = {"n": 0}
    real = sft.completion_nll

    def poisoned(model, batch):
        calls["n"] += 1
        loss = real(model, batch)
        return loss * float("nan") if calls["n"] > 5 else loss

    monkeypatch.setattr(sft, "completion_nll", poisoned)
    out = tmp_path / "run"
    cfg = _cfg("sft", tiny_random_model_dir, out, max_steps=10, save_every=2, eval_every=0)
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at step 5; last good checkpoint: .*step-4"):
        _train("sft", cfg)
    assert (out / "checkpoints" / "step-4" / "state.json").exists()  # 1 eval call + 4 good steps


def test_rpo_without_scores_uses_nemo_defaults(tiny_random_model_dir, tmp_path, caplog):
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"{i}+1=?", "chosen": f" #{i + 1}", "rejected": f" #{i}"})
                              for i in range(40)) + "\n")
    with caplog.at_level("WARNING"):
        _train("rpo", _cfg("rpo", tiny_random_model_dir, tmp_path / "run", dataset=str(data), max_steps=2))
    assert "NeMo defaults" in caplog.text


@pytest.mark.slow
def test_resuming_a_finished_run_keeps_its_summary_and_best_loss_is_the_lowest(tiny_random_model_dir, tmp_path):
    out = tmp_path / "run"
    first = _train("dpo", _cfg("dpo", tiny_random_model_dir, out, max_steps=4, eval_every=2, lr=1e-2)).summary
    again = _train("dpo", _cfg("dpo", tiny_random_model_dir, out, max_steps=4, eval_every=2, lr=1e-2,
                               resume=True)).summary
    assert again["final/accuracy"] == first["final/accuracy"] is not None
    evals = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["split"] == "eval"]
    assert len(evals) == 3  # steps 0, 2, 4 — no duplicated rows after the resume
    assert first["best/loss"] == pytest.approx(min(evals))


def test_demo_moves_a_finished_previous_demo_aside(tmp_path):
    from rlxf.cli import _keep_previous_demo

    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "summary.json").write_text("{}")
    _keep_previous_demo(demo, resume=False)
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("demo-")]
    assert not demo.exists() and len(kept) == 1 and (kept[0] / "summary.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("recipe,extra", [("dpo", {}), ("orpo", {}), ("dpo", {"lora_r": 4})])
def test_share_prompt_trains_like_the_unshared_step(recipe, extra, tiny_random_model_dir, tmp_path):
    """--share-prompt encodes each prompt once; the losses and eval metrics match the plain run."""
    runs = {}
    for share in (False, True):
        out = tmp_path / f"share-{share}"
        _train(recipe, _cfg(recipe, tiny_random_model_dir, out, max_steps=3, eval_every=3, share_prompt=share,
                            **extra))
        runs[share] = read_metrics(out / "metrics.jsonl")
    for plain, shared in zip(runs[False], runs[True], strict=True):
        assert plain["step"] == shared["step"] and plain["split"] == shared["split"]
        assert plain["loss"] == pytest.approx(shared["loss"], rel=1e-4, abs=1e-5)
        if "accuracy" in plain:
            assert plain["accuracy"] == pytest.approx(shared["accuracy"], abs=1e-6)


def test_share_prompt_refuses_checkpointing_and_compile(tiny_random_model_dir, tmp_path):
    from rlxf.config import ConfigError

    for extra in ({"gradient_checkpointing": True}, {"compile": True}):
        with pytest.raises(ConfigError, match="--share-prompt"):
            _cfg("dpo", tiny_random_model_dir, tmp_path, share_prompt=True, **extra)
