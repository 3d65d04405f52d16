"""The one engine: the recipe registry, torch-free configs and a fast CLI help, the loss-name tables,
and the loop's contract (logged lr is the step's own, cost counters, summary)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rlxf.config import ConfigError, cli_flag, load_yaml
from rlxf.configs import choices
from rlxf.configs.registry import RECIPES, get_recipe, recipe_names

ROOT = Path(__file__).parents[1]


def test_every_recipe_resolves_its_config_train_function_and_examples():
    for name, recipe in RECIPES.items():
        cls = recipe.config_class()
        assert cls.__name__.endswith("Config") and callable(recipe.train_fn())
        assert recipe.kind in ("offline", "online")
        for example in recipe.examples:  # every example config builds this recipe's config
            values = load_yaml(ROOT / example)
            from rlxf.config import build_config

            build_config(cls, values, where=example)
    examples = {e for r in RECIPES.values() for e in r.examples}
    tiny = {f"configs/{p.name}" for p in (ROOT / "configs").glob("*_tiny.yaml")}
    assert tiny <= examples, f"example configs not in the registry: {sorted(tiny - examples)}"


def test_unknown_recipes_get_the_closest_name():
    with pytest.raises(ConfigError, match="did you mean 'grpo'"):
        get_recipe("gpro", where="spec.yaml")
    assert set(recipe_names(kind="online")) == {"grpo", "dr_grpo", "dapo", "rloo", "ppo", "cooper", "online-dpo"}
    assert set(recipe_names(data_parallel=True)) == set(RECIPES) - {"online-dpo"}


@pytest.mark.parametrize("argv", [["--help"], ["grpo", "--help"], ["dpo", "--help"], ["ppo", "--help"],
                                  ["label", "push", "--help"]])
def test_help_imports_no_torch(argv):
    # through the command's own entry point (what `rlxf` and `python -m rlxf` run)
    code = ("import sys\nfrom rlxf.cli import entry\nsys.argv = ['rlxf', *%r]\ntry:\n    entry()\n"
            "except SystemExit:\n    pass\nprint('TORCH' if 'torch' in sys.modules else 'NO-TORCH')" % (argv,))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip().endswith("NO-TORCH"), out.stdout[-500:] + out.stderr[-500:]


def test_config_choices_match_the_loss_registries():
    from rlxf.losses import policy_loss_names, preference_loss_names

    assert choices.POLICY_LOSSES == policy_loss_names()
    assert choices.PREFERENCE_LOSSES == preference_loss_names()


def test_the_logged_lr_is_the_rate_of_its_own_step(tmp_path, tiny_random_model_dir):
    from rlxf.cli import main
    from rlxf.reporting import read_metrics

    out = tmp_path / "sft"
    assert main(["sft", f"--model={tiny_random_model_dir}", "--max-steps=4", "--warmup-steps=0",
                 "--schedule=linear", "--lr=1e-3", "--log-every=1", "--eval-every=0", "--task-size=64",
                 "--eval-size=8", "--batch-size=8", "--progress=false", f"--output-dir={out}"]) == 0
    lrs = [r["lr"] for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]
    assert lrs == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])  # step 1 uses the peak; none logs 0


def test_recipe_help_lists_the_main_options_and_help_all_lists_every_one(capsys):
    import dataclasses

    from rlxf.cli import main

    def flags(argv):
        with pytest.raises(SystemExit):
            main(argv)
        return [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("  --")]

    main_help, every = flags(["grpo", "--help"]), flags(["grpo", "--help-all"])
    fields = {cli_flag(f) for f in dataclasses.fields(get_recipe("grpo").config_class())}
    assert len(main_help) <= 45 and fields <= set(every)
    assert "--lr" in main_help and "--lmgt-scale" not in main_help and "--lmgt-scale" in every


def test_a_folded_option_still_parses():
    from rlxf.cli import build_parser

    args = build_parser("grpo", full=False).parse_args(["grpo", "--lora-alpha", "8", "--lmgt-scale", "0.5"])
    assert args.lora_alpha == "8" and args.lmgt_scale == "0.5"


def test_judge_rewards_take_their_own_options(monkeypatch):
    """LMGT reads no recipe config: the online configs hand it its own options (reward_options)."""
    import rlxf.judges
    from rlxf.config import build_config
    from rlxf.configs.grpo import GRPOConfig
    from rlxf.rewards import get_reward
    from rlxf.rewards.lmgt import LMGTReward
    from rlxf.tasks import get_task

    seen = {}
    monkeypatch.setattr(rlxf.judges, "build_judge", lambda spec, **kw: seen.update(spec=spec, **kw) or object(),
                        raising=False)
    cfg = build_config(GRPOConfig, {"reward": "lmgt", "judge": "local:tiny", "lmgt_scale": 0.5, "device": "cpu"})
    reward = get_reward("lmgt", task=get_task("arithmetic"), **cfg.reward_options())
    assert isinstance(reward, LMGTReward) and seen["spec"] == "local:tiny" and seen["device"] == "cpu"
    with pytest.raises(Exception, match="needs a judge"):
        get_reward("d_rlaif", **build_config(GRPOConfig, {}).reward_options())
