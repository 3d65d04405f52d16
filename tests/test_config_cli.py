"""Configuration and CLI: example configs, YAML/flag merging, errors, --help, output-dir safety.

Fast: nothing here loads a model or trains.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from rlxf.cli import RECIPES, _config_class, build_parser, main
from rlxf.config import ConfigError, build_config, coerce, load_yaml, parse_args, save_yaml
from rlxf.recipes.long2short import Long2ShortDataConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def recipe_for(path: Path) -> str:
    """configs/<name>.yaml → the recipe that reads it (its name's prefix; dpo/ipo/cdpo files → dpo)."""
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
        flag = "--" + f.name.replace("_", "-")
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
    from rlxf.recipes.common import prepare_output_dir

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
    from rlxf.recipes.common import prepare_output_dir

    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(ConfigError, match="already holds a run"):
        prepare_output_dir(build_config(_config_class("sft"), {"output_dir": str(tmp_path)}), "sft")


def test_a_fresh_or_empty_output_dir_is_accepted(tmp_path):
    from rlxf.recipes.common import prepare_output_dir

    for out in (tmp_path / "new" / "run", tmp_path):
        cfg = build_config(_config_class("rm"), {"output_dir": str(out)})
        assert prepare_output_dir(cfg, "rm") == out
        assert build_config(_config_class("rm"), load_yaml(out / "config.yaml")) == cfg


def test_main_refuses_an_existing_run_with_exit_code_2(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    assert main(["dpo", "--output-dir", str(tmp_path), "--model", str(tmp_path / "missing")]) == 2
    assert "pass --resume" in capsys.readouterr().err


# -- documentation stays true to the flags ---------------------------------------------------------

DOC_RECIPE = {"sft.md": "sft", "reward-model.md": "rm", "dpo.md": "dpo", "rpo.md": "rpo", "orpo.md": "orpo",
              "grpo.md": "grpo", "ppo.md": "ppo", "cooper.md": "cooper"}
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
BENCHMARK_FLAGS = {"--gpus", "--out", "--flags", "--recipe"}  # benchmarks/data_parallel.py's, in docs/distributed.md


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
                                 "docs/compare.md", "docs/distributed.md"])
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


def test_activation_memory_budget_is_checked_and_needs_compile():
    from rlxf.recipes.common import ConfigError
    from rlxf.recipes.preference import PreferenceConfig

    with pytest.raises(ConfigError, match=r"--activation-memory-budget must be in \(0, 1\], got 0"):
        PreferenceConfig(compile=True, activation_memory_budget=0.0)
    with pytest.raises(ConfigError, match="add --compile"):
        PreferenceConfig(activation_memory_budget=0.05)
    assert PreferenceConfig(compile=True, activation_memory_budget=0.05).activation_memory_budget == 0.05


def test_compile_layers_sets_the_partitioner_budget(monkeypatch):
    import torch._functorch.config as functorch_config

    from rlxf.models import compile_layers, load_policy

    monkeypatch.setattr(functorch_config, "activation_memory_budget", functorch_config.activation_memory_budget)
    model = load_policy("tiny", dtype="float32", device="cpu")
    assert compile_layers(model, activation_memory_budget=0.05) == len(model.model.layers)
    assert functorch_config.activation_memory_budget == 0.05
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        compile_layers(model, activation_memory_budget=1.5)
