"""Rollouts: the :class:`RolloutEngine` protocol, :class:`SamplingParams`, :class:`Rollouts`, and
:class:`HFEngine`, the reference engine for any transformers causal LM.

Recipes sample only through ``engine.generate(prompt_ids, params) -> Rollouts``, so a faster
engine drops in without touching them. Shapes and the log-prob convention: docs/rollout.md.
"""

from rlxf.rollout.hf_engine import HFEngine
from rlxf.rollout.types import FINISH_REASONS, RolloutEngine, Rollouts, SamplingParams

__all__ = ["FINISH_REASONS", "HFEngine", "RolloutEngine", "Rollouts", "SamplingParams"]
