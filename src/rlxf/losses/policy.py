"""Policy-gradient pieces: clipped surrogate, KL estimators, loss aggregation, advantages, value loss.

Per-token functions take [B, T] tensors (B sequences, T completion positions, right-padded) and
return [B, T]; `aggregate` is the one place a per-token loss becomes a scalar, and the aggregation
mode is a named choice (docs/losses.md, aggregation modes), so GRPO, Dr. GRPO and DAPO differ by a
mode, not by a code path. Advantage estimators (`group_advantages`, `gae`, `masked_whiten`) produce
training targets and run without autograd. Masks are 0/1 or bool, 1 = a completion token that
counts in the loss. The policy-loss registry (`rlxf.losses.registry`) names the per-token losses.

Computations stay in the dtype given; pass float32 (or float64) log-probs. docs/losses.md lists
every place where rlxf and TRL define the same quantity differently.
"""

from __future__ import annotations

import torch

from rlxf.configs.choices import ADVANTAGE_SCALES, AGGREGATION_MODES, KL_KINDS  # noqa: E402,F401 (re-exported)

# verl / OpenRLHF clamp log-ratios before exp so one wild token cannot overflow the loss.
_LOG_RATIO_CLAMP = 20.0
# verl clamps the k3 value itself ("low_var_kl").
_K3_CLAMP = 10.0


def _check_same_shape(fn_name: str, dims: int | None = 2, **tensors: torch.Tensor) -> None:
    """Raise unless every tensor has one shape (and `dims` dimensions when dims is not None)."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn_name}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
        if dims is not None and t.dim() != dims:
            raise ValueError(
                f"{fn_name}: `{name}` must have shape [B, T] (one value per completion token); got shape "
                f"{tuple(t.shape)}"
            )
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        listing = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"{fn_name}: inputs must all have the same shape; got {listing}")


def _per_token(fn_name: str, advantages: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Advantages [B] (one per sequence) or [B, T] → a tensor that broadcasts against [B, T]."""
    if advantages.dim() == 1 and advantages.shape[0] == shape[0]:
        return advantages.unsqueeze(-1)  # [B, 1]
    if advantages.shape == shape:
        return advantages
    raise ValueError(
        f"{fn_name}: `advantages` must have shape [B] = [{shape[0]}] (one per sequence) or [B, T] = "
        f"{list(shape)} (one per token); got {list(advantages.shape)}"
    )


def _ratio(logps: torch.Tensor, old_logps: torch.Tensor) -> torch.Tensor:
    """ρ = exp(clamp(log π − log π_old, −20, 20))."""
    return torch.exp(torch.clamp(logps - old_logps, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))


def _check_eps(fn_name: str, eps_low: float, eps_high: float, *, no_lower_bound_ok: bool = False) -> None:
    """eps_low in [0, 1) (or [0, 1] where 1 − eps_low = 0 means no lower bound) and eps_high >= 0."""
    if no_lower_bound_ok and eps_low == 1.0:
        pass
    elif not 0.0 <= eps_low < 1.0:
        limit = "[0, 1] (1 = no lower bound)" if no_lower_bound_ok else "[0, 1) so that 1 − eps_low > 0"
        raise ValueError(f"{fn_name}: eps_low must lie in {limit}; got {eps_low}")
    if eps_high < 0.0:
        raise ValueError(f"{fn_name}: eps_high must be >= 0; got {eps_high}")


def _token_share(active: torch.Tensor, mask: torch.Tensor) -> float:
    """Σ m_t·active_t / Σ m_t over valid tokens (0.0 for an empty mask), in float64."""
    valid = mask.bool()
    return ((active & valid).sum(dtype=torch.float64) / valid.sum().clamp(min=1)).item()


def clipped_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
) -> torch.Tensor:
    """PPO clipped surrogate, per token, as a loss to minimise (with DAPO's asymmetric clip-higher).

        ρ_t = exp(clamp(log π_θ(y_t|s_t) − log π_old(y_t|s_t), −20, 20))
        ℓ_t = −min( ρ_t Â_t , clip(ρ_t, 1 − eps_low, 1 + eps_high) Â_t )

    Sources: PPO, Schulman et al. (arXiv 1707.06347 Eq. 7), negated; clip-higher (eps_high >
    eps_low, DAPO uses 0.2 / 0.28), Yu et al. DAPO (arXiv 2503.14476 §3.1). The log-ratio clamp is
    verl's / OpenRLHF's; TRL's GRPO does not clamp. Where the clipped term is the minimum
    (ρ > 1 + eps_high with Â > 0, or ρ < 1 − eps_low with Â < 0) the token's gradient is zero.

    Padded positions are not zeroed here; `aggregate` applies the mask. `old_logps` and `advantages`
    are constants of the update: pass detached tensors.

    Args:
        logps: [B, T] current-policy token log-probs (with grad).
        old_logps: [B, T] log-probs of the policy that sampled the tokens.
        advantages: [B] (broadcast over T, as in GRPO) or [B, T] (as in PPO with GAE).
        eps_low, eps_high: clip range [1 − eps_low, 1 + eps_high].

    Returns:
        [B, T] per-token loss.
    """
    _check_same_shape("clipped_policy_loss", logps=logps, old_logps=old_logps)
    _check_eps("clipped_policy_loss", eps_low, eps_high)
    advantages = _per_token("clipped_policy_loss", advantages, logps.shape)  # [B, 1] or [B, T]
    ratio = _ratio(logps, old_logps)  # [B, T]
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    return torch.maximum(unclipped, clipped)


def clip_fraction(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
) -> float:
    """Fraction of valid tokens whose clipped branch is active (zero gradient), for logging.

        active_t = (ρ_t > 1 + eps_high and Â_t > 0) or (ρ_t < 1 − eps_low and Â_t < 0)
        clip_fraction = Σ m_t·active_t / Σ m_t            (0.0 when the mask is empty)

    Same ratio (with the [−20, 20] log-ratio clamp) and arguments as `clipped_policy_loss`. This is
    TRL GRPO's `clip_ratio/region_mean` and verl's `pg_clipfrac`. One host sync per call.
    """
    _check_same_shape("clip_fraction", logps=logps, old_logps=old_logps, mask=mask)
    _check_eps("clip_fraction", eps_low, eps_high)
    with torch.no_grad():
        advantages = _per_token("clip_fraction", advantages, logps.shape)
        ratio = _ratio(logps, old_logps)  # [B, T]
        active = ((ratio > 1.0 + eps_high) & (advantages > 0)) | ((ratio < 1.0 - eps_low) & (advantages < 0))
        return _token_share(active, mask)


def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, *, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(π_θ ‖ π_ref) from the sampled token's log-probs.

        log r = log π_ref − log π_θ
        "k1":  −log r            = log π_θ − log π_ref             (unbiased, can be negative)
        "k2":  ½ (log r)²
        "k3":  (r − 1) − log r   ≥ 0, computed as expm1(log r) − log r with log r clamped to
               [−20, 20] and the value clamped to [−10, 10]

    Sources: Schulman, "Approximating KL Divergence" (2020 note; k1, k2, k3); k3 is the GRPO
    penalty, Shao et al. DeepSeekMath (arXiv 2402.03300 §4.1.1). The k3 clamps follow verl
    (`kl_penalty` "low_var_kl"); TRL does not clamp (identical for |log r| ≤ 20 and k3 ≤ 10). Beyond
    a clamp the gradient is zero. expm1 keeps k3's precision when π_θ ≈ π_ref, where
    exp(log r) − 1 − log r cancels. k1 and k2 are not clamped.

    KL-in-reward (PPO-RLHF) uses k1 on detached log-probs; KL-in-loss (GRPO) adds β·k3 to the
    per-token loss, with gradient.

    Args:
        logps: [B, T] policy token log-probs.
        ref_logps: [B, T] reference-model log-probs of the same tokens.
        kind: "k1", "k2" or "k3".

    Returns:
        [B, T] per-token KL estimate (padded positions not zeroed).
    """
    if kind not in KL_KINDS:
        raise ValueError(f"kl_penalty: unknown kind {kind!r}; expected one of {', '.join(KL_KINDS)}")
    _check_same_shape("kl_penalty", dims=None, logps=logps, ref_logps=ref_logps)
    if kind == "k1":
        return logps - ref_logps
    if kind == "k2":
        return 0.5 * (logps - ref_logps) ** 2
    log_r = torch.clamp(ref_logps - logps, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    return torch.clamp(torch.expm1(log_r) - log_r, -_K3_CLAMP, _K3_CLAMP)


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: str = "token-mean",
    max_len: int | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss [B, T] to a scalar over the valid tokens (docs/losses.md, aggregation modes).

        n_i = Σ_t m_it   (valid tokens of sequence i),   S = { i : n_i > 0 }
        "token-mean"               Σ_it m ℓ / Σ_it m                   (DAPO §3.3; verl default)
        "seq-mean-token-mean"      (1/|S|) Σ_{i∈S} (Σ_t m ℓ / n_i)     (GRPO, DeepSeekMath §4.1.1)
        "seq-mean-token-sum"       (1/|S|) Σ_{i∈S} Σ_t m ℓ
        "seq-mean-token-sum-norm"  Σ_it m ℓ / (B · max_len)           (Dr. GRPO, arXiv 2503.20783)

    Sequences with no valid token are left out of the sequence count |S|, as verl's `agg_loss`
    does: a fully masked sequence (e.g. a truncated completion masked out) carries no loss and does
    not dilute the others. TRL's GRPO `loss_type="grpo"` instead divides by all B rows.
    "seq-mean-token-sum-norm" divides by the constant B · max_len over all rows, since its point is
    a normaliser that does not depend on lengths (TRL `"dr_grpo"`: B · max_completion_length). An
    all-masked batch gives 0, never NaN. Padded positions are selected away with `torch.where`, so
    NaN or inf there cannot leak into the result or its gradient.

    Micro-batching: "token-mean" over the full batch equals the micro-batch token-means weighted by
    their token counts; the recipe supplies those weights when it accumulates gradients.

    Args:
        per_token: [B, T] per-token loss.
        mask: [B, T] 0/1 or bool.
        mode: one of AGGREGATION_MODES.
        max_len: the constant L_max (e.g. max completion length); required for
            "seq-mean-token-sum-norm", ignored by the other modes.

    Returns:
        0-dim tensor.
    """
    if mode not in AGGREGATION_MODES:
        raise ValueError(f"aggregate: unknown mode {mode!r}; expected one of {', '.join(AGGREGATION_MODES)}")
    _check_same_shape("aggregate", per_token=per_token, mask=mask)
    valid = mask.bool()  # [B, T]
    masked = torch.where(valid, per_token, 0.0)  # [B, T]
    tokens = valid.sum(-1)  # [B]
    if mode == "token-mean":
        return masked.sum() / tokens.sum().clamp(min=1)
    if mode == "seq-mean-token-sum-norm":
        if max_len is None or max_len <= 0:
            raise ValueError(
                "aggregate: mode 'seq-mean-token-sum-norm' divides by B · max_len and needs max_len, a positive "
                f"constant such as the maximum completion length; got max_len={max_len}"
            )
        return masked.sum() / (per_token.shape[0] * max_len)
    per_sequence = masked.sum(-1)  # [B]
    if mode == "seq-mean-token-mean":
        per_sequence = per_sequence / tokens.clamp(min=1)
    return per_sequence.sum() / (tokens > 0).sum().clamp(min=1)


@torch.no_grad()
def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    scale: str = "group",
    leave_one_out: bool = False,
    eps: float = 1e-4,
) -> torch.Tensor:
    """Group-relative advantages for GRPO, Dr. GRPO, DAPO and RLOO: one value per completion.

    Rewards come group by group: rewards[g·G : (g+1)·G] are the G completions of prompt g.

        centre:  c_i = r_i − mean_group(r)                            (leave_one_out=False, GRPO)
                 c_i = r_i − mean of the OTHER G − 1 rewards          (leave_one_out=True, RLOO)
                     = G/(G − 1) · (r_i − mean_group(r))
        scale:   "group"  Â_i = c_i / (std_group(r) + eps)
                 "batch"  Â_i = c_i / (std_batch(r) + eps)            (std over all N rewards)
                 "none"   Â_i = c_i                                   (Dr. GRPO)

    std is the unbiased (n − 1) standard deviation of the rewards, as in TRL, verl and OpenRLHF.
    Sources: GRPO outcome supervision, DeepSeekMath (arXiv 2402.03300 §4.1.2); Dr. GRPO drops the
    std (arXiv 2503.20783); RLOO baseline, Kool et al. 2019 / Ahmadian et al. (arXiv 2402.14740);
    "batch" is TRL's `scale_rewards="batch"` (centre per group, scale by the batch std). eps = 1e-4
    is TRL's (verl 1e-6, OpenRLHF 1e-9).

    A group whose rewards are all equal gets Â = 0 exactly (no learning signal; the mean's rounding
    residue, which TRL divides by eps, is not kept). A singleton group
    (group_size = 1) has no baseline and no std: its advantage is 0, without NaN.

    Args:
        rewards: [N] scalar rewards, N = group_size · num_groups, all finite (map "no opinion"
            rewards out before calling).
        group_size: G, completions per prompt.
        scale: "group", "batch" or "none".
        leave_one_out: use the RLOO baseline instead of the group mean.
        eps: added to the std before dividing.

    Returns:
        [N] advantages (no grad).
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"group_advantages: unknown scale {scale!r}; expected one of {', '.join(ADVANTAGE_SCALES)}")
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        shape = tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__
        raise ValueError(f"group_advantages: `rewards` must be a 1-D tensor [N], one per completion; got {shape}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_advantages: group_size must be a positive int; got {group_size!r}")
    n = rewards.shape[0]
    if n % group_size != 0:
        raise ValueError(
            f"group_advantages: {n} rewards do not split into groups of {group_size} (N % group_size = "
            f"{n % group_size}); rewards must be ordered group by group, group_size per prompt"
        )
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())
    if not torch.isfinite(rewards).all():
        bad = torch.nonzero(~torch.isfinite(rewards)).flatten().tolist()
        raise ValueError(
            f"group_advantages: rewards at indices {bad[:10]} are not finite; drop or replace rewards that have no "
            "value (None, NaN) before computing advantages"
        )
    if group_size == 1 or n == 0:
        return torch.zeros_like(rewards)
    grouped = rewards.view(-1, group_size)  # [num_groups, G]
    centred = grouped - grouped.mean(-1, keepdim=True)  # [num_groups, G]
    if leave_one_out:
        centred = centred * (group_size / (group_size - 1))  # r − mean of the others
    # all-equal groups are exactly 0, not a rounding residue of the mean divided by eps
    all_equal = grouped.amax(-1, keepdim=True) == grouped.amin(-1, keepdim=True)  # [num_groups, 1]
    centred = torch.where(all_equal, 0.0, centred).reshape(-1)  # [N]
    if scale == "none":
        return centred
    if scale == "group":
        std = grouped.std(-1, keepdim=True).expand_as(grouped).reshape(-1)  # [N]
    else:
        std = rewards.std()  # N >= 2 here
    return centred / (std + eps)


@torch.no_grad()
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over completion tokens, with returns for the value loss.

        δ_t = r_t + γ V_{t+1} − V_t,          V beyond the last valid token = 0
        Â_t = Σ_{l≥0} (γλ)^l δ_{t+l} = δ_t + γλ Â_{t+1}
        G_t = Â_t + V_t                       (returns use the values given, i.e. the OLD values)

    Source: Schulman et al., GAE (arXiv 1506.02438 Eq. 16); the per-token LLM form follows TRL's
    former PPO trainer and verl `compute_gae_advantage_return`.

    Written as one reverse loop over T, vectorised over B. "Next" means the next VALID position:
    masked positions are skipped (their reward and value are ignored, and V and Â are carried across
    them), so right padding is the case "V beyond the last valid token = 0", and a mask with holes
    (e.g. tool-output tokens) behaves like the sequence with the holes removed — verl does the same.
    Masked positions of both outputs are 0. Runs without autograd: advantages and returns are
    targets.

    Args:
        rewards: [B, T] per-token rewards (e.g. −β·k1 on every token, plus the score on the last).
        values: [B, T] value estimates V_old(s_t).
        mask: [B, T] 0/1 or bool.
        gamma: discount γ.
        lam: GAE λ (λ = 1: Monte-Carlo return minus value; λ = 0: one-step TD error).

    Returns:
        (advantages, returns), both [B, T].
    """
    _check_same_shape("gae", rewards=rewards, values=values, mask=mask)
    valid = mask.bool()  # [B, T]
    next_value = values.new_zeros(values.shape[0])  # [B] V of the next valid position
    next_advantage = values.new_zeros(values.shape[0])  # [B]
    columns = []
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # [B]
        advantage = delta + gamma * lam * next_advantage  # [B]
        here = valid[:, t]
        next_value = torch.where(here, values[:, t], next_value)
        next_advantage = torch.where(here, advantage, next_advantage)
        columns.append(torch.where(here, advantage, 0.0))
    advantages = torch.stack(columns[::-1], dim=1)  # [B, T]
    returns = torch.where(valid, advantages + values, 0.0)  # [B, T]
    return advantages, returns


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float | None = 0.2,
) -> torch.Tensor:
    """Clipped value-function loss, per token.

        V_clip = clip(V, V_old − c, V_old + c)
        ℓ_t = ½ · max( (V_t − G_t)² , (V_clip,t − G_t)² )            (clip = c)
        ℓ_t = ½ · (V_t − G_t)²                                       (clip = None)

    Source: the PPO value clipping of OpenAI baselines / lm-human-preferences, used by TRL's former
    PPO trainer, verl and OpenRLHF (defaults: TRL 0.2, verl/OpenRLHF 0.5). Where the clipped
    term is the larger one the gradient is zero.

    Args:
        values: [B, T] current value predictions (with grad).
        old_values: [B, T] values at rollout time (constants).
        returns: [B, T] targets G_t (e.g. from `gae`).
        mask: [B, T] 0/1 or bool.
        clip: c ≥ 0, or None for the unclipped loss.

    Returns:
        [B, T] per-token loss, 0 at masked positions; reduce it with `aggregate`.
    """
    _check_same_shape("value_loss", values=values, old_values=old_values, returns=returns, mask=mask)
    loss = (values - returns) ** 2  # [B, T]
    if clip is not None:
        if clip < 0:
            raise ValueError(f"value_loss: clip must be >= 0 (or None for no clipping); got {clip}")
        clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
        loss = torch.maximum(loss, (clipped_values - returns) ** 2)
    return torch.where(mask.bool(), 0.5 * loss, 0.0)


@torch.no_grad()
def masked_whiten(
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    shift_mean: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Whiten values over the valid tokens of the whole batch (advantage whitening).

        μ = mean_valid(x),   σ² = Σ_valid (x − μ)² / (n − 1)        (unbiased, as TRL and verl)
        shift_mean=True:   x̂ = (x − μ) / sqrt(σ² + eps)
        shift_mean=False:  x̂ = (x − μ) / sqrt(σ² + eps) + μ          (TRL's reward whitening)

    Source: Huang et al., "The N+ Implementation Details of RLHF with PPO" (arXiv 2403.17031);
    TRL's former PPO `masked_whiten`, verl `masked_whiten`. n ≤ 1 valid value
    has no spread: σ² is taken as 0, so the result is 0 (shift_mean) or μ, never NaN (TRL raises).
    Masked positions are 0 on output and never affect μ or σ². Runs without autograd.

    Args:
        values: tensor of any shape, e.g. [B, T] advantages.
        mask: same shape, 0/1 or bool.
        shift_mean: False keeps the mean (only rescales).
        eps: added to the variance.

    Returns:
        tensor shaped like values.
    """
    _check_same_shape("masked_whiten", dims=None, values=values, mask=mask)
    valid = mask.bool()
    count = valid.sum()
    mean = torch.where(valid, values, 0.0).sum() / count.clamp(min=1)
    squared = torch.where(valid, (values - mean) ** 2, 0.0).sum()
    variance = squared / (count - 1).clamp(min=1)
    whitened = (values - mean) * torch.rsqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(valid, whitened, 0.0)


class FixedKLController:
    """Constant KL coefficient β, with the same interface as AdaptiveKLController."""

    def __init__(self, coef: float):
        self.value = float(coef)

    def update(self, observed_kl: float, n_steps: int) -> None:
        """No-op: β stays fixed."""

    def state_dict(self) -> dict:
        """β, for checkpoints (a resumed run continues with the same coefficient)."""
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller that steers the observed KL towards a target (Ziegler et al.).

        e = clip(KL_obs / KL_target − 1, −0.2, 0.2)
        β ← β · (1 + e · n_steps / horizon)

    Source: Ziegler et al., "Fine-Tuning Language Models from Human Preferences" (arXiv 1909.08593,
    the log-space proportional controller for β), as coded in openai/lm-human-preferences
    `train_policy.py` and verl `AdaptiveKLController`. lm-human-preferences launch
    settings: init 0.15, target 6, horizon 10000.
    """

    def __init__(self, init_coef: float, target: float, horizon: float):
        if target <= 0:
            raise ValueError(f"AdaptiveKLController: target KL must be > 0; got {target}")
        if horizon <= 0:
            raise ValueError(f"AdaptiveKLController: horizon must be > 0; got {horizon}")
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, observed_kl: float, n_steps: int) -> None:
        """Move β after observing the mean KL of `n_steps` samples (a float or 0-dim tensor)."""
        error = min(max(float(observed_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        """β, for checkpoints (a resumed run continues with the same coefficient)."""
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
