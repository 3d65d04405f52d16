"""``rlxf <recipe> [--config file.yaml] [--field value ...]``, ``rlxf demo``, ``rlxf zoo build``,
``rlxf compare``, ``rlxf long2short-data``.

Every recipe's flags are generated from its frozen config dataclass (``rlxf <recipe> --help``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

from rlxf.config import ConfigError, add_arguments, build_config, parse_args

# name -> (module, config class, one-line description); modules import lazily so --help is fast
RECIPES: dict[str, tuple[str, str, str]] = {
    "sft": ("rlxf.recipes.sft", "SFTConfig", "supervised fine-tuning on prompt/completion or messages"),
    "rm": ("rlxf.recipes.reward_model", "RewardModelConfig",
           "reward model: Bradley-Terry (margin, centering) or focal ranking"),
    "dpo": ("rlxf.recipes.preference", "PreferenceConfig", "DPO / IPO / cDPO / DPO+NLL on preference pairs"),
    "rpo": ("rlxf.recipes.preference", "RPOConfig", "NVIDIA reward-aware preference optimisation (scored pairs)"),
    "orpo": ("rlxf.recipes.preference", "ORPOConfig", "odds-ratio preference optimisation (reference-free)"),
    "grpo": ("rlxf.recipes.grpo", "GRPOConfig", "GRPO: group-relative policy optimisation with any reward"),
    "dr_grpo": ("rlxf.recipes.grpo", "DrGRPOConfig", "Dr. GRPO: no std scaling, constant length normaliser"),
    "dapo": ("rlxf.recipes.grpo", "DAPOConfig",
             "DAPO: clip-higher, dynamic sampling, token-mean loss, overlong shaping"),
    "rloo": ("rlxf.recipes.grpo", "RLOOConfig", "RLOO: leave-one-out baseline, no std scaling"),
    "ppo": ("rlxf.recipes.ppo", "PPOConfig", "PPO-RLHF: reward model, critic, KL-in-reward, GAE"),
    "cooper": ("rlxf.recipes.cooper", "CooperConfig", "COOPER: GRPO against a verifier RM co-trained on the rollouts"),
}

DEMO = {
    "model": "tiny", "dataset": "task:arithmetic", "reward": "verifiable", "beta": 0.0, "batch_size": 32,
    "group_size": 8, "lr": 5e-4, "schedule": "cosine", "warmup_steps": 10, "max_steps": 200, "eval_every": 25,
    "eval_generate": 200,
}
DEMO_RECIPE = "grpo"


def _config_class(name: str):
    module, cls, _ = RECIPES[name]
    return getattr(importlib.import_module(module), cls)


def _run(name: str, cfg) -> int:
    module = importlib.import_module(RECIPES[name][0])
    result = module.train(cfg)
    out = result.output_dir
    print(f"\nrlxf {name}: done. Report: {out / 'report.html'}  Summary: {out / 'summary.json'}")
    return 0


def _keep_previous_demo(out: Path, *, resume: bool) -> None:
    """A finished demo in ``out`` is moved to ``out-<date>-<time>`` so a new demo never overwrites it."""
    if resume or not (out / "summary.json").exists():
        return
    kept = out.with_name(f"{out.name}-{time.strftime('%Y%m%d-%H%M%S', time.localtime((out / 'summary.json').stat().st_mtime))}")
    out.rename(kept)
    print(f"rlxf demo: the previous demo was moved to {kept}")


def _add_compare_parser(sub) -> None:
    cmp = sub.add_parser("compare", help="run several configs on the same budget and seed; one side-by-side report",
                         description="rlxf compare: train every run of SPEC.yaml that has not finished, then write "
                         "compare.html/.png/.md/.json; with --runs, only compare existing run directories "
                         "(docs/compare.md).", allow_abbrev=False)
    cmp.add_argument("spec", nargs="?", metavar="SPEC.yaml", help="comparison spec: recipe, common, runs")
    cmp.add_argument("--runs", nargs="+", metavar="LABEL=DIR", help="compare these existing run directories instead")
    cmp.add_argument("--output-dir", metavar="DIR", help="where the runs and the report go (default: runs/compare/<spec name>; "
                     "required with --runs)")
    cmp.add_argument("--resume", action="store_true",
                     help="continue interrupted runs (finished runs are always skipped)")
    cmp.add_argument("--report-only", action="store_true", help="train nothing; rewrite the report of the spec's runs")
    cmp.add_argument("--metric", metavar="NAME", help="eval metric to compare (default: the spec's, else task_accuracy)")
    cmp.add_argument("--goal", choices=("max", "min"), help="max: higher is better (default); min: lower is better")
    cmp.add_argument("--threshold", type=float, metavar="X", help="count steps until the metric reaches this "
                     "(default: midway from the start to the best final value)")


def _compare(args) -> int:
    from rlxf.recipes.compare import run_comparison
    from rlxf.reporting.compare import compare_runs, parse_run_dirs

    if (args.spec is None) == (args.runs is None):
        raise ConfigError("rlxf compare: pass either SPEC.yaml or --runs LABEL=DIR ..., not both or neither")
    if args.runs:
        if not args.output_dir or args.resume or args.report_only:
            raise ConfigError("rlxf compare --runs: pass --output-dir (where the report goes); --resume and "
                              "--report-only apply to a SPEC.yaml only")
        out = Path(args.output_dir)
        compare_runs(parse_run_dirs(args.runs), out, metric=args.metric or "task_accuracy",
                     threshold=args.threshold, goal=args.goal or "max")
    else:
        out = Path(args.output_dir or Path("runs/compare") / Path(args.spec).stem)
        run_comparison(args.spec, output_dir=out, resume=args.resume, only_report=args.report_only,
                       metric=args.metric, threshold=args.threshold, goal=args.goal)
    print(f"\nrlxf compare: done. Report: {out / 'compare.html'}  Table: {out / 'compare.md'}")
    return 0


L2S_HELP = ("sample a model n times per prompt; write Kimi long2short SFT data and DPO pairs "
            "(docs/methods/long2short.md)")


def _add_long2short_parser(sub) -> None:
    from rlxf.recipes.long2short import Long2ShortDataConfig

    p = sub.add_parser("long2short-data", help=L2S_HELP, description=f"rlxf long2short-data: {L2S_HELP}. "
                       "Flags override values from --config.", allow_abbrev=False)
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file of option: value (flags override it)")
    add_arguments(p, Long2ShortDataConfig)


def _long2short_data(args) -> int:
    from rlxf.recipes.long2short import Long2ShortDataConfig, build_long2short_data

    cfg = parse_args(Long2ShortDataConfig, args)
    stats = build_long2short_data(cfg)
    out = Path(cfg.output_dir)
    print(f"\nrlxf long2short-data: done. SFT rows: {out / 'sft.jsonl'} ({stats['sft_rows']})  "
          f"Pairs: {out / 'pairs.jsonl'} ({stats['pairs']})  Stats: {out / 'stats.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlxf", description="Post-train language models with RL from any feedback.",
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, _, help_text) in RECIPES.items():
        p = sub.add_parser(name, help=help_text, description=f"rlxf {name}: {help_text}. "
                           "Flags override values from --config.", allow_abbrev=False)
        p.add_argument("--config", metavar="FILE.yaml", help="YAML file of option: value (flags override it)")
        add_arguments(p, _config_class(name))
    demo = sub.add_parser("demo", help="GRPO on the embedded tiny model and the arithmetic task (a few minutes on CPU)")
    demo.add_argument("--output-dir", default="runs/demo", help="where the demo writes its run (default: runs/demo)")
    demo.add_argument("--max-steps", type=int, default=DEMO["max_steps"], help="rollout steps")
    demo.add_argument("--resume", action="store_true", help="continue an interrupted demo")
    zoo = sub.add_parser("zoo", help="the embedded tiny model")
    zoo_sub = zoo.add_subparsers(dest="zoo_command", metavar="ZOO_COMMAND")
    build = zoo_sub.add_parser("build", help="rebuild the tiny model's weights from scratch (deterministic)")
    build.add_argument("--output", default=None, help="output directory (default: the package's tiny/)")
    build.add_argument("--steps", type=int, default=None, help="pre-training steps")
    _add_compare_parser(sub)
    _add_long2short_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command in RECIPES:
            cfg = parse_args(_config_class(args.command), args)
            return _run(args.command, cfg)
        if args.command == "demo":
            _keep_previous_demo(Path(args.output_dir), resume=args.resume)
            cls = _config_class(DEMO_RECIPE)
            values = {**DEMO, "output_dir": args.output_dir, "max_steps": args.max_steps, "resume": args.resume}
            return _run(DEMO_RECIPE, build_config(cls, values, where="rlxf demo"))
        if args.command == "zoo" and args.zoo_command == "build":
            from rlxf.zoo.build import main as build_main

            extra = (["--output", args.output] if args.output else []) + (
                ["--steps", str(args.steps)] if args.steps else [])
            build_main(extra)
            return 0
        if args.command == "compare":
            return _compare(args)
        if args.command == "long2short-data":
            return _long2short_data(args)
        parser.print_help()
        return 2
    except ConfigError as exc:
        print(f"rlxf: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rlxf: interrupted; resume with --resume (the newest complete checkpoint is kept)", file=sys.stderr)
        return 130
    except Exception as exc:  # user-facing errors from data/models carry their own clear messages
        from rlxf.data import DataError
        from rlxf.recipes.common import TrainingError
        from rlxf.rewards import RewardError

        if isinstance(exc, (DataError, TrainingError, RewardError, OSError)):
            print(f"rlxf: error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
