"""The run directory: where a run writes, and the rule that keeps it from overwriting anything else.

A run directory is one rlxf created (it writes :data:`RUN_MARKER` into it before anything else) or
one that holds a run's files (runs written before the marker existed). rlxf writes into no other
non-empty directory, so a file it did not write is never overwritten.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from rlxf.config import ConfigError, save_yaml
from rlxf.configs.registry import recipe_names
from rlxf.runtime import distributed

log = logging.getLogger("rlxf")

RUN_MARKER = ".rlxf-run"
RUN_FILES = ("metrics.jsonl", "checkpoints", "summary.json")
# recipes under torchrun that --fsdp does not cover: PPO's critic and COOPER's verifier are second models
# trained beside the policy, which the sharded loop does not handle (docs/distributed.md)
FSDP_REFUSED = ("ppo", "cooper")


def is_run_dir(out: Path) -> bool:
    """True when ``out`` is an rlxf run directory: it has the marker or a run's files."""
    return (out / RUN_MARKER).is_file() or holds_run(out)


def holds_run(out: Path) -> bool:
    """True when ``out`` holds a started or finished run (:data:`RUN_FILES`): only ``--resume``
    continues it."""
    return any((out / name).exists() for name in RUN_FILES)


def _listing(out: Path, most: int = 8) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir())
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def check_output_dir(cfg, recipe: str) -> Path:
    """The run's output directory, checked without writing anything.

    A new or empty directory, or an rlxf run directory (:func:`is_run_dir`) that holds no started
    run, is accepted; a started run only with ``--resume``. Any other non-empty directory is
    refused, with or without ``--resume``, and the error lists what it holds. Under torchrun this
    is where a process joins the data-parallel group (recipes that cannot run data-parallel, or a
    batch size the processes do not divide, stop here with a clear error); rank 0 checks."""
    try:
        supported = recipe_names(data_parallel=True)
        world = distributed.check_launch(recipe, getattr(cfg, "batch_size", None), supported=supported)
        if getattr(cfg, "fsdp", False):
            check_fsdp_launch(recipe, supported)
            distributed.init(cfg.device, single=True)
        elif world > 1:
            distributed.init(cfg.device)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None

    def check() -> Path:
        out = cfg.resolved_output_dir(recipe)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"output dir {out} is a file, not a directory; choose another --output-dir "
                              f"(nothing was written)")
        if not out.is_dir() or not any(out.iterdir()):
            return out
        if not is_run_dir(out):
            why = (" --resume continues an rlxf run, and this directory holds none." if cfg.resume else "")
            raise ConfigError(
                f"output dir {out} is not empty and is not an rlxf run directory: it holds {_listing(out)}. "
                f"rlxf writes only into a new or empty directory or into its own runs (recognised by "
                f"{RUN_MARKER}, metrics.jsonl, checkpoints/ or summary.json), so nothing of yours is "
                f"overwritten.{why} Choose another --output-dir, e.g. {out / recipe} (nothing was written)")
        if holds_run(out) and not cfg.resume:
            raise ConfigError(f"output dir {out} already holds a run ({_listing(out)}); pass --resume to continue "
                              f"it, or choose another --output-dir (nothing was overwritten)")
        return out

    return distributed.on_main(check)


def check_fsdp_launch(recipe: str, supported: tuple[str, ...]) -> None:
    """Raise ``ValueError`` when ``--fsdp`` cannot run here: outside torchrun, or for a recipe that does
    not train on the shared loop under torchrun."""
    from rlxf.runtime import fsdp

    if not fsdp.under_torchrun():
        raise ValueError(f"--fsdp shards the model over processes started by torchrun, and this process was not: "
                         f"run `torchrun --standalone --nproc-per-node N -m rlxf {recipe} ... --fsdp` (N >= 1), "
                         f"or drop --fsdp")
    if recipe not in supported or recipe in FSDP_REFUSED:
        raise ValueError(f"`{recipe}` does not support --fsdp; drop --fsdp (see docs/distributed.md)")


def start_run_dir(cfg, out: Path, recipe: str) -> None:
    """Create ``out`` and write the run marker (first), then ``config.yaml``; remove temporary
    checkpoint directories left by a run that was killed while writing one. Call it once the
    inputs have validated (:func:`check_output_dir`, :func:`load_split_rows`): a run that stops on
    bad input writes nothing. A model given as a Hub id that is neither cached nor downloadable
    stops it here too (:func:`check_hub_models`). Rank 0 writes under torchrun."""
    from rlxf.runtime import remove_stale_checkpoint_dirs

    check_hub_models(cfg)

    def write() -> None:
        out.mkdir(parents=True, exist_ok=True)
        marker = out / RUN_MARKER
        if not marker.is_file():
            marker.write_text(json.dumps({"recipe": recipe, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
                              + "\n")
        save_yaml(cfg, out / "config.yaml")
        for stale in remove_stale_checkpoint_dirs(out / "checkpoints"):
            log.info("removed %s, a checkpoint whose write was interrupted", stale)

    distributed.on_main(write)


HUB_MODEL_OPTIONS = ("model", "reward_model", "cooper_rm")


def check_hub_models(cfg) -> None:
    """Before a run writes anything: every model option that names a Hub id must be in the local
    cache or downloadable, else :class:`~rlxf.runtime.hub.HubUnavailable` says what to do."""
    from rlxf.runtime.hub import HubUnavailable, hub_problem, is_hub_id, model_fix

    for name in HUB_MODEL_OPTIONS:
        value, option = getattr(cfg, name, None), "--" + name.replace("_", "-")
        if not isinstance(value, str) or value == "tiny" or Path(value).expanduser().exists() or not is_hub_id(value):
            continue
        problem = hub_problem(value, "model", option=option, fix=model_fix(value, option))
        if problem:
            raise HubUnavailable(problem)


def prepare_output_dir(cfg, recipe: str) -> Path:
    """:func:`check_output_dir`, then :func:`start_run_dir`: for callers with no inputs to check first."""
    out = check_output_dir(cfg, recipe)
    start_run_dir(cfg, out, recipe)
    return out
