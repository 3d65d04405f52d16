"""What the built-in tool environments share (docs/methods/tools.md): the opening, one tool call
per turn found by a pattern, and demonstrations of the call for the SFT warm-up."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod


class ToolEnv(ABC):
    """One episode with a tool: ``reset(row)`` opens with the row's ``prompt`` as the user message
    (after ``system_prompt`` when given); ``step(turn)`` runs the first call of the turn that
    ``CALL_RE`` finds and returns what :meth:`run` made of it, or ends the episode when the turn has
    no call (it is the final answer). Step rewards are 0: ``--reward`` scores the final answer, so
    the tool itself pays nothing. Subclasses set ``CALL_RE`` and implement :meth:`run`, :meth:`call_text` and :meth:`demo_observation`."""

    CALL_RE: re.Pattern = re.compile(r"<tool>(.*?)</tool>", re.DOTALL)

    def __init__(self, system_prompt: str | None = None):
        self.system_prompt = system_prompt

    def reset(self, row: dict) -> list[dict]:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return messages + [{"role": "user", "content": str(row["prompt"])}]

    def step(self, turn: str) -> tuple[str | None, float, bool]:
        match = self.CALL_RE.search(turn)
        if match is None:
            return None, 0.0, True
        return self.run(match.group(1)), 0.0, False

    @abstractmethod
    def run(self, call: str) -> str:
        """The observation for one call's text."""

    @abstractmethod
    def call_text(self, expression: str) -> str:
        """The model turn that asks the tool to compute ``expression`` (for demonstrations)."""

    @abstractmethod
    def demo_observation(self, value: int | float) -> str:
        """What the tool answers to :meth:`call_text` (for demonstrations, without running the tool)."""

    def demonstration(self, row: dict) -> list[dict] | None:
        """The worked conversation for a row whose prompt is an arithmetic expression followed by
        ``=?`` (the built-in tasks' form): the call, the tool's real output, ``#<value>``; None for
        other rows."""
        from rlxf.envs.calculator import CalculatorError, format_value, safe_eval

        expression = str(row.get("prompt", "")).strip()
        if not expression.endswith("=?") or not re.fullmatch(r"[0-9+\-*/() ]+", expression[:-2]):
            return None
        expression = expression[:-2]
        try:
            value = safe_eval(expression)
        except CalculatorError:
            return None
        return self.reset(row) + [{"role": "assistant", "content": self.call_text(expression)},
                                  {"role": "tool", "content": self.demo_observation(value)},
                                  {"role": "assistant", "content": f"#{format_value(value)}"}]
