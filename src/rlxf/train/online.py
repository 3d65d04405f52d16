"""What the online steps (GRPO family, PPO) share under torchrun: the global token-mean normaliser
and one step's metrics combined over the processes."""

from __future__ import annotations

from rlxf.runtime import distributed

SUMMED = ("groups_sampled", "reward_none", "reward_errors", "_reward_samples", "_sample_tokens", "_train_tokens",
          "_rows")
SLOWEST = ("_sample_seconds", "_train_seconds")
# means over a process's rows: combined weighted by its rows (``_rows``), so uneven shares average right
ROW_MEANS = ("reward/mean", "accuracy", "completion_length", "truncated_fraction", "frac_zero_adv", "score",
             "eos_fraction")


def global_units(local_units: float) -> float:
    """The normaliser each process divides its summed loss by, so that the averaged gradient is the
    mean over every process's units (tokens): ``total / world`` (``local_units`` alone in one process).
    Sequence-level modes give every process equal shares and need no such step."""
    if not distributed.active():
        return max(float(local_units), 1.0)
    total = sum(distributed.gather(float(local_units)))
    return max(total / distributed.world_size(), 1.0)


def combine_rank_metrics(per_rank: list[dict]) -> dict:
    """One step's metrics from every rank's: counts summed, times the slowest rank's, throughputs
    recomputed from those, ``ratio_max`` the largest, means over rows weighted by each rank's rows
    (:data:`ROW_MEANS`, ``reward/<part>``), everything else the mean over ranks: losses are already
    divided by the global normaliser (:func:`global_units`), so their plain mean is the whole batch's."""
    out = {}
    for key in {k for m in per_rank for k in m}:
        values = [m[key] for m in per_rank if key in m and m[key] is not None]
        weighted = key in ROW_MEANS or (key.startswith("reward/") and key != "reward/std")
        if not values:
            out[key] = None
        elif weighted and all("_rows" in m for m in per_rank):
            pairs = [(m[key], m["_rows"]) for m in per_rank if m.get(key) is not None and m["_rows"]]
            out[key] = sum(v * w for v, w in pairs) / sum(w for _, w in pairs) if pairs else None
        elif key in SUMMED:
            out[key] = sum(values)
        elif key in SLOWEST or key == "ratio_max":
            out[key] = max(values)
        else:
            out[key] = sum(values) / len(values)
    out["sample_tokens_per_s"] = out["_sample_tokens"] / max(out["_sample_seconds"], 1e-9)
    out["train_tokens_per_s"] = out["_train_tokens"] / max(out["_train_seconds"], 1e-9)
    return out


def step_metrics(metrics: dict) -> dict:
    """This step's metrics as the whole run sees them: combined over the processes under torchrun."""
    return combine_rank_metrics(distributed.gather(metrics)) if distributed.active() else metrics
