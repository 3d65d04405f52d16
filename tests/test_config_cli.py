"""Configuration and CLI: example configs, YAML/flag merging, errors, --help, output-dir safety.

Fast: nothing here loads a model or trains.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest

from rlxf.cli import RECIPES, _config_class, build_parser, main
from rlxf.config import ConfigError, build_config, cli_flag, coerce, load_yaml, numeric_fields, parse_args, save_yaml
from rlxf.workflows.long2short import Long2ShortDataConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def recipe_for(path: Path) -> str:
    """configs/<name>.yaml → the recipe that reads it (its name's prefix; dpo/ipo/cdpo/simpo files → dpo;
    gspo/cispo → grpo)."""
    if path.stem.startswith(("gspo", "cispo")):  # presets of a policy loss on `rlxf grpo`
        return "grpo"
    if path.stem.startswith("online_dpo"):
        return "online-dpo"
    if path.stem.startswith("kto"):
        return "kto"
    for prefix in ("rm", "sft", "rpo", "orpo", "dr_grpo", "grpo", "dapo", "rloo", "ppo", "cooper"):
        if path.stem.startswith(prefix):
            return prefix
    return "dpo"


def cli_config(argv: list[str]):
    """What ``rlxf <argv>`` would train with (parsed and validated, not run)."""
    args = build_parser().parse_args(argv)
    return parse_args(_config_class(args.command), args)


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- example configs ------------------------------------------------------------------------------

def test_every_recipe_has_example_configs():
    assert {recipe_for(p) for p in CONFIGS} == set(RECIPES)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_config_loads_into_its_recipe_config(path):
    recipe = recipe_for(path)
    cls = _config_class(recipe)
    values = load_yaml(path)
    cfg = build_config(cls, values, where=str(path))
    for key, value in values.items():  # every value in the file reached the config
        name = key.replace("-", "_")
        assert getattr(cfg, name) == coerce(cls, name, value), key
    # the same file through the CLI gives the same config
    assert cli_config([recipe, "--config", str(path)]) == cfg


@pytest.mark.parametrize("name,loss", [("dpo_tiny", "dpo"), ("ipo_tiny", "ipo"), ("cdpo_tiny", "cdpo"),
                                       ("dpo_nll_tiny", "dpo"), ("rpo_tiny", "rpo"), ("orpo_tiny", "orpo"),
                                       ("dpo_lora_tiny", "dpo"), ("dpo_qwen_lora", "dpo"),
                                       ("rm_tiny", "bt"), ("rm_focal_tiny", "focal")])
def test_example_config_selects_the_method_its_name_says(name, loss):
    path = ROOT / "configs" / f"{name}.yaml"
    cfg = build_config(_config_class(recipe_for(path)), load_yaml(path))
    assert cfg.loss == loss
    if name == "dpo_nll_tiny":
        assert cfg.nll_alpha > 0
    if "lora" in name:
        assert cfg.lora_r > 0


def test_grpo_tiny_config_holds_the_demo_settings():
    from rlxf.cli import DEMO, DEMO_RECIPE

    cfg = build_config(_config_class(DEMO_RECIPE), load_yaml(ROOT / "configs" / "grpo_tiny.yaml"))
    assert {k: getattr(cfg, k) for k in DEMO} == DEMO


def test_real_model_example_is_a_realistic_lora_run():
    cfg = build_config(_config_class("dpo"), load_yaml(ROOT / "configs" / "dpo_qwen_lora.yaml"))
    assert cfg.model == "Qwen/Qwen2.5-0.5B-Instruct"
    assert (cfg.lr, cfg.beta, cfg.lora_r) == (5e-6, 0.1, 16)
    assert cfg.dataset.endswith(".jsonl")


# -- YAML errors ----------------------------------------------------------------------------------

def test_unknown_yaml_key_suggests_the_close_key(tmp_path):
    path = write(tmp_path, "bta: 0.2\n")
    with pytest.raises(ConfigError, match=r"unknown option 'bta'.*did you mean 'beta'"):
        build_config(_config_class("dpo"), load_yaml(path), where=str(path))
    # through --config the message names the file
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        cli_config(["dpo", "--config", str(path)])


def test_unknown_key_without_a_close_match_lists_valid_keys():
    with pytest.raises(ConfigError, match="valid keys: .*beta"):
        build_config(_config_class("dpo"), {"zzzzzz": 1})


def test_bad_type_names_the_field(tmp_path):
    path = write(tmp_path, "lr: abc\n")
    with pytest.raises(ConfigError, match=r"lr: cannot read 'abc' as float"):
        build_config(_config_class("dpo"), load_yaml(path))


def test_non_integer_for_an_int_field_is_rejected():
    with pytest.raises(ConfigError, match="batch_size"):
        build_config(_config_class("sft"), {"batch_size": 2.5})


def test_invalid_choice_lists_the_choices():
    with pytest.raises(ConfigError, match=r"--loss: 'foo' is not one of dpo, ipo, cdpo, rpo, orpo"):
        build_config(_config_class("dpo"), {"loss": "foo"})
    with pytest.raises(ConfigError, match=r"bt, focal"):
        build_config(_config_class("rm"), {"loss": "foo"})


@pytest.mark.parametrize("prompt_len,length", [(256, 256), (300, 256)])
def test_max_prompt_length_must_be_below_max_length(prompt_len, length):
    with pytest.raises(ConfigError, match="max-prompt-length"):
        build_config(_config_class("dpo"), {"max_prompt_length": prompt_len, "max_length": length})


def test_yaml_keys_may_use_dashes_and_scientific_notation(tmp_path):
    # PyYAML reads "5e-6" (no dot) as a string; coercion still makes it a float
    path = write(tmp_path, "max-steps: 7\nlr: 5e-6\nresume: yes\n")
    cfg = build_config(_config_class("dpo"), load_yaml(path))
    assert (cfg.max_steps, cfg.lr, cfg.resume) == (7, 5e-6, True)


def test_yaml_that_is_not_a_mapping_or_missing_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_yaml(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="file not found"):
        load_yaml(tmp_path / "nope.yaml")


def test_a_runs_config_yaml_reloads_to_the_same_config(tmp_path):
    cfg = build_config(_config_class("rpo"), {"beta": 0.3, "eval_dataset": "x.jsonl", "lora_r": 4})
    save_yaml(cfg, tmp_path / "config.yaml")
    assert build_config(_config_class("rpo"), load_yaml(tmp_path / "config.yaml")) == cfg


# -- CLI ------------------------------------------------------------------------------------------

def test_flags_override_yaml_values(tmp_path):
    path = write(tmp_path, "beta: 0.3\nlr: 1.0e-3\nloss: ipo\n")
    cfg = cli_config(["dpo", "--config", str(path), "--beta", "0.05", "--max-steps=9"])
    assert cfg.beta == 0.05  # flag wins
    assert cfg.lr == 1e-3 and cfg.loss == "ipo"  # YAML kept where no flag
    assert cfg.max_steps == 9
    assert cfg.batch_size == _config_class("dpo")().batch_size  # neither: the dataclass default


def test_recipe_defaults_differ_where_documented():
    assert cli_config(["rpo"]).loss == "rpo" and cli_config(["rpo"]).beta == 0.2
    assert cli_config(["orpo"]).loss == "orpo"
    assert cli_config(["dpo"]).loss == "dpo" and cli_config(["dpo"]).beta == 0.1


@pytest.mark.parametrize("argv,expected", [
    (["--resume"], True), (["--resume", "true"], True), (["--resume", "false"], False),
    (["--resume=yes"], True), (["--resume", "0"], False), ([], False),
    (["--resume", "--lr", "0.01"], True),
])
def test_bool_flags(argv, expected):
    assert cli_config(["dpo", *argv]).resume is expected


def test_bad_bool_value_is_a_config_error():
    with pytest.raises(ConfigError, match="resume: cannot read 'maybe' as bool"):
        cli_config(["dpo", "--resume", "maybe"])


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_help_lists_every_config_field_with_its_help_text(recipe, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([recipe, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    squashed = re.sub(r"\s+", "", out)  # argparse wraps lines (and may break at hyphens)
    assert "--config" in out
    for f in dataclasses.fields(_config_class(recipe)):
        flag = cli_flag(f)
        assert re.search(re.escape(flag) + r"(?![\w-])", out), flag
        assert re.sub(r"\s+", "", f.metadata["help"]) in squashed, f"help text of {flag}"
        for choice in f.metadata.get("choices") or ():
            assert choice in out


def test_main_returns_2_with_a_configuration_error_for_a_bad_flag_value(capsys):
    assert main(["dpo", "--lr", "abc"]) == 2
    err = capsys.readouterr().err
    assert "configuration error" in err and "lr" in err and "'abc'" in err


def test_main_reports_an_invalid_choice_from_the_command_line(capsys):
    assert main(["dpo", "--loss", "foo"]) == 2
    assert "dpo, ipo, cdpo, rpo, orpo" in capsys.readouterr().err


def test_main_reports_an_unknown_yaml_key(tmp_path, capsys):
    path = write(tmp_path, "max_step: 5\n")
    assert main(["sft", "--config", str(path)]) == 2
    assert "did you mean 'max_steps'" in capsys.readouterr().err


def test_unknown_flag_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["dpo", "--no-such-flag", "1"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


# -- output directory safety ----------------------------------------------------------------------

def test_an_output_dir_holding_a_run_is_refused_without_resume(tmp_path):
    from rlxf.train.rundir import prepare_output_dir

    out = tmp_path / "run"
    out.mkdir()
    metrics = out / "metrics.jsonl"
    metrics.write_text('{"step": 1, "split": "train", "time": 0.1, "loss": 0.5}\n')
    cfg = build_config(_config_class("dpo"), {"output_dir": str(out)})
    with pytest.raises(ConfigError, match="already holds a run.*--resume"):
        prepare_output_dir(cfg, "dpo")
    assert metrics.read_text() == '{"step": 1, "split": "train", "time": 0.1, "loss": 0.5}\n'
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]  # nothing written

    resumed = dataclasses.replace(cfg, resume=True)
    assert prepare_output_dir(resumed, "dpo") == out
    assert (out / "config.yaml").exists()
    assert metrics.read_text().startswith('{"step": 1')


def test_a_checkpoints_dir_also_marks_a_run(tmp_path):
    from rlxf.train.rundir import prepare_output_dir

    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(ConfigError, match="already holds a run"):
        prepare_output_dir(build_config(_config_class("sft"), {"output_dir": str(tmp_path)}), "sft")


def test_a_fresh_or_empty_output_dir_is_accepted(tmp_path):
    from rlxf.train.rundir import prepare_output_dir

    for out in (tmp_path, tmp_path / "new" / "run"):  # tmp_path while it is still empty
        cfg = build_config(_config_class("rm"), {"output_dir": str(out)})
        assert prepare_output_dir(cfg, "rm") == out
        assert build_config(_config_class("rm"), load_yaml(out / "config.yaml")) == cfg


def test_main_refuses_an_existing_run_with_exit_code_2(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    assert main(["dpo", "--output-dir", str(tmp_path), "--model", str(tmp_path / "missing")]) == 2
    assert "pass --resume" in capsys.readouterr().err


def test_a_directory_of_the_users_own_files_is_never_written(tmp_path, capsys):
    """config.yaml and notes.txt of the user's, no run: refused with and without --resume, untouched."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my: settings\n")
    (mine / "notes.txt").write_text("notes\n")
    for extra in ([], ["--resume"]):
        assert main(["sft", "--output-dir", str(mine), "--max-steps", "1", *extra]) == 2
        err = capsys.readouterr().err
        assert "is not an rlxf run directory: it holds config.yaml, notes.txt" in err
        assert "--output-dir" in err and "nothing was written" in err
        assert ("--resume continues an rlxf run" in err) == bool(extra)
    assert sorted(p.name for p in mine.iterdir()) == ["config.yaml", "notes.txt"]
    assert (mine / "config.yaml").read_text() == "my: settings\n"


def test_the_run_marker_is_written_first_and_recognises_the_run(tmp_path, monkeypatch):
    import json

    import rlxf.train.rundir as common

    written = []
    real_save = common.save_yaml
    monkeypatch.setattr(common, "save_yaml", lambda cfg, path: (written.append(sorted(os.listdir(path.parent))),
                                                                real_save(cfg, path)))
    out = tmp_path / "run"
    cfg = build_config(_config_class("sft"), {"output_dir": str(out)})
    common.prepare_output_dir(cfg, "sft")
    assert written == [[common.RUN_MARKER]]            # the marker was there before config.yaml
    assert json.loads((out / common.RUN_MARKER).read_text())["recipe"] == "sft"
    (out / "notes.txt").write_text("added later\n")
    assert common.prepare_output_dir(cfg, "sft") == out  # a run dir without a started run is reused
    assert (out / "notes.txt").read_text() == "added later\n"
    (out / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match="already holds a run"):
        common.prepare_output_dir(cfg, "sft")


def test_a_run_written_before_the_marker_existed_resumes_and_gets_the_marker(tmp_path):
    from rlxf.train.rundir import RUN_MARKER, prepare_output_dir

    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    cfg = build_config(_config_class("sft"), {"output_dir": str(tmp_path), "resume": True})
    assert prepare_output_dir(cfg, "sft") == tmp_path
    assert (tmp_path / RUN_MARKER).is_file() and (tmp_path / "metrics.jsonl").read_text() == "{}\n"


def test_an_output_dir_that_is_a_file_is_refused(tmp_path):
    from rlxf.train.rundir import prepare_output_dir

    path = tmp_path / "out"
    path.write_text("mine\n")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        prepare_output_dir(build_config(_config_class("sft"), {"output_dir": str(path)}), "sft")
    assert path.read_text() == "mine\n"


# -- numeric options: one check, every field, before anything loads -------------------------------

def _config_classes() -> list[type]:
    """Every config class of a command: the recipes', and long2short-data, cool-rlhf, cai-sft, rlaif."""
    import importlib

    from rlxf.cli import AI_FEEDBACK
    from rlxf.workflows.cool_rlhf import CoolRLHFConfig

    classes = {_config_class(name) for name in RECIPES}
    classes |= {getattr(importlib.import_module(module), cls) for module, cls, _ in AI_FEEDBACK.values()}
    return sorted(classes | {Long2ShortDataConfig, CoolRLHFConfig}, key=lambda c: c.__name__)


NUMERIC = [(cls, name, kind, bounds) for cls in _config_classes() for name, kind, bounds, _ in numeric_fields(cls)]


def test_every_numeric_field_of_every_config_declares_its_range():
    assert len(_config_classes()) >= 14 and len(NUMERIC) > 100
    missing = [f"{cls.__name__}.{name}" for cls, name, _, bounds in NUMERIC if bounds is None]
    assert not missing, f"numeric fields without bounds=...: {missing}"


def test_every_default_is_inside_its_range():
    for cls, name, _, bounds in NUMERIC:
        default = next(f.default for f in dataclasses.fields(cls) if f.name == name)
        assert default is None or bounds.allows(default), (cls.__name__, name, default)


def _outside(kind: type, bounds) -> list:
    """Values each field must refuse: NaN and ±inf for floats, the integers just outside the range."""
    if kind is float:
        bad = [float("nan"), float("inf"), float("-inf")]
        if bounds.low is not None:
            bad.append(bounds.low if bounds.low_open else bounds.low - 0.5)
        if bounds.high is not None:
            bad.append(bounds.high if bounds.high_open else bounds.high + 0.5)
        return bad
    bad = []
    if bounds.low is not None:
        below = int(bounds.low) - 1
        while below in bounds.special:  # e.g. --overlong-buffer: -1 has its own meaning, -2 is out
            below -= 1
        bad.append(below)
    if bounds.high is not None:
        bad.append(int(bounds.high) + 1)
    return bad


@pytest.mark.parametrize("cls, name, kind, bounds", NUMERIC, ids=[f"{c.__name__}.{n}" for c, n, _, _ in NUMERIC])
def test_every_numeric_field_refuses_values_outside_its_range(cls, name, kind, bounds):
    from rlxf.config import OptionRangeError

    for value in _outside(kind, bounds):
        with pytest.raises(OptionRangeError) as info:
            cls(**{name: value})
        assert [p[0] for p in info.value.problems] == [name]
        assert str(info.value).startswith(f"{name} {value!r} is out of range: it must be ")


@pytest.mark.parametrize("argv, expected", [
    (["dpo", "--lr", "nan"], "--lr nan is out of range: it must be a finite number > 0"),
    (["dpo", "--lr", "inf"], "--lr inf is out of range: it must be a finite number > 0"),
    (["dpo", "--beta", "nan"], "--beta nan is out of range: it must be a finite number > 0"),
    (["grpo", "--beta", "nan"], "--beta nan is out of range: it must be a finite number >= 0"),
    (["sft", "--max-grad-norm", "nan"], "--max-grad-norm nan is out of range: it must be a finite number >= 0"),
    (["sft", "--save-every", "-1"], "--save-every -1 is out of range: it must be an integer >= 0"),
    (["sft", "--warmup-steps", "-3"], "--warmup-steps -3 is out of range: it must be an integer >= 0"),
    (["sft", "--threads", "-4"], "--threads -4 is out of range: it must be an integer >= 0"),
    (["sft", "--log-every", "0"], "--log-every 0 is out of range: it must be an integer >= 1"),
    (["sft", "--seed", "-1"], "--seed -1 is out of range: it must be an integer in [0, 4294967295]"),
    (["grpo", "--eps-low", "1.5"], "--eps-low 1.5 is out of range: it must be a finite number in [0, 1]"),
    (["grpo", "--eps-low", "1"], "--eps-low / --eps-high for --policy-loss clipped: clipped_policy_loss: eps_low must "
                                 "lie in [0, 1) so that 1 − eps_low > 0; got 1.0"),
    (["grpo", "--temperature", "0"], "--temperature 0.0 is out of range: it must be a finite number > 0"),
    (["ppo", "--gamma", "1.5"], "--gamma 1.5 is out of range: it must be a finite number in [0, 1]"),
    (["grpo", "--overlong-buffer", "-2"], "--overlong-buffer -2 is out of range: it must be an integer >= 0, or -1"),
    (["long2short-data", "--temperature", "nan"], "--temperature nan is out of range"),
    (["rlaif", "--threshold", "0.7"], "--threshold 0.7 is out of range: it must be a finite number in [0, 0.5]"),
    (["demo", "--max-steps", "0"], "--max-steps 0 is out of range: it must be an integer >= 1"),
])
def test_cli_names_the_flag_the_value_and_the_range(argv, expected, tmp_path, capsys, monkeypatch):
    import rlxf.models

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    for loader in ("load_policy", "load_reward_model", "load_tokenizer"):
        monkeypatch.setattr(rlxf.models, loader, no_model)
    out = tmp_path / "out"
    assert main([*argv, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"rlxf: configuration error: {expected}" in err and "Traceback" not in err
    assert not out.exists()


def test_help_shows_each_numeric_range(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    with pytest.raises(SystemExit):
        main(["dpo", "--help"])
    out = capsys.readouterr().out
    assert "(default: 0.0002; allowed: a finite number > 0)" in out
    assert "(default: 1.0; allowed: a finite number >= 0)" in out  # --max-grad-norm, 0 = off


def test_every_bad_number_is_listed_at_once(capsys):
    assert main(["grpo", "--lr", "nan", "--top-p", "0", "--save-every", "-1"]) == 2
    err = capsys.readouterr().err
    assert "3 options are out of range:" in err
    assert "--lr nan" in err and "--top-p 0.0" in err and "--save-every -1" in err


def test_a_yaml_file_names_the_key_and_the_file(tmp_path):
    path = write(tmp_path, "beta: .nan\nlr: 1.0e-3\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: beta nan is out of range"):
        cli_config(["dpo", "--config", str(path)])
    with pytest.raises(ConfigError, match=r"^--beta -1.0 is out of range"):  # the flag wins, named as a flag
        cli_config(["dpo", "--config", str(path), "--beta", "-1"])


def test_a_yaml_config_may_start_with_a_byte_order_mark_and_latin1_is_explained(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"\xef\xbb\xbfbeta: 0.3\n")
    assert cli_config(["dpo", "--config", str(path)]).beta == 0.3
    path.write_bytes("lr: 1.0e-3\n# café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"(?s){re.escape(str(path))}:2: byte 0xe9 .* iconv -f latin1 -t utf-8"):
        cli_config(["dpo", "--config", str(path)])


def test_the_python_api_names_the_field():
    from rlxf.recipes.preference import PreferenceConfig

    with pytest.raises(ConfigError, match=r"^lr nan is out of range: it must be a finite number > 0"):
        PreferenceConfig(lr=float("nan"))
    with pytest.raises(ConfigError, match=r"^max_grad_norm inf is out of range"):
        build_config(PreferenceConfig, {"max_grad_norm": "inf"})


def test_an_integer_too_large_for_a_float_is_a_config_error():
    with pytest.raises(ConfigError, match="cannot read '1e400' as int"):
        cli_config(["sft", "--max-steps", "1e400"])


# -- documentation stays true to the flags ---------------------------------------------------------

DOC_RECIPE = {"sft.md": "sft", "reward-model.md": "rm", "dpo.md": "dpo", "rpo.md": "rpo", "orpo.md": "orpo",
              "grpo.md": "grpo", "ppo.md": "ppo", "cooper.md": "cooper", "kto.md": "kto",
              "online-dpo.md": "online-dpo", "tools.md": "grpo"}
def _all_command_flags() -> set[str]:
    """Every option string of every rlxf subcommand (nested ones such as `zoo build` included)."""
    import argparse

    flags, parsers = set(), [build_parser()]
    while parsers:
        parser = parsers.pop()
        for action in parser._actions:
            flags.update(o for o in action.option_strings if o.startswith("--"))
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(p for name, p in action.choices.items() if name not in RECIPES)
    return flags | {"--config"}


OTHER_FLAGS = _all_command_flags()  # non-recipe commands: compare, serve, text2reward, long2short-data, zoo, demo
DOC_EXAMPLES = {"--max-st"}  # docs/cli.md: argparse accepts a prefix of --max-steps
TORCHRUN_FLAGS = {"--standalone", "--nproc-per-node"}  # torchrun's own, in the data-parallel command lines
# the benchmark scripts' own flags (docs/distributed.md shows their commands), read from their argparse calls
BENCHMARK_FLAGS = {flag for script in (Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py")
                   for flag in re.findall(r'add_argument\("(--[a-z0-9-]+)"', script.read_text())}


def _doc_path(doc: str) -> Path:
    path = ROOT / doc
    assert path.exists(), f"{doc} is missing"
    return path


def _flags_of(recipe: str) -> set[str]:
    return {"--" + f.name.replace("_", "-") for f in dataclasses.fields(_config_class(recipe))}


def _documented_flags(path: Path) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*", path.read_text()))


@pytest.mark.parametrize("doc", sorted(DOC_RECIPE))
def test_method_page_documents_only_real_flags(doc):
    path = _doc_path(f"docs/methods/{doc}")
    unknown = _documented_flags(path) - _flags_of(DOC_RECIPE[doc]) - OTHER_FLAGS
    assert not unknown, f"{doc} documents flags that `rlxf {DOC_RECIPE[doc]}` does not have: {sorted(unknown)}"


@pytest.mark.parametrize("doc", ["README.md", "docs/cli.md", "docs/tasks.md", "docs/tiny-model.md", "docs/index.md",
                                 "docs/compare.md", "docs/distributed.md", "docs/labeling.md"])
def test_other_pages_document_only_real_flags(doc):
    path = _doc_path(doc)
    known = (set().union(*(_flags_of(r) for r in RECIPES)) | OTHER_FLAGS | DOC_EXAMPLES | TORCHRUN_FLAGS
             | BENCHMARK_FLAGS)
    unknown = _documented_flags(path) - known
    assert not unknown, f"{doc} documents flags rlxf does not have: {sorted(unknown)}"


def _documented_defaults(path: Path) -> list[tuple[str, str]]:
    """(flag, default) from table rows written as | `--flag` | `default` | meaning |."""
    return re.findall(r"^\| `(--[a-z0-9-]+)` \| `([^`]*)` \|", path.read_text(), flags=re.MULTILINE)


@pytest.mark.parametrize("doc,recipe", [("docs/cli.md", None), ("docs/tasks.md", None),
                                        *((f"docs/methods/{d}", r) for d, r in sorted(DOC_RECIPE.items()))])
def test_documented_defaults_match_the_config_dataclasses(doc, recipe):
    from rlxf.recipes.common import TrainConfig

    cls = TrainConfig if recipe is None else _config_class(recipe)
    rows = _documented_defaults(_doc_path(doc))
    assert rows, f"{doc}: no option table found"
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for flag, text in rows:
        name = flag[2:].replace("-", "_")
        assert name in defaults, f"{doc}: {flag} is not an option of {cls.__name__}"
        documented = "" if text == '""' else coerce(cls, name, text)
        assert documented == defaults[name], f"{doc}: {flag} documented default {text}, actual {defaults[name]!r}"
    if doc == "docs/cli.md":  # the shared-options table is complete
        assert {flag[2:].replace("-", "_") for flag, _ in rows} == set(defaults)


def test_documented_ranges_match_the_bounds():
    """docs/cli.md's table of the shared options' ranges says what rlxf.config.check_numbers checks."""
    from rlxf.recipes.common import TrainConfig

    text = _doc_path("docs/cli.md").read_text()
    table = text[text.index("| options | allowed |"):].split("\n\n")[0]
    rows = re.findall(r"^\| (`--.+?) \| (.+?) \|$", table, flags=re.MULTILINE)
    bounds = {name: (kind, b) for name, kind, b, _ in numeric_fields(TrainConfig)}
    documented = set()
    for flags, allowed in rows:
        allowed = allowed.split(";")[0].replace("≥", ">=").replace("2³² − 1", str(2**32 - 1))
        allowed = allowed.removeprefix("an integer ")
        for flag in re.findall(r"`(--[a-z0-9-]+)`", flags):
            kind, b = bounds[flag[2:].replace("-", "_")]
            assert re.sub(r"^(a finite number|an integer) ", "", b.describe(kind)) == allowed, (flag, allowed)
            documented.add(flag[2:].replace("-", "_"))
    assert documented == set(bounds)  # every numeric shared option is in the table


def test_activation_memory_budget_is_checked_and_needs_compile():
    from rlxf.config import ConfigError
    from rlxf.recipes.preference import PreferenceConfig

    with pytest.raises(ConfigError, match=r"activation_memory_budget 0.0 is out of range: it must be a finite "
                                          r"number in \(0, 1\]"):
        PreferenceConfig(compile=True, activation_memory_budget=0.0)
    with pytest.raises(ConfigError, match="add --compile"):
        PreferenceConfig(activation_memory_budget=0.05)
    assert PreferenceConfig(compile=True, activation_memory_budget=0.05).activation_memory_budget == 0.05


def test_compile_layers_sets_the_partitioner_budget():
    import torch._functorch.config as functorch_config

    from rlxf.models import compile_layers, load_policy

    # restored by assignment: monkeypatch's undo would delattr the key (it is not in the config
    # module's __dict__), which hides it from every later test in this process
    before = functorch_config.activation_memory_budget
    try:
        model = load_policy("tiny", dtype="float32", device="cpu")
        assert compile_layers(model, activation_memory_budget=0.05) == len(model.model.layers)
        assert functorch_config.activation_memory_budget == 0.05
        with pytest.raises(ValueError, match=r"in \(0, 1\]"):
            compile_layers(model, activation_memory_budget=1.5)
    finally:
        functorch_config.activation_memory_budget = before
