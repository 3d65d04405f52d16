"""REINFORCE++ advantages (rlxf.losses.reinforce_pp) against the paper's definition, written as loops."""

from __future__ import annotations

import pytest
import torch

from rlxf.config import ConfigError, build_config
from rlxf.configs.grpo import GRPOConfig
from rlxf.losses import kl_penalty, reinforce_pp_advantages, reinforce_pp_returns


def paper_advantages(rewards, mask, kl, beta, gamma, group_size):
    """Hu (arXiv 2501.03262 §3), term by term in float64: per-token reward with the score at the end of
    each completion minus β·KL, the discounted return over the completion, then (A − mean) / std over
    every token of the batch (unbiased std, as masked_whiten)."""
    n, t_len = mask.shape
    scores = [float(r) for r in rewards]
    if group_size:
        for g in range(0, n, group_size):
            mean = sum(scores[g:g + group_size]) / group_size
            for i in range(g, g + group_size):
                scores[i] = float(rewards[i]) - mean
    returns = {}
    for i in range(n):
        tokens = [t for t in range(t_len) if mask[i, t]]
        token_reward = {t: -beta * float(kl[i, t]) for t in tokens}
        if tokens:
            token_reward[tokens[-1]] += scores[i]
        for k, t in enumerate(tokens):
            returns[i, t] = sum(gamma ** j * token_reward[s] for j, s in enumerate(tokens[k:]))
    values = list(returns.values())
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    out = torch.zeros(n, t_len, dtype=torch.float64)
    for (i, t), v in returns.items():
        out[i, t] = (v - mean) / (std ** 2 + 1e-8) ** 0.5
    return out, returns


def random_batch(seed, n=8, t_len=6):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randint(0, 2, (n,), generator=g).double()
    lengths = torch.randint(1, t_len + 1, (n,), generator=g)
    mask = torch.arange(t_len)[None, :] < lengths[:, None]
    old = -2 * torch.rand(n, t_len, generator=g, dtype=torch.float64)
    ref = old + 0.3 * torch.randn(n, t_len, generator=g, dtype=torch.float64)
    return rewards, mask, kl_penalty(old, ref, kind="k1")


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("beta", [0.0, 0.05])
@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("group_size", [None, 4])
def test_advantages_match_the_paper_definition(seed, beta, gamma, group_size):
    rewards, mask, kl = random_batch(seed)
    want, returns = paper_advantages(rewards, mask, kl, beta, gamma, group_size)
    got_returns = reinforce_pp_returns(rewards, mask, kl=kl, beta=beta, gamma=gamma, group_size=group_size)
    for (i, t), v in returns.items():
        assert got_returns[i, t].item() == pytest.approx(v, abs=1e-12)
    got = reinforce_pp_advantages(rewards, mask, kl=kl, beta=beta, gamma=gamma, group_size=group_size)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert got[mask].mean().item() == pytest.approx(0.0, abs=1e-12)  # global batch normalisation


def test_hand_numbers_and_holes_in_the_mask():
    # one completion of three tokens, the middle one masked (e.g. a tool output): the score sits on the
    # last valid token and the return skips the hole
    rewards = torch.tensor([1.0], dtype=torch.float64)
    mask = torch.tensor([[1, 0, 1]], dtype=torch.bool)
    kl = torch.tensor([[0.5, 9.0, 0.25]], dtype=torch.float64)
    got = reinforce_pp_returns(rewards, mask, kl=kl, beta=0.1, gamma=0.5)
    # r_0 = −0.05, r_2 = 1 − 0.025; G_2 = 0.975, G_0 = −0.05 + 0.5 · 0.975
    torch.testing.assert_close(got, torch.tensor([[-0.05 + 0.4875, 0.0, 0.975]], dtype=torch.float64))


def test_baseline_subtracts_the_group_mean_and_empty_rows_stay_zero():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [0, 0]], dtype=torch.bool)
    got = reinforce_pp_returns(rewards, mask, group_size=2)
    torch.testing.assert_close(got, torch.tensor([[0.5, 0.5], [-0.5, 0.0], [0.0, 0.0], [0.0, 0.0]],
                                                 dtype=torch.float64))


def test_bad_inputs_are_refused():
    mask = torch.ones(4, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="finite"):
        reinforce_pp_returns(torch.tensor([1.0, float("nan"), 0.0, 0.0]), mask)
    with pytest.raises(ValueError, match="same N"):
        reinforce_pp_returns(torch.zeros(3), mask)
    with pytest.raises(ValueError, match="groups of 3"):
        reinforce_pp_returns(torch.zeros(4), mask, group_size=3)
    with pytest.raises(ValueError, match="beta >= 0"):
        reinforce_pp_returns(torch.zeros(4), mask, beta=-1.0)


def test_config_keeps_the_kl_in_the_reward():
    cfg = build_config(GRPOConfig, {"advantage": "reinforce_pp"})
    assert cfg.beta == 0.0 and cfg.kl_in_reward == 0.01 and cfg.needs_reference
    cfg = build_config(GRPOConfig, {"advantage": "reinforce_pp", "kl_reward_coef": 0.0})
    assert not cfg.needs_reference
    assert build_config(GRPOConfig, {}).kl_in_reward == 0.0  # group advantages: the coefficient is unused
    with pytest.raises(ConfigError, match="--advantage"):
        build_config(GRPOConfig, {"advantage": "gae"})
