"""The ``calculator`` environment and its safe arithmetic evaluator (docs/methods/tools.md).

The model calls the tool by writing ``<calc>EXPRESSION</calc>`` in its turn; the environment answers
with the value (or ``error: ...``) as the next observation. A turn without a call is the final
answer and ends the episode.

:func:`safe_eval` never calls ``eval``: it parses the text with :func:`ast.parse` and walks a
whitelist of nodes (numbers, ``+ - * / // % **``, unary ``+ -``, parentheses), with bounds on the
text (``MAX_CHARS``), the tree (``MAX_NODES``, ``MAX_DEPTH``), every integer (``MAX_BITS``, checked
*before* a multiplication or a power is computed, so ``9**9**9`` is refused without being tried)
and every float (finite). Anything else — names, calls, attributes, strings, comparisons,
comprehensions, lambdas, shifts, bit operations — is refused with the node's name. The model's text
is outside input: ``tests/test_envs.py`` holds the attacks.
"""

from __future__ import annotations

import ast
import math
import operator
import re

from rlxf.envs.base import ToolEnv

MAX_CHARS = 200       # expression text
MAX_NODES = 64        # AST nodes
MAX_DEPTH = 24        # nesting of the AST
MAX_BITS = 256        # magnitude of every integer (inputs, intermediates, result)
MAX_EXPONENT = 256    # |exponent| of a power

CALL_RE = re.compile(r"<calc>(.*?)</calc>", re.DOTALL)


class CalculatorError(ValueError):
    """The expression is not one the calculator evaluates; the message says why."""


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def safe_eval(text: str) -> int | float:
    """The value of the arithmetic expression ``text``; raises :class:`CalculatorError` otherwise."""
    if not isinstance(text, str):
        raise CalculatorError(f"expected text, got {type(text).__name__}")
    if len(text) > MAX_CHARS:
        raise CalculatorError(f"expression longer than {MAX_CHARS} characters")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as err:
        raise CalculatorError(f"not an arithmetic expression ({type(err).__name__})") from None
    nodes = list(ast.walk(tree))
    if len(nodes) > MAX_NODES:
        raise CalculatorError(f"expression has more than {MAX_NODES} parts")
    return _value(tree.body, 0)


def _value(node: ast.AST, depth: int) -> int | float:
    if depth > MAX_DEPTH:
        raise CalculatorError(f"expression nested deeper than {MAX_DEPTH}")
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CalculatorError(f"only numbers are allowed, got {type(value).__name__}")
        return _checked(value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _checked(_UNARY[type(node.op)](_value(node.operand, depth + 1)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left, depth + 1), _value(node.right, depth + 1)
        _check_cost(node.op, left, right)
        try:
            return _checked(_BINARY[type(node.op)](left, right))
        except ZeroDivisionError:
            raise CalculatorError("division by zero") from None
        except OverflowError:
            raise CalculatorError("result out of range") from None
    raise CalculatorError(f"{type(node).__name__} is not allowed (numbers, + - * / // % ** and parentheses only)")


def _check_cost(op: ast.operator, left, right) -> None:
    """Refuse a product or power whose integer result would exceed ``MAX_BITS`` before computing it."""
    if isinstance(op, ast.Pow):
        if isinstance(right, float) and not right.is_integer() and isinstance(left, (int, float)) and left < 0:
            raise CalculatorError("fractional power of a negative number")
        if abs(right) > MAX_EXPONENT:
            raise CalculatorError(f"exponent larger than {MAX_EXPONENT}")
        if isinstance(left, int) and isinstance(right, int) and right > 0:
            if max(abs(left).bit_length() - 1, 0) * right > MAX_BITS:
                raise CalculatorError(f"result larger than 2**{MAX_BITS}")
        if left == 0 and right < 0:
            raise CalculatorError("division by zero")
    if isinstance(op, ast.Mult) and isinstance(left, int) and isinstance(right, int):
        if abs(left).bit_length() + abs(right).bit_length() > MAX_BITS + 1:
            raise CalculatorError(f"result larger than 2**{MAX_BITS}")


def _checked(value):
    if isinstance(value, complex):
        raise CalculatorError("complex result")
    if isinstance(value, int) and abs(value).bit_length() > MAX_BITS:
        raise CalculatorError(f"number larger than 2**{MAX_BITS}")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("result out of range")
    return value


def format_value(value: int | float) -> str:
    """The observation text of a value: integers exactly, floats to 12 significant digits."""
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:.12g}"
    return str(value)


class CalculatorEnv(ToolEnv):
    """One episode with a calculator (the ``Environment`` interface of :mod:`rlxf.rollout.multiturn`):
    the first ``<calc>…</calc>`` of a turn is evaluated by :func:`safe_eval` and its value (or
    ``error: …``) is the observation; a turn without one ends the episode (:class:`ToolEnv`)."""

    CALL_RE = CALL_RE

    def run(self, call: str) -> str:
        try:
            return format_value(safe_eval(call))
        except CalculatorError as err:
            return f"error: {err}"

    def call_text(self, expression: str) -> str:
        return f"<calc>{expression}</calc>"

    def demo_observation(self, value: int | float) -> str:
        return format_value(value)
