"""Loss registries: policy losses and preference losses looked up by name.

A recipe picks its loss once, by the name in its config, and calls it through one signature, so
adding a loss means adding a function and its registry entry, not a branch in every recipe that
could use it.

Policy losses (GRPO, PPO and their variants) share

    fn(logps [B, T], old_logps [B, T], advantages [B] or [B, T], mask [B, T], *,
       eps_low, eps_high, **params) -> per-token loss [B, T]

The mask is passed so that a sequence-level loss (one ratio per sequence, as GSPO, arXiv
2507.18071) is one function too; a per-token loss may ignore it, since `aggregate` applies it
afterwards.

Preference losses share

    fn(inputs: PreferenceInputs, **params) -> per-pair loss [B]

and each entry declares what it reads from `PreferenceInputs` (reference log-probs, reward
scores) and which config options supply its keyword parameters. Neither kind of function sees a
config object. docs/losses.md describes the registries and how to add a loss.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch

from rlxf.losses.policy import _check_same_shape, clip_fraction, clipped_policy_loss
from rlxf.losses.policy_variants import (cispo_clip_fraction, cispo_loss, gspo_clip_fraction, gspo_loss,
                                         gspo_token_loss)
from rlxf.losses.preference import _check_pairs, dpo_loss, ipo_loss, orpo_loss, rpo_loss, simpo_loss

PolicyLossFn = Callable[..., torch.Tensor]

_POLICY_REGISTRY: dict[str, PolicyLossFn] = {}
_POLICY_CLIP_FRACTION: dict[str, Callable[..., float]] = {}
_PREFERENCE_REGISTRY: dict[str, PreferenceLoss] = {}

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_KEYWORD = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def _describe(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _unknown(kind: str, name: Any, registered: Mapping[str, Any]) -> ValueError:
    return ValueError(f"unknown {kind} loss {name!r}; registered {kind} losses: {', '.join(registered)}")


def _accepts_keywords(fn: Callable, names: tuple[str, ...]) -> list[str]:
    """The names in ``names`` that ``fn`` cannot take as keyword arguments."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return []
    keywords = {p.name for p in params if p.kind in _KEYWORD}
    return [n for n in names if n not in keywords]


# ---------------------------------------------------------------------------------------------
# Policy losses
# ---------------------------------------------------------------------------------------------


def _check_policy_signature(name: str, fn: Callable) -> None:
    """Raise TypeError unless ``fn(logps, old_logps, advantages, mask, *, eps_low, eps_high)`` is a valid call."""
    params = list(inspect.signature(fn).parameters.values())
    positional = [p for p in params if p.kind in _POSITIONAL]
    var_positional = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)
    required_after = [p.name for p in positional[4:] if p.default is inspect.Parameter.empty]
    missing = _accepts_keywords(fn, ("eps_low", "eps_high"))
    if (len(positional) < 4 and not var_positional) or required_after or missing:
        raise TypeError(
            f"policy loss {name!r}: {_describe(fn)} must accept (logps, old_logps, advantages, mask, *, eps_low, "
            f"eps_high, **params) and return the per-token loss [B, T]"
        )


def register_policy_loss(
    name: str, *, clip_fraction_fn: Callable[..., float] = clip_fraction
) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Decorator: register ``fn(logps, old_logps, advantages, mask, *, eps_low, eps_high, **params)`` as ``name``.

    The function returns the per-token loss [B, T] (padded positions need not be zeroed;
    `aggregate` applies the mask). Its keyword defaults of ``eps_low`` and ``eps_high`` are the
    loss's clip range when a config leaves them unset (`policy_loss_defaults`).
    ``clip_fraction_fn(logps, old_logps, advantages, mask, *, eps_low, eps_high) -> float`` is the
    share of clipped tokens the recipes log (default: `clip_fraction`, the token ratio's).
    Registering a taken name for another function raises ValueError; a function without this
    signature raises TypeError.
    """

    def decorate(fn: PolicyLossFn) -> PolicyLossFn:
        if name in _POLICY_REGISTRY and _POLICY_REGISTRY[name] is not fn:
            raise ValueError(
                f"policy loss {name!r} is already registered ({_describe(_POLICY_REGISTRY[name])}); pick another name"
            )
        _check_policy_signature(name, fn)
        _POLICY_REGISTRY[name] = fn
        _POLICY_CLIP_FRACTION[name] = clip_fraction_fn
        return fn

    return decorate


def get_policy_loss(name: str) -> PolicyLossFn:
    """The policy loss registered as ``name``; ValueError listing the registered names otherwise."""
    if name not in _POLICY_REGISTRY:
        raise _unknown("policy", name, _POLICY_REGISTRY)
    return _POLICY_REGISTRY[name]


def policy_clip_fraction(name: str) -> Callable[..., float]:
    """The clip-fraction function logged with the policy loss ``name``."""
    get_policy_loss(name)
    return _POLICY_CLIP_FRACTION[name]


def policy_loss_defaults(name: str) -> dict[str, float]:
    """``{"eps_low": ..., "eps_high": ...}``: the keyword defaults of the policy loss ``name`` (0.2 where it has none)."""
    params = inspect.signature(get_policy_loss(name)).parameters
    return {key: (params[key].default if key in params and params[key].default is not inspect.Parameter.empty
                  else 0.2) for key in ("eps_low", "eps_high")}


def policy_loss_names() -> tuple[str, ...]:
    """Every registered policy loss name, in registration order."""
    return tuple(_POLICY_REGISTRY)


@register_policy_loss("clipped")
def clipped(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
) -> torch.Tensor:
    """PPO clipped surrogate per token (with DAPO clip-higher): `clipped_policy_loss` behind the registry signature.

        ρ_t = exp(clamp(log π_θ(y_t|s_t) − log π_old(y_t|s_t), −20, 20))
        ℓ_t = −min( ρ_t Â_t , clip(ρ_t, 1 − eps_low, 1 + eps_high) Â_t )

    Sources: PPO, Schulman et al. (arXiv 1707.06347 Eq. 7), negated; clip-higher, DAPO (arXiv
    2503.14476 §3.1). The values are those of `clipped_policy_loss`; the mask is only checked
    for shape, since `aggregate` applies it.

    Args:
        logps: [B, T] current-policy token log-probs (with grad).
        old_logps: [B, T] log-probs of the policy that sampled the tokens.
        advantages: [B] (broadcast over T) or [B, T].
        mask: [B, T] 0/1 or bool, 1 = a completion token that counts.
        eps_low, eps_high: clip range [1 − eps_low, 1 + eps_high].

    Returns:
        [B, T] per-token loss.
    """
    _check_same_shape("policy loss 'clipped'", logps=logps, mask=mask)
    return clipped_policy_loss(logps, old_logps, advantages, eps_low=eps_low, eps_high=eps_high)


# GSPO, GSPO-token and CISPO have the registry signature as they are (rlxf.losses.policy_variants):
# their keyword defaults are the papers' clip ranges.
register_policy_loss("gspo", clip_fraction_fn=gspo_clip_fraction)(gspo_loss)
register_policy_loss("gspo_token", clip_fraction_fn=gspo_clip_fraction)(gspo_token_loss)
register_policy_loss("cispo", clip_fraction_fn=cispo_clip_fraction)(cispo_loss)


# ---------------------------------------------------------------------------------------------
# Preference losses
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreferenceInputs:
    """The per-pair tensors a preference loss may read; every tensor has shape [B].

    Sequence log-probs are sums over the completion tokens, or means when the recipe
    length-normalises (docs/losses.md). The reference and score pairs are None when the loss
    does not need them; each pair is given whole or not at all.

    Attributes:
        chosen_logps, rejected_logps: [B] policy sequence log-probs log π(y_w|x), log π(y_l|x).
        chosen_mean_logps, rejected_mean_logps: [B] mean token log-probs of each completion (≤ 0).
        chosen_nll: [B] NLL of the chosen completion (the recipe passes the token mean, −chosen_mean_logps).
        ref_chosen_logps, ref_rejected_logps: [B] reference sequence log-probs, or None.
        chosen_scores, rejected_scores: [B] reward-model scores r*(x, y), or None.
    """

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_mean_logps: torch.Tensor
    rejected_mean_logps: torch.Tensor
    chosen_nll: torch.Tensor
    ref_chosen_logps: torch.Tensor | None = None
    ref_rejected_logps: torch.Tensor | None = None
    chosen_scores: torch.Tensor | None = None
    rejected_scores: torch.Tensor | None = None

    def __post_init__(self):
        for first, second in (("ref_chosen_logps", "ref_rejected_logps"), ("chosen_scores", "rejected_scores")):
            if (getattr(self, first) is None) != (getattr(self, second) is None):
                raise ValueError(f"PreferenceInputs: give both `{first}` and `{second}`, or neither")
        _check_pairs("PreferenceInputs", **{f.name: getattr(self, f.name) for f in fields(self)})

    @property
    def has_reference(self) -> bool:
        """True when the reference log-probs are given."""
        return self.ref_chosen_logps is not None

    @property
    def has_scores(self) -> bool:
        """True when the reward scores are given."""
        return self.chosen_scores is not None


@dataclass(frozen=True)
class PreferenceLoss:
    """One registered preference loss: ``fn(inputs, **params) -> [B]`` and what it needs.

    Attributes:
        name: the registry name (the value of the recipe's ``loss`` option).
        fn: the loss, ``fn(inputs: PreferenceInputs, **params) -> [B]``.
        needs_reference: reads ``ref_chosen_logps`` / ``ref_rejected_logps``; the recipe builds a
            reference model only when this is true.
        needs_scores: reads ``chosen_scores`` / ``rejected_scores``.
        includes_nll: the loss already contains the chosen NLL (ORPO), so the recipe's extra NLL
            term (``nll_alpha``) does not apply.
        options: ``(keyword, config option)`` pairs: each keyword parameter of ``fn`` and the
            config option that supplies it (``params`` reads them).
        summary: the first line of ``fn``'s docstring.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    needs_reference: bool
    needs_scores: bool
    includes_nll: bool
    options: tuple[tuple[str, str], ...]
    summary: str

    def option_defaults(self) -> dict[str, Any]:
        """``{config option: default}`` for each keyword of ``fn`` that has a default (the paper's value)."""
        params = inspect.signature(self.fn).parameters
        return {option: params[keyword].default for keyword, option in self.options
                if keyword in params and params[keyword].default is not inspect.Parameter.empty}

    def params(self, config: Any) -> dict[str, Any]:
        """The keyword arguments of ``fn``, read from the attributes of ``config`` that ``options`` names."""
        missing = [option for _, option in self.options if not hasattr(config, option)]
        if missing:
            raise AttributeError(
                f"preference loss {self.name!r} reads the config options {', '.join(missing)}, which "
                f"{type(config).__name__} does not have"
            )
        return {keyword: getattr(config, option) for keyword, option in self.options}

    def __call__(self, inputs: PreferenceInputs, **params: Any) -> torch.Tensor:
        """Per-pair loss [B]; ValueError when ``inputs`` lacks a pair the entry needs."""
        if self.needs_reference and not inputs.has_reference:
            raise ValueError(f"preference loss {self.name!r} needs reference log-probs (ref_chosen_logps, "
                             "ref_rejected_logps); got None")
        if self.needs_scores and not inputs.has_scores:
            raise ValueError(f"preference loss {self.name!r} needs reward scores (chosen_scores, rejected_scores); "
                             "got None")
        return self.fn(inputs, **params)


def register_preference_loss(
    name: str,
    *,
    needs_reference: bool,
    needs_scores: bool = False,
    includes_nll: bool = False,
    options: Mapping[str, str] | None = None,
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Decorator: register ``fn(inputs: PreferenceInputs, **params) -> [B]`` as the preference loss ``name``.

    ``options`` maps each keyword parameter of ``fn`` to the config option that supplies it, for
    example ``{"tau": "beta"}``. Registering a taken name for another function raises ValueError;
    an option keyword that ``fn`` does not accept raises TypeError. The function is returned
    unchanged; `get_preference_loss` returns its `PreferenceLoss` entry.
    """
    pairs = tuple((options or {}).items())

    def decorate(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if name in _PREFERENCE_REGISTRY and _PREFERENCE_REGISTRY[name].fn is not fn:
            raise ValueError(f"preference loss {name!r} is already registered "
                             f"({_describe(_PREFERENCE_REGISTRY[name].fn)}); pick another name")
        unknown = _accepts_keywords(fn, tuple(keyword for keyword, _ in pairs))
        if unknown:
            raise TypeError(f"preference loss {name!r}: {_describe(fn)} has no keyword parameter "
                            f"{', '.join(unknown)} named in `options`")
        doc = inspect.getdoc(fn) or ""
        _PREFERENCE_REGISTRY[name] = PreferenceLoss(
            name=name,
            fn=fn,
            needs_reference=needs_reference,
            needs_scores=needs_scores,
            includes_nll=includes_nll,
            options=pairs,
            summary=doc.splitlines()[0] if doc else "",
        )
        return fn

    return decorate


def get_preference_loss(name: str) -> PreferenceLoss:
    """The preference-loss entry registered as ``name``; ValueError listing the registered names otherwise."""
    if name not in _PREFERENCE_REGISTRY:
        raise _unknown("preference", name, _PREFERENCE_REGISTRY)
    return _PREFERENCE_REGISTRY[name]


def preference_loss_names() -> tuple[str, ...]:
    """Every registered preference loss name, in registration order."""
    return tuple(_PREFERENCE_REGISTRY)


@register_preference_loss("dpo", needs_reference=True, options={"beta": "beta"})
def dpo(inputs: PreferenceInputs, *, beta: float) -> torch.Tensor:
    """DPO: −log σ(β h), h = [log π(y_w) − log π_ref(y_w)] − [log π(y_l) − log π_ref(y_l)].

    Source: Rafailov et al. (arXiv 2305.18290 Eq. 7); `dpo_loss` with label_smoothing = 0.
    Reads the policy and reference sequence log-probs, each [B]; returns [B].
    """
    return dpo_loss(inputs.chosen_logps, inputs.rejected_logps, inputs.ref_chosen_logps, inputs.ref_rejected_logps,
                    beta=beta, label_smoothing=0.0)


@register_preference_loss("ipo", needs_reference=True, options={"tau": "beta"})
def ipo(inputs: PreferenceInputs, *, tau: float) -> torch.Tensor:
    """IPO: (h − 1/(2τ))², h the policy log-ratio margin of DPO.

    Source: Azar et al. (arXiv 2310.12036 Eq. 17); `ipo_loss`. τ comes from the ``beta`` option.
    Reads the policy and reference sequence log-probs, each [B]; returns [B].
    """
    return ipo_loss(inputs.chosen_logps, inputs.rejected_logps, inputs.ref_chosen_logps, inputs.ref_rejected_logps,
                    tau=tau)


@register_preference_loss("cdpo", needs_reference=True, options={"beta": "beta", "label_smoothing": "label_smoothing"})
def cdpo(inputs: PreferenceInputs, *, beta: float, label_smoothing: float) -> torch.Tensor:
    """Conservative DPO: −(1 − ε) log σ(β h) − ε log σ(−β h), ε the label-flip probability.

    Source: Mitchell, "A note on DPO with noisy preferences" (2023), on DPO arXiv 2305.18290 Eq. 7;
    `dpo_loss` with label_smoothing = ε. Reads the policy and reference sequence log-probs, each
    [B]; returns [B].
    """
    return dpo_loss(inputs.chosen_logps, inputs.rejected_logps, inputs.ref_chosen_logps, inputs.ref_rejected_logps,
                    beta=beta, label_smoothing=label_smoothing)


@register_preference_loss("rpo", needs_reference=True, needs_scores=True,
                          options={"beta": "beta", "eta": "rpo_eta", "distance": "rpo_distance"})
def rpo(inputs: PreferenceInputs, *, beta: float, eta: float, distance: str) -> torch.Tensor:
    """NVIDIA reward-aware preference optimisation: D(σ(η Δr), σ(β h)) for the chosen distance D.

    Source: Nemotron-4 340B (arXiv 2406.11704 §3.4), distances as in NeMo-Aligner; `rpo_loss`.
    Reads the policy and reference sequence log-probs and the reward scores, each [B]; returns [B].
    """
    return rpo_loss(inputs.chosen_logps, inputs.rejected_logps, inputs.ref_chosen_logps, inputs.ref_rejected_logps,
                    inputs.chosen_scores, inputs.rejected_scores, beta=beta, eta=eta, distance=distance)


@register_preference_loss("orpo", needs_reference=False, includes_nll=True, options={"lam": "orpo_lambda"})
def orpo(inputs: PreferenceInputs, *, lam: float) -> torch.Tensor:
    """ORPO: NLL(y_w) − λ log σ(log odds(y_w) − log odds(y_l)), odds from mean token log-probs; no reference.

    Source: Hong et al. (arXiv 2403.07691 Eqs. 4–7); `orpo_loss`. Reads the mean token log-probs
    and the chosen NLL, each [B]; returns [B].
    """
    return orpo_loss(inputs.chosen_mean_logps, inputs.rejected_mean_logps, inputs.chosen_nll, lam=lam)


@register_preference_loss("simpo", needs_reference=False, options={"beta": "beta", "gamma": "simpo_gamma"})
def simpo(inputs: PreferenceInputs, *, beta: float = 2.0, gamma: float = 1.0) -> torch.Tensor:
    """SimPO: −log σ(β·mean log π(y_w) − β·mean log π(y_l) − γ); no reference.

    Source: Meng et al. (arXiv 2405.14734 Eq. 6); `simpo_loss`. Reads the mean token log-probs,
    each [B]; returns [B]. The keyword defaults are the paper's β = 2 and γ = 1 (γ/β = 0.5).
    """
    return simpo_loss(inputs.chosen_mean_logps, inputs.rejected_mean_logps, beta=beta, gamma=gamma)


POLICY_LOSSES = policy_loss_names()  # the built-in names; the recipes' config choices
PREFERENCE_LOSSES = preference_loss_names()
