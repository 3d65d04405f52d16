"""The built-in task contract.

A task is a seeded generator of problems with a verifier. From one problem it can write every
kind of training row rlxf needs:

- prompt rows for online RL: ``{"prompt", "answer", "reference"}``; ``answer`` is what the verifier
  compares with, ``reference`` is a full reference completion (for likelihood rewards);
- SFT rows: ``{"prompt", "completion"}``;
- preference rows: ``{"prompt", "chosen", "rejected", "chosen_score", "rejected_score", "pair_kind"}``.

Completions come in two styles (concise and verbose) and can carry an arithmetic/ordering error, so
a task yields correct-vs-incorrect pairs and concise-vs-verbose pairs with scalar scores for RPO.
Every completion ends with the final-answer marker ``#<answer>``; :func:`extract_answer` reads it.

Train and eval problems never overlap: a problem belongs to the eval split when a stable hash of its
prompt falls in the eval bucket (1 in ``EVAL_BUCKETS``), whatever seed generated it.
"""

from __future__ import annotations

import hashlib
import random
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass

EVAL_BUCKETS = 8
SPLITS = ("train", "eval")
PAIR_KINDS = ("mixed", "correctness", "conciseness")
_ANSWER_RE = re.compile(r"#\s*([^\n#]*?)\s*$")


def extract_answer(completion: str) -> str | None:
    """Return the text after the last ``#`` marker (stripped), or None when there is no marker."""
    cut = completion.find("\n\n")  # a model that rambles past its answer is judged on the first block
    text = completion if cut < 0 else completion[:cut]
    idx = text.rfind("#")
    if idx < 0:
        return None
    match = _ANSWER_RE.search(text[idx:])
    return match.group(1) if match else None


def completion_score(correct: bool, verbose: bool) -> float:
    """Scalar quality used for RPO targets: correctness dominates, verbosity costs 0.4.

    correct+concise 1.0 > correct+verbose 0.6 > incorrect+concise 0.0 > incorrect+verbose -0.4.
    """
    return (1.0 if correct else 0.0) - (0.4 if verbose else 0.0)


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str
    data: tuple  # task-specific parameters (operands, items ...)


class Task(ABC):
    """Base class: subclasses implement ``sample`` and ``solve``."""

    name = "task"
    description = ""

    # -- to implement -------------------------------------------------------------------------
    @abstractmethod
    def sample(self, rng: random.Random) -> Problem:
        """Draw one problem."""

    @abstractmethod
    def solve(self, problem: Problem, *, verbose: bool, rng: random.Random | None = None,
              wrong: bool = False) -> str:
        """Return a completion; ``wrong=True`` injects an error that makes the final answer wrong."""

    def answers_match(self, predicted: str, answer: str) -> bool:
        return predicted.strip() == answer.strip()

    # -- shared -------------------------------------------------------------------------------
    def split_of(self, prompt: str) -> str:
        digest = hashlib.sha256(f"{self.name}|{prompt}".encode()).digest()
        return "eval" if digest[0] % EVAL_BUCKETS == 0 else "train"

    def problems(self, split: str = "train", n: int = 100, seed: int = 0) -> list[Problem]:
        """``n`` distinct problems of ``split``, deterministic in (task, split, n, seed)."""
        if split not in SPLITS:
            raise ValueError(f"task '{self.name}': split must be one of {SPLITS}, got {split!r}")
        if n < 0:
            raise ValueError(f"task '{self.name}': n must be >= 0, got {n}")
        rng = random.Random(f"{self.name}:{split}:{seed}")
        out: list[Problem] = []
        seen: set[str] = set()
        tries = 0
        while len(out) < n:
            tries += 1
            if tries > 200 * (n + 10):
                raise ValueError(f"task '{self.name}': could not draw {n} distinct {split} problems")
            problem = self.sample(rng)
            if problem.prompt in seen or self.split_of(problem.prompt) != split:
                continue
            seen.add(problem.prompt)
            out.append(problem)
        return out

    def verify(self, completion: str, answer: str) -> bool:
        """True when the completion's final answer (after the last ``#``) equals ``answer``."""
        predicted = extract_answer(completion)
        return predicted is not None and self.answers_match(predicted, answer)

    def prompt_rows(self, split: str = "train", n: int = 100, seed: int = 0) -> list[dict]:
        return [
            {"prompt": p.prompt, "answer": p.answer, "reference": self.solve(p, verbose=False)}
            for p in self.problems(split, n, seed)
        ]

    def sft_rows(self, split: str = "train", n: int = 100, seed: int = 0, *,
                 verbose_fraction: float = 0.0, error_fraction: float = 0.0) -> list[dict]:
        rng = random.Random(f"{self.name}:sft:{split}:{seed}")
        rows = []
        for p in self.problems(split, n, seed):
            verbose = rng.random() < verbose_fraction
            wrong = rng.random() < error_fraction
            rows.append({"prompt": p.prompt, "completion": self.solve(p, verbose=verbose, rng=rng, wrong=wrong),
                         "answer": p.answer})
        return rows

    def preference_rows(self, split: str = "train", n: int = 100, seed: int = 0, *,
                        kind: str = "mixed") -> list[dict]:
        """Preference pairs. ``kind``: ``correctness`` (correct vs wrong, same style),
        ``conciseness`` (concise vs verbose, both correct) or ``mixed`` (each pair draws one of
        correctness / conciseness / both)."""
        if kind not in PAIR_KINDS:
            raise ValueError(f"task '{self.name}': pair kind must be one of {PAIR_KINDS}, got {kind!r}")
        rng = random.Random(f"{self.name}:pref:{split}:{seed}:{kind}")
        rows = []
        for p in self.problems(split, n, seed):
            k = kind if kind != "mixed" else rng.choice(("correctness", "conciseness", "both"))
            chosen_verbose = k == "correctness" and rng.random() < 0.3
            rejected_verbose = k in ("conciseness", "both") or chosen_verbose
            rejected_wrong = k in ("correctness", "both")
            chosen = self.solve(p, verbose=chosen_verbose, rng=rng)
            rejected = self.solve(p, verbose=rejected_verbose, rng=rng, wrong=rejected_wrong)
            rows.append({
                "prompt": p.prompt, "chosen": chosen, "rejected": rejected, "answer": p.answer,
                "chosen_score": completion_score(True, chosen_verbose),
                "rejected_score": completion_score(not rejected_wrong, rejected_verbose),
                "pair_kind": k,
            })
        return rows
