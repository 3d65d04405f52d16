"""The seccomp filter of the sandbox: which system calls untrusted code may make.

An allow-list, compiled to classic BPF by libseccomp (through ``pyseccomp``) in the parent and
installed by the sandboxed child itself, after the interpreter has started and loaded every module
it may use, and before the first line of untrusted code runs. Any call not listed fails with
``EPERM``; a call made through another architecture's ABI (``int 0x80``, x32) kills the process.

What the list leaves out, and so refuses: ``execve``/``execveat``; ``fork``/``vfork``/``clone``/
``clone3`` (no processes, no threads); ``ptrace``, ``process_vm_*``; ``kill``/``tkill``/``tgkill``/
``pidfd_*``/``rt_*sigqueueinfo`` (no signals to anyone); every socket call; ``mknod``/``mknodat``
(no device nodes or FIFOs); ``mount``, ``unshare``, ``setns``, ``chroot``, ``pivot_root``; the
``set*id`` family; ``prctl`` and ``seccomp``; ``bpf``, ``perf_event_open``, ``userfaultfd``,
``io_uring_*``, ``keyctl``, ``memfd_create``; ``chmod``/``chown`` and links. ``mmap``, ``mprotect``
and ``pkey_mprotect`` are allowed only without ``PROT_EXEC``: no new native code can be mapped, so
loading an extension module or a ``.so`` written to scratch fails. ``ioctl`` is allowed only for
``TCGETS`` (how ``isatty`` asks).
"""

from __future__ import annotations

import functools
import tempfile

PROT_EXEC = 0x4
TCGETS = 0x5401

# Calls a CPython interpreter makes while running pure-Python code on files in its scratch directory.
ALLOWED = (
    # memory
    "brk", "munmap", "mremap", "madvise",
    # files (the mount namespace decides which ones exist and are writable)
    "read", "write", "readv", "writev", "pread64", "pwrite64", "close", "close_range", "lseek",
    "open", "openat", "openat2", "creat", "stat", "fstat", "lstat", "newfstatat", "statx", "statfs", "fstatfs",
    "getdents64", "getcwd", "chdir", "fchdir", "readlink", "readlinkat", "access", "faccessat", "faccessat2",
    "fcntl", "dup", "dup2", "dup3", "mkdir", "mkdirat", "unlink", "unlinkat", "rmdir", "rename", "renameat",
    "renameat2", "ftruncate", "truncate", "fsync", "fdatasync", "utimensat", "umask", "pipe", "pipe2",
    "poll", "ppoll", "select", "pselect6",
    # the interpreter's own housekeeping
    "futex", "getrandom", "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack", "restart_syscall",
    "exit", "exit_group", "rseq", "set_robust_list", "set_tid_address", "sched_yield", "sched_getaffinity",
    "getpid", "gettid", "getppid", "getuid", "geteuid", "getgid", "getegid", "getresuid", "getresgid",
    "getgroups", "uname", "sysinfo", "getrusage", "times", "getrlimit", "prlimit64",
    "clock_gettime", "clock_getres", "gettimeofday", "time", "nanosleep", "clock_nanosleep",
)
NO_EXEC_MAPPING = ("mmap", "mprotect", "pkey_mprotect")


@functools.lru_cache(maxsize=1)
def filter_program() -> bytes:
    """The compiled filter (a ``struct sock_filter`` array, 8 bytes an instruction) for this machine's
    architecture. Raises ``OSError``/``ImportError`` when libseccomp or ``pyseccomp`` is missing."""
    import pyseccomp as seccomp

    filt = seccomp.SyscallFilter(seccomp.ERRNO(1))  # EPERM for anything not listed
    filt.set_attr(seccomp.Attr.ACT_BADARCH, seccomp.KILL_PROCESS)
    for name in ALLOWED:
        _allow(filt, seccomp, name)
    for name in NO_EXEC_MAPPING:
        _allow(filt, seccomp, name, seccomp.Arg(2, seccomp.MASKED_EQ, PROT_EXEC, 0))
    _allow(filt, seccomp, "ioctl", seccomp.Arg(1, seccomp.EQ, TCGETS))
    with tempfile.TemporaryFile() as handle:
        filt.export_bpf(handle)
        handle.seek(0)
        program = handle.read()
    if not program or len(program) % 8:
        raise OSError(f"libseccomp exported a filter of {len(program)} bytes, not a whole number of instructions")
    return program


def _allow(filt, seccomp, name: str, *args) -> None:
    try:
        filt.add_rule(seccomp.ALLOW, name, *args)
    except (OSError, ValueError, RuntimeError) as err:
        # a call this architecture does not have (e.g. "open" on aarch64) is simply not allowed
        if _resolves(seccomp, name):
            raise OSError(f"seccomp: could not allow {name!r}: {err}") from err


def _resolves(seccomp, name: str) -> bool:
    try:
        return seccomp.resolve_syscall(seccomp.system_arch(), name) >= 0
    except (OSError, ValueError, RuntimeError):
        return False

