"""Run reward code written by a model in a separate, limited process (DESIGN.md, "Reliability and
safety rules": code written by a model runs only in a separate process).

:func:`run_reward_code` starts ``python -I -S`` (isolated: no site-packages, no user site, no
``PYTHON*`` variables — the child sees only the standard library, never rlxf or torch) in a fresh
temporary scratch directory with a minimal environment, sends the code and one batch as JSON on
stdin and reads one JSON reply on stdout. The child (``_sandbox_child.py``):

- sets resource limits: address space (``memory_mb``), CPU time (``ceil(timeout) + 1`` s), file
  size (``file_mb``), open files (64), no core dumps, no new processes or threads (``RLIMIT_NPROC``
  0, which Linux does not enforce for root);
- imports the allowed modules (:data:`ALLOWED_MODULES`), then installs an audit hook
  (``sys.addaudithook``, which cannot be removed) that refuses: importing any other module;
  ``open``/``listdir`` outside the scratch directory, for reading and writing (the only exception:
  the import system may read the standard library, for lazy codec imports); every ``os.*`` event
  (``system``, ``exec``, ``fork``, ``spawn``, ``kill``, ``remove``, ``chdir`` ...);
  ``subprocess``, ``socket``, ``shutil``, ``ctypes``, ``mmap``, ``signal``, thread creation,
  ``code.__new__`` and ``marshal`` outside the import system;
- runs the code, calls the function on the batch (one sample at a time when the batch call
  raises, so one bad sample does not take the others' values), captures what it prints (the last
  4,000 characters are kept) and replies.

The parent kills the process group on the wall-time limit (``timeout``) and when the child writes
more than ``max_output_bytes``, and always deletes the scratch directory.

Honest limits: audit hooks and rlimits are a guard rail against mistakes and careless code, not a
security boundary against a determined attacker (CPython has known ways around audit hooks,
``RLIMIT_NPROC`` does not bind root, and reading metadata such as ``os.stat`` raises no event).
Run code from untrusted models inside a container or VM as well (docs/text2reward.md).

:class:`SandboxedReward` wraps a reward file as a contract function that runs every batch through
the sandbox; ``get_reward("sandbox:FILE.py:fn")`` builds one (docs/text2reward.md).
"""

from __future__ import annotations

import json
import logging
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from rlxf.rewards.base import RewardError

logger = logging.getLogger(__name__)

ALLOWED_MODULES = ("math", "re", "statistics", "string", "collections", "itertools", "functools", "json",
                   "difflib", "unicodedata", "fractions", "decimal")
SANDBOX_PREFIX = "sandbox:"
GENERATED_MARKER = "# rlxf: sandboxed"  # first-lines marker of files written by `rlxf text2reward`
_CHILD_SOURCE = Path(__file__).with_name("_sandbox_child.py")


@dataclass
class SandboxResult:
    """What one sandboxed call produced.

    values: one float (NaN/inf kept as they came) or None per completion, or None when there is no
    usable list (``error`` says why). error: None when the batch call returned a well-formed list;
    else what went wrong (the batch raised — ``values`` then holds the one-sample-at-a-time retry —,
    the code did not load, a limit was hit). timed_out: the wall-time limit killed it. killed: the
    process was killed (time, CPU, output size or a signal). stdout_tail: the end of what the code
    printed. sample_errors: per sample, None or what was wrong (raised, non-number, non-finite).
    """

    values: list[float | None] | None
    error: str | None = None
    timed_out: bool = False
    killed: bool = False
    stdout_tail: str = ""
    sample_errors: list[str | None] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and self.values is not None


def run_reward_code(code: str, function_name: str, prompts, completions, fields=None, *, timeout: float = 5.0,
                    memory_mb: int = 256, max_output_bytes: int = 1_000_000, file_mb: int = 16) -> SandboxResult:
    """Run ``function_name(prompts, completions, **fields)`` defined by ``code`` in the sandbox.

    Never raises for anything the code does: every failure (syntax error, exception, forbidden
    operation, time/memory/output limit) comes back in :class:`SandboxResult`. ``timeout`` is wall
    time in seconds for the whole process (start-up, about 0.1 s, included).
    """
    if not hasattr(os, "setsid") or sys.platform == "win32":
        raise RewardError("the reward-code sandbox needs Linux or macOS (resource limits, process groups)")
    prompts, completions = [str(p) for p in prompts], [str(c) for c in completions]
    fields = {str(k): list(v) for k, v in (fields or {}).items()}
    payload = json.dumps({"code": code, "function": function_name, "prompts": prompts,
                          "completions": completions, "fields": fields}, default=str).encode()
    limits = {"memory_mb": int(memory_mb), "cpu_seconds": math.ceil(timeout) + 1, "file_mb": int(file_mb),
              "max_output_bytes": int(max_output_bytes), "allowed_modules": list(ALLOWED_MODULES)}
    scratch = tempfile.mkdtemp(prefix="rlxf-sandbox-")
    env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "HOME": scratch, "TMPDIR": scratch}
    start = time.perf_counter()
    try:
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _CHILD_SOURCE.read_text(), json.dumps(limits)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=scratch, env=env, start_new_session=True, close_fds=True)
        stdout, stderr, timed_out, overflow = _exchange(proc, payload, timeout, max_output_bytes)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    seconds = time.perf_counter() - start
    return _result(proc.returncode, stdout, stderr, timed_out=timed_out, overflow=overflow, timeout=timeout,
                   memory_mb=memory_mb, max_output_bytes=max_output_bytes, seconds=seconds)


class SandboxedReward:
    """A contract reward function that runs ``function`` of the file ``path`` in the sandbox.

    Every call starts one sandbox process for the whole batch (about 0.1 s). Samples whose scoring
    raises or returns a non-number get None (counted in ``errors``, the first kept in
    ``first_error``); NaN/inf come back as they are, so :func:`rlxf.rewards.call_reward` counts
    them. A batch that hits a limit (time, memory, output) or returns the wrong number of values is
    not a bad sample but a broken function: that raises :class:`RewardError` and stops the run.
    The code is statically checked when the object is built (``check_reward_code``).
    """

    def __init__(self, path: str | Path, function: str = "reward_fn", *, timeout: float = 60.0,
                 memory_mb: int = 1024, max_output_bytes: int = 16_000_000):
        from rlxf.rewards.codecheck import check_reward_code

        self.path, self.function = Path(path), function
        if not self.path.is_file():
            raise RewardError(f"sandboxed reward: file {str(path)!r} not found (resolved to {self.path.resolve()}); "
                              "give a path to a .py file relative to the working directory, or an absolute one")
        self.code = self.path.read_text()
        problems = check_reward_code(self.code, function_name=function)
        if problems:
            raise RewardError(f"sandboxed reward {self.path}:{function} fails the static checks: "
                              + "; ".join(problems) + ". Regenerate it with `rlxf text2reward` or fix it by hand")
        self.timeout, self.memory_mb, self.max_output_bytes = timeout, memory_mb, max_output_bytes
        self.reward_name = f"sandbox:{self.path.name}:{function}"
        self.errors, self.first_error = 0, None

    @classmethod
    def from_spec(cls, spec: str, **options) -> SandboxedReward:
        """``sandbox:path/to/file.py:fn`` or ``path/to/file.py:fn`` (``fn`` defaults to ``reward_fn``)."""
        text = spec[len(SANDBOX_PREFIX):] if spec.startswith(SANDBOX_PREFIX) else spec
        path, sep, function = text.rpartition(":")
        if not sep or not path.endswith(".py"):
            path, function = text, "reward_fn"
        if not path.endswith(".py"):
            raise RewardError(f"reward spec {spec!r}: a sandboxed reward is 'sandbox:path/to/file.py:function'")
        return cls(path, function or "reward_fn", **options)

    def __call__(self, prompts, completions, **fields) -> list[float | None]:
        result = run_reward_code(self.code, self.function, prompts, completions, fields, timeout=self.timeout,
                                 memory_mb=self.memory_mb, max_output_bytes=self.max_output_bytes)
        if result.values is None:
            raise RewardError(f"reward {self.reward_name}: {result.error}")
        # raised or not a number -> None here; NaN/inf stay for call_reward to count as non-finite
        failed = [(i, e) for i, e in enumerate(result.sample_errors) if e and result.values[i] is None]
        if failed:
            self.errors += len(failed)
            if self.first_error is None:
                self.first_error = f"sample {failed[0][0]}: {failed[0][1]}"
                logger.warning("reward %s: %d of %d samples failed (they get None); first: %s", self.reward_name,
                               len(failed), len(result.values), self.first_error)
        return result.values


def is_generated_file(spec: str) -> bool:
    """True when ``spec`` is ``file.py:fn`` and the file carries :data:`GENERATED_MARKER` in its
    first lines (written by ``rlxf text2reward``): such a file is always run sandboxed."""
    path = spec.rpartition(":")[0]
    if not path.endswith(".py") or not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8", errors="replace") as handle:
        head = [handle.readline() for _ in range(5)]
    return any(line.strip() == GENERATED_MARKER for line in head)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def _exchange(proc: subprocess.Popen, payload: bytes, timeout: float, max_bytes: int):
    """Write ``payload`` to the child's stdin and collect stdout/stderr (each capped at
    ``max_bytes``) until it exits; kill its process group on timeout or overflow."""
    deadline = time.monotonic() + timeout
    chunks = {proc.stdout: [], proc.stderr: []}
    sizes = {proc.stdout: 0, proc.stderr: 0}
    timed_out = overflow = False
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdin, selectors.EVENT_WRITE)
        selector.register(proc.stdout, selectors.EVENT_READ)
        selector.register(proc.stderr, selectors.EVENT_READ)
        view, sent = memoryview(payload), 0
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            for key, _ in selector.select(remaining):
                stream = key.fileobj
                if stream is proc.stdin:
                    try:
                        sent += os.write(stream.fileno(), view[sent:sent + 65536])
                    except (BrokenPipeError, OSError):
                        sent = len(payload)
                    if sent >= len(payload):
                        selector.unregister(stream)
                        stream.close()
                    continue
                data = os.read(stream.fileno(), 65536)
                if not data:
                    selector.unregister(stream)
                    continue
                sizes[stream] += len(data)
                if sizes[stream] > max_bytes:
                    overflow = True
                    break
                chunks[stream].append(data)
            if overflow:
                break
    if timed_out or overflow:
        _kill_group(proc)
    try:
        proc.wait(timeout=max(0.1, deadline - time.monotonic()) if not (timed_out or overflow) else 5)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc)
        proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if not stream.closed:
            stream.close()
    return b"".join(chunks[proc.stdout]), b"".join(chunks[proc.stderr]), timed_out, overflow


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def _result(returncode, stdout: bytes, stderr: bytes, *, timed_out, overflow, timeout, memory_mb, max_output_bytes,
            seconds) -> SandboxResult:
    stderr_tail = stderr.decode(errors="replace")[-2000:]
    if timed_out:
        return SandboxResult(None, f"timed out: the code ran longer than the {timeout:g} s limit and was killed "
                             "(an endless loop, or too slow for the batch)", timed_out=True, killed=True,
                             stdout_tail=stderr_tail, seconds=seconds)
    if overflow:
        return SandboxResult(None, f"output limit: the code wrote more than {max_output_bytes} bytes and was killed",
                             killed=True, stdout_tail=stderr_tail, seconds=seconds)
    text = stdout.decode(errors="replace").rstrip("\n")
    try:
        reply = json.loads(text.rpartition("\n")[2])
    except ValueError:
        reply = None
    if returncode != 0 or not isinstance(reply, dict):
        return SandboxResult(None, _crash_message(returncode, stderr_tail, memory_mb), killed=returncode < 0,
                             stdout_tail=stderr_tail, seconds=seconds)
    values = reply.get("values")
    return SandboxResult(values=values, error=reply.get("error"), stdout_tail=reply.get("stdout", ""),
                         sample_errors=reply.get("sample_errors") or [], seconds=seconds)


def _crash_message(returncode: int, stderr_tail: str, memory_mb: int) -> str:
    if returncode == -getattr(signal, "SIGXCPU", 24):
        return "CPU time limit: the code used more CPU time than allowed and was killed"
    if returncode == -getattr(signal, "SIGXFSZ", 25):
        return "file size limit: the code wrote a file larger than allowed and was killed"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return f"the sandbox process was killed by signal {name} (memory limit {memory_mb} MB?)"
    last = stderr_tail.strip().splitlines()[-1] if stderr_tail.strip() else "no output"
    if "MemoryError" in stderr_tail:
        return f"memory limit: the code needed more than {memory_mb} MB ({last})"
    return f"the sandbox process failed with exit code {returncode}: {last}"
