"""The calculator tool and the tool-use family: large multiplications (3-4 digits by 3-4 digits) that the model
should hand to `calculator` instead of working out.

`calculator` parses with `ast` and walks the tree itself; it never calls eval. Only integers, + - * /, unary minus
and parentheses are accepted: no names, calls, attributes or `**` (a power is the classic way to make an evaluator
spend unbounded time and memory), and the input length and every intermediate value are bounded.
"""

from __future__ import annotations

import ast
import random
from fractions import Fraction

from ..tokenizer_train import CALCULATOR_TOOL
from .common import check_split, draw, rng_for, split_of
from .example import Example

MAX_EXPRESSION_CHARS = 256
MAX_ABS_VALUE = 10 ** 60
TEMPLATES = ("What is {a} * {b}?", "Compute {a} * {b}.", "{a} * {b} = ?", "What's {a} times {b}?",
             "Multiply {a} by {b}.", "Calculate {a} * {b}.", "What is the product of {a} and {b}?")
HELDOUT_PERCENT = 10
_BINARY = {ast.Add: lambda x, y: x + y, ast.Sub: lambda x, y: x - y, ast.Mult: lambda x, y: x * y}


def _eval(node: ast.AST, expression: str) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) is int:  # type() is int: rejects True/False
        value = Fraction(node.value)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _eval(node.operand, expression)
        value = -value if isinstance(node.op, ast.USub) else value
    elif isinstance(node, ast.BinOp) and (type(node.op) in _BINARY or isinstance(node.op, ast.Div)):
        x, y = _eval(node.left, expression), _eval(node.right, expression)
        if isinstance(node.op, ast.Div):
            if y == 0:
                raise ValueError(f"calculator: division by zero in {expression!r}")
            value = x / y
        else:
            value = _BINARY[type(node.op)](x, y)
    else:
        what = ast.get_source_segment(expression, node) or type(node).__name__
        raise ValueError(f"calculator: {what!r} is not allowed; only integers, + - * /, unary minus and parentheses "
                         f"are (no names, calls or **)")
    if abs(value) > MAX_ABS_VALUE:
        raise ValueError(f"calculator: a value in {expression!r} exceeds 10**60")
    return value


def _format(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    # A non-integer quotient: 12 decimals, trailing zeros dropped (exact whenever the decimal terminates by then).
    sign, q = ("-" if value < 0 else ""), abs(value)
    whole, frac = divmod(q.numerator * 10 ** 12 // q.denominator, 10 ** 12)
    return f"{sign}{whole}.{str(frac).rjust(12, '0').rstrip('0') or '0'}"


def calculator(expression: str) -> str:
    """Evaluate an integer arithmetic expression exactly: "4821 * 7391" -> "35632011"; "7 / 2" -> "3.5"."""
    if not isinstance(expression, str):
        raise ValueError(f"calculator: expected an expression string, got {type(expression).__name__}")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"calculator: expression is {len(expression)} characters, the limit is "
                         f"{MAX_EXPRESSION_CHARS}")
    if not expression.strip():
        raise ValueError("calculator: empty expression")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError) as e:
        raise ValueError(f"calculator: cannot parse {expression!r} ({e.msg if isinstance(e, SyntaxError) else e})") \
            from None
    except RecursionError:
        raise ValueError(f"calculator: {expression!r} is nested too deeply") from None
    try:
        return _format(_eval(tree.body, expression.strip()))
    except RecursionError:
        raise ValueError(f"calculator: {expression!r} is nested too deeply") from None


def pair_split(a: int, b: int) -> str:
    return split_of(f"{a} * {b} tool", HELDOUT_PERCENT)


def tool_example(a: int, b: int, template: str) -> Example:
    expression = f"{a} * {b}"
    result = calculator(expression)
    call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": expression}}}
    messages = [
        {"role": "user", "content": template.format(a=a, b=b)},
        {"role": "assistant", "reasoning_content": "This is a large multiplication; I will use the calculator.",
         "content": "", "tool_calls": [call]},
        {"role": "tool", "content": result},
        {"role": "assistant", "reasoning_content": f"The calculator returned {result}.",
         "content": f"{expression} = {result}."},
    ]
    return Example("tool", messages, result, tools=[CALCULATOR_TOOL],
                   meta={"op": "*", "digits": max(len(str(a)), len(str(b))), "a": a, "b": b})


def tool(split: str, n: int, seed: int = 0) -> list[Example]:
    check_split(split)
    rng = rng_for("tool", split, seed)

    def make(r: random.Random) -> tuple[int, int]:
        return tuple(r.randrange(10 ** (d - 1), 10 ** d) for d in (r.randint(3, 4), r.randint(3, 4)))

    out = []
    for _ in range(n):
        a, b = draw(rng, lambda p: pair_split(*p) == split, make, f"{split} tool problem")
        out.append(tool_example(a, b, rng.choice(TEMPLATES)))
    return out
