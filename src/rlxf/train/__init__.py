"""The one training loop (:mod:`rlxf.train.loop`), the offline step built on it
(:mod:`rlxf.train.offline`) and the pieces every step shares (:mod:`rlxf.train.common`)."""

from rlxf.train.common import (TrainingError, autocast_context, build_optimizer, build_scheduler, clip_and_step,
                               lr_multiplier, mean_metrics, peak_memory_mb)
from rlxf.train.loop import FAULT_ENV, Loop, NullLogger, RunResult, run

__all__ = ["FAULT_ENV", "Loop", "NullLogger", "RunResult", "TrainingError", "autocast_context", "build_optimizer",
           "build_scheduler", "clip_and_step", "lr_multiplier", "mean_metrics", "peak_memory_mb", "run"]
