"""Environments for tool use (docs/methods/tools.md): the calculator's safe evaluator (values and
attacks), the calculator and python environments, and loading a user's environment by spec."""

from __future__ import annotations

import time

import pytest

from rlxf.envs import CalculatorEnv, CalculatorError, EnvError, PythonEnv, get_env, safe_eval
from rlxf.envs.calculator import MAX_BITS, format_value


@pytest.mark.parametrize("text, expected", [
    ("347*829", 287663), ("2+3*4", 14), ("(2+3)*4", 20), ("-7//2", -4), ("7%3", 1), ("2**10", 1024),
    ("7/2", 3.5), (" 1 + 2 ", 3), ("-(-5)", 5), ("+5", 5), ("0x10", 16), ("1.5*2", 3.0), ("2**-1", 0.5),
    ("(1)", 1), ("10-20", -10),
    ("(" * 99 + "1" + ")" * 99, 1),   # parentheses make no nodes; the text bound caps them (parser limit: 200)
])
def test_safe_eval_computes_arithmetic(text, expected):
    value = safe_eval(text)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("value, text", [(287663, "287663"), (3.5, "3.5"), (3.0, "3"), (1 / 3, "0.333333333333"),
                                         (1e20, "1e+20"), (-4, "-4")])
def test_values_are_written_exactly_or_to_twelve_digits(value, text):
    assert format_value(value) == text


ATTACKS = [
    "__import__('os').system('echo pwned')",               # a call
    "().__class__.__bases__[0].__subclasses__()",           # attribute walk to every class
    "open('/etc/passwd').read()",
    "lambda: 1",
    "[x for x in range(10**9)]",                            # comprehension
    "9**9**9",                                              # a power tower: refused before computing
    "10**10**10",
    "2**100000",
    "123456789**50",                                        # over MAX_BITS, refused before computing
    "(2**200)*(2**200)",                                    # a product over MAX_BITS
    "(1<<10000)",                                           # shifts are not arithmetic here
    "~1", "1&2", "1|2", "1^2",
    "1e308*10", "1e999",                                    # floats out of range
    "'a'*10**9", "b'x'", "'1'",                             # strings and bytes
    "1j*2", "(-8)**0.5",                                    # complex numbers
    "True+1", "None",                                       # non-numbers
    "x", "a.b", "x[0]", "f'{1}'", "1 if 1 else 2", "1<2", "(x:=1)", "not 1", "1 and 2", "{1: 2}", "(1, 2)",
    "(" * 500 + "1" + ")" * 500,                            # nesting beyond the text bound
    "-" * 100 + "1",                                        # unary chain deeper than MAX_DEPTH
    "1+" * 40 + "1",                                        # too many nodes
    "9" * 5000,                                             # a huge literal (text bound)
    "1/0", "1//0", "1%0", "0**-1", "0.0**-1",
    "", "   ", "1+", "import os", "print(1)", "\x00", "1\n2",
]


@pytest.mark.parametrize("text", ATTACKS)
def test_safe_eval_refuses_everything_else_quickly(text):
    start = time.perf_counter()
    with pytest.raises(CalculatorError):
        safe_eval(text)
    assert time.perf_counter() - start < 0.5   # nothing expensive is ever attempted


def test_safe_eval_bounds_every_integer_and_never_calls_eval(monkeypatch):
    import builtins

    monkeypatch.setattr(builtins, "eval", lambda *a, **k: pytest.fail("eval must never be called"))
    assert safe_eval("2**255") == 2 ** 255
    with pytest.raises(CalculatorError, match="larger"):
        safe_eval(f"2**{MAX_BITS}*4")
    with pytest.raises(CalculatorError, match="expected text"):
        safe_eval(12)


def test_calculator_env_answers_calls_and_ends_on_an_answer():
    env = CalculatorEnv()
    assert env.reset({"prompt": "347*829=?", "answer": "287663"}) == [{"role": "user", "content": "347*829=?"}]
    assert env.step("<calc>347*829</calc>") == ("287663", 0.0, False)
    observation, reward, done = env.step("let me see <calc>__import__('os')</calc> and <calc>1+1</calc>")
    assert observation.startswith("error: Call is not allowed") and not done   # only the first call runs
    assert env.step("#287663") == (None, 0.0, True)
    assert env.step("<calc>1+1") == (None, 0.0, True)                           # an unclosed call is no call
    system = CalculatorEnv(system_prompt="Use <calc>.").reset({"prompt": "1*2=?"})
    assert system[0] == {"role": "system", "content": "Use <calc>."}


def test_calculator_demonstration_is_the_worked_conversation():
    demo = CalculatorEnv().demonstration({"prompt": "12*34=?", "answer": "408"})
    assert demo == [{"role": "user", "content": "12*34=?"}, {"role": "assistant", "content": "<calc>12*34</calc>"},
                    {"role": "tool", "content": "408"}, {"role": "assistant", "content": "#408"}]
    assert CalculatorEnv().demonstration({"prompt": "sort 3 1 2=?"}) is None
    assert CalculatorEnv().demonstration({"prompt": "1/0=?"}) is None


def test_python_demonstration_shows_what_print_writes(monkeypatch):
    from rlxf.sandbox import boundary

    monkeypatch.setattr(boundary, "require", lambda: None)
    demo = PythonEnv().demonstration({"prompt": "7/2=?"})
    assert [m["content"] for m in demo[1:]] == ["<python>print(7/2)</python>", "3.5\n", "#3.5"]


# -- loading environments -------------------------------------------------------------------------

def test_get_env_loads_builtins_modules_and_files(tmp_path):
    assert get_env("calculator") is CalculatorEnv
    assert get_env("rlxf.envs.calculator:CalculatorEnv") is CalculatorEnv
    path = tmp_path / "my_env.py"
    path.write_text("class Echo:\n    def reset(self, row):\n        return row['prompt']\n"
                    "    def step(self, turn):\n        return turn, 1.0, len(turn) > 3\n")
    factory = get_env(f"{path}:Echo")
    env = factory()
    assert env.reset({"prompt": "hi"}) == "hi" and env.step("abcd") == ("abcd", 1.0, True)
    assert get_env(CalculatorEnv) is CalculatorEnv


@pytest.mark.parametrize("spec, message", [
    ("nope", "not a built-in environment"),
    ("missing_file.py:Env", "not found"),
    ("rlxf.envs.calculator:Nope", "defines no 'Nope'"),
    ("rlxf.envs.calculator:safe_eval", None),            # a function is a factory; accepted
    ("no_such_module_xyz:Env", "cannot import module"),
    ("", "must be a built-in name"),
])
def test_get_env_errors_say_what_and_how(spec, message):
    if message is None:
        assert callable(get_env(spec))
        return
    with pytest.raises(EnvError, match=message):
        get_env(spec)


def test_a_class_without_step_is_refused(tmp_path):
    path = tmp_path / "bad_env.py"
    path.write_text("class Half:\n    def reset(self, row):\n        return 'x'\n")
    with pytest.raises(EnvError, match="no step method"):
        get_env(f"{path}:Half")
    broken = tmp_path / "broken_env.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(EnvError, match="importing .* failed: RuntimeError: boom"):
        get_env(f"{broken}:Env")


# -- the python environment (the OS sandbox of docs/security.md) ------------------------------------

def _sandbox_or_skip():
    from rlxf.sandbox import probe

    why = probe()
    if why:
        pytest.skip(f"no OS sandbox here: {why}")


def test_python_env_runs_code_in_the_sandbox_and_returns_what_it_printed():
    _sandbox_or_skip()
    env = PythonEnv(timeout=5.0)
    assert env.step("<python>print(347*829)</python>") == ("287663\n", 0.0, False)
    assert env.step("#287663") == (None, 0.0, True)
    attack = ("<python>import os\nprint(open('/etc/passwd').read())\nos.system('id')</python>")
    observation, _, done = env.step(attack)
    assert "root:" not in observation and "uid=" not in observation and "error:" in observation and not done
    start = time.perf_counter()
    observation, _, _ = PythonEnv(timeout=1.0).step("<python>while True:\n    pass</python>")
    assert "error:" in observation and ("time" in observation or "CPU" in observation)
    assert time.perf_counter() - start < 8


def test_python_env_refuses_to_start_without_the_boundary(monkeypatch):
    from rlxf.rewards.base import RewardError
    from rlxf.sandbox import boundary

    def missing():
        raise boundary.SandboxUnavailable("bwrap not installed")

    monkeypatch.setattr(boundary, "require", missing)
    with pytest.raises(RewardError, match="needs the OS sandbox: bwrap not installed"):
        PythonEnv()
    with pytest.raises(RewardError):
        get_env("python")()
    assert get_env("python", unsafe_code=True)().unsafe


def test_python_env_bounds_the_code_and_the_observation():
    _sandbox_or_skip()
    env = PythonEnv(max_code_chars=10, max_observation_chars=5)
    assert env.step("<python>" + "x" * 11 + "</python>")[0] == "error: code longer than 10 characters"
    assert PythonEnv(max_observation_chars=5).step("<python>print('a' * 100)</python>")[0] == "aaaa\n"


# -- the task ------------------------------------------------------------------------------------------

def test_multiplication_task_problems_answers_and_wrong_solutions():
    from rlxf.tasks import get_task

    task = get_task("multiplication")
    train, held_out = task.problems("train", 300, seed=0), task.problems("eval", 100, seed=0)
    assert not {p.prompt for p in train} & {p.prompt for p in held_out}
    for p in train[:50]:
        a, b = p.data
        assert 100 <= a <= 999 and 100 <= b <= 999 and p.prompt == f"{a}*{b}=?" and p.answer == str(a * b)
        assert task.verify(task.solve(p, verbose=False), p.answer)
        assert task.verify(task.solve(p, verbose=True), p.answer)
        assert not task.verify(task.solve(p, verbose=False, wrong=True), p.answer)
        assert CalculatorEnv().step(f"<calc>{p.prompt[:-2]}</calc>")[0] == p.answer
    rows = task.preference_rows("train", 20, seed=1, kind="correctness")
    assert all(task.verify(r["chosen"], r["answer"]) and not task.verify(r["rejected"], r["answer"]) for r in rows)
    assert not task.verify("#12x", "12") and not task.verify("no answer", "12")
