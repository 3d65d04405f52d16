"""Policy losses beyond PPO's clipped token ratio: GSPO, GSPO-token and CISPO.

Each takes the tensors of `clipped_policy_loss` plus the completion mask (GSPO's ratio is one per
sequence, a mean over its valid tokens) and returns the per-token loss [B, T] to minimise;
`aggregate` reduces it, so the sequence-level objectives of the papers are a choice of
aggregation mode (GSPO: "seq-mean-token-mean"; CISPO: "token-mean"). Each has a clip-fraction
companion for logging. docs/losses.md (policy losses) has the equations, defaults and sources.
"""

from __future__ import annotations

import torch

from rlxf.losses.policy import (_LOG_RATIO_CLAMP, _check_eps, _check_same_shape, _per_token, _ratio,
                               _token_share)

# GSPO's clipping ranges (Zheng et al., arXiv 2507.18071 §5.1): left 3e-4, right 4e-4.
GSPO_EPS_LOW = 3e-4
GSPO_EPS_HIGH = 4e-4
# CISPO: MiniMax-M1 (arXiv 2506.13585 §3.1) sets ε_low^IS "large" (no lower bound: 1 − 1 = 0) and
# tunes ε_high^IS without publishing it; 4 bounds the weight at 5, the ε_max = 5 that TRL recommends
# from ScaleRL (arXiv 2510.13786).
CISPO_EPS_LOW = 1.0
CISPO_EPS_HIGH = 4.0


def sequence_log_ratio(logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, 1] log s_i = (1/|y_i|) Σ_t m_t (log π_θ − log π_old), clamped to [−20, 20]; 0 for an empty row."""
    _check_same_shape("sequence_log_ratio", logps=logps, old_logps=old_logps, mask=mask)
    valid = mask.to(logps.dtype)  # [B, T]
    mean = ((logps - old_logps) * valid).sum(-1, keepdim=True) / valid.sum(-1, keepdim=True).clamp(min=1)
    return torch.clamp(mean, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)  # [B, 1]


def gspo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = GSPO_EPS_LOW,
    eps_high: float = GSPO_EPS_HIGH,
    token_level: bool = False,
) -> torch.Tensor:
    """GSPO: the clipped surrogate on one length-normalised importance ratio per sequence.

        s_i = (π_θ(y_i|x) / π_old(y_i|x))^(1/|y_i|) = exp( (1/|y_i|) Σ_t log π_θ(y_i,t) − log π_old(y_i,t) )
        sequence level (token_level=False):  ℓ_i,t = −min( s_i Â_i , clip(s_i, 1 − eps_low, 1 + eps_high) Â_i )
        GSPO-token (token_level=True):       s_i,t = sg[s_i] · π_θ(y_i,t) / sg[π_θ(y_i,t)]
                                             ℓ_i,t = −min( s_i,t Â_i,t , clip(s_i,t, 1 − eps_low, 1 + eps_high) Â_i,t )

    Source: Zheng et al., "Group Sequence Policy Optimization" (arXiv 2507.18071): the objective and
    s_i §4.1, GSPO-token §4.3; clipping ranges 3e-4 / 4e-4 (§5.1). The objective
    averages over sequences: aggregate with "seq-mean-token-mean" (every token of a sequence carries
    the same value). s_i,t equals s_i in value; its gradient is s_i ∇log π_θ(y_i,t), so with one
    advantage per sequence both forms give the same gradient (the paper's remark after Eq. 14), and
    per-token advantages (PPO's GAE) make sense only for the token form. The sequence form with
    [B, T] advantages uses s_i against each token's Â_i,t, as TRL's `importance_sampling_level=
    "sequence"` does. The mean log-ratio is clamped to [−20, 20] before exp (rlxf's clamp, as in
    `clipped_policy_loss`); TRL does not clamp.

    Args:
        logps: [B, T] current-policy token log-probs (with grad).
        old_logps: [B, T] log-probs of the sampling policy (constants).
        advantages: [B] or [B, T] (constants).
        mask: [B, T] 0/1 or bool: the tokens of each y_i (|y_i| = its sum).
        eps_low, eps_high: clip range [1 − eps_low, 1 + eps_high] of the sequence ratio.
        token_level: the GSPO-token form.

    Returns:
        [B, T] per-token loss (padded positions not zeroed; `aggregate` masks them).
    """
    _check_same_shape("gspo_loss", logps=logps, old_logps=old_logps, mask=mask)
    _check_eps("gspo_loss", eps_low, eps_high)
    advantages = _per_token("gspo_loss", advantages, logps.shape)  # [B, 1] or [B, T]
    ratio = torch.exp(sequence_log_ratio(logps, old_logps, mask))  # [B, 1]
    if token_level:
        ratio = ratio.detach() * torch.exp(logps - logps.detach())  # [B, T], value s_i
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    return torch.maximum(unclipped, clipped).expand(logps.shape)


def gspo_token_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = GSPO_EPS_LOW,
    eps_high: float = GSPO_EPS_HIGH,
) -> torch.Tensor:
    """GSPO-token: `gspo_loss` with ``token_level=True`` (arXiv 2507.18071 §4.3), for per-token advantages."""
    return gspo_loss(logps, old_logps, advantages, mask, eps_low=eps_low, eps_high=eps_high, token_level=True)


def gspo_clip_fraction(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = GSPO_EPS_LOW,
    eps_high: float = GSPO_EPS_HIGH,
) -> float:
    """Share of valid tokens whose clipped branch is active under GSPO's sequence ratio s_i.

        active_i,t = (s_i > 1 + eps_high and Â_i,t > 0) or (s_i < 1 − eps_low and Â_i,t < 0)

    Counted over tokens, so a long clipped sequence weighs more than a short one (as `clip_fraction`).
    """
    _check_eps("gspo_clip_fraction", eps_low, eps_high)
    with torch.no_grad():
        advantages = _per_token("gspo_clip_fraction", advantages, logps.shape)
        ratio = torch.exp(sequence_log_ratio(logps, old_logps, mask))  # [B, 1]
        active = ((ratio > 1.0 + eps_high) & (advantages > 0)) | ((ratio < 1.0 - eps_low) & (advantages < 0))
        return _token_share(active, mask)


def cispo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = CISPO_EPS_LOW,
    eps_high: float = CISPO_EPS_HIGH,
) -> torch.Tensor:
    """CISPO: a clipped, detached importance weight times the advantage times log π, per token.

        r_i,t = exp(clamp(log π_θ(y_i,t) − log π_old(y_i,t), −20, 20))
        r̂_i,t = clip(r_i,t, 1 − eps_low, 1 + eps_high)
        ℓ_i,t = −sg[r̂_i,t] · Â_i,t · log π_θ(y_i,t)

    Source: MiniMax-M1 (arXiv 2506.13585 §3.1, the CISPO objective and its clipped weight). The
    paper normalises by the number of tokens in the batch, 1 / Σ_i |o_i|: aggregate with
    "token-mean". Unlike the PPO surrogate, no
    token loses its gradient: the weight is bounded, not the update switched off. Defaults: no lower
    bound (eps_low = 1, the paper's "large ε_low"), eps_high = 4 (weight ≤ 5; the paper does not
    publish its value; TRL recommends ε_max = 5 from ScaleRL, arXiv 2510.13786). TRL's `"cispo"`
    clamps at `epsilon_high` itself (`clamp(ρ, max=ε_max)`): its ε_max is rlxf's 1 + eps_high.
    The loss is linear in log π, so its value is not an objective estimate; its gradient is the
    CISPO gradient.

    Args:
        logps: [B, T] current-policy token log-probs (with grad).
        old_logps: [B, T] log-probs of the sampling policy (constants).
        advantages: [B] or [B, T] (constants).
        mask: [B, T] 0/1 or bool (checked for shape; `aggregate` applies it).
        eps_low: in [0, 1]; 1 − eps_low is the lowest weight (1: none).
        eps_high: ≥ 0; 1 + eps_high is the highest weight.

    Returns:
        [B, T] per-token loss.
    """
    _check_same_shape("cispo_loss", logps=logps, old_logps=old_logps, mask=mask)
    _check_eps("cispo_loss", eps_low, eps_high, no_lower_bound_ok=True)
    advantages = _per_token("cispo_loss", advantages, logps.shape)  # [B, 1] or [B, T]
    weight = torch.clamp(_ratio(logps, old_logps), 1.0 - eps_low, 1.0 + eps_high).detach()  # [B, T]
    return -weight * advantages * logps


def cispo_clip_fraction(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = CISPO_EPS_LOW,
    eps_high: float = CISPO_EPS_HIGH,
) -> float:
    """Share of valid tokens whose importance weight CISPO clips (r > 1 + eps_high or r < 1 − eps_low)."""
    _check_eps("cispo_clip_fraction", eps_low, eps_high, no_lower_bound_ok=True)
    with torch.no_grad():
        ratio = _ratio(logps, old_logps)
        return _token_share((ratio > 1.0 + eps_high) | (ratio < 1.0 - eps_low), mask)
