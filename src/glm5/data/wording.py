"""Arithmetic asked the way people type it: the `arithmetic_typed` generator.

A typed question is a frame ("how much is {e}", "can you {v}") around an expression in one of many spellings
("1234+5678", "1234 plus 5678", "subtract 5678 from 1234", "7 x 345"), with numbers written plain or with thousands
separators ("1,234"), in lower, sentence or upper case, with optional filler words ("hey,", "thanks"), end
punctuation or none, and sometimes one typo in a word of the frame or filler ("waht is", "plese") - never in a number
or an operator word, which the answer depends on.

The gold reasoning first restates the problem in the one canonical form the arithmetic family uses ("Compute 1234 +
5678.", a one-digit factor moved last, "subtract b from a" turned into "a - b") and then works it by the same column
method (glm5.data.arithmetic's add_steps / sub_steps / mul_steps), so the only new skill is reading the question: the
model copies the operands into a form it already knows how to work.

Splits, disjoint by construction: the frames and the filler words are two disjoint lists (TRAIN / HELDOUT), and a
question's template (the question with its operands replaced by {a} and {b}) is built only from its split's frames
and fillers, so no held-out template occurs in training; the operand triple is split by glm5.data.arithmetic's hash,
so no held-out problem occurs in training either, in any wording. The expression spellings, number styles, cases and
typo kinds are shared: they are the skill the held-out questions measure, in frames never trained.
"""

from __future__ import annotations

import random

from .arithmetic import OPS, RESULT, STEPS, problems
from .common import rng_for
from .example import Example

# Expression spellings: (text with {a} {b}, kind). "expr" reads as a noun phrase ("what is 3+4"), "verb" as an
# imperative ("subtract 4 from 3"). Operands keep their order (a op b) except where the words reverse it.
SPELLINGS = {
    "+": (("{a} + {b}", "expr"), ("{a}+{b}", "expr"), ("{a} +{b}", "expr"), ("{a}+ {b}", "expr"),
          ("{a} plus {b}", "expr"), ("{a}plus{b}", "expr"), ("the sum of {a} and {b}", "expr"),
          ("{a} and {b} added together", "expr"), ("add {a} and {b}", "verb"), ("add {b} to {a}", "verb"),
          ("sum {a} and {b}", "verb")),
    "-": (("{a} - {b}", "expr"), ("{a}-{b}", "expr"), ("{a} -{b}", "expr"), ("{a}- {b}", "expr"),
          ("{a} minus {b}", "expr"), ("{a} take away {b}", "expr"), ("{a} less {b}", "expr"),
          ("subtract {b} from {a}", "verb"), ("take {b} away from {a}", "verb"), ("take {b} from {a}", "verb")),
    "*": (("{a} * {b}", "expr"), ("{a}*{b}", "expr"), ("{a} x {b}", "expr"), ("{a}x{b}", "expr"),
          ("{a} X {b}", "expr"), ("{a} \u00d7 {b}", "expr"), ("{a} times {b}", "expr"),
          ("{a} multiplied by {b}", "expr"), ("the product of {a} and {b}", "expr"), ("multiply {a} by {b}", "verb"),
          ("multiply {a} and {b}", "verb")),
}
# Frames around an expression ({e}) or an imperative ({v}), disjoint per split. Lower case: casing is applied after.
FRAMES = {
    "train": {
        "expr": ("what is {e}", "what's {e}", "whats {e}", "{e}", "{e} =", "{e} = ?", "{e}=?", "calculate {e}",
                 "compute {e}", "solve {e}", "what is the answer to {e}", "what does {e} equal", "{e} equals what",
                 "i need {e}", "tell me {e}", "do {e}", "what would {e} be", "what do you get for {e}",
                 "figure out {e}", "what is {e} equal to", "give me {e}", "find {e}"),
        "verb": ("{v}", "please {v}", "can you {v}", "{v} for me", "could you {v}", "pls {v}"),
    },
    "heldout": {
        "expr": ("how much is {e}", "evaluate {e}", "work out {e}", "what's the result of {e}", "{e} is what",
                 "can you do {e}", "quick one: {e}", "what does {e} make", "result of {e}"),
        "verb": ("would you {v}", "{v} quickly", "kindly {v}", "i want you to {v}"),
    },
}
PREFIXES = {"train": ("hey, ", "hi, ", "ok so ", "quick question: ", "hello, ", "so ", "um, "),
            "heldout": ("hey there, ", "excuse me, ", "alright, ", "one thing: ")}
SUFFIXES = {"train": (" please", " thanks", " pls", " thank you", " for me", " thx"),
            "heldout": (" cheers", " if you can", " ty", " asap")}
ENDINGS = ("", "", "?", "?", ".", "??", " ?", "!", "?!")
# Operator and number words a typo never touches: the answer depends on them.
_PROTECTED = frozenset(w for sp in SPELLINGS.values() for text, _ in sp for w in text.split() if "{" not in w)
_KEYS = "qwertyuiop asdfghjkl zxcvbnm".split()  # neighbouring keys for a slipped finger


def _typo(rng: random.Random, word: str) -> str:
    """One typing slip in a word: two letters swapped, one dropped, one doubled, or one hit on a neighbouring key."""
    i = rng.randrange(len(word) - 1)
    kind = rng.randrange(4)
    if kind == 0:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if kind == 1:
        return word[:i] + word[i + 1:]
    if kind == 2:
        return word[:i] + word[i] + word[i:]
    row = next((r for r in _KEYS if word[i] in r), None)
    if row is None:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    j = row.index(word[i])
    near = [row[k] for k in (j - 1, j + 1) if 0 <= k < len(row)]
    return word[:i] + rng.choice(near) + word[i + 1:]


def _misspell(rng: random.Random, text: str) -> str:
    """text with one typo in one word of 4+ letters outside {placeholders} and operator words (text unchanged if
    there is none)."""
    words = text.split(" ")
    spots = [i for i, w in enumerate(words)
             if len(w) >= 4 and w.isalpha() and w.lower() not in _PROTECTED]
    if not spots:
        return text
    i = rng.choice(spots)
    words[i] = _typo(rng, words[i])
    return " ".join(words)


def _write(n: int, commas: bool) -> str:
    return f"{n:,}" if commas else str(n)


def typed_template(rng: random.Random, split: str, op: str, swap: bool = False) -> tuple[str, str]:
    """A typed question template for `op` from the split's frames and fillers -> (template with {a} and {b}, the
    spelling used). swap: the spelling's {a} and {b} exchanged (a one-digit factor written first)."""
    spelling, kind = rng.choice(SPELLINGS[op])
    if swap:
        spelling = spelling.replace("{a}", "{t}").replace("{b}", "{a}").replace("{t}", "{b}")
    frame = rng.choice(FRAMES[split][kind])
    text = frame.replace("{e}" if kind == "expr" else "{v}", "\0")
    if rng.random() < 0.25:
        text = rng.choice(PREFIXES[split]) + text
    if rng.random() < 0.25:
        text += rng.choice(SUFFIXES[split])
    if rng.random() < 0.3:  # a typo in the frame or filler, never in the expression
        text = _misspell(rng, text)
    text = text.replace("\0", spelling) + rng.choice(ENDINGS)
    case = rng.random()
    if case < 0.35:
        text = text[0].upper() + text[1:]
    elif case < 0.5:
        text = text.upper().replace("{A}", "{a}").replace("{B}", "{b}")
    return text, spelling


def typed_question(rng: random.Random, split: str, a: int, op: str, b: int) -> tuple[str, str]:
    """A typed question asking a op b -> (question, template). A one-digit factor of '*' is written first at times;
    numbers of 4+ digits get thousands separators at times."""
    swap = op == "*" and b < 10 and rng.random() < 0.3
    template, _ = typed_template(rng, split, op, swap)
    commas = rng.random() < 0.3
    return template.format(a=_write(a, commas), b=_write(b, commas)), template


def typed_example(a: int, op: str, b: int, question: str, template: str) -> Example:
    value = RESULT[op](a, b)
    reasoning = f"Compute {a} {op} {b}. {STEPS[op](a, b)}"
    messages = [{"role": "user", "content": question},
                {"role": "assistant", "reasoning_content": reasoning, "content": f"{a} {op} {b} = {value}."}]
    return Example("arithmetic", messages, str(value),
                   meta={"op": op, "digits": max(len(str(a)), len(str(b))), "a": a, "b": b, "template": template,
                         "thousands": any(f"{x:,}" in question for x in (a, b) if x >= 1000), "typed": True})


def arithmetic_typed(split: str, n: int, seed: int = 0, ops: tuple[str, ...] = OPS, max_digits: int = 4,
                     min_digits: int = 1) -> list[Example]:
    """Arithmetic family examples in typed surface forms; operands as glm5.data.arithmetic draws them (the
    multiplier of '*' one digit)."""
    rng = rng_for("arithmetic_typed", split, seed)
    out = []
    for _, (a, op, b) in zip(range(n), problems(split, rng, ops, max_digits, min_digits)):
        question, template = typed_question(rng, split, a, op, b)
        out.append(typed_example(a, op, b, question, template))
    return out
