"""Text2Reward: the reward-code sandbox, the static checks, the generate -> check -> dry-run loop,
sandboxed use through get_reward / call_reward, and `rlxf text2reward` (SPECS §12, Appendix C)."""

from __future__ import annotations

import json
import math
import sys

import pytest

from rlxf.rewards import RewardError, call_reward, get_reward
from rlxf.rewards.codecheck import check_reward_code, extract_code
from rlxf.rewards.sandbox import GENERATED_MARKER, SandboxedReward, run_reward_code
from rlxf.rewards.text2reward import (
    ReplayBackend,
    generate_reward_function,
    strip_header,
    validate_reward_code,
)

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the sandbox needs POSIX resource limits")

GOOD = '''\
import re


def reward_fn(prompts, completions, **kwargs):
    """1 for the right final answer, 0.1 for a wrong one, 0 when there is none."""
    answers = kwargs.get("answer") or [None] * len(completions)
    out = []
    for completion, answer in zip(completions, answers):
        match = re.search(r"#\\s*(-?\\d+)", completion or "")
        if match is None:
            out.append(0.0)
        elif answer is not None and match.group(1) == str(answer).strip():
            out.append(1.0)
        else:
            out.append(0.1)
    return out
'''
# fails the dry run: the empty completion divides by zero
CRASHES_ON_EMPTY = '''\
def reward_fn(prompts, completions, **kwargs):
    return [1.0 / len(c) for c in completions]
'''
PROMPTS, COMPLETIONS, FIELDS = ["1+1=?", "2+3=?"], [" 1+1=2. #2", " 2+3=6. #6"], {"answer": ["2", "5"]}


def run(body: str, **kwargs):
    """Run ``def reward_fn(p, c, **k):`` + ``body`` in the sandbox on the two fixed samples."""
    code = "def reward_fn(p, c, **k):\n" + "".join(f"    {line}\n" for line in body.splitlines())
    return run_reward_code(code, "reward_fn", PROMPTS, COMPLETIONS, FIELDS, **kwargs)


def arithmetic_rows(n: int = 2) -> list[dict]:
    from rlxf.tasks import get_task

    return get_task("arithmetic").prompt_rows("train", n, seed=0)


# -- the sandbox ---------------------------------------------------------------------------------

def test_sandbox_runs_a_correct_function_and_captures_its_prints():
    result = run_reward_code("print('scoring')\n" + GOOD, "reward_fn", PROMPTS, COMPLETIONS, FIELDS)
    assert result.ok and result.values == [1.0, 0.1]
    assert result.sample_errors == [None, None] and "scoring" in result.stdout_tail
    assert not result.timed_out and not result.killed


def test_sandbox_stops_an_endless_loop_and_the_caller_continues():
    result = run("while True:\n    pass", timeout=1.0)
    assert result.timed_out and result.killed and result.values is None
    assert "timed out" in result.error and "1 s" in result.error
    assert run("return [0.5, 0.5]").values == [0.5, 0.5]  # the next call is unaffected


def test_sandbox_stops_excess_allocation():
    result = run("x = bytearray(2 * 1024 ** 3)\nreturn [1.0, 1.0]", memory_mb=256)
    assert not result.ok and result.values == [None, None]
    assert "MemoryError" in result.error and "line 2" in result.error


def test_sandbox_refuses_sockets():
    result = run("__import__('socket').socket()\nreturn [1.0, 1.0]")
    assert not result.ok and "sandbox: importing 'socket' is not allowed" in result.error


def test_sandbox_refuses_reading_outside_scratch(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read")
    for path in ("/etc/passwd", str(secret), json.__file__):  # a stdlib source too: only imports read those
        result = run(f"return [float(len(open({path!r}).read()))] * 2")
        assert not result.ok and f"sandbox: reading {path!r} is not allowed" in result.error, result.error
    listing = run("return [float(len(__import__('os').listdir('/')))] * 2")
    assert not listing.ok and "sandbox: listing '/' is not allowed" in listing.error


def test_sandbox_allows_its_scratch_dir_and_lazy_stdlib_imports():
    # writing/reading a file in the working directory is fine; encoding to utf_7 imports
    # encodings.utf_7 lazily, which needs the import system to read the standard library
    result = run("open('notes.txt', 'w').write('abc')\n"
                 "return [float(len(open('notes.txt').read())), float(len('é'.encode('utf_7')))]")
    assert result.ok and result.values == [3.0, 5.0]


def test_sandbox_refuses_writing_outside_scratch(tmp_path):
    target = tmp_path / "written.txt"
    result = run(f"open({str(target)!r}, 'w').write('x')\nreturn [1.0, 1.0]")
    assert not result.ok and f"sandbox: writing {str(target)!r} is not allowed" in result.error
    assert not target.exists()


@pytest.mark.parametrize("body, refused", [
    ("__import__('os').system('touch {marker}')", "os.system"),
    ("import sys\nsys.modules['posix'].system('touch {marker}')", "os.system"),
    ("__import__('os').fork()", "os.fork"),
    ("__import__('os').execv('/bin/sh', ['sh', '-c', 'touch {marker}'])", "os.exec"),
    ("__import__('subprocess').run(['touch', '{marker}'])", "importing 'subprocess'"),
    ("__import__('ctypes')", "importing 'ctypes'"),
    ("__import__('os').remove('{marker}')", "os.remove"),
])
def test_runtime_guard_stops_what_the_static_check_would_refuse(tmp_path, body, refused):
    marker = tmp_path / "pwned"
    code = "def reward_fn(p, c, **k):\n" + "".join(f"    {line}\n" for line in body.format(marker=marker).splitlines())
    assert check_reward_code(code)  # the static check refuses it ...
    result = run_reward_code(code + "    return [1.0, 1.0]\n", "reward_fn", PROMPTS, COMPLETIONS, FIELDS)
    assert not result.ok and refused in result.error, result.error  # ... and so does the sandbox
    assert not marker.exists()


def test_sandbox_limits_output_size():
    result = run("__import__('os').write(1, b'x' * 5_000_000)\nreturn [1.0, 1.0]", max_output_bytes=100_000)
    assert result.killed and result.values is None and "output limit" in result.error
    printed = run("print('y' * 5_000_000)\nreturn [1.0, 1.0]", max_output_bytes=100_000)
    assert printed.ok and len(printed.stdout_tail) <= 4000  # prints are captured, only the tail is kept


def test_sandbox_reports_wrong_length_non_numbers_and_non_finite_values():
    short = run("return [1.0]")
    assert short.values is None and "returned 1 values for 2 completions" in short.error
    mixed = run("return [float('nan'), 'high']")
    assert mixed.error is None and mixed.values == [None, None]  # a non-finite value is an error, never a value
    assert mixed.sample_errors[0] == "returned nan (not finite), expected a finite float or None"
    assert "expected a float or None" in mixed.sample_errors[1]
    assert "SyntaxError" in run("return [1.0,").error
    missing = run_reward_code(GOOD, "other_name", PROMPTS, COMPLETIONS, FIELDS)
    assert "defines no function 'other_name'" in missing.error


def test_sandbox_isolates_a_sample_that_raises():
    result = run("return [1.0 / (int(x[-1]) - 2) for x in c]")  # the first completion ends in 2
    assert result.error.startswith("reward_fn raised on the batch of 2: ZeroDivisionError")
    assert result.values == [None, 0.25]
    assert "ZeroDivisionError" in result.sample_errors[0] and "line 2" in result.sample_errors[0]


# -- static checks and extraction ----------------------------------------------------------------

@pytest.mark.parametrize("code, message", [
    ("import os\n" + GOOD, "importing 'os' is not allowed"),
    ("from subprocess import run\n" + GOOD, "importing 'subprocess' is not allowed"),
    ("import socket, shutil\n" + GOOD, "importing 'socket'"),
    ("def reward_fn(prompts, completions, **kw):\n    return __import__('os').system('ls')\n", "`__import__`"),
    ("def reward_fn(prompts, completions, **kw):\n    return eval('[1.0]')\n", "`eval` is not allowed"),
    ("def reward_fn(prompts, completions, **kw):\n    return [len(open('f').read())]\n", "`open` is not allowed"),
    ("def reward_fn(prompts, completions, **kw):\n    return [getattr(1, 'real')]\n", "`getattr` is not allowed"),
    ("def reward_fn(prompts, completions, **kw):\n    return ().__class__.__bases__\n", "`.__class__`"),
    ("def reward_fn(prompts, completions):\n    return [1.0]\n", "signature must be"),
    ("def reward_fn(completions, prompts, **kw):\n    return [1.0]\n", "signature must be"),
    ("def helper(x):\n    return x\n" + GOOD, "exactly one top-level function"),
    ("x = 1\n", "exactly one top-level function (found 0"),
    (GOOD + "print(reward_fn([], []))\n", "only imports, constants and the one function"),
    ("def reward_fn(prompts, completions, **kw)\n    return 1\n", "line 1: syntax error"),
])
def test_static_check_refuses_with_a_clear_message(code, message):
    problems = check_reward_code(code)
    assert any(message in p for p in problems), problems


def test_static_check_accepts_the_contract():
    assert check_reward_code(GOOD) == []
    assert check_reward_code(GOOD, function_name="reward_fn") == []
    assert "name it 'score'" in check_reward_code(GOOD, function_name="score")[0]


def test_extract_code():
    assert extract_code(f"Here it is:\n```python\n{GOOD}```\nDone.") == GOOD
    assert extract_code(f"```\nnot code\n```\n```py\n{GOOD}```") == GOOD  # the block that defines a function
    assert extract_code(GOOD) == GOOD  # the whole answer when it is code
    assert extract_code(f"```python\n{GOOD}") == GOOD  # an answer cut off before the closing fence
    assert extract_code("I cannot help with that.") is None and extract_code(None) is None


# -- validation and the generation loop ----------------------------------------------------------

def test_validate_reports_non_finite_and_wrong_length():
    rows = arithmetic_rows(2)
    problems, dry_run, _ = validate_reward_code(GOOD, rows, ["answer", "reference"])
    assert problems == [] and len(dry_run) == 6  # reference, corrupted, empty per row
    values = {d["label"]: d["value"] for d in dry_run}
    assert values["row 0 reference"] == 1.0 and values["row 0 corrupted"] == 0.1 and values["row 0 empty"] == 0.0
    nan = "def reward_fn(prompts, completions, **kwargs):\n    return [float('inf')] * len(completions)\n"
    problems, _, _ = validate_reward_code(nan, rows, ["answer"])
    assert problems and all("returned inf" in p for p in problems[:6])
    short = "def reward_fn(prompts, completions, **kwargs):\n    return [1.0]\n"
    problems, _, _ = validate_reward_code(short, rows, ["answer"])
    assert problems == ["reward_fn returned 1 values for 6 completions; return exactly one float per completion, "
                        "in order"]
    problems, _, _ = validate_reward_code(GOOD, rows, ["answer"], value_range=(0.5, 1.0))
    assert any("outside the required range [0.5, 1]" in p for p in problems)


def test_generate_feeds_the_error_back_and_succeeds_on_attempt_2(tmp_path):
    backend = ReplayBackend([f"```python\n{CRASHES_ON_EMPTY}```", f"Fixed:\n```python\n{GOOD}```"])
    rows = arithmetic_rows(2)
    result = generate_reward_function("reward correct final answers", backend, fields=["answer", "reference"],
                                      sample_rows=rows, max_attempts=3, output_path=tmp_path / "reward_fn.py")
    assert result.ok and len(result.attempts) == 2 and result.code == GOOD
    first_error = result.attempts[0]["problems"][0]
    assert "ZeroDivisionError" in first_error
    second_prompt = backend.calls[1][-1]["content"]
    assert first_error in second_prompt and CRASHES_ON_EMPTY.strip() in second_prompt
    assert "reward correct final answers" in second_prompt and "answer: e.g." in second_prompt
    text = result.path.read_text()
    assert text.splitlines()[0] == GENERATED_MARKER and strip_header(text) == GOOD
    assert result.attempts[1]["problems"] == [] and len(result.attempts[1]["dry_run"]) == 6


def test_generate_gives_up_after_max_attempts():
    backend = ReplayBackend(["I would rather not.", f"```python\nimport os\n{GOOD}```", None])
    result = generate_reward_function("goal", backend, fields=["answer"], sample_rows=arithmetic_rows(1),
                                      max_attempts=3)
    assert not result.ok and result.code is None and result.path is None
    assert "no Python code" in result.attempts[0]["problems"][0]
    assert "importing 'os' is not allowed" in result.attempts[1]["problems"][0]
    assert "returned no answer" in result.problems[0]


def test_refinement_prompt_has_previous_code_and_feedback():
    backend = ReplayBackend([f"```python\n{GOOD}```"])
    previous = CRASHES_ON_EMPTY
    result = generate_reward_function("reward correct answers", backend, fields=["answer"],
                                      sample_rows=arithmetic_rows(1), previous_code=previous,
                                      feedback="the policy learned to write long answers; penalise length")
    prompt = backend.calls[0][-1]["content"]
    assert result.ok and previous.strip() in prompt and "penalise length" in prompt
    assert "## The previous reward function" in prompt


# -- using generated code: always sandboxed ------------------------------------------------------

def test_sandboxed_reward_inside_call_reward(tmp_path):
    from rlxf.rewards.text2reward import write_reward_file

    path = write_reward_file(GOOD, tmp_path / "reward_fn.py", goal="g", generator="test", samples=6)
    for spec in (f"{path}:reward_fn", f"sandbox:{path}:reward_fn", f"sandbox:{path}"):
        fn = get_reward(spec)
        assert isinstance(fn, SandboxedReward)
        values, stats = call_reward(fn, PROMPTS + ["x"], COMPLETIONS + [""], {"answer": ["2", "5", "1"]})
        assert values == [1.0, 0.1, 0.0] and stats["none"] == 0
    loaded = {getattr(module, "__file__", None) for module in list(sys.modules.values())}
    assert str(path.resolve()) not in loaded  # the generated file was never imported in-process

    flaky = tmp_path / "flaky.py"  # a hand-written file without the marker: sandboxed only on request
    flaky.write_text("def reward_fn(prompts, completions, **kwargs):\n"
                     "    return [1.0 / len(c) if len(c) != 11 else float('nan') for c in completions]\n")
    assert not isinstance(get_reward(f"{flaky}:reward_fn"), SandboxedReward)
    fn = get_reward(f"sandbox:{flaky}:reward_fn")
    values, stats = call_reward(fn, ["p"] * 3, ["ab", "", "y" * 11], {})
    assert values == [0.5, None, None] and stats["none"] == 2  # NaN is a per-sample error, like a raise
    assert fn.errors == 2 and fn.first_error.startswith("sample 1: ZeroDivisionError")

    slow = tmp_path / "slow.py"
    slow.write_text("def reward_fn(prompts, completions, **kwargs):\n    while True:\n        pass\n")
    with pytest.raises(RewardError, match="timed out"):
        call_reward(SandboxedReward(slow, timeout=1.0), PROMPTS, COMPLETIONS, FIELDS)
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n" + GOOD)
    with pytest.raises(RewardError, match="fails the static checks: line 1: importing 'os'"):
        get_reward(f"sandbox:{bad}:reward_fn")


# -- the command ---------------------------------------------------------------------------------

def test_cli_end_to_end_with_scripted_answers(tmp_path, capsys):
    from rlxf.cli import main

    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps([f"```python\n{CRASHES_ON_EMPTY}```", f"```python\n{GOOD}```"]))
    out = tmp_path / "t2r"
    code = main(["text2reward", "reward right final answers, a little for any answer", "--judge",
                 f"replay:{answers}", "--rows", "2", "--output-dir", str(out), "--range", "0", "1"])
    printed = capsys.readouterr().out
    assert code == 0 and "accepted on attempt 2" in printed and f"--reward {out / 'reward_fn.py'}:reward_fn" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] and len(report["attempts"]) == 2 and "ZeroDivisionError" in report["attempts"][0]["problems"][0]
    assert report["attempts"][1]["dry_run"][0]["value"] == 1.0
    fn = get_reward(report["reward_spec"])
    assert isinstance(fn, SandboxedReward) and fn(PROMPTS, COMPLETIONS, **FIELDS) == [1.0, 0.1]

    # refinement round from the written file, and a run that never succeeds (exit 1, reasons printed)
    answers.write_text(json.dumps([f"```python\nimport subprocess\n{GOOD}```"]))
    code = main(["text2reward", "same goal", "--judge", f"replay:{answers}", "--rows", "1", "--output-dir",
                 str(tmp_path / "t2r-2"), "--max-attempts", "2", "--previous", str(out / "reward_fn.py"),
                 "--feedback", "too lenient"])
    err = capsys.readouterr().err
    assert code == 1 and "no valid reward function after 2 attempts" in err and "'subprocess'" in err
    report = json.loads((tmp_path / "t2r-2" / "report.json").read_text())
    assert "too lenient" in report["attempts"][0]["prompt"] and GOOD.strip() in report["attempts"][0]["prompt"]
    assert not (tmp_path / "t2r-2" / "reward_fn.py").exists()
