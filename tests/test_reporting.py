"""rlxf.reporting: metrics.jsonl, summary.json, report.png/html and the progress bar."""

import base64
import json
import math
import os
import subprocess
import sys
import types

import pytest

from rlxf.reporting import (
    MetricsLogger,
    Panel,
    Progress,
    read_metrics,
    write_report,
    write_summary,
)

pytestmark = pytest.mark.report  # renders report.png for real (tests/conftest.py)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _lines(path):
    return path.read_text().splitlines()


def test_metrics_lines_are_strict_json_with_nan_as_null(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        logger.log(1, {"loss": 0.5, "tokens": 128, "bad": math.nan, "big": math.inf})
        logger.log(1, {"accuracy": 0.25}, split="eval")

    lines = _lines(tmp_path / "metrics.jsonl")
    assert len(lines) == 2
    # parse_constant rejects the non-standard NaN / Infinity tokens json.dumps writes by default
    rows = [json.loads(line, parse_constant=pytest.fail) for line in lines]
    assert rows[0]["step"] == 1 and rows[0]["split"] == "train"
    assert rows[0]["loss"] == 0.5
    assert rows[0]["tokens"] == 128 and isinstance(rows[0]["tokens"], int)
    assert rows[0]["bad"] is None and rows[0]["big"] is None
    assert isinstance(rows[0]["time"], float) and rows[0]["time"] >= 0
    assert rows[1] == {**rows[1], "split": "eval", "accuracy": 0.25}


def test_each_line_is_flushed_before_close(tmp_path):
    logger = MetricsLogger(tmp_path)
    logger.log(3, {"loss": 1.0})
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [3]
    logger.close()


def test_reserved_metric_names_are_rejected(tmp_path):
    with MetricsLogger(tmp_path) as logger, pytest.raises(ValueError, match="reserved"):
        logger.log(1, {"step": 2.0})


def test_new_run_starts_a_fresh_file(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        logger.log(1, {"loss": 1.0})
    with MetricsLogger(tmp_path) as logger:
        logger.log(1, {"loss": 2.0})
    assert [r["loss"] for r in read_metrics(tmp_path)] == [2.0]


def test_resume_keeps_rows_up_to_the_checkpoint_and_drops_the_rest(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        for step in range(1, 6):
            logger.log(step, {"loss": 1.0 / step})
        logger.log(4, {"accuracy": 0.5}, split="eval")
    # The run was killed mid-write after step 5.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "split": "tr')

    with MetricsLogger(tmp_path, resume_step=4) as logger:
        assert [(r["step"], r["split"]) for r in read_metrics(tmp_path)] == [
            (1, "train"), (2, "train"), (3, "train"), (4, "train"), (4, "eval"),
        ]
        last_time = read_metrics(tmp_path)[-1]["time"]
        logger.log(5, {"loss": 0.2})

    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 4, 5]
    assert rows[-1]["time"] >= last_time  # the clock continues rather than restarting at 0
    assert not list(tmp_path.glob(".*tmp*"))  # the atomic rewrite left no temp file


def test_resume_without_a_metrics_file_starts_empty(tmp_path):
    with MetricsLogger(tmp_path / "run", resume_step=10) as logger:
        logger.log(11, {"loss": 1.0})
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [11]


def test_read_metrics_tolerates_a_half_written_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]


def test_read_metrics_reports_a_corrupt_middle_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2"):
        read_metrics(path)


def test_write_summary_round_trips(tmp_path):
    summary = {
        "final": {"accuracy": 0.8, "loss": math.nan},
        "wall_time_s": 12.5,
        "steps": 100,
        "name": "grpo",
    }
    path = write_summary(tmp_path, summary)
    assert path == tmp_path / "summary.json"
    loaded = json.loads(path.read_text())
    assert loaded == {**summary, "final": {"accuracy": 0.8, "loss": None}}


def test_tensorboard_without_the_package_says_how_to_install_it(tmp_path, monkeypatch):
    # None in sys.modules makes the import fail whether or not tensorboard is installed here.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        MetricsLogger(tmp_path, tensorboard=True)


def test_tensorboard_gets_split_prefixed_scalars_and_purges_on_resume(tmp_path, monkeypatch):
    writers = []

    class FakeSummaryWriter:
        def __init__(self, log_dir, purge_step=None):
            self.log_dir, self.purge_step, self.scalars = log_dir, purge_step, []
            writers.append(self)

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, value, step))

        def close(self):
            pass

    fake_module = types.SimpleNamespace(SummaryWriter=FakeSummaryWriter)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake_module)
    with MetricsLogger(tmp_path, resume_step=7, tensorboard=True) as logger:
        logger.log(8, {"loss": 0.5, "accuracy": 0.25}, split="eval")
    assert writers[0].log_dir == str(tmp_path / "tensorboard") and writers[0].purge_step == 8
    assert writers[0].scalars == [("eval/loss", 0.5, 8), ("eval/accuracy", 0.25, 8)]


def _logged_run(output_dir):
    with MetricsLogger(output_dir) as logger:
        for step in range(1, 21):
            logger.log(step, {"loss": 1.0 / step, "reward/mean": step / 20})
            if step % 5 == 0:
                logger.log(step, {"accuracy": step / 25}, split="eval")


def test_write_report_writes_png_and_self_contained_html(tmp_path):
    _logged_run(tmp_path)
    summary = {
        "start/accuracy": 0.3,
        "final/accuracy": 0.8,
        "train": {"tokens_per_s": 1234.5678},
        "note": "<b>not markup</b>",
    }
    png_path, html_path = write_report(
        tmp_path,
        title="GRPO on arithmetic",
        panels=[
            Panel("loss", ["loss"], split="train"),
            Panel("reward", ["reward/mean"], ylabel="reward"),
            Panel("accuracy", ["accuracy"], split="eval"),
        ],
        summary=summary,
        config={"lr": 3e-4, "model": {"name": "tiny"}},
    )

    png = png_path.read_bytes()
    assert png_path.name == "report.png" and png.startswith(PNG_MAGIC) and len(png) > 10_000
    html = html_path.read_text()
    assert html_path.name == "report.html"
    assert "GRPO on arithmetic" in html
    assert "Start → final" in html
    assert "<td>accuracy</td><td>0.3</td><td>0.8</td><td>+0.5</td>" in html
    assert "1235" in html and "train.tokens_per_s" in html  # 4 significant digits, flattened
    assert "&lt;b&gt;not markup&lt;/b&gt;" in html and "<b>not markup" not in html
    assert "model.name" in html and "0.0003" in html
    assert "data:image/png;base64," + base64.b64encode(png).decode("ascii") in html


def test_panel_with_missing_keys_or_no_metrics_file_does_not_crash(tmp_path):
    _logged_run(tmp_path / "run")
    panels = [Panel("mixed", ["loss", "never_logged"]), Panel("empty", ["never_logged"])]
    png_path, _ = write_report(tmp_path / "run", title="t", panels=panels)
    assert png_path.read_bytes().startswith(PNG_MAGIC)

    png_path, html_path = write_report(tmp_path / "empty", title="no metrics", panels=panels)
    assert png_path.read_bytes().startswith(PNG_MAGIC) and "no metrics" in html_path.read_text()


def test_panel_keys_must_be_a_list():
    with pytest.raises(TypeError, match="list"):
        Panel("loss", "loss")


def test_progress_disabled_prints_nothing(capsys):
    with Progress(10, desc="quiet", enabled=False) as bar:
        for _ in range(10):
            bar.update(loss=0.693)
        bar.write("hello")
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_progress_enabled_prints_to_stderr_with_postfix(capsys):
    with Progress(4, desc="train", initial=1) as bar:
        bar.update(loss=0.69314, lr=3e-5)
        bar.update(2, reward=1200.0)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "train" in captured.err and "4/4" in captured.err
    for shown in ("loss=0.693", "lr=3e-5", "reward=1.2e3"):
        assert shown in captured.err


def test_importing_reporting_does_not_import_matplotlib():
    code = "import sys, rlxf.reporting; assert 'matplotlib' not in sys.modules, 'matplotlib loaded'"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
