"""Atomic checkpoints: ``output_dir/checkpoints/step-N/``.

A checkpoint holds the model in Hugging Face format (``save_pretrained``; for LoRA runs the adapter),
``optimizer.pt``, ``scheduler.pt``, ``rng.pt`` and ``state.json`` (step, data position, metrics so far).
An ``--fsdp`` run (:func:`save_sharded_checkpoint`) writes the model and optimiser state instead as
``sharded/``, a ``torch.distributed.checkpoint`` directory to which every process writes its own
shards; it loads on any number of processes, and in one process without torchrun (DCP reshards).
It is written to ``step-N.tmp-<pid>`` and renamed into place, so a run killed mid-write leaves
no half checkpoint; ``latest_checkpoint`` only sees complete ones. ``.pt`` files are loaded with
``weights_only=True`` (no arbitrary pickle).

The first file written into a temporary directory is :data:`PARTIAL_MARKER`. A run killed
mid-write leaves its temporary directory behind (gigabytes with a real model);
:func:`remove_stale_checkpoint_dirs`, called when a run starts or resumes, deletes exactly the
directories that match the ``step-N.tmp-<pid>`` name *and* hold the marker, whose process is gone,
and nothing else.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from rlxf.runtime.seed import get_rng_state, set_rng_state

_STEP_DIR = re.compile(r"^step-(\d+)$")
_TMP_DIR = re.compile(r"^step-(\d+)\.tmp-(\d+)$")
PARTIAL_MARKER = ".rlxf-partial-checkpoint"


def _checkpoints(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / "state.json").exists():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under ``root``, or None."""
    found = _checkpoints(Path(root))
    return found[-1][1] if found else None


def save_checkpoint(root: str | Path, step: int, *, model, tokenizer, optimizer, scheduler, state: dict,
                    keep: int = 2, extra: dict | None = None) -> Path:
    """Write ``root/step-<step>`` atomically and keep only the newest ``keep`` checkpoints.

    ``extra``: ``{file name: tensors/state dict}`` saved with ``torch.save`` inside the same atomic
    write (e.g. a PPO critic or a co-trained reward model)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f"step-{step}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        (tmp / PARTIAL_MARKER).write_text(json.dumps({"step": step, "pid": os.getpid()}) + "\n")
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(get_rng_state(), tmp / "rng.pt")
        for name, value in (extra or {}).items():
            torch.save(value, tmp / name)
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
    except BaseException:  # a failed or interrupted write (disk full, Ctrl-C) leaves nothing behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(root, tmp, final, keep)
    return final


SHARDED_DIR = "sharded"


def save_sharded_checkpoint(root: str | Path, step: int, *, model, tokenizer, optimizer, scheduler, state: dict,
                            keep: int = 2, extra: dict | None = None) -> Path:
    """:func:`save_checkpoint` for a model sharded with FSDP2: a collective, every process calls it.

    Every process writes its shards of the model and optimiser state into ``sharded/`` of the same
    temporary directory (rank 0's ``step-N.tmp-<pid>``) through ``torch.distributed.checkpoint``;
    after a barrier, rank 0 adds ``config.json``, the tokenizer, ``scheduler.pt``, ``rng.pt``,
    ``extra`` and ``state.json`` and renames the directory into place. An error on any process
    leaves no checkpoint."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = Path(root)
    rank = dist.get_rank()
    box = [os.getpid()]
    dist.broadcast_object_list(box, src=0)
    final, tmp = root / f"step-{step}", root / f"step-{step}.tmp-{box[0]}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        (tmp / PARTIAL_MARKER).write_text(json.dumps({"step": step, "pid": os.getpid()}) + "\n")
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    error = None
    try:
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp / SHARDED_DIR))
        if rank == 0:
            model.config.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(get_rng_state(), tmp / "rng.pt")
            for name, value in (extra or {}).items():
                torch.save(value, tmp / name)
            (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
    except Exception as exc:  # noqa: BLE001 - every process learns of it below
        error = f"{type(exc).__name__}: {exc}"
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if rank == 0:
        if failed:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            _publish(root, tmp, final, keep)
    dist.barrier()
    if failed:
        raise RuntimeError(f"writing the sharded checkpoint {final} failed on rank {failed[0][0]}: {failed[0][1]}")
    return final


def _publish(root: Path, tmp: Path, final: Path, keep: int) -> None:
    """Rename the complete ``tmp`` to ``final`` and keep only the newest ``keep`` checkpoints."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    (final / PARTIAL_MARKER).unlink(missing_ok=True)
    for _, old in _checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def _load_sharded(model, optimizer, path: Path) -> None:
    """Model and optimiser state from a ``sharded/`` checkpoint, resharded to this run's processes (or
    into a plain model in one process)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(path / SHARDED_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def remove_stale_checkpoint_dirs(root: str | Path) -> list[Path]:
    """Delete the temporary checkpoint directories under ``root`` that a killed write left behind.

    A directory is removed only when its name is ``step-N.tmp-<pid>``, it holds
    :data:`PARTIAL_MARKER` (so it is rlxf's own), and process ``pid`` is this one or no longer runs
    (so no live write is disturbed). Returns the removed paths."""
    root = Path(root)
    if not root.is_dir():
        return []
    removed = []
    for child in sorted(root.iterdir()):
        match = _TMP_DIR.match(child.name)
        if not match or child.is_symlink() or not child.is_dir() or not (child / PARTIAL_MARKER).is_file():
            continue
        if _process_alive(int(match.group(2))):
            continue
        shutil.rmtree(child)
        removed.append(child)
    return removed


def _process_alive(pid: int) -> bool:
    """Whether another running process has id ``pid`` (this process counts as not alive: it writes
    one checkpoint at a time, so a temporary directory of its own is a failed earlier write)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists under another user, or cannot be asked: leave its directory alone
    return True


def _load_model_weights(model, path: Path) -> None:
    from safetensors.torch import load_file

    if (path / "adapter_model.safetensors").exists():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(path / "adapter_model.safetensors")))
        return
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"checkpoint {path} has no .safetensors weights")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    result = model.load_state_dict(state, strict=False)
    tensors = model.state_dict(keep_vars=True)
    loaded = {tensors[k].data_ptr() for k in state if k in tensors}
    # tied weights (e.g. lm_head = embed_tokens) are stored once; anything else missing is an error
    missing = [k for k in result.missing_keys if tensors[k].data_ptr() not in loaded]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"checkpoint {path} does not match the model: missing {missing[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}")


def _is_sharded_model(model) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def load_checkpoint(path: str | Path, *, model, optimizer, scheduler) -> dict:
    """Restore model weights, optimizer, scheduler and RNG from ``path``; return ``state.json``."""
    path = Path(path)
    if (path / SHARDED_DIR).is_dir():
        _load_sharded(model, optimizer, path)
    elif _is_sharded_model(model):
        raise ValueError(f"checkpoint {path} was written without --fsdp; resume it without --fsdp (the same "
                         f"flags as the run that wrote it)")
    else:
        _load_model_weights(model, path)
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return json.loads((path / "state.json").read_text())
