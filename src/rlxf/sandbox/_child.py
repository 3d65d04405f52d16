"""The child side of the sandbox (see ``rlxf.sandbox`` and ``rlxf.rewards.sandbox``). Standard library only.

The parent runs this file's text as ``python -I -S -c <text> <limits-json>`` — behind the OS
boundary (``rlxf.sandbox.boundary``: bubblewrap namespaces, a tmpfs scratch as working directory)
unless the user chose ``unsafe`` — sends one JSON request on stdin ``{"code", "function",
"prompts", "completions", "fields", "lockdown"}`` and reads one JSON reply
``{"values", "error", "sample_errors", "stdout", "seconds"}`` from the dedicated pipe whose
descriptor is ``limits["reply_fd"]`` (never from stdout, which the code may write to). The parent
trusts nothing in the reply: it validates every value (``rlxf.rewards.sandbox``).

Order matters: resource limits -> read the request -> import the allowed modules -> lock down
(switch to the unprivileged uid/gid, ``PR_SET_NO_NEW_PRIVS``, the seccomp filter) -> install the
audit hook (when ``interpreter_checks``) -> compile and run the untrusted code -> call it (batch,
then one sample at a time if the batch raised) -> reply. Everything the untrusted code can reach
runs after the lock-down.
"""

import sys

# codecs the generated code may ask for; preloaded so most codec lookups need no import
PRELOADED_CODECS = ("ascii", "latin_1", "utf_16", "utf_32", "unicode_escape", "raw_unicode_escape")
CODE_FILENAME = "<reward_code>"
# audit events refused outright (prefix match): processes, network, native code, file-system changes
DENIED_PREFIXES = ("os.", "subprocess.", "socket.", "shutil.", "ctypes.", "pty.", "fcntl.", "mmap.", "resource.",
                   "signal.", "_thread.", "sys.addaudithook", "setopencodehook", "code.__new__", "builtins.input",
                   "builtins.breakpoint", "webbrowser.", "urllib.", "http.", "ftplib.", "smtplib.", "poplib.",
                   "imaplib.", "nntplib.", "telnetlib.", "sqlite3.", "syslog.", "glob.", "tempfile.", "pickle.",
                   "winreg.", "_winapi.", "msvcrt.")
IMPORT_MACHINERY = ("_frozen_importlib", "_frozen_importlib_external", "zipimport")
TAIL_CHARS = 4000


class SandboxViolation(PermissionError):
    """Raised inside the sandbox when the code tries something the sandbox forbids."""


class SandboxImportError(ImportError):
    """Raised inside the sandbox when the code imports a module that is not allowed."""


class _Tail:
    """A text stream that keeps only the last ``TAIL_CHARS`` characters written (bounded memory)."""

    def __init__(self):
        self.text = ""

    def write(self, text):
        self.text = (self.text + str(text))[-TAIL_CHARS:]
        return len(text)

    def flush(self):
        pass


def main():
    import json
    import os
    import resource
    import time

    limits = json.loads(sys.argv[1])
    _set_limits(resource, limits)
    request = json.loads(sys.stdin.buffer.read())
    for name in limits["allowed_modules"]:
        __import__(name)
    for name in PRELOADED_CODECS:
        __import__("encodings." + name)
    reply_fd = int(limits["reply_fd"])
    scratch = os.path.realpath(os.getcwd())
    stdlib_roots = tuple(os.path.realpath(p) for p in sys.path if p)
    if request.get("lockdown"):
        _lock_down(os, request["lockdown"])
    capture = _Tail()
    sys.stdout = sys.stderr = capture
    if limits.get("interpreter_checks", True):
        sys.addaudithook(_make_guard(os, scratch, stdlib_roots, tuple(limits["allowed_modules"])))

    start = time.perf_counter()
    try:
        reply = _run(request)
        reply["seconds"] = time.perf_counter() - start
        reply["stdout"] = capture.text
        data = json.dumps(reply, default=repr).encode()
        if len(data) > limits["max_output_bytes"]:
            data = json.dumps({"values": None, "error": f"the reply is {len(data)} bytes, over the limit of "
                               f"{limits['max_output_bytes']}; return one number per completion",
                               "sample_errors": [], "stdout": capture.text[-500:]}).encode()
    except BaseException as exc:  # noqa: BLE001 - e.g. memory exhausted, or the code broke json itself
        data = ('{"values": null, "error": "the sandbox could not build its reply (%s)", "sample_errors": []}'
                % type(exc).__name__).encode()
    view = memoryview(data)
    while view:
        view = view[os.write(reply_fd, view):]


def _set_limits(resource, limits):
    mb = 1024 * 1024
    cpu = int(limits["cpu_seconds"])
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_mb"] * mb, limits["memory_mb"] * mb))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_mb"] * mb, limits["file_mb"] * mb))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    if hasattr(resource, "RLIMIT_NPROC"):  # no new processes or threads (not enforced for root)
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))


def _lock_down(os, lockdown):
    """Become unprivileged and install the seccomp filter; from here on the OS refuses what the
    filter does not list, whatever the code does in the interpreter."""
    import base64
    import ctypes

    ids = lockdown.get("drop_to")
    if ids:
        os.setgroups([])
        os.setresgid(ids[1], ids[1], ids[1])
        os.setresuid(ids[0], ids[0], ids[0])
        if os.getresuid() != (ids[0],) * 3 or os.getresgid() != (ids[1],) * 3:
            raise SystemExit("sandbox: could not switch to the unprivileged user")
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_no_new_privs, pr_set_seccomp, seccomp_mode_filter = 38, 22, 2
    if libc.prctl(pr_set_no_new_privs, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "sandbox: prctl(PR_SET_NO_NEW_PRIVS) failed")
    if not lockdown.get("seccomp"):  # only when testing the namespaces on their own
        return
    program = base64.b64decode(lockdown["seccomp"])

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = SockFprog(len(program) // 8, ctypes.addressof(buffer))
    if libc.prctl(pr_set_seccomp, seccomp_mode_filter, ctypes.byref(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "sandbox: installing the seccomp filter failed")
    for name in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[name]


def _make_guard(os, scratch, stdlib_roots, allowed_modules):
    """The audit hook: refuse processes, network, native code and files outside ``scratch``."""
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def inside(path, roots):
        return any(path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in roots)

    def from_import_machinery():
        frame = sys._getframe(1)
        while frame is not None and frame.f_code in own_code:  # skip the guard's own frames
            frame = frame.f_back
        return frame is not None and frame.f_globals.get("__name__") in IMPORT_MACHINERY

    def check_path(verb, path, writing):
        if isinstance(path, int):
            raise SandboxViolation(f"sandbox: {verb} file descriptor {path} is not allowed")
        real = os.path.realpath(os.fsdecode(path))
        if inside(real, (scratch,)):
            return
        if not writing and inside(real, stdlib_roots) and from_import_machinery():
            return  # the import system reading the standard library (lazy codec imports)
        raise SandboxViolation(f"sandbox: {verb} {os.fsdecode(path)!r} is not allowed; reward code may only "
                               "use files in its scratch working directory")

    def guard(event, args):
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & write_flags)
            check_path("writing" if writing else "reading", path, writing)
        elif event in ("os.listdir", "os.scandir"):
            check_path("listing", args[0] if args[0] is not None else ".", False)
        elif event == "import":
            name = args[0]
            if not (name.split(".")[0] in allowed_modules or name.startswith("encodings.")):
                raise SandboxImportError(f"sandbox: importing {name!r} is not allowed; reward code may import "
                                         f"only {', '.join(allowed_modules)}")
        elif event in ("marshal.loads", "marshal.load"):
            if not from_import_machinery():
                raise SandboxViolation(f"sandbox: {event} is not allowed")
        elif event.startswith(DENIED_PREFIXES):
            raise SandboxViolation(f"sandbox: {event} is not allowed (no processes, network, native code or "
                                   "file-system changes in reward code)")

    own_code = {guard.__code__, check_path.__code__, from_import_machinery.__code__}
    return guard


def _run(request):
    import math
    import numbers

    code, name = request["code"], request["function"]
    prompts, completions, fields = request["prompts"], request["completions"], request["fields"]
    reply = {"values": None, "error": None, "sample_errors": []}
    lines = code.splitlines()
    namespace = {"__name__": "reward_code"}
    try:
        exec(compile(code, CODE_FILENAME, "exec"), namespace)
    except BaseException as exc:  # noqa: BLE001 - reported to the caller
        reply["error"] = "the code failed to load: " + _describe(exc, lines)
        return reply
    fn = namespace.get(name)
    if not callable(fn):
        defined = sorted(k for k, v in namespace.items() if callable(v) and not k.startswith("_"))
        reply["error"] = f"the code defines no function {name!r} (functions defined: {', '.join(defined) or 'none'})"
        return reply
    n = len(prompts)

    def convert(returned, expected):
        """(values, per-sample problems), or (None, what is wrong with the returned object)."""
        if isinstance(returned, (str, bytes, dict)) or not hasattr(returned, "__len__"):
            return None, f"{name} returned {type(returned).__name__}, expected a list of {expected} floats"
        returned = list(returned)
        if len(returned) != expected:
            return None, (f"{name} returned {len(returned)} values for {expected} completions; return exactly "
                          "one float per completion, in order")
        values, problems = [], []
        for value in returned:
            if value is None or (isinstance(value, numbers.Real) and not isinstance(value, bool)):
                values.append(None if value is None else float(value))
                problems.append(None if value is None or math.isfinite(float(value)) else f"returned {value}")
            else:
                values.append(None)
                problems.append(f"returned {type(value).__name__} {value!r:.60}, expected a float or None")
        return values, problems

    try:
        values, problems = convert(fn(prompts, completions, **fields), n)
    except BaseException as exc:  # noqa: BLE001 - isolate the samples below
        reply["error"] = f"{name} raised on the batch of {n}: " + _describe(exc, lines)
        values, problems = [], []
        for i in range(n):
            one = {key: [column[i]] for key, column in fields.items()}
            try:
                value, problem = convert(fn([prompts[i]], [completions[i]], **one), 1)
            except BaseException as sample_exc:  # noqa: BLE001 - this sample gets None
                value, problem = None, _describe(sample_exc, lines)
            values.append(None if value is None else value[0])
            problems.append(problem if value is None else problem[0])
    if values is None:
        reply["error"] = problems
        return reply
    reply["values"], reply["sample_errors"] = values, problems
    return reply


def _describe(exc, lines):
    """``Type: message (line N: source)`` pointing at the last line of the reward code involved."""
    try:
        message = str(exc) or ("the memory limit was reached" if isinstance(exc, MemoryError) else "")
    except BaseException:  # noqa: BLE001 - an exception whose __str__ fails still gets reported
        message = "(its message could not be read)"
    text = f"{type(exc).__name__}: {message}"
    if isinstance(exc, SyntaxError) and exc.filename == CODE_FILENAME:
        return text
    lineno, tb = None, exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == CODE_FILENAME:
            lineno = tb.tb_lineno
        tb = tb.tb_next
    if lineno is not None and 0 < lineno <= len(lines):
        text += f" (line {lineno}: {lines[lineno - 1].strip()[:120]})"
    return text


if __name__ == "__main__":
    main()
