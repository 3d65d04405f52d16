"""Rollouts: the :class:`RolloutEngine` protocol, :class:`SamplingParams`, :class:`Rollouts`, and
:class:`HFEngine`, the reference engine for any transformers causal LM, and :class:`StaticEngine`, the
fast engine (static KV cache, CUDA-graph decode) for Llama/Qwen2/Qwen3/Mistral shapes.

Recipes sample only through ``engine.generate(prompt_ids, params) -> Rollouts``, so a faster
engine drops in without touching them. Shapes and the log-prob convention: docs/rollout.md.
Both engines check prompts, sample on the host, stop and assemble through :mod:`rlxf.rollout.sampling`;
:mod:`rlxf.rollout.kernels` holds ``StaticEngine``'s Triton decode kernels.
"""

from rlxf.rollout.hf_engine import HFEngine
from rlxf.rollout.static_engine import StaticEngine
from rlxf.rollout.types import FINISH_REASONS, RolloutEngine, Rollouts, SamplingParams

__all__ = ["FINISH_REASONS", "HFEngine", "RolloutEngine", "Rollouts", "SamplingParams", "StaticEngine"]
