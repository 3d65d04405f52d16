"""Checkpoint writes: a write killed half-way leaves a temporary directory that rlxf removes when the
run starts or resumes, and only that: look-alikes without rlxf's marker, and the temporary
directory of a process that is still writing, are left alone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from rlxf.config import build_config
from rlxf.runtime import latest_checkpoint, remove_stale_checkpoint_dirs, save_checkpoint
from rlxf.runtime.checkpoint import PARTIAL_MARKER

SRC = Path(__file__).resolve().parents[1] / "src"


class TinyModel(torch.nn.Linear):
    """A module with the one method a checkpoint needs from a Hugging Face model."""

    def __init__(self, on_save=None):
        super().__init__(2, 2)
        self.on_save = on_save

    def save_pretrained(self, path, safe_serialization=True):
        if self.on_save:
            self.on_save(Path(path))
        torch.save(self.state_dict(), Path(path) / "weights.pt")


def _save(root: Path, step: int, model: TinyModel) -> Path:
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return save_checkpoint(root, step, model=model, tokenizer=None, optimizer=optimizer, scheduler=scheduler,
                           state={"batcher": {}})


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _temp_dir(root: Path, step: int, pid: int, *, marker: bool) -> Path:
    path = root / f"step-{step}.tmp-{pid}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"\0" * 1024)
    if marker:
        (path / PARTIAL_MARKER).write_text("{}\n")
    return path


def test_the_marker_is_written_before_anything_else_and_a_complete_checkpoint_has_none(tmp_path):
    seen = []
    final = _save(tmp_path, 3, TinyModel(on_save=lambda path: seen.append(sorted(os.listdir(path)))))
    assert seen == [[PARTIAL_MARKER]]
    assert final == tmp_path / "step-3" and not (final / PARTIAL_MARKER).exists()
    assert latest_checkpoint(tmp_path) == final and sorted(p.name for p in tmp_path.iterdir()) == ["step-3"]


@pytest.mark.parametrize("error", [OSError("No space left on device"), KeyboardInterrupt()])
def test_a_write_that_fails_removes_its_temporary_directory(tmp_path, error):
    def fail(path):
        (path / "partial.bin").write_bytes(b"\0" * 1024)
        raise error

    with pytest.raises(type(error)):
        _save(tmp_path, 1, TinyModel(on_save=fail))
    assert list(tmp_path.iterdir()) == []


def test_only_marked_temporary_directories_of_finished_processes_are_removed(tmp_path):
    root, elsewhere = tmp_path / "checkpoints", tmp_path / "elsewhere"
    dead = _dead_pid()
    stale = _temp_dir(root, 4, dead, marker=True)
    unmarked = _temp_dir(root, 5, dead, marker=False)               # the look-alike: same name pattern
    misnamed = root / f"notes.tmp-{dead}"                            # the marker, but not rlxf's name
    misnamed.mkdir()
    (misnamed / PARTIAL_MARKER).write_text("{}\n")
    own = _temp_dir(root, 7, os.getpid(), marker=True)             # this process's failed earlier write
    target = _temp_dir(elsewhere, 8, dead, marker=True)
    (root / f"step-8.tmp-{dead}").symlink_to(target, target_is_directory=True)
    complete = _save(root, 2, TinyModel())
    assert remove_stale_checkpoint_dirs(root) == [stale, own]
    assert sorted(p.name for p in root.iterdir()) == sorted(
        [unmarked.name, misnamed.name, f"step-8.tmp-{dead}", complete.name])
    assert (target / PARTIAL_MARKER).is_file()
    assert remove_stale_checkpoint_dirs(tmp_path / "missing") == []


def test_the_temporary_directory_of_a_live_writer_is_kept(tmp_path):
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = _temp_dir(tmp_path, 4, writer.pid, marker=True)
        assert remove_stale_checkpoint_dirs(tmp_path) == [] and live.is_dir()
    finally:
        writer.kill()
        writer.wait()
    assert remove_stale_checkpoint_dirs(tmp_path) == [live]


KILLED_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from test_checkpoint import TinyModel, _save

    def hang(path):  # the weights are half written when the process is killed
        (path / "model.safetensors").write_bytes(b"\\0" * 4096)
        print("writing", flush=True)
        time.sleep(60)

    _save(Path(sys.argv[1]), 6, TinyModel(on_save=hang))
""")


@pytest.mark.slow
def test_a_killed_write_is_cleaned_up_when_the_run_resumes(tmp_path):
    from rlxf.cli import _config_class
    from rlxf.train.rundir import prepare_output_dir

    out = tmp_path / "run"
    root = out / "checkpoints"
    _save(root, 4, TinyModel())
    (out / "metrics.jsonl").write_text("{}\n")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(root), str(Path(__file__).parent)],
                              stdout=subprocess.PIPE, text=True, env=env)
    assert writer.stdout.readline().strip() == "writing"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    killed = root / f"step-6.tmp-{writer.pid}"
    assert (killed / PARTIAL_MARKER).is_file() and (killed / "model.safetensors").is_file()
    look_alike = _temp_dir(root, 7, writer.pid, marker=False)
    cfg = build_config(_config_class("sft"), {"output_dir": str(out), "resume": True})
    prepare_output_dir(cfg, "sft")
    assert not killed.exists() and look_alike.is_dir()
    assert latest_checkpoint(root) == root / "step-4"
    assert json.loads((root / "step-4" / "state.json").read_text())["step"] == 4
