"""A terminal progress bar with ETA and the latest metrics, e.g.::

    grpo:  40%|████      | 40/100 [00:08<00:12, 4.9it/s, loss=0.693, reward=0.41]

and :class:`PhaseProgress`, log lines with an estimate of the time left for a long phase outside
the bar.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Callable


def format_compact(value: float) -> str:
    """Format a number compactly (3 significant digits): ``0.693``, ``1.2e3``, ``3e-5``."""
    if isinstance(value, bool) or isinstance(value, int):
        return str(value)
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    text = f"{value:.3g}"
    mantissa, _, exponent = text.partition("e")
    return f"{mantissa}e{int(exponent)}" if exponent else text


class Progress:
    """A tqdm bar on stderr showing ``desc``, steps done, ETA and a live postfix of metrics.

    ``initial`` is the step a resumed run starts from, so the bar and ETA count the remaining
    work. ``enabled=False`` (e.g. on non-zero ranks) prints nothing.
    """

    def __init__(self, total: int, *, desc: str, initial: int = 0, enabled: bool = True) -> None:
        from tqdm import tqdm

        self._postfix: dict[str, str] = {}
        self._bar = tqdm(
            total=total,
            desc=desc,
            initial=initial,
            disable=not enabled,
            file=sys.stderr,
            dynamic_ncols=True,
        )

    def update(self, n: int = 1, **postfix: float) -> None:
        """Advance the bar by ``n`` steps and show the given metrics, e.g. ``loss=0.693``.

        Metrics from earlier calls stay on display until a later call gives a new value.
        """
        if postfix:
            self._postfix.update({k: format_compact(v) for k, v in postfix.items()})
            self._bar.set_postfix_str(
                ", ".join(f"{k}={v}" for k, v in self._postfix.items()), refresh=False
            )
        self._bar.update(n)

    def write(self, message: str) -> None:
        """Print a line above the bar without breaking it (nothing when disabled)."""
        if not self._bar.disable:
            self._bar.write(message, file=sys.stderr)

    def close(self) -> None:
        """Draw the final state of the bar and release the terminal line."""
        self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class PhaseProgress:
    """Log lines for a long phase outside the step loop's bar (pretraining a verifier, loading or
    precomputing): what it will do, then, after the first unit and every ``every`` seconds, how far
    it is with an estimate of the time left, then how long it took::

        VerifyRM pretraining: 800 steps of 64 rows
        VerifyRM pretraining: 1/800 steps, 1s elapsed, about 9m50s left (loss 0.693)
        VerifyRM pretraining: 61/800 steps, 46s elapsed, about 9m18s left (loss 0.688)
        VerifyRM pretraining: done, 800 steps in 10m02s
    """

    def __init__(self, name: str, total: int, *, unit: str = "steps", detail: str = "", every: float = 30.0,
                 logger: logging.Logger | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.name, self.total, self.unit, self.every, self.clock = name, total, unit, every, clock
        self.log = logger or logging.getLogger("rlxf")
        self.done, self.start = 0, clock()
        self.last = self.start
        self.log.info("%s: %d %s%s", name, total, unit, f" {detail}" if detail else "")

    def update(self, n: int = 1, **metrics: float) -> None:
        """``n`` more units done; logs after the first one and then every ``every`` seconds."""
        first, self.done = self.done == 0, self.done + n
        now = self.clock()
        if not first and now - self.last < self.every:
            return
        self.last, elapsed = now, now - self.start
        left = elapsed / self.done * max(0, self.total - self.done)
        shown = ", ".join(f"{k} {format_compact(v)}" for k, v in metrics.items())
        self.log.info("%s: %d/%d %s, %s elapsed, about %s left%s", self.name, self.done, self.total, self.unit,
                      format_duration(elapsed), format_duration(left), f" ({shown})" if shown else "")

    def close(self) -> None:
        """Log the phase's end and its duration."""
        self.log.info("%s: done, %d %s in %s", self.name, self.done, self.unit,
                      format_duration(self.clock() - self.start))


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
