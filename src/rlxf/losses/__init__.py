"""Pure loss functions: tensors in, per-example or per-token losses out (no hidden reduction).

`registry.py` names the policy and preference losses so that a recipe picks one by its config
value. Equations, sources, defaults and the registries: docs/losses.md.
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
from rlxf.losses.policy_variants import cispo_loss, gspo_loss
from rlxf.losses.reinforce_pp import reinforce_pp_advantages, reinforce_pp_returns
from rlxf.losses.preference import (
    RPO_DISTANCES,
    bradley_terry_loss,
    dpo_loss,
    focal_ranking_loss,
    ipo_loss,
    orpo_loss,
    preference_metrics,
    rpo_loss,
    simpo_loss,
)
from rlxf.losses.registry import (
    POLICY_LOSSES,
    PREFERENCE_LOSSES,
    PolicyLossFn,
    PreferenceInputs,
    PreferenceLoss,
    get_policy_loss,
    get_preference_loss,
    policy_clip_fraction,
    policy_loss_defaults,
    policy_loss_names,
    preference_loss_names,
    register_policy_loss,
    register_preference_loss,
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
    "simpo_loss",
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
    # policy_variants.py: GSPO (sequence ratio), CISPO (clipped IS weight), per-token [B, T]
    "cispo_loss",
    "gspo_loss",
    # reinforce_pp.py: REINFORCE++ token returns and advantages, [N, T]
    "reinforce_pp_advantages",
    "reinforce_pp_returns",
    # registry.py: losses by name, one signature per kind
    "POLICY_LOSSES",
    "PREFERENCE_LOSSES",
    "PolicyLossFn",
    "PreferenceInputs",
    "PreferenceLoss",
    "get_policy_loss",
    "get_preference_loss",
    "policy_clip_fraction",
    "policy_loss_defaults",
    "policy_loss_names",
    "preference_loss_names",
    "register_policy_loss",
    "register_preference_loss",
]
