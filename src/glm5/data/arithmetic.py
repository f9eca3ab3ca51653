"""Arithmetic with written-out column reasoning: addition, subtraction (results may be negative), and a number of up
to 4 digits times one digit.

The reasoning is the school column method from the ones digit up, one clause per column, in one fixed shape per op,
so a tiny model only has to learn single-digit facts plus where to copy digits from (the tokenizer gives every digit
its own token). Every column after the first names its carry/borrow even when it is 0, and a final carry becomes
one more column of zeros ("0 + 0 + 1 = 1, write 1 carry 0.") rather than a new phrase. A multiplication column
states the table fact before adding the carry: "3 * 7 + 2 = 23" in one step asks for a three-input fact, and a
model trained on that one-step shape missed its multiplications at such steps ("7 * 4 + 2 = 34"; dev/LOG.md):

    4 + 8 = 12, write 2 carry 1. 3 + 7 + 1 = 11, write 1 carry 1. ... Answer: 6912.
    4 - 8 = -4, write 6 borrow 1. 3 - 7 - 1 = -5, write 5 borrow 1. ... Answer: 1234.
    12 < 345, so compute 345 - 12 and negate. 5 - 2 = 3, write 3 borrow 0. ... Answer: -333.
    4 * 7 = 28, write 8 carry 2. 3 * 7 = 21, 21 + 2 = 23, write 3 carry 2. ... Answer: 8638.

The split is a hash of "a op b", so a heldout problem never appears in train, under any seed or template.
"""

from __future__ import annotations

import random
from typing import Iterator

from .common import check_split, draw, rng_for, split_of
from .example import Example

OPS = ("+", "-", "*")
TEMPLATES = {
    "+": ("What is {a} + {b}?", "Compute {a} + {b}.", "{a} + {b} = ?", "What's {a} plus {b}?", "Add {a} and {b}.",
          "Calculate {a} + {b}.", "What is the sum of {a} and {b}?"),
    "-": ("What is {a} - {b}?", "Compute {a} - {b}.", "{a} - {b} = ?", "What's {a} minus {b}?",
          "Subtract {b} from {a}.", "Calculate {a} - {b}."),
    "*": ("What is {a} * {b}?", "Compute {a} * {b}.", "{a} * {b} = ?", "What's {a} times {b}?",
          "Multiply {a} by {b}.", "Calculate {a} * {b}."),
}
HELDOUT_PERCENT = 10


def _digits(n: int, width: int) -> list[int]:
    """Ones digit first, zero-padded to width."""
    return [(n // 10 ** i) % 10 for i in range(width)]


def add_steps(a: int, b: int) -> str:
    width = max(len(str(a)), len(str(b)))
    out, carry = [], 0
    for i, (x, y) in enumerate(zip(_digits(a, width), _digits(b, width))):
        s = x + y + carry
        lhs = f"{x} + {y}" if i == 0 else f"{x} + {y} + {carry}"
        out.append(f"{lhs} = {s}, write {s % 10} carry {s // 10}.")
        carry = s // 10
    if carry:
        out.append(f"0 + 0 + {carry} = {carry}, write {carry} carry 0.")
    return " ".join(out + [f"Answer: {a + b}."])


def sub_steps(a: int, b: int) -> str:
    if a < b:
        # Subtract the other way and negate: one borrow procedure, never a borrow out of the top column.
        head = f"{a} < {b}, so compute {b} - {a} and negate. "
        return head + sub_steps(b, a).replace(f"Answer: {b - a}.", f"Answer: {a - b}.")
    width = len(str(a))
    out, borrow = [], 0
    for i, (x, y) in enumerate(zip(_digits(a, width), _digits(b, width))):
        d = x - y - borrow
        lhs = f"{x} - {y}" if i == 0 else f"{x} - {y} - {borrow}"
        out.append(f"{lhs} = {d}, write {d % 10} borrow {int(d < 0)}.")
        borrow = int(d < 0)
    return " ".join(out + [f"Answer: {a - b}."])


def mul_steps(a: int, b: int) -> str:
    if not 0 <= b <= 9:
        raise ValueError(f"mul_steps multiplies by one digit, got {b}")
    out, carry = [], 0
    for i, x in enumerate(_digits(a, len(str(a)))):
        p = x * b + carry
        lhs = f"{x} * {b}" if i == 0 else f"{x} * {b} = {x * b}, {x * b} + {carry}"  # a table fact, then the carry
        out.append(f"{lhs} = {p}, write {p % 10} carry {p // 10}.")
        carry = p // 10
    if carry:  # a one-digit multiplier leaves a carry of at most 8: one more column
        out.append(f"0 * {b} = 0, 0 + {carry} = {carry}, write {carry} carry 0.")
    return " ".join(out + [f"Answer: {a * b}."])


STEPS = {"+": add_steps, "-": sub_steps, "*": mul_steps}
RESULT = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def pair_split(a: int, op: str, b: int) -> str:
    return split_of(f"{a} {op} {b}", HELDOUT_PERCENT)


def _number(rng: random.Random, digits: int) -> int:
    return rng.randrange(10) if digits == 1 else rng.randrange(10 ** (digits - 1), 10 ** digits)


def arithmetic_example(a: int, op: str, b: int, template: str) -> Example:
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    value = RESULT[op](a, b)
    messages = [{"role": "user", "content": template.format(a=a, b=b)},
                {"role": "assistant", "reasoning_content": STEPS[op](a, b), "content": f"{a} {op} {b} = {value}."}]
    return Example("arithmetic", messages, str(value),
                   meta={"op": op, "digits": max(len(str(a)), len(str(b))), "a": a, "b": b})


def problems(split: str, rng: random.Random, ops: tuple[str, ...] = OPS, max_digits: int = 4,
             min_digits: int = 1) -> Iterator[tuple[int, str, int]]:
    """(a, op, b) of `split`, drawn from rng one at a time (the caller may draw from rng in between): operand digit
    counts independent in min_digits..max_digits, the multiplier of '*' one digit. Bad options fail here, not at the
    first draw."""
    check_split(split)
    if not ops or any(op not in OPS for op in ops):
        raise ValueError(f"ops must be a non-empty subset of {OPS}, got {ops!r}")
    if not 1 <= max_digits <= 9:
        raise ValueError(f"max_digits must be in 1..9, got {max_digits}")
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"min_digits must be in 1..max_digits ({max_digits}), got {min_digits}")

    def make(r: random.Random) -> tuple[int, str, int]:
        op = r.choice(ops)
        a = _number(r, r.randint(min_digits, max_digits))
        b = r.randrange(10) if op == "*" else _number(r, r.randint(min_digits, max_digits))
        return a, op, b

    def gen() -> Iterator[tuple[int, str, int]]:
        while True:
            yield draw(rng, lambda p: pair_split(*p) == split, make, f"{split} arithmetic problem")

    return gen()


def arithmetic(split: str, n: int, seed: int = 0, ops: tuple[str, ...] = OPS, max_digits: int = 4,
               min_digits: int = 1) -> list[Example]:
    """Operand digit counts drawn independently from min_digits..max_digits; the multiplier of '*' is one digit."""
    rng = rng_for("arithmetic", split, seed)
    out = []
    for _, (a, op, b) in zip(range(n), problems(split, rng, ops, max_digits, min_digits)):
        out.append(arithmetic_example(a, op, b, rng.choice(TEMPLATES[op])))
    return out
