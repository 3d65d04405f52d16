"""The options of ``rlxf cool-rlhf`` and the names the loop writes and manages."""

from __future__ import annotations

from dataclasses import dataclass

from rlxf.config import (AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, SEED, ConfigError, between, check_choice, check_numbers,
                         option)

LABEL_SOURCES = ("verifier", "judge", "file")  # or a labeling server / database: human labels (is_human_source)
POLICY_RECIPES = ("grpo", "ppo")  # online recipes of the registry (rlxf.configs.registry) a round can run
ROUNDS_FILE, ROUND_FILE, CONFIG_FILE = "rounds.jsonl", "round.json", "config.yaml"
# fields that may change between invocations of the same loop
RESUMABLE_CHANGES = ("rounds", "threads", "progress", "device", "human_timeout", "human_on_timeout")
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
    labels: str = option("verifier", "source of each round's new preference labels: verifier, judge, file, or human "
                         "labels from a labeling server http://HOST:PORT (owner token in RLXF_LABEL_TOKEN) or "
                         "database (a SQLAlchemy URL or a .db file; docs/labeling.md)")
    judge: str | None = option(None, "judge for --labels judge: local:PATH, local:tiny or http://host:port/v1")
    judge_prompts: str = option("standard", "judge prompt set: standard, or compact for short-context judges "
                                "(the tiny model)", choices=("standard", "compact"))
    labels_file: str | None = option(None, "--labels file: .jsonl of prompt/chosen/rejected/domain rows; a row's "
                                     "'round' (default 1) says in which round it is merged")
    human_timeout: float = option(3600.0, "human labels: seconds to wait for a round's items to be labelled",
                                  bounds=POSITIVE)
    human_on_timeout: str = option("partial", "human labels not all in at the timeout: partial = go on with those "
                                   "that came, fail = stop (re-running continues the round)",
                                   choices=("partial", "fail"))
    human_overlap: int = option(1, "human labels: labelers per item (2+ gives Krippendorff's alpha)",
                                bounds=AT_LEAST_ONE)
    human_labelers: str = option("*", "human labels: comma-separated labeler names who get the rounds' items "
                                 "(* = every labeler)")
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
        for name in ("judge_prompts", "policy_recipe", "rm_loss", "human_on_timeout"):
            check_choice(self, name)
        if self.labels not in LABEL_SOURCES and not is_human_source(self.labels):
            raise ConfigError(f"--labels: {self.labels!r} is not one of {', '.join(LABEL_SOURCES)}, a labeling server "
                              "URL (http://HOST:PORT) or a labeling database (sqlite:///labels.db, a .db file, "
                              "postgresql://...)")
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


def is_human_source(labels: str) -> bool:
    """``--labels`` names a labeling server (``http(s)://``) or database (a URL or a .db/.sqlite file)."""
    return "://" in labels or labels.endswith((".db", ".sqlite", ".sqlite3"))
