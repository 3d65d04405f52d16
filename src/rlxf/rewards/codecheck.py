"""Static checks for reward code written by a model (Text2Reward, arXiv 2309.11489; docs/security.md).

:func:`extract_code` takes the code out of a chat answer; :func:`check_reward_code` lists what is
wrong with it before it ever runs. The checks are a first filter that gives the model precise,
fixable feedback; the sandbox (``rlxf.rewards.sandbox``) enforces the same rules at run time, so
code that slips past them is still stopped.

Accepted code: at top level only a docstring, imports, constant assignments and exactly one
function ``def name(prompts, completions, **kwargs)``; imports only from
:data:`rlxf.sandbox.ALLOWED_MODULES`; no dunder names or attributes (``__import__``,
``__class__``, ``__globals__`` ...) and no builtins that reach outside the function's data
(:data:`FORBIDDEN_NAMES`: ``eval``, ``exec``, ``open``, ``compile``, ``globals``, ``getattr`` ...).
"""

from __future__ import annotations

import ast
import re

from rlxf.sandbox import ALLOWED_MODULES

FORBIDDEN_NAMES = {
    "eval": "evaluates arbitrary code", "exec": "runs arbitrary code", "compile": "builds code objects",
    "open": "reads and writes files", "input": "reads the terminal", "breakpoint": "starts a debugger",
    "globals": "exposes the module namespace", "locals": "exposes the frame", "vars": "exposes namespaces",
    "getattr": "reaches attributes by computed name", "setattr": "changes attributes by computed name",
    "delattr": "deletes attributes by computed name", "memoryview": "exposes raw memory",
    "exit": "stops the interpreter", "quit": "stops the interpreter", "help": "reads the terminal",
}
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(text: str | None) -> str | None:
    """The Python code in a chat answer: the first fenced block (```python, ```py or bare ```) that
    defines a function, else the first fenced block, else the whole text when it parses and defines
    a function; None when there is none. An unterminated fence (the answer was cut off) counts as
    running to the end of the text."""
    if not text or not text.strip():
        return None
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(text)]
    blocks = [body for lang, body in blocks if lang in ("", "python", "py", "python3")]
    for body in blocks:
        if re.search(r"^\s*def\s+\w+\s*\(", body, re.MULTILINE):
            return body.strip("\n") + "\n"
    if blocks:
        return blocks[0].strip("\n") + "\n"
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return None
    return text.strip("\n") + "\n" if any(isinstance(n, ast.FunctionDef) for n in tree.body) else None


def check_reward_code(code: str, *, function_name: str | None = None) -> list[str]:
    """Problems with ``code`` as a reward function, each ``line N: what is wrong; what to do``;
    an empty list means it passes. ``function_name``: the name the function must have (any name
    when None)."""
    try:
        tree = ast.parse(code)
    except SyntaxError as err:
        return [f"line {err.lineno}: syntax error: {err.msg}; return valid Python 3 code"]
    problems = []
    functions = [node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    if len(functions) != 1:
        names = ", ".join(f.name for f in functions) or "none"
        problems.append(f"define exactly one top-level function (found {len(functions)}: {names}); put helpers "
                        "inside it")
    for node in tree.body:
        if not _allowed_top_level(node):
            problems.append(f"line {node.lineno}: only imports, constants and the one function may be at top "
                            f"level, not {type(node).__name__}; move this code into the function")
    for fn in functions:
        problems += _signature_problems(fn, function_name)
    for node in ast.walk(tree):
        problems += _node_problems(node)
    return problems


def function_name_of(code: str) -> str | None:
    """The name of the (first) top-level function of ``code``, or None."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return None
    return next((n.name for n in tree.body if isinstance(n, ast.FunctionDef)), None)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def _allowed_top_level(node: ast.stmt) -> bool:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Import, ast.ImportFrom, ast.Assign,
                         ast.AnnAssign)):
        return True
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def _signature_problems(fn: ast.FunctionDef | ast.AsyncFunctionDef, function_name: str | None) -> list[str]:
    wanted = f"def {function_name or fn.name}(prompts, completions, **kwargs)"
    problems = []
    if isinstance(fn, ast.AsyncFunctionDef):
        problems.append(f"line {fn.lineno}: the reward function must be a plain def, not async def")
    if function_name is not None and fn.name != function_name:
        problems.append(f"line {fn.lineno}: the function is called {fn.name!r}; name it {function_name!r}")
    args = fn.args
    positional = [a.arg for a in args.posonlyargs + args.args]
    if positional != ["prompts", "completions"] or args.vararg or args.kwonlyargs or args.kwarg is None:
        problems.append(f"line {fn.lineno}: the signature must be `{wanted}` (two positional parameters named "
                        "prompts and completions, then **kwargs for the row fields)")
    if fn.decorator_list:
        problems.append(f"line {fn.lineno}: no decorators on the reward function")
    return problems


def _node_problems(node: ast.AST) -> list[str]:
    line = getattr(node, "lineno", "?")
    if isinstance(node, ast.Import):
        return [_import_problem(line, alias.name) for alias in node.names if not _allowed_module(alias.name)]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            return [f"line {line}: relative imports are not allowed"]
        return [] if _allowed_module(node.module or "") else [_import_problem(line, node.module or "")]
    if isinstance(node, ast.Name) and node.id in FORBIDDEN_NAMES:
        return [f"line {line}: `{node.id}` is not allowed ({FORBIDDEN_NAMES[node.id]}); compute the reward from "
                "the arguments only"]
    if isinstance(node, ast.Name) and _dunder(node.id):
        return [f"line {line}: the name `{node.id}` is not allowed (no dunder names in reward code)"]
    if isinstance(node, ast.Attribute) and _dunder(node.attr):
        return [f"line {line}: the attribute `.{node.attr}` is not allowed (no dunder attributes in reward code)"]
    if isinstance(node, (ast.Global, ast.Nonlocal)):
        return [f"line {line}: `{type(node).__name__.lower()}` is not allowed; keep state local to the function"]
    if isinstance(node, ast.ClassDef):
        return [f"line {line}: class definitions are not allowed; use functions, tuples and dicts"]
    return []


def _allowed_module(name: str) -> bool:
    return name.split(".")[0] in ALLOWED_MODULES


def _import_problem(line, name: str) -> str:
    return (f"line {line}: importing {name!r} is not allowed; reward code may import only "
            f"{', '.join(ALLOWED_MODULES)}")


def _dunder(name: str) -> bool:
    return name.startswith("__") and name.endswith("__") and len(name) > 4
