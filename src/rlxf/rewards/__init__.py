"""Reward functions: one contract, a registry, and the built-ins.

A reward function is ``fn(prompts: list[str], completions: list[str], **row_fields) ->
list[float | None]`` (None = no opinion: excluded from statistics, never silently 0). Call them
through :func:`call_reward` (per-sample failure isolation), find them with :func:`get_reward`
(registered name, ``module:function`` or ``path/file.py:function``). See docs/rewards.md.

Modules: ``base`` (contract, safe call), ``registry``, ``verifiable`` (answer checks, format),
``length`` (Kimi length reward, DAPO overlong penalty), ``combine`` (weighted sums),
``likelihood`` (RLPR / VR-CLI / VeriFree), ``reward_model`` (trained scalar RM), ``cooper``
(COOPER's co-trained verifier RM), ``lmgt`` (LMGT judge shifts, d-RLAIF judge scores),
``scoring`` (batching a scorer model), ``sandbox`` (run model-written reward code in a limited
subprocess), ``codecheck`` and ``text2reward`` (Text2Reward: a chat model writes the reward).
"""

from rlxf.rewards.base import RewardError, RewardFn, call_reward, reward_name
from rlxf.rewards.combine import CombinedReward, combine, weighted
from rlxf.rewards.cooper import CooperReward, corrupt_final_answer, pretrain_verify_rm
from rlxf.rewards.length import kimi_length_reward, overlong_penalty
from rlxf.rewards.lmgt import DirectJudgeReward, LMGTReward
from rlxf.rewards.likelihood import (
    LikelihoodReward,
    answer_token_logps,
    rlpr_reward,
    split_reasoning,
    vr_cli_reward,
)
from rlxf.rewards.registry import REWARDS, get_reward, list_rewards, register_reward
from rlxf.rewards.reward_model import RewardModelReward
from rlxf.rewards.sandbox import SandboxedReward, SandboxResult, run_reward_code
from rlxf.rewards.verifiable import exact_match, format_reward, numeric_match, parse_number, task_reward

__all__ = [
    "REWARDS",
    "CombinedReward",
    "CooperReward",
    "DirectJudgeReward",
    "LMGTReward",
    "LikelihoodReward",
    "RewardError",
    "RewardFn",
    "RewardModelReward",
    "SandboxResult",
    "SandboxedReward",
    "answer_token_logps",
    "call_reward",
    "combine",
    "corrupt_final_answer",
    "exact_match",
    "format_reward",
    "get_reward",
    "kimi_length_reward",
    "list_rewards",
    "numeric_match",
    "overlong_penalty",
    "parse_number",
    "pretrain_verify_rm",
    "register_reward",
    "reward_name",
    "run_reward_code",
    "rlpr_reward",
    "split_reasoning",
    "task_reward",
    "vr_cli_reward",
    "weighted",
]
