"""The human-readable record of a run: ``report.png`` (metric curves) and ``report.html``.

``report.html`` is one self-contained file (the plot is embedded as base64) that shows the run's
title, the start → final change of each headline metric, the full summary and the resolved config.
matplotlib is imported only when a report is written.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import math
import re
from pathlib import Path
from typing import Any

from rlxf.reporting.metrics import METRICS_FILE, atomic_write, read_metrics

_START_FINAL = re.compile(r"^(start|final)[/.](.+)$")
_MAX_COLUMNS = 3


@dataclasses.dataclass(frozen=True)
class Panel:
    """One plot in the report: the metric ``keys`` against step, optionally from one ``split``.

    With ``split=None`` every split that logged a key gets its own curve (``train/loss``,
    ``eval/loss``).
    """

    title: str
    keys: list[str]
    split: str | None = None
    ylabel: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.keys, str):
            raise TypeError(
                f"Panel {self.title!r}: keys must be a list of metric names, not the string "
                f"{self.keys!r}; write keys=[{self.keys!r}]"
            )
        object.__setattr__(self, "keys", tuple(self.keys))  # frozen and hashable


def _series(rows: list[dict[str, Any]], panel: Panel) -> list[tuple[str, list[int], list[float]]]:
    """The (label, steps, values) curves for ``panel``; keys with no finite value are skipped."""
    if panel.split is not None:
        rows = [r for r in rows if r.get("split") == panel.split]
    splits = list(dict.fromkeys(r.get("split") for r in rows))
    curves = []
    for key in panel.keys:
        with_key = [s for s in splits if any(r.get("split") == s and key in r for r in rows)]
        for split in with_key:
            points = sorted(
                (
                    (r["step"], math.nan if r[key] is None else float(r[key]))
                    for r in rows
                    if r.get("split") == split and (key in r) and _is_number_or_none(r[key])
                ),
                key=lambda point: point[0],
            )
            if not any(math.isfinite(v) for _, v in points):
                continue
            label = key if len(with_key) == 1 else f"{split}/{key}"
            curves.append((label, [s for s, _ in points], [v for _, v in points]))
    return curves


def _plot_png(rows: list[dict[str, Any]], panels: list[Panel], title: str) -> bytes:
    """Render the panels as a grid (at most 3 columns) and return the PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = max(1, min(_MAX_COLUMNS, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig = Figure(figsize=(5.0 * ncols, 3.6 * nrows + 0.6), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, panel in zip(axes, panels):
        ax.set_title(panel.title)
        curves = _series(rows, panel)
        if not curves:
            message = "no data for " + ", ".join(panel.keys)
            ax.text(0.5, 0.5, message, ha="center", va="center", color="gray", wrap=True,
                    transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        for label, steps, values in curves:
            marker = "o" if len(steps) <= 30 else None
            ax.plot(steps, values, label=label, marker=marker, markersize=3, linewidth=1.5)
        ax.set_xlabel("step")
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return finish_figure(fig, axes, len(panels), title, empty_text="no panels")


def finish_figure(fig, axes, used: int, title: str, *, empty_text: str) -> bytes:
    """Hide the ``axes`` beyond the first ``used`` (a note when none is used), title, lay out,
    and return the figure as PNG bytes."""
    for ax in axes[used:]:
        ax.set_visible(False)
    if not used:
        axes[0].set_visible(True)
        axes[0].text(0.5, 0.5, empty_text, ha="center", va="center", color="gray")
        axes[0].set_axis_off()
    fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``."""
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_number_or_none(value: Any) -> bool:
    return value is None or _is_number(value)


def _format_summary_value(value: Any) -> str:
    """Floats to 4 significant digits; missing / non-finite values as an em dash."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=str)
    return str(value)


def _format_config_value(value: Any) -> str:
    """Config values exactly as given (a learning rate stays ``3e-06``)."""
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=str)
    return str(value)


def _start_final_rows(flat: dict[str, Any]) -> tuple[list[tuple[str, Any, Any]], set[str]]:
    """Pair ``start/<metric>`` with ``final/<metric>``; return (metric, start, final) rows and
    the summary keys they used."""
    found: dict[str, dict[str, str]] = {}
    for key in flat:
        match = _START_FINAL.match(key)
        if match:
            found.setdefault(match.group(2), {})[match.group(1)] = key
    rows, used = [], set()
    for metric, keys in found.items():
        if len(keys) == 2:
            rows.append((metric, flat[keys["start"]], flat[keys["final"]]))
            used.update(keys.values())
    return rows, used


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]], css_class: str = "") -> str:
    cls = f' class="{css_class}"' if css_class else ""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "\n".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table{cls}>\n<tr>{head}</tr>\n{body}\n</table>"


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.8em; text-align: left; }
td:not(:first-child) { font-family: ui-monospace, monospace; }
table.start-final td { background: #fff6d5; font-weight: 600; }
img { max-width: 100%; }
"""


def _start_final_table(pairs: list[tuple[str, Any, Any]]) -> str:
    rows = []
    for metric, start, final in pairs:
        change = "—"
        if _is_number(start) and _is_number(final) and math.isfinite(final - start):
            change = f"{final - start:+.4g}"
        rows.append((metric, _format_summary_value(start), _format_summary_value(final), change))
    return _table(("metric", "start", "final", "change"), rows, "start-final")


def _html(
    title: str, png: bytes, summary: dict[str, Any] | None, config: dict[str, Any] | None
) -> str:
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if summary:
        flat = _flatten(summary)
        pairs, used = _start_final_rows(flat)
        if pairs:
            parts += ["<h2>Start → final</h2>", _start_final_table(pairs)]
        rest = [(k, _format_summary_value(v)) for k, v in flat.items() if k not in used]
        if rest:
            parts += ["<h2>Summary</h2>", _table(("key", "value"), rest)]
    encoded = base64.b64encode(png).decode("ascii")
    alt = html.escape(f"{title}: metric curves")
    parts += ["<h2>Metrics</h2>", f'<img alt="{alt}" src="data:image/png;base64,{encoded}">']
    if config:
        rows = [(k, _format_config_value(v)) for k, v in _flatten(config).items()]
        parts += ["<h2>Config</h2>", _table(("key", "value"), rows)]
    body = "\n".join(parts)
    return (
        '<!DOCTYPE html>\n<html>\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n"
        f"<body>\n{body}\n</body>\n</html>\n"
    )


def write_report(
    output_dir: str | Path,
    *,
    title: str,
    panels: list[Panel],
    summary: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Plot ``output_dir/metrics.jsonl`` and write ``report.png`` and ``report.html``.

    Each :class:`Panel` plots its keys against step; keys no row has are skipped and a panel
    with nothing to plot says "no data". The HTML embeds the PNG and shows ``title``, a highlighted
    start → final table for every ``start/<metric>`` + ``final/<metric>`` pair in ``summary``, the
    rest of the summary (nested keys flattened as ``a.b``), and ``config`` (a dict or dataclass).
    Returns ``(png_path, html_path)``.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = output_dir / METRICS_FILE
    rows = read_metrics(metrics_path) if metrics_path.exists() else []
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)

    png = _plot_png(rows, list(panels), title)
    png_path = atomic_write(output_dir / "report.png", png)
    html_path = atomic_write(output_dir / "report.html", _html(title, png, summary, config))
    return png_path, html_path
