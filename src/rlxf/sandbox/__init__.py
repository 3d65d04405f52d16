"""Running untrusted, model-written code behind an operating-system boundary (docs/security.md).

- :mod:`rlxf.sandbox.boundary` — the bubblewrap command line (namespaces, read-only filesystem,
  tmpfs scratch, no capabilities), the unprivileged ids, and :func:`probe`/:func:`require`, which
  say whether this machine can isolate code at all;
- :mod:`rlxf.sandbox.syscalls` — the seccomp allow-list, compiled with libseccomp;
- :mod:`rlxf.sandbox.provenance` — the strict header that marks files written by
  ``rlxf text2reward``;
- ``_child.py`` — the standard-library program that runs inside, locks itself down and replies on
  a dedicated pipe.

The reward-facing API (run one batch of reward code, a sandboxed reward function) is
:mod:`rlxf.rewards.sandbox`.
"""

# the standard-library modules model-written reward code may import (imported before the lock-down)
ALLOWED_MODULES = ("math", "re", "statistics", "string", "collections", "itertools", "functools", "json",
                   "difflib", "unicodedata", "fractions", "decimal")

from rlxf.sandbox.boundary import SandboxUnavailable, probe, require
from rlxf.sandbox.provenance import ProvenanceError, classify

__all__ = ["ALLOWED_MODULES", "ProvenanceError", "SandboxUnavailable", "classify", "probe", "require"]
