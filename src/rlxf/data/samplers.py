"""Prompt samplers: which training prompts go into each rollout batch of an online recipe.

An online recipe (GRPO, PPO) asks a sampler for prompt indices, rolls them out, scores them and
feeds back what it saw::

    sampler = get_sampler("aps", num_prompts=len(prompts), seed=0)
    indices = sampler.sample(batch_size)                  # distinct indices into the prompt set
    ...                                                   # rollouts, rewards, policy step
    sampler.update(indices, pass_rates, nll=answer_nll)   # pass rate of each group in [0, 1]
    log(sampler.stats())

Two samplers share that interface (:class:`PromptSampler`):

- :class:`UniformSampler` — epochs of shuffled order, each prompt once per epoch;
- :class:`APSSampler` — adaptive, difficulty-aware sampling (rlxf's design of APS, arXiv 2507.01327;
  the formula and every parameter are in the class docstring and docs/samplers.md).

``state_dict()`` is plain JSON data (numbers, lists, ``None``), RNG state included, so it can go
into a checkpoint's ``state.json``; a run resumed from it draws exactly the batches an
uninterrupted run would have drawn.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Protocol, runtime_checkable

import torch

SAMPLERS = ("uniform", "aps")


@runtime_checkable
class PromptSampler(Protocol):
    """What an online recipe needs from a prompt sampler."""

    num_prompts: int

    def sample(self, batch_size: int) -> list[int]:
        """``batch_size`` distinct indices into the prompt set."""

    def update(self, indices: list[int], pass_rates: list[float], nll: list[float] | None = None) -> None:
        """Feedback after the rollouts of ``indices``: each group's pass rate in [0, 1] and, optionally,
        the policy's mean token NLL of each prompt's reference answer."""

    def stats(self) -> dict[str, float]:
        """Scalars to log, keys prefixed ``sampler/``."""

    def state_dict(self) -> dict:
        """Everything needed to resume, as plain JSON data."""

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`."""


# -- uniform ------------------------------------------------------------------------------------

class UniformSampler:
    """Shuffled epochs: every prompt once per epoch, in an order fixed by ``seed``.

    Epoch ``e`` is ``torch.randperm(num_prompts)`` from a generator seeded with ``seed + e`` (as
    :class:`~rlxf.data.batching.EpochBatcher`). Batches take the next unserved prompts of the
    epoch; a batch that crosses into the next epoch takes the rest of it from the new permutation,
    skipping prompts already in the batch (they stay in the new epoch's queue, served later), so a
    batch never repeats a prompt and each epoch still serves every prompt exactly once.
    """

    def __init__(self, num_prompts: int, seed: int = 0):
        _check_num_prompts(num_prompts)
        self.num_prompts, self.seed = num_prompts, seed
        self.epoch = 0
        self._queue = self._permutation(0)  # unserved prompts of the current epoch, in order
        self._batch_pass_rate = math.nan

    def _permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_prompts, generator=generator).tolist()

    def sample(self, batch_size: int) -> list[int]:
        _check_batch_size(batch_size, self.num_prompts)
        batch = self._queue[:batch_size]
        self._queue = self._queue[batch_size:]
        if len(batch) < batch_size:
            self.epoch += 1
            in_batch = set(batch)
            queue = self._permutation(self.epoch)
            fill = [i for i in queue if i not in in_batch][:batch_size - len(batch)]
            taken = set(fill)
            batch += fill
            self._queue = [i for i in queue if i not in taken]
        if not self._queue:
            self.epoch, self._queue = self.epoch + 1, self._permutation(self.epoch + 1)
        return batch

    def update(self, indices: list[int], pass_rates: list[float], nll: list[float] | None = None) -> None:
        """Check the feedback and remember the batch's mean pass rate (the order does not adapt)."""
        _check_feedback(indices, pass_rates, nll, self.num_prompts)
        self._batch_pass_rate = float(sum(pass_rates)) / len(pass_rates)

    def stats(self) -> dict[str, float]:
        """``sampler/epoch``, ``sampler/batch_pass_rate`` (NaN before feedback) and the weight
        statistics of :func:`weight_stats` (all those of a uniform distribution)."""
        probs = torch.full((self.num_prompts,), 1.0 / self.num_prompts, dtype=torch.float64)  # [N]
        return {"sampler/epoch": float(self.epoch), "sampler/batch_pass_rate": self._batch_pass_rate,
                **weight_stats(probs)}

    def state_dict(self) -> dict:
        return {"sampler": "uniform", "num_prompts": self.num_prompts, "seed": self.seed, "epoch": self.epoch,
                "queue": list(self._queue), "batch_pass_rate": _json_float(self._batch_pass_rate)}

    def load_state_dict(self, state: dict) -> None:
        """Restore the epoch and its unserved prompts; the sampler, prompt count and seed must match."""
        _check_resume(state, "uniform", self.num_prompts, self.seed)
        self.epoch, self._queue = int(state["epoch"]), [int(i) for i in state["queue"]]
        self._batch_pass_rate = _float_or_nan(state["batch_pass_rate"])


# -- APS ----------------------------------------------------------------------------------------

class APSSampler:
    """Adaptive perplexity-aware sampling: draw prompts near a difficulty that follows the model.

    **This is rlxf's own design, not the paper's formula.** The APS paper (arXiv 2507.01327)
    describes the mechanism — Monte-Carlo rollouts measure the model's current
    capability, and per-sample sampling probabilities are re-weighted from the model's average
    proficiency so that it meets progressively harder samples — but its exact weighting formula
    was not available. rlxf implements that mechanism as docs/samplers.md describes; it has not
    been validated against the paper's numbers.

    Per prompt ``i`` (``N`` prompts):

    ``pass_i``
        EMA of the pass rate of ``i``'s rollout groups: the first observation sets it, then
        ``pass_i ← ema·pass_i + (1 − ema)·observed``.
    ``u_i``
        the latest mean token NLL of ``i``'s reference answer under the policy, normalised to
        [0, 1]: ``min(nll / nll_scale, 1)``, or, when ``nll_scale`` is None, ``nll / M`` with ``M``
        the largest NLL seen so far over all prompts (a running max, so the scale settles as more
        prompts are seen; pass a fixed ``nll_scale`` for a stationary one). The latest value is kept
        rather than an EMA because, unlike a pass rate from k rollouts, it is not a noisy estimate.
    difficulty
        ``d_i = (1 − nll_weight)·(1 − pass_i) + nll_weight·u_i`` when an NLL was ever given for
        ``i``, else ``d_i = 1 − pass_i``; for a prompt never fed back, ``d_i = prior_difficulty``,
        or, when that is None (default), ``d_i = target`` — an unseen prompt is assumed to be
        exactly on target, so it gets the peak weight and is explored early.
    proficiency
        EMA of the batch accuracy (mean pass rate of one :meth:`update` call): the first batch sets
        it, then ``prof ← prof_ema·prof + (1 − prof_ema)·batch_accuracy``; 0.5 before any feedback.
    target difficulty
        ``target = clip(0.5 + target_offset + target_slope·(prof − 0.5), 0, 1)``. A group with pass
        rate 0.5 has the largest reward variance, hence the largest group-relative advantages, so
        difficulty 0.5 is the neutral target; the target then rises with proficiency
        (competence–difficulty alignment): with ``target_slope=1`` it equals the proficiency, with
        0 it stays at ``0.5 + target_offset``.
    weights
        ``k_i = exp(−(d_i − target)² / (2σ²))``, ``p_i = (1 − floor)·k_i / Σ_j k_j + floor / N``.
        Prompts that are always solved (``d ≈ 0``) or never solved (``d ≈ 1``) lose weight; the
        uniform floor keeps every ``p_i ≥ floor / N`` so nothing is starved for good.

    A batch is ``batch_size`` draws without replacement from ``p`` (``torch.multinomial`` with a
    generator whose state is part of :meth:`state_dict`).
    """

    def __init__(self, num_prompts: int, seed: int = 0, *, ema: float = 0.5, prof_ema: float = 0.9,
                 sigma: float = 0.25, floor: float = 0.05, nll_weight: float = 0.5, nll_scale: float | None = None,
                 target_offset: float = 0.0, target_slope: float = 0.5, prior_difficulty: float | None = None):
        _check_num_prompts(num_prompts)
        _check_range("ema", ema, 0.0, 1.0, high_open=True)
        _check_range("prof_ema", prof_ema, 0.0, 1.0, high_open=True)
        _check_range("floor", floor, 0.0, 1.0, low_open=True)
        _check_range("nll_weight", nll_weight, 0.0, 1.0)
        _check_range("target_offset", target_offset, -1.0, 1.0)
        _check_range("target_slope", target_slope, 0.0, 1.0)
        if not (isinstance(sigma, Real) and math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"APSSampler: sigma (the width of the difficulty kernel) must be a positive number, "
                             f"got {sigma!r}; 0.25 is the default")
        if nll_scale is not None and not (isinstance(nll_scale, Real) and math.isfinite(nll_scale)
                                          and nll_scale > 0):
            raise ValueError(f"APSSampler: nll_scale must be a positive number (the NLL that counts as "
                             f"difficulty 1) or None for a running max, got {nll_scale!r}")
        if prior_difficulty is not None:
            _check_range("prior_difficulty", prior_difficulty, 0.0, 1.0)
        self.num_prompts, self.seed = num_prompts, seed
        self.ema, self.prof_ema, self.sigma, self.floor = ema, prof_ema, sigma, floor
        self.nll_weight, self.nll_scale = nll_weight, nll_scale
        self.target_offset, self.target_slope, self.prior_difficulty = target_offset, target_slope, prior_difficulty
        self._generator = torch.Generator().manual_seed(seed)
        self._pass_ema = torch.full((num_prompts,), math.nan, dtype=torch.float64)  # [N], NaN = never fed back
        self._nll = torch.full((num_prompts,), math.nan, dtype=torch.float64)  # [N], NaN = no NLL given
        self._nll_max = 0.0
        self._proficiency: float | None = None
        self._batch_difficulty = math.nan
        self._batch_pass_rate = math.nan

    # -- the model of difficulty --

    @property
    def proficiency(self) -> float:
        """EMA of batch accuracy; 0.5 before any feedback."""
        return 0.5 if self._proficiency is None else self._proficiency

    @property
    def target(self) -> float:
        """The target difficulty for the current proficiency."""
        target = 0.5 + self.target_offset + self.target_slope * (self.proficiency - 0.5)
        return min(1.0, max(0.0, target))

    def difficulties(self) -> torch.Tensor:
        """``d_i`` of every prompt, ``[N]`` float64 in [0, 1] (unseen prompts at their prior)."""
        difficulty = 1.0 - self._pass_ema  # [N], NaN where unseen
        has_nll = ~torch.isnan(self._nll)  # [N]
        if has_nll.any():
            scale = self.nll_scale if self.nll_scale is not None else self._nll_max
            nll_norm = (self._nll / scale).clamp(0.0, 1.0) if scale > 0 else torch.zeros_like(self._nll)  # [N]
            mixed = (1.0 - self.nll_weight) * difficulty + self.nll_weight * nll_norm  # [N]
            difficulty = torch.where(has_nll, mixed, difficulty)
        prior = self.target if self.prior_difficulty is None else self.prior_difficulty
        return torch.nan_to_num(difficulty, nan=prior)

    def weights(self) -> torch.Tensor:
        """Sampling probabilities ``p_i``, ``[N]`` float64 summing to 1."""
        return self._weights(self.difficulties())

    def _weights(self, difficulties: torch.Tensor) -> torch.Tensor:
        kernel = torch.exp(-(difficulties - self.target) ** 2 / (2 * self.sigma ** 2))  # [N]
        return (1.0 - self.floor) * kernel / kernel.sum() + self.floor / self.num_prompts

    # -- the sampler interface --

    def sample(self, batch_size: int) -> list[int]:
        _check_batch_size(batch_size, self.num_prompts)
        difficulties = self.difficulties()  # [N]
        picked = torch.multinomial(self._weights(difficulties), batch_size, replacement=False,
                                   generator=self._generator)  # [B]
        self._batch_difficulty = difficulties[picked].mean().item()
        return picked.tolist()

    def update(self, indices: list[int], pass_rates: list[float], nll: list[float] | None = None) -> None:
        """Fold one batch of feedback into the per-prompt EMAs, the NLLs and the proficiency.

        Indices are applied in order, so a prompt listed twice gets two EMA steps.
        """
        _check_feedback(indices, pass_rates, nll, self.num_prompts)
        for k, (i, rate) in enumerate(zip(indices, pass_rates)):
            i, rate = int(i), float(rate)
            old = self._pass_ema[i].item()
            self._pass_ema[i] = rate if math.isnan(old) else self.ema * old + (1.0 - self.ema) * rate
            if nll is not None:
                self._nll[i] = float(nll[k])
                self._nll_max = max(self._nll_max, float(nll[k]))
        accuracy = float(sum(pass_rates)) / len(pass_rates)
        self._batch_pass_rate = accuracy
        self._proficiency = (accuracy if self._proficiency is None
                             else self.prof_ema * self._proficiency + (1.0 - self.prof_ema) * accuracy)

    def stats(self) -> dict[str, float]:
        """``sampler/proficiency``, ``sampler/target_difficulty``, ``sampler/batch_difficulty`` (mean
        ``d_i`` of the last sampled batch, NaN before the first), ``sampler/batch_pass_rate`` (NaN before
        feedback), ``sampler/mean_difficulty`` (over prompts fed back at least once, NaN before),
        ``sampler/seen_frac``, and the weight statistics of :func:`weight_stats`."""
        seen = ~torch.isnan(self._pass_ema)  # [N]
        difficulties = self.difficulties()  # [N]
        mean_difficulty = difficulties[seen].mean().item() if seen.any() else math.nan
        return {"sampler/proficiency": self.proficiency, "sampler/target_difficulty": self.target,
                "sampler/batch_difficulty": self._batch_difficulty, "sampler/batch_pass_rate": self._batch_pass_rate,
                "sampler/mean_difficulty": mean_difficulty, "sampler/seen_frac": seen.double().mean().item(),
                **weight_stats(self._weights(difficulties))}

    def state_dict(self) -> dict:
        return {"sampler": "aps", "num_prompts": self.num_prompts, "seed": self.seed,
                "generator": self._generator.get_state().tolist(),
                "pass_ema": [_json_float(x) for x in self._pass_ema.tolist()],
                "nll": [_json_float(x) for x in self._nll.tolist()],
                "nll_max": self._nll_max, "proficiency": self._proficiency,
                "batch_difficulty": _json_float(self._batch_difficulty),
                "batch_pass_rate": _json_float(self._batch_pass_rate)}

    def load_state_dict(self, state: dict) -> None:
        """Restore the RNG and everything learned; the sampler, prompt count and seed must match.

        Hyperparameters (``sigma``, ``floor`` ...) come from the constructor, not the state, so a
        resumed run may change them deliberately.
        """
        _check_resume(state, "aps", self.num_prompts, self.seed)
        self._generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        self._pass_ema = torch.tensor([_float_or_nan(x) for x in state["pass_ema"]], dtype=torch.float64)
        self._nll = torch.tensor([_float_or_nan(x) for x in state["nll"]], dtype=torch.float64)
        self._nll_max = float(state["nll_max"])
        self._proficiency = None if state["proficiency"] is None else float(state["proficiency"])
        self._batch_difficulty = _float_or_nan(state["batch_difficulty"])
        self._batch_pass_rate = _float_or_nan(state["batch_pass_rate"])


# -- registry -----------------------------------------------------------------------------------

def get_sampler(name: str, num_prompts: int, seed: int = 0, **kwargs) -> UniformSampler | APSSampler:
    """Build the sampler called ``name`` (one of :data:`SAMPLERS`); ``kwargs`` go to its constructor."""
    if name == "uniform":
        if kwargs:
            raise ValueError(f"the 'uniform' sampler takes no options, got {', '.join(sorted(kwargs))}; "
                             f"drop them or use sampler 'aps'")
        return UniformSampler(num_prompts, seed)
    if name == "aps":
        return APSSampler(num_prompts, seed, **kwargs)
    raise ValueError(f"unknown prompt sampler {name!r}; use one of {', '.join(SAMPLERS)}")


# -- shared helpers -----------------------------------------------------------------------------

def weight_stats(probs: torch.Tensor) -> dict[str, float]:
    """Summaries of sampling probabilities ``probs`` ``[N]`` (summing to 1).

    ``sampler/weight_entropy``: ``H(p) / log N`` (1 = uniform; 1 when N = 1);
    ``sampler/ess_frac``: effective sample size ``1 / Σ p²`` divided by N (1 = uniform);
    ``sampler/weight_{min,p10,p50,p90,max}``: quantiles of ``N·p_i`` (1 = the uniform weight).
    """
    n = probs.numel()
    probs = probs.double()
    entropy = -(probs * torch.log(probs.clamp_min(1e-300))).sum().item()
    relative = probs * n  # [N]
    quantiles = torch.quantile(relative, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
    return {"sampler/weight_entropy": entropy / math.log(n) if n > 1 else 1.0,
            "sampler/ess_frac": 1.0 / (probs ** 2).sum().item() / n,
            "sampler/weight_min": relative.min().item(), "sampler/weight_p10": quantiles[0],
            "sampler/weight_p50": quantiles[1], "sampler/weight_p90": quantiles[2],
            "sampler/weight_max": relative.max().item()}


def _check_num_prompts(num_prompts: int) -> None:
    if not isinstance(num_prompts, int) or isinstance(num_prompts, bool) or num_prompts <= 0:
        raise ValueError(f"a prompt sampler needs a positive number of prompts, got num_prompts={num_prompts!r}")


def _check_batch_size(batch_size: int, num_prompts: int) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if batch_size > num_prompts:
        raise ValueError(f"batch_size={batch_size} is larger than the prompt set ({num_prompts} prompts) and a "
                         f"batch never repeats a prompt; lower the number of prompts per batch or add prompts")


def _check_range(name: str, value, low: float, high: float, *, low_open: bool = False,
                 high_open: bool = False) -> None:
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"APSSampler: {name} must be a number in {interval}, got {value!r}")


def _check_feedback(indices: list[int], pass_rates: list[float], nll: list[float] | None, num_prompts: int) -> None:
    if len(indices) == 0:
        raise ValueError("sampler.update got no indices; pass the indices of the prompts that were rolled out")
    if len(pass_rates) != len(indices):
        raise ValueError(f"sampler.update got {len(indices)} indices but {len(pass_rates)} pass rates; "
                         f"pass one pass rate per sampled prompt, in the same order")
    if nll is not None and len(nll) != len(indices):
        raise ValueError(f"sampler.update got {len(indices)} indices but {len(nll)} NLL values; "
                         f"pass one NLL per sampled prompt, in the same order, or nll=None")
    for k, i in enumerate(indices):
        if not isinstance(i, Integral) or isinstance(i, bool) or not 0 <= i < num_prompts:
            raise ValueError(f"sampler.update: indices[{k}]={i!r} is not a prompt index in [0, {num_prompts})")
    for k, rate in enumerate(pass_rates):
        if not (isinstance(rate, Real) and math.isfinite(rate) and 0.0 <= rate <= 1.0):
            raise ValueError(f"sampler.update: pass_rates[{k}]={rate!r} (prompt {indices[k]}) is not in [0, 1]; "
                             f"a pass rate is the fraction of the prompt's rollouts that were correct")
    for k, value in enumerate(nll or []):
        if not (isinstance(value, Real) and math.isfinite(value) and value >= 0.0):
            raise ValueError(f"sampler.update: nll[{k}]={value!r} (prompt {indices[k]}) is not a finite "
                             f"non-negative number; pass the mean token NLL of the reference answer")


def _check_resume(state: dict, kind: str, num_prompts: int, seed: int) -> None:
    if state.get("sampler") != kind:
        raise ValueError(f"cannot resume the prompt sampler: the checkpoint holds a {state.get('sampler')!r} "
                         f"sampler and this run uses {kind!r}; resume with the same sampler")
    for key, value in (("num_prompts", num_prompts), ("seed", seed)):
        if state[key] != value:
            raise ValueError(f"cannot resume the prompt sampler: checkpoint has {key}={state[key]!r}, this run has "
                             f"{value!r}; resume with the same prompts and seed")


def _json_float(value: float) -> float | None:
    """NaN (meaning "unknown") as None, so the state is strict JSON."""
    return None if math.isnan(value) else value


def _float_or_nan(value: float | None) -> float:
    return math.nan if value is None else float(value)
