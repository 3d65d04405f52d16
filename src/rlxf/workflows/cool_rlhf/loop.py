"""The rounds of ``rlxf cool-rlhf``: round 0 trains the conditional RM, each round K then samples,
labels, flags hacking, patches and refreshes the RM and continues RL (see :mod:`rlxf.workflows.cool_rlhf`)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from rlxf.config import ConfigError, save_yaml, to_dict
from rlxf.workflows.cool_rlhf.config import CONFIG_FILE, RESUMABLE_CHANGES, ROUND_FILE, CoolRLHFConfig
from rlxf.workflows.cool_rlhf.data import label_pool, prepare_data, replay_labels, write_json, write_jsonl
from rlxf.workflows.cool_rlhf.evaluation import evaluate_round
from rlxf.workflows.cool_rlhf.labels import collect_labels, detect_hacking, label_samples
from rlxf.workflows.cool_rlhf.results import write_results
from rlxf.workflows.cool_rlhf.runs import check_sub_runs, train_policy, train_rm

log = logging.getLogger("rlxf.cool_rlhf")


def train(cfg: CoolRLHFConfig):
    """Run (or continue) the loop; returns the :class:`rlxf.train.RunResult` (summary + output dir)."""
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


def _round_zero(cfg: CoolRLHFConfig, out: Path, data: dict) -> dict:
    folder = out / "round-0"
    if (folder / ROUND_FILE).is_file():
        return json.loads((folder / ROUND_FILE).read_text())
    t0 = time.time()
    rm_dir = train_rm(cfg, folder / "rm", start=cfg.rm_model or cfg.model, dataset=data["rm_train"],
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
    groups = label_samples(cfg, folder, k, policy_dir=policy_in, rm_dir=rm_in)
    labels, label_stats = collect_labels(cfg, groups, k, data)
    hacked, sample_stats = detect_hacking(cfg, groups)
    fast = fast_path_pairs(groups, hacked) if cfg.fast_path else []
    write_jsonl(folder / "labels.jsonl", labels)
    write_jsonl(folder / "fast_pairs.jsonl", fast)
    record.update({"labels/new": len(labels), "fast/pairs": len(fast), **label_stats, **sample_stats})
    # (d): slow path, then fast path, each from the RM before it
    rm_dir = rm_in
    if cfg.slow_path:
        pool = label_pool(out, data, k)
        record["labels/total"] = len(pool)
        rm_dir = train_rm(cfg, folder / "rm-slow", start=rm_dir,
                          dataset=write_jsonl(folder / "slow_pairs.jsonl", pool),
                          eval_dataset=data["rm_eval"], steps=cfg.slow_steps, data=data)
    if fast:
        replay = replay_labels(cfg, label_pool(out, data, k - 1) + labels, n=round(cfg.fast_replay * len(fast)),
                               k=k)
        rm_dir = train_rm(cfg, folder / "rm-fast", start=rm_dir,
                          dataset=write_jsonl(folder / "fast_patch.jsonl", fast + replay),
                          eval_dataset=data["rm_eval"], steps=cfg.fast_steps, data=data)
    # (e): continue RL against the new RM
    policy_summary = train_policy(cfg, folder / "policy", start=policy_in, rm_dir=rm_dir, data=data, k=k)
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

