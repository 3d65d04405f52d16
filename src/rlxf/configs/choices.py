"""Names the configs choose from, importable without torch (``rlxf <recipe> --help`` stays fast).

The loss registries (:mod:`rlxf.losses.registry`) register exactly the built-in names listed here;
a test checks that they agree."""

KL_KINDS = ("k1", "k2", "k3")
AGGREGATION_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
ADVANTAGE_SCALES = ("group", "batch", "none")
ADVANTAGE_ESTIMATORS = ("group", "reinforce_pp", "reinforce_pp_baseline")  # the GRPO family's --advantage
RPO_DISTANCES = ("bwd_kl", "fwd_kl", "sq")
POLICY_LOSSES = ("clipped", "gspo", "gspo_token", "cispo")
PREFERENCE_LOSSES = ("dpo", "ipo", "cdpo", "rpo", "orpo", "simpo")
COOPER_NEGATIVES = ("slip", "mixed")  # negatives of the VerifyRM update: rlxf.rewards.cooper
ADAPTER_MODES = ("fold", "lowrank")  # how rlxf.rollout.StaticEngine serves a LoRA policy: rlxf.rollout.folding
