"""Fields shared by the online recipes (``grpo`` family, ``ppo``, ``cooper``): sampling, rewards, prompt sampler."""

from __future__ import annotations

from dataclasses import dataclass

from rlxf.config import (AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, UNIT, ConfigError, between, callable_spec, check_choice,
                         keyword_arguments, option)
from rlxf.configs.base import RunConfig
from rlxf.configs.choices import ADAPTER_MODES

SAMPLERS = ("uniform", "aps")
SCORERS = ("reference", "policy")
LIKELIHOOD_KINDS = ("rlpr", "vr_cli", "verifree")


@dataclass(frozen=True)
class OnlineConfig(RunConfig):
    """Fields shared by the online recipes: sampling, rewards, prompt sampler."""

    batch_size: int = option(16, "prompts per rollout step (each sampled group_size times)", bounds=AT_LEAST_ONE)
    group_size: int = option(8, "completions sampled per prompt (G)", bounds=AT_LEAST_ONE)
    temperature: float = option(1.0, "sampling temperature (log-probs use the same temperature)", bounds=POSITIVE)
    top_p: float = option(1.0, "nucleus sampling threshold (1 = off)", bounds=between(0, 1, low_open=True))
    top_k: int = option(0, "top-k sampling (0 = off)", bounds=NON_NEGATIVE)
    max_new_tokens: int = option(48, "most tokens per sampled completion (also the eval generation budget)",
                                 bounds=AT_LEAST_ONE)
    reward: str = option("verifiable", "reward: a registered name (verifiable, exact_match, numeric_match, "
                         "likelihood, reward_model, ...) or module:function / path/file.py:function (in Python, "
                         "also the function itself)", python_callable=True, block="reward_args")
    reward_args: dict = option({}, "a keyword argument of --reward, repeatable: a registered factory (lmgt, "
                               "likelihood, ...) or your own function receives it (values read as YAML: 0.5, true, "
                               "[1, 2]); in YAML a mapping, or `reward: {name: SPEC, args: {...}}`",
                               flag="reward_arg")
    max_reward_failure_share: float = option(0.5, "stop the run when the reward function fails (raises, or returns "
                                             "a non-number, NaN or inf) on more than this share of a step's samples "
                                             "for --reward-failure-patience steps in a row; a step on which every "
                                             "sample fails always stops it (1 = only that)", bounds=UNIT)
    reward_failure_patience: int = option(3, "consecutive steps over --max-reward-failure-share that stop the run",
                                          bounds=AT_LEAST_ONE)
    reward_model: str | None = option(None, "reward-model directory for --reward reward_model")
    dp_rollouts: str = option("shard", "under torchrun: shard = every process samples and scores its share of "
                              "each step's prompts (faster); rank0 = process 0 samples and scores the whole step "
                              "and shares it, so the run gives the one-process numbers exactly",
                              choices=("shard", "rank0"))
    unsafe_reward_code: bool = option(False, "run model-written reward code (sandbox:FILE.py:fn, files from `rlxf "
                                      "text2reward`) without the OS boundary where this machine has none; unsafe")
    # judge-based rewards (docs/methods/lmgt.md): --reward lmgt wraps --lmgt-base; --reward d_rlaif
    judge: str | None = option(None, "judge for --reward lmgt / d_rlaif: local:PATH (local:tiny) or an "
                               "OpenAI-compatible base URL http://host:port/v1")
    judge_model: str | None = option(None, "model name sent to an HTTP --judge")
    judge_prompts: str = option("auto", "judge prompt set: standard, compact (short-context judges), auto = "
                                "compact for local:tiny, else standard", choices=("auto", "standard", "compact"))
    lmgt_base: str = option("verifiable", "--reward lmgt: the base reward the judge's shift is added to "
                            "(any --reward spec)")
    lmgt_scale: float = option(1.0, "--reward lmgt: shift scale; reward = base + scale_t·δ, δ in {-1, 0, +1}",
                               bounds=NON_NEGATIVE)
    lmgt_decay: float = option(0.0, "--reward lmgt: per-step multiplicative decay, scale_t = scale·(1 - decay)^t",
                               bounds=between(0, 1, high_open=True))
    lmgt_call_fraction: float = option(1.0, "--reward lmgt: probability that an uncached sample is sent to the "
                                       "judge (others get δ = 0)", bounds=between(0, 1, low_open=True))
    lmgt_knowledge: str | None = option(None, "--reward lmgt: text file of prior knowledge (a wiki/tutorial) "
                                        "shown to the judge")
    likelihood_kind: str = option("rlpr", "likelihood reward: RLPR mean-prob gain, VR-CLI perplexity "
                                  "thresholds, or VeriFree sequence probability", choices=LIKELIHOOD_KINDS)
    likelihood_scorer: str = option("reference", "model scoring the reference answer for --reward likelihood: "
                                    "the frozen initial policy or the current policy", choices=SCORERS)
    format_weight: float = option(0.0, "add this weight × format reward (completion has '#<answer>')",
                                  bounds=NON_NEGATIVE)
    length_reward_weight: float = option(0.0, "Kimi length reward weight w (0 = off): reward += w·len_reward",
                                         bounds=NON_NEGATIVE)
    length_reward_warmup: int = option(0, "steps without the length reward before it switches on (Kimi warm-up)",
                                       bounds=NON_NEGATIVE)
    engine: str = option("auto", "rollout engine: auto (static KV cache + CUDA graphs on CUDA, the transformers "
                         "engine on CPU), hf, static", choices=("auto", "hf", "static"))
    adapter_sampling: str = option("fold", "how the static engine serves a LoRA/QLoRA policy: fold = W + s·BA "
                                   "written into plain weights before each rollout (one copy of the adapted "
                                   "layers, of every 4-bit layer with --quantize), lowrank = W x + s·B(A x) in "
                                   "each decode step (no copy, more kernels a step)", choices=ADAPTER_MODES)
    sampler: str = option("uniform", "which prompts each step trains on: uniform epochs or adaptive "
                          "perplexity-aware sampling", choices=SAMPLERS)
    eval_generate: int = option(200, "greedy held-out evaluation on N eval prompts at each eval", bounds=AT_LEAST_ONE)
    eval_every: int = option(10, "evaluate every N steps (and at start and end); 0 = start and end only",
                             bounds=NON_NEGATIVE)
    warmup_steps: int = option(0, "linear warm-up steps", bounds=NON_NEGATIVE)
    schedule: str = option("constant", "learning-rate schedule after warm-up", choices=("cosine", "linear", "constant"))
    log_every: int = option(1, "log train metrics every N steps", bounds=AT_LEAST_ONE)

    def __post_init__(self):
        super().__post_init__()
        for name in ("likelihood_kind", "likelihood_scorer", "sampler", "judge_prompts", "engine", "dp_rollouts",
                     "adapter_sampling"):
            check_choice(self, name)
        if self.fsdp and self.engine == "static":
            raise ConfigError("--engine static captures the weights' addresses in CUDA graphs, which FSDP2 frees and "
                              "re-gathers around every sampling step; with --fsdp use --engine hf (or auto)")
        if self.max_steps <= 0:
            raise ConfigError(f"--max-steps must be > 0 for an online recipe (rollout steps), got {self.max_steps}")
        if not (isinstance(self.reward, str) or callable(self.reward)):
            raise ConfigError(f"--reward must be a reward name or module:function (in Python, also a function "
                              f"fn(prompts, completions, **fields) -> list[float | None]), got {self.reward!r}")
        base_reward = self.lmgt_base if self.reward == "lmgt" else self.reward
        _check_sandboxed_reward(base_reward, self.unsafe_reward_code)
        keyword_arguments(self.reward_args, "--reward-arg")
        if self.reward_args and isinstance(self.reward, str) and _is_sandboxed(self.reward):
            raise ConfigError("--reward-arg: model-written reward code (sandbox:..., text2reward files) takes no "
                              "arguments; write the values into the file instead")
        if base_reward == "reward_model" and not self.reward_model:
            raise ConfigError("--reward reward_model needs --reward-model DIR (a model trained by `rlxf rm`)")
        if self.reward in ("lmgt", "d_rlaif") and not self.judge:
            raise ConfigError(f"--reward {self.reward} needs --judge SPEC (local:tiny, local:PATH or "
                              "http://host:port/v1)")

    @property
    def reward_label(self) -> str:
        """``--reward`` as text: the spec, or ``module:name`` of a Python function."""
        return self.reward if isinstance(self.reward, str) else callable_spec(self.reward)

    def reward_options(self) -> dict:
        """The options each reward factory takes as its own (``rlxf.rewards.get_reward`` passes a
        factory those it names): the judge rewards' and LMGT's, from ``--judge*`` and ``--lmgt-*``."""
        return {"judge": self.judge, "judge_model": self.judge_model, "judge_prompts": self.judge_prompts,
                "judge_device": self.device, "base": self.lmgt_base, "scale": self.lmgt_scale,
                "decay": self.lmgt_decay, "call_fraction": self.lmgt_call_fraction, "knowledge": self.lmgt_knowledge,
                "seed": self.seed, "trust_remote_code": self.trust_remote_code, "group_size": self.group_size,
                "unsafe_reward_code": self.unsafe_reward_code}


def _is_sandboxed(spec: str) -> bool:
    from rlxf.rewards.sandbox import SANDBOX_PREFIX, is_generated_file

    return spec.startswith(SANDBOX_PREFIX) or is_generated_file(spec)


def resolve_clip_range(cfg, low: str, high: str, preset_high: float | None = None) -> None:
    """Fill the clip-range fields ``low`` / ``high`` of ``cfg`` left None, and check them with its policy loss.

    The PPO clipped loss keeps its symmetric default (eps_high = eps_low) unless the preset gives
    eps_high (DAPO's 0.28); any other loss takes its own paper defaults
    (`rlxf.losses.policy_loss_defaults`: GSPO 3e-4 / 4e-4, CISPO 1 / 4). The loss itself checks
    the range on a one-token batch, so a range it refuses fails here, before any model loads.
    """
    import torch

    from rlxf.losses import get_policy_loss, policy_loss_defaults  # torch: only when a config is built

    defaults = policy_loss_defaults(cfg.policy_loss)
    if getattr(cfg, low) is None:
        object.__setattr__(cfg, low, defaults["eps_low"])
    if getattr(cfg, high) is None:
        if cfg.policy_loss == "clipped":
            value = preset_high if preset_high is not None else getattr(cfg, low)
        else:
            value = defaults["eps_high"]
        object.__setattr__(cfg, high, value)
    one = torch.zeros(1, 1)
    try:
        get_policy_loss(cfg.policy_loss)(one, one, one[0], one + 1, eps_low=getattr(cfg, low),
                                         eps_high=getattr(cfg, high))
    except ValueError as err:
        raise ConfigError(f"--{low.replace('_', '-')} / --{high.replace('_', '-')} for --policy-loss "
                          f"{cfg.policy_loss}: {err}") from err


def _check_sandboxed_reward(spec, unsafe: bool) -> None:
    """Before any model loads: a model-written reward needs the OS boundary (or --unsafe-reward-code),
    and a file with a malformed provenance header is refused."""
    from rlxf.rewards.base import RewardError
    from rlxf.rewards.sandbox import SANDBOX_PREFIX, is_generated_file
    from rlxf.sandbox import boundary

    if not isinstance(spec, str):
        return
    try:
        sandboxed = spec.startswith(SANDBOX_PREFIX) or is_generated_file(spec)
        if sandboxed and not unsafe:
            boundary.require()
    except (RewardError, boundary.SandboxUnavailable) as err:
        raise ConfigError(f"--reward {spec}: {err}") from err
