"""``rlxf cool-rlhf``: InternLM2's COOL RLHF — a conditional reward model and online rounds (docs/methods/cool-rlhf.md).

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

Modules: ``config`` (the options), ``loop`` (round 0 and the rounds), ``data`` (the fixed data, label
prompts and the label pool), ``labels`` (steps (a)-(c)), ``runs`` (the RM and policy sub-runs),
``evaluation`` (a round's metrics) and ``results`` (rounds.jsonl, summary, report).
"""

from rlxf.workflows.cool_rlhf.config import LABEL_SOURCES, POLICY_RECIPES, CoolRLHFConfig
from rlxf.workflows.cool_rlhf.data import label_prompt_rows, prepare_data, read_jsonl, write_json, write_jsonl
from rlxf.workflows.cool_rlhf.evaluation import evaluate_round, generate, load_rm, rm_accuracy
from rlxf.workflows.cool_rlhf.labels import collect_labels
from rlxf.workflows.cool_rlhf.loop import train
from rlxf.workflows.cool_rlhf.results import write_results
from rlxf.workflows.cool_rlhf.runs import check_sub_runs, policy_values, rm_values, run_recipe

__all__ = ["LABEL_SOURCES", "POLICY_RECIPES", "CoolRLHFConfig", "check_sub_runs", "collect_labels", "evaluate_round",
           "generate", "label_prompt_rows", "load_rm", "policy_values", "prepare_data", "read_jsonl", "rm_accuracy",
           "rm_values", "run_recipe", "train", "write_json", "write_jsonl", "write_results"]
