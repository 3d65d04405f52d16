"""REINFORCE++ advantages: token-level KL in the reward, reward-to-go, global batch normalisation.

An advantage estimator for the GRPO family (``--advantage reinforce_pp`` / ``reinforce_pp_baseline``):
no critic, no per-group std; the only normalisation is over every valid token of the batch.
docs/methods/grpo.md (REINFORCE++) has the equations, defaults and source.
"""

from __future__ import annotations

import torch

from rlxf.losses.policy import _check_same_shape, masked_whiten


@torch.no_grad()
def reinforce_pp_returns(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl: torch.Tensor | None = None,
    beta: float = 0.0,
    gamma: float = 1.0,
    group_size: int | None = None,
) -> torch.Tensor:
    """REINFORCE++ token returns before normalisation, one per completion token.

        score_i = r_i                                   (REINFORCE++)
                = r_i − mean_{j in group(i)} r_j        (group_size given: REINFORCE++-baseline)
        r_i,t   = 1[t = last valid token of i] · score_i − β · KL_i,t
        G_i,t   = Σ_{s ≥ t, s valid} γ^(s − t) r_i,s   (the return over the remaining valid tokens)

    Source: Hu, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models"
    (arXiv 2501.03262 §3: token-level KL penalty in the reward, the return, global advantage
    normalisation; REINFORCE++-baseline subtracts the group mean reward first), as coded in
    OpenRLHF (`compute_reinforce_return`, `advantage_estimator` "reinforce" / "reinforce_baseline").
    KL_i,t is the k1 estimate log π_old(y_t) − log π_ref(y_t) on the sampled tokens (the paper's).
    Masked positions are skipped (their reward is ignored and the return carries across them, as in
    `gae`) and are 0 on output. The score goes on the last valid token, the EOS or the last token of
    a truncated completion. Normalise with `reinforce_pp_advantages` (one process) or a global
    whitening over every process's tokens.

    Args:
        rewards: [N] sequence rewards, all finite, group by group when group_size is given.
        mask: [N, T] 0/1 or bool completion mask.
        kl: [N, T] per-token KL estimate (constants), or None for no KL term.
        beta: KL coefficient β ≥ 0.
        gamma: discount γ in [0, 1] (the paper: 1).
        group_size: G for the group-mean baseline, or None.

    Returns:
        [N, T] returns (no grad).
    """
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1 or mask.dim() != 2 or \
            rewards.shape[0] != mask.shape[0]:
        raise ValueError(f"reinforce_pp_returns: rewards must be [N] and mask [N, T] with the same N; got "
                         f"{tuple(getattr(rewards, 'shape', ()))} and {tuple(mask.shape)}")
    if not torch.isfinite(rewards).all():
        raise ValueError("reinforce_pp_returns: rewards must be finite; drop or replace None/NaN rewards first")
    if beta < 0 or not 0.0 <= gamma <= 1.0:
        raise ValueError(f"reinforce_pp_returns: need beta >= 0 and gamma in [0, 1]; got beta={beta}, gamma={gamma}")
    valid = mask.bool()  # [N, T]
    score = rewards.to(torch.get_default_dtype() if not rewards.is_floating_point() else rewards.dtype)
    if group_size is not None:
        if group_size < 1 or score.shape[0] % group_size:
            raise ValueError(f"reinforce_pp_returns: {score.shape[0]} rewards do not split into groups of "
                             f"{group_size}")
        grouped = score.view(-1, group_size)
        score = (grouped - grouped.mean(-1, keepdim=True)).reshape(-1)  # [N]
    last = valid.float().cumsum(-1).argmax(-1)  # [N] index of the last valid token (0 for an empty row)
    token_rewards = torch.zeros(valid.shape, dtype=score.dtype, device=score.device)
    token_rewards[torch.arange(valid.shape[0]), last] = score
    if kl is not None and beta > 0:
        _check_same_shape("reinforce_pp_returns", kl=kl, mask=mask)
        token_rewards = token_rewards - beta * kl.to(score.dtype)
    running = token_rewards.new_zeros(valid.shape[0])  # [N]
    columns = []
    for t in reversed(range(valid.shape[1])):
        here = valid[:, t]
        running = torch.where(here, token_rewards[:, t] + gamma * running, running)
        columns.append(torch.where(here, running, 0.0))
    return torch.stack(columns[::-1], dim=1) if columns else token_rewards  # [N, T]


@torch.no_grad()
def reinforce_pp_advantages(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl: torch.Tensor | None = None,
    beta: float = 0.0,
    gamma: float = 1.0,
    group_size: int | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """REINFORCE++ advantages on one process: `reinforce_pp_returns`, whitened over the batch's valid tokens.

        Â_i,t = (G_i,t − μ) / sqrt(σ² + eps),   μ, σ² over every valid token of the batch (unbiased σ²)

    Source: Hu (arXiv 2501.03262 §3, global advantage normalisation). Shapes and arguments as
    `reinforce_pp_returns`; returns [N, T], 0 at masked positions. The recipe whitens over every
    process's tokens instead (same μ and σ² as one process holding the whole batch).
    """
    returns = reinforce_pp_returns(rewards, mask, kl=kl, beta=beta, gamma=gamma, group_size=group_size)
    return masked_whiten(returns, mask, eps=eps)
