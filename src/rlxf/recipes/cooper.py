"""``rlxf cooper``: GRPO with a co-trained verifier reward model (COOPER, arXiv 2508.05613).

Each step is the GRPO step of :mod:`rlxf.recipes.grpo` with the reward ``cooper``
(:mod:`rlxf.rewards.cooper`): rollouts are scored by σ(VerifyRM(question, reference answer,
completion)). Then, in the loop's stateful-reward hook, the VerifyRM takes one contrastive step
on (first rule-verified rollout of each group, its final answer corrupted) pairs. ``--cooper-update
false`` keeps the RM frozen: this is the static-RM baseline that the paper shows being reward-hacked.

Defaults follow the paper's example script where it gives one (``rollout.n``/lr/length are tiny-model
values, as for ``rlxf grpo``): KL-in-loss with the k3 estimator and ``β = 0.001``. The VerifyRM
pretraining and update rates are the ones measured for the embedded tiny model
(docs/methods/cooper.md). For a real model, use the paper's values: ``--cooper-rm-lr 1e-5``, and
pretrain at about 2e-5 or pass a trained VerifyRM with ``--cooper-rm``.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlxf.configs.cooper import CooperConfig
from rlxf.recipes.grpo import train as grpo_train


def train(cfg: CooperConfig):
    """The GRPO loop under the recipe name ``cooper`` (runs land in runs/cooper by default)."""
    return grpo_train(cfg, recipe="cooper")
