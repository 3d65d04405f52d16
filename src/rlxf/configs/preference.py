"""Configs of ``rlxf dpo`` (DPO, IPO, cDPO, DPO+NLL), ``rlxf rpo`` and ``rlxf orpo``: docs/methods/dpo.md."""

from __future__ import annotations

from dataclasses import dataclass

from rlxf.config import NON_NEGATIVE, POSITIVE, ConfigError, between, check_choice, option
from rlxf.configs.base import TrainConfig
from rlxf.configs.choices import PREFERENCE_LOSSES as LOSSES
from rlxf.configs.choices import RPO_DISTANCES


@dataclass(frozen=True)
class PreferenceConfig(TrainConfig):
    """Config of the preference recipe (``rlxf dpo``; ``rpo`` and ``orpo`` change the loss default)."""

    loss: str = option("dpo", "objective", choices=LOSSES)
    beta: float | None = option(None, "β: implicit-reward scale (DPO/cDPO/RPO/SimPO); τ for IPO (None = the loss's "
                                "default: 0.1, SimPO 2.0)", bounds=POSITIVE)
    simpo_gamma: float | None = option(None, "SimPO target reward margin γ (None = the loss's default, 1.0)",
                                       bounds=NON_NEGATIVE)
    label_smoothing: float = option(0.1, "cDPO label-flip probability ε (loss=cdpo only)",
                                    bounds=between(0, 0.5, high_open=True))
    nll_alpha: float = option(0.0, "DPO+NLL (Pang et al. 2024): weight of the length-normalised chosen NLL",
                              bounds=NON_NEGATIVE)
    rpo_eta: float = option(1.0, "RPO η: scale of the reward gap", bounds=POSITIVE)
    rpo_distance: str = option("bwd_kl", "RPO distance between model and target preference", choices=RPO_DISTANCES)
    orpo_lambda: float = option(0.1, "ORPO λ: weight of the odds-ratio term", bounds=NON_NEGATIVE)
    length_norm: bool = option(False, "use mean instead of summed token log-probs (TRL's IPO; NeMo's average)")
    reference: str = option("auto", "reference model: auto (copy, or base-without-adapters for LoRA), copy, lora",
                            choices=("auto", "copy", "lora"))
    precompute_ref: bool = option(True, "compute reference log-probs once before training and cache them")
    share_prompt: bool = option(False, "encode each pair's prompt once for chosen and rejected (through a KV "
                                "cache; same values and gradients); not with --gradient-checkpointing or --compile")
    lr: float = option(2e-4, "peak learning rate (AdamW); tuned for the tiny model — use ~5e-7 for real LLMs")
    max_steps: int = option(150, "optimizer steps; 0 = derive from epochs")

    def __post_init__(self):
        super().__post_init__()
        for name in ("loss", "rpo_distance", "reference"):
            check_choice(self, name)
        if self.loss == "cdpo" and self.label_smoothing == 0:
            raise ConfigError(f"--label-smoothing for cdpo must be in (0, 0.5), got {self.label_smoothing}")
        from rlxf.losses import get_preference_loss  # torch: only when a config is built

        entry = get_preference_loss(self.loss)
        for name, value in {"beta": 0.1, **entry.option_defaults()}.items():
            if getattr(self, name, 0) is None:
                object.__setattr__(self, name, value)
        if entry.includes_nll and self.nll_alpha > 0:
            flags = ", ".join(f"--{option.replace('_', '-')}" for _, option in entry.options)
            raise ConfigError(f"--nll-alpha does not apply to {self.loss} (its NLL term is built in; weight the "
                              f"other terms with {flags})")
        if self.reference == "lora" and self.lora_r == 0:
            raise ConfigError("--reference lora needs a LoRA run (--lora-r > 0)")
        if self.share_prompt and (self.gradient_checkpointing or self.compile):
            raise ConfigError("--share-prompt needs the KV cache, which transformers turns off under "
                              "--gradient-checkpointing, and is not tested with --compile; drop one of them")


@dataclass(frozen=True)
class RPOConfig(PreferenceConfig):
    """``rlxf rpo``: NVIDIA's reward-aware preference optimisation (needs chosen/rejected scores)."""

    loss: str = option("rpo", "objective", choices=LOSSES)
    beta: float = option(0.2, "β: implicit-reward scale (NeMo-Aligner default 0.2)")


@dataclass(frozen=True)
class ORPOConfig(PreferenceConfig):
    """``rlxf orpo``: odds-ratio preference optimisation, reference-free."""

    loss: str = option("orpo", "objective", choices=LOSSES)
