"""rlxf: post-train language models with reinforcement learning from any feedback.

Library layout (DESIGN.md): ``rlxf.losses`` (pure tensor losses), ``rlxf.models`` (loading, LoRA,
reference, log-probs), ``rlxf.data``, ``rlxf.tasks``, ``rlxf.zoo`` (embedded tiny model),
``rlxf.recipes`` (training loops), ``rlxf.reporting``, ``rlxf.runtime``; the CLI is ``rlxf``.
"""

__version__ = "0.1.0"
