"""Judge prompts: pairwise preference (CAI / RLAIF), 1–10 rating (d-RLAIF) and the LMGT reward shift.

Each judgement is one user message; the judge's answer is read from the log-probabilities of a few
*option strings* at the start of the assistant's reply (RLAIF, Lee et al., arXiv 2309.00267:
log-probs of "(A)"/"(B)", normalised to a soft label), never from sampled text. So every template
ends by asking for exactly
one of its options, and the options are chosen to be **one token in common tokenizers** (a capital
letter, a digit): the HTTP backend can read an option only from the first generated token's
``top_logprobs`` (docs/judges.md, "Single-token options").

Deliberate deviation (d-RLAIF, Lee et al., arXiv 2309.00267): the paper's rater answers 1–10 and
the score is
``Σ_{i=1..10} i·P(i)``. "10" is two tokens in many tokenizers (and in the tiny model's), so the
rating prompt asks for a digit 0–9 and :meth:`rlxf.judges.Judge.score` returns
``Σ_{d=0..9} (d+1)·P(d)`` — the same 1–10 scale with ten single-token options. Not validated
against the paper's numbers.

Two prompt sets ship (``PROMPT_SETS``):

- ``"standard"`` — the RLAIF paper's multiple-choice style ("Consider the following conversation …
  Options: (A) … (B) … The answer is:") for instruction-following judges;
- ``"compact"`` — the same questions in a few characters, for judges with a short context such as
  the embedded tiny model (256 positions: the longest arithmetic pair already takes ~230). Its
  pairwise options are "1"/"2" as in RLAIF (Lee et al.: "Preferred Summary=" and the tokens "1",
  "2") and its shift options "+", "0", "-": symbols a small arithmetic model ranks among its top
  tokens, so an HTTP server's top-20 list contains them (the tiny model gives "A"/"B" about
  e^-24, far outside it).

Users override any part with ``dataclasses.replace(STANDARD, pairwise=...)`` or a new
:class:`JudgePrompts`. Templates are ``str.format`` strings (write a literal brace as ``{{``);
the filled-in texts are never parsed, so braces inside prompts or completions are safe.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class JudgePrompts:
    """The three judge templates, their defaults and their answer options."""

    pairwise: str
    """Fields ``{prompt}``, ``{a}``, ``{b}``, ``{principle}``; the judge answers with a ``pairwise_options`` entry."""
    rating: str
    """Fields ``{prompt}``, ``{completion}``, ``{rubric}``; the judge answers with a ``rating_options`` entry."""
    shift: str
    """Fields ``{prompt}``, ``{completion}``, ``{knowledge}``; the judge answers with a ``shift_options`` entry."""
    principle: str
    """Principle used when :meth:`Judge.prefer` gets none (CAI samples one per comparison)."""
    rubric: str
    """Rubric used when :meth:`Judge.score` gets none."""
    knowledge_block: str = "Background knowledge:\n{knowledge}\n\n"
    """How LMGT's prior knowledge text enters ``{knowledge}`` (empty when there is none)."""
    pairwise_options: tuple[str, str] = ("A", "B")
    """Option strings meaning "the first answer is better" and "the second answer is better"."""
    rating_options: tuple[str, ...] = tuple("0123456789")
    """Option strings for ratings 1, 2, …, len(options) (the option at index d means rating d + 1)."""
    shift_options: tuple[str, str, str] = ("A", "B", "C")
    """Option strings for the shifts +1 (approve), 0 (neutral), −1 (disapprove), in that order."""

    def __post_init__(self) -> None:
        for name in ("pairwise_options", "rating_options", "shift_options"):
            options = getattr(self, name)
            if len(set(options)) != len(options) or not all(isinstance(o, str) and o for o in options):
                raise ValueError(f"JudgePrompts.{name} must be distinct non-empty strings, got {options!r}")
        if len(self.pairwise_options) != 2 or len(self.shift_options) != 3 or len(self.rating_options) < 2:
            raise ValueError("JudgePrompts: pairwise_options needs 2 entries, shift_options 3, "
                             "rating_options at least 2")

    def render_pairwise(self, prompt: str, a: str, b: str, principle: str | None = None) -> list[dict]:
        text = self.pairwise.format(prompt=prompt, a=a, b=b,
                                    principle=self.principle if principle is None else principle)
        return [{"role": "user", "content": text}]

    def render_rating(self, prompt: str, completion: str, rubric: str | None = None) -> list[dict]:
        text = self.rating.format(prompt=prompt, completion=completion,
                                  rubric=self.rubric if rubric is None else rubric)
        return [{"role": "user", "content": text}]

    def render_shift(self, prompt: str, completion: str, knowledge: str | None = None) -> list[dict]:
        block = self.knowledge_block.format(knowledge=knowledge) if knowledge else ""
        text = self.shift.format(prompt=prompt, completion=completion, knowledge=block)
        return [{"role": "user", "content": text}]


STANDARD = JudgePrompts(
    pairwise=(
        "Consider the following conversation between a human and an assistant:\n\n"
        "Human: {prompt}\n\n"
        "{principle}\n"
        "Options:\n"
        "(A) {a}\n"
        "(B) {b}\n\n"
        "Reply with a single letter, A or B. The answer is:"
    ),
    rating=(
        "Rate the assistant's response in the following conversation.\n"
        "{rubric}\n\n"
        "Human: {prompt}\n\n"
        "Assistant: {completion}\n\n"
        "Reply with a single digit from 0 (worst) to 9 (best). The rating is:"
    ),
    shift=(
        "{knowledge}"
        "A learner gave the following response. Judge whether it moves toward a good answer.\n\n"
        "Human: {prompt}\n\n"
        "Response: {completion}\n\n"
        "Options:\n(A) approve\n(B) neutral\n(C) disapprove\n\n"
        "Reply with a single letter, A, B or C. The answer is:"
    ),
    principle="Which of these assistant responses is better: correct, helpful, honest and harmless, "
              "and no longer than it needs to be?",
    rubric="A good response is correct, helpful, honest and harmless, and no longer than it needs to be.",
)

COMPACT = JudgePrompts(
    pairwise="{principle}{prompt}\n1:{a}\n2:{b}\nPreferred=",
    rating="{rubric}{prompt}{completion}\nRating 0-9=",
    shift="{knowledge}{prompt}{completion}\nShift +,0,-=",
    principle="",
    rubric="",
    knowledge_block="{knowledge}\n",
    pairwise_options=("1", "2"),
    shift_options=("+", "0", "-"),
)

PROMPT_SETS: dict[str, JudgePrompts] = {"standard": STANDARD, "compact": COMPACT}


def get_prompts(prompts: str | JudgePrompts) -> JudgePrompts:
    """A :class:`JudgePrompts` from itself or a name in ``PROMPT_SETS``."""
    if isinstance(prompts, JudgePrompts):
        return prompts
    if prompts not in PROMPT_SETS:
        raise ValueError(f"unknown judge prompt set {prompts!r}; choose one of {sorted(PROMPT_SETS)} "
                         "or pass a JudgePrompts")
    return PROMPT_SETS[prompts]
