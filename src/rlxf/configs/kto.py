"""Config of ``rlxf kto``: docs/methods/kto.md."""

from __future__ import annotations

from dataclasses import dataclass

from rlxf.config import NON_NEGATIVE, POSITIVE, ConfigError, check_choice, option
from rlxf.configs.base import TrainConfig


@dataclass(frozen=True)
class KTOConfig(TrainConfig):
    """Config of ``rlxf kto`` (defaults: the KTO paper's and TRL's, lr tuned for the tiny model)."""

    beta: float = option(0.1, "β: scale of the implicit reward log π/π_ref inside the value function",
                         bounds=POSITIVE)
    desirable_weight: float = option(1.0, "λ_D: weight of desirable (thumbs-up) examples; the paper wants "
                                     "λ_D·n_D / (λ_U·n_U) in [1, 4/3]", bounds=NON_NEGATIVE)
    undesirable_weight: float = option(1.0, "λ_U: weight of undesirable (thumbs-down) examples",
                                       bounds=NON_NEGATIVE)
    reference: str = option("auto", "reference model: auto (copy, or base-without-adapters for LoRA), copy, lora",
                            choices=("auto", "copy", "lora"))
    lr: float = option(2e-4, "peak learning rate (AdamW); tuned for the tiny model — use ~5e-7 for real LLMs")
    max_steps: int = option(150, "optimizer steps; 0 = derive from epochs")

    def __post_init__(self):
        super().__post_init__()
        check_choice(self, "reference")
        if self.batch_size < 2:
            raise ConfigError("--batch-size must be >= 2 for KTO: the KL reference point pairs each prompt with "
                              "another example's completion in the same batch")
        if self.desirable_weight == 0 and self.undesirable_weight == 0:
            raise ConfigError("--desirable-weight and --undesirable-weight are both 0: nothing would be learned")
        if self.reference == "lora" and self.lora_r == 0:
            raise ConfigError("--reference lora needs a LoRA run (--lora-r > 0)")
