"""Text2Reward in the LLM setting: a chat model writes the reward function from a sentence.

Text2Reward (Xie et al., arXiv 2309.11489); docs/text2reward.md. The loop of :func:`generate_reward_function`:

1. prompt = role + the reward-function contract + the available row fields (with example values)
   + reward-design hints + task knowledge + the goal (+ previous code and human feedback for a
   refinement round, + the last attempt's code and problems when regenerating);
2. the chat model answers; :func:`~rlxf.rewards.codecheck.extract_code` takes the ```python block;
3. :func:`~rlxf.rewards.codecheck.check_reward_code` checks it statically (parses, one function
   ``def reward_fn(prompts, completions, **kwargs)``, allowed imports only, no escape hatches);
4. :func:`validate_reward_code` runs it in the sandbox (``rlxf.rewards.sandbox``) on sample rows —
   per row the reference completion, a corrupted one (final answer shifted) and an empty one — and
   checks the values (one per completion, numbers, finite, in range when a range is given);
5. any problem is fed back into the next prompt; the first attempt that passes is written to a file.

Departures from the paper (documented decisions): the paper's environment abstraction (robot/object
classes) becomes the description of the reward contract and the dataset's row fields; the paper
exec()s the code in-process with no validation, rlxf checks it statically, dry-runs it in a
sandboxed subprocess and regenerates on failure (the paper's future-work suggestion); the paper's
few-shot retrieval of expert examples is not implemented (zero-shot only). Human-feedback
refinement follows the paper's interactive prompt: previous code + feedback text -> new code.

The written file starts with the provenance header of :mod:`rlxf.sandbox.provenance`; ``get_reward``
then always runs it behind the OS boundary (:class:`~rlxf.rewards.sandbox.SandboxedReward`), never in
the training process.
"""

from __future__ import annotations

import json
import math
import random
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

from rlxf.rewards.codecheck import check_reward_code, extract_code
from rlxf.rewards.sandbox import ALLOWED_MODULES, GENERATED_MARKER, run_reward_code
from rlxf.sandbox.provenance import LEGACY_HEADER

FUNCTION_NAME = "reward_fn"
SYSTEM_PROMPT = ("You are an expert in reinforcement learning from feedback for language models. You write "
                 "reward functions in Python: correct, deterministic, fast, and robust to malformed text.")
HINTS = """\
- A good reward usually combines a few terms: task success (does the completion's final answer match the
  reference or answer field?), format (is the answer where and how it should be?), and small regularizers
  (length, repetition). Weight them so that task success dominates.
- Staged rewards work well: if/else on how far the completion got (no answer < wrong answer < right answer).
- Keep every value in a small bounded range such as [0, 1] or [-1, 1]; never return NaN or infinity.
- Read row fields with kwargs.get(name) and handle None, empty strings and malformed completions: the
  function must never raise.
- It runs on every sampled completion during training: keep it fast and deterministic (no randomness)."""
NO_ANSWER = ("the generator returned no answer (a backend error, or the prompt plus --max-tokens does not fit "
             "its context window)")
NO_CODE = "the answer contains no Python code; answer with the complete function in one ```python code block"


@dataclass
class GenerationResult:
    """Outcome of :func:`generate_reward_function`.

    code: the accepted code (None when no attempt passed). path: the file it was written to, or None.
    attempts: one dict per attempt — ``prompt`` (the user message sent), ``response`` (the raw
    answer), ``code`` (extracted), ``problems`` (empty when accepted), ``dry_run`` (per sample:
    label, prompt, completion, value), ``notes`` (observations that did not fail it), ``seconds``.
    ok: an attempt passed every check.
    """

    code: str | None
    path: Path | None
    attempts: list[dict] = field(default_factory=list)
    ok: bool = False
    function: str = FUNCTION_NAME

    @property
    def problems(self) -> list[str]:
        """The last attempt's problems (empty when ok)."""
        return self.attempts[-1]["problems"] if self.attempts else ["no attempt was made"]


def build_prompt(goal: str, *, fields: list[str], sample_rows: list[dict], knowledge: str | None = None,
                 previous_code: str | None = None, feedback: str | None = None, failed_code: str | None = None,
                 failed_problems: list[str] | None = None) -> str:
    """The user message for one attempt (see the module docstring for its parts)."""
    example = sample_rows[0] if sample_rows else {}
    field_lines = [f"- {name}: e.g. {_preview(example.get(name))}" for name in fields] or ["- (none)"]
    parts = [
        "Write a Python reward function for training a language model with reinforcement learning.",
        "## The reward function contract\n"
        f"def {FUNCTION_NAME}(prompts, completions, **kwargs):\n"
        "- prompts: list[str], completions: list[str] of the same length N; completions[i] is the model's answer "
        "to prompts[i].\n"
        "- kwargs: the dataset's other columns (below), each a list of N values aligned with the completions.\n"
        "- Return a list of N floats, one per completion, in order (None only for a sample that cannot be judged).\n"
        f"- Pure Python: import only {', '.join(ALLOWED_MODULES)}. No files, network, processes, eval/exec/open/"
        "getattr or dunder names. One top-level function; put helpers inside it.",
        "## Row fields (kwargs)\n" + "\n".join(field_lines) + f"\nExample prompt: {_preview(example.get('prompt'))}",
        "## Hints\n" + HINTS,
    ]
    if knowledge:
        parts.append("## About the task\n" + knowledge)
    parts.append("## Goal\n" + goal.strip())
    if previous_code:
        parts.append("## The previous reward function\n```python\n" + previous_code.strip() + "\n```")
    if feedback:
        parts.append("## Feedback on the previous reward function (from a person who watched training)\n"
                     + feedback.strip() + "\nRewrite the function to address this feedback.")
    if failed_problems:
        shown = ("```python\n" + failed_code.strip() + "\n```\n") if failed_code else ""
        parts.append("## Your last answer failed these checks\n" + shown
                     + "\n".join(f"- {p}" for p in failed_problems) + "\nFix every problem.")
    parts.append(f"Answer with the complete function `{FUNCTION_NAME}` in one ```python code block.")
    return "\n\n".join(parts)


def dry_run_batch(sample_rows: list[dict], fields: list[str], *, seed: int = 0):
    """(prompts, completions, fields, labels) for the validation dry run: per row its reference
    completion (``reference``, ``completion`` or ``chosen``), a corrupted copy (final answer shifted,
    when the reference has a ``#`` answer), and an empty completion."""
    from rlxf.rewards.cooper import corrupt_final_answer

    rng = random.Random(seed)
    prompts, completions, labels = [], [], []
    columns: dict[str, list] = {name: [] for name in fields}
    for i, row in enumerate(sample_rows):
        reference = next((row[k] for k in ("reference", "completion", "chosen") if isinstance(row.get(k), str)), None)
        candidates = []
        if reference is not None:
            candidates.append(("reference", reference))
            corrupted = corrupt_final_answer(reference, rng)
            if corrupted is not None:
                candidates.append(("corrupted", corrupted))
        if isinstance(row.get("rejected"), str):
            candidates.append(("rejected", row["rejected"]))
        candidates.append(("empty", ""))
        for label, completion in candidates:
            prompts.append(str(row.get("prompt", "")))
            completions.append(completion)
            labels.append(f"row {i} {label}")
            for name in fields:
                columns[name].append(row.get(name))
    return prompts, completions, columns, labels


def validate_reward_code(code: str, sample_rows: list[dict], fields: list[str], *, function: str = FUNCTION_NAME,
                         value_range: tuple[float, float] | None = None, timeout: float = 5.0,
                         memory_mb: int = 256, unsafe: bool = False) -> tuple[list[str], list[dict], list[str]]:
    """Dry-run ``code`` in the sandbox on :func:`dry_run_batch` of ``sample_rows``.

    Returns ``(problems, dry_run, notes)``: problems (empty = valid) are feedback text for the model;
    dry_run lists ``{label, prompt, completion, value}`` per sample; notes are observations that do
    not fail the code (identical values for every sample, how long it took).
    """
    prompts, completions, columns, labels = dry_run_batch(sample_rows, fields)
    result = run_reward_code(code, function, prompts, completions, columns, timeout=timeout, memory_mb=memory_mb,
                             unsafe=unsafe)
    values = result.values or [None] * len(prompts)
    dry_run = [{"label": label, "prompt": _preview(p, 80), "completion": _preview(c, 120), "value": v}
               for label, p, c, v in zip(labels, prompts, completions, values)]
    problems, notes = [], []
    if result.error:
        problems.append(result.error)
    if result.values is None:
        return problems, dry_run, notes
    for label, completion, value, error in zip(labels, completions, result.values, result.sample_errors):
        if error and not (result.error and error in result.error):  # not the batch error again
            problems.append(f"{label} (completion {_preview(completion, 60)}): {error}")
        elif value is not None and value_range and not value_range[0] <= value <= value_range[1]:
            problems.append(f"{label}: value {value:g} is outside the required range "
                            f"[{value_range[0]:g}, {value_range[1]:g}]")
    if len(problems) > 8:
        problems = problems[:8] + [f"... and {len(problems) - 8} more problems of the same kind"]
    numbers = [v for v in result.values if v is not None and math.isfinite(v)]
    if not numbers and not problems:
        problems.append("it returned None for every sample; None means 'cannot judge' — return a number for "
                        "every completion you can score (the reference completion at least)")
    if len(set(numbers)) == 1 and len(numbers) > 1:
        notes.append(f"every sample got the same value {numbers[0]:g}: the function does not tell the reference, "
                     "corrupted and empty completions apart")
    notes.append(f"dry run of {len(prompts)} samples took {result.seconds:.2f} s in the sandbox")
    return problems, dry_run, notes


def generate_reward_function(goal: str, backend, *, fields: list[str], sample_rows: list[dict],
                             max_attempts: int = 3, feedback: str | None = None, previous_code: str | None = None,
                             knowledge: str | None = None, value_range: tuple[float, float] | None = None,
                             output_path: str | Path | None = None, max_tokens: int = 1024,
                             temperature: float = 0.0, timeout: float = 5.0, unsafe: bool = False) -> GenerationResult:
    """Ask ``backend`` (a ChatBackend: ``chat(messages, max_tokens=, temperature=) -> str | None``)
    for a reward function for ``goal`` until one passes the static checks and the sandboxed dry run
    on ``sample_rows``, at most ``max_attempts`` times; each retry's prompt carries the previous
    attempt's code and problems. ``previous_code`` + ``feedback``: a refinement round. When an
    attempt passes and ``output_path`` is given, the code is written there (:func:`write_reward_file`).
    """
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    result = GenerationResult(code=None, path=None)
    failed_code, failed_problems = None, None
    for _ in range(max_attempts):
        start = time.perf_counter()
        prompt = build_prompt(goal, fields=fields, sample_rows=sample_rows, knowledge=knowledge,
                              previous_code=previous_code, feedback=feedback, failed_code=failed_code,
                              failed_problems=failed_problems)
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
        response = backend.chat(messages, max_tokens=max_tokens, temperature=temperature)
        code = extract_code(response)
        dry_run, notes = [], []
        if response is None:
            problems = [NO_ANSWER]
        elif code is None:
            problems = [NO_CODE]
        else:
            problems = check_reward_code(code, function_name=FUNCTION_NAME)
            if not problems:
                problems, dry_run, notes = validate_reward_code(code, sample_rows, fields, value_range=value_range,
                                                                timeout=timeout, unsafe=unsafe)
        result.attempts.append({"prompt": prompt, "response": response, "code": code, "problems": problems,
                                "dry_run": dry_run, "notes": notes, "seconds": time.perf_counter() - start})
        if not problems:
            result.code, result.ok = code, True
            if output_path is not None:
                result.path = write_reward_file(code, output_path, goal=goal,
                                                generator=getattr(backend, "name", "?"), samples=len(dry_run))
            break
        failed_code, failed_problems = code, problems
    return result


def write_reward_file(code: str, path: str | Path, *, goal: str, generator: str, samples: int) -> Path:
    """Write ``code`` under a header whose first line is the sandbox marker (so ``get_reward`` runs
    it sandboxed) and that records the goal and how to use it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    goal_lines = textwrap.wrap(" ".join(goal.split()), 96) or [""]
    header = [GENERATED_MARKER,
              f"# Written by `rlxf text2reward` (generator: {generator}); passed the static checks and a sandboxed",
              f"# dry run on {samples} sample completions. rlxf runs this file only in its sandbox "
              "(docs/text2reward.md).",
              *[f"# Goal: {line}" if i == 0 else f"#       {line}" for i, line in enumerate(goal_lines)],
              f"# Use: --reward {path}:{FUNCTION_NAME}", ""]
    path.write_text("\n".join(header) + "\n" + code)
    return path


def strip_header(text: str) -> str:
    """The code of a file written by :func:`write_reward_file` (its header comments removed)."""
    lines = text.splitlines(keepends=True)
    if not lines or lines[0].rstrip("\r\n") not in (GENERATED_MARKER, LEGACY_HEADER):
        return text
    i = 0
    while i < len(lines) and (lines[i].startswith("#") or not lines[i].strip()):
        i += 1
    return "".join(lines[i:])


# ---------------------------------------------------------------------------------------------
# the `rlxf text2reward` command
# ---------------------------------------------------------------------------------------------

def build_backend(spec: str, model: str | None = None):
    """The chat backend for ``--judge SPEC``: any ``rlxf.judges.build_judge`` spec (``local:PATH``,
    ``http://host:port/v1``), or ``replay:FILE.json`` — a JSON list of answers returned in order
    (the last one repeats), a scripted stand-in for a code-writing model in tests and demos."""
    if spec.startswith("replay:"):
        return ReplayBackend.from_file(spec[len("replay:"):])
    from rlxf.judges import build_judge
    from rlxf.rewards.base import RewardError

    try:
        return build_judge(spec, model=model).backend
    except ValueError as err:  # JudgeError: a bad spec
        raise RewardError(f"--judge {spec}: {err}; or use replay:FILE.json for scripted answers") from err


class ReplayBackend:
    """A ChatBackend that returns scripted answers in order (the last one repeats); records the
    messages it was sent in ``calls``."""

    def __init__(self, answers: list[str | None], name: str = "replay"):
        if not answers:
            raise ValueError("replay backend: give at least one answer")
        self.answers, self.name, self.calls = list(answers), name, []

    @classmethod
    def from_file(cls, path: str) -> ReplayBackend:
        from rlxf.rewards.base import RewardError

        try:
            answers = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise RewardError(f"--judge replay:{path}: cannot read a JSON list of answers ({err})") from err
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise RewardError(f"--judge replay:{path}: the file must hold a JSON list of answer strings")
        return cls(answers, name=f"replay:{Path(path).name}")

    def chat(self, messages: list[dict], *, max_tokens: int = 256, temperature: float = 0.0) -> str | None:
        self.calls.append(messages)
        return self.answers[min(len(self.calls), len(self.answers)) - 1]


def run_text2reward(goal: str, *, judge: str, judge_model: str | None = None, dataset: str = "task:arithmetic",
                    rows: int = 4, output_dir: str | Path = "runs/text2reward", max_attempts: int = 3,
                    feedback: str | None = None, previous: str | Path | None = None,
                    value_range: tuple[float, float] | None = None, max_tokens: int = 1024,
                    temperature: float = 0.0, timeout: float = 5.0,
                    unsafe: bool = False) -> tuple[GenerationResult, Path]:
    """``rlxf text2reward``: load sample rows, generate and validate, write ``reward_fn.py`` (when
    accepted) and ``report.json`` to ``output_dir``. Returns (result, report path)."""
    from rlxf.data.loading import TASK_PREFIX, load_rows
    from rlxf.rewards.base import RewardError

    if feedback and not previous:
        raise RewardError("--feedback refines an existing function: pass it with --previous FILE.py")
    if not unsafe:
        from rlxf.sandbox import boundary

        try:
            boundary.require()  # before the chat model is asked for anything
        except boundary.SandboxUnavailable as err:
            raise RewardError(str(err)) from err
    previous_code = None
    if previous:
        try:
            previous_code = strip_header(Path(previous).read_text())
        except OSError as err:
            raise RewardError(f"--previous {previous}: cannot read it ({err})") from err
    sample_rows = load_rows(dataset, kind="prompt", limit=rows,
                            task_size=rows if dataset.startswith(TASK_PREFIX) else None)
    fields = [k for k in sample_rows[0] if k not in ("prompt", "prompt_ids") and not k.startswith("_")]
    knowledge = None
    if dataset.startswith(TASK_PREFIX):
        from rlxf.tasks import get_task

        knowledge = f"{dataset}: {get_task(dataset[len(TASK_PREFIX):]).description}"
    backend = build_backend(judge, judge_model)
    out = Path(output_dir)
    result = generate_reward_function(goal, backend, fields=fields, sample_rows=sample_rows,
                                      max_attempts=max_attempts, feedback=feedback, previous_code=previous_code,
                                      knowledge=knowledge, value_range=value_range, output_path=out / "reward_fn.py",
                                      max_tokens=max_tokens, temperature=temperature, timeout=timeout,
                                      unsafe=unsafe)
    report = {"goal": goal, "generator": getattr(backend, "name", judge), "judge": judge, "dataset": dataset,
              "fields": fields, "ok": result.ok, "path": str(result.path) if result.path else None,
              "reward_spec": f"{result.path}:{FUNCTION_NAME}" if result.path else None,
              "refinement": {"previous": str(previous), "feedback": feedback} if previous else None,
              "attempts": result.attempts}
    out.mkdir(parents=True, exist_ok=True)
    report_path = out / "report.json"
    report_path.write_text(json.dumps(report, indent=2, default=str))
    return result, report_path


def format_summary(result: GenerationResult, report_path: Path) -> str:
    """The text `rlxf text2reward` prints."""
    n = len(result.attempts)
    if not result.ok:
        lines = [f"rlxf text2reward: no valid reward function after {n} attempt{'s' * (n != 1)}."]
        for i, attempt in enumerate(result.attempts, 1):
            lines.append(f"  attempt {i}: " + "; ".join(attempt["problems"][:3]))
        lines.append(f"Report (prompts, answers, problems): {report_path}")
        return "\n".join(lines)
    last = result.attempts[-1]
    lines = [f"rlxf text2reward: accepted on attempt {n}. Code: {result.path}  Report: {report_path}",
             "Dry run (sandboxed):"]
    lines += [f"  {d['label']:<18} {d['value'] if d['value'] is None else format(d['value'], '.4g'):>8}  "
              f"{d['completion']}" for d in last["dry_run"][:12]]
    lines += [f"Note: {note}" for note in last["notes"]]
    lines.append(f"Train with it (runs sandboxed): rlxf grpo --reward {result.path}:{FUNCTION_NAME} ...")
    return "\n".join(lines)


def _preview(value, limit: int = 100) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
