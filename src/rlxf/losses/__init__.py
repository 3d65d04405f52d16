"""Pure loss functions: tensors in, per-example or per-token losses out (no hidden reduction).

Equations, sources and defaults: docs/losses.md.
"""

from rlxf.losses.policy import (
    ADVANTAGE_SCALES,
    AGGREGATION_MODES,
    KL_KINDS,
    AdaptiveKLController,
    FixedKLController,
    aggregate,
    clip_fraction,
    clipped_policy_loss,
    gae,
    group_advantages,
    kl_penalty,
    masked_whiten,
    value_loss,
)
from rlxf.losses.preference import (
    RPO_DISTANCES,
    bradley_terry_loss,
    dpo_loss,
    focal_ranking_loss,
    ipo_loss,
    orpo_loss,
    preference_metrics,
    rpo_loss,
)

__all__ = [
    # preference.py: one value per preference pair, [B]
    "RPO_DISTANCES",
    "bradley_terry_loss",
    "dpo_loss",
    "focal_ranking_loss",
    "ipo_loss",
    "orpo_loss",
    "preference_metrics",
    "rpo_loss",
    # policy.py: per-token [B, T] losses, aggregation, advantages, KL control
    "ADVANTAGE_SCALES",
    "AGGREGATION_MODES",
    "KL_KINDS",
    "AdaptiveKLController",
    "FixedKLController",
    "aggregate",
    "clip_fraction",
    "clipped_policy_loss",
    "gae",
    "group_advantages",
    "kl_penalty",
    "masked_whiten",
    "value_loss",
]
