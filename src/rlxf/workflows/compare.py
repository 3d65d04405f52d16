"""``rlxf compare SPEC.yaml``: run several configurations on the same budget and seed, then write one
side-by-side report (:func:`rlxf.reporting.compare.compare_runs`).

The spec::

    recipe: grpo                        # any rlxf recipe (a run may override it)
    common: {max_steps: 40, seed: 0}    # applied to every run
    metric: task_accuracy               # optional: the eval metric compared (default task_accuracy)
    goal: max                           # optional: max (higher is better) or min
    threshold: 0.5                      # optional: default is the midpoint rule of compare_runs
    panels: [task_accuracy, kl]         # optional: metric keys to plot
    runs:                               # label -> overrides of common; the first is the baseline
      hard: {reward: verifiable}
      perplexity: {reward: likelihood, recipe: grpo}

Each run's config is ``common`` updated with its overrides, built by the recipe's config class (so
it is validated before anything trains), and written to ``output_dir/<label>``. Runs execute one
after another in this process. A run whose directory already has ``summary.json`` is finished and
skipped, so re-running the same command after an interruption continues where it stopped;
``resume=True`` continues an interrupted run from its newest checkpoint.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import json
import logging
from pathlib import Path
from typing import Any

from rlxf.config import ConfigError, _unknown_key_error, build_config, to_dict
from rlxf.configs.registry import get_recipe
from rlxf.reporting.compare import DEFAULT_PANELS, IGNORED_CONFIG_KEYS, check_label, compare_runs

log = logging.getLogger("rlxf.compare")

SPEC_KEYS = ("recipe", "common", "metric", "goal", "threshold", "panels", "runs")
SPEC_FILE = "compare_spec.yaml"
# Set by rlxf compare for every run, so a spec may not set them.
_MANAGED = {"output_dir": "each run writes to <output_dir>/<label>",
            "resume": "pass --resume to rlxf compare (resume=True) instead"}


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    """One run of a comparison: its label, recipe, validated config and directory."""

    label: str
    recipe: str
    config: Any
    output_dir: Path


def load_spec(spec: str | Path | dict) -> tuple[dict, str]:
    """(spec mapping, name used in error messages) from a YAML path or an already-loaded dict."""
    if isinstance(spec, dict):
        return spec, "compare spec"
    import yaml

    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"compare spec not found: {path}; pass the path of a YAML file (see docs/compare.md)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with 'recipe', 'common' and 'runs', "
                          f"got {type(data).__name__}")
    return data, str(path)


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping of option: value (e.g. {{lr: 1.0e-4}}), "
                          f"got {type(value).__name__} {value!r}")
    return value


def _recipe(name: Any, where: str) -> str:
    return get_recipe(name, where=where).name


def _config_class(recipe: str) -> type:
    return get_recipe(recipe).config_class()


def plan_runs(spec: dict, *, output_dir: str | Path, resume: bool = False, source: str = "compare spec"
              ) -> list[PlannedRun]:
    """Validate ``spec`` and build every run's config; raise ConfigError before anything trains."""
    for key in spec:
        if key not in SPEC_KEYS:
            close = difflib.get_close_matches(str(key), SPEC_KEYS, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(SPEC_KEYS)}"
            raise ConfigError(f"{source}: unknown key '{key}'; {hint}")
    default_recipe = spec.get("recipe")
    common = _mapping(spec.get("common"), f"{source}: common")
    runs = spec.get("runs")
    if not isinstance(runs, dict) or not runs:
        raise ConfigError(f"{source}: 'runs' must be a non-empty mapping of label: overrides, e.g.\n"
                          "runs:\n  baseline: {}\n  high_lr: {lr: 1.0e-3}")
    output_dir = Path(output_dir)
    planned = []
    for label, overrides in runs.items():
        where = f"{source}: runs.{label}"
        check_label(label, f"{source}: runs")
        overrides = dict(_mapping(overrides, where))
        if "recipe" not in overrides and default_recipe is None:
            raise ConfigError(f"{source}: no recipe for run '{label}'; add e.g. 'recipe: grpo' at the top of the "
                              "spec (or 'recipe:' in every run)")
        recipe = _recipe(overrides.pop("recipe", default_recipe),
                         where if "recipe" in (runs[label] or {}) else f"{source}: recipe")
        cls = _config_class(recipe)
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = [name for name in _MANAGED if name not in fields]
        if missing:
            raise ConfigError(f"{where}: {cls.__name__} has no field {' or '.join(missing)}; rlxf compare needs "
                              "both output_dir and resume in a recipe's config")
        for origin, values in (("common", common), (f"runs.{label}", overrides)):
            for key in values:
                name = str(key).replace("-", "_")
                if name in _MANAGED:
                    raise ConfigError(f"{source}: {origin}: '{key}' is set by rlxf compare ({_MANAGED[name]}); "
                                      "remove it")
                if name not in fields:
                    raise _unknown_key_error(cls, str(key), f"{source}: {origin} (run '{label}', recipe {recipe})")
        out = output_dir / label
        values = {**common, **overrides, "output_dir": str(out), "resume": resume and not _finished(out)}
        try:
            cfg = build_config(cls, values, where=where)
        except ConfigError as exc:
            raise (exc if str(exc).startswith(where) else ConfigError(f"{where}: {exc}")) from None
        planned.append(PlannedRun(label, recipe, cfg, out))
    return planned


def _write_spec(path: Path, spec: dict) -> None:
    """Keep the spec next to the report, so the comparison can be repeated from its directory."""
    import yaml

    path.write_text(yaml.safe_dump(json.loads(json.dumps(spec, default=str)), sort_keys=False), encoding="utf-8")


def _finished(out: Path) -> bool:
    return (out / "summary.json").is_file()


def _comparable(config: dict) -> dict:
    import yaml

    plain = yaml.safe_load(yaml.safe_dump(config))  # the same types config.yaml holds
    return {k: v for k, v in plain.items() if k not in IGNORED_CONFIG_KEYS}


def _check_existing(run: PlannedRun, *, resume: bool, source: str) -> None:
    """A finished run must match its spec; an interrupted one needs resume."""
    out = run.output_dir
    if _finished(out):
        saved_path = out / "config.yaml"
        if not saved_path.is_file():
            return
        import yaml

        saved = _comparable(yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {})
        wanted = _comparable(to_dict(run.config))
        # only keys both have: a field added to the recipe since the run finished is not a spec change
        changed = [f"{k}: {saved[k]!r} → {wanted[k]!r}" for k in saved if k in wanted and saved[k] != wanted[k]]
        if changed:
            raise ConfigError(f"{source}: run '{run.label}' in {out} finished with another config "
                              f"({'; '.join(changed)}); delete {out} to rerun it, or use another --output-dir")
    elif not resume and ((out / "metrics.jsonl").exists() or (out / "checkpoints").exists()):
        raise ConfigError(f"{source}: run '{run.label}' in {out} was interrupted; rerun with --resume to continue "
                          f"it (finished runs are skipped), or delete {out} to start it again")


def _report_options(data: dict, source: str, *, metric: str | None, threshold: float | None,
                    goal: str | None) -> dict:
    """compare_runs' keyword arguments from the spec (arguments win), checked before anything trains."""
    metric = metric or data.get("metric") or "task_accuracy"
    goal = goal or data.get("goal") or "max"
    threshold = threshold if threshold is not None else data.get("threshold")
    panels = data.get("panels")
    if not isinstance(metric, str):
        raise ConfigError(f"{source}: metric: expected the name of an eval metric, e.g. task_accuracy, got {metric!r}")
    if goal not in ("max", "min"):
        raise ConfigError(f"{source}: goal: expected max (higher is better) or min, got {goal!r}")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))):
        raise ConfigError(f"{source}: threshold: expected a number, got {threshold!r}")
    if panels is not None and (not isinstance(panels, list) or not all(isinstance(p, str) for p in panels)):
        raise ConfigError(f"{source}: panels: expected a list of metric names, e.g. [{', '.join(DEFAULT_PANELS[1:3])}]")
    return {"metric": metric, "goal": goal, "threshold": threshold, "panels": panels}


def run_comparison(
    spec: str | Path | dict,
    *,
    output_dir: str | Path,
    resume: bool = False,
    only_report: bool = False,
    metric: str | None = None,
    threshold: float | None = None,
    goal: str | None = None,
) -> dict:
    """Train every run of ``spec`` that has not finished, then write the comparison to ``output_dir``.

    ``only_report=True`` trains nothing and compares the run directories as they are. ``metric``,
    ``threshold`` and ``goal`` override the spec's. Returns the comparison (``compare.json``) plus
    ``"status"``: label -> "trained", "resumed" or "skipped (finished)" (with ``only_report``:
    "finished" or "unfinished").
    """
    data, source = load_spec(spec)
    output_dir = Path(output_dir)
    planned = plan_runs(data, output_dir=output_dir, resume=resume, source=source)
    options = _report_options(data, source, metric=metric, threshold=threshold, goal=goal)

    status = {}
    if only_report:
        status = {run.label: "finished" if _finished(run.output_dir) else "unfinished" for run in planned}
    else:
        for run in planned:
            _check_existing(run, resume=resume, source=source)
        output_dir.mkdir(parents=True, exist_ok=True)
        _write_spec(output_dir / SPEC_FILE, data)
        for index, run in enumerate(planned, start=1):
            if _finished(run.output_dir):
                log.info("compare: run %d/%d '%s' already finished in %s; skipped", index, len(planned), run.label,
                         run.output_dir)
                status[run.label] = "skipped (finished)"
                continue
            log.info("compare: run %d/%d '%s' (%s) -> %s", index, len(planned), run.label, run.recipe,
                     run.output_dir)
            interrupted = (run.output_dir / "metrics.jsonl").exists()
            get_recipe(run.recipe).train_fn()(run.config)
            status[run.label] = "resumed" if interrupted else "trained"
    result = compare_runs({run.label: run.output_dir for run in planned}, output_dir, **options)
    return {**result, "status": status}
