"""Workflows: commands that orchestrate several runs or build data for them, on top of the single
recipes of :mod:`rlxf.recipes`.

- :mod:`rlxf.workflows.compare`: ``rlxf compare``, several configs on one budget and seed, one report;
- :mod:`rlxf.workflows.long2short`: ``rlxf long2short-data``, Kimi long2short SFT data and DPO pairs
  from a model's own samples;
- :mod:`rlxf.workflows.cai`: ``rlxf cai-sft``, Constitutional AI's critique → revision → SFT;
- :mod:`rlxf.workflows.rlaif`: ``rlxf rlaif``, AI-judge preference labels, then an RM or DPO/RPO;
- :mod:`rlxf.workflows.ai_feedback`: what ``cai-sft`` and ``rlaif`` share;
- :mod:`rlxf.workflows.cool_rlhf`: ``rlxf cool-rlhf``, a conditional RM and online rounds of
  labelling, hacking checks, RM patches and RL.

A workflow runs a recipe through the registry (:mod:`rlxf.configs.registry`) or its ``train``
function; recipes never import workflows.
"""
