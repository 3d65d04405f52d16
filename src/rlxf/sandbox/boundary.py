"""The operating-system boundary around untrusted code: bubblewrap namespaces + a seccomp filter.

:func:`isolated_command` wraps ``python -I -S -c CHILD`` in ``bwrap`` so that the child:

- has its own PID, network, IPC, UTS and (where the kernel allows) cgroup namespaces: it sees no
  other process, has no network interface but a down loopback, and everything it could start
  dies with it (``--die-with-parent``: killing ``bwrap`` tears the PID namespace down);
- sees a new root filesystem: ``/usr``, the interpreter's prefix and the ``/bin``, ``/lib*``
  links read-only, a minimal ``/dev`` (null, zero, random, urandom, tty), no ``/etc``, ``/home``,
  ``/root``, ``/proc`` or ``/tmp`` of the machine, and one fresh, size-limited tmpfs ``/scratch``
  (its working directory, gone when it exits); the root is remounted read-only;
- keeps no capability: as root, ``bwrap`` keeps only ``CAP_SETUID``/``CAP_SETGID`` so that the
  child can switch to uid/gid 65534 (``nobody``) before anything else, which clears those too;
  as another user, ``bwrap`` uses an unprivileged user namespace and the child runs as that user;
- then sets ``PR_SET_NO_NEW_PRIVS`` and installs :func:`rlxf.sandbox.syscalls.filter_program`
  (no exec, fork, threads, signals, sockets, ptrace, device nodes or executable mappings).

:func:`probe` says whether this machine can do all of that (cached); :class:`SandboxUnavailable`
names what is missing and how to get it.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys

UNPRIVILEGED_ID = 65534  # nobody / nogroup
SCRATCH = "/scratch"
_LINKED_ROOT_DIRS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")


class SandboxUnavailable(RuntimeError):
    """This machine cannot put untrusted code behind the OS boundary; the message says what is missing."""


def interpreter() -> tuple[str, str]:
    """(the base interpreter's real path, its installation prefix): what the child runs and needs."""
    executable = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    return executable, os.path.realpath(sys.base_prefix)


def isolated_command(child_args: list[str], *, scratch_mb: int) -> list[str]:
    """``bwrap ... -- PYTHON -I -S ARGS``: the child command line behind the boundary."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailable(_missing_bwrap())
    executable, prefix = interpreter()
    args = [bwrap, "--die-with-parent", "--new-session",
            "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
            "--ro-bind", "/usr", "/usr"]
    made = set()
    for path in sorted({prefix, os.path.dirname(executable)}):
        if _under(path, "/usr"):
            continue
        for parent in _ancestors(path):  # traversable whatever the host's modes (e.g. /root is 0700)
            if parent not in made:
                made.add(parent)
                args += ["--perms", "0755", "--dir", parent]
        args += ["--ro-bind", path, path]
    for path in _LINKED_ROOT_DIRS:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    args += ["--dev", "/dev", "--perms", "1777", "--size", str(scratch_mb * 1024 * 1024), "--tmpfs", SCRATCH,
             "--chdir", SCRATCH, "--remount-ro", "/",
             "--clearenv", "--setenv", "HOME", SCRATCH, "--setenv", "TMPDIR", SCRATCH,
             "--setenv", "LC_ALL", "C.UTF-8", "--setenv", "PATH", "/usr/bin:/bin", "--cap-drop", "ALL"]
    if os.geteuid() == 0:
        args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        args += ["--unshare-user"]
    return args + ["--", executable, "-I", "-S", *child_args]


def drop_ids() -> list[int] | None:
    """[uid, gid] the child switches to before running anything untrusted (root only), else None."""
    return [UNPRIVILEGED_ID, UNPRIVILEGED_ID] if os.geteuid() == 0 else None


@functools.lru_cache(maxsize=1)
def probe() -> str | None:
    """None when untrusted code can run behind the boundary here; else what is missing (cached)."""
    if not sys.platform.startswith("linux"):
        return (f"this is {sys.platform}: the sandbox needs Linux namespaces (bubblewrap) and seccomp, "
                "which this system does not have")
    if shutil.which("bwrap") is None:
        return _missing_bwrap()
    try:
        from rlxf.sandbox.syscalls import filter_program

        filter_program()
    except (ImportError, OSError, AttributeError) as err:
        return (f"the seccomp filter could not be built ({type(err).__name__}: {err}); install libseccomp "
                "(Debian/Ubuntu: apt-get install libseccomp2) and the Python package pyseccomp")
    try:
        done = subprocess.run(isolated_command(["-c", "pass"], scratch_mb=1), capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"bubblewrap could not start ({type(err).__name__}: {err})"
    if done.returncode != 0:
        reason = done.stderr.decode(errors="replace").strip().splitlines()
        return ("bubblewrap could not create the namespaces it needs (" + (reason[-1] if reason else
                f"exit code {done.returncode}") + "); this is typical of a container that forbids user or "
                "mount namespaces: allow them (e.g. sysctl kernel.unprivileged_userns_clone=1, or run the "
                "container with namespaces allowed)")
    return None


def require() -> None:
    """Raise :class:`SandboxUnavailable` unless :func:`probe` passes."""
    reason = probe()
    if reason is not None:
        raise SandboxUnavailable(f"untrusted code cannot be isolated on this machine: {reason}. rlxf refuses to "
                                 "run model-written code without that boundary; pass --unsafe-reward-code "
                                 "(Python: unsafe=True) to run it with interpreter-level checks only, at your "
                                 "own risk (docs/security.md)")


def _missing_bwrap() -> str:
    return ("bubblewrap (the bwrap program) is not installed; install it (Debian/Ubuntu: apt-get install "
            "bubblewrap; Fedora: dnf install bubblewrap; `make test` installs it when run as root)")


def _ancestors(path: str) -> list[str]:
    """``/a/b/c`` -> ``["/a", "/a/b"]``."""
    parts = path.strip("/").split("/")[:-1]
    return ["/" + "/".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")
