"""rlxf.losses preference losses: slow float64 references, hand-worked cases, properties, gradients."""

import functools
import math

import pytest
import torch

from rlxf.losses import (
    RPO_DISTANCES,
    bradley_terry_loss,
    dpo_loss,
    focal_ranking_loss,
    ipo_loss,
    orpo_loss,
    preference_metrics,
    rpo_loss,
    simpo_loss,
)

SEEDS = [0, 1, 2]
BATCH_SIZES = [1, 2, 7]


# ---------------------------------------------------------------------------------------------
# Slow references: one pair at a time, Python floats and the math module only.
# ---------------------------------------------------------------------------------------------


def ref_log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def ref_sigmoid(x):
    return math.exp(ref_log_sigmoid(x))


def ref_bt(rw, rl, m=0.0, center=0.0, p=None):
    d = rw - rl - m
    if p is None:
        loss = -ref_log_sigmoid(d)
    else:
        loss = -(p * ref_log_sigmoid(d) + (1 - p) * ref_log_sigmoid(-d))
    return loss + center * (rw + rl) ** 2


def ref_h(cw, cl, rw, rl):
    return (cw - rw) - (cl - rl)


def ref_dpo(cw, cl, rw, rl, beta, eps):
    z = beta * ref_h(cw, cl, rw, rl)
    return -(1 - eps) * ref_log_sigmoid(z) - eps * ref_log_sigmoid(-z)


def ref_ipo(cw, cl, rw, rl, tau):
    return (ref_h(cw, cl, rw, rl) - 1 / (2 * tau)) ** 2


def ref_bernoulli_kl(p_logit, q_logit):
    """KL(Bern(σ(p_logit)) || Bern(σ(q_logit))) from the definition; 1 − σ(x) is taken as σ(−x)."""
    p1, p0 = ref_sigmoid(p_logit), ref_sigmoid(-p_logit)
    q1, q0 = ref_sigmoid(q_logit), ref_sigmoid(-q_logit)
    return p1 * math.log(p1 / q1) + p0 * math.log(p0 / q0)


def ref_rpo(cw, cl, rw, rl, score_w, score_l, beta, eta, distance):
    a = beta * ref_h(cw, cl, rw, rl)
    b = eta * (score_w - score_l)
    if distance == "sq":
        return (a - b) ** 2
    if distance == "bwd_kl":
        return ref_bernoulli_kl(b, a)
    return ref_bernoulli_kl(a, b)


def ref_orpo(mean_w, mean_l, nll, lam):
    p_w, p_l = math.exp(mean_w), math.exp(mean_l)
    log_odds_w = math.log(p_w / (1 - p_w))
    log_odds_l = math.log(p_l / (1 - p_l))
    return nll - lam * ref_log_sigmoid(log_odds_w - log_odds_l)


def ref_focal(rw, rl, gamma, lam, bound):
    p = ref_sigmoid(rw - rl)
    rank = -((1 - 2 * max(0.0, p - 0.5)) ** gamma) * math.log(p)

    def barrier(r):
        r = min(max(r, -bound + 1e-3), bound - 1e-3)
        return -math.log(bound - r) - math.log(r + bound)

    return rank + lam * (barrier(rw) + barrier(rl))


# ---------------------------------------------------------------------------------------------
# Random inputs
# ---------------------------------------------------------------------------------------------


def random_logps(seed, batch, dtype=torch.float64):
    """Policy/reference sequence log-probs of the size a real run sees (tens of nats), float64."""
    g = torch.Generator().manual_seed(seed)
    base = -30 * torch.rand(4, batch, generator=g, dtype=dtype)  # [4, B]
    drift = 3 * torch.randn(4, batch, generator=g, dtype=dtype)  # policy moved away from the reference
    chosen, rejected = base[0] + drift[0], base[1] + drift[1]
    return chosen, rejected, base[0], base[1]


def random_scores(seed, batch, scale=2.0):
    g = torch.Generator().manual_seed(1000 + seed)
    return tuple(scale * torch.randn(batch, generator=g, dtype=torch.float64) for _ in range(2))


def rows(*tensors):
    return list(zip(*(t.tolist() for t in tensors), strict=True))


def assert_matches(actual, expected):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# 1. Against the slow references
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("batch", BATCH_SIZES)
def test_bradley_terry_matches_reference(seed, batch):
    rw, rl = random_scores(seed, batch)
    g = torch.Generator().manual_seed(seed)
    margin = torch.rand(batch, generator=g, dtype=torch.float64)
    p = torch.rand(batch, generator=g, dtype=torch.float64)
    assert_matches(bradley_terry_loss(rw, rl), [ref_bt(a, b) for a, b in rows(rw, rl)])
    assert_matches(
        bradley_terry_loss(rw, rl, margin=margin, center_coef=0.01),
        [ref_bt(a, b, m, 0.01) for a, b, m in rows(rw, rl, margin)],
    )
    assert_matches(
        bradley_terry_loss(rw, rl, margin=margin, soft_label=p),
        [ref_bt(a, b, m, 0.0, q) for a, b, m, q in rows(rw, rl, margin, p)],
    )


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.0), (0.1, 0.1), (0.05, 0.3)])
def test_dpo_matches_reference(seed, batch, beta, eps):
    logps = random_logps(seed, batch)
    expected = [ref_dpo(*row, beta, eps) for row in rows(*logps)]
    assert_matches(dpo_loss(*logps, beta=beta, label_smoothing=eps), expected)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("tau", [0.1, 0.5, 2.0])
def test_ipo_matches_reference(seed, batch, tau):
    logps = random_logps(seed, batch)
    assert_matches(ipo_loss(*logps, tau=tau), [ref_ipo(*row, tau) for row in rows(*logps)])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("distance", RPO_DISTANCES)
@pytest.mark.parametrize("beta,eta", [(0.2, 1.0), (0.05, 3.0)])
def test_rpo_matches_reference(seed, batch, distance, beta, eta):
    logps = random_logps(seed, batch)
    scores = random_scores(seed, batch)
    expected = [ref_rpo(*row, beta, eta, distance) for row in rows(*logps, *scores)]
    assert_matches(rpo_loss(*logps, *scores, beta=beta, eta=eta, distance=distance), expected)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("lam", [0.1, 1.0])
def test_orpo_matches_reference(seed, batch, lam):
    g = torch.Generator().manual_seed(seed)
    # mean token log-probs from near 0 (confident) to -3, on both sides of the -log 2 branch point
    mean_w = -3 * torch.rand(batch, generator=g, dtype=torch.float64) - 1e-3
    mean_l = -3 * torch.rand(batch, generator=g, dtype=torch.float64) - 1e-3
    nll = 2 * torch.rand(batch, generator=g, dtype=torch.float64)
    expected = [ref_orpo(w, l, n, lam) for w, l, n in rows(mean_w, mean_l, nll)]
    assert_matches(orpo_loss(mean_w, mean_l, nll, lam=lam), expected)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("gamma,lam,bound", [(2.0, 0.01, 5.0), (0.5, 0.1, 3.0), (3.0, 0.0, 5.0)])
def test_focal_matches_reference(seed, batch, gamma, lam, bound):
    rw, rl = random_scores(seed, batch, scale=3.0)  # some scores land beyond ±3: the clamp is exercised
    expected = [ref_focal(a, b, gamma, lam, bound) for a, b in rows(rw, rl)]
    assert_matches(focal_ranking_loss(rw, rl, gamma=gamma, barrier_weight=lam, bound=bound), expected)


# ---------------------------------------------------------------------------------------------
# Gradients: autograd against finite differences, float64
# ---------------------------------------------------------------------------------------------


def leaves(*tensors):
    return tuple(t.clone().requires_grad_(True) for t in tensors)


# fast_mode checks random Jacobian-vector products instead of every Jacobian entry. It is used for the
# losses built from several F.logsigmoid calls: on a loaded 2-core CPU each of those calls can take
# milliseconds (PyTorch splits even 3-element inputs across threads), and full mode makes hundreds.


@pytest.mark.parametrize("seed", SEEDS)
def test_gradcheck_dpo(seed):
    logps = leaves(*random_logps(seed, 3))
    loss = functools.partial(dpo_loss, beta=0.1, label_smoothing=0.2)
    assert torch.autograd.gradcheck(loss, logps, fast_mode=True)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("distance", RPO_DISTANCES)
def test_gradcheck_rpo(seed, distance):
    inputs = leaves(*random_logps(seed, 3), *random_scores(seed, 3))
    loss = functools.partial(rpo_loss, beta=0.2, eta=1.0, distance=distance)
    assert torch.autograd.gradcheck(loss, inputs, fast_mode=True)


@pytest.mark.parametrize("seed", SEEDS)
def test_gradcheck_orpo(seed):
    g = torch.Generator().manual_seed(seed)
    inputs = leaves(
        -2 * torch.rand(3, generator=g, dtype=torch.float64) - 0.05,
        -2 * torch.rand(3, generator=g, dtype=torch.float64) - 0.05,
        torch.rand(3, generator=g, dtype=torch.float64),
    )
    assert torch.autograd.gradcheck(lambda *x: orpo_loss(*x, lam=0.5), inputs)


@pytest.mark.parametrize("seed", SEEDS)
def test_gradcheck_focal(seed):
    rw, rl = random_scores(seed, 3, scale=1.5)
    assert ((rw - rl).abs() > 1e-3).all(), "keep away from the kink of max(0, P - 1/2)"
    inputs = leaves(rw, rl)
    assert torch.autograd.gradcheck(lambda *x: focal_ranking_loss(*x, gamma=2.0, barrier_weight=0.1), inputs)


def test_gradcheck_bradley_terry_and_ipo():
    rw, rl = random_scores(0, 3)
    p = torch.tensor([0.2, 0.7, 1.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda a, b: bradley_terry_loss(a, b, center_coef=0.1, soft_label=p), leaves(rw, rl)
    )
    assert torch.autograd.gradcheck(lambda *x: ipo_loss(*x, tau=0.5), leaves(*random_logps(0, 3)))


# ---------------------------------------------------------------------------------------------
# 2. Hand-worked cases
# ---------------------------------------------------------------------------------------------


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_hand_bradley_terry():
    # Δ = 2 − 1 − 0.5 = 0.5;  −log σ(0.5) = log(1 + e^−0.5) = log 1.6065307 = 0.4740770
    # centering 0.01 · (2 + 1)² = 0.09                                   → 0.5640770
    loss = bradley_terry_loss(t(2.0), t(1.0), margin=t(0.5), center_coef=0.01)
    assert loss.item() == pytest.approx(0.5640770, abs=1e-7)
    # soft label p = 0.75, no margin: Δ = 1; −[0.75 log σ(1) + 0.25 log σ(−1)]
    #   = 0.75 · 0.3132617 + 0.25 · 1.3132617 = 0.2349463 + 0.3283154     → 0.5632617
    assert bradley_terry_loss(t(2.0), t(1.0), soft_label=t(0.75)).item() == pytest.approx(0.5632617, abs=1e-7)


def test_hand_dpo_and_cdpo():
    # h = (−10 − (−11)) − (−12 − (−11)) = 1 − (−1) = 2;  βh = 0.2
    # DPO:  −log σ(0.2) = log(1 + e^−0.2) = log 1.8187308                   → 0.5981389
    # cDPO ε = 0.1: 0.9 · 0.5981389 + 0.1 · (−log σ(−0.2)), and −log σ(−z) = −log σ(z) + z = 0.7981389
    #   = 0.5383250 + 0.0798139                                          → 0.6181389
    logps = (t(-10.0), t(-12.0), t(-11.0), t(-11.0))
    assert dpo_loss(*logps, beta=0.1).item() == pytest.approx(0.5981389, abs=1e-7)
    assert dpo_loss(*logps, beta=0.1, label_smoothing=0.1).item() == pytest.approx(0.6181389, abs=1e-7)


def test_hand_ipo():
    # h = 2 (as above); 1/(2τ) = 1/(2 · 0.1) = 5;  (2 − 5)² = 9
    assert ipo_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.0), tau=0.1).item() == pytest.approx(9.0)


def test_hand_rpo():
    # a = βh = 0.2 · 2 = 0.4;  rewards 1.0 / 0.0, η = 1 → b = 1
    # sq:  (0.4 − 1)² = 0.36
    # bwd_kl with equal rewards (b = 0, target ½):
    #   ½ log(½/σ(0.4)) + ½ log(½/σ(−0.4)) = −log 2 − ½ [log σ(0.4) + log σ(−0.4)]
    #   log σ(0.4) = −0.5130153, log σ(−0.4) = −0.9130153 → −0.6931472 + 0.7130153 = 0.0198681
    # fwd_kl with b = 0: σ(0.4) = 0.5986877
    #   0.5986877 · log(0.5986877/0.5) + 0.4013123 · log(0.4013123/0.5)
    #   = 0.5986877 · 0.1801319 + 0.4013123 · (−0.2198681) = 0.1078428 − 0.0882358 = 0.0196070
    logps = (t(-10.0), t(-12.0), t(-11.0), t(-11.0))
    assert rpo_loss(*logps, t(1.0), t(0.0), distance="sq").item() == pytest.approx(0.36)
    assert rpo_loss(*logps, t(0.0), t(0.0), distance="bwd_kl").item() == pytest.approx(0.0198681, abs=1e-7)
    assert rpo_loss(*logps, t(0.0), t(0.0), distance="fwd_kl").item() == pytest.approx(0.0196070, abs=1e-7)


def test_hand_orpo():
    # P_w = 0.5 → odds 1 → log odds 0;  P_l = 0.2 → odds 0.25 → log odds −1.3862944
    # −log σ(1.3862944) = log(1 + e^−1.3862944) = log(1 + 0.25) = log 1.25 = 0.2231436
    # NLL 1.5 + λ 0.1 · 0.2231436                                         → 1.5223144
    loss = orpo_loss(t(math.log(0.5)), t(math.log(0.2)), t(1.5), lam=0.1)
    assert loss.item() == pytest.approx(1.5223144, abs=1e-7)


def test_hand_focal():
    # r_w = 1, r_l = 0: P = σ(1) = 0.7310586; weight (1 − 2 · 0.2310586)² = 0.5378828² = 0.2893180
    # rank = 0.2893180 · (−log 0.7310586 = 0.3132617) = 0.0906322
    # barrier: b(1) = −log 4 − log 6 = −3.1780538;  b(0) = −2 log 5 = −3.2188758;  sum −6.3969297
    # total = 0.0906322 + 0.01 · (−6.3969297) = 0.0906322 − 0.0639693           → 0.0266629
    assert focal_ranking_loss(t(1.0), t(0.0)).item() == pytest.approx(0.0266629, abs=1e-7)


def test_hand_preference_metrics_counts_ties_as_half():
    # β = 0.1; pair 1: r̂_w = 0.1 · (−10 + 11) = 0.1, r̂_l = 0.1 · (−12 + 11) = −0.1 → win
    #          pair 2: policy = reference → r̂_w = r̂_l = 0 → tie, counts ½
    metrics = preference_metrics(t(-10.0, -5.0), t(-12.0, -5.0), t(-11.0, -5.0), t(-11.0, -5.0), 0.1)
    assert metrics == pytest.approx(
        {
            "rewards/chosen": 0.05,
            "rewards/rejected": -0.05,
            "rewards/margin": 0.1,
            "rewards/accuracy": 0.75,
            "logps/chosen": -7.5,
            "logps/rejected": -8.5,
        }
    )
    assert all(isinstance(v, float) for v in metrics.values())


# ---------------------------------------------------------------------------------------------
# 3. Properties
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_cdpo_with_zero_smoothing_is_dpo(seed):
    logps = random_logps(seed, 5)
    z = 0.1 * ((logps[0] - logps[2]) - (logps[1] - logps[3]))
    torch.testing.assert_close(dpo_loss(*logps, beta=0.1, label_smoothing=0.0), -torch.nn.functional.logsigmoid(z))


@pytest.mark.parametrize("seed", SEEDS)
def test_rpo_bwd_kl_gradient_is_sigmoid_gap(seed):
    beta, eta = 0.2, 1.5
    chosen, rejected, ref_chosen, ref_rejected = random_logps(seed, 6)
    score_w, score_l = random_scores(seed, 6)
    policy_logit = (beta * ((chosen - ref_chosen) - (rejected - ref_rejected))).requires_grad_(True)
    # feed βΔπ in through chosen_logps with β = 1 and zero everything else, so ∂L/∂chosen = ∂L/∂(βΔπ)
    zeros = torch.zeros_like(policy_logit)
    loss = rpo_loss(policy_logit, zeros, zeros, zeros, score_w, score_l, beta=1.0, eta=eta, distance="bwd_kl")
    (grad,) = torch.autograd.grad(loss.sum(), policy_logit)
    torch.testing.assert_close(grad, torch.sigmoid(policy_logit.detach()) - torch.sigmoid(eta * (score_w - score_l)))
    # and through the real inputs: ∂L/∂chosen_logps = β · (σ(βΔπ) − σ(ηΔr))
    chosen = chosen.clone().requires_grad_(True)
    loss = rpo_loss(chosen, rejected, ref_chosen, ref_rejected, score_w, score_l, beta=beta, eta=eta)
    (grad_chosen,) = torch.autograd.grad(loss.sum(), chosen)
    torch.testing.assert_close(grad_chosen, beta * grad)


@pytest.mark.parametrize("distance", RPO_DISTANCES)
def test_rpo_is_zero_when_policy_gap_matches_reward_gap(distance):
    beta, eta = 0.2, 2.0
    score_w, score_l = random_scores(0, 8)
    # choose chosen_logps so that βΔπ = ηΔr exactly (references and rejected at 0)
    chosen = eta * (score_w - score_l) / beta
    zeros = torch.zeros_like(chosen)
    loss = rpo_loss(chosen, zeros, zeros, zeros, score_w, score_l, beta=beta, eta=eta, distance=distance)
    torch.testing.assert_close(loss, zeros, atol=1e-12, rtol=0)
    moved = rpo_loss(chosen + 1.0, zeros, zeros, zeros, score_w, score_l, beta=beta, eta=eta, distance=distance)
    assert (moved > 0).all()


def test_rpo_is_finite_for_extreme_gaps():
    big = t(1e4, -1e4, 1e4)
    zeros = torch.zeros(3, dtype=torch.float64)
    for distance in RPO_DISTANCES:
        for scores in ((big, zeros), (zeros, big)):
            loss = rpo_loss(big, zeros, zeros, zeros, *scores, distance=distance)
            assert torch.isfinite(loss).all(), distance


@pytest.mark.parametrize("tau", [0.1, 0.25, 1.0])
def test_ipo_minimum_at_half_inverse_tau(tau):
    h = (1 / (2 * tau)) + t(-1.0, -0.1, 0.0, 0.1, 1.0)  # h around the optimum
    zeros = torch.zeros_like(h)
    h = h.clone().requires_grad_(True)
    loss = ipo_loss(h, zeros, zeros, zeros, tau=tau)
    (grad,) = torch.autograd.grad(loss.sum(), h)
    assert loss[2].item() == pytest.approx(0.0, abs=1e-12) and grad[2].item() == pytest.approx(0.0, abs=1e-12)
    assert (loss[[0, 1, 3, 4]] > 0).all()
    assert grad[1] < 0 < grad[3]


@pytest.mark.parametrize("seed", SEEDS)
def test_focal_without_focusing_or_barrier_is_bradley_terry(seed):
    rw, rl = random_scores(seed, 7)
    torch.testing.assert_close(
        focal_ranking_loss(rw, rl, gamma=0.0, barrier_weight=0.0), bradley_terry_loss(rw, rl), rtol=0, atol=0
    )


def test_focal_down_weights_confident_pairs_and_keeps_scores_inside_the_barrier():
    zeros = torch.zeros(3, dtype=torch.float64)
    gaps = t(-1.0, 1.0, 4.0)
    ratio = focal_ranking_loss(gaps, zeros, barrier_weight=0.0) / bradley_terry_loss(gaps, zeros)
    assert ratio[0].item() == pytest.approx(1.0)  # wrongly ranked pair: full BT weight
    assert 1.0 > ratio[1] > ratio[2] > 0.0  # the more confident, the smaller the weight
    assert torch.isfinite(focal_ranking_loss(t(50.0), t(-50.0))).all()  # scores outside (−5, 5) are clamped


@pytest.mark.parametrize("seed", SEEDS)
def test_soft_label_one_is_bradley_terry(seed):
    rw, rl = random_scores(seed, 7)
    margin = torch.rand(7, dtype=torch.float64)
    torch.testing.assert_close(
        bradley_terry_loss(rw, rl, margin=margin, soft_label=torch.ones(7, dtype=torch.float64)),
        bradley_terry_loss(rw, rl, margin=margin),
        rtol=0,
        atol=0,
    )


def test_soft_label_half_is_symmetric():
    rw, rl = random_scores(3, 5)
    half = torch.full((5,), 0.5, dtype=torch.float64)
    torch.testing.assert_close(bradley_terry_loss(rw, rl, soft_label=half), bradley_terry_loss(rl, rw, soft_label=half))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_orpo_finite_at_the_edges(dtype):
    chosen = torch.tensor([0.0, -1e-12, -1e-30, -50.0, -50.0, 0.0], dtype=dtype, requires_grad=True)
    rejected = torch.tensor([0.0, 0.0, -1e-7, -50.0, 0.0, -50.0], dtype=dtype, requires_grad=True)
    nll = torch.ones(6, dtype=dtype)
    loss = orpo_loss(chosen, rejected, nll, lam=1.0)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
    # chosen far more likely than rejected → OR term ≈ 0; the reverse → OR term ≈ log-odds gap, large
    assert loss[5].item() == pytest.approx(1.0, abs=1e-6)
    assert loss[4].item() > 30


def test_orpo_prefers_higher_chosen_likelihood():
    chosen = t(-2.0, -1.0, -0.5)
    rejected = torch.full((3,), -1.0, dtype=torch.float64)
    loss = orpo_loss(chosen, rejected, torch.zeros(3, dtype=torch.float64), lam=1.0)
    assert loss[0] > loss[1] > loss[2]
    assert loss[1].item() == pytest.approx(math.log(2))  # equal odds → −log σ(0)


# ---------------------------------------------------------------------------------------------
# Contract: shapes, dtypes, no reduction, clear errors
# ---------------------------------------------------------------------------------------------

PAIRWISE = {
    "bradley_terry_loss": lambda x: bradley_terry_loss(x, x),
    "dpo_loss": lambda x: dpo_loss(x, x, x, x),
    "ipo_loss": lambda x: ipo_loss(x, x, x, x),
    "rpo_loss": lambda x: rpo_loss(x, x, x, x, x, x),
    "orpo_loss": lambda x: orpo_loss(-x.abs() - 0.1, -x.abs() - 0.1, x.abs()),
    "focal_ranking_loss": lambda x: focal_ranking_loss(x, x),
}


@pytest.mark.parametrize("name", PAIRWISE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_per_pair_output_without_reduction(name, dtype):
    x = torch.linspace(-1, 1, 5, dtype=dtype)
    loss = PAIRWISE[name](x)
    assert loss.shape == (5,) and loss.dtype == dtype


def test_mismatched_shapes_are_rejected_with_the_argument_names():
    a, b = torch.zeros(3), torch.zeros(4)
    with pytest.raises(ValueError, match=r"dpo_loss: all inputs must have the same shape.*rejected_logps \(4,\)"):
        dpo_loss(a, b, a, a)
    with pytest.raises(ValueError, match=r"bradley_terry_loss.*margin \(4,\)"):
        bradley_terry_loss(a, a, margin=b)
    with pytest.raises(ValueError, match=r"rpo_loss.*rejected_rewards \(4,\)"):
        rpo_loss(a, a, a, a, a, b)
    with pytest.raises(ValueError, match=r"preference_metrics.*ref_rejected_logps \(4,\)"):
        preference_metrics(a, a, a, b, 0.1)


def test_non_1d_inputs_are_rejected():
    with pytest.raises(ValueError, match=r"ipo_loss: `chosen_logps` must be 1-D.*got shape \(2, 3\)"):
        ipo_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"orpo_loss: `chosen_nll` must be 1-D.*got shape \(\)"):
        orpo_loss(torch.zeros(1), torch.zeros(1), torch.tensor(1.0))
    with pytest.raises(TypeError, match="focal_ranking_loss: `rejected_scores` must be a torch.Tensor"):
        focal_ranking_loss(torch.zeros(2), [0.0, 0.0])


def test_bad_hyperparameters_are_rejected():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match=r"rpo_loss: unknown distance 'kl'; expected one of bwd_kl, fwd_kl, sq"):
        rpo_loss(x, x, x, x, x, x, distance="kl")
    with pytest.raises(ValueError, match="tau must be > 0"):
        ipo_loss(x, x, x, x, tau=0.0)
    with pytest.raises(ValueError, match=r"label_smoothing .* \[0, 0.5\]"):
        dpo_loss(x, x, x, x, label_smoothing=0.7)
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        focal_ranking_loss(x, x, gamma=-1.0)
    with pytest.raises(ValueError, match="bound must be >"):
        focal_ranking_loss(x, x, bound=0.0)
    with pytest.raises(ValueError, match="empty batch"):
        preference_metrics(torch.zeros(0), torch.zeros(0), torch.zeros(0), torch.zeros(0), 0.1)


def test_preference_metrics_is_pure_and_detached():
    logps = [x.clone().requires_grad_(True) for x in random_logps(0, 4)]
    before = [x.detach().clone() for x in logps]
    metrics = preference_metrics(*logps, beta=0.1)
    assert set(metrics) == {
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margin",
        "rewards/accuracy",
        "logps/chosen",
        "logps/rejected",
    }
    assert metrics["rewards/margin"] == pytest.approx(metrics["rewards/chosen"] - metrics["rewards/rejected"])
    for x, y in zip(logps, before, strict=True):
        torch.testing.assert_close(x.detach(), y)


# ---------------------------------------------------------------------------------------------
# SimPO (Meng et al., arXiv 2405.14734 Eq. 6)
# ---------------------------------------------------------------------------------------------


def ref_simpo(chosen_mean, rejected_mean, beta, gamma):
    return -ref_log_sigmoid(beta * chosen_mean - beta * rejected_mean - gamma)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("beta,gamma", [(2.0, 1.0), (2.5, 1.375), (0.1, 0.0)])
def test_simpo_matches_reference(seed, beta, gamma):
    g = torch.Generator().manual_seed(seed)
    chosen = -3 * torch.rand(16, generator=g, dtype=torch.float64)
    rejected = -3 * torch.rand(16, generator=g, dtype=torch.float64)
    got = simpo_loss(chosen, rejected, beta=beta, gamma=gamma)
    want = [ref_simpo(c, r, beta, gamma) for c, r in zip(chosen.tolist(), rejected.tolist())]
    assert got.tolist() == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_hand_simpo_and_its_gradient():
    # mean log-probs −1 and −2, β = 2, γ = 1: −log σ(2·1 − 1) = log(1 + e^−1); d/d chosen = −β σ(−1)
    chosen = torch.tensor([-1.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([-2.0], dtype=torch.float64)
    loss = simpo_loss(chosen, rejected, beta=2.0, gamma=1.0)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.0)))
    loss.backward()
    assert chosen.grad.item() == pytest.approx(-2.0 / (1 + math.e))
    torch.autograd.gradcheck(lambda c, r: simpo_loss(c, r, beta=2.0, gamma=0.5),
                             (chosen.detach().requires_grad_(), rejected.requires_grad_()))


def test_simpo_target_margin_and_bad_values():
    chosen, rejected = torch.tensor([-1.0]), torch.tensor([-1.5])
    # a margin below γ/β still costs more than log 2; above it, less
    assert simpo_loss(chosen, rejected, beta=2.0, gamma=1.5).item() > math.log(2)
    assert simpo_loss(chosen, rejected, beta=2.0, gamma=0.5).item() < math.log(2)
    with pytest.raises(ValueError, match="beta > 0"):
        simpo_loss(chosen, rejected, beta=0.0)
    with pytest.raises(ValueError, match="gamma >= 0"):
        simpo_loss(chosen, rejected, gamma=-1.0)
