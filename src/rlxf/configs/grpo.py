"""Configs of ``rlxf grpo`` and its presets (``dr_grpo``, ``dapo``, ``rloo``): docs/methods/grpo.md."""

from __future__ import annotations

from dataclasses import dataclass

from rlxf.config import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, Bounds, ConfigError, between, check_choice, option
from rlxf.configs.online import OnlineConfig, resolve_clip_range
from rlxf.configs.choices import ADVANTAGE_ESTIMATORS, ADVANTAGE_SCALES, AGGREGATION_MODES, KL_KINDS, POLICY_LOSSES


PRESETS: dict[str, dict] = {
    "grpo": dict(advantage_scale="group", leave_one_out=False, loss_agg="seq-mean-token-mean", eps_high=None,
                 beta=0.04, dynamic_sampling=False, overlong_buffer=0),
    "dr_grpo": dict(advantage_scale="none", leave_one_out=False, loss_agg="seq-mean-token-sum-norm",
                    eps_high=None, beta=0.0, dynamic_sampling=False, overlong_buffer=0),
    "dapo": dict(advantage_scale="group", leave_one_out=False, loss_agg="token-mean", eps_high=0.28, beta=0.0,
                 dynamic_sampling=True, overlong_buffer=-1),
    "rloo": dict(advantage_scale="none", leave_one_out=True, loss_agg="seq-mean-token-mean", eps_high=None,
                 beta=0.0, dynamic_sampling=False, overlong_buffer=0),
}


@dataclass(frozen=True)
class GRPOConfig(OnlineConfig):
    """Config of ``rlxf grpo``; fields left as None take the preset's value (see the module docstring)."""

    preset: str = option("grpo", "named variant that fills unset fields", choices=tuple(PRESETS))
    advantage: str = option("group", "advantage estimator: group-relative (--advantage-scale, --leave-one-out), "
                            "or REINFORCE++ (token KL in the reward, reward-to-go, whitened over the batch; "
                            "_baseline subtracts the group mean reward first)", choices=ADVANTAGE_ESTIMATORS)
    kl_reward_coef: float = option(0.01, "REINFORCE++: β of the per-token k1 KL to the reference in the reward "
                                   "(0 = no reference model)", bounds=NON_NEGATIVE)
    advantage_scale: str | None = option(None, "divide group-centred rewards by the group std, the batch std, "
                                         "or nothing (None = preset)", choices=ADVANTAGE_SCALES)
    leave_one_out: bool | None = option(None, "RLOO baseline: mean of the other G−1 rewards (None = preset)")
    loss_agg: str | None = option(None, "how per-token losses become one number (None = preset)",
                                  choices=AGGREGATION_MODES)
    eps_low: float | None = option(None, "clip range below 1: ρ ≥ 1 − eps_low (None = the policy loss's "
                                   "default: clipped 0.2, gspo 3e-4, cispo 1 = no lower bound)", bounds=between(0, 1))
    eps_high: float | None = option(None, "clip range above 1: ρ ≤ 1 + eps_high (None = the policy loss's "
                                    "default: clipped eps_low or the preset's (DAPO 0.28), gspo 4e-4, cispo 4)",
                                    bounds=NON_NEGATIVE)
    beta: float | None = option(None, "KL-in-loss coefficient β (0 = no reference model; None = preset)",
                                bounds=NON_NEGATIVE)
    kl_kind: str = option("k3", "KL estimator in the loss", choices=KL_KINDS)
    policy_loss: str = option("clipped", "per-token policy loss, by its registered name (docs/losses.md)",
                              choices=POLICY_LOSSES)
    dynamic_sampling: bool | None = option(None, "DAPO: keep only groups whose rewards differ and sample more "
                                           "prompts to refill the batch (None = preset)")
    max_sample_batches: int = option(3, "dynamic sampling: most rollout batches drawn per step", bounds=AT_LEAST_ONE)
    overlong_buffer: int | None = option(None, "DAPO overlong shaping: penalise the last N tokens before "
                                         "max_new_tokens (0 = off, -1 = max_new_tokens // 4; None = preset)",
                                         bounds=Bounds(low=0, special=(-1,)))
    overlong_factor: float = option(1.0, "DAPO overlong penalty at max_new_tokens", bounds=NON_NEGATIVE)
    mask_truncated: bool = option(False, "drop completions that hit max_new_tokens from the loss (overlong filtering)")
    ppo_epochs: int = option(1, "passes over each rollout batch (μ; > 1 makes ρ ≠ 1 and clipping active)",
                             bounds=AT_LEAST_ONE)
    mini_batches: int = option(1, "optimizer steps per pass over a rollout batch", bounds=AT_LEAST_ONE)
    micro_batch_size: int = option(256, "completions per forward/backward (memory; does not change the maths)",
                                   bounds=AT_LEAST_ONE)
    share_prompt: bool = option(False, "encode each group's prompt once for its G completions in the training "
                                "passes (KV cache; same values and gradients); mini-batches then shuffle whole "
                                "groups; needs micro-batches of whole groups; not with --gradient-checkpointing "
                                "or --compile")
    reference: str = option("auto", "reference for the KL term or the likelihood scorer: auto (copy, or base "
                            "without adapters for LoRA), copy, lora", choices=("auto", "copy", "lora"))
    env: str | None = option(None, "multi-turn tool use: an environment the model talks to — calculator, python "
                             "(runs its code in the OS sandbox), module:Class or path/file.py:Class (your own code, "
                             "run in-process); tool outputs are in the context but not in the loss "
                             "(docs/methods/tools.md)", python_callable=True)
    max_turns: int = option(4, "--env: most model turns per episode", bounds=AT_LEAST_ONE)
    max_episode_tokens: int = option(128, "--env: most tokens per episode after the prompt (model turns and tool "
                                     "outputs together; --max-new-tokens caps each turn)", bounds=AT_LEAST_ONE)
    warmup_sft_steps: int = option(0, "--env: SFT steps on the environment's tool-call demonstrations before "
                                   "RL (0 = none)", bounds=NON_NEGATIVE)
    warmup_sft_lr: float = option(1e-3, "--env: learning rate of the SFT warm-up", bounds=POSITIVE)
    warmup_sft_batch_size: int = option(32, "--env: demonstrations per SFT warm-up step", bounds=AT_LEAST_ONE)
    lr: float = option(5e-4, "learning rate (AdamW); tuned for the tiny model, as `rlxf demo` — use ~1e-6 for "
                       "real LLMs")
    max_steps: int = option(60, "rollout steps", bounds=AT_LEAST_ONE)
    adam_beta2: float = option(0.99, "AdamW beta2")

    def __post_init__(self):
        super().__post_init__()
        for name in ("preset", "kl_kind", "reference"):
            check_choice(self, name)
        check_choice(self, "policy_loss")
        check_choice(self, "advantage")
        preset = PRESETS[self.preset]
        if self.advantage != "group" and self.beta is None:
            object.__setattr__(self, "beta", 0.0)  # REINFORCE++ keeps its KL in the reward, not in the loss
        resolve_clip_range(self, "eps_low", "eps_high", preset_high=preset["eps_high"])
        for name, value in preset.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.overlong_buffer == -1:
            object.__setattr__(self, "overlong_buffer", max(1, self.max_new_tokens // 4))
        for name in ("advantage_scale", "loss_agg"):
            check_choice(self, name)
        if self.group_size < 2:
            raise ConfigError(f"--group-size must be >= 2 for group-relative advantages, got {self.group_size}")
        if self.overlong_buffer >= self.max_new_tokens:
            raise ConfigError(f"--overlong-buffer must be in [0, max_new_tokens={self.max_new_tokens}) "
                              f"(or -1 for max_new_tokens // 4), got {self.overlong_buffer}")
        if (self.batch_size * self.group_size) % self.mini_batches:
            raise ConfigError(f"--mini-batches {self.mini_batches} must divide batch_size × group_size = "
                              f"{self.batch_size * self.group_size}")
        _check_env(self)
        if self.reference == "lora" and self.lora_r == 0:
            raise ConfigError("--reference lora needs a LoRA run (--lora-r > 0)")
        if self.share_prompt:
            if self.gradient_checkpointing or self.compile:
                raise ConfigError("--share-prompt needs the KV cache, which transformers turns off under "
                                  "--gradient-checkpointing, and is not tested with --compile; drop one of them")
            mini = self.batch_size * self.group_size // self.mini_batches
            if self.micro_batch_size % self.group_size or mini % self.group_size:
                raise ConfigError(f"--share-prompt needs whole groups per micro-batch and mini-batch: "
                                  f"--micro-batch-size {self.micro_batch_size} and the mini-batch size {mini} must "
                                  f"be multiples of --group-size {self.group_size}")

    @property
    def env_label(self) -> str | None:
        """``--env`` as text (a Python class as ``module:Name``), or None."""
        from rlxf.envs import env_label

        return None if self.env is None else env_label(self.env)

    @property
    def needs_reference(self) -> bool:
        return (self.beta > 0 or self.kl_in_reward > 0
                or (self.reward == "likelihood" and self.likelihood_scorer == "reference"))

    @property
    def kl_in_reward(self) -> float:
        """β of the KL term in the reward: ``kl_reward_coef`` under REINFORCE++, else 0."""
        return self.kl_reward_coef if self.advantage != "group" else 0.0


def _check_env(cfg: GRPOConfig) -> None:
    """Before any model loads: the environment loads and has what the options ask of it; the python
    environment needs the OS sandbox (or --unsafe-reward-code)."""
    if cfg.env is None:
        if cfg.warmup_sft_steps:
            raise ConfigError("--warmup-sft-steps trains on an environment's tool-call demonstrations; it needs --env")
        return
    from rlxf.envs import EnvError, get_env
    from rlxf.rewards.base import RewardError

    try:
        factory = get_env(cfg.env, unsafe_code=cfg.unsafe_reward_code)
        if cfg.env == "python":
            factory()   # probes the sandbox boundary
    except (EnvError, RewardError) as err:
        raise ConfigError(str(err)) from err
    target = getattr(factory, "func", factory)   # a functools.partial: its class
    if cfg.warmup_sft_steps and not callable(getattr(target, "demonstration", None)):
        raise ConfigError(f"--warmup-sft-steps: --env {cfg.env_label} has no demonstration(row) method to learn "
                          "the tool-call format from; set --warmup-sft-steps 0 or add the method")


@dataclass(frozen=True)
class DrGRPOConfig(GRPOConfig):
    """``rlxf dr_grpo``: the ``dr_grpo`` preset."""

    preset: str = option("dr_grpo", "named variant that fills unset fields", choices=tuple(PRESETS))


@dataclass(frozen=True)
class DAPOConfig(GRPOConfig):
    """``rlxf dapo``: the ``dapo`` preset."""

    preset: str = option("dapo", "named variant that fills unset fields", choices=tuple(PRESETS))


@dataclass(frozen=True)
class RLOOConfig(GRPOConfig):
    """``rlxf rloo``: the ``rloo`` preset."""

    preset: str = option("rloo", "named variant that fills unset fields", choices=tuple(PRESETS))
