"""Data parallel over processes started by ``torchrun`` (docs/distributed.md).

``torchrun --nproc-per-node N -m rlxf <recipe> ...`` starts N copies of a recipe. Every process
holds a full copy of the model (replicas, not shards) and takes ``batch_size / N`` rows of each
micro-batch; after the backward passes the gradients are averaged over processes in flat buckets,
so every replica takes the same optimiser step. Everything that writes files or evaluates runs
on rank 0 and its result is broadcast (:func:`on_main`), so all ranks see the same metrics and
errors and none waits forever on a rank that failed.

The recipes built on :func:`rlxf.recipes.common.fit` (sft, rm, dpo, rpo, orpo) and the GRPO family
support it (in GRPO each process samples its share of every step's prompts; see
:mod:`rlxf.recipes.grpo`; dynamic sampling draws in lockstep), and so do PPO and COOPER (with
``--dp-rollouts rank0`` process 0 samples and scores the whole step and each process trains on its
share of the rows). What needs a whole step in one process (the APS sampler, a reward that keeps
per-process state between steps) refuses to start under torchrun with a clear error.
Why gradients by hand rather than ``DistributedDataParallel``: rlxf's log-prob path calls the
model's body and output head separately (the fused head never builds full-vocabulary logits),
which bypasses a DDP wrapper's forward. With ``--fsdp`` the parameters are FSDP2 shards
(:mod:`rlxf.runtime.fsdp`): the helpers here skip them (FSDP2 reduce-scatters their gradients)
and handle the plain tensors that remain (buffers, a replicated critic).

Outside torchrun (``WORLD_SIZE`` unset or 1) every helper here is a no-op, and single-process
runs are unchanged.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from datetime import timedelta
from typing import Callable, Iterable, TypeVar

import torch
import torch.distributed as dist

log = logging.getLogger("rlxf")

T = TypeVar("T")

_BUCKET_BYTES = 32 << 20
_TIMEOUT = timedelta(minutes=60)   # rank 0 evaluates and writes while the others wait in a collective
_joined = False   # this process joined a process group (init); see exit_process


def launched_world_size() -> int:
    """Processes torchrun started (``WORLD_SIZE``; 1 outside torchrun)."""
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"WORLD_SIZE={text!r} is not an integer (torchrun sets it)") from None


def launched_rank() -> int:
    """This process's rank as torchrun set it (``RANK``; 0 outside torchrun), before any group exists."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def check_launch(recipe: str, batch_size: int | None, *, supported: tuple[str, ...]) -> int:
    """Raise ``ValueError`` if this recipe/config cannot run under the torchrun that started it
    (``supported``: the recipes that run data-parallel); return the world size. Reads the
    environment only (no process group needed)."""
    world = launched_world_size()
    if world <= 1:
        return world
    if recipe not in supported:
        raise ValueError(f"`{recipe}` does not run data-parallel (torchrun started {world} processes); data parallel "
                         f"covers {', '.join(supported)}. Run `rlxf {recipe}` as one process (without torchrun)")
    if batch_size is not None and batch_size % world:
        raise ValueError(f"--batch-size {batch_size} must be a multiple of the {world} processes torchrun "
                         f"started (each takes batch_size / {world} rows of every micro-batch)")
    return world


def init(device_spec: str, *, single: bool = False) -> torch.device | None:
    """Join the process group torchrun set up (once per process); return this rank's device.

    ``device_spec`` is the recipe's ``--device``: CUDA (``auto`` on a machine with GPUs) uses NCCL and
    ``cuda:LOCAL_RANK``; otherwise gloo on the CPU. Returns None outside torchrun, and under a
    one-process torchrun unless ``single`` (FSDP2 needs a group even of one process).
    """
    global _joined
    if launched_world_size() <= 1 and not single:
        return None
    local = int(os.environ.get("LOCAL_RANK", "0"))
    spec = str(device_spec).strip().lower()
    cuda = torch.cuda.is_available() and (spec == "auto" or spec.startswith("cuda"))
    if cuda and local >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs are visible: start at "
                         f"most {torch.cuda.device_count()} processes per node")
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=_TIMEOUT)
        atexit.register(_shutdown)
        _joined = True
        if dist.get_rank() != 0:
            logging.getLogger("rlxf").setLevel(logging.WARNING)   # one log, from rank 0
        log.info("data parallel: %d processes (%s), this is rank %d on %s", dist.get_world_size(),
                 dist.get_backend(), dist.get_rank(), device)
    return device


def _shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> None:
    """End a process that joined a process group with ``code``, skipping interpreter finalisation.

    Returns (does nothing) in a process that never joined one. Otherwise runs the ``atexit``
    handlers (which destroy a group still open after an error), flushes the logs and standard
    streams, and calls ``os._exit``. Why: ``destroy_process_group`` drops rlxf's handle on a gloo
    group, but the C++ group lives on while anything else refers to it, and its worker threads can
    release their last tensor while Python finalises; a thread that then asks for the GIL is ended
    by CPython with ``pthread_exit``, whose forced unwind through C++ aborts the whole process
    ("terminate called without an active exception", exit -6) after a run that succeeded. The
    command-line entry points call this; library callers of :func:`rlxf.cli.main` are unaffected."""
    if not _joined:
        return
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):   # closed or broken pipe: nothing left to keep
            pass
    os._exit(code)


def finish() -> None:
    """End a run's process group on every rank together: a barrier, then ``destroy_process_group``.

    Called after a run returns normally, so no rank closes its connections while a peer still uses
    them; the process then ends through :func:`exit_process`. After an error the exit hook destroys
    the group without waiting (a peer may never arrive)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and return its result on every rank (pickled broadcast).

    An exception on rank 0 is raised on every rank (the same exception where it pickles, else a
    ``RuntimeError`` with its text), so no rank waits forever."""
    if not active():
        return fn()
    payload: list = [None]
    if is_main():
        try:
            payload[0] = ("ok", fn())
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            payload[0] = ("error", exc if _picklable(exc) else RuntimeError(f"{type(exc).__name__}: {exc}"))
    dist.broadcast_object_list(payload, src=0, device=_object_device())
    status, value = payload[0]
    if status == "error":
        raise value
    return value


def _picklable(value) -> bool:
    import pickle

    try:
        pickle.dumps(value)
        return True
    except Exception:  # noqa: BLE001 - any pickling failure
        return False


def broadcast(value: T) -> T:
    """Rank 0's ``value`` on every rank."""
    if not active():
        return value
    payload = [value]
    dist.broadcast_object_list(payload, src=0, device=_object_device())
    return payload[0]


def gather(value: T) -> list[T]:
    """Every rank's ``value``, in rank order, on every rank."""
    if not active():
        return [value]
    out: list = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def broadcast_object(value: T) -> T:
    """Rank 0's ``value`` on every rank (pickled; move tensors to the CPU first). ``value`` itself
    outside torchrun."""
    if not active():
        return value
    box = [value if rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_true(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank (a collective: every rank must call it)."""
    if not active():
        return bool(flag)
    return any(gather(bool(flag)))


def all_true(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on every rank (a collective: every rank must call it)."""
    return not any_true(not flag)


def broadcast_parameters(model: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers into every replica (identical starting weights). Tensors in
    host memory under NCCL (a model loaded on the CPU before FSDP2 shards it) go through the GPU one
    at a time."""
    if not active():
        return
    staged = dist.get_backend() == "nccl"
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            if _sharded(tensor):   # FSDP2 shards are each rank's own slice
                continue
            if staged and tensor.device.type != "cuda":
                on_gpu = tensor.data.to(torch.device("cuda", torch.cuda.current_device()))
                dist.broadcast(on_gpu, src=0)
                tensor.data.copy_(on_gpu)
            else:
                dist.broadcast(tensor.data, src=0)


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Average the ``.grad`` of ``params`` over ranks in place (flat buckets of one dtype each).

    A trainable parameter without a gradient on this rank counts as zeros, so every rank joins the
    same collectives in the same order."""
    if not active():
        return
    world = world_size()
    grads = []
    for p in params:
        if not p.requires_grad or _sharded(p):   # FSDP2 reduce-scatters its shards' gradients itself
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    for bucket in _buckets(grads):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def check_replicas(model: torch.nn.Module) -> None:
    """Raise if the processes' copies of ``model`` differ (they must stay bit-identical: same start,
    same averaged gradients, same optimiser arithmetic). A cheap fingerprint: one sum per tensor."""
    if not active() or any(_sharded(p) for p in model.parameters()):   # FSDP2: no replicas to compare
        return
    with torch.no_grad():
        mine = torch.stack([p.detach().float().sum() for p in model.parameters()]).cpu()
    prints = gather(mine)
    differ = [r for r, other in enumerate(prints) if not torch.equal(other, prints[0])]
    if differ:
        raise RuntimeError(f"data parallel: the model copies of ranks {differ} differ from rank 0's after "
                           f"training; this is a bug in rlxf (please report it with the command line)")


def _sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (an FSDP2 shard)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _buckets(grads: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    by_kind: dict = {}
    for g in grads:
        by_kind.setdefault((g.dtype, g.device), []).append(g)
    buckets = []
    for group in by_kind.values():
        current, size = [], 0
        for g in group:
            current.append(g)
            size += g.numel() * g.element_size()
            if size >= _BUCKET_BYTES:
                buckets.append(current)
                current, size = [], 0
        if current:
            buckets.append(current)
    return buckets


def _object_device() -> torch.device | None:
    # NCCL moves pickled objects through the current GPU; gloo through the CPU
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
