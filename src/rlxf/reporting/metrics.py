"""The machine-readable record of a run: ``metrics.jsonl`` and ``summary.json``.

``metrics.jsonl`` holds one JSON object per logged step::

    {"step": 10, "split": "train", "time": 3.21, "loss": 0.693, "reward/mean": null}

Every line is strict JSON: non-finite floats (NaN, ±inf) are written as ``null`` so any JSON
reader (``jq``, pandas, a browser) can load the file. Lines are flushed as they are written, so a
run that is killed keeps everything it logged; :func:`read_metrics` tolerates the half-written
last line such a kill can leave behind.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
_RESERVED_KEYS = ("step", "split", "time")


def to_jsonable(value: Any, *, where: str = "value") -> Any:
    """Return ``value`` as plain JSON data: non-finite floats become ``None``.

    Accepts dicts (keys become strings), lists/tuples, dataclasses, ``Path``, and scalars with
    ``.item()`` (0-d torch tensors, numpy scalars). ``where`` names the value in error messages.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): to_jsonable(v, where=f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, where=f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value), where=where)
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # 0-d tensor or numpy scalar; raises if it has several elements
        return to_jsonable(value.item(), where=where)
    raise TypeError(
        f"{where}: cannot write {type(value).__name__} to JSON; "
        "pass a number, string, bool, None, list or dict"
    )


def atomic_write(path: Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` via a temp file in the same directory and ``os.replace``.

    A reader (or a crash) sees either the old file or the complete new one, never a partial one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Read ``metrics.jsonl`` (or the run directory that holds it) into a list of rows.

    A half-written last line, which a killed run can leave, is skipped; a malformed line
    anywhere else raises ``ValueError`` naming the file and line.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if line_no == len(lines):
                break  # truncated by a kill mid-write
            raise ValueError(f"{path}:{line_no}: not a JSON object ({err.msg})") from err
    return rows


def write_summary(output_dir: str | Path, summary: dict[str, Any]) -> Path:
    """Write ``summary`` to ``output_dir/summary.json`` atomically and return its path.

    Non-finite floats are written as ``null``; nested dicts are kept as they are.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(to_jsonable(summary, where="summary"), indent=2, allow_nan=False)
    return atomic_write(output_dir / SUMMARY_FILE, text + "\n")


def _tensorboard_writer_class() -> type:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ImportError(
            "MetricsLogger(tensorboard=True) needs the 'tensorboard' package, which is not "
            "installed. Run `pip install tensorboard`, or turn TensorBoard logging off "
            "(metrics.jsonl and report.html are always written)."
        ) from err
    return SummaryWriter


class MetricsLogger:
    """Append one JSON row per ``log`` call to ``output_dir/metrics.jsonl``.

    A new run (``resume_step=None``) starts the file afresh. A resumed run passes the step of the
    checkpoint it resumed from: rows with ``step <= resume_step`` are kept and later ones (logged
    after that checkpoint by the interrupted run) are dropped, so the file ends up equal to an
    uninterrupted run's, apart from ``time``. ``time`` counts seconds since the logger was
    created, continuing from the last kept row when resuming.

    With ``tensorboard=True`` every numeric metric is also written to TensorBoard under
    ``{split}/{key}`` in ``output_dir/tensorboard``. In multi-process runs, log from rank 0 only.
    """

    def __init__(
        self,
        output_dir: str | Path,
        *,
        resume_step: int | None = None,
        tensorboard: bool = False,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / METRICS_FILE
        # Fail on a missing optional dependency before touching any file.
        writer_class = _tensorboard_writer_class() if tensorboard else None
        self.output_dir.mkdir(parents=True, exist_ok=True)

        time_offset = 0.0
        if resume_step is None:
            self.path.write_text("", encoding="utf-8")
        elif self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", math.inf) <= resume_step]
            atomic_write(self.path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in kept))
            time_offset = max((r.get("time") or 0.0 for r in kept), default=0.0)

        self._file = open(self.path, "a", encoding="utf-8")
        self._start = time.perf_counter() - time_offset
        self._tb = None
        if writer_class is not None:
            purge_step = None if resume_step is None else resume_step + 1
            log_dir = str(self.output_dir / "tensorboard")
            self._tb = writer_class(log_dir=log_dir, purge_step=purge_step)

    def log(self, step: int, metrics: dict[str, Any], *, split: str = "train") -> None:
        """Append ``{"step", "split", "time", **metrics}`` as one line and flush it."""
        clash = [k for k in metrics if k in _RESERVED_KEYS]
        if clash:
            raise ValueError(f"metric name(s) {clash} are reserved in metrics.jsonl; rename them")
        values = to_jsonable(dict(metrics), where=f"metrics at step {step}")
        row = {"step": int(step), "split": split, "time": round(self.elapsed(), 3), **values}
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                value = value.item() if hasattr(value, "item") else value
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{split}/{key}", value, int(step))

    def elapsed(self) -> float:
        """Seconds since the logger was created (continuing a resumed run's clock)."""
        return time.perf_counter() - self._start

    def close(self) -> None:
        """Close metrics.jsonl (and the TensorBoard writer). Safe to call twice."""
        self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
