"""``multiplication``: 3-digit × 3-digit products, a task the tiny model cannot do in its head.

Prompt ``"347*829=?"``; answer ``"287663"``; the concise completion is just the answer,
``" #287663"``. The embedded tiny model (0.87M parameters, pre-trained on 2–3-term addition and
subtraction) has never seen long multiplication and scores about 0 on it; with a calculator tool
(``--env calculator``, docs/methods/tools.md) the task becomes: write the tool call, read the
result, copy it after ``#``. A wrong completion is off by a typical slip (a digit dropped or a
neighbouring product), so correctness pairs exist as for the other tasks.
"""

from __future__ import annotations

import random

from rlxf.tasks.base import Problem, Task


class MultiplicationTask(Task):
    name = "multiplication"
    description = "3-digit × 3-digit products (solved with a calculator tool); final answer after '#'"

    def __init__(self, low: int = 100, high: int = 999):
        if not 1 <= low <= high:
            raise ValueError(f"multiplication: need 1 <= low <= high, got {low}, {high}")
        self.low, self.high = low, high

    def sample(self, rng: random.Random) -> Problem:
        a, b = rng.randint(self.low, self.high), rng.randint(self.low, self.high)
        return Problem(prompt=f"{a}*{b}=?", answer=str(a * b), data=(a, b))

    def solve(self, problem: Problem, *, verbose: bool, rng: random.Random | None = None,
              wrong: bool = False) -> str:
        a, b = problem.data
        rng = rng or random.Random(problem.prompt)
        value = a * b
        if wrong:  # a neighbouring product (one operand off by one) or the last digit dropped
            value = (a + rng.choice((-1, 1))) * b if rng.random() < 0.5 else value // 10
        if verbose:
            return f" We multiply {a} by {b}. The product is #{value}"
        return f" #{value}"

    def answers_match(self, predicted: str, answer: str) -> bool:
        try:
            return int(predicted.strip()) == int(answer)
        except ValueError:
            return False
