"""Process-level plumbing: seeding and RNG state, atomic checkpoints and resume, and data parallel
over processes started by ``torchrun`` (:mod:`rlxf.runtime.distributed`)."""

from rlxf.runtime.checkpoint import (latest_checkpoint, load_checkpoint, remove_stale_checkpoint_dirs,
                                     save_checkpoint, save_sharded_checkpoint)
from rlxf.runtime.seed import get_rng_state, seed_everything, set_rng_state

__all__ = ["get_rng_state", "latest_checkpoint", "load_checkpoint", "remove_stale_checkpoint_dirs",
           "save_checkpoint", "save_sharded_checkpoint", "seed_everything", "set_rng_state"]
