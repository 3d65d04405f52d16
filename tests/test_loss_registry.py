"""rlxf.losses registries: entries equal the direct functions, names, registration, declared needs."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from rlxf.config import ConfigError, build_config, option
from rlxf.losses import (
    POLICY_LOSSES,
    PREFERENCE_LOSSES,
    RPO_DISTANCES,
    PreferenceInputs,
    cispo_loss,
    clipped_policy_loss,
    dpo_loss,
    get_policy_loss,
    get_preference_loss,
    gspo_loss,
    ipo_loss,
    orpo_loss,
    policy_loss_names,
    preference_loss_names,
    register_policy_loss,
    register_preference_loss,
    rpo_loss,
    simpo_loss,
)
from rlxf.losses import registry

SEEDS = [0, 1, 2]

# The direct call each built-in preference entry must reproduce, with its parameters read from a
# config-like object (the option names of rlxf.recipes.preference.PreferenceConfig).
DIRECT_PREFERENCE = {
    "dpo": lambda x, c: dpo_loss(x.chosen_logps, x.rejected_logps, x.ref_chosen_logps, x.ref_rejected_logps,
                                 beta=c.beta, label_smoothing=0.0),
    "ipo": lambda x, c: ipo_loss(x.chosen_logps, x.rejected_logps, x.ref_chosen_logps, x.ref_rejected_logps,
                                 tau=c.beta),
    "cdpo": lambda x, c: dpo_loss(x.chosen_logps, x.rejected_logps, x.ref_chosen_logps, x.ref_rejected_logps,
                                  beta=c.beta, label_smoothing=c.label_smoothing),
    "rpo": lambda x, c: rpo_loss(x.chosen_logps, x.rejected_logps, x.ref_chosen_logps, x.ref_rejected_logps,
                                 x.chosen_scores, x.rejected_scores, beta=c.beta, eta=c.rpo_eta,
                                 distance=c.rpo_distance),
    "orpo": lambda x, c: orpo_loss(x.chosen_mean_logps, x.rejected_mean_logps, x.chosen_nll, lam=c.orpo_lambda),
    "simpo": lambda x, c: simpo_loss(x.chosen_mean_logps, x.rejected_mean_logps, beta=c.beta, gamma=c.simpo_gamma),
}
# name -> (needs_reference, needs_scores, includes_nll, options)
DECLARED = {
    "dpo": (True, False, False, {"beta": "beta"}),
    "ipo": (True, False, False, {"tau": "beta"}),
    "cdpo": (True, False, False, {"beta": "beta", "label_smoothing": "label_smoothing"}),
    "rpo": (True, True, False, {"beta": "beta", "eta": "rpo_eta", "distance": "rpo_distance"}),
    "orpo": (False, False, True, {"lam": "orpo_lambda"}),
    "simpo": (False, False, False, {"beta": "beta", "gamma": "simpo_gamma"}),
}
DIRECT_POLICY = {
    "clipped": lambda logps, old, adv, mask, eps_low, eps_high: clipped_policy_loss(
        logps, old, adv, eps_low=eps_low, eps_high=eps_high),
    "gspo": lambda logps, old, adv, mask, eps_low, eps_high: gspo_loss(
        logps, old, adv, mask, eps_low=eps_low, eps_high=eps_high),
    "gspo_token": lambda logps, old, adv, mask, eps_low, eps_high: gspo_loss(
        logps, old, adv, mask, eps_low=eps_low, eps_high=eps_high, token_level=True),
    "cispo": lambda logps, old, adv, mask, eps_low, eps_high: cispo_loss(
        logps, old, adv, mask, eps_low=eps_low, eps_high=eps_high),
}

FAST = {"task_size": 96, "eval_size": 32, "batch_size": 8, "eval_batch_size": 32, "progress": False,
        "log_every": 1, "warmup_steps": 2, "threads": 1}


def random_inputs(seed: int, batch: int, *, reference: bool = True, scores: bool = True) -> PreferenceInputs:
    """Float64 pairs: sequence log-probs around −20/−25, mean log-probs in (−3.05, −0.05), scores ~ N(0, 4)."""
    g = torch.Generator().manual_seed(seed)

    def draw(scale: float, shift: float = 0.0) -> torch.Tensor:
        return shift + scale * torch.randn(batch, generator=g, dtype=torch.float64)  # [B]

    chosen_mean = -(0.05 + 3 * torch.rand(batch, generator=g, dtype=torch.float64))  # [B]
    rejected_mean = -(0.05 + 3 * torch.rand(batch, generator=g, dtype=torch.float64))  # [B]
    return PreferenceInputs(
        chosen_logps=draw(5.0, -20.0).requires_grad_(),
        rejected_logps=draw(5.0, -25.0).requires_grad_(),
        chosen_mean_logps=chosen_mean.requires_grad_(),
        rejected_mean_logps=rejected_mean.requires_grad_(),
        chosen_nll=-chosen_mean,
        ref_chosen_logps=draw(5.0, -20.0) if reference else None,
        ref_rejected_logps=draw(5.0, -25.0) if reference else None,
        chosen_scores=draw(2.0) if scores else None,
        rejected_scores=draw(2.0) if scores else None,
    )


def config_values(distance: str = "bwd_kl") -> SimpleNamespace:
    return SimpleNamespace(beta=0.3, label_smoothing=0.15, rpo_eta=0.7, rpo_distance=distance, orpo_lambda=0.25,
                           simpo_gamma=0.4)


def grads(loss: torch.Tensor, inputs: PreferenceInputs) -> list[torch.Tensor]:
    leaves = [inputs.chosen_logps, inputs.rejected_logps, inputs.chosen_mean_logps, inputs.rejected_mean_logps]
    return [g if g is not None else torch.zeros_like(t)
            for g, t in zip(torch.autograd.grad(loss.sum(), leaves, allow_unused=True), leaves)]


# ---------------------------------------------------------------------------------------------
# Preference losses
# ---------------------------------------------------------------------------------------------


def test_every_builtin_preference_loss_is_checked_here():
    assert set(PREFERENCE_LOSSES) == set(DIRECT_PREFERENCE) == set(DECLARED)
    assert preference_loss_names()[:len(PREFERENCE_LOSSES)] == PREFERENCE_LOSSES


# every built-in loss once, and rpo once per distance
ENTRY_CASES = [(name, "bwd_kl") for name in PREFERENCE_LOSSES if name != "rpo"] + [("rpo", d) for d in RPO_DISTANCES]


@pytest.mark.parametrize("name,distance", ENTRY_CASES)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("batch", [1, 6])
def test_preference_entry_equals_the_direct_function(name, distance, seed, batch):
    entry = get_preference_loss(name)
    cfg = config_values(distance)
    inputs = random_inputs(seed, batch)
    got = entry(inputs, **entry.params(cfg))
    want = DIRECT_PREFERENCE[name](inputs, cfg)
    assert got.shape == (batch,) and got.dtype == torch.float64
    assert torch.equal(got, want)
    for g, w in zip(grads(got, inputs), grads(want, inputs)):
        assert torch.equal(g, w)


@pytest.mark.parametrize("name", PREFERENCE_LOSSES)
def test_preference_entry_declares_its_needs_and_options(name):
    entry = get_preference_loss(name)
    needs_reference, needs_scores, includes_nll, options = DECLARED[name]
    assert (entry.needs_reference, entry.needs_scores, entry.includes_nll) == (needs_reference, needs_scores,
                                                                                includes_nll)
    assert dict(entry.options) == options
    assert entry.name == name and entry.summary


def test_preference_options_are_fields_of_the_recipe_config_and_read_from_it():
    from rlxf.recipes.preference import LOSSES, ORPOConfig, PreferenceConfig, RPOConfig

    assert LOSSES == PREFERENCE_LOSSES
    fields = {f.name for f in dataclasses.fields(PreferenceConfig)}
    for name in PREFERENCE_LOSSES:
        assert {option for _, option in get_preference_loss(name).options} <= fields, name
    cfg = PreferenceConfig(beta=0.25, label_smoothing=0.2)
    assert get_preference_loss("dpo").params(cfg) == {"beta": 0.25}
    assert get_preference_loss("ipo").params(cfg) == {"tau": 0.25}
    assert get_preference_loss("cdpo").params(cfg) == {"beta": 0.25, "label_smoothing": 0.2}
    assert get_preference_loss("rpo").params(RPOConfig(rpo_distance="sq")) == {"beta": 0.2, "eta": 1.0,
                                                                               "distance": "sq"}
    assert get_preference_loss("orpo").params(ORPOConfig(orpo_lambda=0.5)) == {"lam": 0.5}
    assert get_preference_loss("simpo").params(PreferenceConfig(loss="simpo")) == {"beta": 2.0, "gamma": 1.0}
    assert get_preference_loss("simpo").params(PreferenceConfig(loss="simpo", beta=2.5, simpo_gamma=0.3)) == {
        "beta": 2.5, "gamma": 0.3}
    assert PreferenceConfig(loss="dpo").beta == 0.1  # the β default of losses whose function has none
    with pytest.raises(AttributeError, match="rpo_eta"):
        get_preference_loss("rpo").params(SimpleNamespace(beta=0.1, rpo_distance="sq"))


def test_config_validation_reads_includes_nll():
    from rlxf.recipes.preference import ORPOConfig, PreferenceConfig

    with pytest.raises(ConfigError, match="--nll-alpha does not apply to orpo.*--orpo-lambda"):
        ORPOConfig(nll_alpha=0.5)
    assert PreferenceConfig(loss="ipo", nll_alpha=0.5).nll_alpha == 0.5


def test_entry_refuses_inputs_without_what_it_needs():
    cfg = config_values()
    no_reference = random_inputs(0, 3, reference=False)
    no_scores = random_inputs(0, 3, scores=False)
    for name in ("dpo", "ipo", "cdpo", "rpo"):
        entry = get_preference_loss(name)
        with pytest.raises(ValueError, match=f"'{name}' needs reference log-probs"):
            entry(no_reference, **entry.params(cfg))
    rpo = get_preference_loss("rpo")
    with pytest.raises(ValueError, match="'rpo' needs reward scores"):
        rpo(no_scores, **rpo.params(cfg))
    orpo = get_preference_loss("orpo")
    bare = random_inputs(0, 3, reference=False, scores=False)
    assert torch.equal(orpo(bare, **orpo.params(cfg)), DIRECT_PREFERENCE["orpo"](bare, cfg))


def test_preference_inputs_are_checked():
    x = random_inputs(0, 4)
    with pytest.raises(ValueError, match="give both `ref_chosen_logps` and `ref_rejected_logps`"):
        dataclasses.replace(x, ref_rejected_logps=None)
    with pytest.raises(ValueError, match="give both `chosen_scores` and `rejected_scores`"):
        dataclasses.replace(x, chosen_scores=None)
    with pytest.raises(ValueError, match="same shape"):
        dataclasses.replace(x, rejected_logps=torch.zeros(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="1-D"):
        dataclasses.replace(x, chosen_nll=torch.zeros(4, 2, dtype=torch.float64))
    with pytest.raises(dataclasses.FrozenInstanceError):
        x.chosen_logps = x.rejected_logps  # type: ignore[misc]


def test_unknown_names_list_the_registered_losses():
    with pytest.raises(ValueError, match="unknown preference loss 'slic'") as info:
        get_preference_loss("slic")
    assert all(name in str(info.value) for name in PREFERENCE_LOSSES)
    with pytest.raises(ValueError, match="unknown policy loss 'sapo'; registered policy losses: clipped, gspo"):
        get_policy_loss("sapo")


@pytest.fixture
def scratch_registries(monkeypatch):
    """Registrations made in a test go to copies of the registries and vanish after it."""
    monkeypatch.setattr(registry, "_PREFERENCE_REGISTRY", dict(registry._PREFERENCE_REGISTRY))
    monkeypatch.setattr(registry, "_POLICY_REGISTRY", dict(registry._POLICY_REGISTRY))


def test_registering_a_preference_loss(scratch_registries):
    @register_preference_loss("toy", needs_reference=False, options={"scale": "beta"})
    def toy(inputs, *, scale):
        """Toy: softplus(−scale·(log π(y_w) − log π(y_l))), [B] → [B]."""
        return F.softplus(-scale * (inputs.chosen_logps - inputs.rejected_logps))

    entry = get_preference_loss("toy")
    assert entry.fn is toy and not entry.needs_reference and not entry.needs_scores
    assert "toy" in preference_loss_names() and "toy" not in PREFERENCE_LOSSES
    x = random_inputs(1, 5, reference=False, scores=False)
    assert torch.equal(entry(x, **entry.params(SimpleNamespace(beta=2.0))),
                       F.softplus(-2.0 * (x.chosen_logps - x.rejected_logps)))
    register_preference_loss("toy", needs_reference=False, options={"scale": "beta"})(toy)  # same function: no-op
    with pytest.raises(ValueError, match="'dpo' is already registered"):
        register_preference_loss("dpo", needs_reference=True)(toy)
    with pytest.raises(TypeError, match="no keyword parameter beta"):
        register_preference_loss("toy2", needs_reference=False, options={"beta": "beta"})(toy)
    assert "toy2" not in preference_loss_names()


# ---------------------------------------------------------------------------------------------
# Policy losses
# ---------------------------------------------------------------------------------------------


def random_policy_inputs(seed: int, shape: tuple[int, int], per_token: bool):
    g = torch.Generator().manual_seed(seed)
    logps = (-3 * torch.rand(shape, generator=g, dtype=torch.float64)).requires_grad_()  # [B, T]
    old = (logps.detach() + 0.4 * torch.randn(shape, generator=g, dtype=torch.float64))  # [B, T]
    adv_shape = shape if per_token else shape[:1]
    advantages = torch.randn(adv_shape, generator=g, dtype=torch.float64)  # [B] or [B, T]
    lengths = torch.randint(0, shape[1] + 1, (shape[0],), generator=g)
    mask = torch.arange(shape[1]) < lengths[:, None]  # [B, T] right-padded
    return logps, old, advantages, mask


def test_every_builtin_policy_loss_is_checked_here():
    assert set(POLICY_LOSSES) == set(DIRECT_POLICY)
    assert policy_loss_names()[:len(POLICY_LOSSES)] == POLICY_LOSSES


@pytest.mark.parametrize("name", POLICY_LOSSES)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", [(1, 1), (4, 7)])
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("eps_low,eps_high", [(0.2, 0.2), (0.2, 0.28), (0.1, 0.0)])
def test_policy_entry_equals_the_direct_function(name, seed, shape, per_token, eps_low, eps_high):
    logps, old, advantages, mask = random_policy_inputs(seed, shape, per_token)
    got = get_policy_loss(name)(logps, old, advantages, mask, eps_low=eps_low, eps_high=eps_high)
    want = DIRECT_POLICY[name](logps, old, advantages, mask, eps_low, eps_high)
    assert got.shape == shape and got.dtype == torch.float64
    assert torch.equal(got, want)
    (g,) = torch.autograd.grad(got.sum(), logps)
    (w,) = torch.autograd.grad(want.sum(), logps)
    assert torch.equal(g, w)


def test_clipped_entry_checks_the_mask_shape():
    logps, old, advantages, _ = random_policy_inputs(0, (3, 5), per_token=False)
    with pytest.raises(ValueError, match="same shape"):
        get_policy_loss("clipped")(logps, old, advantages, torch.ones(3, 4), eps_low=0.2, eps_high=0.2)


def test_registering_a_policy_loss(scratch_registries):
    @register_policy_loss("seq_ratio")
    def seq_ratio(logps, old_logps, advantages, mask, *, eps_low, eps_high):
        """Toy sequence-level loss: −min(s Â, clip(s) Â), s = exp(mean_t m (log π − log π_old)), [B, T]."""
        m = mask.to(logps.dtype)
        log_s = ((logps - old_logps) * m).sum(-1) / m.sum(-1).clamp(min=1)  # [B]
        s = torch.exp(log_s)
        loss = -torch.minimum(s * advantages, torch.clamp(s, 1 - eps_low, 1 + eps_high) * advantages)  # [B]
        return loss[:, None].expand_as(logps)

    assert get_policy_loss("seq_ratio") is seq_ratio
    assert "seq_ratio" in policy_loss_names() and "seq_ratio" not in POLICY_LOSSES
    logps, old, advantages, mask = random_policy_inputs(2, (4, 6), per_token=False)
    out = get_policy_loss("seq_ratio")(logps, old, advantages, mask, eps_low=0.2, eps_high=0.2)
    assert out.shape == (4, 6)
    with pytest.raises(ValueError, match="'clipped' is already registered"):
        register_policy_loss("clipped")(seq_ratio)

    def no_mask(logps, old_logps, advantages, *, eps_low, eps_high):
        return logps

    def no_eps(logps, old_logps, advantages, mask):
        return logps

    for bad in (no_mask, no_eps):
        with pytest.raises(TypeError, match="must accept \\(logps, old_logps, advantages, mask"):
            register_policy_loss("bad")(bad)
    assert "bad" not in policy_loss_names()


# ---------------------------------------------------------------------------------------------
# The preference recipe picks a registered loss by name and gives it what it declares
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("needs_reference,needs_scores", [(False, True), (True, False)])
def test_preference_recipe_calls_a_registered_loss_with_what_it_declares(
        needs_reference, needs_scores, scratch_registries, tiny_random_model_dir, tmp_path):
    from rlxf.recipes.preference import PreferenceConfig, train
    from rlxf.reporting import read_metrics

    calls = []

    @register_preference_loss("toy_margin", needs_reference=needs_reference, needs_scores=needs_scores,
                              options={"scale": "beta"})
    def toy_margin(inputs, *, scale):
        """Toy: softplus(−scale·(log π(y_w) − log π(y_l))), [B] → [B]."""
        loss = F.softplus(-scale * (inputs.chosen_logps - inputs.rejected_logps))  # [B]
        calls.append({"inputs": inputs, "scale": scale, "train": torch.is_grad_enabled(),
                      "loss": loss.detach().mean().item()})
        return loss

    @dataclasses.dataclass(frozen=True)
    class ToyConfig(PreferenceConfig):
        loss: str = option("toy_margin", "objective", choices=PREFERENCE_LOSSES + ("toy_margin",))

    out = tmp_path / "run"
    cfg = build_config(ToyConfig, {"model": str(tiny_random_model_dir), "output_dir": str(out), **FAST,
                                   "max_steps": 2, "beta": 0.37})
    train(cfg)

    assert calls and all(c["scale"] == 0.37 for c in calls)
    assert all(c["inputs"].has_reference == needs_reference for c in calls)
    assert all(c["inputs"].has_scores == needs_scores for c in calls)
    train_calls = [c for c in calls if c["train"]]
    assert len(train_calls) == 2 and len(calls) > 2   # two steps, plus the evaluations
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]
    assert [r["loss"] for r in rows] == pytest.approx([c["loss"] for c in train_calls], rel=1e-6)
    assert (out / "cache").exists() == needs_reference   # reference log-probs only when declared
    if needs_reference:
        assert "rewards/accuracy" in rows[0] and "log_odds_accuracy" not in rows[0]
    else:
        assert "log_odds_accuracy" in rows[0] and "rewards/accuracy" not in rows[0]
