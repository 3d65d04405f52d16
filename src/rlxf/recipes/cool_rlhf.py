"""``rlxf cool-rlhf``: InternLM2's COOL RLHF — a conditional reward model and online rounds (SPECS §8).

Round 0 trains one *conditional* RM on every domain's preference pairs: each built-in task
(``--datasets task:A,task:B``) is a domain, and the RM reads the domain's condition before the
prompt (:mod:`rlxf.data.conditions`), trained with the focal ranking loss + log-barrier
(``rlxf rm --loss focal``). Then each round K = 1..R, top to bottom:

    (a) sample ``samples_per_prompt`` completions from the current policy on ``label_prompts``
        fresh prompts per domain (train split, never used by RL)
    (b) label them: verifier (correct ≻ wrong), judge (P(a better) under the condition), or file
    (c) score them with the current RM; hacked = RM score ≥ the domain's ``hack_quantile`` while
        the verifier says wrong
    (d) slow path: refresh the RM on every label so far (round 0's pairs + all rounds' labels and
        targeted pairs), from the current RM → round-K/rm-slow
        fast path: patch the RM on targeted pairs (hacked sample rejected, a verified output of
        the same prompt chosen) mixed with ``fast_replay`` × as many earlier labels → round-K/rm-fast
    (e) continue RL (``rlxf grpo`` or ``rlxf ppo`` with ``--reward reward_model``) from the current
        policy against the new RM → round-K/policy
    then evaluate: the RM's pairwise accuracy per domain on held-out task pairs, and the policy's
    greedy verifier accuracy, mean RM reward and hacking indicator on held-out prompts.

Every sub-run is an ordinary recipe run (``train(cfg)`` with a config built by
:func:`rlxf.config.build_config`) in its own directory, and each finished round writes
``round-K/round.json``; re-running the same command skips finished rounds and sub-runs, and a
larger ``--rounds`` continues a finished loop. Results: ``rounds.jsonl`` (one row per round),
``summary.json``, ``report.html``/``report.png``.

Deviations from the paper, stated (none validated against it):
- labels come from the task's verifier (or a judge, or a file) instead of human annotators;
  the hacking check always uses the verifier (every domain is a built-in task);
- a fast-path pair whose prompt has no verified sample uses the task's reference solution as chosen;
- the slow path fine-tunes the current RM on all labels (not a retrain from scratch);
- each round's policy run starts from the previous round's policy, and its KL reference is that
  starting point (the policy recipes copy the model they load), not the SFT model;
- PPO's critic is re-initialised from the round's RM each round (``--value-model reward_model``).
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

from rlxf.config import (AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, SEED, ConfigError, between, build_config, check_choice,
                         check_numbers, load_yaml, option, save_yaml, to_dict)
from rlxf.configs.registry import get_recipe

log = logging.getLogger("rlxf.cool_rlhf")

LABEL_SOURCES = ("verifier", "judge", "file")
POLICY_RECIPES = ("grpo", "ppo")  # online recipes of the registry (rlxf.configs.registry) a round can run
ROUNDS_FILE, ROUND_FILE, CONFIG_FILE = "rounds.jsonl", "round.json", "config.yaml"
# fields that may change between invocations of the same loop
RESUMABLE_CHANGES = ("rounds", "threads", "progress", "device")
# set by the loop for every sub-run, so --rm-options / --policy-options may not set them
MANAGED_RM = ("model", "dataset", "eval_dataset", "eval_size", "conditions", "output_dir", "resume", "max_steps")
MANAGED_POLICY = ("model", "dataset", "eval_dataset", "eval_size", "reward", "reward_model", "output_dir", "resume",
                  "max_steps")


@dataclass(frozen=True)
class CoolRLHFConfig:
    """Options of ``rlxf cool-rlhf``."""

    model: str = option("tiny", "initial policy, and the reward model's body: 'tiny', a local HF directory or a hub id")
    rm_model: str | None = option(None, "initial reward-model weights (None = --model with a fresh score head)")
    datasets: str = option("task:arithmetic,task:sorting", "comma-separated task:NAME datasets; each is one domain")
    conditions: str = option("default", "domain -> condition text: 'default' (built-in tasks) or a YAML file")
    rounds: int = option(3, "online rounds after round 0 (the initial RM)", bounds=AT_LEAST_ONE)
    labels: str = option("verifier", "source of each round's new preference labels", choices=LABEL_SOURCES)
    judge: str | None = option(None, "judge for --labels judge: local:PATH, local:tiny or http://host:port/v1")
    judge_prompts: str = option("standard", "judge prompt set: standard, or compact for short-context judges "
                                "(the tiny model)", choices=("standard", "compact"))
    labels_file: str | None = option(None, "--labels file: .jsonl of prompt/chosen/rejected/domain rows; a row's "
                                     "'round' (default 1) says in which round it is merged")
    fast_path: bool = option(True, "patch the RM each round on pairs rejecting the detected reward-hacking samples")
    slow_path: bool = option(True, "refresh the RM each round on every label collected so far")
    policy_recipe: str = option("grpo", "policy RL recipe of each round", choices=POLICY_RECIPES)
    policy_steps: int = option(20, "policy RL steps per round", bounds=AT_LEAST_ONE)
    policy_lr: float | None = option(None, "policy learning rate (None = the policy recipe's default)", bounds=POSITIVE)
    policy_batch_size: int = option(16, "prompts per policy RL step", bounds=AT_LEAST_ONE)
    group_size: int | None = option(None, "completions per prompt in RL (None = the recipe's default: GRPO 8, PPO 1)",
                                    bounds=AT_LEAST_ONE)
    max_new_tokens: int = option(48, "most tokens per sampled completion (RL, labelling and evaluation)",
                                 bounds=AT_LEAST_ONE)
    policy_options: str | None = option(None, "YAML file of further options of the policy recipe (e.g. beta)")
    rm_loss: str = option("focal", "RM loss: focal ranking + log-barrier (COOL-RLHF) or Bradley-Terry",
                          choices=("focal", "bt"))
    rm_steps: int = option(150, "round 0: steps of the initial RM training", bounds=AT_LEAST_ONE)
    slow_steps: int = option(50, "slow path: RM steps per round", bounds=NON_NEGATIVE)
    fast_steps: int = option(20, "fast path: RM patch steps per round", bounds=NON_NEGATIVE)
    fast_replay: float = option(1.0, "fast path: earlier labels mixed into the patch per targeted pair (0 = none)",
                                bounds=NON_NEGATIVE)
    rm_lr: float = option(5e-4, "RM learning rate (all RM runs); tuned for the tiny model", bounds=POSITIVE)
    rm_batch_size: int = option(16, "pairs per RM step", bounds=AT_LEAST_ONE)
    rm_options: str | None = option(None, "YAML file of further rlxf rm options (e.g. focal_gamma, barrier_weight)")
    rm_pairs: int = option(2000, "round 0: the task's mixed preference pairs per domain (train split)",
                           bounds=AT_LEAST_ONE)
    eval_pairs: int = option(128, "held-out mixed preference pairs per domain (RM accuracy)", bounds=AT_LEAST_ONE)
    rl_prompts: int = option(1000, "RL training prompts per domain (train split)", bounds=AT_LEAST_ONE)
    eval_prompts: int = option(64, "held-out prompts per domain (policy accuracy, RM reward, hacking indicator)",
                               bounds=AT_LEAST_ONE)
    label_prompts: int = option(32, "fresh prompts per domain and round sampled for labels (train split, not in RL)",
                                bounds=AT_LEAST_ONE)
    samples_per_prompt: int = option(4, "completions sampled per label prompt", bounds=AT_LEAST_ONE)
    temperature: float = option(1.0, "sampling temperature of the label samples", bounds=POSITIVE)
    max_pairs_per_prompt: int = option(2, "new label pairs per prompt (verifier, judge)", bounds=AT_LEAST_ONE)
    judge_margin: float = option(0.1, "judge labels: keep a pair when |P(a better) − 0.5| >= this",
                                 bounds=between(0, 0.5, high_open=True))
    hack_quantile: float = option(0.75, "high RM score = at or above this quantile of the domain's scores",
                                  bounds=between(0, 1, low_open=True, high_open=True))
    output_dir: str = option("runs/cool_rlhf", "where the rounds, rounds.jsonl, summary.json and report go")
    seed: int = option(0, "random seed (data, sampling, sub-runs)", bounds=SEED)
    device: str = option("auto", "auto | cpu | cuda | cuda:N | mps")
    threads: int = option(0, "torch CPU threads; 0 = torch default", bounds=NON_NEGATIVE)
    progress: bool = option(False, "show the sub-runs' progress bars")

    def __post_init__(self):
        check_numbers(self)
        for name in ("labels", "judge_prompts", "policy_recipe", "rm_loss"):
            check_choice(self, name)
        if not self.domains:
            raise ConfigError("--datasets: give at least one task:NAME dataset")
        from rlxf.tasks import TASKS

        for spec in self.datasets.split(","):
            name = spec.strip().removeprefix("task:")
            if not spec.strip().startswith("task:") or name not in TASKS:
                raise ConfigError(f"--datasets: {spec.strip()!r} is not a built-in task; use task:NAME with NAME in "
                                  f"{', '.join(sorted(TASKS))} (each task is one domain with its verifier)")
        if len(set(self.domains)) != len(self.domains):
            raise ConfigError(f"--datasets: a domain is listed twice: {self.datasets}")
        if self.labels == "judge" and not self.judge:
            raise ConfigError("--labels judge needs --judge (local:PATH, local:tiny or http://host:port/v1)")
        if self.labels == "file" and not self.labels_file:
            raise ConfigError("--labels file needs --labels-file PATH.jsonl")
        for name in ("slow_steps", "fast_steps"):
            if getattr(self, name) < 1 and getattr(self, name.replace("steps", "path")):
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1 while --{name[:4]}-path is on")

    @property
    def domains(self) -> list[str]:
        return [s.strip().removeprefix("task:") for s in self.datasets.split(",") if s.strip()]


# -- the loop -----------------------------------------------------------------------------------

def train(cfg: CoolRLHFConfig):
    """Run (or continue) the loop; returns a :class:`rlxf.recipes.common.FitResult`."""
    import torch

    from rlxf.recipes.common import setup_logging
    from rlxf.train import RunResult as FitResult

    setup_logging()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.output_dir)
    _check_same_loop(cfg, out)
    data = prepare_data(cfg, out)
    check_sub_runs(cfg, data)
    records = [_round_zero(cfg, out, data)]
    for k in range(1, cfg.rounds + 1):
        records.append(_round(cfg, out, data, k, records[-1]))
        write_results(cfg, out, records, report=False)
    summary = write_results(cfg, out, records)
    return FitResult(summary=summary, output_dir=out)


def prepare_data(cfg: CoolRLHFConfig, out: Path) -> dict[str, Path]:
    """Write the loop's fixed data under ``out/data`` (deterministic in the config): the conditions,
    round 0's RM pairs, held-out pairs and prompts, and the RL prompts; rows interleave the domains."""
    from rlxf.data.conditions import load_conditions, save_conditions
    from rlxf.tasks import get_task

    conditions = load_conditions(cfg.conditions)
    missing = [d for d in cfg.domains if d not in conditions]
    if missing:
        raise ConfigError(f"--conditions {cfg.conditions}: no condition for domain(s) {', '.join(missing)}")
    folder = out / "data"
    folder.mkdir(parents=True, exist_ok=True)
    save_conditions({d: conditions[d] for d in cfg.domains}, folder)
    paths = {"conditions": folder / "conditions.yaml"}
    builders = {
        "rm_train": lambda t: t.preference_rows("train", cfg.rm_pairs, cfg.seed, kind="mixed"),
        "rm_eval": lambda t: t.preference_rows("eval", cfg.eval_pairs, cfg.seed, kind="mixed"),
        "rl_prompts": lambda t: t.prompt_rows("train", cfg.rl_prompts, cfg.seed),
        "eval_prompts": lambda t: t.prompt_rows("eval", cfg.eval_prompts, cfg.seed),
    }
    for name, build in builders.items():
        per_domain = [[{**row, "domain": d} for row in build(get_task(d))] for d in cfg.domains]
        paths[name] = write_jsonl(folder / f"{name}.jsonl", _interleave(per_domain))
    return paths


def label_prompt_rows(cfg: CoolRLHFConfig, domain: str, round_index: int) -> list[dict]:
    """Round K's label prompts of ``domain``: train-split problems right after the RL prompts
    (problem lists are prefix-stable in n, so they never overlap RL's or an earlier round's)."""
    from rlxf.tasks import get_task

    task = get_task(domain)
    start = cfg.rl_prompts + (round_index - 1) * cfg.label_prompts
    problems = task.problems("train", start + cfg.label_prompts, cfg.seed)[start:]
    return [{"prompt": p.prompt, "answer": p.answer, "reference": task.solve(p, verbose=False), "domain": domain}
            for p in problems]


def _round_zero(cfg: CoolRLHFConfig, out: Path, data: dict) -> dict:
    folder = out / "round-0"
    if (folder / ROUND_FILE).is_file():
        return json.loads((folder / ROUND_FILE).read_text())
    t0 = time.time()
    rm_dir = _train_rm(cfg, folder / "rm", start=cfg.rm_model or cfg.model, dataset=data["rm_train"],
                       eval_dataset=data["rm_eval"], steps=cfg.rm_steps, data=data)
    record = {"round": 0, "rm_dir": rm_dir, "policy_dir": cfg.model}
    record.update(evaluate_round(cfg, folder, data, rm_dir=rm_dir, policy_dir=cfg.model, previous=None))
    record["seconds"] = round(time.time() - t0, 1)
    write_json(folder / ROUND_FILE, record)
    return record


def _round(cfg: CoolRLHFConfig, out: Path, data: dict, k: int, previous: dict) -> dict:
    from rlxf.data.online_labels import fast_path_pairs

    folder = out / f"round-{k}"
    if (folder / ROUND_FILE).is_file():
        log.info("cool-rlhf: round %d already finished in %s; skipped", k, folder)
        return json.loads((folder / ROUND_FILE).read_text())
    t0 = time.time()
    rm_in, policy_in = previous["rm_dir"], previous["policy_dir"]
    record: dict = {"round": k}
    # (a)-(c): sample, label, score with the current RM and flag hacking
    groups = _label_samples(cfg, folder, k, policy_dir=policy_in, rm_dir=rm_in)
    labels, label_stats = collect_labels(cfg, groups, k, data)
    hacked, sample_stats = _detect(cfg, groups)
    fast = fast_path_pairs(groups, hacked) if cfg.fast_path else []
    write_jsonl(folder / "labels.jsonl", labels)
    write_jsonl(folder / "fast_pairs.jsonl", fast)
    record.update({"labels/new": len(labels), "fast/pairs": len(fast), **label_stats, **sample_stats})
    # (d): slow path, then fast path, each from the RM before it
    rm_dir = rm_in
    if cfg.slow_path:
        pool = _label_pool(out, data, k)
        record["labels/total"] = len(pool)
        rm_dir = _train_rm(cfg, folder / "rm-slow", start=rm_dir,
                           dataset=write_jsonl(folder / "slow_pairs.jsonl", pool),
                           eval_dataset=data["rm_eval"], steps=cfg.slow_steps, data=data)
    if fast:
        replay = _replay(cfg, _label_pool(out, data, k - 1) + labels, n=round(cfg.fast_replay * len(fast)), k=k)
        rm_dir = _train_rm(cfg, folder / "rm-fast", start=rm_dir,
                           dataset=write_jsonl(folder / "fast_patch.jsonl", fast + replay),
                           eval_dataset=data["rm_eval"], steps=cfg.fast_steps, data=data)
    # (e): continue RL against the new RM
    policy_summary = _train_policy(cfg, folder / "policy", start=policy_in, rm_dir=rm_dir, data=data, k=k)
    record.update({"rm_dir": rm_dir, "policy_dir": policy_summary["final_model"],
                   "policy_run/start_task_accuracy": policy_summary.get("start/task_accuracy"),
                   "policy_run/final_task_accuracy": policy_summary.get("final/task_accuracy"),
                   "policy_run/start_reward": policy_summary.get("start/reward"),
                   "policy_run/final_reward": policy_summary.get("final/reward")})
    record.update(evaluate_round(cfg, folder, data, rm_dir=rm_dir, policy_dir=record["policy_dir"],
                                 previous=previous))
    record["seconds"] = round(time.time() - t0, 1)
    write_json(folder / ROUND_FILE, record)
    log.info("cool-rlhf: round %d done: %s", k, json.dumps({key: v for key, v in record.items()
                                                             if not key.endswith("_dir")}, default=str))
    return record


# -- (a)-(c): samples, labels, hacking ----------------------------------------------------------

def _label_samples(cfg, folder: Path, k: int, *, policy_dir: str, rm_dir: str):
    """Sampled label prompts of every domain, verified and scored by the current RM (cached in
    ``round-K/samples.jsonl``, so an interrupted round reuses them)."""
    from rlxf.data.online_labels import SampleGroup
    from rlxf.tasks import get_task

    path = folder / "samples.jsonl"
    if path.is_file():
        return [SampleGroup(**row) for row in read_jsonl(path)]
    rows = _interleave([label_prompt_rows(cfg, d, k) for d in cfg.domains])
    texts = generate(cfg, policy_dir, rows, n=cfg.samples_per_prompt, temperature=cfg.temperature,
                     seed=cfg.seed * 1009 + k)
    groups = [SampleGroup(prompt=r["prompt"], domain=r["domain"], answer=r["answer"], reference=r["reference"],
                          texts=t, correct=[get_task(r["domain"]).verify(x, r["answer"]) for x in t])
              for r, t in zip(rows, texts)]
    rm = load_rm(cfg, rm_dir)
    flat_scores = rm([g.prompt for g in groups for _ in g.texts], [x for g in groups for x in g.texts],
                     domain=[g.domain for g in groups for _ in g.texts])
    for i, g in enumerate(groups):
        g.scores = flat_scores[i * cfg.samples_per_prompt:(i + 1) * cfg.samples_per_prompt]
    write_jsonl(path, [g.as_dict() for g in groups])
    return groups


def collect_labels(cfg: CoolRLHFConfig, groups, k: int, data: dict) -> tuple[list[dict], dict]:
    """Round ``k``'s new preference rows from ``cfg.labels`` and their stats."""
    from rlxf.data.online_labels import file_labels, judge_pairs, verifier_pairs

    if cfg.labels == "verifier":
        return verifier_pairs(groups, max_pairs_per_prompt=cfg.max_pairs_per_prompt), {}
    if cfg.labels == "file":
        from rlxf.data import load_rows

        return file_labels(load_rows(cfg.labels_file, kind="preference"), round_index=k, domains=cfg.domains,
                           where=cfg.labels_file), {}
    from rlxf.data.conditions import load_conditions
    from rlxf.judges import build_judge

    judge = build_judge(cfg.judge, device=cfg.device, prompts=cfg.judge_prompts,
                        cache_dir=str(Path(cfg.output_dir) / "judge_cache"))
    rows, stats = judge_pairs(groups, judge, load_conditions(str(data["conditions"])),
                              max_pairs_per_prompt=cfg.max_pairs_per_prompt, margin=cfg.judge_margin)
    return rows, {f"judge/{key}": value for key, value in stats.items()}


def _detect(cfg, groups) -> tuple[list[list[bool]], dict]:
    """Hacking flags per group and the label samples' stats under the current RM."""
    from rlxf.data.online_labels import hacking_flags, hacking_stats, high_scored

    scores = [s for g in groups for s in g.scores]
    correct = [c for g in groups for c in g.correct]
    high = high_scored(scores, [g.domain for g in groups for _ in g.texts], q=cfg.hack_quantile)
    flags = hacking_flags(high, correct)
    n = cfg.samples_per_prompt
    stats = {f"samples/hack_{key}": v for key, v in hacking_stats(scores, correct, high).items()}
    stats["samples/accuracy"] = sum(bool(c) for c in correct) / len(correct)
    stats["samples/hacked"] = sum(flags)
    return [flags[i * n:(i + 1) * n] for i in range(len(groups))], stats


def _label_pool(out: Path, data: dict, k: int) -> list[dict]:
    """Every label up to round ``k``: round 0's pairs, then each round's labels and targeted pairs."""
    rows = read_jsonl(data["rm_train"])
    for j in range(1, k + 1):
        for name in ("labels.jsonl", "fast_pairs.jsonl"):
            rows += read_jsonl(out / f"round-{j}" / name)
    return rows


def _replay(cfg, pool: list[dict], *, n: int, k: int) -> list[dict]:
    rng = random.Random(f"cool-rlhf:replay:{cfg.seed}:{k}")
    return rng.sample(pool, min(n, len(pool)))


# -- sub-runs -----------------------------------------------------------------------------------

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


def _train_rm(cfg, out_dir: Path, **kwargs) -> str:
    return run_recipe("rm", rm_values(cfg, **kwargs), out_dir)["final_model"]


def _train_policy(cfg, out_dir: Path, **kwargs) -> dict:
    return run_recipe(cfg.policy_recipe, policy_values(cfg, **kwargs), out_dir)


# -- evaluation ---------------------------------------------------------------------------------

def evaluate_round(cfg, folder: Path, data: dict, *, rm_dir: str, policy_dir: str, previous: dict | None) -> dict:
    """The round's row of ``rounds.jsonl`` (see docs/methods/cool-rlhf.md#metrics)."""
    from rlxf.data.online_labels import hacking_stats, high_scored
    from rlxf.tasks import get_task

    rm = load_rm(cfg, rm_dir)
    metrics = rm_accuracy(rm, read_jsonl(data["rm_eval"]))
    rows = read_jsonl(data["eval_prompts"])
    texts = [t[0] for t in generate(cfg, policy_dir, rows, n=1, temperature=0.0, seed=cfg.seed)]
    domains = [r["domain"] for r in rows]
    correct = [get_task(r["domain"]).verify(t, r["answer"]) for r, t in zip(rows, texts)]
    scores = rm([r["prompt"] for r in rows], texts, domain=domains)
    write_jsonl(folder / "eval_samples.jsonl", [
        {"prompt": r["prompt"], "domain": r["domain"], "completion": t, "correct": c, "rm_score": s}
        for r, t, c, s in zip(rows, texts, correct, scores)])
    high = high_scored(scores, domains, q=cfg.hack_quantile)
    for domain in [None, *cfg.domains]:
        pick = [i for i, d in enumerate(domains) if domain is None or d == domain]
        suffix = "" if domain is None else f"/{domain}"
        metrics[f"policy_accuracy{suffix}"] = sum(correct[i] for i in pick) / len(pick)
        metrics[f"rm_reward{suffix}"] = _mean([scores[i] for i in pick])
        stats = hacking_stats([scores[i] for i in pick], [correct[i] for i in pick], [high[i] for i in pick])
        metrics.update({f"hack/{key}{suffix}": value for key, value in stats.items()})
    if previous is not None:
        # the previous policy's held-out completions rescored by this round's RM: the same yardstick
        before = read_jsonl(Path(cfg.output_dir) / f"round-{previous['round']}" / "eval_samples.jsonl")
        old_scores = rm([r["prompt"] for r in before], [r["completion"] for r in before],
                        domain=[r["domain"] for r in before])
        metrics["delta/rm_reward"] = metrics["rm_reward"] - _mean(old_scores)
        metrics["delta/accuracy"] = metrics["policy_accuracy"] - previous["policy_accuracy"]
        metrics["hack/divergence"] = float(metrics["delta/rm_reward"] > 0 and metrics["delta/accuracy"] < 0)
    return metrics


def rm_accuracy(rm, pairs: list[dict]) -> dict:
    """Pairwise accuracy (ties ½) of ``rm`` (a ``reward_model`` reward, :func:`load_rm`) on held-out
    pairs: overall, per domain and per (domain, pair kind)."""
    domains = [p["domain"] for p in pairs]
    chosen = rm([p["prompt"] for p in pairs], [p["chosen"] for p in pairs], domain=domains)
    rejected = rm([p["prompt"] for p in pairs], [p["rejected"] for p in pairs], domain=domains)
    wins = [1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected)]
    out = {"rm_accuracy": sum(wins) / len(wins)}
    groups: dict[str, list[float]] = {}
    for p, w in zip(pairs, wins):
        groups.setdefault(p["domain"], []).append(w)
        groups.setdefault(f"{p['domain']}/{p.get('pair_kind')}", []).append(w)
    out.update({f"rm_accuracy/{key}": sum(v) / len(v) for key, v in sorted(groups.items())})
    return out


def generate(cfg, policy_dir: str, rows: list[dict], *, n: int, temperature: float, seed: int) -> list[list[str]]:
    """``n`` completions per prompt row from the policy in ``policy_dir`` (seeded, so re-runs agree)."""
    import torch

    from rlxf.data import DataError, tokenize_prompts
    from rlxf.models import ensure_pad_token, load_policy, load_tokenizer, resolve_device
    from rlxf.rollout import HFEngine, SamplingParams

    device = resolve_device(cfg.device)
    tokenizer = load_tokenizer(policy_dir)
    resize = len(tokenizer) if ensure_pad_token(tokenizer) else None
    model = load_policy(policy_dir, device=device, resize_to=resize)
    examples, stats = tokenize_prompts(rows, tokenizer, max_prompt_length=256)
    if stats.dropped:
        raise DataError(f"{stats.dropped} prompts are longer than 256 tokens")
    engine = HFEngine(model, tokenizer, max_batch_size=256)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=temperature, n=n, seed=seed)
    texts = engine.generate([e["prompt_ids"] for e in examples], params).text
    del model, engine
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return [texts[i * n:(i + 1) * n] for i in range(len(examples))]


def load_rm(cfg, rm_dir: str):
    """The (conditional) RM in ``rm_dir`` as the ``reward_model`` reward that RL uses:
    ``rm(prompts, completions, domain=[...]) -> scores``."""
    from rlxf.models import resolve_device
    from rlxf.rewards import get_reward

    return get_reward("reward_model", path=rm_dir, device=resolve_device(cfg.device))


# -- results ------------------------------------------------------------------------------------

def write_results(cfg: CoolRLHFConfig, out: Path, records: list[dict], *, report: bool = True) -> dict:
    """``rounds.jsonl``, ``metrics.jsonl`` (one eval row per round), ``summary.json`` and (``report``)
    ``report.html``/``report.png``."""
    from rlxf.reporting import MetricsLogger, Panel, write_report, write_summary

    write_jsonl(out / ROUNDS_FILE, records)
    with MetricsLogger(out) as metrics:
        for record in records:
            metrics.log(record["round"], {k: v for k, v in record.items()
                                          if k != "round" and (v is None or isinstance(v, (int, float)))}, split="eval")
    first, last = records[0], records[-1]
    headline = ("rm_accuracy", "policy_accuracy", "rm_reward", "hack/fraction",
                *(f"{m}/{d}" for m in ("rm_accuracy", "policy_accuracy") for d in cfg.domains))
    summary = {"recipe": "cool-rlhf", "model": cfg.model, "domains": cfg.domains, "labels": cfg.labels,
               "rounds_done": len(records) - 1,
               **{f"start/{m}": first.get(m) for m in headline}, **{f"final/{m}": last.get(m) for m in headline},
               "rounds": records, "final_rm": last["rm_dir"], "final_policy": last["policy_dir"],
               "seconds": round(sum(r.get("seconds", 0.0) for r in records), 1)}
    write_summary(out, summary)
    if not report:
        return summary
    d = cfg.domains
    panels = [Panel("RM held-out pairwise accuracy", ["rm_accuracy", *(f"rm_accuracy/{x}" for x in d)],
                    ylabel="accuracy"),
              Panel("RM accuracy on correctness pairs", [f"rm_accuracy/{x}/correctness" for x in d], ylabel="accuracy"),
              Panel("policy verifier accuracy (greedy, held-out)",
                    ["policy_accuracy", *(f"policy_accuracy/{x}" for x in d)], ylabel="accuracy"),
              Panel("policy mean RM reward (the round's RM)", ["rm_reward", *(f"rm_reward/{x}" for x in d)]),
              Panel("hacking: high RM score but wrong", ["hack/fraction", "hack/top_wrong_rate", "hack/wrong_rate"],
                    ylabel="fraction"),
              Panel("RM-reward rise vs accuracy change", ["delta/rm_reward", "delta/accuracy"])]
    write_report(out, title=f"rlxf cool-rlhf: {cfg.model} on {', '.join(d)} (x axis: round)", panels=panels,
                 summary={k: v for k, v in summary.items() if k != "rounds"}, config=to_dict(cfg))
    return summary


def _check_same_loop(cfg: CoolRLHFConfig, out: Path) -> None:
    """A re-run continues the loop in ``out`` only with the same settings (``rounds`` may grow)."""
    path = out / CONFIG_FILE
    if path.is_file():
        import yaml

        saved = yaml.safe_load(path.read_text()) or {}
        wanted = to_dict(cfg)
        changed = [f"{k}: {saved[k]!r} → {wanted[k]!r}" for k in saved
                   if k in wanted and k not in RESUMABLE_CHANGES and saved[k] != wanted[k]]
        if changed:
            raise ConfigError(f"{out} holds a cool-rlhf loop with other settings ({'; '.join(changed)}); re-run with "
                              f"the same ones to continue it, or choose another --output-dir")
    out.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, path)


def _interleave(per_domain: list[list[dict]]) -> list[dict]:
    """Round-robin over the domains, so any prefix of the rows mixes them."""
    longest = max(len(rows) for rows in per_domain)
    return [rows[i] for i in range(longest) for rows in per_domain if i < len(rows)]


def _mean(values: list) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)
    return path


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


