"""Several runs side by side: ``compare.json``, ``compare.png``, ``compare.html`` and ``compare.md``.

Reads only what every run writes (``metrics.jsonl``, ``summary.json``, ``config.yaml``), so it
works for the run directories of any recipe; metrics a run did not log are left out (``—``).

Per run, from the eval rows of ``metric`` (non-finite values, written as ``null``, are skipped):
``start`` (first eval value), ``final`` (last), ``best`` and ``best_step`` (the first step that
reached it) and ``steps_to_threshold`` (the first eval step at or past ``threshold``; ``None`` if
never). Then ``final_completion_length`` (the last eval ``completion_length``, else the last train
one), ``final_kl`` and ``max_kl`` (train ``kl``), ``end_reward`` (mean train ``reward/mean`` over
the last tenth of the logged train rows, at least one row: a single RL batch is noisy) and
``wall_seconds`` (``summary.json``, else the last row's ``time``).

The default threshold is the midpoint between the runs' common start (the mean of their start
values; equal when they share model and seed) and the best final value any run reached: "steps to
threshold" then says how fast each run got halfway to the best result. Without any improvement
over the start there is no default threshold; pass one.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from rlxf.config import ConfigError
from rlxf.reporting.metrics import METRICS_FILE, SUMMARY_FILE, atomic_write, read_metrics, to_jsonable
from rlxf.reporting.report import (_CSS, _flatten, _format_config_value, _format_summary_value, _table,
                                   finish_figure)

CONFIG_FILE = "config.yaml"
# "{metric}" stands for the compared metric; panels no run logged are left out.
DEFAULT_PANELS = ("{metric}", "reward/mean", "kl", "completion_length", "entropy", "loss")
# Where a run writes and whether it was resumed never change its result: not a difference.
IGNORED_CONFIG_KEYS = ("output_dir", "resume")
BUDGET_KEYS = ("seed", "max_steps")
NOT_SET = "(not set)"
_SPLIT_PREFERENCE = ("eval", "train")
_MAX_COLUMNS = 3

# (key in compare.json, column header); {m} = metric, {t} = threshold
_COLUMNS = (
    ("recipe", "recipe"), ("last_step", "steps"), ("start", "{m} start"), ("final", "{m} final"),
    ("best", "{m} best"), ("best_step", "best at step"), ("steps_to_threshold", "steps to {m} {op} {t}"),
    ("final_completion_length", "final length"), ("final_kl", "final KL"), ("max_kl", "max KL"),
    ("end_reward", "end reward"), ("wall_seconds", "wall s"),
)


@dataclasses.dataclass
class _Run:
    label: str
    path: Path
    rows: list[dict[str, Any]]
    summary: dict[str, Any] | None
    config: dict[str, Any] | None


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _load_run(label: str, path: Path) -> _Run:
    path = Path(path)
    metrics_path = path / METRICS_FILE
    if not metrics_path.is_file():
        where = "does not exist" if not path.exists() else f"has no {METRICS_FILE}"
        raise FileNotFoundError(
            f"run '{label}': {path} {where}; pass the output_dir of an rlxf run (it holds "
            f"{METRICS_FILE}, {SUMMARY_FILE} and {CONFIG_FILE})")
    import yaml

    summary = config = None
    try:
        if (path / SUMMARY_FILE).is_file():
            summary = json.loads((path / SUMMARY_FILE).read_text(encoding="utf-8"))
        if (path / CONFIG_FILE).is_file():
            config = yaml.safe_load((path / CONFIG_FILE).read_text(encoding="utf-8")) or {}
    except (ValueError, yaml.YAMLError) as err:
        raise ValueError(f"run '{label}': cannot read a file in {path}: {err}") from err
    return _Run(label, path, read_metrics(metrics_path), summary, config)


def _curve(rows: list[dict[str, Any]], split: str, key: str) -> list[tuple[int, float]]:
    """Sorted (step, value) points of ``key`` in ``split``; nulls skipped, the last row of a step wins."""
    points: dict[int, float] = {}
    for row in rows:
        if row.get("split") == split and _finite(row.get(key)) is not None:
            points[int(row["step"])] = float(row[key])
    return sorted(points.items())


def _resolve_panel(name: str, runs: list[_Run]) -> tuple[str, str] | None:
    """``"eval/loss"`` → (eval, loss); a bare key → its eval curve if any run has one, else train,
    else another split. ``None`` if no run logged it."""
    splits = list(dict.fromkeys(r.get("split") for run in runs for r in run.rows))
    head, _, rest = name.partition("/")
    if rest and head in splits:
        candidates = [(head, rest)]
    else:
        ordered = [s for s in _SPLIT_PREFERENCE if s in splits] + [s for s in splits if s not in _SPLIT_PREFERENCE]
        candidates = [(split, name) for split in ordered]
    for split, key in candidates:
        if any(_curve(run.rows, split, key) for run in runs):
            return split, key
    return None


def _better(a: float, b: float, goal: str) -> bool:
    return a > b if goal == "max" else a < b


def _reached(value: float, threshold: float, goal: str) -> bool:
    return value >= threshold if goal == "max" else value <= threshold


def _headline(run: _Run, metric: str, goal: str) -> dict[str, Any]:
    curve = _curve(run.rows, "eval", metric)
    if curve:
        best_step, best = curve[0]
        for step, value in curve[1:]:
            if _better(value, best, goal):
                best_step, best = step, value
        return {"start": curve[0][1], "final": curve[-1][1], "best": best, "best_step": best_step}
    summary = run.summary or {}  # a run without eval rows may still have summary values
    return {"start": _finite(summary.get(f"start/{metric}")), "final": _finite(summary.get(f"final/{metric}")),
            "best": _finite(summary.get(f"best/{metric}")), "best_step": None}


def default_threshold(starts: list[float], finals: list[float], goal: str) -> float | None:
    """Halfway from the mean start to the best final value; ``None`` if no final beats the start."""
    if not starts or not finals:
        return None
    start = sum(starts) / len(starts)
    best_final = max(finals) if goal == "max" else min(finals)
    if not _better(best_final, start, goal):
        return None
    return start + (best_final - start) / 2


def _steps_to_threshold(run: _Run, metric: str, threshold: float | None, goal: str) -> int | None:
    if threshold is None:
        return None
    return next((step for step, value in _curve(run.rows, "eval", metric) if _reached(value, threshold, goal)), None)


def _run_stats(run: _Run) -> dict[str, Any]:
    """Everything but the headline metric: length, KL, reward, time, steps."""
    length = _curve(run.rows, "eval", "completion_length") or _curve(run.rows, "train", "completion_length")
    kl = [v for _, v in _curve(run.rows, "train", "kl")]
    reward = [v for _, v in _curve(run.rows, "train", "reward/mean")]
    tail = reward[-max(1, math.ceil(len(reward) / 10)):] if reward else []
    summary = run.summary or {}
    times = [_finite(r.get("time")) for r in run.rows]
    wall = _finite(summary.get("wall_seconds"))
    if wall is None:
        wall = max((t for t in times if t is not None), default=None)
    steps = [int(r["step"]) for r in run.rows if isinstance(r.get("step"), int)]
    return {
        "recipe": summary.get("recipe") if isinstance(summary.get("recipe"), str) else None,
        "last_step": max(steps, default=None),
        "final_completion_length": length[-1][1] if length else None,
        "final_kl": kl[-1] if kl else None,
        "max_kl": max(kl) if kl else None,
        "end_reward": sum(tail) / len(tail) if tail else None,
        "wall_seconds": wall,
        "finished": run.summary is not None,
    }


def _curve_summary(run: _Run, panels: list[tuple[str, str]]) -> dict[str, Any]:
    out = {}
    for split, key in panels:
        curve = _curve(run.rows, split, key)
        if curve:
            values = [v for _, v in curve]
            out[f"{split}/{key}"] = {"points": len(curve), "first_step": curve[0][0], "last_step": curve[-1][0],
                                     "first": values[0], "last": values[-1], "min": min(values), "max": max(values)}
    return out


def _config_diffs(runs: list[_Run]) -> dict[str, dict[str, list[Any]] | None]:
    """label -> {key: [value in the first run, value in this run]} for every key that differs."""
    base = runs[0]
    diffs: dict[str, dict[str, list[Any]] | None] = {}
    for run in runs[1:]:
        if base.config is None or run.config is None:
            diffs[run.label] = None
            continue
        a, b = _flatten(base.config), _flatten(run.config)
        keys = [k for k in dict.fromkeys([*a, *b]) if k not in IGNORED_CONFIG_KEYS]
        diffs[run.label] = {k: [a.get(k, NOT_SET), b.get(k, NOT_SET)] for k in keys
                            if a.get(k, NOT_SET) != b.get(k, NOT_SET)}
    return diffs


def _notes(runs: list[_Run], table: dict[str, dict], metric: str, diffs: dict, threshold_rule: str) -> list[str]:
    notes = [threshold_rule]
    missing = [label for label, row in table.items() if row["final"] is None]
    if missing:
        notes.append(f"{', '.join(missing)}: no eval '{metric}' logged")
    unfinished = [run.label for run in runs if run.summary is None]
    if unfinished:
        notes.append(f"{', '.join(unfinished)}: no {SUMMARY_FILE} (unfinished run; numbers are up to its last row)")
    no_config = [run.label for run in runs if run.config is None]
    if no_config:
        notes.append(f"{', '.join(no_config)}: no {CONFIG_FILE}, so its config differences are unknown")
    for key in BUDGET_KEYS:
        differing = [label for label, diff in diffs.items() if diff and key in diff]
        if differing:
            notes.append(f"{', '.join(differing)}: different {key} from {runs[0].label} (not the same budget/seed)")
    return notes


def _plot_png(runs: list[_Run], panels: list[tuple[str, str]], metric: str, threshold: float | None,
              title: str) -> bytes:
    """One panel per (split, key), one line per run (the same colour in every panel)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = max(1, min(_MAX_COLUMNS, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig = Figure(figsize=(5.0 * ncols, 3.6 * nrows + 0.6), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (split, key) in zip(axes, panels):
        ax.set_title(f"{split} {key}")
        for index, run in enumerate(runs):
            curve = _curve(run.rows, split, key)
            if curve:
                marker = "o" if len(curve) <= 30 else None
                ax.plot([s for s, _ in curve], [v for _, v in curve], label=run.label, color=f"C{index % 10}",
                        marker=marker, markersize=3, linewidth=1.5)
        if (split, key) == ("eval", metric) and threshold is not None:
            ax.axhline(threshold, color="gray", linestyle="--", linewidth=1, label=f"threshold {threshold:.4g}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return finish_figure(fig, axes, len(panels), title, empty_text="no metric to plot")


def _columns(table: dict[str, dict], metric: str, goal: str, threshold: float | None) -> list[tuple[str, str]]:
    """The (key, header) columns some run has a value for."""
    names = {"m": metric, "op": "≥" if goal == "max" else "≤",
             "t": "—" if threshold is None else f"{threshold:.4g}"}
    return [(key, header.format(**names)) for key, header in _COLUMNS
            if any(row.get(key) is not None for row in table.values())]


def _table_cells(table: dict[str, dict], columns: list[tuple[str, str]]) -> list[tuple[str, ...]]:
    return [(label, *(_format_summary_value(row.get(key)) for key, _ in columns)) for label, row in table.items()]


def _diff_rows(labels: list[str], diffs: dict) -> list[tuple[str, ...]]:
    """One row per key that differs in some run: its value in every run."""
    keys = list(dict.fromkeys(k for diff in diffs.values() if diff for k in diff))
    rows = []
    for key in keys:
        first = next(diff[key][0] for diff in diffs.values() if diff and key in diff)
        values = [first]
        for label in labels[1:]:
            diff = diffs.get(label)
            values.append("?" if diff is None else diff[key][1] if key in diff else first)
        rows.append((key, *(v if v == NOT_SET or v == "?" else _format_config_value(v) for v in values)))
    return rows


def _markdown(title: str, table: dict[str, dict], columns: list[tuple[str, str]], labels: list[str],
              diffs: dict, notes: list[str]) -> str:
    def md_row(cells) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    lines = [f"### {title}", "", md_row(("run", *(h for _, h in columns))), md_row(["---"] * (len(columns) + 1))]
    lines += [md_row(cells) for cells in _table_cells(table, columns)]
    diff_rows = _diff_rows(labels, diffs)
    if diff_rows:
        lines += ["", md_row(("config", *labels)), md_row(["---"] * (len(labels) + 1))]
        lines += [md_row((f"`{key}`", *values)) for key, *values in diff_rows]
    lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def _html(title: str, png: bytes, table: dict[str, dict], columns: list[tuple[str, str]], runs: list[_Run],
          diffs: dict, notes: list[str], out: Path) -> str:
    labels = [run.label for run in runs]
    parts = [f"<h1>{html.escape(title)}</h1>",
             _table(("run", *(h for _, h in columns)), _table_cells(table, columns), "start-final")]
    parts += ["<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>"]
    encoded = base64.b64encode(png).decode("ascii")
    alt = html.escape(f"{title}: metric curves")
    parts += ["<h2>Curves</h2>", f'<img alt="{alt}" src="data:image/png;base64,{encoded}">']
    parts.append(f"<h2>Config differences (vs {html.escape(labels[0])})</h2>")
    diff_rows = _diff_rows(labels, diffs)
    if diff_rows:
        parts.append(_table(("key", *labels), diff_rows))
    else:
        parts.append("<p>The configs are identical apart from output_dir and resume.</p>")
    unknown = [label for label, diff in diffs.items() if diff is None]
    if unknown:
        parts.append(f"<p>Unknown for {html.escape(', '.join(unknown))} (no {CONFIG_FILE}): shown as ?</p>")
    run_rows = []
    for run in runs:
        report = run.path / "report.html"
        link = (f'<a href="{html.escape(os.path.relpath(report, out))}">report.html</a>'
                if report.is_file() else "—")
        run_rows.append(f"<tr><td>{html.escape(run.label)}</td><td>{html.escape(str(run.path))}</td>"
                        f"<td>{link}</td></tr>")
    parts += ["<h2>Runs</h2>", "<table>\n<tr><th>run</th><th>directory</th><th>report</th></tr>\n"
              + "\n".join(run_rows) + "\n</table>"]
    body = "\n".join(parts)
    return ('<!DOCTYPE html>\n<html>\n<head>\n<meta charset="utf-8">\n'
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def compare_runs(
    run_dirs: dict[str, str | Path],
    out: str | Path,
    *,
    metric: str = "task_accuracy",
    threshold: float | None = None,
    panels: list[str] | None = None,
    goal: str = "max",
    title: str | None = None,
) -> dict[str, Any]:
    """Compare the runs in ``run_dirs`` (label -> output_dir, in table order; the first is the
    baseline of the config diff) and write ``compare.{json,png,html,md}`` to ``out``.

    ``metric`` is an eval metric; ``goal`` says whether higher ("max") or lower ("min") is better.
    ``threshold=None`` picks the midpoint rule of the module docstring. ``panels`` are metric keys
    to plot (``"kl"``, or ``"train/completion_length"`` to pick the split); the default is
    :data:`DEFAULT_PANELS`. Returns what ``compare.json`` holds.
    """
    if not run_dirs:
        raise ConfigError("compare: no runs given; pass at least one label -> run directory")
    if goal not in ("max", "min"):
        raise ConfigError(f"compare: goal must be 'max' (higher is better) or 'min', got {goal!r}")
    if threshold is not None and _finite(threshold) is None:
        raise ConfigError(f"compare: threshold must be a finite number, got {threshold!r}")
    runs = [_load_run(str(label), Path(path)) for label, path in run_dirs.items()]
    if not any(_curve(run.rows, "eval", metric) for run in runs) and \
            not any(_finite((run.summary or {}).get(f"final/{metric}")) is not None for run in runs):
        logged = sorted({k for run in runs for r in run.rows if r.get("split") == "eval" for k in r}
                        - {"step", "split", "time"})
        raise ConfigError(f"compare: no run logged the eval metric '{metric}'; the runs' eval metrics are "
                          f"{', '.join(logged) or 'none'}: choose one with --metric (spec key 'metric')")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    table = {run.label: _headline(run, metric, goal) for run in runs}
    if threshold is None:
        starts = [r["start"] for r in table.values() if r["start"] is not None]
        finals = [r["final"] for r in table.values() if r["final"] is not None]
        threshold = default_threshold(starts, finals, goal)
        rule = (f"threshold {threshold:.4g}: midpoint between the mean start ({sum(starts) / len(starts):.4g}) "
                f"and the best final value ({(max if goal == 'max' else min)(finals):.4g})" if threshold is not None
                else f"threshold: none (no run's final {metric} beat the start; pass one with --threshold)")
    else:
        threshold = float(threshold)
        rule = f"threshold {threshold:.4g}: given"
    for run in runs:
        table[run.label] = {**_run_stats(run), **table[run.label],
                            "steps_to_threshold": _steps_to_threshold(run, metric, threshold, goal)}

    names = [p.format(metric=metric) for p in (panels or DEFAULT_PANELS)]
    resolved = list(dict.fromkeys(p for p in (_resolve_panel(name, runs) for name in names) if p is not None))
    diffs = _config_diffs(runs)
    notes = _notes(runs, table, metric, diffs, rule)
    title = title or f"rlxf compare: {', '.join(run.label for run in runs)}"
    columns = _columns(table, metric, goal, threshold)

    result = {
        "title": title, "metric": metric, "goal": goal, "threshold": threshold, "threshold_rule": rule,
        "baseline": runs[0].label, "runs": table,
        "run_dirs": {run.label: str(run.path) for run in runs},
        "curves": {run.label: _curve_summary(run, resolved) for run in runs},
        "panels": [f"{split}/{key}" for split, key in resolved],
        "config_diff": diffs, "notes": notes,
    }
    result = to_jsonable(result, where="compare")
    png = _plot_png(runs, resolved, metric, threshold, title)
    atomic_write(out / "compare.json", json.dumps(result, indent=2, allow_nan=False) + "\n")
    atomic_write(out / "compare.png", png)
    atomic_write(out / "compare.html", _html(title, png, table, columns, runs, diffs, notes, out))
    atomic_write(out / "compare.md", _markdown(title, table, columns, [r.label for r in runs], diffs, notes))
    return result


_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_label(label: Any, where: str) -> str:
    """``label`` if it is a safe directory name (letters, digits, ``._-``), else a ConfigError."""
    if not isinstance(label, str) or not _LABEL.match(label) or len(label) > 100:
        raise ConfigError(f"{where}: run label {label!r} is not a safe directory name; use letters, digits, "
                          "'.', '_' and '-' (starting with a letter or digit), e.g. lr_1e-3")
    return label


def parse_run_dirs(items: list[str]) -> dict[str, Path]:
    """``["hard=runs/a", "soft=runs/b"]`` (``rlxf compare --runs``) → ``{"hard": Path("runs/a"), ...}``."""
    run_dirs: dict[str, Path] = {}
    for item in items:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise ConfigError(f"--runs: {item!r} is not LABEL=DIR; write e.g. --runs hard=runs/hard soft=runs/soft")
        if label in run_dirs:
            raise ConfigError(f"--runs: label '{label}' is given twice; give every run its own label")
        run_dirs[label] = Path(path)
    return run_dirs
