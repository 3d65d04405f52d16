"""Config of ``rlxf ppo``: docs/methods/ppo.md."""

from __future__ import annotations

from dataclasses import dataclass

from rlxf.config import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, UNIT, ConfigError, between, check_choice, option
from rlxf.configs.online import OnlineConfig, resolve_clip_range
from rlxf.configs.choices import KL_KINDS, POLICY_LOSSES


VALUE_MODELS = ("reward_model", "policy", "head")


@dataclass(frozen=True)
class PPOConfig(OnlineConfig):
    """Config of ``rlxf ppo`` (defaults: TRL's PPO where it has one, scaled for the tiny model)."""

    reward: str = option("reward_model", "reward: reward_model (needs --reward-model) or any reward spec "
                         "(verifiable, likelihood, module:function, ...; in Python, also the function itself)",
                         python_callable=True)
    group_size: int = option(1, "completions sampled per prompt")
    batch_size: int = option(64, "prompts per rollout step")
    value_model: str = option("reward_model", "critic: a copy of the reward model's body+head, a copy of the "
                              "policy checkpoint with a new head, or a head on the policy's own body",
                              choices=VALUE_MODELS)
    kl_coef: float = option(0.05, "β of the per-token KL penalty in the reward (initial value if adaptive)",
                            bounds=NON_NEGATIVE)
    kl_kind: str = option("k1", "KL estimator in the reward", choices=KL_KINDS)
    kl_target: float = option(0.0, "adaptive KL controller target (summed KL per sequence); 0 = fixed β",
                              bounds=NON_NEGATIVE)
    kl_horizon: float = option(10000.0, "adaptive KL controller horizon (samples)", bounds=POSITIVE)
    gamma: float = option(1.0, "discount γ", bounds=UNIT)
    lam: float = option(0.95, "GAE λ", bounds=UNIT)
    policy_loss: str = option("clipped", "per-token policy loss, by its registered name (docs/losses.md)",
                              choices=POLICY_LOSSES)
    eps: float | None = option(None, "policy clip range ε below 1: ρ ≥ 1 − ε, and above unless --eps-high (None = "
                               "the policy loss's default: clipped 0.2, gspo 3e-4, cispo 1 = no lower bound)",
                               bounds=between(0, 1))
    eps_high: float | None = option(None, "clip range above 1: ρ ≤ 1 + eps_high (None = ε for clipped; gspo 4e-4, "
                                    "cispo 4)", bounds=NON_NEGATIVE)
    value_clip: float = option(0.2, "value clip range ε_v (0 = unclipped)", bounds=NON_NEGATIVE)
    vf_coef: float = option(0.1, "value loss coefficient c_v", bounds=NON_NEGATIVE)
    whiten_advantages: bool = option(True, "whiten advantages over valid tokens of the batch")
    missing_eos_penalty: float = option(1.0, "subtract this from the score of completions without EOS (0 = off)",
                                        bounds=NON_NEGATIVE)
    ppo_epochs: int = option(4, "passes over each rollout batch", bounds=AT_LEAST_ONE)
    mini_batches: int = option(4, "optimizer steps per pass", bounds=AT_LEAST_ONE)
    value_lr: float = option(0.0, "critic learning rate (0 = same as --lr)", bounds=NON_NEGATIVE)
    reference: str = option("auto", "reference for the KL: auto (copy, or base without adapters for LoRA), "
                            "copy, lora", choices=("auto", "copy", "lora"))
    lr: float = option(3e-5, "policy learning rate (AdamW); tuned for the tiny model — TRL uses 3e-6")
    max_steps: int = option(40, "rollout steps", bounds=AT_LEAST_ONE)
    temperature: float = option(0.7, "sampling temperature (TRL's PPO default; log-probs use it too)")

    def __post_init__(self):
        super().__post_init__()
        for name in ("value_model", "kl_kind", "reference", "policy_loss"):
            check_choice(self, name)
        resolve_clip_range(self, "eps", "eps_high")
        if self.value_model == "reward_model" and not self.reward_model:
            raise ConfigError("--value-model reward_model initialises the critic from --reward-model DIR; "
                              "pass it, or use --value-model policy / head")
        if (self.batch_size * self.group_size) % self.mini_batches:
            raise ConfigError(f"--mini-batches {self.mini_batches} must divide batch_size × group_size = "
                              f"{self.batch_size * self.group_size}")
        if self.reference == "lora" and self.lora_r == 0:
            raise ConfigError("--reference lora needs a LoRA run (--lora-r > 0)")
