"""rlxf policy-gradient pieces give the same numbers as TRL's GRPO and RLOO trainers.

TRL computes advantages inside `_generate_and_score_completions` and the loss inside `_compute_loss`.
Each test calls those methods unbound, on a stand-in object that carries only the attributes the
method reads: generation and reward functions are replaced by stubs that return the rewards and
token log-probs we choose, so no model, tokenizer or dataset is built. If a TRL release renames
those attributes, the stand-ins below are the one place to update.

TRL 1.16 has no PPO trainer (GAE, whitening, value loss and adaptive KL are tested against float64
references in test_losses_policy.py). Where rlxf deliberately differs from TRL (docs/losses.md),
a test pins the difference down.
"""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from packaging.version import Version

from rlxf.losses import (aggregate, cispo_loss, clip_fraction, clipped_policy_loss, group_advantages, gspo_loss,
                         kl_penalty, policy_clip_fraction)

trl = pytest.importorskip("trl")
if Version(trl.__version__) < Version("1.16"):
    pytest.skip(f"stand-ins mirror TRL >= 1.16 internals; installed TRL is {trl.__version__}", allow_module_level=True)
trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
trl_rloo = pytest.importorskip("trl.trainer.rloo_trainer")

AGGREGATION_OF = {  # TRL loss_type → rlxf aggregation mode
    "grpo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dapo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
}
MAX_COMPLETION_LENGTH = 9


def fake_accelerator():
    return SimpleNamespace(
        device=torch.device("cpu"),
        process_index=0,
        num_processes=1,
        gather=lambda x: x,
        gather_for_metrics=lambda x: x,
        reduce=lambda x, reduction="sum": x,
    )


def metrics_store():
    return {"train": defaultdict(list), "eval": defaultdict(list)}


def last_metrics(trainer):
    return {name: values[-1] for name, values in trainer._metrics["eval"].items()}


# ---------------------------------------------------------------------------------------------
# Advantages: GRPOTrainer / RLOOTrainer._generate_and_score_completions
# ---------------------------------------------------------------------------------------------


def scoring_stand_in(rewards, group_size, **attributes):
    """Attributes both trainers read while scoring; generation returns one token per completion."""
    n = rewards.shape[0]
    return SimpleNamespace(
        accelerator=fake_accelerator(),
        model=SimpleNamespace(training=False, is_gradient_checkpointing=False),  # eval: no accumulation
        args=SimpleNamespace(
            per_device_train_batch_size=n,
            per_device_eval_batch_size=n,
            gradient_checkpointing_kwargs=None,
            steps_per_generation=1,
            gradient_accumulation_steps=1,
        ),
        _tokenizer=SimpleNamespace(pad_token_id=0),
        pad_to_multiple_of=None,
        mask_truncated_completions=False,
        num_generations=group_size,
        num_generations_eval=group_size,
        beta=0.0,
        use_vllm=False,
        reward_weights=torch.ones(1, dtype=rewards.dtype),
        reward_func_names=["stub"],
        _calculate_rewards=lambda inputs, prompts, completions, completion_ids: rewards[:, None],  # [N, 1]
        _metrics=metrics_store(),
        _logs={
            "prompt": [],
            "completion": [],
            "rewards": defaultdict(list),
            "advantages": [],
            "extra": defaultdict(list),
        },
        _pending_extra_logs={},
        _pending_metrics={},
        log_multimodal=False,
        **attributes,
    )


def trl_grpo_advantages(rewards, group_size, scale_rewards):
    n = rewards.shape[0]
    trainer = scoring_stand_in(
        rewards,
        group_size,
        scale_rewards=scale_rewards,
        num_iterations=1,
        multi_objective_aggregation="sum_then_normalize",
        environment_factories=None,
        environments=None,
        tools=None,
        _generate=lambda prompts: ([[1]] * n, [[2]] * n, None, ["x"] * n, None, {}, None, None),
    )
    inputs = [{"prompt": f"p{i // group_size}"} for i in range(n)]
    return trl_grpo.GRPOTrainer._generate_and_score_completions(trainer, inputs)["advantages"]


def trl_rloo_advantages(rewards, group_size, normalize_advantages=False):
    n = rewards.shape[0]
    trainer = scoring_stand_in(
        rewards,
        group_size,
        normalize_advantages=normalize_advantages,
        reward_clip_range=None,
        _generate=lambda prompts: ([[1]] * n, [[2]] * n, ["x"] * n),
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (torch.zeros(n, 1), None, None),
    )
    inputs = [{"prompt": f"p{i // group_size}"} for i in range(n)]
    return trl_rloo.RLOOTrainer._generate_and_score_completions(trainer, inputs)["advantages"]


def random_rewards(seed, group_size, num_groups):
    """Float64 rewards: a mix of pass/fail groups (one all-pass) and continuous scores."""
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randint(0, 2, (group_size * num_groups,), generator=g).double()
    rewards[:group_size] = 1.0  # a group with zero spread
    rewards[-group_size:] = torch.randn(group_size, generator=g, dtype=torch.float64)
    return rewards


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("group_size", [2, 4, 8])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_trl_grpo_scale_rewards(seed, group_size, scale):
    rewards = random_rewards(seed, group_size, 4)
    theirs = trl_grpo_advantages(rewards, group_size, scale)
    ours = group_advantages(rewards, group_size, scale=scale)
    # TRL's `nanstd` forms its Bessel factor count / (count − 1) from integer counts, which PyTorch
    # divides in float32: the std is off by up to ~6e-8 relative even for float64 rewards.
    tolerance = 1e-12 if scale == "none" else 1e-7
    torch.testing.assert_close(ours, theirs, rtol=tolerance, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("group_size", [2, 4])
def test_leave_one_out_matches_trl_rloo(seed, group_size):
    rewards = random_rewards(seed, group_size, 3)
    theirs = trl_rloo_advantages(rewards, group_size)
    ours = group_advantages(rewards, group_size, scale="none", leave_one_out=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_trl_rloo_normalize_advantages_is_not_rlxf_batch_scale():
    # TRL whitens the leave-one-out advantages over the batch (÷ their own std); rlxf "batch" divides
    # by the std of the rewards. The LOO advantages already have mean 0, so only the divisor differs.
    rewards = random_rewards(4, 4, 3)
    theirs = trl_rloo_advantages(rewards, 4, normalize_advantages=True)
    loo = group_advantages(rewards, 4, scale="none", leave_one_out=True)
    torch.testing.assert_close(theirs, loo / (loo.std() + 1e-4), rtol=1e-7, atol=1e-12)  # float32 Bessel factor
    assert not torch.allclose(theirs, group_advantages(rewards, 4, scale="batch", leave_one_out=True))


def test_singleton_groups_give_zero_advantages_like_trl():
    rewards = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    for scale in ("group", "batch", "none"):
        torch.testing.assert_close(trl_grpo_advantages(rewards, 1, scale), group_advantages(rewards, 1, scale=scale))
    torch.testing.assert_close(trl_rloo_advantages(rewards, 1), group_advantages(rewards, 1, leave_one_out=True))


# ---------------------------------------------------------------------------------------------
# Per-token loss and aggregation: GRPOTrainer._compute_loss
# ---------------------------------------------------------------------------------------------


def trl_grpo_loss(logps, old_logps, advantages, mask, *, loss_type, beta=0.0, ref_logps=None, eps=(0.2, 0.2),
                  tool_mask=None, level="token"):
    """TRL's GRPO loss on given token log-probs (eval mode: no gradient-accumulation scaling);
    ``tool_mask``: TRL's mask of tool-output tokens (0) in multi-turn completions."""
    batch, length = logps.shape

    def per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, **kwargs):
        assert logits_to_keep == length
        return logps, torch.zeros_like(logps.detach()), None

    trainer = SimpleNamespace(
        model=SimpleNamespace(training=False),
        accelerator=fake_accelerator(),
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None),
        _get_per_token_logps_and_entropies=per_token_logps_and_entropies,
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=level,
        loss_type=loss_type,
        epsilon_low=eps[0],
        epsilon_high=eps[1],
        beta=beta,
        use_vllm=False,
        max_completion_length=MAX_COMPLETION_LENGTH,
        _entropy_bonus_enabled=False,
        _metrics=metrics_store(),
    )
    mask = mask.long()
    inputs = {
        "prompt_ids": torch.ones(batch, 2, dtype=torch.long),
        "prompt_mask": torch.ones(batch, 2, dtype=torch.long),
        "completion_ids": torch.ones(batch, length, dtype=torch.long),
        "completion_mask": mask,
        "advantages": advantages,
        "old_per_token_logps": old_logps,
        "num_items_in_batch": mask.sum() if tool_mask is None else (mask * tool_mask.long()).sum(),
    }
    if tool_mask is not None:
        inputs["tool_mask"] = tool_mask.long()
    if ref_logps is not None:
        inputs["ref_per_token_logps"] = ref_logps
    loss = trl_grpo.GRPOTrainer._compute_loss(trainer, None, inputs)
    return loss, last_metrics(trainer)


def ours_grpo_loss(logps, old_logps, advantages, mask, *, loss_type, beta=0.0, ref_logps=None, eps=(0.2, 0.2)):
    per_token = clipped_policy_loss(logps, old_logps, advantages, eps_low=eps[0], eps_high=eps[1])
    if beta:
        per_token = per_token + beta * kl_penalty(logps, ref_logps, kind="k3")
    return aggregate(per_token, mask, mode=AGGREGATION_OF[loss_type], max_len=MAX_COMPLETION_LENGTH)


def random_batch(seed, batch=6, length=7):
    """Token log-probs [B, T] float64 (policy moved ~0.3 nats from old, ~0.5 from ref), advantages [B],
    right-padded mask with every row non-empty."""
    g = torch.Generator().manual_seed(seed)
    old = -3 * torch.rand(batch, length, generator=g, dtype=torch.float64)
    logps = old + 0.3 * torch.randn(batch, length, generator=g, dtype=torch.float64)
    ref = old + 0.5 * torch.randn(batch, length, generator=g, dtype=torch.float64)
    advantages = torch.randn(batch, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    return logps, old, ref, advantages, mask


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("loss_type", list(AGGREGATION_OF))
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("eps", [(0.2, 0.2), (0.2, 0.28)])
def test_grpo_loss_matches_trl_in_value_and_gradient(seed, loss_type, beta, eps):
    logps, old, ref, advantages, mask = random_batch(seed)
    kwargs = dict(loss_type=loss_type, beta=beta, ref_logps=ref, eps=eps)
    ours_leaf, theirs_leaf = logps.clone().requires_grad_(True), logps.clone().requires_grad_(True)
    ours = ours_grpo_loss(ours_leaf, old, advantages, mask, **kwargs)
    theirs, _ = trl_grpo_loss(theirs_leaf, old, advantages, mask, **kwargs)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours_leaf.grad, theirs_leaf.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_per_token_advantages_match_trl(seed):
    logps, old, _, _, mask = random_batch(seed)
    advantages = torch.randn(logps.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    theirs, _ = trl_grpo_loss(logps, old, advantages, mask, loss_type="dapo")
    torch.testing.assert_close(ours_grpo_loss(logps, old, advantages, mask, loss_type="dapo"), theirs)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clip_fraction_and_kl_match_trl_metrics(seed):
    logps, old, ref, advantages, mask = random_batch(seed)
    kwargs = dict(loss_type="dapo", beta=0.04, ref_logps=ref, eps=(0.2, 0.28))
    _, metrics = trl_grpo_loss(logps, old, advantages, mask, **kwargs)
    ours_clip = clip_fraction(logps, old, advantages, mask, eps_low=0.2, eps_high=0.28)
    assert ours_clip == pytest.approx(metrics["clip_ratio/region_mean"], abs=1e-7)  # TRL counts in float32
    assert ours_clip > 0  # the case actually exercises clipping
    ours_kl = aggregate(kl_penalty(logps, ref, kind="k3"), mask, mode="token-mean")
    assert ours_kl.item() == pytest.approx(metrics["kl"], rel=1e-12)


def assert_same_value_and_gradient(ours_fn, theirs_fn, logps):
    ours_leaf, theirs_leaf = logps.clone().requires_grad_(True), logps.clone().requires_grad_(True)
    ours, theirs = ours_fn(ours_leaf), theirs_fn(theirs_leaf)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours_leaf.grad, theirs_leaf.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("eps", [(3e-4, 4e-4), (0.2, 0.28)])
# GSPO-token with per-token advantages has a different gradient from GSPO's by design: not a parity case
@pytest.mark.parametrize("token_level, per_token_advantages", [(False, False), (True, False), (False, True)])
def test_gspo_matches_trl_sequence_level_importance_sampling(seed, eps, token_level, per_token_advantages):
    # TRL: importance_sampling_level="sequence" with loss_type "grpo" (its mean over sequences); GSPO-token
    # has the same value, and the same gradient for one advantage per sequence
    logps, old, _, advantages, mask = random_batch(seed)
    old = logps - 0.02 * (logps - old)  # sequence ratios near 1, so that both branches of the clip occur
    if per_token_advantages:
        advantages = torch.randn(logps.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    assert_same_value_and_gradient(
        lambda x: aggregate(gspo_loss(x, old, advantages, mask, eps_low=eps[0], eps_high=eps[1],
                                      token_level=token_level), mask, mode="seq-mean-token-mean"),
        lambda x: trl_grpo_loss(x, old, advantages, mask, loss_type="grpo", eps=eps, level="sequence")[0],
        logps)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gspo_clip_fraction_matches_trl_on_equal_lengths(seed):
    # TRL's sequence-level region mean counts sequences, rlxf's counts tokens: equal when all lengths are
    logps, old, _, advantages, mask = random_batch(seed, batch=32)
    old = logps - 0.002 * (logps - old)
    mask = torch.ones_like(mask)
    _, metrics = trl_grpo_loss(logps, old, advantages, mask, loss_type="grpo", eps=(3e-4, 4e-4), level="sequence")
    ours = policy_clip_fraction("gspo")(logps, old, advantages, mask, eps_low=3e-4, eps_high=4e-4)
    assert ours == pytest.approx(metrics["clip_ratio/region_mean"], abs=1e-7)
    assert 0 < ours < 1


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("eps_high", [4.0, 0.28])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_cispo_matches_trl(seed, eps_high, beta):
    # TRL clamps the weight at epsilon_high itself and has no lower bound: rlxf's eps_low = 1 and 1 + eps_high
    logps, old, ref, advantages, mask = random_batch(seed)
    old = old - 0.5 * torch.rand(old.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def ours(x):
        per_token = cispo_loss(x, old, advantages, mask, eps_low=1.0, eps_high=eps_high)
        if beta:
            per_token = per_token + beta * kl_penalty(x, ref, kind="k3")
        return aggregate(per_token, mask, mode="token-mean")

    assert_same_value_and_gradient(
        ours, lambda x: trl_grpo_loss(x, old, advantages, mask, loss_type="cispo", beta=beta, ref_logps=ref,
                                      eps=(0.2, 1.0 + eps_high))[0], logps)


# ---------------------------------------------------------------------------------------------
# Deliberate differences, pinned
# ---------------------------------------------------------------------------------------------


def test_empty_sequence_counts_in_trl_grpo_but_not_in_rlxf():
    # A fully masked row (e.g. a truncated completion with mask_truncated_completions): TRL's "grpo"
    # still divides by all B rows; rlxf (like verl) averages over the rows that have tokens.
    logps, old, _, advantages, mask = random_batch(3)
    mask = mask.clone()
    mask[2] = False
    theirs, _ = trl_grpo_loss(logps, old, advantages, mask, loss_type="grpo")
    ours = ours_grpo_loss(logps, old, advantages, mask, loss_type="grpo")
    batch = mask.shape[0]
    torch.testing.assert_close(ours, theirs * batch / (batch - 1), rtol=1e-12, atol=1e-12)
    # the token-level and Dr. GRPO normalisers agree with TRL with an empty row too
    for loss_type in ("dapo", "bnpo", "dr_grpo"):
        theirs, _ = trl_grpo_loss(logps, old, advantages, mask, loss_type=loss_type)
        torch.testing.assert_close(ours_grpo_loss(logps, old, advantages, mask, loss_type=loss_type), theirs)


def test_log_ratio_clamp_differs_from_trl_only_beyond_20_nats():
    # Â < 0 and log ρ = 25: the unclipped branch wins; TRL uses e^25, rlxf clamps the log-ratio at 20
    old = torch.zeros(1, 2, dtype=torch.float64)
    logps = torch.tensor([[25.0, 19.0]], dtype=torch.float64)
    advantages = torch.tensor([-1.0], dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    theirs, _ = trl_grpo_loss(logps, old, advantages, mask, loss_type="bnpo")
    ours = ours_grpo_loss(logps, old, advantages, mask, loss_type="bnpo")
    assert theirs.item() == pytest.approx((math.exp(25) + math.exp(19)) / 2)
    assert ours.item() == pytest.approx((math.exp(20) + math.exp(19)) / 2)


def test_k3_clamp_differs_from_trl_only_beyond_k3_10():
    # log π_ref − log π = 15: k3 = e^15 − 16 ≈ 3.3e6 in TRL, clamped to 10 in rlxf (verl)
    old = logps = torch.zeros(1, 2, dtype=torch.float64)
    ref = torch.tensor([[15.0, 1.0]], dtype=torch.float64)
    advantages = torch.zeros(1, dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    _, metrics = trl_grpo_loss(logps, old, advantages, mask, loss_type="dapo", beta=0.1, ref_logps=ref)
    k3_of_1 = math.e - 2
    assert metrics["kl"] == pytest.approx((math.exp(15) - 16 + k3_of_1) / 2)
    assert aggregate(kl_penalty(logps, ref), mask).item() == pytest.approx((10 + k3_of_1) / 2)


def test_all_equal_group_is_exactly_zero_where_trl_keeps_a_rounding_residue():
    # seven float32 rewards of 0.1: their mean is not exactly 0.1, and TRL divides the ~7e-9
    # residue by (std + 1e-4) ≈ 1e-4; rlxf returns exactly 0 for a group with no spread
    rewards = torch.full((7,), 0.1)
    theirs = trl_grpo_advantages(rewards, 7, "group")
    assert 0 < theirs.abs().max().item() < 1e-3
    assert (group_advantages(rewards, 7) == 0).all()
