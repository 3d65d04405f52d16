"""``rlxf compare``: the side-by-side report of synthetic runs, spec validation, and two tiny SFT runs
end to end (train, skip finished runs on a re-run, refuse stale or interrupted ones)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from rlxf.cli import main
from rlxf.config import ConfigError
from rlxf.workflows.compare import plan_runs, run_comparison
from rlxf.reporting import MetricsLogger, read_metrics, write_summary
from rlxf.reporting.compare import compare_runs, default_threshold

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BASE_CONFIG = {"model": "tiny", "lr": 1e-3, "seed": 0, "max_steps": 40, "output_dir": "x", "resume": False}


def fake_run(path: Path, *, evals: dict[int, dict], train: dict[int, dict], config: dict | None = None,
             finished: bool = True, wall: float = 12.5) -> Path:
    """A run directory as a recipe leaves it: metrics.jsonl, summary.json, config.yaml."""
    with MetricsLogger(path) as logger:
        for step in sorted({*evals, *train}):
            if step in train:
                logger.log(step, train[step])
            if step in evals:
                logger.log(step, evals[step], split="eval")
    if finished:
        write_summary(path, {"recipe": "grpo", "wall_seconds": wall, "final/task_accuracy": 0.0})
    (path / "config.yaml").write_text(yaml.safe_dump({**BASE_CONFIG, "output_dir": str(path), **(config or {})}))
    return path


@pytest.fixture
def three_runs(tmp_path):
    # baseline: slow climb, then a small drop at the end; length in eval rows; KL up then down
    steps = range(1, 41)
    baseline = fake_run(
        tmp_path / "baseline",
        evals={s: {"task_accuracy": a, "completion_length": n}
               for s, a, n in [(0, 0.2, 30), (10, 0.3, 28), (20, 0.4, 25), (30, 0.5, 20), (40, 0.45, 18)]},
        train={s: {"reward/mean": s / 40, "kl": 0.01 * s if s <= 30 else 0.3 - 0.01 * (s - 30), "entropy": 1.0,
                   "completion_length": 40 - s / 2} for s in steps})
    # fast: reaches 0.8 at step 30 and stays (the best is the first step that reached it)
    fast = fake_run(
        tmp_path / "fast",
        evals={s: {"task_accuracy": a, "completion_length": 25}
               for s, a in [(0, 0.2), (10, 0.5), (20, 0.7), (30, 0.8), (40, 0.8)]},
        train={s: {"reward/mean": 0.5, "kl": 0.02, "entropy": 0.8} for s in steps},
        config={"lr": 1e-2, "beta": 0.1})
    # short: 20 steps, a non-finite eval value (null), no KL, length only in train rows, unfinished
    short = fake_run(
        tmp_path / "short",
        evals={0: {"task_accuracy": 0.2}, 10: {"task_accuracy": float("nan")}, 20: {"task_accuracy": 0.3}},
        train={s: {"reward/mean": 0.1, "completion_length": 12.0} for s in range(1, 21)},
        finished=False)
    return {"baseline": baseline, "fast": fast, "short": short}


def test_compare_numbers_and_files(three_runs, tmp_path):
    out = tmp_path / "report"
    result = compare_runs(three_runs, out)
    runs = result["runs"]

    # default threshold: midway from the common start 0.2 to the best final 0.8
    assert result["threshold"] == pytest.approx(0.5)
    assert result["threshold_rule"] == \
        "threshold 0.5: midpoint between the mean start (0.2) and the best final value (0.8)"
    assert {k: runs["baseline"][k] for k in ("start", "final", "best", "best_step", "steps_to_threshold")} == \
        {"start": 0.2, "final": 0.45, "best": 0.5, "best_step": 30, "steps_to_threshold": 30}
    assert (runs["fast"]["best"], runs["fast"]["best_step"], runs["fast"]["steps_to_threshold"]) == (0.8, 30, 10)
    assert (runs["short"]["final"], runs["short"]["steps_to_threshold"]) == (0.3, None)  # the null is skipped

    assert runs["baseline"]["final_completion_length"] == 18  # eval rows win over train rows
    assert runs["short"]["final_completion_length"] == 12.0  # train rows when eval has none
    assert runs["baseline"]["final_kl"] == pytest.approx(0.2) and runs["baseline"]["max_kl"] == pytest.approx(0.3)
    assert runs["short"]["final_kl"] is None and runs["short"]["max_kl"] is None
    assert runs["baseline"]["end_reward"] == pytest.approx((37 + 38 + 39 + 40) / 4 / 40)  # last tenth of rows
    assert runs["baseline"]["wall_seconds"] == 12.5 and runs["short"]["finished"] is False
    assert runs["short"]["last_step"] == 20 and runs["baseline"]["last_step"] == 40

    assert result["panels"] == ["eval/task_accuracy", "train/reward/mean", "train/kl", "eval/completion_length",
                                "train/entropy"]  # no run logged loss
    assert result["curves"]["fast"]["train/kl"]["points"] == 40
    assert "train/kl" not in result["curves"]["short"]
    assert result["config_diff"] == {"fast": {"lr": [1e-3, 1e-2], "beta": ["(not set)", 0.1]}, "short": {}}
    assert any("short: no summary.json" in note for note in result["notes"])

    assert json.loads((out / "compare.json").read_text()) == result
    assert (out / "compare.png").read_bytes().startswith(PNG_MAGIC)
    page = (out / "compare.html").read_text()
    assert "data:image/png;base64," in page and "<td>beta</td>" in page and "<td>0.01</td>" in page
    md = (out / "compare.md").read_text()
    assert "| run | recipe | steps | task_accuracy start |" in md
    assert "| fast | grpo | 40 | 0.2 | 0.8 | 0.8 | 30 | 10 |" in md
    assert "| `lr` | 0.001 | 0.01 | 0.001 |" in md


def test_given_threshold_min_goal_and_chosen_panels(three_runs, tmp_path):
    result = compare_runs(three_runs, tmp_path / "r", threshold=0.4)
    assert [result["runs"][k]["steps_to_threshold"] for k in three_runs] == [20, 10, None]
    assert result["threshold_rule"] == "threshold 0.4: given"

    result = compare_runs(three_runs, tmp_path / "r", metric="completion_length", goal="min",
                          panels=["train/completion_length", "nothing_logs_this"])
    assert (result["runs"]["baseline"]["best"], result["runs"]["baseline"]["best_step"]) == (18, 40)
    assert result["threshold"] == pytest.approx(((30 + 25) / 2 + 18) / 2)  # mean start → best final 18
    assert result["panels"] == ["train/completion_length"]


def test_default_threshold_needs_an_improvement():
    assert default_threshold([0.2, 0.4], [0.5, 0.1], "max") == pytest.approx(0.4)
    assert default_threshold([0.5], [0.5], "max") is None
    assert default_threshold([2.0], [1.0], "min") == pytest.approx(1.5)


def test_compare_errors_name_the_run_and_the_fix(three_runs, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"run 'gone': .*gone does not exist"):
        compare_runs({**three_runs, "gone": tmp_path / "gone"}, tmp_path / "r")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"run 'empty': .*has no metrics.jsonl"):
        compare_runs({"empty": tmp_path / "empty"}, tmp_path / "r")
    with pytest.raises(ConfigError, match=r"no run logged the eval metric 'accuracy'.*completion_length, "
                                          r"task_accuracy.*--metric"):
        compare_runs(three_runs, tmp_path / "r", metric="accuracy")
    with pytest.raises(ConfigError, match="no runs"):
        compare_runs({}, tmp_path / "r")
    (three_runs["fast"] / "summary.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"run 'fast': cannot read a file in .*fast"):
        compare_runs(three_runs, tmp_path / "r")


def test_cli_compares_existing_run_dirs(three_runs, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["compare", "--runs", *(f"{k}={v}" for k, v in three_runs.items()), "--output-dir", str(out)]
    assert main([*argv, "--threshold", "0.4"]) == 0
    assert json.loads((out / "compare.json").read_text())["runs"]["baseline"]["steps_to_threshold"] == 20
    assert "compare.html" in capsys.readouterr().out
    assert main(["compare", "--runs", "nolabel", "--output-dir", str(out)]) == 2
    assert "not LABEL=DIR" in capsys.readouterr().err
    assert main(["compare"]) == 2 and "either SPEC.yaml or --runs" in capsys.readouterr().err
    assert main(["compare", "--runs", f"x={tmp_path / 'missing'}", "--output-dir", str(out)]) == 1
    assert "run 'x'" in capsys.readouterr().err


# -- the spec ----------------------------------------------------------------------------------------

GOOD = {"recipe": "sft", "common": {"max_steps": 2, "seed": 0}, "runs": {"a": {"lr": 1e-3}, "b": {"lr": 1e-2}}}


@pytest.mark.parametrize("change,message", [
    ({"recipe": "sfft"}, r"recipe: unknown recipe 'sfft'; did you mean 'sft'\?"),
    ({"runs": {}}, r"'runs' must be a non-empty mapping"),
    ({"runs": {"../up": {}}}, r"run label '\.\./up' is not a safe directory name"),
    ({"runs": {"a": [1, 2]}}, r"runs\.a: expected a mapping of option: value"),
    ({"runs": {"a": {"lrr": 1}}}, r"runs\.a \(run 'a', recipe sft\): unknown option 'lrr'.*did you mean 'lr'"),
    ({"common": {"max_step": 2}}, r"common \(run 'a', recipe sft\): unknown option 'max_step'"),
    ({"runs": {"a": {"lr": "abc"}}}, r"runs\.a: lr: cannot read 'abc' as float"),
    ({"runs": {"a": {"lr": -1.0}}}, r"runs\.a: lr -1\.0 is out of range: it must be a finite number > 0"),
    ({"runs": {"a": {"output_dir": "elsewhere"}}}, r"'output_dir' is set by rlxf compare"),
    ({"runs": {"a": {"recipe": "nope"}}}, r"runs\.a: unknown recipe 'nope'"),
    ({"run": {}}, r"unknown key 'run'; did you mean 'runs'\?"),
    ({"recipe": None}, r"no recipe for run 'a'"),
    ({"goal": "maxx"}, r"goal: expected max \(higher is better\) or min"),
    ({"threshold": "high"}, r"threshold: expected a number"),
    ({"panels": "kl"}, r"panels: expected a list of metric names"),
])
def test_bad_specs_say_what_where_and_how(change, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        run_comparison({**GOOD, **change}, output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing trained or written


def test_spec_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="compare spec not found"):
        run_comparison(tmp_path / "nope.yaml", output_dir=tmp_path)
    (tmp_path / "list.yaml").write_text("- a\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: expected a mapping"):
        run_comparison(tmp_path / "list.yaml", output_dir=tmp_path)


def test_a_run_may_use_another_recipe(tmp_path):
    spec = {**GOOD, "runs": {"sft": {}, "dpo": {"recipe": "dpo", "beta": 0.2}}}
    planned = plan_runs(spec, output_dir=tmp_path)
    assert [(p.label, p.recipe, type(p.config).__name__) for p in planned] == \
        [("sft", "sft", "SFTConfig"), ("dpo", "dpo", "PreferenceConfig")]
    assert planned[1].config.beta == 0.2 and planned[1].config.max_steps == 2  # common applies too
    assert planned[1].output_dir == tmp_path / "dpo" and planned[1].config.output_dir == str(tmp_path / "dpo")


# -- end to end on a tiny model ------------------------------------------------------------------------

FAST = {"task_size": 32, "eval_size": 16, "batch_size": 8, "eval_batch_size": 16, "progress": False,
        "log_every": 1, "warmup_steps": 1, "threads": 1, "max_steps": 2, "eval_every": 1, "seed": 0}


@pytest.mark.slow
def test_two_sft_runs_end_to_end_then_skipped(tiny_random_model_dir, tmp_path, capsys):
    spec = {"recipe": "sft", "common": {"model": str(tiny_random_model_dir), **FAST}, "metric": "loss", "goal": "min",
            "runs": {"lr_low": {"lr": 1e-4}, "lr_high": {"lr": 1e-2}}}
    spec_path = tmp_path / "lr.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))  # the first run is the baseline
    out = tmp_path / "cmp"

    result = run_comparison(spec_path, output_dir=out)
    assert result["status"] == {"lr_low": "trained", "lr_high": "trained"}
    for label in ("lr_low", "lr_high"):
        assert [r["step"] for r in read_metrics(out / label) if r["split"] == "eval"] == [0, 1, 2]
        assert result["runs"][label]["recipe"] == "sft" and result["runs"][label]["last_step"] == 2
    assert result["runs"]["lr_low"]["start"] == result["runs"]["lr_high"]["start"]  # same model and seed
    assert result["runs"]["lr_high"]["final"] < result["runs"]["lr_low"]["final"]  # the larger step learned more
    assert result["config_diff"] == {"lr_high": {"lr": [1e-4, 1e-2]}}
    for name in ("compare.json", "compare.png", "compare.html", "compare.md", "compare_spec.yaml"):
        assert (out / name).is_file(), name
    assert 'href="lr_low/report.html"' in (out / "compare.html").read_text()

    # the same command again trains nothing and rewrites the report
    before = (out / "lr_low" / "metrics.jsonl").stat().st_mtime_ns
    assert main(["compare", str(spec_path), "--output-dir", str(out), "--threshold", "100"]) == 0
    assert (out / "lr_low" / "metrics.jsonl").stat().st_mtime_ns == before
    assert json.loads((out / "compare.json").read_text())["runs"]["lr_low"]["steps_to_threshold"] == 0
    capsys.readouterr()

    # a finished run whose spec changed is refused, not silently reused
    changed = {**spec, "runs": {"lr_low": {"lr": 3e-4}, "lr_high": {"lr": 1e-2}}}
    with pytest.raises(ConfigError, match=r"run 'lr_low' .*finished with another config \(lr: 0\.0001 → 0\.0003\)"):
        run_comparison(changed, output_dir=out)
    # an interrupted run needs --resume; nothing trains before the check
    (out / "new").mkdir()
    (out / "new" / "metrics.jsonl").write_text('{"step": 1, "split": "train", "time": 0.1, "loss": 1.0}\n')
    grown = {**spec, "runs": {**spec["runs"], "new": {"lr": 1e-3}}}
    with pytest.raises(ConfigError, match=r"run 'new' .*was interrupted; rerun with --resume"):
        run_comparison(grown, output_dir=out)
    # --report-only trains nothing and reports what is there
    result = run_comparison(spec, output_dir=out, only_report=True, metric="perplexity")
    assert result["status"] == {"lr_low": "finished", "lr_high": "finished"}
    assert result["metric"] == "perplexity"
