"""Krippendorff's α: agreement among labelers who each labelled some of the same items.

Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability" (Annenberg School, University of
Pennsylvania), section C: with the coincidence matrix of the pairable values

    o_ck = Σ_u  Σ_{i≠j in unit u} [v_ui = c][v_uj = k] / (m_u − 1)      (m_u ≥ 2 values in unit u)
    n_c  = Σ_k o_ck,   n = Σ_c n_c

    α = 1 − D_o / D_e,   D_o = Σ_c Σ_k o_ck δ²(c, k) / n,   D_e = Σ_c Σ_k n_c n_k δ²(c, k) / (n (n − 1))

with the metric δ²: nominal [c ≠ k]; interval (c − k)²; ordinal (Σ_{g=c..k} n_g − (n_c + n_k)/2)²
over the sorted values; ratio ((c − k)/(c + k))². α = 1 is perfect agreement, 0 what chance gives.
Units with fewer than two values carry no pairs and drop out. When every pairable value is the
same (D_e = 0) α is undefined and this returns ``None``. rlxf uses nominal α for compare choices
(index, tie, both bad) and thumbs, interval α for 1–7 ratings (docs/labeling.md#agreement).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence

METRICS = ("nominal", "ordinal", "interval", "ratio")


def coincidences(units: Sequence[Sequence[Hashable]]) -> dict[tuple, float]:
    """The coincidence matrix ``{(c, k): o_ck}`` of the units with at least two values."""
    matrix: dict[tuple, float] = {}
    for values in units:
        m = len(values)
        if m < 2:
            continue
        counts = Counter(values)
        for c, n_c in counts.items():
            for k, n_k in counts.items():
                pairs = n_c * (n_k - (c == k))  # ordered pairs i ≠ j with v_i = c, v_j = k
                if pairs:
                    matrix[c, k] = matrix.get((c, k), 0.0) + pairs / (m - 1)
    return matrix


def krippendorff_alpha(units: Sequence[Sequence[Hashable]], metric: str = "nominal") -> float | None:
    """α of ``units`` (one list of the labels given to each item, missing ones left out) under
    ``metric`` (one of :data:`METRICS`; all but nominal need numbers). ``None`` when there are no
    pairable values or they do not vary."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    o = coincidences(units)
    marginals: dict = {}
    for (c, _), v in o.items():
        marginals[c] = marginals.get(c, 0.0) + v
    n = sum(marginals.values())
    if n <= 1:
        return None
    delta = _metric(metric, marginals)
    observed = sum(v * delta(c, k) for (c, k), v in o.items()) / n
    values = list(marginals)
    expected = sum(marginals[c] * marginals[k] * delta(c, k) for c in values for k in values) / (n * (n - 1))
    if expected == 0:
        return None
    return 1.0 - observed / expected


def _metric(metric: str, marginals: dict):
    if metric == "nominal":
        return lambda c, k: float(c != k)
    if metric == "interval":
        return lambda c, k: float(c - k) ** 2
    if metric == "ratio":
        return lambda c, k: 0.0 if c == k else ((c - k) / (c + k)) ** 2
    ordered = sorted(marginals)
    rank = {v: i for i, v in enumerate(ordered)}
    cumulative = [0.0]
    for v in ordered:
        cumulative.append(cumulative[-1] + marginals[v])

    def ordinal(c, k):
        lo, hi = sorted((rank[c], rank[k]))
        between = cumulative[hi + 1] - cumulative[lo]  # Σ_{g=c..k} n_g
        return (between - (marginals[c] + marginals[k]) / 2) ** 2

    return ordinal
