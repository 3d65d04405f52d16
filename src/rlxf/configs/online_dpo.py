"""Config of ``rlxf online-dpo``: docs/methods/online-dpo.md."""

from __future__ import annotations

from dataclasses import dataclass

from rlxf.config import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, ConfigError, check_choice, option
from rlxf.configs.online import OnlineConfig


@dataclass(frozen=True)
class OnlineDPOConfig(OnlineConfig):
    """Config of ``rlxf online-dpo``: two completions per prompt from the current policy, labelled by the reward."""

    group_size: int = option(2, "completions sampled per prompt: the pair (online DPO samples exactly 2)",
                             bounds=AT_LEAST_ONE)
    beta: float = option(0.1, "β: implicit-reward scale of the DPO loss (TRL's OnlineDPOConfig default)",
                         bounds=POSITIVE)
    dynamic_sampling: bool = option(True, "keep only pairs whose rewards differ (a tie states no preference) and "
                                    "sample more prompts to refill the batch")
    max_sample_batches: int = option(3, "most rollout batches drawn per step to fill the batch with untied pairs",
                                     bounds=AT_LEAST_ONE)
    reference: str = option("auto", "reference model: auto (copy, or base without adapters for LoRA), copy, lora",
                            choices=("auto", "copy", "lora"))
    lr: float = option(1e-4, "learning rate (AdamW); tuned for the tiny model — real LLMs want ~5e-7")
    max_steps: int = option(60, "rollout steps (one DPO update each)", bounds=AT_LEAST_ONE)
    adam_beta2: float = option(0.99, "AdamW beta2")
    overlong_buffer: int = option(0, "DAPO overlong shaping of the reward: penalise the last N tokens before "
                                  "max_new_tokens (0 = off)", bounds=NON_NEGATIVE)
    overlong_factor: float = option(1.0, "DAPO overlong penalty at max_new_tokens", bounds=NON_NEGATIVE)

    def __post_init__(self):
        super().__post_init__()
        check_choice(self, "reference")
        if self.group_size != 2:
            raise ConfigError(f"--group-size must be 2 for online DPO (one pair per prompt), got {self.group_size}")
        if self.judge and self.reward not in ("d_rlaif", "lmgt"):
            raise ConfigError(f"--judge labels pairs through a judge reward: pass --reward d_rlaif (the judge rates "
                              f"each completion; the higher one is chosen), not --reward {self.reward_label}")
        if self.overlong_buffer >= self.max_new_tokens:
            raise ConfigError(f"--overlong-buffer must be < max_new_tokens={self.max_new_tokens}")
        if self.reference == "lora" and self.lora_r == 0:
            raise ConfigError("--reference lora needs a LoRA run (--lora-r > 0)")
