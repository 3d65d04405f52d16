"""What every run writes and shows: progress bar, ``metrics.jsonl``, ``summary.json``, report.

A recipe uses it like this::

    with MetricsLogger(out, resume_step=start_step) as metrics, \\
            Progress(total_steps, desc="grpo", initial=start_step) as bar:
        for step in range(start_step + 1, total_steps + 1):
            ...
            metrics.log(step, {"loss": loss, "reward/mean": reward})
            bar.update(loss=loss, reward=reward)
    write_summary(out, summary)
    write_report(out, title="GRPO", panels=[Panel("loss", ["loss"])], summary=summary, config=cfg)

Importing this package is cheap: tqdm, matplotlib and TensorBoard load only when used.
"""

from rlxf.reporting.metrics import MetricsLogger, read_metrics, write_summary
from rlxf.reporting.progress import PhaseProgress, Progress
from rlxf.reporting.report import Panel, write_report

__all__ = ["MetricsLogger", "Panel", "PhaseProgress", "Progress", "read_metrics", "write_report", "write_summary"]
