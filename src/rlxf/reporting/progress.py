"""A terminal progress bar with ETA and the latest metrics, e.g.::

    grpo:  40%|████      | 40/100 [00:08<00:12, 4.9it/s, loss=0.693, reward=0.41]
"""

from __future__ import annotations

import math
import sys


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
