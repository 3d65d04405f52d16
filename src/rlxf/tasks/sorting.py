"""``sorting``: sort a list of small integers ascending.

Prompt ``"sort 52 7 19 3=?"``; concise completion ``" #3 7 19 52"``; the verbose style names the
elements in order before the answer. A wrong answer swaps two neighbours or drops an element.
"""

from __future__ import annotations

import random

from rlxf.tasks.base import Problem, Task


class SortingTask(Task):
    name = "sorting"
    description = "sort 3-6 integers (0-99) ascending; final answer after '#'"

    def __init__(self, min_items: int = 3, max_items: int = 6, max_value: int = 99):
        if not 2 <= min_items <= max_items:
            raise ValueError(f"sorting: need 2 <= min_items <= max_items, got {min_items}, {max_items}")
        self.min_items, self.max_items, self.max_value = min_items, max_items, max_value

    def sample(self, rng: random.Random) -> Problem:
        n = rng.randint(self.min_items, self.max_items)
        items = rng.sample(range(self.max_value + 1), n)  # distinct, so a swap always changes the answer
        return Problem(prompt="sort " + " ".join(map(str, items)) + "=?",
                       answer=" ".join(map(str, sorted(items))), data=tuple(items))

    def solve(self, problem: Problem, *, verbose: bool, rng: random.Random | None = None,
              wrong: bool = False) -> str:
        ordered = sorted(problem.data)
        rng = rng or random.Random(problem.prompt)
        if wrong:
            if rng.random() < 0.7:
                i = rng.randrange(len(ordered) - 1)
                ordered[i], ordered[i + 1] = ordered[i + 1], ordered[i]
            else:
                del ordered[rng.randrange(len(ordered))]
        answer = " ".join(map(str, ordered))
        if not verbose:
            return f" #{answer}"
        words = ["The smallest is", *(["then"] * (len(ordered) - 1))]
        listing = ", ".join(f"{w} {v}" for w, v in zip(words, ordered))
        return f" Let me order them from small to large. {listing}. So the sorted list is #{answer}"

    def answers_match(self, predicted: str, answer: str) -> bool:
        return predicted.split() == answer.split()
