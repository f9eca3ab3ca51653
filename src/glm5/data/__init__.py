"""Offline, seeded task data for the CPU speedrun: six chat families (`examples`), an SFT mixture (`chat_mixture`),
and pre-training text (`pretrain_texts`: Python's documentation plus the invented world's encyclopedia).

More generators meet users where they are (`examples` takes their names too; none is in DEFAULT_WEIGHTS):
arithmetic_typed (arithmetic in the surface forms people type, wording.py), multiturn (chats of 1-3 turns scored on
the last, multiturn.py), nothink (thinking-off chats, thinking.py; any example also takes `thinking=False`), scope
(out-of-scope requests and their honest refusals, scope.py), tool_choice (user-declared tools: call one, or answer
without, tool_choice.py).

Every generator is a pure function of its arguments (no files, no network, no global state), and train/heldout are
split by a hash of what must not leak (operand pair, name, paragraph), or by disjoint lists of question templates,
never by seed.
"""

from __future__ import annotations

import inspect
import random

from .arithmetic import add_steps, arithmetic, mul_steps, sub_steps
from .common import check_split
from .copy import copy_texts
from .example import ABSTAIN, ALL_FAMILIES, FAMILIES, SPLITS, Example
from .smalltalk import chat
from .multiturn import multiturn
from .scope import scope
from .text import approx_tokens, natural_text, pretrain_texts, retrieval
from .thinking import nothink, thinking_off
from .tool import calculator, tool
from .tool_choice import tool_choice
from .wording import arithmetic_typed
from .world import ATTRIBUTES, KINDS, Entity, World, encyclopedia, unknown_family, world, world_family

GENERATORS = {"arithmetic": arithmetic, "world": world_family, "unknown": unknown_family, "retrieval": retrieval,
              "tool": tool, "chat": chat,
              "arithmetic_typed": arithmetic_typed, "multiturn": multiturn, "nothink": nothink, "scope": scope,
              "tool_choice": tool_choice}
# Named variants of a generator: the same generator and scoring with fixed options (suites for `glm5 eval --suites`
# and prompt sources for `glm5 rl --families`). Their examples keep the family's name. The _nothink ones ask the same
# held-out questions as their family's suite, with thinking off, so the two accuracies compare question for question.
VARIANTS = {"arithmetic_long": ("arithmetic", {"min_digits": 3, "max_digits": 4}),  # both operands of 3-4 digits
            "arithmetic_nothink": ("arithmetic", {"thinking": False}),
            "world_nothink": ("world", {"thinking": False}),
            "unknown_nothink": ("unknown", {"thinking": False}),
            "chat_nothink": ("chat", {"thinking": False}),
            "arithmetic_typed_nothink": ("arithmetic_typed", {"thinking": False})}
# Short families dominate; retrieval (1-4K tokens an example) only when the caller weights it in.
DEFAULT_WEIGHTS = {"arithmetic": 0.3, "world": 0.25, "unknown": 0.15, "tool": 0.15, "chat": 0.15, "retrieval": 0.0}


def examples(family: str, split: str, n: int, seed: int = 0, thinking: bool = True, **kw) -> list[Example]:
    """n examples of one generator (GENERATORS) or named variant (VARIANTS); the first k of n are the examples for
    n=k (same family, split, seed, kw). thinking=False: the same examples with thinking off (thinking.thinking_off)."""
    if family in VARIANTS:
        family, fixed = VARIANTS[family]
        kw = {**fixed, **kw}
        thinking = kw.pop("thinking", thinking)
    if family not in GENERATORS:
        raise ValueError(f"family must be one of {', '.join(tuple(GENERATORS) + tuple(VARIANTS))}, got {family!r}")
    check_split(split)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    extra = set(kw) - set(inspect.signature(GENERATORS[family]).parameters)
    if extra:
        allowed = [p for p in inspect.signature(GENERATORS[family]).parameters if p not in ("split", "n", "seed")]
        raise ValueError(f"family {family!r} takes no option {', '.join(sorted(extra))}; its options: "
                         f"{', '.join(allowed) or 'none'}")
    out = GENERATORS[family](split, n, seed, **kw)
    return out if thinking else [thinking_off(ex) for ex in out]


def chat_mixture(split: str, n: int, seed: int = 0, weights: dict[str, float] | None = None, **kw) -> list[Example]:
    """A seeded mixture for SFT: each example's generator drawn by weight (default DEFAULT_WEIGHTS, no retrieval; any
    name of GENERATORS may be weighted in).
    Options in kw go to every family that takes them (world_seed to world/unknown/retrieval; context_tokens, depth,
    count_tokens to retrieval; ops, max_digits to arithmetic); an option no drawn-able family takes is an error."""
    check_split(split)
    weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
    bad = [f for f in weights if f not in GENERATORS]
    if bad or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"weights must map generators ({', '.join(GENERATORS)}) to non-negative numbers with a "
                         f"positive sum, got {weights!r}")
    fams = [f for f in GENERATORS if weights.get(f, 0) > 0]
    params = {f: set(inspect.signature(GENERATORS[f]).parameters) for f in fams}
    unused = [k for k in kw if not any(k in p for p in params.values())]
    if unused:
        raise ValueError(f"no family in the mixture ({', '.join(fams)}) takes option(s) {', '.join(unused)}")
    rng = random.Random(f"glm5.data/mixture/{split}/{seed}")
    order = rng.choices(fams, weights=[weights[f] for f in fams], k=n)
    pools = {f: iter(GENERATORS[f](split, order.count(f), seed, **{k: v for k, v in kw.items() if k in params[f]}))
             for f in fams}
    return [next(pools[f]) for f in order]


__all__ = ["ABSTAIN", "ALL_FAMILIES", "ATTRIBUTES", "DEFAULT_WEIGHTS", "FAMILIES", "GENERATORS", "KINDS", "SPLITS",
           "Entity", "Example", "VARIANTS", "World", "add_steps", "approx_tokens", "arithmetic", "arithmetic_typed",
           "calculator", "chat", "chat_mixture", "copy_texts", "encyclopedia", "examples", "mul_steps", "multiturn",
           "natural_text", "nothink", "pretrain_texts", "retrieval", "scope", "sub_steps", "thinking_off", "tool",
           "tool_choice", "unknown_family", "world", "world_family"]
