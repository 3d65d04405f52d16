"""rlxf preference losses give the same numbers as TRL where both define the same computation.

TRL computes these losses inside trainer methods. Each test calls the method unbound, on a stand-in
object that carries only the attributes the method reads (and, for DPO, a stand-in model returning
per-token log-probs we choose), so no model, tokenizer or dataset is built. If a TRL release renames
those attributes, the stand-ins below are the one place to update.

Where rlxf deliberately differs from TRL (docs/losses.md), a test pins the difference down.
"""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from packaging.version import Version

from rlxf.losses import bradley_terry_loss, dpo_loss, ipo_loss, orpo_loss, preference_metrics, simpo_loss

trl = pytest.importorskip("trl")
if Version(trl.__version__) < Version("1.16"):
    pytest.skip(f"stand-ins mirror TRL >= 1.16 internals; installed TRL is {trl.__version__}", allow_module_level=True)
trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
trl_reward = pytest.importorskip("trl.trainer.reward_trainer")
trl_orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
trl_cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")


def fake_accelerator():
    return SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)


def random_pairs(seed, batch):
    """((chosen, rejected, ref_chosen, ref_rejected) sequence log-probs [B] float64, (chosen_len, rejected_len) [B])."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 9, (2, batch), generator=g)  # completion tokens of chosen / rejected
    ref = -lengths * (0.5 + 2 * torch.rand(2, batch, generator=g, dtype=torch.float64))  # ~ −1.5 nats/token
    policy = ref + 2 * torch.randn(2, batch, generator=g, dtype=torch.float64)
    return (policy[0], policy[1], ref[0], ref[1]), (lengths[0], lengths[1])


def per_token_mean(logps, lengths):
    """Divide every sequence log-prob by its completion length (what TRL's "ipo" and "sigmoid_norm" do)."""
    chosen_len, rejected_len = lengths
    chosen, rejected, ref_chosen, ref_rejected = logps
    return chosen / chosen_len, rejected / rejected_len, ref_chosen / chosen_len, ref_rejected / rejected_len


# ---------------------------------------------------------------------------------------------
# DPO: trl.trainer.dpo_trainer.DPOTrainer._compute_loss
# ---------------------------------------------------------------------------------------------


def trl_dpo_loss(logps, lengths, *, loss_type, beta, label_smoothing=0.0):
    """Run TRL's DPO loss on given sequence log-probs; returns (scalar batch-mean loss, metrics dict).

    The stand-in model spreads each sequence log-prob evenly over that completion's tokens, so TRL's
    sum over tokens gives it back (up to rounding) and TRL's token counts are the given lengths.
    """
    chosen, rejected, ref_chosen, ref_rejected = logps
    policy_logps = torch.cat([chosen, rejected])  # [2B]
    seq_lengths = torch.cat(lengths)  # [2B]
    positions = torch.arange(int(seq_lengths.max()) + 1)  # position 0 is the prompt, 1..len the completion
    completion_mask = ((positions >= 1) & (positions <= seq_lengths[:, None])).long()  # [2B, T]
    per_token = completion_mask[:, 1:] * (policy_logps / seq_lengths)[:, None]  # [2B, T-1]

    def model(**kwargs):
        zeros = torch.zeros_like(per_token)
        return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    trainer = SimpleNamespace(
        model=SimpleNamespace(training=False),
        accelerator=fake_accelerator(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros_like(completion_mask),
        "attention_mask": torch.ones_like(completion_mask),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    loss = trl_dpo.DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    metrics = {name: values[-1] for name, values in trainer._metrics["eval"].items()}
    return loss, metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_sigmoid_matches_trl_per_pair_and_in_gradient(seed, beta):
    logps, lengths = random_pairs(seed, 6)
    ours = dpo_loss(*logps, beta=beta)  # [B]
    for i in range(6):  # TRL returns the batch mean; one-pair batches give its per-pair values
        pair_logps, pair_lengths = (tuple(x[i : i + 1] for x in xs) for xs in (logps, lengths))
        theirs, _ = trl_dpo_loss(pair_logps, pair_lengths, loss_type="sigmoid", beta=beta)
        torch.testing.assert_close(theirs, ours[i], rtol=1e-12, atol=1e-12)

    ours_chosen, theirs_chosen = logps[0].clone().requires_grad_(True), logps[0].clone().requires_grad_(True)
    dpo_loss(ours_chosen, *logps[1:], beta=beta).mean().backward()
    trl_dpo_loss((theirs_chosen, *logps[1:]), lengths, loss_type="sigmoid", beta=beta)[0].backward()
    torch.testing.assert_close(ours_chosen.grad, theirs_chosen.grad, rtol=1e-12, atol=1e-12)


def test_trl_sigmoid_ignores_label_smoothing_but_rlxf_applies_cdpo():
    logps, lengths = random_pairs(3, 5)
    theirs, _ = trl_dpo_loss(logps, lengths, loss_type="sigmoid", beta=0.1, label_smoothing=0.2)
    torch.testing.assert_close(theirs, dpo_loss(*logps, beta=0.1, label_smoothing=0.0).mean())
    assert not torch.allclose(theirs, dpo_loss(*logps, beta=0.1, label_smoothing=0.2).mean())


@pytest.mark.parametrize("seed", [0, 1])
def test_dpo_sigmoid_norm_is_rlxf_dpo_on_length_normalised_logps(seed):
    logps, lengths = random_pairs(seed, 6)
    theirs, _ = trl_dpo_loss(logps, lengths, loss_type="sigmoid_norm", beta=0.1)
    ours = dpo_loss(*per_token_mean(logps, lengths), beta=0.1)
    torch.testing.assert_close(theirs, ours.mean(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_ipo_matches_trl_only_on_length_normalised_logps(seed, tau):
    logps, lengths = random_pairs(seed, 6)
    theirs, _ = trl_dpo_loss(logps, lengths, loss_type="ipo", beta=tau)
    ours = ipo_loss(*per_token_mean(logps, lengths), tau=tau)
    torch.testing.assert_close(theirs, ours.mean(), rtol=1e-12, atol=1e-12)
    # rlxf's default (sequence sums, as in the paper and OpenRLHF) is a different number
    assert not torch.allclose(theirs, ipo_loss(*logps, tau=tau).mean())


def test_preference_metrics_match_trl_dpo_metrics_without_ties():
    logps, lengths = random_pairs(4, 8)
    _, theirs = trl_dpo_loss(logps, lengths, loss_type="sigmoid", beta=0.1)
    ours = preference_metrics(*logps, beta=0.1)
    renamed = {"rewards/accuracy": "rewards/accuracies", "rewards/margin": "rewards/margins"}
    for name, value in ours.items():
        assert value == pytest.approx(theirs[renamed.get(name, name)], rel=1e-12, abs=1e-12), name


def test_accuracy_tie_counting_differs_from_trl():
    # policy == reference for every pair (step 0 of training): all implicit rewards are 0.
    # −1.5 nats on every token, so the stand-in's per-token split sums back exactly.
    _, lengths = random_pairs(5, 4)
    chosen, rejected = -1.5 * lengths[0].double(), -1.5 * lengths[1].double()
    _, theirs = trl_dpo_loss((chosen, rejected, chosen, rejected), lengths, loss_type="sigmoid", beta=0.1)
    ours = preference_metrics(chosen, rejected, chosen, rejected, beta=0.1)
    assert theirs["rewards/accuracies"] == 0.0
    assert ours["rewards/accuracy"] == 0.5


# ---------------------------------------------------------------------------------------------
# Reward model: trl.trainer.reward_trainer.RewardTrainer.compute_loss
# ---------------------------------------------------------------------------------------------


def trl_reward_loss(chosen_scores, rejected_scores, margin=None, center_coef=None):
    def model(**kwargs):
        return SimpleNamespace(logits=torch.cat([chosen_scores, rejected_scores])[:, None])  # [2B, 1]

    trainer = SimpleNamespace(
        model=SimpleNamespace(training=False),
        args=SimpleNamespace(center_rewards_coefficient=center_coef),
        accelerator=fake_accelerator(),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {} if margin is None else {"margin": margin}
    loss = trl_reward.RewardTrainer.compute_loss(trainer, model, inputs)
    return loss, {name: values[-1] for name, values in trainer._metrics["eval"].items()}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("with_margin", [False, True])
@pytest.mark.parametrize("center_coef", [None, 0.01])
def test_bradley_terry_matches_trl_reward_trainer(seed, with_margin, center_coef):
    g = torch.Generator().manual_seed(seed)
    chosen, rejected = 2 * torch.randn(2, 7, generator=g, dtype=torch.float64)
    margin = torch.rand(7, generator=g, dtype=torch.float64) if with_margin else None
    theirs, _ = trl_reward_loss(chosen, rejected, margin, center_coef)
    ours = bradley_terry_loss(chosen, rejected, margin=margin, center_coef=center_coef or 0.0)
    torch.testing.assert_close(theirs, ours.mean(), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# ORPO: trl.experimental.orpo.ORPOTrainer.odds_ratio_loss
# ---------------------------------------------------------------------------------------------


def trl_odds_ratio_term(chosen_mean_logps, rejected_mean_logps, lam):
    """TRL's per-pair λ·log σ(log-odds ratio) (a reward to maximise: rlxf's OR term with the sign flipped)."""
    trainer = SimpleNamespace(beta=lam, accelerator=fake_accelerator())
    losses, *_ = trl_orpo.ORPOTrainer.odds_ratio_loss(trainer, chosen_mean_logps, rejected_mean_logps)
    return losses


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("lam", [0.1, 1.0])
def test_orpo_matches_trl_odds_ratio_loss(seed, lam):
    g = torch.Generator().manual_seed(seed)
    # TRL casts to float32, so compare in float32; span both sides of the −log 2 branch point
    chosen = -3 * torch.rand(8, generator=g) - 1e-3
    rejected = -3 * torch.rand(8, generator=g) - 1e-3
    nll = torch.rand(8, generator=g)
    theirs = nll - trl_odds_ratio_term(chosen, rejected, lam)  # TRL: loss = nll − mean(λ·log σ(·))
    torch.testing.assert_close(orpo_loss(chosen, rejected, nll, lam=lam), theirs, rtol=1e-6, atol=1e-6)


def test_orpo_guard_where_trl_gives_nan():
    chosen = torch.tensor([0.0, -1e-3])
    rejected = torch.tensor([0.0, -1e-3])
    assert torch.isnan(trl_odds_ratio_term(chosen, rejected, 0.1)[0])  # ∞ − ∞ in TRL's log-odds
    ours = orpo_loss(chosen, rejected, torch.zeros(2), lam=0.1)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours[0], ours[1])  # equal likelihoods → −λ log σ(0) either way


# ---------------------------------------------------------------------------------------------
# SimPO: trl.experimental.cpo.CPOTrainer.cpo_loss with loss_type="simpo"
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("beta,gamma", [(2.0, 1.0), (2.5, 1.375), (0.1, 0.5)])
def test_simpo_matches_trl_cpo_simpo(seed, beta, gamma):
    # TRL's CPO with loss_type="simpo" reads average log-probs: −log σ(β(Δ − γ/β)), simpo_gamma = γ
    g = torch.Generator().manual_seed(seed)
    chosen = (-3 * torch.rand(8, generator=g, dtype=torch.float64)).requires_grad_()
    rejected = (-3 * torch.rand(8, generator=g, dtype=torch.float64)).requires_grad_()
    trainer = SimpleNamespace(alpha=0.0, accelerator=fake_accelerator(), loss_type="simpo", beta=beta,
                              simpo_gamma=gamma, label_smoothing=0.0)
    theirs, *_ = trl_cpo.CPOTrainer.cpo_loss(trainer, chosen, rejected)
    ours = simpo_loss(chosen, rejected, beta=beta, gamma=gamma)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    ours_grad = torch.autograd.grad(ours.sum(), (chosen, rejected))
    theirs_grad = torch.autograd.grad(theirs.sum(), (chosen, rejected))
    for a, b in zip(ours_grad, theirs_grad):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
