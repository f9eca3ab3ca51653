"""The `tool_choice` family: the user declares tools (1-4 of many, glm5.data.capabilities) and asks something.
The right move is one of:
  call    a declared tool does what is asked: call it, with the arguments copied from the request under that
          tool's own parameter names (the chat then gets the tool's result and an answer that uses it);
  refuse  what is asked needs a tool and none declared does it: say so ("I can't look up the weather: I have no
          tool for that."; a large multiplication without a declared calculator gets the arithmetic refusal);
  answer  the request needs no tool (arithmetic the column method does, a world fact, an unknown name, small talk):
          answer as without tools.
Never a tool that was not declared. The reasoning writes a tool's name in double quotes, as its declaration does
(`"name": "fx_convert"`): the pre-tokeniser then cuts the name into the same tokens in both places (unquoted after a
space it would start with a different token), so naming a declared tool is a token-for-token copy.

meta["expect"] is "call" or "answer" (a refusal is an answer), meta["call"] the gold call ({"name", "arguments"}) or
None, meta["declared"] the declared names, meta["inner"] the family whose rule scores an answer (arithmetic, world,
unknown, chat, scope).

The eval scores the first assistant turn (glm5.eval.score): calling an undeclared tool, calling when it should
answer, or answering when it should call are wrong whatever the rest.

Splits, disjoint by construction: tools and request wordings come from the split's half of the catalog
(glm5.data.capabilities), the calculator's problems and names are split by hash (glm5.data.tool, glm5.data.scope),
and the questions of `answer` chats are the split's own examples of their families.
"""

from __future__ import annotations

import random

from .arithmetic import arithmetic
from .capabilities import BY_KEY, CALCULATORS, CAPABILITIES, Capability, Tool, call_args, made_up_tool
from .common import Pool, check_split, draw, rng_for
from .example import Example
from .scope import multiply_example, tool_refusal
from .smalltalk import chat
from .tool import TEMPLATES as CALC_TEMPLATES, calculator, pair_split
from .world import unknown_family, world_family
from .wording import arithmetic_typed

CASES = ("call", "refuse", "answer")
CASE_WEIGHTS = (0.5, 0.25, 0.25)
CALC = "calculator"  # the key of the calculator capability (built here, not in the catalog)
KEYS = tuple(c.key for c in CAPABILITIES) + (CALC,)
# Share of training tools declared under made-up names (glm5.data.capabilities.made_up_tool); the rest keep the
# split's fixed names, "calculator" among them.
MADE_UP = 0.75
ANSWER_FAMILIES = ("arithmetic", "arithmetic_typed", "world", "unknown", "chat")


def _tools_of(key: str, split: str) -> tuple[Tool, ...]:
    i = split == "heldout"
    return CALCULATORS[i] if key == CALC else BY_KEY[key].tools[i]


def _schema(key: str, tool: Tool) -> dict:
    return tool.schema({} if key == CALC else BY_KEY[key].slot_types())


def _declare(rng: random.Random, split: str, must: str | None, avoid: set[str]) -> list[tuple[str, Tool]]:
    """1-4 (capability, tool) pairs of distinct capabilities, `must` among them (when given), none in `avoid`."""
    others = [k for k in KEYS if k != must and k not in avoid]
    keys = rng.sample(others, rng.randint(1, 4) - (must is not None))
    if must is not None:
        keys.insert(rng.randrange(len(keys) + 1), must)
    out, names = [], set()
    for k in keys:
        tool = draw(rng, lambda t: t.name not in names, lambda r: _tool(r, k, split), "distinct tool name")
        names.add(tool.name)
        out.append((k, tool))
    return out


def _tool(rng: random.Random, key: str, split: str) -> Tool:
    """A tool of capability `key`: in training mostly a made-up one (MADE_UP), else one of the split's fixed tools."""
    tools = _tools_of(key, split)
    return made_up_tool(rng, tools) if split == "train" and rng.random() < MADE_UP else rng.choice(tools)


def _q(name: str) -> str:
    """A tool name as the reasoning writes it: quoted, as in its declaration (see the module docstring)."""
    return f'"{name}"'


def _big_product(rng: random.Random, split: str) -> tuple[int, int]:
    """A 3-4 digit by 3-4 digit product of the split (the tool family's problems and hash)."""
    return draw(rng, lambda p: pair_split(*p) == split,
                lambda r: tuple(r.randrange(10 ** (d - 1), 10 ** d) for d in (r.randint(3, 4), r.randint(3, 4))),
                f"{split} calculator problem")


def _request(rng: random.Random, split: str, key: str) -> tuple[str, dict, str]:
    """(question, slot values, template) asking for capability `key`."""
    if key == CALC:
        a, b = _big_product(rng, split)
        template = rng.choice(CALC_TEMPLATES) if split == "train" else rng.choice(
            ("How much is {a} * {b}?", "Work out {a} times {b}.", "{a} multiplied by {b} is what?"))
        return template.format(a=a, b=b), {"expression": f"{a} * {b}", "a": a, "b": b}, template
    cap: Capability = BY_KEY[key]
    template = rng.choice(cap.requests[split == "heldout"])
    slots = cap.slots(rng)
    return template.format(**slots), slots, template


def _result(rng: random.Random, key: str, slots: dict) -> tuple[str, str]:
    """(tool output, final answer) for a call of capability `key`."""
    if key == CALC:
        result = calculator(slots["expression"])
        return result, f"{slots['expression']} = {result}."
    cap = BY_KEY[key]
    result = cap.result(slots, rng)
    return result, cap.final.format(result=result, **slots)


def call_chat(rng: random.Random, split: str) -> Example:
    key = rng.choice(KEYS)
    question, slots, template = _request(rng, split, key)
    declared = _declare(rng, split, key, set())
    tool = next(t for k, t in declared if k == key)
    args = call_args(tool, {s: slots[s] for s in tool.params})
    result, final = _result(rng, key, slots)
    what = "This is a large multiplication." if key == CALC else f"This needs a tool that can {BY_KEY[key].refusal}."
    call = {"type": "function", "function": {"name": tool.name, "arguments": args}}
    messages = [{"role": "user", "content": question},
                {"role": "assistant", "reasoning_content": f"{what} {_q(tool.name)} does it, so I call it.",
                 "content": "", "tool_calls": [call]},
                {"role": "tool", "content": result},
                {"role": "assistant", "reasoning_content": f"{_q(tool.name)} returned {result}.", "content": final}]
    return Example("tool_choice", messages, final, tools=[_schema(k, t) for k, t in declared],
                   meta={"expect": "call", "call": {"name": tool.name, "arguments": args}, "capability": key,
                         "declared": [t.name for _, t in declared], "inner": None, "template": template})


def refuse_chat(rng: random.Random, split: str) -> Example:
    key = rng.choice(KEYS)
    declared = _declare(rng, split, None, {key})
    names = [t.name for _, t in declared]
    listed = ", ".join(map(_q, names))
    if key == CALC:  # the arithmetic refusal, in the scope family's words
        inner = multiply_example(rng, split)
        user, gold = inner.messages
        reasoning = f"None of my tools ({listed}) is a calculator. {gold['reasoning_content']}"
        question, content, specific, template = user["content"], gold["content"], inner.meta["specific"], \
            inner.meta["template"]
    else:
        cap = BY_KEY[key]
        question, _, template = _request(rng, split, key)
        reasoning = f"This needs a tool that can {cap.refusal}. None of my tools ({listed}) can."
        content, specific = tool_refusal(cap.refusal), f"I can't {cap.refusal}"
    messages = [{"role": "user", "content": question},
                {"role": "assistant", "reasoning_content": reasoning, "content": content}]
    return Example("tool_choice", messages, specific, tools=[_schema(k, t) for k, t in declared],
                   meta={"expect": "answer", "call": None, "capability": key, "declared": names, "inner": "scope",
                         "specific": specific, "template": template})


_INNER = {"arithmetic": arithmetic, "arithmetic_typed": arithmetic_typed, "world": world_family,
          "unknown": unknown_family, "chat": chat}


def answer_chat(inner: Example, rng: random.Random, split: str) -> Example:
    """A chat of another family with tools declared that it does not need (no calculator for arithmetic)."""
    declared = _declare(rng, split, None, {CALC} if inner.family == "arithmetic" else set())
    names = [t.name for _, t in declared]
    user, gold = inner.messages[:2]
    gold = {**gold, "reasoning_content": f"No tool is needed. {gold['reasoning_content']}"}
    return Example("tool_choice", [user, gold], inner.answer, tools=[_schema(k, t) for k, t in declared],
                   meta={**inner.meta, "expect": "answer", "call": None, "declared": names, "inner": inner.family})


def tool_choice(split: str, n: int, seed: int = 0, world_seed: int = 0) -> list[Example]:
    check_split(split)
    rng = rng_for("tool_choice", split, seed)
    # The answer chats' questions: each family's own split and seeded stream.
    inner = {f: Pool(g, split, seed, **({"world_seed": world_seed} if f in ("world", "unknown") else {}))
             for f, g in _INNER.items()}
    out = []
    for _ in range(n):
        case = rng.choices(CASES, CASE_WEIGHTS)[0]
        if case == "call":
            out.append(call_chat(rng, split))
        elif case == "refuse":
            out.append(refuse_chat(rng, split))
        else:
            out.append(answer_chat(inner[rng.choice(ANSWER_FAMILIES)].next(), rng, split))
    return out
