"""Run reward code written by a model behind the operating-system boundary (docs/security.md).

:func:`run_reward_code` runs ``python -I -S`` (isolated: no site-packages, no user site, no
``PYTHON*`` variables — the child sees only the standard library, never rlxf or torch) inside the
boundary of :mod:`rlxf.sandbox.boundary`: bubblewrap namespaces (no network, no other processes,
a read-only filesystem but a fresh tmpfs scratch directory), the unprivileged uid/gid 65534 when
rlxf runs as root, ``PR_SET_NO_NEW_PRIVS`` and the seccomp filter of :mod:`rlxf.sandbox.syscalls`
(no exec, fork, threads, signals, sockets, ptrace, device nodes or executable mappings). It sends
the code and one batch as JSON on stdin and reads one JSON reply from a dedicated pipe. The child
(``rlxf/sandbox/_child.py``):

- sets resource limits: address space (``memory_mb``), CPU time (``ceil(timeout) + 1`` s), file
  size (``file_mb``), open files (64), no core dumps;
- imports the allowed modules (:data:`ALLOWED_MODULES`), locks itself down (uid, no-new-privs,
  seccomp), then installs an audit hook (``sys.addaudithook``) that refuses imports of other
  modules, files outside scratch, and ``os``/``subprocess``/``socket``/``ctypes``/... events — a
  second line of defence with clearer messages, not the boundary (``interpreter_checks=False``
  switches it off, which the tests use to show that the OS stops every attack on its own);
- runs the code, calls the function on the batch (one sample at a time when the batch call
  raises, so one bad sample does not take the others' values) and replies.

The parent kills the sandbox (and with it its whole PID namespace) on the wall-time limit
(``timeout``) and when it writes more than ``max_output_bytes``, and trusts nothing in the reply:
the reply must be one JSON object with one value per completion, each a finite number or None;
anything else becomes a per-sample error (that sample gets None), never a value.

Where the OS cannot give that boundary (not Linux, no bubblewrap, namespaces forbidden),
:func:`run_reward_code` raises :class:`~rlxf.rewards.RewardError` naming what is missing, unless
``unsafe=True`` (``--unsafe-reward-code``): then the child runs without the boundary, with
resource limits and the audit hook only, after a warning.

:class:`SandboxedReward` wraps a reward file as a contract function that runs every batch through
the sandbox; ``get_reward("sandbox:FILE.py:fn")`` builds one, and so does any file whose first
line is the provenance header of ``rlxf text2reward`` (:mod:`rlxf.sandbox.provenance`).
"""

from __future__ import annotations

import base64
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
from rlxf.rewards.codecheck import check_reward_code
from rlxf.sandbox import ALLOWED_MODULES, boundary, provenance

logger = logging.getLogger(__name__)

SANDBOX_PREFIX = "sandbox:"
GENERATED_MARKER = provenance.HEADER  # the first line of files written by `rlxf text2reward`
_CHILD_SOURCE = Path(boundary.__file__).with_name("_child.py")
_unsafe_warned = False


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
                    memory_mb: int = 256, max_output_bytes: int = 1_000_000, file_mb: int = 16,
                    unsafe: bool = False, interpreter_checks: bool = True, seccomp: bool = True) -> SandboxResult:
    """Run ``function_name(prompts, completions, **fields)`` defined by ``code`` in the sandbox.

    Never raises for anything the code does: every failure (syntax error, exception, forbidden
    operation, time/memory/output limit, malformed reply) comes back in :class:`SandboxResult`.
    Raises :class:`RewardError` when the OS boundary is not available here and ``unsafe`` is False.
    ``timeout`` is wall time in seconds for the whole process (start-up, about 0.1 s, included).
    ``interpreter_checks=False`` drops the audit hook (the OS boundary alone); ``seccomp=False``
    drops the syscall filter (namespaces alone): both exist to test each layer on its own.
    """
    if not unsafe:
        try:
            boundary.require()
        except boundary.SandboxUnavailable as err:
            raise RewardError(str(err)) from err
    elif not hasattr(os, "setsid") or sys.platform == "win32":
        raise RewardError("the reward-code sandbox needs Linux or macOS (resource limits, process groups)")
    else:
        _warn_unsafe()
    prompts, completions = [str(p) for p in prompts], [str(c) for c in completions]
    fields = {str(k): list(v) for k, v in (fields or {}).items()}
    lockdown = None
    if not unsafe:
        lockdown = {"drop_to": boundary.drop_ids(), "seccomp": base64.b64encode(_filter() if seccomp else b"").decode()}
        if not seccomp:
            lockdown["seccomp"] = None
    payload = json.dumps({"code": code, "function": function_name, "prompts": prompts, "completions": completions,
                          "fields": fields, "lockdown": lockdown}, default=str).encode()
    reply_read, reply_write = os.pipe()
    limits = {"memory_mb": int(memory_mb), "cpu_seconds": math.ceil(timeout) + 1, "file_mb": int(file_mb),
              "max_output_bytes": int(max_output_bytes), "allowed_modules": list(ALLOWED_MODULES),
              "reply_fd": reply_write, "interpreter_checks": bool(interpreter_checks)}
    child = ["-c", _CHILD_SOURCE.read_text(), json.dumps(limits)]
    scratch = tempfile.mkdtemp(prefix="rlxf-sandbox-") if unsafe else None
    start = time.perf_counter()
    try:
        if unsafe:
            command = [sys.executable, "-I", "-S", *child]
            env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "HOME": scratch, "TMPDIR": scratch}
        else:
            command, env = boundary.isolated_command(child, scratch_mb=max(4 * int(file_mb), 32)), {}
        try:
            proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    cwd=scratch or "/", env=env, start_new_session=True, close_fds=True,
                                    pass_fds=(reply_write,))
        finally:
            os.close(reply_write)
        streams = _exchange(proc, payload, reply_read, timeout, max_output_bytes)
    finally:
        os.close(reply_read)
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    return _result(proc.returncode, *streams, n=len(prompts), timeout=timeout, memory_mb=memory_mb,
                   max_output_bytes=max_output_bytes, seconds=time.perf_counter() - start)


class SandboxedReward:
    """A contract reward function that runs ``function`` of the file ``path`` in the sandbox.

    Every call starts one sandbox process for the whole batch (about 0.1 s). Samples whose scoring
    raises or returns anything but a finite number or None get None (counted in ``errors``, the
    first kept in ``first_error``). A batch that hits a limit (time, memory, output) or returns the
    wrong number of values is not a bad sample but a broken function: that raises
    :class:`RewardError` and stops the run. The code is statically checked, and the OS boundary
    probed, when the object is built, so a run fails before its model loads.
    """

    def __init__(self, path: str | Path, function: str = "reward_fn", *, timeout: float = 60.0,
                 memory_mb: int = 1024, max_output_bytes: int = 16_000_000, unsafe: bool = False):
        if not unsafe:
            try:
                boundary.require()
            except boundary.SandboxUnavailable as err:
                raise RewardError(str(err)) from err
        self.unsafe = unsafe
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
                                 memory_mb=self.memory_mb, max_output_bytes=self.max_output_bytes, unsafe=self.unsafe)
        if result.values is None:
            raise RewardError(f"reward {self.reward_name}: {result.error}")
        failed = [(i, e) for i, e in enumerate(result.sample_errors) if e and result.values[i] is None]
        if failed:
            self.errors += len(failed)
            if self.first_error is None:
                self.first_error = f"sample {failed[0][0]}: {failed[0][1]}"
                logger.warning("reward %s: %d of %d samples failed (they get None); first: %s", self.reward_name,
                               len(failed), len(result.values), self.first_error)
        return result.values


def is_generated_file(spec: str) -> bool:
    """True when ``spec`` is ``file.py:fn`` and the file is model-written by its provenance header
    (:func:`rlxf.sandbox.provenance.classify`): such a file always runs sandboxed. Raises
    :class:`RewardError` for a malformed header, which is never run in-process."""
    path = spec.rpartition(":")[0]
    if not path.endswith(".py") or not os.path.isfile(path):
        return False
    try:
        return provenance.classify(path) == "model-written"
    except provenance.ProvenanceError as err:
        raise RewardError(str(err)) from err


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def _filter() -> bytes:
    from rlxf.sandbox.syscalls import filter_program

    return filter_program()


def _warn_unsafe() -> None:
    global _unsafe_warned
    if not _unsafe_warned:
        _unsafe_warned = True
        logger.warning("--unsafe-reward-code: model-written reward code runs WITHOUT the OS boundary (no "
                       "namespaces, no seccomp, same user as rlxf); only resource limits and interpreter checks "
                       "stand between it and this machine (docs/security.md)")


def _exchange(proc: subprocess.Popen, payload: bytes, reply_fd: int, timeout: float, max_bytes: int):
    """Write ``payload`` to the child's stdin and collect stdout, stderr and the reply pipe (each
    capped at ``max_bytes``) until all close; kill the sandbox on timeout or overflow.
    Returns (reply, stdout, stderr, timed_out, overflow)."""
    deadline = time.monotonic() + timeout
    out_fds = {proc.stdout.fileno(): "stdout", proc.stderr.fileno(): "stderr", reply_fd: "reply"}
    chunks = {name: [] for name in out_fds.values()}
    sizes = dict.fromkeys(out_fds.values(), 0)
    timed_out = overflow = False
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdin, selectors.EVENT_WRITE)
        for fd in out_fds:
            selector.register(fd, selectors.EVENT_READ)
        view, sent = memoryview(payload), 0
        while selector.get_map() and not overflow:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            for key, _ in selector.select(remaining):
                if key.fileobj is proc.stdin:
                    try:
                        sent += os.write(proc.stdin.fileno(), view[sent:sent + 65536])
                    except OSError:
                        sent = len(payload)
                    if sent >= len(payload):
                        selector.unregister(proc.stdin)
                        proc.stdin.close()
                    continue
                data = os.read(key.fd, 65536)
                if not data:
                    selector.unregister(key.fd)
                    continue
                name = out_fds[key.fd]
                sizes[name] += len(data)
                if sizes[name] > max_bytes:
                    overflow = True
                    break
                chunks[name].append(data)
    if timed_out or overflow:
        _kill_group(proc)
    try:
        proc.wait(timeout=5 if (timed_out or overflow) else max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc)
        proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if not stream.closed:
            stream.close()
    return (b"".join(chunks["reply"]), b"".join(chunks["stdout"]), b"".join(chunks["stderr"]), timed_out, overflow)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the sandbox's process group; behind the boundary that is bwrap, whose death takes
    the PID namespace and everything in it (``--die-with-parent``)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def _result(returncode, reply: bytes, stdout: bytes, stderr: bytes, timed_out: bool, overflow: bool, *, n: int,
            timeout, memory_mb, max_output_bytes, seconds) -> SandboxResult:
    stderr_tail = (stdout + stderr).decode(errors="replace")[-2000:]
    if timed_out:
        return SandboxResult(None, f"timed out: the code ran longer than the {timeout:g} s limit and was killed "
                             "(an endless loop, or too slow for the batch)", timed_out=True, killed=True,
                             stdout_tail=stderr_tail, seconds=seconds)
    if overflow:
        return SandboxResult(None, f"output limit: the code wrote more than {max_output_bytes} bytes and was killed",
                             killed=True, stdout_tail=stderr_tail, seconds=seconds)
    if returncode != 0 and not reply:
        return SandboxResult(None, _crash_message(returncode, stderr_tail, memory_mb), killed=returncode < 0,
                             stdout_tail=stderr_tail, seconds=seconds)
    return validate_reply(reply, n, seconds=seconds, returncode=returncode)


def validate_reply(reply: bytes, n: int, *, seconds: float = 0.0, returncode: int = 0) -> SandboxResult:
    """Turn the child's reply bytes into a :class:`SandboxResult`, trusting nothing in them: one JSON
    object; ``values`` a list of exactly ``n`` entries, each a finite number (bool excluded) or None;
    any other entry becomes None with a per-sample error; anything else about the reply is an error."""
    try:
        data = json.loads(reply.decode("utf-8"), parse_constant=lambda name: _NONFINITE[name])
    except (UnicodeDecodeError, ValueError, RecursionError):
        data = None
    if not isinstance(data, dict):
        return SandboxResult(None, f"the sandbox sent a malformed reply ({len(reply)} bytes, exit code {returncode}); "
                             "the code may have written to the reply channel or exited early", seconds=seconds)
    error = data.get("error")
    error = None if error is None else str(error)[:2000]
    stdout = data.get("stdout") if isinstance(data.get("stdout"), str) else ""
    values = data.get("values")
    if values is None:
        return SandboxResult(None, error or "the sandbox replied without values", stdout_tail=stdout[-4000:],
                             seconds=seconds)
    if not isinstance(values, list) or len(values) != n:
        size = len(values) if isinstance(values, list) else type(values).__name__
        return SandboxResult(None, f"the sandbox replied with {size} values for {n} completions", seconds=seconds)
    claimed = data.get("sample_errors")
    claimed = claimed if isinstance(claimed, list) and len(claimed) == n else [None] * n
    checked, problems = [], []
    for value, note in zip(values, claimed):
        if value is None:
            checked.append(None)
            problems.append(str(note)[:500] if isinstance(note, str) else None)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            checked.append(float(value))
            problems.append(None)
        elif isinstance(value, float):
            checked.append(None)
            problems.append(f"returned {value} (not finite), expected a finite float or None")
        else:
            checked.append(None)
            problems.append(f"returned {type(value).__name__} {str(value)[:60]!r}, expected a finite float or None")
    return SandboxResult(checked, error, stdout_tail=stdout[-4000:], sample_errors=problems, seconds=seconds)


_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


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
