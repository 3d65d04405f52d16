"""Config of ``rlxf sft``: docs/methods/sft.md."""

from __future__ import annotations

from dataclasses import dataclass

from rlxf.config import UNIT, option
from rlxf.configs.base import TrainConfig


@dataclass(frozen=True)
class SFTConfig(TrainConfig):
    """Config of ``rlxf sft``."""

    lr: float = option(1e-3, "peak learning rate (AdamW); tuned for the tiny model — use ~1e-5 for real LLMs")
    max_steps: int = option(200, "optimizer steps; 0 = derive from epochs")
    verbose_fraction: float = option(0.0, "built-in task data: share of completions written in the verbose style "
                                     "(e.g. 0.5 makes an SFT policy that PPO against a conciseness-aware RM "
                                     "can improve)", bounds=UNIT)
