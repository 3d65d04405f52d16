"""Process-level plumbing: seeding and RNG state, atomic checkpoints and resume, data parallel
over processes started by ``torchrun`` (:mod:`rlxf.runtime.distributed`) and the HTTP pieces the
servers share (:mod:`rlxf.runtime.http`). The names below load on first use, so that importing
``rlxf.runtime.http`` does not import torch."""

import importlib

_WHERE = {"latest_checkpoint": "checkpoint", "load_checkpoint": "checkpoint", "remove_stale_checkpoint_dirs": "checkpoint",
          "save_checkpoint": "checkpoint", "save_sharded_checkpoint": "checkpoint", "get_rng_state": "seed", "seed_everything": "seed", "set_rng_state": "seed"}

__all__ = list(sorted(_WHERE))


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"rlxf.runtime.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'rlxf.runtime' has no attribute {name!r}")
