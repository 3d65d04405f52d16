"""The sub-runs of the loop: each RM and policy training is an ordinary run of a registered recipe
(``rlxf rm``, ``rlxf grpo`` / ``rlxf ppo``) in its own directory, skipped once finished."""

from __future__ import annotations

import json
from pathlib import Path

from rlxf.config import ConfigError, build_config, load_yaml
from rlxf.configs.registry import get_recipe
from rlxf.workflows.cool_rlhf.config import MANAGED_POLICY, MANAGED_RM
from rlxf.workflows.cool_rlhf.data import read_jsonl


def _options_file(path: str | None, managed: tuple[str, ...], flag: str) -> dict:
    values = load_yaml(path) if path else {}
    clash = [key for key in values if key.replace("-", "_") in managed]
    if clash:
        raise ConfigError(f"{flag} {path}: {', '.join(clash)} is set by rlxf cool-rlhf for every sub-run; remove it")
    return values


def run_recipe(name: str, values: dict, out_dir: Path) -> dict:
    """Train one sub-run of registered recipe ``name`` (skipped when ``out_dir`` holds a finished run)
    and return its summary."""
    if (out_dir / "summary.json").is_file():
        return json.loads((out_dir / "summary.json").read_text())
    recipe = get_recipe(name)
    interrupted = (out_dir / "metrics.jsonl").exists() or (out_dir / "checkpoints").exists()
    cfg = build_config(recipe.config_class(), {**values, "output_dir": str(out_dir), "resume": interrupted},
                       where=f"rlxf cool-rlhf: {out_dir}")
    return recipe.train_fn()(cfg).summary


def rm_values(cfg, *, start: str, dataset: Path, eval_dataset: Path, steps: int, data: dict) -> dict:
    """Options of one ``rlxf rm`` sub-run (all but output_dir and resume)."""
    n_pairs, n_eval = len(read_jsonl(dataset)), len(read_jsonl(eval_dataset))
    return {"lr": cfg.rm_lr, "batch_size": min(cfg.rm_batch_size, n_pairs), "loss": cfg.rm_loss, "eval_every": 0,
            "warmup_steps": min(10, steps // 5), "seed": cfg.seed, "device": cfg.device, "threads": cfg.threads,
            "progress": cfg.progress, **_options_file(cfg.rm_options, MANAGED_RM, "--rm-options"),
            "model": start, "dataset": str(dataset), "eval_dataset": str(eval_dataset), "eval_size": n_eval,
            "conditions": str(data["conditions"]), "max_steps": steps}


def policy_values(cfg, *, start: str, rm_dir: str, data: dict, k: int) -> dict:
    """Options of round ``k``'s ``rlxf grpo`` / ``rlxf ppo`` sub-run (all but output_dir and resume)."""
    n_eval = len(read_jsonl(data["eval_prompts"]))
    return {"batch_size": cfg.policy_batch_size, "max_new_tokens": cfg.max_new_tokens, "eval_every": 0,
            "eval_generate": n_eval, "seed": cfg.seed + k, "device": cfg.device, "threads": cfg.threads,
            "progress": cfg.progress, **({"lr": cfg.policy_lr} if cfg.policy_lr is not None else {}),
            **({"group_size": cfg.group_size} if cfg.group_size is not None else {}),
            **_options_file(cfg.policy_options, MANAGED_POLICY, "--policy-options"),
            "model": start, "dataset": str(data["rl_prompts"]), "eval_dataset": str(data["eval_prompts"]),
            "eval_size": n_eval, "reward": "reward_model", "reward_model": rm_dir, "max_steps": cfg.policy_steps}


def check_sub_runs(cfg, data: dict) -> None:
    """Build the RM and policy sub-run configs once before anything trains, so a bad combination
    (e.g. PPO's --mini-batches not dividing --policy-batch-size) fails at once."""
    checks = [("rm", "--rm-options", rm_values(cfg, start=cfg.model, dataset=data["rm_train"],
                                                eval_dataset=data["rm_eval"], steps=cfg.rm_steps, data=data)),
              (cfg.policy_recipe, "--policy-options",
               policy_values(cfg, start=cfg.model, rm_dir=cfg.model, data=data, k=1))]
    for recipe, flag, values in checks:
        try:
            build_config(get_recipe(recipe).config_class(), values, where=f"rlxf {recipe} sub-runs")
        except ConfigError as exc:
            raise ConfigError(f"the rlxf {recipe} sub-runs would fail: {exc} (their other options go in a YAML "
                              f"file passed as {flag})") from None


def train_rm(cfg, out_dir: Path, **kwargs) -> str:
    return run_recipe("rm", rm_values(cfg, **kwargs), out_dir)["final_model"]


def train_policy(cfg, out_dir: Path, **kwargs) -> dict:
    return run_recipe(cfg.policy_recipe, policy_values(cfg, **kwargs), out_dir)

