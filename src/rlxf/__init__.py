"""rlxf: post-train language models with reinforcement learning from any feedback.

Library layout, bottom up (docs/design.md, "Layers"): ``rlxf.tasks``, ``rlxf.runtime``,
``rlxf.sandbox``; ``rlxf.losses`` (pure tensor losses), ``rlxf.data``, ``rlxf.zoo`` (embedded tiny
model); ``rlxf.config``, ``rlxf.models`` (loading, LoRA, reference, log-probs); ``rlxf.reporting``,
``rlxf.rollout`` (engines and decode kernels); ``rlxf.judges``; ``rlxf.rewards``; ``rlxf.configs``
(recipe configs and the registry); ``rlxf.train`` (the loop); ``rlxf.recipes`` (one run each);
``rlxf.workflows`` (commands that chain runs); ``rlxf.serve``; the CLI is ``rlxf`` (``rlxf.cli``).
"""

__version__ = "0.1.0"
