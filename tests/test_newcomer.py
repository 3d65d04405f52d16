"""What a first-time user runs into: reward health in online runs, eval-set size, evaluation fixed
across training seeds, hub ids when offline, progress in long phases, defaults, the Python API and
the README's quick-usage lines."""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import pytest
import torch

from rlxf.cli import main
from rlxf.config import build_config
from rlxf.reporting import read_metrics

ROOT = Path(__file__).resolve().parents[1]
FAST = {"task_size": 32, "eval_size": 8, "eval_generate": 4, "batch_size": 2, "group_size": 2,
        "max_new_tokens": 8, "progress": False, "log_every": 1, "threads": 1}


pytestmark = pytest.mark.usefixtures("one_thread")


def _flags(values: dict) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in values.items()]


def _line_of(fn, text: str) -> int:
    """The line number of ``text`` inside this file's function ``fn``."""
    import inspect

    lines, first = inspect.getsourcelines(fn)
    return first + next(i for i, line in enumerate(lines) if text in line)


# -- 1. reward health ----------------------------------------------------------------------------

def _always_raises(prompts, completions, **fields):
    """Test reward that raises on every call."""
    raise KeyError("score_field")


_CALLS = {"n": 0}


def _fails_two_in_three(prompts, completions, **fields):
    """Test reward: a batch call raises; one sample in three is scored, the others raise."""
    if len(completions) > 1:
        raise ValueError("batch")
    _CALLS["n"] += 1
    if _CALLS["n"] % 3:
        raise ValueError("two in three")
    return [1.0]


def _fails_one_in_three(prompts, completions, **fields):
    """Test reward: one sample in three raises, one returns NaN now and then, the rest score."""
    out = []
    for c in completions:
        _CALLS["n"] += 1
        if _CALLS["n"] % 3 == 0:
            raise ZeroDivisionError("one in three")
        out.append(float("nan") if _CALLS["n"] % 7 == 0 else float(len(c) % 2))
    return out


def test_a_reward_that_always_raises_stops_the_first_step_with_its_location(tiny_random_model_dir, tmp_path,
                                                                           capsys):
    out = tmp_path / "run"
    argv = ["grpo", *_flags({**FAST, "model": tiny_random_model_dir, "output_dir": out, "max_steps": 3,
                             "reward": f"{__file__}:_always_raises"})]
    assert main(argv) == 1
    err = capsys.readouterr().err
    where = f"test_newcomer.py:{_line_of(_always_raises, 'raise KeyError')}"
    assert "failed on all 4 samples of step 1" in err and "KeyError" in err and where in err
    train = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]
    assert [(r["step"], r["reward_errors"], r["reward_none"]) for r in train] == [(1, 4, 4)]
    assert not (out / "summary.json").exists()   # a stopped run is not a finished one


def test_ppo_stops_too_when_every_reward_fails(tiny_random_model_dir, tmp_path, capsys):
    argv = ["ppo", *_flags({**FAST, "model": tiny_random_model_dir, "output_dir": tmp_path / "run", "max_steps": 2,
                            "group_size": 1, "mini_batches": 1, "value_model": "policy",
                            "reward": f"{__file__}:_always_raises"})]
    assert main(argv) == 1
    assert "failed on all 2 samples of step 1" in capsys.readouterr().err


def test_failures_over_the_share_for_patience_steps_stop_the_run(tiny_random_model_dir, tmp_path, capsys):
    _CALLS["n"] = 0
    out = tmp_path / "run"
    argv = ["grpo", *_flags({**FAST, "model": tiny_random_model_dir, "output_dir": out, "max_steps": 5,
                             "batch_size": 3, "reward": f"{__file__}:_fails_two_in_three",
                             "reward_failure_patience": 2})]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "steps 1-2" in err and "--max-reward-failure-share" in err and "--reward-failure-patience" in err
    train = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2] and all(r["reward_errors"] == 4 for r in train)


def test_reward_health_is_in_the_metrics_progress_and_summary(tiny_random_model_dir, tmp_path, caplog):
    _CALLS["n"] = 0
    out = tmp_path / "run"
    argv = ["grpo", *_flags({**FAST, "model": tiny_random_model_dir, "output_dir": out, "max_steps": 3,
                             "batch_size": 3, "reward": f"{__file__}:_fails_one_in_three"})]
    with caplog.at_level(logging.WARNING):
        assert main(argv) == 0
    train = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]
    assert all(r["reward_errors"] >= 1 and r["reward_none"] >= r["reward_errors"] for r in train)
    health = json.loads((out / "summary.json").read_text())["reward_health"]
    assert health["samples"] == 3 * 6 and health["failed"] == sum(r["reward_errors"] for r in train)
    assert health["none"] == sum(r["reward_none"] for r in train)
    kinds = {e["kind"]: e for e in health["first_errors"]}
    assert kinds["ZeroDivisionError"]["location"].startswith(
        f"{__file__}:{_line_of(_fails_one_in_three, 'raise ZeroDivisionError')}")
    assert "non-finite" in kinds
    first = [r.getMessage() for r in caplog.records if "ZeroDivisionError" in r.getMessage()]
    assert len(first) == 1 and "test_newcomer.py" in first[0]   # logged once, with its location


def test_the_progress_line_shows_reward_failures(tiny_random_model_dir, tmp_path, capsys):
    _CALLS["n"] = 0
    argv = ["grpo", *_flags({**FAST, "model": tiny_random_model_dir, "output_dir": tmp_path / "run",
                             "max_steps": 1, "batch_size": 3, "progress": True,
                             "reward": f"{__file__}:_fails_one_in_three"})]
    assert main(argv) == 0
    assert re.search(r"reward_errors=\d+, reward_none=\d+", capsys.readouterr().err)


def test_reward_failure_options_have_bounds():
    from rlxf.config import ConfigError
    from rlxf.configs.grpo import GRPOConfig

    cfg = build_config(GRPOConfig, {})
    assert (cfg.max_reward_failure_share, cfg.reward_failure_patience) == (0.5, 3)
    for bad in ({"max_reward_failure_share": 1.5}, {"reward_failure_patience": 0}):
        with pytest.raises(ConfigError):
            build_config(GRPOConfig, bad)


# -- 2. eval-set size ------------------------------------------------------------------------------

def _pairs(path: Path, n: int, bad: int = 0) -> Path:
    rows = [json.dumps({"prompt": f"{i}+1=?", "chosen": f" #{i + 1}", "rejected": f" #{i}"}) for i in range(n)]
    rows += ['{"prompt": "x", "chosen": " a"}'] * bad
    path.write_text("\n".join(rows) + "\n")
    return path


def _dpo_cfg(**values):
    from rlxf.configs.preference import PreferenceConfig

    return build_config(PreferenceConfig, values)


def test_a_small_eval_set_is_a_warning_that_says_why(tmp_path, caplog):
    from rlxf.recipes.common import load_split_rows

    with caplog.at_level(logging.WARNING):
        train, evals = load_split_rows(_dpo_cfg(dataset=str(_pairs(tmp_path / "p.jsonl", 20))), "preference")
    assert (len(train), len(evals)) == (19, 1)
    assert "1 row" in caplog.text and "fewer than 32" in caplog.text and "noisy" in caplog.text
    assert "--eval-dataset" in caplog.text


def test_an_empty_eval_set_is_an_error(tmp_path):
    from rlxf.data import DataError
    from rlxf.recipes.common import load_split_rows

    data = _pairs(tmp_path / "p.jsonl", 15, bad=10)
    with pytest.raises(DataError, match=r"(?s)eval set is empty.*15 valid.*10 skipped.*--eval-dataset"):
        load_split_rows(_dpo_cfg(dataset=str(data), skip_invalid=True), "preference")


def test_no_eval_set_on_request_leaves_no_null_metric_in_the_summary(tiny_random_model_dir, tmp_path, caplog):
    out = tmp_path / "run"
    argv = ["sft", *_flags({"model": tiny_random_model_dir, "output_dir": out, "max_steps": 1, "batch_size": 2,
                            "progress": False, "threads": 1, "dataset": _sft_rows(tmp_path / "s.jsonl", 12),
                            "eval_holdout": 0})]
    with caplog.at_level(logging.WARNING):
        assert main(argv) == 0
    assert "no held-out evaluation" in caplog.text
    summary = json.loads((out / "summary.json").read_text())
    assert not [k for k, v in summary.items() if k.split("/")[0] in ("start", "final", "best") and v is None]
    assert set(summary["not_measured"]) == {"loss", "task_accuracy"}


def _sft_rows(path: Path, n: int) -> Path:
    path.write_text("\n".join(json.dumps({"prompt": f"{i}+1=?", "completion": f" #{i + 1}"}) for i in range(n)))
    return path


# -- 3. evaluation fixed across training seeds -------------------------------------------------------

def test_task_eval_rows_depend_on_eval_seed_not_on_seed():
    from rlxf.configs.grpo import GRPOConfig
    from rlxf.recipes.common import load_split_rows

    def rows(**values):
        train, evals = load_split_rows(build_config(GRPOConfig, {"task_size": 64, "eval_size": 64, **values}),
                                       "prompt")
        return [r["prompt"] for r in train], [r["prompt"] for r in evals]

    train0, eval0 = rows(seed=0)
    train1, eval1 = rows(seed=1)
    _, eval_other = rows(seed=1, eval_seed=7)
    assert eval0 == eval1                              # the same held-out problems, whatever --seed
    assert eval_other != eval0                         # --eval-seed picks them
    assert train0 != train1                            # training rows still follow --seed
    assert not set(eval0 + eval_other) & set(train0 + train1)   # held-out problems never train
    assert build_config(GRPOConfig, {}).eval_seed == 0


def test_eval_seed_has_bounds():
    from rlxf.config import ConfigError
    from rlxf.configs.sft import SFTConfig

    with pytest.raises(ConfigError, match="eval_seed"):
        build_config(SFTConfig, {"eval_seed": -1})


# -- 4. hub ids when offline -----------------------------------------------------------------------

@pytest.fixture(params=["HF_HUB_OFFLINE", "no network"])
def offline(request, monkeypatch):
    """The two ways a machine is offline: the switch, or no route to the Hub (name lookups fail).
    The libraries a run loads are imported first, so the tests' clocks time the lookup, not the
    imports (seconds on a loaded machine)."""
    import socket

    import huggingface_hub  # noqa: F401
    import transformers  # noqa: F401

    import rlxf.recipes.common  # noqa: F401
    import rlxf.recipes.sft  # noqa: F401

    if request.param == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

        def no_network(*args, **kwargs):
            raise socket.gaierror(-2, "Name or service not known")

        monkeypatch.setattr(socket, "getaddrinfo", no_network)
    return request.param


def test_an_offline_hub_model_fails_fast_before_writing(offline, tmp_path, capsys):
    out = tmp_path / "run"
    start = time.time()
    assert main(["sft", "--model", "nobody-rlxf/no-such-model", "--output-dir", str(out), "--max-steps", "1"]) == 1
    assert time.time() - start < 5
    err = capsys.readouterr().err
    assert "nobody-rlxf/no-such-model" in err and offline.split()[-1] in err and "--model tiny" in err
    assert "not in the local cache" in err
    assert not out.exists()
    # a missing data file is reported before any model is looked for
    assert main(["sft", "--model", "nobody-rlxf/no-such-model", "--dataset", str(tmp_path / "none.jsonl"),
                 "--output-dir", str(out)]) == 1
    assert "none.jsonl: file not found" in capsys.readouterr().err


def test_an_offline_hub_dataset_fails_fast(offline, tmp_path, capsys):
    start = time.time()
    assert main(["sft", "--dataset", "nobody-rlxf/no-such-data", "--output-dir", str(tmp_path / "run")]) == 1
    assert time.time() - start < 5
    err = capsys.readouterr().err
    assert "nobody-rlxf/no-such-data" in err and offline.split()[-1] in err and "not in the local cache" in err
    assert "local .jsonl" in err


def test_hub_ids_are_checked_against_the_cache_and_the_network(tmp_path, monkeypatch):
    from rlxf.runtime import hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "cache_dirs", lambda repo_id, kind: [tmp_path / "cache"])
    monkeypatch.setattr(hub, "unreachable", lambda: "cannot resolve huggingface.co")
    problem = hub.hub_problem("org/name", "model", option="--model")
    assert "org/name" in problem and "cannot resolve huggingface.co" in problem
    (tmp_path / "cache" / "snapshots" / "abc").mkdir(parents=True)
    assert hub.hub_problem("org/name", "model", option="--model") is None   # cached: loads offline


# -- 5. progress in long phases -----------------------------------------------------------------------

def test_verify_rm_pretraining_reports_progress_with_an_estimate(tiny_random_model_dir, caplog):
    from rlxf.models import load_reward_model
    from rlxf.rewards.cooper import pretrain_verify_rm
    from rlxf.tasks import get_task
    from rlxf.zoo.tokenizer import build_tokenizer

    rm = load_reward_model(str(tiny_random_model_dir), dtype="float32", device="cpu", pad_token_id=0)
    with caplog.at_level(logging.INFO):
        pretrain_verify_rm(rm, build_tokenizer(), get_task("arithmetic"), steps=3, lr=1e-3, batch_size=4, seed=0)
    lines = [r.getMessage() for r in caplog.records if "VerifyRM pretraining" in r.getMessage()]
    assert any("3 steps" in line for line in lines) and any("left" in line for line in lines)
    assert "done" in lines[-1]


def test_model_loading_is_logged_with_its_time(tiny_random_model_dir, caplog):
    from rlxf.configs.sft import SFTConfig
    from rlxf.recipes.common import load_model_for_training

    with caplog.at_level(logging.INFO):
        load_model_for_training(build_config(SFTConfig, {"model": str(tiny_random_model_dir), "threads": 1}))
    text = caplog.text
    assert f"loading model {tiny_random_model_dir}" in text and re.search(r"loaded in [\d.]+ s", text)


# -- 6. defaults -------------------------------------------------------------------------------------

def test_grpo_defaults_follow_the_stated_rule():
    import yaml

    from rlxf.cli import DEMO
    from rlxf.configs.grpo import GRPOConfig

    assert build_config(GRPOConfig, {}).lr == DEMO["lr"] == yaml.safe_load((ROOT / "configs/grpo_tiny.yaml")
                                                                         .read_text())["lr"]
    cli = (ROOT / "docs/cli.md").read_text()
    assert "## Defaults" in cli and "tiny model" in cli.split("## Defaults")[1].split("\n## ")[0]


def test_help_states_the_defaults_rule(capsys):
    with pytest.raises(SystemExit):
        main(["grpo", "--help"])
    assert "every default is tuned for it" in " ".join(capsys.readouterr().out.split())


# -- 7. the Python API and the README -----------------------------------------------------------------

def _ends_with_answer(prompts, completions, answer, **fields):
    return [float(c.strip().endswith("#" + a)) for c, a in zip(completions, answer)]


@pytest.mark.parametrize("build", [False, True])
def test_a_python_callable_reward_trains_end_to_end(build, tiny_random_model_dir, tmp_path):
    import yaml

    from rlxf.configs.grpo import GRPOConfig
    from rlxf.recipes.grpo import train

    values = {**FAST, "model": str(tiny_random_model_dir), "output_dir": str(tmp_path / "run"), "max_steps": 1,
              "reward": _ends_with_answer}
    cfg = build_config(GRPOConfig, values) if build else GRPOConfig(**values)
    assert cfg.reward is _ends_with_answer
    result = train(cfg)
    name = f"{__name__}:_ends_with_answer"
    assert result.summary["reward"] == name and result.summary["start/reward"] is not None
    assert yaml.safe_load((result.output_dir / "config.yaml").read_text())["reward"] == name


def test_a_non_callable_object_is_still_refused_as_a_reward():
    from rlxf.config import ConfigError
    from rlxf.configs.grpo import GRPOConfig

    with pytest.raises(ConfigError, match="reward"):
        GRPOConfig(reward=3)


def test_readme_quick_usage_lines_say_what_they_need():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Quick usage")[1].split("```bash")[1].split("```")[0]
    commands = [line for line in block.splitlines() if line.startswith("rlxf ") and "--help" not in line]
    assert commands
    for line in commands:
        assert re.search(r"\[(as is|your files|internet)[^\]]*\]", line), line
    assert "```python" in readme.split("## Python API")[1]


# -- 8. docstrings point at files that ship ------------------------------------------------------------

def test_docstrings_point_only_at_shipped_documents():
    import rlxf

    stale = re.compile(r"DESIGN\.md|SPECS|PERF\.md")
    found = sorted(str(p.relative_to(ROOT / "src/rlxf")) for p in (ROOT / "src/rlxf").rglob("*.py")
                   if stale.search(p.read_text()))
    assert found == []
    for page in re.findall(r"docs/[\w/.-]+\.md", rlxf.__doc__):
        assert (ROOT / page).is_file(), page


def test_generated_task_accuracy_and_cooper_rm_eval_follow_eval_seed(monkeypatch):
    """--eval-generate (offline recipes) and COOPER's RM eval pairs use --eval-seed, not --seed."""
    from rlxf.configs.cooper import CooperConfig
    from rlxf.configs.sft import SFTConfig
    from rlxf.recipes import common
    from rlxf.tasks import accuracy

    seen = []
    monkeypatch.setattr(accuracy, "task_accuracy", lambda *a, **kw: seen.append(kw["seed"]) or 0.0)
    for values in ({"seed": 3}, {"seed": 3, "eval_seed": 5}):
        cfg = build_config(SFTConfig, {"dataset": "task:arithmetic", "eval_generate": 4, **values})
        common.task_eval_metrics(cfg, None, None)
    assert seen == [0, 5]
    options = build_config(CooperConfig, {"seed": 3, "eval_seed": 9}).reward_options()
    assert options["eval_seed"] == 9 and options["seed"] == 3


def test_cooper_rm_eval_pairs_do_not_follow_the_training_seed(tiny_random_model_dir):
    from rlxf.models import load_reward_model
    from rlxf.rewards.cooper import CooperReward
    from rlxf.tasks import get_task
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_random_model_dir)
    rm = load_reward_model(str(tiny_random_model_dir), dtype="float32", device="cpu", pad_token_id=0)

    def pairs(**kw):
        return CooperReward(rm, tokenizer, get_task("arithmetic"), group_size=4, eval_size=8, **kw).eval_examples

    assert pairs(seed=1) == pairs(seed=2) and pairs(seed=1, eval_seed=4) != pairs(seed=1)
