"""rlxf.data.samplers: uniform epochs, the APS design (SPECS Appendix C), resume, stats, errors."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

from rlxf.data import SAMPLERS, APSSampler, PromptSampler, UniformSampler, get_sampler


def bimodal_pass_rate(i: int) -> float:
    """Prompts 0..9 always solved, 10..19 never, 20..29 half of the time."""
    return 1.0 if i < 10 else 0.0 if i < 20 else 0.5


def json_round_trip(state: dict) -> dict:
    return json.loads(json.dumps(state, allow_nan=False))  # strict JSON: no NaN sneaks in


def run(sampler, steps: int, batch_size: int) -> list[list[int]]:
    """Sample and feed back deterministic pass rates and NLLs for ``steps`` steps."""
    batches = []
    for _ in range(steps):
        indices = sampler.sample(batch_size)
        sampler.update(indices, [bimodal_pass_rate(i % 30) for i in indices], nll=[0.1 * (i % 7) for i in indices])
        batches.append(indices)
    return batches


# -- uniform ------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_prompts,batch_size", [(12, 4), (10, 3), (7, 7), (5, 1)])
def test_uniform_serves_every_prompt_once_per_epoch(num_prompts, batch_size):
    sampler = UniformSampler(num_prompts, seed=3)
    stream = []
    for _ in range(4 * num_prompts // batch_size + 1):
        batch = sampler.sample(batch_size)
        assert len(batch) == batch_size and len(set(batch)) == batch_size  # no repeat inside a batch
        stream += batch
    for epoch in range(4):
        assert sorted(stream[epoch * num_prompts:(epoch + 1) * num_prompts]) == list(range(num_prompts))


def test_uniform_is_deterministic_by_seed_and_shuffles_each_epoch():
    first = [UniformSampler(20, seed=1).sample(20) for _ in range(2)]
    assert first[0] == first[1]
    assert UniformSampler(20, seed=2).sample(20) != first[0]
    sampler = UniformSampler(20, seed=1)
    assert sampler.sample(20) != sampler.sample(20)  # epoch 1 is a new permutation


# -- resume -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,kwargs", [("uniform", {}), ("aps", {}), ("aps", {"nll_scale": 1.0, "sigma": 0.1})])
def test_state_round_trip_gives_identical_batches(name, kwargs):
    uninterrupted = get_sampler(name, 30, 7, **kwargs)
    run(uninterrupted, 5, 4)
    state = json_round_trip(uninterrupted.state_dict())
    expected = run(uninterrupted, 6, 4)

    resumed = get_sampler(name, 30, 7, **kwargs)
    run(resumed, 2, 9)  # different history before loading: the state must overwrite all of it
    resumed.load_state_dict(state)
    assert run(resumed, 6, 4) == expected
    assert resumed.stats() == pytest.approx(uninterrupted.stats(), nan_ok=True)


def test_resume_refuses_a_different_sampler_or_dataset():
    state = APSSampler(30, seed=0).state_dict()
    with pytest.raises(ValueError, match="'aps' sampler and this run uses 'uniform'"):
        UniformSampler(30, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="num_prompts=30, this run has 31"):
        APSSampler(31, seed=0).load_state_dict(state)


# -- APS ----------------------------------------------------------------------------------------

def test_aps_favours_half_solved_prompts():
    sampler = APSSampler(30, seed=0)
    indices = list(range(30))
    sampler.update(indices, [bimodal_pass_rate(i) for i in indices])
    assert sampler.proficiency == pytest.approx(0.5) and sampler.target == pytest.approx(0.5)

    weights = sampler.weights()  # [30]
    assert weights.sum().item() == pytest.approx(1.0)
    # hand-derived: kernel 1 at d = 0.5, exp(-0.5² / (2·0.25²)) = e⁻² at d = 0 and d = 1
    kernel_sum = 10 + 20 * math.exp(-2)
    half = 0.95 / kernel_sum + 0.05 / 30
    other = 0.95 * math.exp(-2) / kernel_sum + 0.05 / 30
    assert weights[20:].tolist() == pytest.approx([half] * 10)
    assert weights[:20].tolist() == pytest.approx([other] * 20)
    assert half / other > 6.0

    counts = Counter(i for _ in range(300) for i in sampler.sample(5))
    drawn_half = sum(counts[i] for i in range(20, 30))
    assert drawn_half / (1500 - drawn_half) > 2.0  # 10 half-solved prompts vs 20 others: > 4x per prompt


def test_aps_unseen_prompts_get_the_peak_weight():
    sampler = APSSampler(40, seed=0)
    sampler.update(list(range(30)), [bimodal_pass_rate(i) for i in range(30)])
    weights = sampler.weights()
    assert weights[30:].tolist() == pytest.approx([weights.max().item()] * 10)
    fixed_prior = APSSampler(40, seed=0, prior_difficulty=1.0)
    fixed_prior.update(list(range(30)), [bimodal_pass_rate(i) for i in range(30)])
    assert fixed_prior.weights()[30].item() == pytest.approx(fixed_prior.weights()[10].item())  # like never-solved


def test_aps_floor_bounds_the_smallest_probability():
    sampler = APSSampler(50, seed=0, sigma=0.01, floor=0.1)
    sampler.update(list(range(50)), [1.0] * 25 + [0.5] * 25)
    assert sampler.weights().min().item() >= 0.1 / 50 * (1 - 1e-12)
    assert sampler.stats()["sampler/weight_min"] >= 0.1 * (1 - 1e-12)  # relative to uniform = N·p


def test_aps_ema_arithmetic():
    sampler = APSSampler(4, seed=0, ema=0.5, prof_ema=0.9, target_slope=0.5, target_offset=0.1)
    assert sampler.proficiency == 0.5 and sampler.target == pytest.approx(0.6)  # before feedback
    sampler.update([0, 1], [0.4, 0.0])  # batch accuracy 0.2 sets the proficiency
    assert sampler.proficiency == pytest.approx(0.2)
    sampler.update([0, 2], [0.0, 1.0])  # accuracy 0.5: 0.9·0.2 + 0.1·0.5
    assert sampler.proficiency == pytest.approx(0.23)
    assert sampler.target == pytest.approx(0.5 + 0.1 + 0.5 * (0.23 - 0.5))
    sampler.update([0], [1.0])
    # prompt 0: 0.4 → 0.5·0.4 + 0.5·0.0 = 0.2 → 0.5·0.2 + 0.5·1.0 = 0.6; difficulty = 1 − pass
    assert sampler.difficulties()[:3].tolist() == pytest.approx([0.4, 1.0, 0.0])
    assert sampler.difficulties()[3].item() == pytest.approx(sampler.target)  # unseen: on target


def test_aps_nll_difficulty_fixed_scale_and_running_max():
    fixed = APSSampler(3, seed=0, nll_weight=0.5, nll_scale=2.0)
    fixed.update([0, 1, 2], [1.0, 0.5, 0.0], nll=[1.0, 3.0, 0.0])
    # d = 0.5·(1 − pass) + 0.5·min(nll / 2, 1)
    assert fixed.difficulties().tolist() == pytest.approx([0.25, 0.75, 0.5])
    running = APSSampler(3, seed=0, nll_weight=0.25)
    running.update([0, 1], [1.0, 1.0], nll=[1.0, 4.0])  # running max 4
    running.update([2], [0.0])  # no NLL for prompt 2: pass rate only
    assert running.difficulties().tolist() == pytest.approx([0.25 * 0.25, 0.25 * 1.0, 1.0])


def test_stats_keys_present_and_finite():
    weight_keys = {"sampler/weight_entropy", "sampler/ess_frac", "sampler/weight_min", "sampler/weight_p10",
                   "sampler/weight_p50", "sampler/weight_p90", "sampler/weight_max"}
    aps = APSSampler(30, seed=0)
    run(aps, 3, 6)
    aps.sample(6)
    stats = aps.stats()
    assert weight_keys | {"sampler/proficiency", "sampler/target_difficulty", "sampler/batch_difficulty",
                          "sampler/batch_pass_rate", "sampler/mean_difficulty", "sampler/seen_frac"} == set(stats)
    assert all(math.isfinite(v) for v in stats.values())
    assert 0 < stats["sampler/weight_entropy"] < 1 and 0 < stats["sampler/ess_frac"] < 1

    uniform = UniformSampler(30, seed=0)
    run(uniform, 2, 6)
    stats = uniform.stats()
    assert weight_keys | {"sampler/epoch", "sampler/batch_pass_rate"} == set(stats)
    assert all(math.isfinite(v) for v in stats.values())
    assert stats["sampler/weight_entropy"] == pytest.approx(1.0) and stats["sampler/ess_frac"] == pytest.approx(1.0)


def test_registry_and_protocol():
    assert SAMPLERS == ("uniform", "aps")
    for name in SAMPLERS:
        assert isinstance(get_sampler(name, 5, 0), PromptSampler)
    assert get_sampler("aps", 5, 0, sigma=0.1).sigma == 0.1
    with pytest.raises(ValueError, match="unknown prompt sampler 'apss'; use one of uniform, aps"):
        get_sampler("apss", 5, 0)
    with pytest.raises(ValueError, match="'uniform' sampler takes no options, got sigma"):
        get_sampler("uniform", 5, 0, sigma=0.1)


# -- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [lambda: UniformSampler(5, seed=0), lambda: APSSampler(5, seed=0)])
def test_bad_feedback_and_batch_sizes_are_explained(make):
    sampler = make()
    with pytest.raises(ValueError, match="batch_size=6 is larger than the prompt set \\(5 prompts\\)"):
        sampler.sample(6)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        sampler.sample(0)
    with pytest.raises(ValueError, match=r"pass_rates\[1\]=1.5 \(prompt 2\) is not in \[0, 1\]"):
        sampler.update([1, 2], [0.5, 1.5])
    with pytest.raises(ValueError, match="pass_rates"):
        sampler.update([1], [math.nan])
    with pytest.raises(ValueError, match="got 2 indices but 1 pass rates"):
        sampler.update([1, 2], [0.5])
    with pytest.raises(ValueError, match="got 2 indices but 3 NLL values"):
        sampler.update([1, 2], [0.5, 0.5], nll=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"indices\[0\]=5 is not a prompt index in \[0, 5\)"):
        sampler.update([5], [0.5])
    with pytest.raises(ValueError, match=r"nll\[0\]=-1.0 \(prompt 1\) is not a finite non-negative number"):
        sampler.update([1], [0.5], nll=[-1.0])


@pytest.mark.parametrize("kwargs,message", [
    ({"sigma": 0.0}, "sigma .* must be a positive number"),
    ({"floor": 0.0}, r"floor must be a number in \(0.0, 1.0\]"),
    ({"ema": 1.0}, r"ema must be a number in \[0.0, 1.0\)"),
    ({"nll_weight": 1.5}, r"nll_weight must be a number in \[0.0, 1.0\]"),
    ({"nll_scale": -1.0}, "nll_scale must be a positive number"),
    ({"prior_difficulty": 2.0}, "prior_difficulty must be"),
])
def test_bad_aps_settings_are_explained(kwargs, message):
    with pytest.raises(ValueError, match=message):
        APSSampler(10, seed=0, **kwargs)
    with pytest.raises(ValueError, match="positive number of prompts"):
        UniformSampler(0, seed=0)


def test_sampling_accepts_torch_and_numpy_style_numbers():
    sampler = APSSampler(10, seed=0)
    indices = torch.tensor(sampler.sample(4))
    sampler.update(indices.tolist(), torch.full((4,), 0.25).tolist())
    assert sampler.proficiency == pytest.approx(0.25)
