"""``rlxf <recipe> [--config file.yaml] [--field value ...]``, ``rlxf demo``, ``rlxf zoo build``,
``rlxf compare``, ``rlxf long2short-data``, ``rlxf serve``, ``rlxf cai-sft``, ``rlxf rlaif``,
``rlxf cool-rlhf``, ``rlxf text2reward``, ``rlxf label``, ``rlxf plan``.

Every recipe's flags are generated from its frozen config dataclass (``rlxf <recipe> --help``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

from rlxf.config import ConfigError, add_arguments, build_config, parse_args

from rlxf.configs.help_groups import GROUP_OF
from rlxf.configs.registry import RECIPES, get_recipe
from rlxf.labeling import commands as label_commands

DEMO = {
    "model": "tiny", "dataset": "task:arithmetic", "reward": "verifiable", "beta": 0.0, "batch_size": 32,
    "group_size": 8, "lr": 5e-4, "schedule": "cosine", "warmup_steps": 10, "max_steps": 200, "eval_every": 25,
    "eval_generate": 200,
}
DEMO_RECIPE = "grpo"


def _config_class(name: str):
    return get_recipe(name).config_class()


def _run(name: str, cfg) -> int:
    from rlxf.runtime.distributed import finish

    result = get_recipe(name).train_fn()(cfg)
    finish()
    out = result.output_dir
    if _first_process():   # one line under torchrun
        print(f"\nrlxf {name}: done. Report: {out / 'report.html'}  Summary: {out / 'summary.json'}")
    return 0


def _first_process() -> bool:
    """False on torchrun's ranks other than 0: they raise the same errors, rank 0 prints them once."""
    from rlxf.runtime.distributed import launched_rank

    return launched_rank() == 0


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
    from rlxf.workflows.compare import run_comparison
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
    from rlxf.workflows.long2short import Long2ShortDataConfig

    p = sub.add_parser("long2short-data", help=L2S_HELP, description=f"rlxf long2short-data: {L2S_HELP}. "
                       "Flags override values from --config.", allow_abbrev=False)
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file of option: value (flags override it)")
    add_arguments(p, Long2ShortDataConfig)


def _long2short_data(args) -> int:
    from rlxf.workflows.long2short import Long2ShortDataConfig, build_long2short_data

    cfg = parse_args(Long2ShortDataConfig, args)
    stats = build_long2short_data(cfg)
    out = Path(cfg.output_dir)
    print(f"\nrlxf long2short-data: done. SFT rows: {out / 'sft.jsonl'} ({stats['sft_rows']})  "
          f"Pairs: {out / 'pairs.jsonl'} ({stats['pairs']})  Stats: {out / 'stats.json'}")
    return 0


def _add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible chat-completions server over a model (docs/serve.md)",
                       description="rlxf serve: GET /v1/models and POST /v1/chat/completions over a model "
                       "(docs/serve.md).", allow_abbrev=False)
    p.add_argument("--model", default="tiny", help="model directory, Hub id, or 'tiny' (default: tiny)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine "
                   "only; another address without an API key prints a warning)")
    p.add_argument("--api-key", default=None, metavar="KEY", help="require 'Authorization: Bearer KEY' on every "
                   "path but /health (default: the RLXF_API_KEY environment variable, which keeps the key out of "
                   "the process list; neither = no key is checked)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    p.add_argument("--max-request-bytes", type=int, default=1_000_000, help="larger bodies get 413 (default: 1000000)")
    p.add_argument("--max-tokens-limit", type=int, default=512, help="largest max_tokens a request may ask (default: 512)")
    p.add_argument("--max-top-logprobs", type=int, default=20, help="largest top_logprobs a request may ask "
                   "(default: 20, as OpenAI; raise it so a judge can read options the model ranks low)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default: auto)")
    p.add_argument("--served-model-name", default=None, help="model id in /v1/models (default: the --model value)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: 0 = torch's default; "
                   "1 is much faster on a busy small CPU machine)")


def _serve_api_key(args) -> str | None:
    """``--api-key``, else the ``RLXF_API_KEY`` environment variable (empty = not set)."""
    import os

    from rlxf.serve import API_KEY_ENV

    return args.api_key if args.api_key is not None else (os.environ.get(API_KEY_ENV) or None)


def _serve(args) -> int:
    from rlxf.serve import make_server

    api_key = _serve_api_key(args)
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    try:
        server, thread = make_server(args.model, args.host, args.port, max_request_bytes=args.max_request_bytes,
                                     max_tokens_limit=args.max_tokens_limit,
                                     max_top_logprobs=args.max_top_logprobs, device=args.device,
                                     model_name=args.served_model_name, api_key=api_key)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    try:   # the startup line inside: a Ctrl-C that lands right after it still stops the server cleanly
        print(f"rlxf serve: {server.model_name!r} at {server.base_url} "
              f"({'API key required' if api_key else 'no API key'}; Ctrl-C stops)", flush=True)
        thread.join()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()
    print("rlxf serve: stopped")
    return 0


# data-generating commands that may train afterwards: name -> (module, config class, help)
AI_FEEDBACK = {
    "cai-sft": ("rlxf.workflows.cai", "CAISFTConfig", "Constitutional AI SL stage: the policy critiques and revises "
                "its answers under principles, then SFT on the revisions (docs/methods/rlaif.md)"),
    "rlaif": ("rlxf.workflows.rlaif", "RLAIFConfig", "sample response pairs, label them with an AI judge (soft "
              "labels, both orders), then train an RM or DPO/RPO on them (docs/methods/rlaif.md)"),
}


def _add_ai_feedback_parsers(sub, command: str | None) -> None:
    for name, (module, cls, help_text) in AI_FEEDBACK.items():
        p = sub.add_parser(name, help=help_text, description=f"rlxf {name}: {help_text}. Flags override values "
                           "from --config.", allow_abbrev=False)
        p.add_argument("--config", metavar="FILE.yaml", help="YAML file of option: value (flags override it)")
        p.add_argument("--help-all", action="help", help="list every option, grouped")
        if command in (None, name):
            add_arguments(p, getattr(importlib.import_module(module), cls))


def _ai_feedback(name: str, args) -> int:
    module, cls, _ = AI_FEEDBACK[name]
    module = importlib.import_module(module)
    cfg = parse_args(getattr(module, cls), args)
    stats = module.train(cfg)
    out = Path(cfg.output_dir)
    data = out / ("cai_sft.jsonl" if name == "cai-sft" else "preferences.jsonl")
    trained = stats.get("sft") or stats.get("train")
    print(f"\nrlxf {name}: done. Data: {data}  Stats: {out / 'stats.json'}"
          + (f"  Training run: {trained['output_dir']}" if trained else ""))
    return 0


COOL_HELP = ("COOL-RLHF: a conditional reward model (per-domain condition, focal loss) and online rounds of "
             "label -> hacking check -> RM patch/refresh -> GRPO/PPO (docs/methods/cool-rlhf.md)")


def _add_cool_rlhf_parser(sub, *, full: bool) -> None:
    p = sub.add_parser("cool-rlhf", help=COOL_HELP, description=f"rlxf cool-rlhf: {COOL_HELP}. Re-running the "
                       "same command continues the loop. Flags override values from --config.", allow_abbrev=False)
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file of option: value (flags override it)")
    if full:
        from rlxf.workflows.cool_rlhf import CoolRLHFConfig

        add_arguments(p, CoolRLHFConfig)


def _cool_rlhf(args) -> int:
    from rlxf.workflows.cool_rlhf import CoolRLHFConfig, train

    out = train(parse_args(CoolRLHFConfig, args)).output_dir
    print(f"\nrlxf cool-rlhf: done. Rounds: {out / 'rounds.jsonl'}  Report: {out / 'report.html'}  "
          f"Summary: {out / 'summary.json'}")
    return 0


T2R_HELP = "Text2Reward: a chat model writes a reward function from a sentence; validated in a sandbox"


def _add_text2reward_parser(sub) -> None:
    p = sub.add_parser("text2reward", help=T2R_HELP, description=f"rlxf text2reward: {T2R_HELP}. Writes "
                       "DIR/reward_fn.py (use it as --reward DIR/reward_fn.py:reward_fn; it always runs sandboxed) "
                       "and DIR/report.json (docs/text2reward.md).", allow_abbrev=False)
    p.add_argument("goal", help="what the reward should encourage, in one or a few sentences")
    p.add_argument("--judge", required=True, metavar="SPEC", help="the code-writing chat model: local:PATH, "
                   "http://host:port/v1 (OpenAI-compatible), or replay:FILE.json (scripted answers)")
    p.add_argument("--judge-model", metavar="NAME", help="model name for an HTTP judge (default: the server's first)")
    p.add_argument("--dataset", default="task:arithmetic", help="rows whose fields the function may use and that "
                   "the dry run scores (default: task:arithmetic)")
    p.add_argument("--rows", type=int, default=4, help="sample rows for the dry run (default: 4)")
    p.add_argument("--output-dir", default="runs/text2reward", help="where the code and report go "
                   "(default: runs/text2reward)")
    p.add_argument("--max-attempts", type=int, default=3, help="generate -> check -> dry run rounds (default: 3)")
    p.add_argument("--feedback", metavar="TEXT", help="refinement: what was wrong with --previous in training")
    p.add_argument("--previous", metavar="FILE.py", help="refinement: the reward function to improve")
    p.add_argument("--range", nargs=2, type=float, metavar=("LO", "HI"), help="required range of the values")
    p.add_argument("--max-tokens", type=int, default=1024, help="answer length limit (default: 1024)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: 0)")
    p.add_argument("--timeout", type=float, default=5.0, help="sandbox wall-time limit of the dry run, s (default: 5)")
    p.add_argument("--unsafe-reward-code", action="store_true", help="where this machine cannot isolate code "
                   "(no bubblewrap or namespaces), dry-run it anyway with interpreter checks only; unsafe")


def _text2reward(args) -> int:
    from rlxf.rewards.text2reward import format_summary, run_text2reward

    result, report = run_text2reward(
        args.goal, judge=args.judge, judge_model=args.judge_model, dataset=args.dataset, rows=args.rows,
        output_dir=args.output_dir, max_attempts=args.max_attempts, feedback=args.feedback, previous=args.previous,
        value_range=tuple(args.range) if args.range else None, max_tokens=args.max_tokens,
        temperature=args.temperature, timeout=args.timeout, unsafe=args.unsafe_reward_code)
    print(format_summary(result, report), file=sys.stdout if result.ok else sys.stderr)
    return 0 if result.ok else 1


PLAN_HELP = "estimate a run's per-GPU memory from the model's config.json (no weights loaded) and whether it fits"


def _add_plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", choices=list(RECIPES), help="the recipe the run would use")
    p.add_argument("--nproc", type=int, default=1, help="GPUs (torchrun processes) the run spreads over (default: 1)")
    p.add_argument("--quantize", choices=("none", "nf4"), default="none",
                   help="nf4: 4-bit base weights with LoRA adapters (QLoRA)")
    p.add_argument("--gpu-gb", type=float, default=None, help="the card's memory in GB, to say whether the run fits")
    p.add_argument("--card", default=None, metavar="NAME", help="a known card instead of --gpu-gb: h100, h200, "
                   "a100-80, a100-40, l40s, a10g, l4, rtx4090, rtx3090, t4")


def _plan(argv: list[str]) -> int:
    """``rlxf plan RECIPE [recipe flags] [--nproc N] [--quantize nf4] [--gpu-gb G | --card NAME]``: the
    plan's own flags here, the rest parsed as the recipe's."""
    p = argparse.ArgumentParser(prog="rlxf plan", description=f"rlxf plan: {PLAN_HELP}. The recipe's flags "
                                "(--model, --batch-size, --max-length, --lora-r, --fsdp, --gradient-checkpointing ...) "
                                "take the recipe's defaults (docs/distributed.md#will-it-fit).", allow_abbrev=False)
    _add_plan_arguments(p)
    args, rest = p.parse_known_args(argv)
    recipe_args = build_parser(args.recipe).parse_args([args.recipe, *rest])
    cfg = parse_args(_config_class(args.recipe), recipe_args)
    from rlxf.workflows.plan import plan

    try:
        _, text = plan(args.recipe, cfg, nproc=args.nproc, quantize=args.quantize, card=args.card,
                       gpu_gb=args.gpu_gb)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    print(text)
    return 0


def build_parser(command: str | None = None, *, full: bool = True) -> argparse.ArgumentParser:
    """The argument parser; only ``command``'s options are built (all of them when None), so
    ``rlxf --help`` imports no recipe and no torch. ``full`` False folds a recipe's grouped options
    out of its ``--help`` (:mod:`rlxf.configs.help_groups`); they still parse."""
    parser = argparse.ArgumentParser(prog="rlxf", description="Post-train language models with RL from any feedback.",
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, recipe in RECIPES.items():
        help_text = recipe.summary
        p = sub.add_parser(name, help=help_text, description=f"rlxf {name}: {help_text}. "
                           "Flags override values from --config.", allow_abbrev=False)
        p.add_argument("--config", metavar="FILE.yaml", help="YAML file of option: value (flags override it)")
        p.add_argument("--help-all", action="help", help="list every option, grouped")
        if command in (None, name):
            add_arguments(p, _config_class(name), groups=GROUP_OF, full=full)
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
    _add_cool_rlhf_parser(sub, full=command in (None, "cool-rlhf"))
    _add_ai_feedback_parsers(sub, command)
    _add_serve_parser(sub)
    _add_text2reward_parser(sub)
    label_commands.add_parser(sub)
    _add_plan_arguments(sub.add_parser("plan", help=PLAN_HELP))   # main() hands `plan` to _plan
    return parser


def entry() -> None:
    """The ``rlxf`` command and ``python -m rlxf``: :func:`main`, then the process exit. A process that
    joined a torchrun group ends through :func:`rlxf.runtime.distributed.exit_process`; a command that
    never loaded that module (``--help``, ``plan``, ``label``) joined none and never imports torch."""
    code = main()
    distributed = sys.modules.get("rlxf.runtime.distributed")
    if distributed is not None:
        distributed.exit_process(code)
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    full = "--help-all" in argv
    argv = ["--help" if a == "--help-all" else a for a in argv]
    if argv[:1] == ["plan"]:
        try:
            return _plan(argv[1:])
        except ConfigError as exc:
            print(f"rlxf: configuration error: {exc}", file=sys.stderr)
            return 2
    parser = build_parser(next((a for a in argv if not a.startswith("-")), ""), full=full)
    args = parser.parse_args(argv)
    try:
        if args.command in RECIPES:
            cfg = parse_args(_config_class(args.command), args)
            return _run(args.command, cfg)
        if args.command == "demo":
            cls = _config_class(DEMO_RECIPE)
            values = {**DEMO, "output_dir": args.output_dir, "max_steps": args.max_steps, "resume": args.resume}
            cfg = build_config(cls, values, where="rlxf demo", spelling={"max_steps": "--max-steps"})
            _keep_previous_demo(Path(args.output_dir), resume=args.resume)
            return _run(DEMO_RECIPE, cfg)
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
        if args.command == "cool-rlhf":
            return _cool_rlhf(args)
        if args.command in AI_FEEDBACK:
            return _ai_feedback(args.command, args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "text2reward":
            return _text2reward(args)
        if args.command == "label":
            return label_commands.run(args)
        parser.print_help()
        return 2
    except ConfigError as exc:
        if _first_process():
            print(f"rlxf: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rlxf: interrupted; resume with --resume (the newest complete checkpoint is kept)", file=sys.stderr)
        return 130
    except Exception as exc:  # user-facing errors from data/models carry their own clear messages
        from rlxf.data import DataError
        from rlxf.train import TrainingError
        from rlxf.rewards import RewardError

        if isinstance(exc, (DataError, TrainingError, RewardError, OSError)):
            if _first_process():
                print(f"rlxf: error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
