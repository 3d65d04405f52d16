"""GSPO, GSPO-token and CISPO (rlxf.losses.policy_variants) against float64 loop references and hand numbers."""

from __future__ import annotations

import math

import pytest
import torch

from rlxf.losses import (
    aggregate,
    cispo_loss,
    clipped_policy_loss,
    get_policy_loss,
    gspo_loss,
    policy_clip_fraction,
    policy_loss_defaults,
)
from rlxf.losses.policy_variants import sequence_log_ratio


def random_inputs(seed, batch=5, length=6, per_token=False, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    old = -3 * torch.rand(batch, length, generator=g, dtype=torch.float64)
    logps = (old + spread * torch.randn(batch, length, generator=g, dtype=torch.float64)).requires_grad_(True)
    shape = (batch, length) if per_token else (batch,)
    advantages = torch.randn(shape, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    return logps, old, advantages, mask


def gspo_reference(logps, old, advantages, mask, eps_low, eps_high):
    """Loops over sequences and tokens: the GSPO objective written term by term, [B, T] (float64)."""
    rows = []
    for i in range(logps.shape[0]):
        tokens = [t for t in range(logps.shape[1]) if mask[i, t]]
        s = torch.exp(sum(logps[i, t] - old[i, t] for t in tokens) / len(tokens))
        row = []
        for t in range(logps.shape[1]):
            a = advantages[i] if advantages.dim() == 1 else advantages[i, t]
            row.append(-torch.minimum(s * a, torch.clamp(s, 1 - eps_low, 1 + eps_high) * a))
        rows.append(torch.stack(row))
    return torch.stack(rows)


def cispo_reference(logps, old, advantages, mask, eps_low, eps_high):
    rows = []
    for i in range(logps.shape[0]):
        row = []
        for t in range(logps.shape[1]):
            r = math.exp(float(logps[i, t].detach() - old[i, t]))
            weight = min(max(r, 1 - eps_low), 1 + eps_high)
            a = advantages[i] if advantages.dim() == 1 else advantages[i, t]
            row.append(-weight * a * logps[i, t])
        rows.append(torch.stack(row))
    return torch.stack(rows)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("eps", [(3e-4, 4e-4), (0.2, 0.28), (0.05, 0.0)])
def test_gspo_matches_the_loop_reference_in_value_and_gradient(seed, per_token, eps):
    logps, old, advantages, mask = random_inputs(seed, per_token=per_token, spread=0.05)
    got = gspo_loss(logps, old, advantages, mask, eps_low=eps[0], eps_high=eps[1])
    want = gspo_reference(logps, old, advantages, mask, *eps)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for mode in ("seq-mean-token-mean", "token-mean"):
        (g,) = torch.autograd.grad(aggregate(got, mask, mode=mode), logps, retain_graph=True)
        (w,) = torch.autograd.grad(aggregate(want, mask, mode=mode), logps, retain_graph=True)
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gspo_token_has_gspo_values_and_the_per_token_gradient_of_the_paper(seed):
    logps, old, advantages, mask = random_inputs(seed, per_token=True, spread=0.05)
    eps_low, eps_high = 0.02, 0.03
    sequence = gspo_loss(logps, old, advantages, mask, eps_low=eps_low, eps_high=eps_high)
    token = gspo_loss(logps, old, advantages, mask, eps_low=eps_low, eps_high=eps_high, token_level=True)
    torch.testing.assert_close(token, sequence, rtol=1e-12, atol=1e-12)  # s_i,t = s_i in value
    (grad,) = torch.autograd.grad((token * mask).sum(), logps)
    # d ℓ_i,t / d log π_i,t = −s_i Â_i,t where the unclipped branch is the minimum, else 0; no cross-token terms
    with torch.no_grad():
        s = torch.exp(sequence_log_ratio(logps, old, mask))  # [B, 1]
        unclipped_wins = -advantages * s >= -advantages * torch.clamp(s, 1 - eps_low, 1 + eps_high)
        want = torch.where(unclipped_wins & mask, -s * advantages, 0.0)
    torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_with_one_advantage_per_sequence_gspo_and_gspo_token_give_the_same_gradient(seed):
    # the paper's remark after GSPO-token: identical when Â_i,t = Â_i (aggregated over each sequence)
    logps, old, advantages, mask = random_inputs(seed, spread=0.05)
    grads = []
    for token_level in (False, True):
        loss = gspo_loss(logps, old, advantages, mask, eps_low=0.02, eps_high=0.03, token_level=token_level)
        grads.append(torch.autograd.grad(aggregate(loss, mask, mode="seq-mean-token-mean"), logps)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)


def test_on_policy_gspo_equals_grpo_with_sequence_mean():
    # one update per rollout batch: π_old = sg[π], s = 1, and GSPO's gradient is GRPO's (seq-mean-token-mean)
    logps, _, advantages, mask = random_inputs(4)
    old = logps.detach()
    gspo = aggregate(gspo_loss(logps, old, advantages, mask), mask, mode="seq-mean-token-mean")
    grpo = aggregate(clipped_policy_loss(logps, old, advantages), mask, mode="seq-mean-token-mean")
    torch.testing.assert_close(gspo, grpo, rtol=1e-12, atol=1e-12)
    g1, g2 = (torch.autograd.grad(x, logps)[0] for x in (gspo, grpo))
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12)


def test_gspo_hand_numbers():
    # one sequence of two tokens, log-ratios 0.1 and 0.3: s = e^0.2; Â = 1 clips at 1 + 0.1, Â = −1 does not
    old = torch.zeros(2, 3, dtype=torch.float64)
    logps = torch.tensor([[0.1, 0.3, 5.0], [0.1, 0.3, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    advantages = torch.tensor([1.0, -1.0], dtype=torch.float64)
    loss = gspo_loss(logps, old, advantages, mask, eps_low=0.1, eps_high=0.1)
    assert loss[0, 0].item() == pytest.approx(-1.1)
    assert loss[1, 0].item() == pytest.approx(math.exp(0.2))
    assert loss[:, 2].tolist() == loss[:, 0].tolist()  # the padded position is not in s


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("eps", [(1.0, 4.0), (0.2, 0.28), (0.0, 0.0)])
def test_cispo_matches_the_loop_reference_in_value_and_gradient(seed, per_token, eps):
    logps, old, advantages, mask = random_inputs(seed, per_token=per_token, spread=1.0)
    got = cispo_loss(logps, old, advantages, mask, eps_low=eps[0], eps_high=eps[1])
    want = cispo_reference(logps, old, advantages, mask, *eps)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    (g,) = torch.autograd.grad(aggregate(got, mask), logps, retain_graph=True)
    (w,) = torch.autograd.grad(aggregate(want, mask), logps)
    torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_cispo_keeps_the_gradient_of_tokens_ppo_clips():
    # ρ = e^1 > 1.28 with Â > 0: PPO's clipped branch zeroes the gradient; CISPO's is −min(ρ, 1 + eps_high) Â
    old = torch.zeros(1, 1, dtype=torch.float64)
    logps = torch.ones(1, 1, dtype=torch.float64, requires_grad=True)
    advantages = torch.tensor([2.0], dtype=torch.float64)
    mask = torch.ones(1, 1, dtype=torch.bool)
    (ppo,) = torch.autograd.grad(clipped_policy_loss(logps, old, advantages, eps_low=0.2, eps_high=0.28).sum(), logps)
    (cispo,) = torch.autograd.grad(cispo_loss(logps, old, advantages, mask, eps_low=0.2, eps_high=0.28).sum(), logps)
    assert ppo.item() == 0.0
    assert cispo.item() == pytest.approx(-1.28 * 2.0)
    assert policy_clip_fraction("cispo")(logps, old, advantages, mask, eps_low=0.2, eps_high=0.28) == 1.0


def test_clip_fractions_count_the_clipped_tokens():
    logps, old, advantages, mask = random_inputs(5, batch=64, spread=0.05)
    s = torch.exp(sequence_log_ratio(logps, old, mask)).squeeze(-1)  # [B]
    active = ((s > 1 + 4e-4) & (advantages > 0)) | ((s < 1 - 3e-4) & (advantages < 0))  # [B]
    want = (active[:, None] & mask).sum().item() / mask.sum().item()
    got = policy_clip_fraction("gspo")(logps, old, advantages, mask, eps_low=3e-4, eps_high=4e-4)
    assert got == pytest.approx(want) and 0 < got < 1
    ratio = torch.exp(logps - old)
    want = (((ratio > 1.1) | (ratio < 0.9)) & mask).sum().item() / mask.sum().item()
    assert policy_clip_fraction("cispo")(logps, old, advantages, mask, eps_low=0.1, eps_high=0.1) == pytest.approx(want)


def test_paper_defaults_and_bad_ranges():
    assert policy_loss_defaults("gspo") == {"eps_low": 3e-4, "eps_high": 4e-4}
    assert policy_loss_defaults("gspo_token") == {"eps_low": 3e-4, "eps_high": 4e-4}
    assert policy_loss_defaults("cispo") == {"eps_low": 1.0, "eps_high": 4.0}
    assert policy_loss_defaults("clipped") == {"eps_low": 0.2, "eps_high": 0.2}
    logps, old, advantages, mask = random_inputs(0)
    with pytest.raises(ValueError, match="eps_low must lie in \\[0, 1\\)"):
        get_policy_loss("gspo")(logps, old, advantages, mask, eps_low=1.0, eps_high=0.1)
    with pytest.raises(ValueError, match="eps_low must lie in \\[0, 1\\]"):
        get_policy_loss("cispo")(logps, old, advantages, mask, eps_low=1.5, eps_high=0.1)
    with pytest.raises(ValueError, match="same shape"):
        gspo_loss(logps, old, advantages, mask[:, :3])
    with pytest.raises(ValueError, match="advantages"):
        cispo_loss(logps, old, advantages[:2], mask)


def test_empty_row_has_ratio_one_and_no_nan():
    logps, old, advantages, mask = random_inputs(1)
    mask = mask.clone()
    mask[0] = False
    loss = gspo_loss(logps, old, advantages, mask)
    assert torch.isfinite(loss).all()
    assert torch.exp(sequence_log_ratio(logps, old, mask))[0].item() == 1.0
