"""User options of a reward: ``--reward-arg key=value`` (repeatable) and YAML ``reward_args`` /
``reward: {name, args}`` reach a registered factory when it is built and a plain reward function on
every call; names the target does not take, and clashes with row fields, are clear errors."""

from __future__ import annotations

import pytest

from rlxf.config import ConfigError, build_config, load_yaml, parse_args
from rlxf.configs.grpo import GRPOConfig
from rlxf.rewards import RewardError, get_reward

REWARD_FILE = '''
def scaled(prompts, completions, weight=1.0, offset=0.0, **fields):
    return [weight * len(c) + offset for c in completions]

def strict(prompts, completions):
    return [1.0 for _ in completions]
'''


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text(REWARD_FILE)
    return path


def _parse(argv):
    from rlxf.cli import build_parser

    return parse_args(GRPOConfig, build_parser("grpo").parse_args(["grpo", *argv]))


def test_cli_reward_args_are_typed_by_yaml_and_repeatable(reward_file):
    cfg = _parse([f"--reward={reward_file}:scaled", "--reward-arg", "weight=2", "--reward-arg=offset=0.5",
                  "--reward-arg", "tag=abc", "--reward-arg", "flags=[1, 2]", "--reward-arg", "on=true"])
    assert cfg.reward_args == {"weight": 2, "offset": 0.5, "tag": "abc", "flags": [1, 2], "on": True}


def test_a_plain_function_receives_its_arguments_on_every_call(reward_file):
    fn = get_reward(f"{reward_file}:scaled", reward_args={"weight": 2.0, "offset": 1.0})
    assert fn(["p", "p"], ["ab", "abcd"]) == [5.0, 9.0]
    assert get_reward(f"{reward_file}:scaled")(["p"], ["ab"]) == [2.0]   # no arguments: the function as it is


def test_an_argument_the_function_does_not_take_names_what_it_takes(reward_file):
    with pytest.raises(RewardError, match=r"takes no such argument; its parameters: prompts, completions"):
        get_reward(f"{reward_file}:strict", reward_args={"weight": 2})


def test_an_argument_that_clashes_with_a_row_field_is_refused(reward_file):
    fn = get_reward(f"{reward_file}:scaled", reward_args={"weight": 2})
    with pytest.raises(RewardError, match="rows have a field of the same name"):
        fn(["p"], ["ab"], weight=[3])


def test_a_registered_factory_receives_the_arguments_and_refuses_unknown_ones():
    fn = get_reward("format", reward_args={"pattern": r"^x"})
    assert fn(["p", "p"], ["x1", "y1"]) == [1.0, 0.0]
    with pytest.raises(RewardError, match="takes no such argument"):
        get_reward("format", reward_args={"patern": "x"})


def test_yaml_reward_block_and_flags_merge(tmp_path, reward_file):
    config = tmp_path / "c.yaml"
    config.write_text(f"reward:\n  name: {reward_file}:scaled\n  args:\n    weight: 3\n    offset: 1\n")
    from rlxf.cli import build_parser

    args = build_parser("grpo").parse_args(["grpo", f"--config={config}", "--reward-arg", "offset=2"])
    cfg = parse_args(GRPOConfig, args)
    assert cfg.reward == f"{reward_file}:scaled" and cfg.reward_args == {"weight": 3, "offset": 2}
    assert build_config(GRPOConfig, load_yaml(config)).reward_args == {"weight": 3, "offset": 1}


@pytest.mark.parametrize("values, match", [
    ({"reward": {"name": "verifiable", "weights": {}}}, "a block takes 'name'"),
    ({"reward": {"args": {"a": 1}}}, "a block takes 'name'"),
    ({"reward": {"name": "verifiable", "args": {"a": 1}}, "reward_args": {"b": 2}}, "not both"),
    ({"reward_args": {"not an identifier": 1}}, "Python identifiers"),
    ({"reward_args": ["novalue"]}, "is not key=value"),
    ({"reward_args": 3}, "expected a mapping"),
])
def test_bad_reward_arguments_are_clear_errors(values, match):
    with pytest.raises(ConfigError, match=match):
        build_config(GRPOConfig, values)


def test_model_written_reward_code_takes_no_arguments(tmp_path):
    with pytest.raises(ConfigError, match="takes no arguments"):
        build_config(GRPOConfig, {"reward": f"sandbox:{tmp_path / 'r.py'}:fn", "reward_args": {"a": 1},
                                  "unsafe_reward_code": True})


def test_a_run_passes_the_arguments_to_the_reward(tmp_path, reward_file, tiny_random_model_dir):
    """End to end: the logged reward is weight × length + offset of the sampled completions."""
    from rlxf.cli import main
    from rlxf.reporting import read_metrics

    common = [f"--model={tiny_random_model_dir}", "--max-steps=1", "--batch-size=2", "--group-size=2",
              "--max-new-tokens=4", "--eval-every=0", "--task-size=8", "--eval-size=4", "--progress=false",
              f"--reward={reward_file}:scaled", "--reward-arg", "weight=0", "--reward-arg", "offset=0.25"]
    assert main(["grpo", *common, f"--output-dir={tmp_path / 'run'}"]) == 0
    train = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "train"]
    assert train and train[0]["reward/mean"] == pytest.approx(0.25)
