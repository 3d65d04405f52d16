"""KTO: a prospect-theoretic loss on unpaired desirable / undesirable completions.

Inputs are one value per example ([B]), as the preference losses, but the examples are not pairs:
each is one completion with a label. docs/methods/kto.md has the equations, defaults and source.
"""

from __future__ import annotations

import torch

from rlxf.losses.preference import _check_pairs


@torch.no_grad()
def kto_reference_point(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z_0: the batch's KL estimate from mismatched completions, detached, clamped at 0.

        z_0 = max(0, (1/m) Σ_i [log π_θ(y'_i | x_i) − log π_ref(y'_i | x_i)])

    where y'_i is another example's completion, paired with x_i (rlxf, as TRL, rotates the batch by
    one: y'_i = y_{i−1}). Source: Ethayarajh et al., "KTO: Model Alignment as Prospect Theoretic
    Optimization" (arXiv 2402.01306 §4.1: the KL term is estimated from mismatched pairs of the
    batch and not back-propagated through). Under data parallel the recipe averages the mean over
    processes before clamping, as TRL does.

    Args:
        kl_logps, ref_kl_logps: [m] sequence log-probs of the mismatched completions under the
            policy and the reference.

    Returns:
        0-dim tensor ≥ 0 (no grad).
    """
    _check_pairs("kto_reference_point", kl_logps=kl_logps, ref_kl_logps=ref_kl_logps)
    if kl_logps.numel() == 0:
        return kl_logps.new_zeros(())
    return (kl_logps - ref_kl_logps).mean().clamp(min=0)


def kto_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    reference_point: torch.Tensor | float,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> torch.Tensor:
    """KTO loss per example: λ_y − v(x, y), with the value measured from the reference point z_0.

        r(x, y) = log π_θ(y|x) − log π_ref(y|x)
        v(x, y) = λ_D · σ(β (r(x, y) − z_0))      if y is desirable
                  λ_U · σ(β (z_0 − r(x, y)))      if y is undesirable
        ℓ(x, y) = λ_y − v(x, y) = λ_y · (1 − σ(±β (r − z_0)))

    Source: Ethayarajh et al. (arXiv 2402.01306 §4.1, the KTO loss; TRL cites it as Eq. 7).
    Defaults: β = 0.1, λ_D = λ_U = 1 (the paper recommends λ_D n_D / (λ_U n_U) in [1, 4/3], n the
    example counts). z_0 is a constant of the update (`kto_reference_point`). Same numbers as TRL's
    `KTOTrainer` (loss_type "kto"), which concatenates the desirable and then the undesirable
    examples; here each example keeps its place in the batch.

    Args:
        logps, ref_logps: [B] sequence log-probs of each completion under the policy (with grad)
            and the reference.
        desirable: [B] bool, True for a desirable (thumbs-up) completion.
        reference_point: z_0, a 0-dim tensor or float (detached).
        beta: β > 0.
        desirable_weight, undesirable_weight: λ_D, λ_U ≥ 0.

    Returns:
        [B] per-example loss.
    """
    _check_pairs("kto_loss", logps=logps, ref_logps=ref_logps)
    if not isinstance(desirable, torch.Tensor) or desirable.shape != logps.shape or desirable.dtype != torch.bool:
        raise ValueError(f"kto_loss: `desirable` must be a bool tensor shaped like logps {tuple(logps.shape)}; "
                         f"got {getattr(desirable, 'dtype', type(desirable).__name__)} "
                         f"{tuple(getattr(desirable, 'shape', ()))}")
    if beta <= 0 or desirable_weight < 0 or undesirable_weight < 0:
        raise ValueError(f"kto_loss: need beta > 0 and weights >= 0; got beta={beta}, "
                         f"desirable_weight={desirable_weight}, undesirable_weight={undesirable_weight}")
    z0 = torch.as_tensor(reference_point, dtype=logps.dtype, device=logps.device).detach()
    margin = beta * (logps - ref_logps - z0)  # [B]
    desirable_loss = desirable_weight * (1 - torch.sigmoid(margin))
    undesirable_loss = undesirable_weight * (1 - torch.sigmoid(-margin))
    return torch.where(desirable, desirable_loss, undesirable_loss)
