"""rlxf.losses policy-gradient pieces: slow float64 references, hand-worked cases, properties."""

import math
import statistics

import pytest
import torch

from rlxf.losses import (
    AGGREGATION_MODES,
    KL_KINDS,
    AdaptiveKLController,
    FixedKLController,
    aggregate,
    clip_fraction,
    clipped_policy_loss,
    gae,
    group_advantages,
    kl_penalty,
    masked_whiten,
    value_loss,
)

SEEDS = [0, 1, 2]
SHAPES = [(1, 1), (1, 5), (3, 1), (4, 7)]  # (B, T)


# ---------------------------------------------------------------------------------------------
# Slow references: one token (or one sequence) at a time, Python floats and lists only.
# ---------------------------------------------------------------------------------------------


def ref_clipped(logp, old, adv, eps_low, eps_high):
    ratio = math.exp(min(max(logp - old, -20.0), 20.0))
    clipped_ratio = min(max(ratio, 1 - eps_low), 1 + eps_high)
    return -min(ratio * adv, clipped_ratio * adv)


def ref_clip_active(logp, old, adv, eps_low, eps_high):
    ratio = math.exp(min(max(logp - old, -20.0), 20.0))
    return (ratio > 1 + eps_high and adv > 0) or (ratio < 1 - eps_low and adv < 0)


def ref_kl(logp, ref, kind):
    if kind == "k1":
        return logp - ref
    if kind == "k2":
        return 0.5 * (logp - ref) ** 2
    log_r = min(max(ref - logp, -20.0), 20.0)
    return min(max(math.exp(log_r) - 1 - log_r, -10.0), 10.0)


def ref_aggregate(loss, mask, mode, max_len=None):
    """loss, mask: lists of rows."""
    rows = [[x for x, m in zip(lr, mr, strict=True) if m] for lr, mr in zip(loss, mask, strict=True)]
    if mode == "token-mean":
        n = sum(len(r) for r in rows)
        return sum(sum(r) for r in rows) / n if n else 0.0
    if mode == "seq-mean-token-sum-norm":
        return sum(sum(r) for r in rows) / (len(rows) * max_len)
    nonempty = [r for r in rows if r]
    if not nonempty:
        return 0.0
    if mode == "seq-mean-token-mean":
        return sum(sum(r) / len(r) for r in nonempty) / len(nonempty)
    return sum(sum(r) for r in nonempty) / len(nonempty)


def ref_group_advantages(rewards, group_size, scale, leave_one_out, eps):
    out = []
    batch_std = statistics.stdev(rewards) if len(rewards) > 1 else 0.0
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        if group_size == 1:
            out.append(0.0)
            continue
        group_std = statistics.stdev(group)
        for i, r in enumerate(group):
            if leave_one_out:
                others = group[:i] + group[i + 1 :]
                centred = r - sum(others) / len(others)
            else:
                centred = r - sum(group) / len(group)
            std = {"group": group_std, "batch": batch_std, "none": None}[scale]
            out.append(centred if std is None else centred / (std + eps))
    return out


def ref_gae_row(rewards, values, mask, gamma, lam):
    """Â_t = Σ_l (γλ)^l δ_{t+l} over the valid positions only (explicit double sum, no recursion)."""
    idx = [t for t, m in enumerate(mask) if m]
    r = [rewards[t] for t in idx]
    v = [values[t] for t in idx] + [0.0]  # V beyond the last valid token = 0
    deltas = [r[k] + gamma * v[k + 1] - v[k] for k in range(len(idx))]
    adv_valid = [sum((gamma * lam) ** l * deltas[k + l] for l in range(len(idx) - k)) for k in range(len(idx))]
    adv, ret = [0.0] * len(mask), [0.0] * len(mask)
    for k, t in enumerate(idx):
        adv[t], ret[t] = adv_valid[k], adv_valid[k] + values[t]
    return adv, ret


def ref_value_loss(v, old, ret, m, clip):
    if not m:
        return 0.0
    loss = (v - ret) ** 2
    if clip is not None:
        v_clip = min(max(v, old - clip), old + clip)
        loss = max(loss, (v_clip - ret) ** 2)
    return 0.5 * loss


def ref_whiten(values, mask, shift_mean, eps):
    flat = [x for row, mrow in zip(values, mask, strict=True) for x, m in zip(row, mrow, strict=True) if m]
    mean = statistics.fmean(flat) if flat else 0.0
    var = statistics.variance(flat) if len(flat) > 1 else 0.0
    shift = 0.0 if shift_mean else mean
    return [
        [(x - mean) / math.sqrt(var + eps) + shift if m else 0.0 for x, m in zip(row, mrow, strict=True)]
        for row, mrow in zip(values, mask, strict=True)
    ]


# ---------------------------------------------------------------------------------------------
# Random inputs
# ---------------------------------------------------------------------------------------------


def gen(seed):
    return torch.Generator().manual_seed(seed)


def random_logps(seed, batch, length):
    """(logps, old_logps, ref_logps) [B, T] float64; the policy moved ~0.3 nats so some ratios clip."""
    g = gen(seed)
    old = -3 * torch.rand(batch, length, generator=g, dtype=torch.float64)
    logps = old + 0.3 * torch.randn(batch, length, generator=g, dtype=torch.float64)
    ref = old + 0.5 * torch.randn(batch, length, generator=g, dtype=torch.float64)
    return logps, old, ref


def right_padded_mask(seed, batch, length, allow_empty=False):
    """[B, T] bool mask, each row a valid prefix of random length (≥ 1 unless allow_empty)."""
    lengths = torch.randint(0 if allow_empty else 1, length + 1, (batch,), generator=gen(100 + seed))
    return torch.arange(length)[None, :] < lengths[:, None]


def assert_matches(actual, expected):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-12)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# 1. Against the slow references
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("eps_low,eps_high", [(0.2, 0.2), (0.2, 0.28), (0.1, 0.3)])
def test_clipped_policy_loss_matches_reference(seed, shape, eps_low, eps_high):
    logps, old, _ = random_logps(seed, *shape)
    per_seq_adv = torch.randn(shape[0], generator=gen(seed), dtype=torch.float64)
    per_token_adv = torch.randn(*shape, generator=gen(seed + 7), dtype=torch.float64)
    per_seq_rows = [[a] * shape[1] for a in per_seq_adv.tolist()]
    for adv, adv_rows in ((per_seq_adv, per_seq_rows), (per_token_adv, per_token_adv.tolist())):
        expected = [
            [ref_clipped(lp, o, a, eps_low, eps_high) for lp, o, a in zip(*rows, strict=True)]
            for rows in zip(logps.tolist(), old.tolist(), adv_rows, strict=True)
        ]
        assert_matches(clipped_policy_loss(logps, old, adv, eps_low=eps_low, eps_high=eps_high), expected)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", [(1, 1), (4, 7)])
def test_clip_fraction_matches_reference(seed, shape):
    logps, old, _ = random_logps(seed, *shape)
    adv = torch.randn(shape[0], generator=gen(seed), dtype=torch.float64)
    mask = right_padded_mask(seed, *shape)
    active = [
        ref_clip_active(lp, o, a, 0.2, 0.28) and m
        for lrow, orow, a, mrow in zip(logps.tolist(), old.tolist(), adv.tolist(), mask.tolist(), strict=True)
        for lp, o, m in zip(lrow, orow, mrow, strict=True)
    ]
    expected = sum(active) / mask.sum().item()
    assert clip_fraction(logps, old, adv, mask, eps_low=0.2, eps_high=0.28) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", KL_KINDS)
def test_kl_penalty_matches_reference(seed, shape, kind):
    logps, _, ref = random_logps(seed, *shape)
    ref = ref.clone()
    ref.view(-1)[0] = logps.view(-1)[0] + 25.0  # beyond the log-ratio clamp (and the k3 clamp)
    if ref.numel() > 1:
        ref.view(-1)[-1] = logps.view(-1)[-1] - 25.0
    expected = [
        [ref_kl(lp, rp, kind) for lp, rp in zip(lrow, rrow, strict=True)]
        for lrow, rrow in zip(logps.tolist(), ref.tolist(), strict=True)
    ]
    assert_matches(kl_penalty(logps, ref, kind=kind), expected)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_aggregate_matches_reference(seed, shape, mode):
    loss = torch.randn(*shape, generator=gen(seed), dtype=torch.float64)
    mask = right_padded_mask(seed, *shape, allow_empty=True)  # some rows may have no valid token
    expected = ref_aggregate(loss.tolist(), mask.tolist(), mode, max_len=9)
    actual = aggregate(loss, mask, mode=mode, max_len=9)
    assert actual.dim() == 0
    assert actual.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    # a float 0/1 mask means the same as a bool mask
    assert aggregate(loss, mask.double(), mode=mode, max_len=9).item() == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("group_size,num_groups", [(1, 3), (2, 1), (4, 3), (8, 2)])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("leave_one_out", [False, True])
def test_group_advantages_matches_reference(seed, group_size, num_groups, scale, leave_one_out):
    rewards = torch.randn(group_size * num_groups, generator=gen(seed), dtype=torch.float64)
    rewards[:group_size] = 0.5  # one group with zero spread
    expected = ref_group_advantages(rewards.tolist(), group_size, scale, leave_one_out, 1e-4)
    actual = group_advantages(rewards, group_size, scale=scale, leave_one_out=leave_one_out)
    assert_matches(actual, expected)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_reference(seed, shape, gamma, lam):
    g = gen(seed)
    rewards = torch.randn(*shape, generator=g, dtype=torch.float64)
    values = torch.randn(*shape, generator=g, dtype=torch.float64)
    mask = right_padded_mask(seed, *shape)
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    rows = zip(rewards.tolist(), values.tolist(), mask.tolist(), strict=True)
    expected = [ref_gae_row(*row, gamma, lam) for row in rows]
    assert_matches(adv, [a for a, _ in expected])
    assert_matches(ret, [r for _, r in expected])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("clip", [None, 0.2, 0.5])
def test_value_loss_matches_reference(seed, shape, clip):
    g = gen(seed)
    old = torch.randn(*shape, generator=g, dtype=torch.float64)
    values = old + 0.4 * torch.randn(*shape, generator=g, dtype=torch.float64)
    returns = torch.randn(*shape, generator=g, dtype=torch.float64)
    mask = right_padded_mask(seed, *shape)
    expected = [
        [ref_value_loss(*token, clip) for token in zip(*rows, strict=True)]
        for rows in zip(values.tolist(), old.tolist(), returns.tolist(), mask.tolist(), strict=True)
    ]
    assert_matches(value_loss(values, old, returns, mask, clip=clip), expected)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_matches_reference(seed, shape, shift_mean):
    values = 3 + 2 * torch.randn(*shape, generator=gen(seed), dtype=torch.float64)
    mask = right_padded_mask(seed, *shape)
    expected = ref_whiten(values.tolist(), mask.tolist(), shift_mean, 1e-8)
    assert_matches(masked_whiten(values, mask, shift_mean=shift_mean), expected)


def test_adaptive_kl_controller_matches_reference_loop():
    controller = AdaptiveKLController(0.15, target=6.0, horizon=10000)
    beta = 0.15
    for kl, n in [(2.0, 64), (6.5, 64), (30.0, 128), (0.0, 64), (6.0, 64)]:
        controller.update(kl, n)
        beta *= 1 + min(max(kl / 6.0 - 1, -0.2), 0.2) * n / 10000
        assert controller.value == pytest.approx(beta, rel=1e-15)


# ---------------------------------------------------------------------------------------------
# 2. Hand-worked cases
# ---------------------------------------------------------------------------------------------


def test_hand_clipped_policy_loss():
    # ρ = 1.5, Â = 2:   ρÂ = 3.0, clip(1.5, 0.8, 1.2)·2 = 2.4, min = 2.4        → −2.4 (clipped)
    # ρ = 1.5, Â = −1:  ρÂ = −1.5, 1.2·(−1) = −1.2, min = −1.5                  → 1.5
    # ρ = 0.5, Â = −1:  ρÂ = −0.5, 0.8·(−1) = −0.8, min = −0.8                  → 0.8 (clipped)
    # ρ = 1.1, Â = 1:   inside the clip range                                   → −1.1
    old = torch.zeros(1, 4, dtype=torch.float64)
    logps = torch.log(t([1.5, 1.5, 0.5, 1.1]))
    loss = clipped_policy_loss(logps, old, t([2.0, -1.0, -1.0, 1.0]))
    torch.testing.assert_close(loss, t([-2.4, 1.5, 0.8, -1.1]))
    # tokens 0 and 2 are on the clipped branch: 2 of 4 valid tokens
    assert clip_fraction(logps, old, t([2.0, -1.0, -1.0, 1.0]), torch.ones(1, 4)) == 0.5


def test_hand_kl_penalty():
    # log π = −1, log π_ref = −2: log r = −1
    # k1 = 1;  k2 = ½ · 1² = 0.5;  k3 = e^−1 − (−1) − 1 = 0.3678794
    logps, ref = t([-1.0]), t([-2.0])
    assert kl_penalty(logps, ref, kind="k1").item() == pytest.approx(1.0)
    assert kl_penalty(logps, ref, kind="k2").item() == pytest.approx(0.5)
    assert kl_penalty(logps, ref, kind="k3").item() == pytest.approx(0.3678794, abs=1e-7)
    # reversed (log r = +1): k3 = e − 1 − 1 = 0.7182818; with log r = 15 the clamp gives 10
    assert kl_penalty(ref, logps, kind="k3").item() == pytest.approx(0.7182818, abs=1e-7)
    assert kl_penalty(t([-16.0]), t([-1.0]), kind="k3").item() == 10.0


def test_hand_aggregate():
    # sequence 0: 4 tokens 2, 4, 6, 8 (sum 20, mean 5); sequence 1: 2 tokens 1, 3 (sum 4, mean 2)
    loss = t([2.0, 4.0, 6.0, 8.0], [1.0, 3.0, 99.0, 99.0])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert aggregate(loss, mask, mode="token-mean").item() == pytest.approx(4.0)  # 24 / 6
    assert aggregate(loss, mask, mode="seq-mean-token-mean").item() == pytest.approx(3.5)  # (5 + 2) / 2
    assert aggregate(loss, mask, mode="seq-mean-token-sum").item() == pytest.approx(12.0)  # (20 + 4) / 2
    assert aggregate(loss, mask, mode="seq-mean-token-sum-norm", max_len=8).item() == pytest.approx(1.5)  # 24 / 16


def test_hand_group_advantages():
    # group [1, 0, 0, 1]: mean 0.5, unbiased std sqrt((4 · 0.25) / 3) = 0.5773503
    #   group scale: ±0.5 / (0.5773503 + 1e-4) = ±0.5 / 0.5774503 = ±0.8658754;  none: ±0.5
    #   leave-one-out: r = 1 → 1 − (0 + 0 + 1)/3 = 0.6666667 = 4/3 · 0.5
    # group [2, 2, 2, 2]: all equal → 0 everywhere
    rewards = t(1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert group_advantages(rewards, 4).tolist() == pytest.approx([a, -a, -a, a, 0, 0, 0, 0], abs=1e-7)
    assert a == pytest.approx(0.8658754, abs=1e-7)
    assert group_advantages(rewards, 4, scale="none").tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    loo = group_advantages(rewards, 4, scale="none", leave_one_out=True)
    assert loo.tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0])
    # batch scale: the 8 rewards have mean 10/8 = 1.25;
    #   Σ(r − 1.25)² = 2 · 0.0625 + 2 · 1.5625 + 4 · 0.5625 = 5.5;  std = sqrt(5.5 / 7) = 0.8864053
    #   ±0.5 / (0.8864053 + 1e-4) = ±0.5640124
    b = 0.5 / (math.sqrt(5.5 / 7) + 1e-4)
    assert b == pytest.approx(0.5640124, abs=1e-7)
    assert group_advantages(rewards, 4, scale="batch").tolist() == pytest.approx([b, -b, -b, b, 0, 0, 0, 0])


def test_hand_gae():
    # rewards [0, 0, 1], values [0.5, 0.6, 0.7], γ = 1, λ = 0.5 (then two padded positions)
    # δ2 = 1 + 0 − 0.7 = 0.3;  δ1 = 0 + 0.7 − 0.6 = 0.1;  δ0 = 0 + 0.6 − 0.5 = 0.1
    # Â2 = 0.3;  Â1 = 0.1 + 0.5 · 0.3 = 0.25;  Â0 = 0.1 + 0.5 · 0.25 = 0.225
    # returns = Â + V = 0.725, 0.85, 1.0
    rewards = t([0.0, 0.0, 1.0, 5.0, 5.0])
    values = t([0.5, 0.6, 0.7, 9.0, 9.0])
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    torch.testing.assert_close(adv, t([0.225, 0.25, 0.3, 0.0, 0.0]))
    torch.testing.assert_close(ret, t([0.725, 0.85, 1.0, 0.0, 0.0]))


def test_hand_value_loss():
    # token 0: V = 1.0, V_old = 0.5, G = 0: unclipped 1.0², V_clip = 0.7 → 0.49; max 1.0 → ½ = 0.5
    # token 1: V = 0.6, V_old = 1.0, G = 0: unclipped 0.36, V_clip = 0.8 → 0.64; max 0.64 → 0.32
    # token 2: masked → 0
    values, old, returns = t([1.0, 0.6, 3.0]), t([0.5, 1.0, 0.0]), t([0.0, 0.0, 0.0])
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(value_loss(values, old, returns, mask, clip=0.2), t([0.5, 0.32, 0.0]))
    torch.testing.assert_close(value_loss(values, old, returns, mask, clip=None), t([0.5, 0.18, 0.0]))


def test_hand_masked_whiten():
    # valid [1, 2, 3]: mean 2, unbiased var (1 + 0 + 1)/2 = 1 → [−1, 0, 1]; padding (100) ignored
    values, mask = t([1.0, 2.0, 3.0, 100.0]), torch.tensor([[1, 1, 1, 0]])
    torch.testing.assert_close(masked_whiten(values, mask), t([-1.0, 0.0, 1.0, 0.0]))
    torch.testing.assert_close(masked_whiten(values, mask, shift_mean=False), t([1.0, 2.0, 3.0, 0.0]))


def test_hand_kl_controllers():
    # β = 0.1, target 6, horizon 10000
    # KL 9: e = clip(9/6 − 1 = 0.5) = 0.2;  n = 100: β = 0.1 · (1 + 0.2 · 100/10000) = 0.1002
    # KL 3: e = clip(−0.5) = −0.2: β = 0.1002 · (1 − 0.002) = 0.0999996
    controller = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    controller.update(9.0, 100)
    assert controller.value == pytest.approx(0.1002)
    controller.update(torch.tensor(3.0), 100)
    assert controller.value == pytest.approx(0.0999996)
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.05


# ---------------------------------------------------------------------------------------------
# 3. Properties
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_clipped_tokens_have_zero_gradient(seed):
    _, old, _ = random_logps(seed, 4, 6)
    logps = (old + 0.5 * torch.randn(4, 6, generator=gen(seed), dtype=torch.float64)).requires_grad_(True)
    adv = torch.randn(4, 6, generator=gen(seed + 1), dtype=torch.float64)
    (grad,) = torch.autograd.grad(clipped_policy_loss(logps, old, adv, eps_low=0.2, eps_high=0.28).sum(), logps)
    ratio = torch.exp(logps.detach() - old)
    clipped = ((ratio > 1.28) & (adv > 0)) | ((ratio < 0.8) & (adv < 0))
    assert clipped.any() and (~clipped).any()
    assert (grad[clipped] == 0).all()
    # elsewhere ∂(−ρÂ)/∂log π = −ρÂ
    torch.testing.assert_close(grad[~clipped], (-ratio * adv)[~clipped])


def test_clip_higher_asymmetry():
    # ρ = 1.25 with Â > 0: clipped when eps_high = 0.2 (1.25 > 1.2), not when eps_high = 0.28 (DAPO)
    logps = torch.log(t([1.25])).requires_grad_(True)
    old, adv = torch.zeros(1, 1, dtype=torch.float64), t(1.0)
    for eps_high, loss_value, grad_value in [(0.2, -1.2, 0.0), (0.28, -1.25, -1.25)]:
        loss = clipped_policy_loss(logps, old, adv, eps_low=0.2, eps_high=eps_high)
        (grad,) = torch.autograd.grad(loss.sum(), logps)
        assert loss.item() == pytest.approx(loss_value)
        assert grad.item() == pytest.approx(grad_value)
        assert clip_fraction(logps, old, adv, torch.ones(1, 1), eps_low=0.2, eps_high=eps_high) == (eps_high == 0.2)
    # the low side is untouched by eps_high: ρ = 0.75 with Â < 0 is clipped at eps_low = 0.2 either way
    low = clipped_policy_loss(torch.log(t([0.75])), old, t(-1.0), eps_low=0.2, eps_high=0.28)
    assert low.item() == pytest.approx(0.8)


def test_policy_loss_at_old_policy_is_minus_advantage():
    logps, _, _ = random_logps(3, 3, 5)
    adv = torch.randn(3, generator=gen(3), dtype=torch.float64)
    torch.testing.assert_close(clipped_policy_loss(logps, logps, adv), -adv[:, None].expand(3, 5))


def test_policy_loss_is_finite_for_extreme_log_ratios():
    old = torch.zeros(1, 4, dtype=torch.float64)
    logps = t([300.0, -300.0, 25.0, -25.0]).requires_grad_(True)
    loss = clipped_policy_loss(logps, old, t(-1.0))
    (grad,) = torch.autograd.grad(loss.sum(), logps)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert loss[0, 0].item() == pytest.approx(math.exp(20.0))  # the log-ratio clamp at 20


@pytest.mark.parametrize("seed", SEEDS)
def test_k3_is_nonnegative_and_zero_at_equality(seed):
    logps, _, ref = random_logps(seed, 5, 9)
    assert (kl_penalty(logps, ref, kind="k3") >= 0).all()
    assert (kl_penalty(logps, logps, kind="k3") == 0).all()
    # near equality expm1 keeps k3 ≈ ½ (log r)² instead of cancelling to 0 (float32)
    tiny = torch.full((1, 1), 1e-4)
    assert kl_penalty(tiny, torch.zeros(1, 1), kind="k3").item() == pytest.approx(0.5e-8, rel=1e-3)


def test_kl_penalty_gradients():
    # ∂k1/∂log π = 1;  ∂k2/∂log π = log π − log π_ref;  ∂k3/∂log π = 1 − π_ref/π
    logps, _, ref = random_logps(4, 2, 3)
    for kind, expected in [("k1", torch.ones_like(logps)), ("k2", logps - ref), ("k3", 1 - torch.exp(ref - logps))]:
        leaf = logps.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(kl_penalty(leaf, ref, kind=kind).sum(), leaf)
        torch.testing.assert_close(grad, expected)


def test_kl_penalty_unknown_kind_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown kind 'k4'.*k1, k2, k3"):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), kind="k4")


def test_aggregate_modes_differ_on_ragged_masks_only():
    g = gen(5)
    loss = torch.rand(4, 6, generator=g, dtype=torch.float64)
    full = torch.ones(4, 6, dtype=torch.bool)
    modes = {mode: aggregate(loss, full, mode=mode, max_len=6).item() for mode in AGGREGATION_MODES}
    # equal lengths T: token-mean = seq-mean-token-mean = sum-norm (L_max = T); token-sum = T · token-mean
    assert modes["token-mean"] == pytest.approx(modes["seq-mean-token-mean"])
    assert modes["token-mean"] == pytest.approx(modes["seq-mean-token-sum-norm"])
    assert modes["seq-mean-token-sum"] == pytest.approx(6 * modes["token-mean"])
    ragged = torch.arange(6)[None, :] < torch.tensor([6, 1, 3, 2])[:, None]
    token_mean = aggregate(loss, ragged, mode="token-mean").item()
    seq_mean = aggregate(loss, ragged, mode="seq-mean-token-mean").item()
    assert token_mean != pytest.approx(seq_mean)
    # seq-mean-token-sum = token-mean · (tokens / sequences);  sum-norm = token-mean · tokens / (B · L_max)
    assert aggregate(loss, ragged, mode="seq-mean-token-sum").item() == pytest.approx(token_mean * 12 / 4)
    sum_norm = aggregate(loss, ragged, mode="seq-mean-token-sum-norm", max_len=10).item()
    assert sum_norm == pytest.approx(token_mean * 12 / 40)
    # token-mean weights every token the same: a long sequence counts more than under seq-mean
    loss2 = t([1.0], [0.0], [0.0], [0.0]).expand(4, 6)  # only the long first sequence has loss
    assert aggregate(loss2, ragged, mode="token-mean").item() == pytest.approx(6 / 12)
    assert aggregate(loss2, ragged, mode="seq-mean-token-mean").item() == pytest.approx(1 / 4)


@pytest.mark.parametrize("seed", SEEDS)
def test_token_mean_is_invariant_to_micro_batching(seed):
    loss = torch.randn(6, 5, generator=gen(seed), dtype=torch.float64)
    mask = right_padded_mask(seed, 6, 5)
    full = aggregate(loss, mask, mode="token-mean")
    parts = [(loss[:2], mask[:2]), (loss[2:], mask[2:])]
    weighted = sum(aggregate(lp, mp, mode="token-mean") * mp.sum() for lp, mp in parts) / mask.sum()
    torch.testing.assert_close(weighted, full)
    # and it does not depend on how much padding the batch carries
    padded_loss = torch.cat([loss, torch.randn(6, 3, generator=gen(seed), dtype=torch.float64)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(6, 3, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(aggregate(padded_loss, padded_mask, mode="token-mean"), full)


def test_aggregate_empty_sequences_and_nan_padding():
    loss = t([1.0, 3.0, float("nan")], [float("nan"), float("inf"), float("nan")], [2.0, float("nan"), float("nan")])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]])
    leaf = loss.clone().requires_grad_(True)
    # the empty middle row is left out of the sequence count (verl): (2 + 2) / 2, not / 3
    out = aggregate(leaf, mask, mode="seq-mean-token-mean")
    assert out.item() == pytest.approx(2.0)
    (grad,) = torch.autograd.grad(out, leaf)
    assert torch.isfinite(grad).all() and (grad[~mask.bool()] == 0).all()
    assert aggregate(loss, mask, mode="seq-mean-token-sum").item() == pytest.approx((4.0 + 2.0) / 2)
    assert aggregate(loss, mask, mode="token-mean").item() == pytest.approx(2.0)
    # Dr. GRPO's constant normaliser counts every row: 6 / (3 · 4)
    assert aggregate(loss, mask, mode="seq-mean-token-sum-norm", max_len=4).item() == pytest.approx(0.5)
    for mode in AGGREGATION_MODES:
        empty = aggregate(loss, torch.zeros(3, 3), mode=mode, max_len=4)
        assert empty.item() == 0.0, mode


def test_aggregate_errors():
    loss, mask = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="needs max_len"):
        aggregate(loss, mask, mode="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="unknown mode 'sum'"):
        aggregate(loss, mask, mode="sum")
    with pytest.raises(ValueError, match="same shape"):
        aggregate(loss, torch.ones(2, 4))


def test_group_advantages_zero_for_all_equal_groups():
    rewards = t(1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.3, 0.3, 0.3)
    for scale in ("group", "batch", "none"):
        for leave_one_out in (False, True):
            adv = group_advantages(rewards, 3, scale=scale, leave_one_out=leave_one_out)
            assert (adv == 0).all(), (scale, leave_one_out)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("group_size", [2, 3, 8])
def test_leave_one_out_is_g_over_g_minus_1_times_group_centred(seed, group_size):
    rewards = torch.randn(3 * group_size, generator=gen(seed), dtype=torch.float64)
    factor = group_size / (group_size - 1)
    for scale in ("none", "group", "batch"):
        loo = group_advantages(rewards, group_size, scale=scale, leave_one_out=True)
        torch.testing.assert_close(loo, factor * group_advantages(rewards, group_size, scale=scale))


def test_group_advantages_singleton_groups_are_zero_without_nan():
    rewards = t(0.3, -1.0, 2.0)
    for scale in ("group", "batch", "none"):
        for leave_one_out in (False, True):
            adv = group_advantages(rewards, 1, scale=scale, leave_one_out=leave_one_out)
            assert (adv == 0).all() and not torch.isnan(adv).any()


@pytest.mark.parametrize("seed", SEEDS)
def test_group_scaled_advantages_have_unit_unbiased_std(seed):
    rewards = torch.randn(4 * 8, generator=gen(seed), dtype=torch.float64)
    adv = group_advantages(rewards, 8, eps=0.0).view(4, 8)
    torch.testing.assert_close(adv.mean(-1), torch.zeros(4, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(adv.std(-1), torch.ones(4, dtype=torch.float64))


def test_group_advantages_permuting_groups_permutes_output():
    rewards = torch.randn(12, generator=gen(9), dtype=torch.float64)
    swapped = torch.cat([rewards[8:], rewards[:8]])  # groups of 4: (0, 1, 2) → (2, 0, 1)
    for scale in ("group", "batch", "none"):
        adv = group_advantages(rewards, 4, scale=scale)
        torch.testing.assert_close(group_advantages(swapped, 4, scale=scale), torch.cat([adv[8:], adv[:8]]))


def test_group_advantages_errors():
    with pytest.raises(ValueError, match=r"7 rewards do not split into groups of 4"):
        group_advantages(torch.zeros(7), 4)
    with pytest.raises(ValueError, match="unknown scale 'std'"):
        group_advantages(torch.zeros(4), 2, scale="std")
    with pytest.raises(ValueError, match=r"indices \[1\] are not finite"):
        group_advantages(torch.tensor([0.0, float("nan")]), 2)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 2), 2)
    # integer rewards (pass/fail counts) are accepted
    assert group_advantages(torch.tensor([1, 0]), 2, scale="none").tolist() == [0.5, -0.5]


@pytest.mark.parametrize("seed", SEEDS)
def test_gae_with_lambda_1_gamma_1_is_reward_to_go_minus_value(seed):
    g = gen(seed)
    rewards = torch.randn(3, 6, generator=g, dtype=torch.float64)
    values = torch.randn(3, 6, generator=g, dtype=torch.float64)
    mask = right_padded_mask(seed, 3, 6)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    masked_rewards = torch.where(mask, rewards, 0.0)
    reward_to_go = masked_rewards.flip(-1).cumsum(-1).flip(-1)  # Σ_{t' ≥ t} r_t'
    torch.testing.assert_close(adv, torch.where(mask, reward_to_go - values, 0.0))
    torch.testing.assert_close(ret, torch.where(mask, reward_to_go, 0.0))


def test_gae_with_lambda_0_is_one_step_td_error():
    rewards, values = t([1.0, 2.0, 3.0]), t([0.5, 0.25, 1.0])
    adv, _ = gae(rewards, values, torch.ones(1, 3), gamma=0.9, lam=0.0)
    # δ = r + 0.9 · V_next − V, V after the last token = 0
    torch.testing.assert_close(adv, t([1.0 + 0.9 * 0.25 - 0.5, 2.0 + 0.9 * 1.0 - 0.25, 3.0 - 1.0]))


@pytest.mark.parametrize("seed", SEEDS)
def test_gae_ignores_padded_positions(seed):
    g = gen(seed)
    rewards = torch.randn(4, 5, generator=g, dtype=torch.float64)
    values = torch.randn(4, 5, generator=g, dtype=torch.float64)
    mask = right_padded_mask(seed, 4, 5)
    adv, ret = gae(rewards, values, mask, gamma=0.95, lam=0.9)
    # garbage in the padding, and three more padded columns: the valid tokens do not move
    garbage = 100 * torch.randn(4, 8, generator=g, dtype=torch.float64)
    pad_mask = torch.cat([mask, torch.zeros(4, 3, dtype=torch.bool)], dim=1)
    rewards2 = torch.where(pad_mask, torch.cat([rewards, rewards[:, :3]], 1), garbage)
    values2 = torch.where(pad_mask, torch.cat([values, values[:, :3]], 1), -garbage)
    adv2, ret2 = gae(rewards2, values2, pad_mask, gamma=0.95, lam=0.9)
    torch.testing.assert_close(adv2[:, :5], adv)
    torch.testing.assert_close(ret2[:, :5], ret)
    assert (adv2[~pad_mask] == 0).all() and (ret2[~pad_mask] == 0).all()


def test_gae_with_holes_equals_the_compacted_sequence():
    rewards, values = t([0.1, 9.0, 0.2, 9.0, 1.0]), t([0.3, 9.0, 0.4, 9.0, 0.5])
    holes = torch.tensor([[1, 0, 1, 0, 1]])
    adv, ret = gae(rewards, values, holes, gamma=0.9, lam=0.8)
    compact_adv, compact_ret = gae(t([0.1, 0.2, 1.0]), t([0.3, 0.4, 0.5]), torch.ones(1, 3), gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv[:, [0, 2, 4]], compact_adv)
    torch.testing.assert_close(ret[:, [0, 2, 4]], compact_ret)
    assert (adv[:, [1, 3]] == 0).all()


def test_gae_outputs_carry_no_gradient():
    values = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    adv, ret = gae(torch.zeros(2, 3, dtype=torch.float64), values, torch.ones(2, 3))
    assert not adv.requires_grad and not ret.requires_grad


@pytest.mark.parametrize("seed", SEEDS)
def test_value_loss_clip_behaviour(seed):
    g = gen(seed)
    old = torch.randn(3, 8, generator=g, dtype=torch.float64)
    values = (old + torch.randn(3, 8, generator=g, dtype=torch.float64)).requires_grad_(True)
    returns = torch.randn(3, 8, generator=g, dtype=torch.float64)
    mask = torch.ones(3, 8, dtype=torch.bool)
    loss = value_loss(values, old, returns, mask, clip=0.2)
    (grad,) = torch.autograd.grad(loss.sum(), values)
    v = values.detach()
    v_clip = old + (v - old).clamp(-0.2, 0.2)
    clipped_wins = (v_clip - returns) ** 2 > (v - returns) ** 2
    outside = (v - old).abs() > 0.2
    assert clipped_wins.any() and (~clipped_wins).any()
    assert (clipped_wins <= outside).all()  # the clipped term can only win where V left the trust region
    assert (grad[clipped_wins] == 0).all()
    torch.testing.assert_close(grad[~clipped_wins], (v - returns)[~clipped_wins])
    # clipping never lowers the loss; a huge clip is no clip
    unclipped = value_loss(v, old, returns, mask, clip=None)
    assert (loss.detach() >= unclipped).all()
    torch.testing.assert_close(value_loss(v, old, returns, mask, clip=1e9), unclipped)
    # with V = V_old nothing is clipped
    torch.testing.assert_close(value_loss(old, old, returns, mask, clip=0.2), 0.5 * (old - returns) ** 2)


def test_masked_whiten_properties():
    g = gen(11)
    values = 5 + 3 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    mask = right_padded_mask(11, 4, 6)
    out = masked_whiten(values, mask)
    valid = out[mask]
    assert valid.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert valid.var().item() == pytest.approx(1.0, rel=1e-6)  # unbiased, up to eps
    kept = masked_whiten(values, mask, shift_mean=False)[mask]
    assert kept.mean().item() == pytest.approx(values[mask].mean().item(), rel=1e-12)
    # padding values do not matter
    noisy = torch.where(mask, values, 1e6)
    torch.testing.assert_close(masked_whiten(noisy, mask), out)
    # one valid value or none: no spread, no NaN
    one = torch.tensor([[1, 0, 0]])
    assert masked_whiten(t([4.0, 1.0, 2.0]), one).tolist() == [[0.0, 0.0, 0.0]]
    assert masked_whiten(t([4.0, 1.0, 2.0]), one, shift_mean=False).tolist() == [[4.0, 0.0, 0.0]]
    assert masked_whiten(t([4.0, 1.0, 2.0]), torch.zeros(1, 3)).tolist() == [[0.0, 0.0, 0.0]]


def test_adaptive_kl_moves_towards_target_and_is_bounded():
    up, down, steady = (AdaptiveKLController(0.1, target=6.0, horizon=1000) for _ in range(3))
    up.update(100.0, 10)  # KL far above target: β grows, by at most 20% · n/horizon
    down.update(0.0, 10)
    steady.update(6.0, 10)
    assert up.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 1000))
    assert down.value == pytest.approx(0.1 * (1 - 0.2 * 10 / 1000))
    assert steady.value == 0.1
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0, horizon=10)


def test_shape_errors_are_clear():
    logps = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"advantages.*\[B\] = \[2\]"):
        clipped_policy_loss(logps, logps, torch.zeros(3))
    with pytest.raises(ValueError, match=r"shape \[B, T\]"):
        clipped_policy_loss(torch.zeros(6), torch.zeros(6), torch.zeros(6))
    with pytest.raises(ValueError, match="eps_low"):
        clipped_policy_loss(logps, logps, torch.zeros(2), eps_low=1.0)
    with pytest.raises(ValueError, match="clip must be >= 0"):
        value_loss(logps, logps, logps, logps, clip=-0.1)
