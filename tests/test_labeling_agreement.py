"""Krippendorff's α (rlxf.labeling.agreement) against a slow pairwise reference in float64 and
against the worked example of Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability"."""

from __future__ import annotations

import itertools
import random

import pytest

from rlxf.labeling.agreement import METRICS, coincidences, krippendorff_alpha

# Krippendorff (2011), section C: 4 observers, 12 units, values 1..5, None = missing
OBSERVERS = [
    [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
    [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
]
UNITS = [[o[u] for o in OBSERVERS if o[u] is not None] for u in range(12)]


@pytest.mark.parametrize("metric,published", [("nominal", 0.743), ("ordinal", 0.815), ("interval", 0.849),
                                              ("ratio", 0.797)])
def test_krippendorffs_own_worked_example(metric, published):
    assert krippendorff_alpha(UNITS, metric) == pytest.approx(published, abs=5e-4)


def test_the_coincidence_matrix_of_the_worked_example():
    o = coincidences(UNITS)
    # n = 40 pairable values (unit 12 has one and drops out); by hand: o_11 = 3 (unit 1) + 2 (unit 8)
    # + 2 (unit 11); o_33 = 4 + 4 (units 3, 4); o_12 = 1/3 (unit 6) + 1 (unit 8)
    assert sum(o.values()) == pytest.approx(40)
    assert o[1, 1] == pytest.approx(7.0)
    assert o[3, 3] == pytest.approx(8.0)
    assert o[1, 2] == o[2, 1] == pytest.approx(4 / 3)


def slow_alpha(units, metric):
    """The pairwise definition, loops and float64: D_o over pairs within units, D_e over all pairs."""
    pairable = [v for u in units if len(u) >= 2 for v in u]
    n = len(pairable)
    counts = {v: pairable.count(v) for v in set(pairable)}

    def delta(c, k):
        if metric == "nominal":
            return 0.0 if c == k else 1.0
        if metric == "interval":
            return float(c - k) ** 2
        if metric == "ratio":
            return 0.0 if c == k else ((c - k) / (c + k)) ** 2
        lo, hi = min(c, k), max(c, k)
        between = sum(counts[g] for g in counts if lo <= g <= hi)
        return (between - (counts[c] + counts[k]) / 2) ** 2

    observed = 0.0
    for u in units:
        if len(u) < 2:
            continue
        observed += sum(delta(a, b) for a, b in itertools.permutations(u, 2)) / (len(u) - 1)
    observed /= n
    expected = sum(delta(a, b) for a, b in itertools.permutations(pairable, 2)) / (n * (n - 1))
    return None if expected == 0 else 1 - observed / expected


@pytest.mark.parametrize("metric", METRICS)
def test_alpha_matches_the_slow_reference_on_random_data(metric):
    rng = random.Random(7)
    for _ in range(30):
        units = [[rng.randint(1, 6) for _ in range(rng.randint(0, 5))] for _ in range(rng.randint(2, 12))]
        expected = slow_alpha(units, metric)
        got = krippendorff_alpha(units, metric)
        assert (got is None) == (expected is None)
        if expected is not None:
            assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_nominal_values_may_be_any_labels():
    units = [["0", "0"], ["1", "1"], ["tie", "0"], ["both_bad", "both_bad"], ["1"]]
    assert krippendorff_alpha(units) == pytest.approx(slow_alpha(units, "nominal"))


def test_edge_cases():
    assert krippendorff_alpha([[1, 1], [2, 2], [3, 3]]) == 1.0           # perfect agreement
    assert krippendorff_alpha([[1], [2]]) is None                         # nothing pairable
    assert krippendorff_alpha([[1, 1], [1, 1]]) is None                   # no variation: undefined
    assert krippendorff_alpha([[1, 2], [2, 1]]) < 0                      # systematic disagreement
    with pytest.raises(ValueError, match="unknown metric"):
        krippendorff_alpha([[1, 2]], "cosine")
