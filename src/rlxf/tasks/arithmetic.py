"""``arithmetic``: multi-step integer addition/subtraction with a worked solution.

Prompt ``"23+45-12=?"``; concise completion ``" 23+45=68, 68-12=56. #56"``; the verbose style wraps
the same steps in filler sentences. A wrong solution has one of two realistic faults, drawn 50/50:
a *step slip* — one step's result is off by a typical slip (±1, ±2, ±9, ±10, ±11) and the error
is carried to the end — or a *final-answer slip* — every step is right but the answer written
after ``#`` is off by a slip (a copy error). Both make the final answer wrong.
"""

from __future__ import annotations

import random

from rlxf.tasks.base import Problem, Task

_SLIPS = (1, 2, 9, 10, 11)
_OPENERS = ("Let me work it out step by step.", "Let's compute this carefully, one step at a time.",
            "We go left to right.")
_LINKS = ("First,", "Then", "Next,", "After that,")
_CLOSERS = ("So the final answer is", "Therefore the result is", "The answer is")


class ArithmeticTask(Task):
    name = "arithmetic"
    description = "multi-step integer + and - with a worked solution; final answer after '#'"

    def __init__(self, min_terms: int = 2, max_terms: int = 3, max_value: int = 99):
        if not 2 <= min_terms <= max_terms:
            raise ValueError(f"arithmetic: need 2 <= min_terms <= max_terms, got {min_terms}, {max_terms}")
        self.min_terms, self.max_terms, self.max_value = min_terms, max_terms, max_value

    def sample(self, rng: random.Random) -> Problem:
        n = rng.randint(self.min_terms, self.max_terms)
        values = [rng.randint(1, self.max_value) for _ in range(n)]
        ops = [rng.choice("+-") for _ in range(n - 1)]
        prompt = str(values[0]) + "".join(f"{op}{v}" for op, v in zip(ops, values[1:])) + "=?"
        return Problem(prompt=prompt, answer=str(_evaluate(values, ops, None)[-1]), data=(tuple(values), tuple(ops)))

    def solve(self, problem: Problem, *, verbose: bool, rng: random.Random | None = None,
              wrong: bool = False) -> str:
        values, ops = problem.data
        rng = rng or random.Random(problem.prompt)
        slip, final_slip = None, 0
        if wrong:
            delta = rng.choice(_SLIPS) * rng.choice((-1, 1))
            if rng.random() < 0.5:
                slip = (rng.randrange(len(ops)), delta)
            else:
                final_slip = delta
        results = _evaluate(values, ops, slip)
        final = results[-1] + final_slip
        steps, left = [], values[0]
        for op, v, res in zip(ops, values[1:], results):
            steps.append(f"{left}{op}{v}={res}")
            left = res
        if not verbose:
            return " " + ", ".join(steps) + f". #{final}"
        parts = [rng.choice(_OPENERS)]
        for i, step in enumerate(steps):
            parts.append(f"{_LINKS[min(i, len(_LINKS) - 1)]} {step}.")
        parts.append(f"{rng.choice(_CLOSERS)} #{final}")
        return " " + " ".join(parts)

    def answers_match(self, predicted: str, answer: str) -> bool:
        try:
            return int(predicted.strip()) == int(answer)
        except ValueError:
            return False


def _evaluate(values, ops, slip) -> list[int]:
    """Left-to-right running results; ``slip=(step, delta)`` adds ``delta`` at that step."""
    out, acc = [], values[0]
    for i, (op, v) in enumerate(zip(ops, values[1:])):
        acc = acc + v if op == "+" else acc - v
        if slip is not None and slip[0] == i:
            acc += slip[1]
        out.append(acc)
    return out
