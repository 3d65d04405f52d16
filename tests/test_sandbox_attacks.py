"""Attacks on the reward-code sandbox, each run twice: with the interpreter checks (audit hook) on,
and with them off, where the OS boundary alone (namespaces, unprivileged uid, seccomp) must stop it.

Each attack is the body of a reward function. It reports what happened on a line ``OUTCOME: ...``
(the reward function's prints come back in ``stdout_tail``): ``ESCAPED`` when the attack's last
step succeeded, else the exception that stopped it. With the checks off the exception must come
from the OS (``PermissionError``/``OSError``/``FileNotFoundError``/``ImportError`` of a refused
mapping), never from the audit hook.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from rlxf.rewards import RewardError, get_reward
from rlxf.rewards.sandbox import SandboxedReward, run_reward_code, validate_reply
from rlxf.sandbox import boundary, provenance

pytestmark = pytest.mark.skipif(boundary.probe() is not None,
                                reason=f"no OS boundary on this machine: {boundary.probe()}")
CHECKS = pytest.mark.parametrize("checks", [True, False], ids=["interpreter-checks", "os-boundary-only"])
HOOK_MESSAGE = "sandbox:"  # how the audit hook's refusals start


def attack(body: str, *, checks: bool, fields=None, timeout: float = 10.0, **options) -> str:
    """Run ``body`` (statements; the last one is the escape) in the sandbox; return its outcome."""
    code = ("def reward_fn(prompts, completions, **kwargs):\n"
            "    try:\n" + textwrap.indent(textwrap.dedent(body), " " * 8) + "\n"
            "        outcome = 'ESCAPED'\n"
            "    except BaseException as exc:\n"
            "        outcome = type(exc).__name__ + ': ' + str(exc)\n"
            "    print('OUTCOME: ' + outcome)\n"
            "    return [0.0] * len(completions)\n")
    result = run_reward_code(code, "reward_fn", ["p"], ["c"], fields, timeout=timeout,
                             interpreter_checks=checks, **options)
    lines = [line for line in result.stdout_tail.splitlines() if line.startswith("OUTCOME: ")]
    return lines[-1][len("OUTCOME: "):] if lines else f"no outcome ({result.error})"


def assert_stopped(outcome: str, checks: bool, *os_reasons: str) -> None:
    assert "ESCAPED" not in outcome, outcome
    if not checks:  # the OS, not the audit hook, stopped it
        assert HOOK_MESSAGE not in outcome and any(reason in outcome for reason in os_reasons), outcome


# -- processes: exec, fork, native helpers -------------------------------------------------------

@CHECKS
def test_exec_of_a_shell_is_refused(checks):
    outcome = attack("import os\nos.execv('/bin/sh', ['sh', '-c', 'true'])", checks=checks)
    assert_stopped(outcome, checks, "PermissionError", "Operation not permitted")


@CHECKS
def test_fork_and_setsid_are_refused(checks):
    outcome = attack("import os\npid = os.fork()\nif pid == 0:\n    os.setsid()\n    os._exit(0)", checks=checks)
    assert_stopped(outcome, checks, "PermissionError", "Operation not permitted")


@CHECKS
def test_posixsubprocess_fork_exec_cannot_run_a_shell(checks):
    # the private helper behind subprocess: an extension module (refused mapping) or, where it is
    # built in, a fork + exec (refused calls)
    outcome = attack("""
        import os, _posixsubprocess
        _posixsubprocess.fork_exec(['/bin/sh', '-c', 'true'], [b'/bin/sh'], True, (), None, None,
                                   -1, -1, -1, -1, -1, -1, *os.pipe(), False, False, False, None, None,
                                   None, -1, None, False)
    """, checks=checks)
    assert_stopped(outcome, checks, "PermissionError", "ImportError", "Operation not permitted", "TypeError")


@CHECKS
def test_threads_are_refused(checks):
    outcome = attack("import _thread\n_thread.start_new_thread(print, ('x',))", checks=checks)
    assert_stopped(outcome, checks, "RuntimeError", "can't start new thread", "PermissionError")


@CHECKS
def test_ptrace_and_signals_to_other_processes_are_refused(checks):
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for body in ("import os\nos.kill({pid}, 9)",
                     "import os\nfd = os.pidfd_open({pid})\nimport signal\nsignal.pidfd_send_signal(fd, 9)",
                     "import os\nos.kill(1, 9)"):
            outcome = attack(body.format(pid=victim.pid), checks=checks)
            assert_stopped(outcome, checks, "PermissionError", "ProcessLookupError", "Operation not permitted")
        time.sleep(0.2)
        assert victim.poll() is None, "the unrelated process was killed"
    finally:
        victim.kill()
        victim.wait()


def test_everything_the_code_started_dies_with_it_on_timeout():
    # the boundary alone (no seccomp filter, no rlimits): a forked, setsid'd child must still die
    # when the sandbox is killed, because it lives in the sandbox's PID namespace
    from rlxf.rewards.sandbox import _kill_group

    token = f"rlxf-pidns-test-{os.getpid()}-{time.monotonic_ns()}"
    code = f"import os, time\nif os.fork() == 0:\n    os.setsid()\ntime.sleep(60)  # {token}"
    proc = subprocess.Popen(boundary.isolated_command(["-c", code], scratch_mb=1), start_new_session=True)
    deadline = time.monotonic() + 10
    while len(_processes_with(token)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(_processes_with(token)) == 2, "the positive control failed: parent and forked child not seen"
    _kill_group(proc)
    proc.wait()
    deadline = time.monotonic() + 5
    while _processes_with(token) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _processes_with(token), "a process started in the sandbox outlived it"


# -- native code ---------------------------------------------------------------------------------

@CHECKS
def test_loading_an_extension_module_under_an_allowed_name_is_refused(checks):
    outcome = attack("""
        import _imp, sys, importlib.machinery as m
        origin = [p for p in sys.path if p.endswith('lib-dynload')][0] + '/_json' + m.EXTENSION_SUFFIXES[0]
        _imp.create_dynamic(m.ModuleSpec('math', None, origin=origin))
    """, checks=checks)
    assert_stopped(outcome, checks, "ImportError", "PermissionError", "Operation not permitted", "IndexError")


@CHECKS
def test_a_shared_object_written_to_scratch_cannot_be_loaded(checks):
    outcome = attack("""
        import sys, importlib.machinery as m, importlib.util
        lib = [p for p in sys.path if p.endswith('lib-dynload')][0]
        with open(lib + '/_bisect' + m.EXTENSION_SUFFIXES[0], 'rb') as src, open('evil.so', 'wb') as dst:
            dst.write(src.read())
        spec = importlib.util.spec_from_file_location('_bisect', 'evil.so')
        importlib.util.module_from_spec(spec)
    """, checks=checks)
    assert_stopped(outcome, checks, "ImportError", "PermissionError", "Operation not permitted")


# -- files -----------------------------------------------------------------------------------------

@CHECKS
def test_files_of_the_machine_cannot_be_read(checks, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret")
    for path in ("/etc/passwd", "/etc/shadow", str(secret), os.path.expanduser("~/.bashrc"), "/proc/1/environ"):
        outcome = attack(f"open({path!r}).read()", checks=checks)
        assert_stopped(outcome, checks, "FileNotFoundError", "PermissionError")


@CHECKS
def test_nothing_outside_scratch_can_be_written(checks, tmp_path):
    target = tmp_path / "written.txt"
    for path in (str(target), "/usr/pwned", "/tmp/pwned", os.path.join(sys.base_prefix, "pwned")):
        outcome = attack(f"open({path!r}, 'w').write('x')", checks=checks)
        assert_stopped(outcome, checks, "FileNotFoundError", "OSError", "PermissionError", "Read-only")
    assert not target.exists() and not os.path.exists("/tmp/pwned")


@CHECKS
def test_device_nodes_and_fifos_cannot_be_made(checks):
    for body in ("import os, stat\nos.mknod('dev', stat.S_IFCHR | 0o600, os.makedev(1, 3))",
                 "import os\nos.mkfifo('pipe')",
                 "import os, stat\nos.mknod('/usr/dev', stat.S_IFREG | 0o600)"):
        outcome = attack(body, checks=checks)
        assert_stopped(outcome, checks, "PermissionError", "Operation not permitted", "OSError")


def test_scratch_is_fresh_and_private_to_each_call():
    first = attack("open('left.txt', 'w').write('x')", checks=True)
    assert first == "ESCAPED"  # writing in scratch is allowed: the positive control of the file tests
    second = attack("open('left.txt').read()", checks=False)
    assert "FileNotFoundError" in second


# -- network ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("layers", [{"checks": True}, {"checks": False}, {"checks": False, "seccomp": False}],
                         ids=["all", "os-boundary-only", "network-namespace-only"])
def test_no_connection_reaches_the_machine(layers):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    try:
        outcome = attack(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)", **layers)
        assert "ESCAPED" not in outcome, outcome
        with pytest.raises(TimeoutError):
            listener.accept()
    finally:
        listener.close()


# -- identity and environment ----------------------------------------------------------------------

def test_the_code_runs_unprivileged_with_a_clean_environment(monkeypatch):
    monkeypatch.setenv("RLXF_TEST_SECRET", "s3cret")
    outcome = attack("import os\nassert os.getuid() != 0 and os.geteuid() != 0\n"
                     "assert 'RLXF_TEST_SECRET' not in os.environ and len(os.listdir('/proc')) == 0", checks=False)
    assert outcome == "ESCAPED" or "FileNotFoundError" in outcome, outcome  # /proc is not even mounted


# -- the reply channel -----------------------------------------------------------------------------

@CHECKS
def test_a_forged_reply_never_becomes_a_value(checks):
    forged = json.dumps({"values": [1e6, "x"], "error": None, "sample_errors": [None, None]})
    for body in (f"print({forged!r})\nimport os\nos._exit(0)",
                 f"import os\nos.write({{fd}}, {forged!r}.encode())\nos._exit(0)"):
        code = ("import os\ndef reward_fn(prompts, completions, **kwargs):\n"
                + textwrap.indent(body.replace("{fd}", "FD"), "    ") + "\n")
        code = code.replace("FD", "int(__import__('sys').argv[-1].split('reply_fd\": ')[1].split(',')[0])")
        result = run_reward_code(code, "reward_fn", ["p", "q"], ["c", "d"], interpreter_checks=checks)
        assert result.values is None or result.values[1] is None, result
        assert result.values is None or result.sample_errors[1] is not None


def test_reply_validation_accepts_only_finite_numbers_or_none():
    reply = json.dumps({"values": [1, 2.5, None, "x", True, [1], {"a": 1}, 1e308 * 10], "error": None})
    reply = reply.replace("Infinity", "Infinity")
    result = validate_reply(reply.encode(), 8)
    assert result.values == [1.0, 2.5, None, None, None, None, None, None]
    assert result.sample_errors[:3] == [None, None, None] and all(result.sample_errors[3:])
    for bad in (b"", b"[1.0]", b"{\"values\": [1.0]}", b"\xff\xfe", b"{\"values\": NaN}", b"[" * 100_000):
        assert validate_reply(bad, 2).values is None


# -- provenance: which files run sandboxed -----------------------------------------------------------

GOOD_BODY = "def reward_fn(prompts, completions, **kwargs):\n    return [1.0 for _ in completions]\n"


def test_the_text2reward_header_means_sandboxed(tmp_path):
    path = tmp_path / "generated.py"
    path.write_text(provenance.HEADER + "\n# Goal: x\n" + GOOD_BODY)
    assert isinstance(get_reward(f"{path}:reward_fn"), SandboxedReward)
    legacy = tmp_path / "legacy.py"
    legacy.write_text(provenance.LEGACY_HEADER + "\n" + GOOD_BODY)
    assert isinstance(get_reward(f"{legacy}:reward_fn"), SandboxedReward)


@pytest.mark.parametrize("head", [
    "# rlxf: sandboxed (reviewed)\n", "#rlxf:sandboxed\n", "\ufeff" + provenance.HEADER + "\n",
    "\ufeff# rlxf: sandboxed\n", "# Written by hand\n" + provenance.HEADER + "\n",
    provenance.HEADER + " \n", "# RLXF-PROVENANCE: model-written\n", "# rlxf: trusted\n"])
def test_a_malformed_header_is_refused_never_run_in_process(tmp_path, head):
    path = tmp_path / "reward.py"
    path.write_text(head + "import os\nos.environ['RLXF_RAN_IN_PROCESS'] = '1'\n" + GOOD_BODY, encoding="utf-8")
    with pytest.raises(RewardError, match="provenance marker"):
        get_reward(f"{path}:reward_fn")
    assert "RLXF_RAN_IN_PROCESS" not in os.environ


def test_a_user_file_without_any_marker_runs_in_process(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text("# my reward for the rlxf demo\n" + GOOD_BODY)
    assert not isinstance(get_reward(f"{path}:reward_fn"), SandboxedReward)


# -- no boundary: refuse, unless the user says so ---------------------------------------------------

def test_without_the_boundary_model_written_code_is_refused(monkeypatch, tmp_path):
    path = tmp_path / "generated.py"
    path.write_text(provenance.HEADER + "\n" + GOOD_BODY)
    monkeypatch.setattr(boundary.shutil, "which", lambda name: None)
    boundary.probe.cache_clear()
    try:
        with pytest.raises(RewardError, match="bubblewrap.*--unsafe-reward-code"):
            get_reward(f"{path}:reward_fn")
        with pytest.raises(RewardError, match="bubblewrap"):
            run_reward_code(GOOD_BODY, "reward_fn", ["p"], ["c"])
        fn = get_reward(f"{path}:reward_fn", unsafe_reward_code=True)  # the explicit opt-out still works
        assert fn(["p"], ["c"]) == [1.0]
    finally:
        boundary.probe.cache_clear()


def test_a_grpo_config_with_a_sandboxed_reward_fails_before_any_model_loads(monkeypatch, tmp_path):
    from rlxf.config import ConfigError
    from rlxf.recipes.grpo import GRPOConfig

    path = tmp_path / "generated.py"
    path.write_text(provenance.HEADER + "\n" + GOOD_BODY)
    monkeypatch.setattr(boundary.shutil, "which", lambda name: None)
    boundary.probe.cache_clear()
    try:
        with pytest.raises(ConfigError, match="--unsafe-reward-code"):
            GRPOConfig(reward=f"{path}:reward_fn")
        GRPOConfig(reward=f"{path}:reward_fn", unsafe_reward_code=True)
    finally:
        boundary.probe.cache_clear()
    bad = tmp_path / "bad.py"
    bad.write_text("# rlxf: sandboxed (reviewed)\n" + GOOD_BODY)
    with pytest.raises(ConfigError, match="provenance marker"):
        GRPOConfig(reward=f"{bad}:reward_fn")


def _processes_with(token: str) -> set[int]:
    """Pids of the python processes whose command line carries ``token`` (bwrap's own excluded)."""
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    argv = handle.read().split(b"\0")
            except OSError:
                continue
            if token.encode() in b" ".join(argv) and b"bwrap" not in os.path.basename(argv[0]):
                pids.add(int(entry))
    return pids


def test_the_attacks_escape_without_any_boundary(tmp_path):
    """Positive control: with no OS boundary and no interpreter checks (``unsafe``, checks off) the same
    attack bodies succeed, so the tests above would see an escape if the boundary let one through."""
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret")
    target = tmp_path / "written.txt"
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    try:
        for body in (f"open({str(secret)!r}).read()", f"open({str(target)!r}, 'w').write('x')",
                     f"import socket\nsocket.create_connection(('127.0.0.1', {listener.getsockname()[1]}))",
                     f"import os\nos.mkfifo({str(tmp_path / 'fifo')!r})"):
            assert attack(body, checks=False, unsafe=True) == "ESCAPED", body
    finally:
        listener.close()
    assert target.read_text() == "x"
