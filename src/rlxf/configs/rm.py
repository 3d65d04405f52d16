"""Config of ``rlxf rm``: docs/methods/reward-model.md."""

from __future__ import annotations

from dataclasses import dataclass

from rlxf.config import NON_NEGATIVE, POSITIVE, check_choice, option
from rlxf.configs.base import TrainConfig


@dataclass(frozen=True)
class RewardModelConfig(TrainConfig):
    """Config of ``rlxf rm``."""

    loss: str = option("bt", "bt = Bradley-Terry; focal = COOL-RLHF focal ranking + log-barrier",
                       choices=("bt", "focal"))
    use_margin: bool = option(True, "subtract the dataset's per-pair 'margin' inside the BT sigmoid when present")
    soft_labels: bool = option(True, "train on the dataset's per-pair 'chosen_probability' (soft label, e.g. "
                               "from rlxf rlaif) with the soft-label BT loss when present; pairs without one "
                               "count as p = 1")
    center_coef: float = option(0.0, "reward centering η (Eisenstein et al.; TRL recommends 0.01)", bounds=NON_NEGATIVE)
    focal_gamma: float = option(2.0, "focal loss γ", bounds=NON_NEGATIVE)
    barrier_weight: float = option(0.01, "focal loss log-barrier weight λ (xtuner default)", bounds=NON_NEGATIVE)
    barrier_bound: float = option(5.0, "log-barrier keeps scores inside (−bound, bound)", bounds=POSITIVE)
    conditions: str | None = option(None, "conditional RM (COOL-RLHF): 'default' (built-in task conditions) or "
                                    "a YAML file of domain: condition text; each prompt becomes condition + "
                                    "prompt (domain: the row's 'domain' field, else the task name)")
    lr: float = option(5e-4, "peak learning rate (AdamW); tuned for the tiny model — use ~1e-5 for real LLMs")
    max_steps: int = option(150, "optimizer steps; 0 = derive from epochs")

    def __post_init__(self):
        super().__post_init__()
        check_choice(self, "loss")
