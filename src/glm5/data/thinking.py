"""Thinking-off chats: any example with thinking turned off, as GLM-5's template renders it with
enable_thinking=False (the generation prompt `<|assistant|></think>`: no reasoning block).

With no room to think, an answer the model can give directly stays as it was (a world fact, an abstention, small
talk, a refusal, a tool call). Arithmetic is not such an answer for a 7M model: its column method is the work, so a
thinking-off turn writes that work in its visible content, then the answer line ("4 + 8 = 12, write 2 carry 1. ...
Answer: 6912.\\n1234 + 5678 = 6912."). A reasoning that holds column clauses ("write 2 carry 1.") is work to show;
any other reasoning is dropped.

The transform keeps the example's split: it changes the answer's form, never the question.
"""

from __future__ import annotations

import re
from dataclasses import replace

from .arithmetic import arithmetic
from .common import Pool, check_split, rng_for
from .example import Example
from .multiturn import multiturn
from .scope import scope
from .smalltalk import chat
from .wording import arithmetic_typed
from .world import unknown_family, world_family

_COLUMN = re.compile(r"write \d (?:carry|borrow) \d\.")


def shows_work(reasoning: str | None) -> bool:
    """Is this reasoning a column walk (work the thinking-off answer must show)?"""
    return bool(reasoning) and _COLUMN.search(reasoning) is not None


def thinking_off_message(m: dict) -> dict:
    if m.get("role") != "assistant":
        return m
    reasoning = m.get("reasoning_content")
    out = {k: v for k, v in m.items() if k != "reasoning_content"}
    if shows_work(reasoning):
        out["content"] = f"{reasoning.strip()}\n{m['content']}"
    return out


def thinking_off(ex: Example) -> Example:
    """The same chat with thinking off: no reasoning in any assistant turn, column work moved into the content."""
    return replace(ex, messages=[thinking_off_message(m) for m in ex.messages], meta={**ex.meta, "thinking": False},
                   thinking=False)


def nothink(split: str, n: int, seed: int = 0, world_seed: int = 0) -> list[Example]:
    """Thinking-off chats of the families a user asks without tools (drawn by the weights below), each from its
    family's own split (so disjoint as that family is)."""
    sources = {"arithmetic": (arithmetic, 0.3), "arithmetic_typed": (arithmetic_typed, 0.15),
               "world": (world_family, 0.2), "unknown": (unknown_family, 0.1), "chat": (chat, 0.1),
               "scope": (scope, 0.1), "multiturn": (multiturn, 0.05)}
    check_split(split)
    rng = rng_for("nothink", split, seed)
    pools = {k: Pool(g, split, seed, **({"world_seed": world_seed} if k in ("world", "unknown", "scope", "multiturn")
                                        else {})) for k, (g, _) in sources.items()}
    names, weights = list(sources), [w for _, w in sources.values()]
    return [thinking_off(pools[rng.choices(names, weights)[0]].next()) for _ in range(n)]
