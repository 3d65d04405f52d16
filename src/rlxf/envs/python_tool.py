"""The ``python`` environment: the model runs Python code behind the OS sandbox (docs/security.md).

The model calls the tool by writing ``<python>CODE</python>``; the code runs in a fresh sandbox
process (:func:`rlxf.rewards.sandbox.run_reward_code`: bubblewrap namespaces with no network, a
read-only filesystem and a scratch directory, an unprivileged uid, the seccomp allow-list, memory,
CPU-time and output limits, a kill on timeout; only the standard-library modules of
:data:`rlxf.sandbox.ALLOWED_MODULES` import) and what it printed comes back as the observation, the
last ``max_observation_chars`` characters of it, followed by ``error: …`` when it failed or hit a
limit. Nothing the code does reaches the training process except that text. Where the machine
cannot give the boundary, the environment refuses to start unless ``unsafe=True``
(``--unsafe-reward-code``).
"""

from __future__ import annotations

import re

from rlxf.envs.base import ToolEnv
from rlxf.rewards.base import RewardError
from rlxf.rewards.sandbox import run_reward_code
from rlxf.sandbox import boundary

CALL_RE = re.compile(r"<python>(.*?)</python>", re.DOTALL)
_DONE = "\n\ndef rlxf_tool_done(prompts, completions):\n    return [0.0]\n"


class PythonEnv(ToolEnv):
    """One episode with a sandboxed Python tool (the ``Environment`` interface of
    :mod:`rlxf.rollout.multiturn`): the first ``<python>…</python>`` block of a turn runs and what it
    printed is the observation; a turn without one ends the episode (:class:`ToolEnv`).
    ``timeout`` (wall seconds per call), ``memory_mb`` and ``max_code_chars`` bound each call."""

    CALL_RE = CALL_RE

    def __init__(self, *, timeout: float = 5.0, memory_mb: int = 256, max_code_chars: int = 4000,
                 max_observation_chars: int = 400, unsafe: bool = False, system_prompt: str | None = None):
        if not unsafe:
            try:
                boundary.require()
            except boundary.SandboxUnavailable as err:
                raise RewardError(f"--env python runs model-written code and needs the OS sandbox: {err}") from err
        super().__init__(system_prompt)
        self.timeout, self.memory_mb, self.unsafe = timeout, memory_mb, unsafe
        self.max_code_chars, self.max_observation_chars = max_code_chars, max_observation_chars

    def run(self, call: str) -> str:
        if len(call) > self.max_code_chars:
            return f"error: code longer than {self.max_code_chars} characters"
        result = run_reward_code(call + _DONE, "rlxf_tool_done", [""], [""], timeout=self.timeout,
                                 memory_mb=self.memory_mb, max_output_bytes=64_000, unsafe=self.unsafe)
        text = result.stdout_tail
        if result.error is not None:
            text += ("\n" if text and not text.endswith("\n") else "") + f"error: {result.error.splitlines()[-1]}"
        return text[-self.max_observation_chars:]

    def call_text(self, expression: str) -> str:
        return f"<python>print({expression})</python>"

    def demo_observation(self, value: int | float) -> str:
        return f"{value}\n"   # what print() writes: safe_eval computes with Python's own operators
