"""Sharded training with torch's FSDP2 (``--fsdp``; docs/distributed.md#sharded-training-fsdp2).

:func:`shard` applies ``torch.distributed.fsdp.fully_shard`` to every decoder layer (the classes a
transformers model lists in ``_no_split_modules``) and then to the whole model, so each of the N
torchrun processes keeps 1/N of the parameters, gradients and AdamW state. On CUDA the layers
compute in bf16 and reduce gradients in fp32 (``MixedPrecisionPolicy``); on the CPU (gloo) they
stay in fp32. ``cpu_offload`` keeps the shards, their gradients and the optimiser state in host
memory (``CPUOffloadPolicy``): the optimiser steps on the CPU and only the layer being computed is
on the GPU.

rlxf calls a model in three ways, and each has its rule here:

* **Training forwards** (log-probs, reward scores): rlxf's log-prob path runs the model body and
  the output head separately (docs/performance.md), which bypasses the model's own ``forward``
  and with it FSDP's hooks for the parameters of the root (embeddings, final norm, head).
  :func:`call` runs such a function inside the root's pre- and post-forward hooks
  (``register_fsdp_forward_method``), so those parameters are gathered and their gradients
  reduce-scattered as in a plain forward. With CPU offload the inputs move to the GPU and the
  outputs back to the inputs' device, so the recipe's code sees tensors where it put them.
* **Sampling and evaluation** (:func:`gathered`): every process gathers the whole model once (one
  all-gather per layer) and keeps it unsharded until the block ends; inside, no collective runs,
  so processes may generate different numbers of tokens, and rank 0 may evaluate alone. The cost
  is one full copy of the weights (in the compute dtype) per process while the block runs; it is
  measured in docs/distributed.md.
* **Saving**: :func:`full_state_dict` gathers fp32 weights onto rank 0's CPU for ``final/`` (an
  ordinary Hugging Face model); checkpoints are sharded (:mod:`rlxf.runtime.checkpoint`).

Outside ``--fsdp`` every helper here is a no-op or calls straight through.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from typing import Callable, Iterator

import torch
from torch import nn

ROOT_CALL = "_rlxf_fsdp_call"
# every model shard() sharded in this process, in sharding order (the same on every process), for gathered()
_SHARDED: list[weakref.ref] = []
_EXPORT_STATE = "_rlxf_export_state_dict"
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def under_torchrun() -> bool:
    """Whether torchrun (or another launcher that sets its variables) started this process."""
    return all(name in os.environ for name in TORCHRUN_ENV)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The modules each FSDP unit holds: instances of the model's ``_no_split_modules`` classes (the
    decoder layers of a transformers model), outermost first. Raises ``ValueError`` when it names none."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__} does not name its decoder layers (_no_split_modules), so "
                         f"--fsdp cannot tell where to shard it; run it without --fsdp")
    return layers


def shard(model: nn.Module, device: torch.device, *, cpu_offload: bool = False) -> nn.Module:
    """Shard ``model`` in place over the default process group: each decoder layer, then the root.

    ``model`` must hold the same weights on every process (load it the same way everywhere, or
    broadcast it first). bf16 compute with fp32 gradient reduction on CUDA, fp32 on the CPU."""
    from torch.distributed.fsdp import (CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard,
                                        register_fsdp_forward_method)

    if cpu_offload and device.type != "cuda":
        raise ValueError("--fsdp-cpu-offload keeps the shards in host memory for a GPU; on the CPU the "
                         "parameters are in host memory already: drop --fsdp-cpu-offload")
    options: dict = {}
    if device.type == "cuda":
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, **options)
    fully_shard(model, **options)
    model._rlxf_fsdp_options = {"device": device, "cpu_offload": cpu_offload}
    model._rlxf_fsdp_group = torch.distributed.group.WORLD
    _SHARDED[:] = [ref for ref in _SHARDED if ref() is not None] + [weakref.ref(model)]
    setattr(model, ROOT_CALL, _root_call.__get__(model))
    register_fsdp_forward_method(model, ROOT_CALL)
    return model


def _root_call(self, fn: Callable, *args, **kwargs):
    return fn(*args, **kwargs)


def is_sharded(model: nn.Module) -> bool:
    """Whether :func:`shard` sharded ``model``."""
    return hasattr(model, ROOT_CALL)


def needs_root_call(model: nn.Module) -> bool:
    """Whether a function that calls ``model``'s body and head separately must go through :func:`call`
    (sharded, and not already inside it)."""
    return is_sharded(model) and not getattr(model, "_rlxf_in_call", False)


def call(model: nn.Module, fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)``, run inside ``model``'s root forward hooks when it is sharded.

    ``fn`` may call the model's body and head separately. With CPU offload, tensor arguments are
    moved to the GPU by the hooks, and tensor results come back to the device of the first tensor
    argument."""
    if not needs_root_call(model):
        return fn(*args, **kwargs)
    home = next((a.device for a in (*args, *kwargs.values()) if torch.is_tensor(a)), None)
    model._rlxf_in_call = True
    try:
        out = getattr(model, ROOT_CALL)(fn, *args, **kwargs)
    finally:
        model._rlxf_in_call = False
    if home is not None and torch.is_tensor(out) and out.device != home:
        out = out.to(home)
    return out


@contextlib.contextmanager
def gathered(*models: nn.Module | None) -> Iterator[None]:
    """Every process holds ``models`` (default: every sharded model of this process, the policy and a
    reference copy) whole and unsharded until the block ends: sampling, reward scoring with the
    policy, evaluation, the reference precompute. Models that are not sharded are skipped.

    Entering is a collective (an all-gather per layer): every process must enter, in the same
    order. Inside, forwards run no collective, so each process may call the models as often as it
    likes, or not at all. Leaving frees the gathered weights again (no communication)."""
    alive = list(models) if models else [ref() for ref in _SHARDED if _current(ref())]
    roots = [root for root in alive if root is not None and is_sharded(root)
             and not getattr(root, "_rlxf_gathered", False)]
    units = [(root, m) for root in roots for m in root.modules() if hasattr(m, "unshard") and hasattr(m, "reshard")]
    for root, unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    for root in roots:
        root._rlxf_gathered = True
    try:
        yield
    finally:
        for root, unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(unit is not root, recurse=False)
        for root in roots:
            root._rlxf_gathered = False


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen (eval, no gradients) copy of the sharded ``model``'s current weights, sharded the same
    way: the reference policy of an ``--fsdp`` run. Built on the meta device, sharded like ``model``
    and filled from its local shards and buffers, so it needs no communication and no full copy."""
    from torch.distributed.fsdp import FSDPModule

    cls = next(c for c in type(model).__mro__[1:] if issubclass(c, nn.Module) and not issubclass(c, FSDPModule))
    options = model._rlxf_fsdp_options
    with torch.device("meta"):
        clone = cls(model.config).to(next(model.parameters()).dtype)
    shard(clone, options["device"], cpu_offload=options["cpu_offload"])
    clone.to_empty(device="cpu" if options["cpu_offload"] else options["device"])
    mine, theirs = dict(clone.named_parameters()), dict(model.named_parameters())
    buffers, their_buffers = dict(clone.named_buffers()), dict(model.named_buffers())
    if mine.keys() != theirs.keys() or buffers.keys() != their_buffers.keys():
        raise RuntimeError(f"frozen_copy: a fresh {cls.__name__} does not have the trained model's tensors "
                           f"({sorted(mine.keys() ^ theirs.keys())[:3]}); this is a bug in rlxf")
    with torch.no_grad():
        for name, param in mine.items():
            param.to_local().copy_(theirs[name].to_local())
        for name, buffer in buffers.items():
            buffer.copy_(their_buffers[name])
    clone.requires_grad_(False)
    clone.eval()
    return clone


def _current(model: nn.Module | None) -> bool:
    """Whether ``model`` was sharded over this process's current process group (a model left from an
    earlier group, e.g. an earlier run in the same process, is not gathered)."""
    return (model is not None and torch.distributed.is_initialized()
            and getattr(model, "_rlxf_fsdp_group", None) is torch.distributed.group.WORLD)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole model's weights, in their stored (fp32) dtype, on rank 0's CPU; None on the other
    ranks and when ``model`` is not sharded. A collective: every process must call it."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if torch.distributed.get_rank() != 0:
        return None
    first: dict[int, str] = {}   # tied weights (a head that is the embedding) are stored once, as in save_pretrained
    for name, param in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(param), name) != name:
            state.pop(name, None)
    return state


@contextlib.contextmanager
def exporting(model: nn.Module, state: dict | None) -> Iterator[None]:
    """While the block runs, :func:`export_state_dict` returns ``state`` for ``model`` (what
    :func:`rlxf.models.save_pretrained` writes instead of the sharded parameters)."""
    setattr(model, _EXPORT_STATE, state)
    try:
        yield
    finally:
        delattr(model, _EXPORT_STATE)


def export_state_dict(model: nn.Module) -> dict | None:
    """The full weights :func:`exporting` attached to ``model``, or None (save the model's own)."""
    return getattr(model, _EXPORT_STATE, None)


def compute_device(model: nn.Module) -> torch.device:
    """Where ``model`` computes: the FSDP mesh's device when sharded (the GPU even with CPU offload),
    else its parameters' device."""
    if is_sharded(model):
        state = model._get_fsdp_state()
        return torch.device(state._device) if hasattr(state, "_device") else next(model.parameters()).device
    return next(model.parameters()).device


__all__ = ["ROOT_CALL", "call", "compute_device", "decoder_layers", "export_state_dict", "exporting",
           "frozen_copy", "full_state_dict", "gathered", "is_sharded", "needs_root_call", "shard", "under_torchrun"]
