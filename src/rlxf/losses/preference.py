"""Preference losses: reward-model ranking losses and offline preference-optimisation losses.

Every loss takes one value per preference pair (tensors of shape [B]) and returns the per-pair loss
[B]; reducing over the batch (mean, sum, weighting, gradient accumulation) is the caller's choice.
Sequence log-probs are SUMS of token log-probs over the completion (docs/losses.md) unless the
docstring says otherwise; a recipe that wants length normalisation passes normalised values instead.
The preference-loss registry (`rlxf.losses.registry`) gives the recipe losses one signature.

Losses compute in the dtype they are given; pass float32 (or float64) log-probs, as
`rlxf.models.logprobs` produces. docs/losses.md lists each loss with its source and with every
place where rlxf and TRL define the same quantity differently.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rlxf.configs.choices import RPO_DISTANCES  # noqa: E402,F401 (re-exported)

# xtuner clamps reward scores this far inside the barrier so log(·) stays finite.
_BARRIER_EPS = 1e-3


def _check_pairs(fn_name: str, **tensors: torch.Tensor | None) -> None:
    """Raise (TypeError/ValueError) unless every tensor given (None = absent) is 1-D, all of one shape [B]."""
    given = {name: t for name, t in tensors.items() if t is not None}
    for name, t in given.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn_name}: `{name}` must be a torch.Tensor of shape [B], got {type(t).__name__}")
        if t.dim() != 1:
            raise ValueError(
                f"{fn_name}: `{name}` must be 1-D with one value per preference pair, shape [B]; got shape "
                f"{tuple(t.shape)}. Reduce per-token values to one per sequence before calling."
            )
    shapes = {name: tuple(t.shape) for name, t in given.items()}
    if len(set(shapes.values())) > 1:
        listing = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"{fn_name}: all inputs must have the same shape [B]; got {listing}")


def _policy_margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps) -> torch.Tensor:
    """h = [log π(y_w) − log π_ref(y_w)] − [log π(y_l) − log π_ref(y_l)]   (DPO, arXiv 2305.18290 Eq. 7)."""
    return (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)  # [B]


def bradley_terry_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    *,
    margin: torch.Tensor | None = None,
    center_coef: float = 0.0,
    soft_label: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bradley–Terry reward-model loss with optional margin, soft label and reward centering.

        Δ = r_w − r_l − m                                           (m = 0 when margin is None)
        hard label:  L = −log σ(Δ)
        soft label:  L = −[ p log σ(Δ) + (1 − p) log σ(−Δ) ]          (p = P(chosen ≻ rejected))
        L += center_coef · (r_w + r_l)²

    Sources: pairwise RM loss, InstructGPT (arXiv 2203.02155 Eq. 1) with one pair per element; margin
    as in Llama 2 (arXiv 2307.09288 §3.2.2, Eq. 2); soft labels from an AI labeler, canonical RLAIF (arXiv
    2309.00267); centering, Eisenstein et al. (arXiv 2312.09244). With p = 1
    the soft form is exactly the hard form. The margin enters Δ in both forms.

    Args:
        chosen_scores, rejected_scores: [B] scalar reward-model outputs r_w, r_l.
        margin: optional [B] margin m ≥ 0 that the chosen score must exceed the rejected one by.
        center_coef: weight of the centering penalty (TRL's recommended value is 0.01).
        soft_label: optional [B] probabilities p ∈ [0, 1] (values are not range-checked).

    Returns:
        [B] per-pair loss.
    """
    _check_pairs(
        "bradley_terry_loss",
        chosen_scores=chosen_scores,
        rejected_scores=rejected_scores,
        margin=margin,
        soft_label=soft_label,
    )
    delta = chosen_scores - rejected_scores  # [B]
    if margin is not None:
        delta = delta - margin
    if soft_label is None:
        loss = -F.logsigmoid(delta)  # [B]
    else:
        loss = -(soft_label * F.logsigmoid(delta) + (1 - soft_label) * F.logsigmoid(-delta))  # [B]
    return loss + center_coef * (chosen_scores + rejected_scores) ** 2


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """DPO loss, with conservative DPO (cDPO) when label_smoothing > 0.

        h = [log π(y_w|x) − log π_ref(y_w|x)] − [log π(y_l|x) − log π_ref(y_l|x)]
        L = −(1 − ε) log σ(β h) − ε log σ(−β h)                      (ε = label_smoothing)

    Sources: DPO, Rafailov et al. (arXiv 2305.18290 Eq. 7) for ε = 0; cDPO, Mitchell (2023 note
    "A note on DPO with noisy preferences"), ε = probability that a label is flipped — the form used
    by OpenRLHF `DPOLoss` and eric-mitchell/direct-preference-optimization.

    Deviation from TRL: TRL's `loss_type="sigmoid"` ignores `label_smoothing`; there ε only affects
    "robust", "exo_pair" and "aot". Robust DPO (TRL "robust") is a different formula (see
    docs/losses.md).

    Args:
        chosen_logps, rejected_logps: [B] policy sequence log-probs (sums over completion tokens).
        ref_chosen_logps, ref_rejected_logps: [B] reference-model sequence log-probs.
        beta: β, strength of the implicit KL regularisation (paper default 0.1).
        label_smoothing: ε ∈ [0, 0.5]; 0 gives plain DPO.

    Returns:
        [B] per-pair loss.
    """
    _check_pairs(
        "dpo_loss",
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(
            f"dpo_loss: label_smoothing is the probability that a preference label is flipped and must lie in "
            f"[0, 0.5]; got {label_smoothing}. Use 0 for plain DPO."
        )
    logits = beta * _policy_margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)  # [B]
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def ipo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    tau: float = 0.1,
) -> torch.Tensor:
    """IPO loss: squared distance of the policy log-ratio margin from 1/(2τ).

        h = [log π(y_w|x) − log π_ref(y_w|x)] − [log π(y_l|x) − log π_ref(y_l|x)]
        L = (h − 1/(2τ))²

    Source: Azar et al., "A General Theoretical Paradigm to Understand Learning from Human
    Preferences" (arXiv 2310.12036 Eq. 17). The minimum, L = 0, is at h = 1/(2τ).

    Deviation from TRL (deliberate): rlxf uses the log-probs it is given — sequence sums by default,
    as in the paper's equation, OpenRLHF, NeMo-Aligner and the eric-mitchell reference code. TRL's
    `loss_type="ipo"` divides each side's log-ratio by that completion's token count before forming h.
    To reproduce TRL, pass every log-prob divided by its completion length.

    Args:
        chosen_logps, rejected_logps: [B] policy sequence log-probs.
        ref_chosen_logps, ref_rejected_logps: [B] reference-model sequence log-probs.
        tau: τ > 0, regularisation strength (TRL passes it as `beta`).

    Returns:
        [B] per-pair loss.
    """
    _check_pairs(
        "ipo_loss",
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    if tau <= 0:
        raise ValueError(f"ipo_loss: tau must be > 0 (the target margin is 1/(2·tau)); got {tau}")
    h = _policy_margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)  # [B]
    return (h - 1 / (2 * tau)) ** 2


def _bernoulli_kl(p_logit: torch.Tensor, q_logit: torch.Tensor) -> torch.Tensor:
    """KL(Bern(σ(p_logit)) ‖ Bern(σ(q_logit))), elementwise, from log-sigmoids so no log(0) occurs."""
    log_p1, log_p0 = F.logsigmoid(p_logit), F.logsigmoid(-p_logit)
    log_q1, log_q0 = F.logsigmoid(q_logit), F.logsigmoid(-q_logit)
    return log_p1.exp() * (log_p1 - log_q1) + log_p0.exp() * (log_p0 - log_q0)


def rpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    beta: float = 0.2,
    eta: float = 1.0,
    distance: str = "bwd_kl",
) -> torch.Tensor:
    """NVIDIA reward-aware preference optimisation (RPO): match the implicit reward gap to the RM gap.

        a = β·Δπ,  Δπ = [log π(y_c|x) − log π_ref(y_c|x)] − [log π(y_l|x) − log π_ref(y_l|x)]
        b = η·Δr,  Δr = r*(x, y_c) − r*(x, y_l)
        "bwd_kl":  L = KL( Bern(σ(b)) ‖ Bern(σ(a)) )
                     = σ(b) log(σ(b)/σ(a)) + (1 − σ(b)) log((1 − σ(b))/(1 − σ(a)))
        "fwd_kl":  L = KL( Bern(σ(a)) ‖ Bern(σ(b)) )
        "sq":      L = (a − b)²

    Source: Nemotron-4 340B Technical Report (arXiv 2406.11704 §3.4, preference fine-tuning; "bwd_kl" is the
    paper's distance D); the three distances and the defaults β = 0.2, η = 1 follow NeMo-Aligner
    (`preference_loss` = rpo_bwd_kl / rpo_fwd_kl / rpo_sq).

    For "bwd_kl", ∂L/∂a = σ(a) − σ(b): DPO with the soft target σ(ηΔr) in place of 1; L = 0 when
    a = b. Every distance is computed from log σ(·), so large |a| or |b| stay finite.

    Args:
        chosen_logps, rejected_logps: [B] policy sequence log-probs (sums).
        ref_chosen_logps, ref_rejected_logps: [B] reference-model sequence log-probs.
        chosen_rewards, rejected_rewards: [B] reward-model scores r*; normally constants (no grad).
            When a dataset has none, NeMo uses 1.0 / 0.0.
        beta: β, scale of the policy's implicit reward.
        eta: η, scale of the reward-model gap.
        distance: one of "bwd_kl", "fwd_kl", "sq".

    Returns:
        [B] per-pair loss.
    """
    if distance not in RPO_DISTANCES:
        raise ValueError(f"rpo_loss: unknown distance {distance!r}; expected one of {', '.join(RPO_DISTANCES)}")
    _check_pairs(
        "rpo_loss",
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
    )
    policy_logit = beta * _policy_margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)  # [B]
    target_logit = eta * (chosen_rewards - rejected_rewards)  # [B]
    if distance == "sq":
        return (policy_logit - target_logit) ** 2
    if distance == "bwd_kl":
        return _bernoulli_kl(target_logit, policy_logit)
    return _bernoulli_kl(policy_logit, target_logit)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0 without cancellation (Mächler 2012: switch branches at x = −log 2).

    Each branch only ever sees inputs from its own range, so neither produces inf and the backward
    pass of torch.where stays NaN-free.
    """
    cut = -math.log(2.0)
    far = torch.log1p(-torch.exp(torch.clamp(x, max=cut)))  # accurate for x < −log 2
    near = torch.log(-torch.expm1(torch.clamp(x, min=cut)))  # accurate for −log 2 ≤ x < 0
    return torch.where(x < cut, far, near)


def orpo_loss(
    chosen_mean_logps: torch.Tensor,
    rejected_mean_logps: torch.Tensor,
    chosen_nll: torch.Tensor,
    *,
    lam: float = 0.1,
) -> torch.Tensor:
    """ORPO loss: chosen NLL plus λ times the odds-ratio loss (no reference model).

        log P(y|x)  = (1/|y|) Σ_t log P(y_t | x, y_<t)               (length-normalised, ≤ 0)
        log odds(y) = log P − log(1 − P) = log P − log1mexp(log P)
        L = NLL(y_w) + λ · (−log σ(log odds(y_w) − log odds(y_l)))

    Source: Hong et al., ORPO (arXiv 2403.07691 Eqs. 4–7; λ = 0.1 as in TRL's `beta` default and the
    Mistral-ORPO-β script).

    Deliberate deviation: mean log-probs are clamped to ≤ −eps (eps = machine epsilon of the dtype)
    before forming the odds. At log P = 0 the odds are infinite; TRL's `odds_ratio_loss` has no such
    guard and returns NaN when both mean log-probs are 0. The clamp only acts when the model assigns
    probability ≈ 1 to every token; there the OR gradient is zero instead of undefined.

    Args:
        chosen_mean_logps, rejected_mean_logps: [B] mean token log-probs of the chosen / rejected
            completions (≤ 0).
        chosen_nll: [B] per-pair NLL of the chosen completion (the recipe decides token-mean vs sum
            and whether prompt tokens count; TRL counts prompt + completion tokens).
        lam: λ, weight of the odds-ratio term.

    Returns:
        [B] per-pair loss.
    """
    _check_pairs(
        "orpo_loss",
        chosen_mean_logps=chosen_mean_logps,
        rejected_mean_logps=rejected_mean_logps,
        chosen_nll=chosen_nll,
    )
    eps = torch.finfo(chosen_mean_logps.dtype).eps
    chosen = chosen_mean_logps.clamp(max=-eps)  # [B]
    rejected = rejected_mean_logps.clamp(max=-eps)  # [B]
    log_odds_ratio = (chosen - _log1mexp(chosen)) - (rejected - _log1mexp(rejected))  # [B]
    return chosen_nll - lam * F.logsigmoid(log_odds_ratio)


def simpo_loss(
    chosen_mean_logps: torch.Tensor,
    rejected_mean_logps: torch.Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 1.0,
) -> torch.Tensor:
    """SimPO: a length-normalised log-prob margin with a target reward margin γ; no reference model.

        r(x, y) = (β / |y|) · log π_θ(y|x) = β · mean_t log π_θ(y_t | x, y_<t)
        L = −log σ( r(x, y_w) − r(x, y_l) − γ )

    Source: Meng, Xia and Chen, "SimPO: Simple Preference Optimization with a Reference-Free Reward"
    (arXiv 2405.14734 Eq. 6). Defaults: β = 2.0 (the paper's base-model setting, §4) and γ = 1.0,
    γ/β = 0.5 (the ratio the authors' repository suggests as a starting point). TRL's CPO trainer
    (`loss_type="simpo"`) computes −log σ(β(Δ − γ/β)) with `simpo_gamma` = γ: the same numbers.

    Args:
        chosen_mean_logps, rejected_mean_logps: [B] mean token log-probs of each completion.
        beta: β > 0, the reward scale.
        gamma: γ ≥ 0, the target margin.

    Returns:
        [B] per-pair loss.
    """
    _check_pairs("simpo_loss", chosen_mean_logps=chosen_mean_logps, rejected_mean_logps=rejected_mean_logps)
    if beta <= 0 or gamma < 0:
        raise ValueError(f"simpo_loss: need beta > 0 and gamma >= 0; got beta={beta}, gamma={gamma}")
    return -F.logsigmoid(beta * (chosen_mean_logps - rejected_mean_logps) - gamma)


def _log_barrier(scores: torch.Tensor, bound: float) -> torch.Tensor:
    """b(r) = −log(bound − r) − log(r + bound), with r clamped to (−bound + 1e-3, bound − 1e-3)."""
    r = scores.clamp(-bound + _BARRIER_EPS, bound - _BARRIER_EPS)
    return -torch.log(bound - r) - torch.log(r + bound)


def focal_ranking_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    *,
    gamma: float = 2.0,
    barrier_weight: float = 0.01,
    bound: float = 5.0,
) -> torch.Tensor:
    """COOL-RLHF reward-model loss: focal ranking loss plus a log-barrier that keeps scores in (−bound, bound).

        P = σ(r_w − r_l)
        L = −(1 − 2·max(0, P − ½))^γ · log P + λ · [b(r_w) + b(r_l)]
        b(r) = −log(bound − r) − log(r + bound),   r clamped to (−bound + 1e-3, bound − 1e-3)

    Source: InternLM2 Technical Report (arXiv 2403.17297 §4.3, COOL RLHF reward model);
    matches the official xtuner `RewardModel.focal_loss` + `log_barrier_penalty` (γ = 2, λ = 0.01,
    bound 5). The paper reports λ = 0.02. As in xtuner, the focal weight is not detached,
    and the clamp gives scores outside the barrier no barrier gradient.

    Note: 1 − 2·max(0, P − ½) = min(1, 2σ(r_l − r_w)); the right-hand side is what is computed
    because it keeps precision when P is close to 1. γ = 0 and λ = 0 give the plain BT loss.

    Args:
        chosen_scores, rejected_scores: [B] scalar reward-model outputs.
        gamma: γ ≥ 0, focusing exponent (down-weights pairs already ranked confidently).
        barrier_weight: λ, weight of the log-barrier penalty.
        bound: half-width of the allowed score interval, > 1e-3.

    Returns:
        [B] per-pair loss.
    """
    _check_pairs("focal_ranking_loss", chosen_scores=chosen_scores, rejected_scores=rejected_scores)
    if gamma < 0:
        raise ValueError(f"focal_ranking_loss: gamma must be >= 0; got {gamma}")
    if bound <= _BARRIER_EPS:
        raise ValueError(f"focal_ranking_loss: bound must be > {_BARRIER_EPS}; got {bound}")
    delta = chosen_scores - rejected_scores  # [B]
    focal_weight = torch.clamp(2 * torch.sigmoid(-delta), max=1.0) ** gamma  # [B]
    rank_loss = -focal_weight * F.logsigmoid(delta)  # [B]
    barrier = _log_barrier(chosen_scores, bound) + _log_barrier(rejected_scores, bound)  # [B]
    return rank_loss + barrier_weight * barrier


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Detached copy in float32, or in the input dtype if that is wider (logging only)."""
    return t.detach().to(torch.promote_types(t.dtype, torch.float32))


def preference_metrics(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> dict[str, float]:
    """Batch means of the DPO implicit rewards r̂(x, y) = β (log π(y|x) − log π_ref(y|x)), for logging.

    Returns a dict of floats:
        rewards/chosen, rewards/rejected   mean r̂ of the chosen / rejected completions
        rewards/margin                     mean (r̂_w − r̂_l)
        rewards/accuracy                   fraction of pairs with r̂_w > r̂_l, a tie counting ½
        logps/chosen, logps/rejected       mean policy log-probs

    Ties count ½ (TRL counts them 0): at the first step the policy equals the reference, every
    implicit reward is 0, and ½ — chance — is the honest accuracy, where 0 would read as "always
    wrong". The names follow TRL except rewards/accuracy and rewards/margin (TRL: plural).
    Inputs are detached; one host sync per call.
    """
    _check_pairs(
        "preference_metrics",
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    if chosen_logps.numel() == 0:
        raise ValueError("preference_metrics: got an empty batch (B = 0); pass at least one pair")
    chosen_logps, rejected_logps = _at_least_fp32(chosen_logps), _at_least_fp32(rejected_logps)
    chosen_rewards = beta * (chosen_logps - _at_least_fp32(ref_chosen_logps))  # [B]
    rejected_rewards = beta * (rejected_logps - _at_least_fp32(ref_rejected_logps))  # [B]
    wins = (chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()  # [B]
    names = (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margin",
        "rewards/accuracy",
        "logps/chosen",
        "logps/rejected",
    )
    values = torch.stack(
        [
            chosen_rewards.mean(),
            rejected_rewards.mean(),
            (chosen_rewards - rejected_rewards).mean(),
            wins.mean(),
            chosen_logps.mean(),
            rejected_logps.mean(),
        ]
    ).tolist()
    return dict(zip(names, values, strict=True))
