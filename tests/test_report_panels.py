"""report.png / report.html for every recipe family: only panels with data, each legible and captioned.

Each family's run is written the way its recipe logs it (the metric keys and splits of
src/rlxf/recipes/), with synthetic values. The GRPO-family and PPO panels are the recipes' own
``PANELS``; the SFT, RM and preference panels are built inside their ``train`` functions and are
repeated here as those functions build them.
"""

import html
import json
import math

import pytest

from rlxf.recipes import grpo, ppo
from rlxf.reporting import MetricsLogger, Panel, read_metrics, write_report, write_summary
from rlxf.reporting.descriptions import METRICS, MetricInfo, describe, table_name
from rlxf.reporting.report import plan_panels, report_figure

pytestmark = pytest.mark.report  # renders report.png for real (tests/conftest.py)

STEPS = 40
EVAL_EVERY = 10
PAIR_KINDS = ("conciseness", "correctness", "mixed")
KIND_KEYS = [f"accuracy/{kind}" for kind in PAIR_KINDS]

SFT_PANELS = [Panel("loss (completion NLL)", ["loss"]), Panel("perplexity", ["perplexity"], split="eval"),
              Panel("task accuracy (greedy)", ["task_accuracy"], split="eval"),
              Panel("learning rate", ["lr"], split="train")]
RM_PANELS = [Panel("pairwise accuracy", ["accuracy"], ylabel="fraction"),
             Panel("held-out accuracy by pair kind", KIND_KEYS, split="eval", ylabel="fraction"),
             Panel("score margin", ["margin"]),
             Panel("scores", ["score/chosen", "score/rejected"]), Panel("loss", ["loss"]),
             Panel("learning rate", ["lr"], split="train")]
_PREFERENCE_TAIL = [Panel("held-out accuracy by pair kind", KIND_KEYS, split="eval", ylabel="fraction"),
                    Panel("task accuracy (greedy)", ["task_accuracy"], split="eval"),
                    Panel("learning rate", ["lr"], split="train")]
DPO_PANELS = [Panel("implicit-reward accuracy", ["rewards/accuracy"], ylabel="fraction"),
              Panel("reward margin", ["rewards/margin"]),
              Panel("implicit rewards", ["rewards/chosen", "rewards/rejected"]),
              Panel("log-probs", ["logps/chosen", "logps/rejected"]), Panel("loss", ["loss"]), *_PREFERENCE_TAIL]
ORPO_PANELS = [Panel("log-odds accuracy", ["log_odds_accuracy"], ylabel="fraction"),
               Panel("log odds ratio (chosen − rejected)", ["log_odds_ratio"]),
               Panel("chosen NLL (token mean)", ["nll"]), Panel("loss", ["loss"]), *_PREFERENCE_TAIL]

OPTIM = ["lr", "grad_norm", "tokens_per_s"]
DPO_PAIR = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy",
            "logps/chosen", "logps/rejected"]
ORPO_PAIR = ["loss", "log_odds_ratio", "nll", "log_odds_accuracy"]
RM_PAIR = ["loss", "accuracy", "margin", "score/chosen", "score/rejected"]
GREEDY_EVAL = ["completion_length", "truncated_fraction", "task_accuracy", "reward"]
GRPO_TRAIN = ["reward/mean", "reward/std", "frac_zero_adv", "completion_length", "truncated_fraction", "lr",
              "sample_tokens_per_s", "train_tokens_per_s", "groups_sampled", "reward_none", "accuracy", "grad_norm",
              "loss", "clip_fraction", "entropy", "ratio_max", "sampler/epoch", "sampler/batch_pass_rate",
              "sampler/weight_entropy", "sampler/ess_frac"]
PPO_TRAIN = ["score", "reward/mean", "kl", "kl_coef", "non_score_reward", "eos_fraction", "completion_length",
             "advantage_mean", "returns_mean", "value_mean", "lr", "sample_tokens_per_s", "train_tokens_per_s",
             "accuracy", "loss/policy", "loss/value", "grad_norm", "clip_fraction", "entropy", "value_clip_fraction"]
COOPER_TRAIN = ["kl", "rm/pairs", "rm/groups", "rm/agreement", "rm/score_correct", "rm/score_wrong",
                "rm/update_loss", "rm/update_pair_accuracy", "rm/updates"]
COOPER_EVAL = ["rm/accuracy", "rm/auc", "rm/score_pos", "rm/score_neg", "rm/pair_accuracy"]
LMGT_TRAIN = ["lmgt/shift_plus", "lmgt/shift_zero", "lmgt/shift_minus", "lmgt/not_called", "lmgt/failed",
              "lmgt/calls", "lmgt/cache_hits", "lmgt/scale", "lmgt/calls_total", "lmgt/cache_size",
              "lmgt/agreement_base", "lmgt/agreement_verifier"]

# family: (panels, train keys, eval keys, panel titles the report must show, titles it must leave out)
FAMILIES = {
    "sft": (SFT_PANELS, ["loss", *OPTIM], ["loss", "perplexity", "task_accuracy"], ["perplexity"], []),
    "rm": (RM_PANELS, [*RM_PAIR, *OPTIM], [*RM_PAIR, *KIND_KEYS], ["held-out accuracy by pair kind"],
           []),
    "dpo": (DPO_PANELS, [*DPO_PAIR, *OPTIM], [*DPO_PAIR, "accuracy", *KIND_KEYS, "task_accuracy"],
            ["implicit rewards"], []),
    "orpo": (ORPO_PANELS, [*ORPO_PAIR, *OPTIM], [*ORPO_PAIR, "accuracy", *KIND_KEYS, "task_accuracy"],
             ["log-odds accuracy"], []),
    "grpo": (grpo.PANELS, GRPO_TRAIN, GREEDY_EVAL, ["clip fraction / zero-advantage groups"],
             ["KL to reference", "learned reward model (COOPER)", "LMGT judge shifts (counts per step)"]),
    "dapo": (grpo.PANELS, [*GRPO_TRAIN, "reward/overlong"], GREEDY_EVAL, ["held-out accuracy (greedy)"],
             ["KL to reference"]),
    "rloo": (grpo.PANELS, GRPO_TRAIN, GREEDY_EVAL, ["throughput"], ["KL to reference"]),
    "ppo": (ppo.PANELS, PPO_TRAIN, GREEDY_EVAL, ["KL to reference (summed per sequence)", "losses"], []),
    "cooper": (grpo.PANELS, [*GRPO_TRAIN, *COOPER_TRAIN], [*GREEDY_EVAL, *COOPER_EVAL],
               ["KL to reference", "learned reward model (COOPER)"], ["LMGT judge shifts (counts per step)"]),
    "lmgt": (grpo.PANELS, [*GRPO_TRAIN, *LMGT_TRAIN], GREEDY_EVAL,
             ["LMGT judge shifts (counts per step)", "LMGT agreement of δ with the verifier / base reward"],
             ["learned reward model (COOPER)"]),
    "long2short": (grpo.PANELS, [*GRPO_TRAIN, "reward/length"], GREEDY_EVAL, ["completion length"],
                   ["KL to reference"]),
}

# Values the recipes log as constants in these runs: one update per batch (ρ ≡ 1), a uniform sampler.
CONSTANT = {"clip_fraction": 0.0, "ratio_max": 1.0, "value_clip_fraction": 0.0, "sampler/epoch": 0.0,
            "sampler/weight_entropy": 1.0, "sampler/ess_frac": 1.0, "sampler/batch_pass_rate": None,
            "groups_sampled": 16.0, "reward_none": 0.0, "lmgt/failed": 0.0}


def _value(key: str, step: int, split: str) -> float | None:
    """A deterministic, varying value per (key, step, split); the recipe's constant where it logs one."""
    if key in CONSTANT:
        return CONSTANT[key]
    seed = sum(map(ord, f"{split}/{key}"))
    return round(0.5 + 0.3 * math.sin(step / 7 + seed) + 0.002 * step * (1 + seed % 5), 6)


def _write_run(out, family: str) -> list[Panel]:
    """metrics.jsonl and summary.json as ``family`` writes them; returns its panels."""
    panels, train_keys, eval_keys, _, _ = FAMILIES[family]
    with MetricsLogger(out) as logger:
        logger.log(0, {k: _value(k, 0, "eval") for k in eval_keys}, split="eval")
        for step in range(1, STEPS + 1):
            metrics = {k: _value(k, step, "train") for k in train_keys}
            if family == "long2short" and step <= 10:       # --length-reward-warmup 10: no length term yet
                del metrics["reward/length"]
            if family in ("grpo", "dapo", "rloo", "long2short", "cooper", "lmgt"):
                metrics["reward/mean"] = metrics["accuracy"]  # the verifier's 0/1 reward
            logger.log(step, metrics)
            if step % EVAL_EVERY == 0:
                logger.log(step, {k: _value(k, step, "eval") for k in eval_keys}, split="eval")
    headline = [k for k in ("task_accuracy", "reward", "accuracy", "loss") if k in eval_keys]
    write_summary(out, {**{f"start/{k}": _value(k, 0, "eval") for k in headline},
                        **{f"final/{k}": _value(k, STEPS, "eval") for k in headline}, "steps": STEPS})
    return panels


def _panel_titles(fig) -> list[str]:
    return [t.get_text() for sub in fig.subfigs for t in sub.texts if t.get_gid() == "panel-title"]


def _captions(sub) -> list[str]:
    return [t.get_text().strip() for t in sub.texts if t.get_gid() == "caption"]


def _has_data(line) -> bool:
    return any(math.isfinite(float(y)) for y in line.get_ydata())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_panel_has_data_a_caption_and_distinct_line_styles(tmp_path, family):
    panels = _write_run(tmp_path, family)
    _, _, _, must_show, must_leave_out = FAMILIES[family]
    rows = read_metrics(tmp_path)
    fig = report_figure(rows, panels, f"rlxf {family}")

    titles = _panel_titles(fig)
    assert set(must_show) <= set(titles) and not set(must_leave_out) & set(titles)
    shown, _ = plan_panels(rows, panels)
    assert titles == [p.panel.title for p in shown]
    logged = {k for r in rows for k in r}
    for sub, plot in zip(fig.subfigs, shown, strict=True):
        (ax,) = sub.axes
        lines = ax.get_lines()
        assert lines and all(_has_data(line) for line in lines), f"{family}: empty panel {plot.panel.title}"
        (caption,) = _captions(sub)
        caption = " ".join(caption.split())
        for key in {k for curve in plot.curves for k in curve.keys}:
            assert " ".join(describe(key, logged).what.split()) in caption, f"{family}: {key} not described"
        styles = [(line.get_linestyle(), line.get_marker()) for line in lines]
        assert len(set(styles)) == len(styles), f"{family}: two curves look alike in {titles}"

    summary = json.loads((tmp_path / "summary.json").read_text())
    _, html_path = write_report(tmp_path, title=f"rlxf {family}", panels=panels, summary=summary,
                                config={"seed": 0})
    page = html_path.read_text()
    for plot in shown:      # the same caption as under the plot, next to the panel's title
        assert f'<td>{html.escape(plot.panel.title)}</td><td class="prose">{html.escape(plot.caption)}</td>' in page


def test_plain_grpo_shows_no_empty_panel_and_says_why_kl_is_missing(tmp_path, monkeypatch):
    """GRPO with β = 0 logs no kl and no COOPER/LMGT metrics: the report.png that write_report
    saves draws none of those panels empty, and the HTML says why they are missing."""
    from matplotlib.figure import Figure

    saved = []
    savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: saved.append(fig) or savefig(fig, *a, **k))
    _write_run(tmp_path, "grpo")
    _, html_path = write_report(tmp_path, title="rlxf grpo", panels=grpo.PANELS)

    (fig,) = saved
    visible = [ax for ax in fig.axes if ax.get_visible()]
    for ax in visible:
        assert any(_has_data(line) for line in ax.get_lines()), "an empty panel in report.png"
    assert len(visible) == 6 < len(grpo.PANELS)
    texts = [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text") and a.get_visible())]
    assert not [t for t in texts if t.startswith("no data")]

    page = html_path.read_text()
    not_plotted = page[page.index("Not plotted"):page.index("Logged metrics")]
    assert "<b>KL to reference</b>: kl: logged only with β &gt; 0" in not_plotted
    assert "rm/accuracy, rm/agreement: logged by rlxf cooper" in not_plotted


def test_identical_series_are_drawn_once_and_named_in_the_caption(tmp_path):
    _write_run(tmp_path, "grpo")
    shown, _ = plan_panels(read_metrics(tmp_path), grpo.PANELS)
    (reward,) = [p for p in shown if p.panel.title == "reward and sample accuracy"]
    assert [c.label for c in reward.curves] == ["reward/mean = accuracy"]
    assert "reward/mean and accuracy are identical (one line)" in reward.caption


def test_a_flat_curve_says_why_and_a_varying_one_does_not(tmp_path):
    _write_run(tmp_path, "grpo")
    shown, _ = plan_panels(read_metrics(tmp_path), grpo.PANELS)
    captions = {p.panel.title: p.caption for p in shown}
    assert "clip_fraction: share of tokens whose ratio ρ was clipped — flat: 0 with one update per batch" in (
        captions["clip fraction / zero-advantage groups"])
    assert "flat" not in captions["entropy (sampled-token estimate)"]

    _write_run(tmp_path, "ppo")     # several updates per batch: clip_fraction varies
    rows = [{**r, "clip_fraction": 0.01 * r["step"]} if r["split"] == "train" else r
            for r in read_metrics(tmp_path)]
    (clip,) = [p for p in plan_panels(rows, ppo.PANELS)[0] if p.panel.title.startswith("EOS fraction")]
    assert "clip_fraction: share of tokens whose ratio ρ was clipped;" in clip.caption


def test_titles_legends_and_captions_do_not_overlap(tmp_path):
    _write_run(tmp_path, "lmgt")
    fig = report_figure(read_metrics(tmp_path), grpo.PANELS, "rlxf lmgt: a long title " * 3)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    top = next(t for t in fig.texts if t.get_gid() == "figure-title").get_window_extent(renderer)
    for sub in fig.subfigs:
        (ax,) = sub.axes
        title = next(t for t in sub.texts if t.get_gid() == "panel-title").get_window_extent(renderer)
        caption = next(t for t in sub.texts if t.get_gid() == "caption").get_window_extent(renderer)
        legend = ax.get_legend().get_window_extent(renderer)
        plot = ax.get_window_extent(renderer)
        assert not top.overlaps(title) and not title.overlaps(legend)
        assert legend.y0 >= plot.y1                       # the legend sits above the data, never on it
        assert caption.y1 <= plot.y0
        assert sub.bbox.x0 <= caption.x0 and caption.x1 <= sub.bbox.x1   # the caption stays in its panel
    assert all(b.y1 <= top.y0 for b in (s.bbox for s in fig.subfigs))


@pytest.mark.parametrize(("count", "shape"), [(1, (1, 1)), (2, (1, 2)), (3, (1, 3)), (4, (2, 2)), (5, (2, 3)),
                                              (7, (3, 3))])
def test_the_grid_adapts_to_the_number_of_panels(tmp_path, count, shape):
    with MetricsLogger(tmp_path) as logger:
        for step in range(1, 6):
            logger.log(step, {f"m{i}": step * (i + 1) for i in range(count)})
    panels = [Panel(f"panel {i}", [f"m{i}"]) for i in range(count)] + [Panel("never", ["never_logged"])]
    fig = report_figure(read_metrics(tmp_path), panels, "grid")
    assert len(fig.subfigs) == count
    fig.canvas.draw()
    rows = {round(sub.bbox.y0) for sub in fig.subfigs}
    columns = {round(sub.bbox.x0) for sub in fig.subfigs}
    assert (len(rows), len(columns)) == shape


def test_html_explains_task_accuracy_in_the_start_final_table_and_the_metric_list(tmp_path):
    _write_run(tmp_path, "sft")
    summary = {"start/task_accuracy": 0.2, "final/task_accuracy": 0.6}
    _, html_path = write_report(tmp_path, title="rlxf sft", panels=SFT_PANELS, summary=summary)
    page = html_path.read_text()
    row = ('<tr><td>task_accuracy</td><td>0.2</td><td>0.6</td><td>+0.4</td><td class="prose">greedy accuracy on '
           "the held-out problems of the built-in task")
    assert row in page
    logged = page[page.index("Logged metrics"):]
    assert "<td>perplexity</td><td>eval</td>" in logged and "exp(held-out completion NLL)" in logged
    assert "completion-token NLL" in logged       # loss in an SFT run: the SFT description, not GRPO's


def test_a_key_means_what_its_recipe_logs():
    assert describe("accuracy", {"accuracy", "score/chosen"}).what.startswith("pairwise accuracy")
    assert describe("accuracy", {"accuracy", "reward/mean"}).what.startswith("share of the step's sampled")
    assert "summed over each completion" in describe("kl", {"kl", "kl_coef"}).what
    assert "per-token" in describe("kl", {"kl"}).what
    assert table_name("accuracy/correctness") == "accuracy/<kind>"
    assert table_name("rm_accuracy/arithmetic/correctness") == "rm_accuracy/<domain>/<kind>"
    assert table_name("rm_accuracy/arithmetic") == "rm_accuracy/<domain>"
    assert table_name("rm_accuracy") == "rm_accuracy" and table_name("never_logged") is None


def test_every_key_a_recipe_panel_plots_has_a_description():
    panels = [*grpo.PANELS, *ppo.PANELS, *SFT_PANELS, *RM_PANELS, *DPO_PANELS, *ORPO_PANELS]
    missing = sorted({k for p in panels for k in p.keys if table_name(k) is None})
    assert not missing
    for name, entries in METRICS.items():
        entries = (entries,) if isinstance(entries, MetricInfo) else entries
        assert entries[-1].when is None, f"{name}: the last entry is the fallback and has no `when`"
        assert all(e.what for e in entries)
