"""The human-readable record of a run: ``report.png`` (metric curves) and ``report.html``.

``report.png`` holds one panel per group of metrics the run logged: panels with no data are left
out and the grid adapts to the rest. Each panel has its title above the plot, a legend between
title and plot (never over the data), one line style and marker per curve (identical curves are
drawn once, labelled ``a = b``) and a caption below: what the metrics are and why a flat one is
flat, from the table in :mod:`rlxf.reporting.descriptions`.

``report.html`` is one self-contained file (the plot is embedded as base64) that shows the run's
title, the start → final change of each headline metric with what it is, the full summary, the
panel captions, the panels left out and why, every logged metric with its description, and the
resolved config. matplotlib is imported only when a report is written.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import math
import re
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlxf.reporting.descriptions import describe, table_name
from rlxf.reporting.metrics import METRICS_FILE, atomic_write, read_metrics

_START_FINAL = re.compile(r"^(start|final)[/.](.+)$")
_MAX_COLUMNS = 3
_PANEL_SIZE = (5.4, 4.4)      # inches per panel: plot, legend, title and caption
_CAPTION_CHARS = 76           # caption characters per line at the panel's width
_LEGEND_CHARS = 64            # legend characters per row
_LINE_STYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P")

if TYPE_CHECKING:
    from matplotlib.figure import Figure, SubFigure


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


@dataclasses.dataclass(frozen=True)
class Curve:
    """One line of a panel: the series it draws, named by ``labels`` (several when identical) with
    their metric ``keys``."""

    labels: tuple[str, ...]
    keys: tuple[str, ...]
    steps: list[int]
    values: list[float]

    @property
    def label(self) -> str:
        """The legend entry: ``a = b`` for identical series."""
        return " = ".join(self.labels)


@dataclasses.dataclass(frozen=True)
class PanelPlot:
    """A panel with data: its curves and its caption (from :data:`~rlxf.reporting.descriptions.METRICS`)."""

    panel: Panel
    curves: list[Curve]
    caption: str


def _series(rows: list[dict[str, Any]], panel: Panel) -> list[Curve]:
    """The curves for ``panel``; keys with no finite value are skipped."""
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
            curves.append(Curve((label,), (key,), [s for s, _ in points], [v for _, v in points]))
    return curves


def _same_values(a: list[float], b: list[float]) -> bool:
    """Equal lists of floats, NaN equal to NaN."""
    return len(a) == len(b) and all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b))


def _merge_identical(curves: list[Curve]) -> list[Curve]:
    """Draw identical curves once, labelled ``a = b`` (one would otherwise hide the other)."""
    merged: list[Curve] = []
    for curve in curves:
        twin = next((i for i, m in enumerate(merged)
                     if m.steps == curve.steps and _same_values(m.values, curve.values)), None)
        if twin is None:
            merged.append(curve)
        else:
            m = merged[twin]
            merged[twin] = Curve(m.labels + curve.labels, m.keys + curve.keys, m.steps, m.values)
    return merged


def _is_flat(values: list[float]) -> bool:
    """At least two finite values, all equal."""
    finite = [v for v in values if math.isfinite(v)]
    return len(finite) > 1 and max(finite) - min(finite) <= 1e-12 * max(1.0, abs(max(finite)))


def _caption(curves: list[Curve], logged: set[str]) -> str:
    """One line: what each plotted metric is (grouped by table entry), why a flat one is flat, and
    which curves coincide."""
    groups: dict[str, list[str]] = {}
    for key in dict.fromkeys(k for c in curves for k in c.keys):
        groups.setdefault(table_name(key) or key, []).append(key)
    parts = []
    for name, keys in groups.items():
        info = describe(keys[0], logged)
        text = info.what if info else ""
        values = [v for c in curves if set(c.keys) & set(keys) for v in c.values]
        if info and info.flat and _is_flat(values):
            text += f" — flat: {info.flat}"
        if not text:
            parts.append(name)
        elif len(groups) == 1:
            parts.append(text)
        else:
            parts.append(f"{name}: {text}")
    parts += [f"{' and '.join(c.labels)} are identical (one line)" for c in curves if len(c.labels) > 1]
    return "; ".join(parts)


def plan_panels(rows: list[dict[str, Any]], panels: list[Panel]) -> tuple[list[PanelPlot], list[Panel]]:
    """Split ``panels`` into those with data (curves and caption) and those with none, in order."""
    logged = {k for r in rows for k in r}
    shown, empty = [], []
    for panel in panels:
        curves = _merge_identical(_series(rows, panel))
        if curves:
            shown.append(PanelPlot(panel, curves, _caption(curves, logged)))
        else:
            empty.append(panel)
    return shown, empty


def _grid(n: int) -> tuple[int, int]:
    """(rows, columns) for ``n`` panels: one row up to 3, 2 × 2 for 4, then rows of 3."""
    ncols = n if n <= _MAX_COLUMNS else (2 if n == 4 else _MAX_COLUMNS)
    return math.ceil(n / ncols), ncols


def _draw_panel(sub: SubFigure, plot: PanelPlot, caption_lines: int) -> None:
    """Title, curves (each its own line style and marker), legend above the plot, caption below
    (padded to ``caption_lines`` so the plots of one row line up)."""
    ax = sub.subplots()
    for index, curve in enumerate(plot.curves):
        n = len(curve.steps)
        ax.plot(curve.steps, curve.values, label=curve.label, linewidth=1.5, markersize=4,
                linestyle=_LINE_STYLES[index % len(_LINE_STYLES)], marker=_MARKERS[index % len(_MARKERS)],
                markevery=max(1, n // 12))
    ax.set_xlabel("step")
    ax.set_ylabel(plot.panel.ylabel)
    ax.grid(alpha=0.3)
    longest = max(len(c.label) for c in plot.curves)
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.01), borderaxespad=0.0, frameon=False,
              fontsize="small", ncols=max(1, min(len(plot.curves), _LEGEND_CHARS // (longest + 6))))
    sub.suptitle(plot.panel.title, fontweight="bold").set_gid("panel-title")
    lines = _caption_lines(plot.caption)
    caption = sub.supxlabel("\n".join(lines + [""] * (caption_lines - len(lines))), fontsize="small",
                            color="0.25", linespacing=1.3)
    caption.set_gid("caption")


def _caption_lines(caption: str) -> list[str]:
    """``caption`` wrapped to the panel's width (option names such as --ppo-epochs kept whole)."""
    return textwrap.wrap(caption, _CAPTION_CHARS, break_on_hyphens=False)


def report_figure(rows: list[dict[str, Any]], panels: list[Panel], title: str) -> Figure:
    """The matplotlib Figure of ``report.png``: one sub-figure per panel with data, titled above
    every panel."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shown, _ = plan_panels(rows, panels)
    nrows, ncols = _grid(max(1, len(shown)))
    fig = Figure(figsize=(_PANEL_SIZE[0] * ncols, _PANEL_SIZE[1] * nrows + 0.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title, fontsize="x-large").set_gid("figure-title")
    if not shown:
        fig.text(0.5, 0.5, "no metrics logged", ha="center", va="center", color="gray")
        return fig
    grid = fig.add_gridspec(nrows, ncols)
    for index, plot in enumerate(shown):
        row = shown[index - index % ncols:index - index % ncols + ncols]
        sub = fig.add_subfigure(grid[index // ncols, index % ncols])
        _draw_panel(sub, plot, max(len(_caption_lines(p.caption)) for p in row))
    return fig


def _plot_png(rows: list[dict[str, Any]], panels: list[Panel], title: str) -> bytes:
    """Render :func:`report_figure` and return the PNG bytes."""
    buffer = io.BytesIO()
    report_figure(rows, panels, title).savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def finish_figure(fig, axes, used: int, title: str, *, empty_text: str) -> bytes:
    """Hide the ``axes`` beyond the first ``used`` (a note when none is used), title, lay out
    (the title above every panel's), and return the figure as PNG bytes."""
    for ax in axes[used:]:
        ax.set_visible(False)
    if not used:
        axes[0].set_visible(True)
        axes[0].text(0.5, 0.5, empty_text, ha="center", va="center", color="gray")
        axes[0].set_axis_off()
    fig.suptitle(title)
    fig.set_layout_engine("constrained")
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


def _table(
    header: tuple[str, ...], rows: list[tuple[str, ...]], css_class: str = "", prose: tuple[int, ...] = ()
) -> str:
    """An HTML table of escaped cells; the columns numbered in ``prose`` are set as text, not code."""
    cls = f' class="{css_class}"' if css_class else ""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "\n".join(
        "<tr>" + "".join(_cell(c, i in prose) for i, c in enumerate(row)) + "</tr>" for row in rows
    )
    return f"<table{cls}>\n<tr>{head}</tr>\n{body}\n</table>"


def _cell(text: str, prose: bool) -> str:
    return f'<td class="prose">{html.escape(text)}</td>' if prose else f"<td>{html.escape(text)}</td>"


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.8em; text-align: left; }
td:not(:first-child) { font-family: ui-monospace, monospace; }
table.start-final td { background: #fff6d5; font-weight: 600; }
td.prose { font-family: inherit; font-weight: normal; }
img { max-width: 100%; }
"""


def _what(metric: str, logged: set[str]) -> str:
    info = describe(metric, logged)
    return info.what if info else "—"


def _start_final_table(pairs: list[tuple[str, Any, Any]], logged: set[str]) -> str:
    rows = []
    for metric, start, final in pairs:
        change = "—"
        if _is_number(start) and _is_number(final) and math.isfinite(final - start):
            change = f"{final - start:+.4g}"
        rows.append((metric, _format_summary_value(start), _format_summary_value(final), change,
                     _what(metric, logged)))
    return _table(("metric", "start", "final", "change", "what it is"), rows, "start-final", prose=(4,))


def _absent_reasons(panel: Panel, logged: set[str]) -> str:
    """Why ``panel`` has no data: its keys grouped by the table's ``absent`` note."""
    by_reason: dict[str, list[str]] = {}
    for key in panel.keys:
        info = describe(key, logged)
        by_reason.setdefault(info.absent if info and info.absent else "not logged by this run", []).append(key)
    return "; ".join(f"{', '.join(keys)}: {reason}" for reason, keys in by_reason.items())


def _panels_html(rows: list[dict[str, Any]], panels: list[Panel]) -> list[str]:
    """The caption of each plotted panel, and the panels left out for lack of data with the reason."""
    logged = {k for r in rows for k in r}
    shown, empty = plan_panels(rows, panels)
    parts = []
    if shown:
        captions = [(p.panel.title, p.caption) for p in shown]
        parts += ["<h3>What each panel shows</h3>", _table(("panel", "caption"), captions, prose=(1,))]
    empty = [p for p in empty if p.keys]
    if empty:
        items = "\n".join(f"<li><b>{html.escape(p.title)}</b>: {html.escape(_absent_reasons(p, logged))}</li>"
                           for p in empty)
        parts += ["<h3>Not plotted: no data in this run</h3>", f"<ul>\n{items}\n</ul>"]
    return parts


def _logged_metrics_table(rows: list[dict[str, Any]]) -> str:
    """Every numeric metric in metrics.jsonl: its splits, why it may be flat, and what it is."""
    logged = {k for r in rows for k in r}
    splits: dict[str, list[str]] = {}
    for row in rows:
        for key, value in row.items():
            if key not in ("step", "split", "time") and _is_number_or_none(value):
                found = splits.setdefault(key, [])
                if row.get("split") not in found:
                    found.append(row.get("split"))
    cells = []
    for key, found in splits.items():
        info = describe(key, logged)
        cells.append((key, ", ".join(str(s) for s in found), info.flat if info and info.flat else "—",
                      info.what if info else "—"))
    return _table(("metric", "split", "flat when", "what it is"), cells, prose=(2, 3))


def _html(
    title: str,
    png: bytes,
    summary: dict[str, Any] | None,
    config: dict[str, Any] | None,
    rows: list[dict[str, Any]],
    panels: list[Panel],
) -> str:
    logged = {k for r in rows for k in r}
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if summary:
        flat = _flatten(summary)
        pairs, used = _start_final_rows(flat)
        if pairs:
            parts += ["<h2>Start → final</h2>", _start_final_table(pairs, logged)]
        rest = [(k, _format_summary_value(v)) for k, v in flat.items() if k not in used]
        if rest:
            parts += ["<h2>Summary</h2>", _table(("key", "value"), rest)]
    encoded = base64.b64encode(png).decode("ascii")
    alt = html.escape(f"{title}: metric curves")
    parts += ["<h2>Metrics</h2>", f'<img alt="{alt}" src="data:image/png;base64,{encoded}">']
    parts += _panels_html(rows, panels)
    if rows:
        parts += ["<h2>Logged metrics</h2>", _logged_metrics_table(rows)]
    if config:
        config_rows = [(k, _format_config_value(v)) for k, v in _flatten(config).items()]
        parts += ["<h2>Config</h2>", _table(("key", "value"), config_rows)]
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

    Each :class:`Panel` plots its keys against step; keys no row has are skipped, and a panel
    with nothing to plot is left out of the figure (the grid adapts to the panels that remain).
    Every plotted panel has a caption from :data:`~rlxf.reporting.descriptions.METRICS`. The HTML
    embeds the PNG and shows ``title``; a highlighted start → final table for every
    ``start/<metric>`` + ``final/<metric>`` pair in ``summary``, with what each metric is; the rest
    of the summary (nested keys flattened as ``a.b``); each panel's caption; the panels left out
    and why; every logged metric with its splits and description; and ``config`` (a dict or
    dataclass). Returns ``(png_path, html_path)``.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = output_dir / METRICS_FILE
    rows = read_metrics(metrics_path) if metrics_path.exists() else []
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)

    panels = list(panels)
    png = _plot_png(rows, panels, title)
    png_path = atomic_write(output_dir / "report.png", png)
    html_path = atomic_write(output_dir / "report.html", _html(title, png, summary, config, rows, panels))
    return png_path, html_path
