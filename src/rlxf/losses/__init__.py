"""Pure loss functions: tensors in, per-example or per-token losses out (no hidden reduction).

Equations, sources and defaults: docs/losses.md.
"""

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
]
