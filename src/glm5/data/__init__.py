"""Offline, seeded task data for the CPU speedrun: six chat families (`examples`), an SFT mixture (`chat_mixture`),
and pre-training text (`pretrain_texts`: Python's documentation plus the invented world's encyclopedia).

Every generator is a pure function of its arguments (no files, no network, no global state), and train/heldout are
split by a hash of what must not leak (operand pair, name, paragraph, or question template), never by seed.
"""

from __future__ import annotations

import inspect
import random

from .arithmetic import add_steps, arithmetic, mul_steps, sub_steps
from .common import check_split
from .copy import copy_texts
from .example import ABSTAIN, FAMILIES, SPLITS, Example
from .smalltalk import chat
from .text import approx_tokens, natural_text, pretrain_texts, retrieval
from .tool import calculator, tool
from .world import ATTRIBUTES, KINDS, Entity, World, encyclopedia, unknown_family, world, world_family

GENERATORS = {"arithmetic": arithmetic, "world": world_family, "unknown": unknown_family, "retrieval": retrieval,
              "tool": tool, "chat": chat}
# Named variants of a family: the same generator and scoring with fixed options (suites for `glm5 eval --suites`
# and prompt sources for `glm5 rl --families`). Their examples keep the family's name.
VARIANTS = {"arithmetic_long": ("arithmetic", {"min_digits": 3, "max_digits": 4})}  # both operands of 3-4 digits
# Short families dominate; retrieval (1-4K tokens an example) only when the caller weights it in.
DEFAULT_WEIGHTS = {"arithmetic": 0.3, "world": 0.25, "unknown": 0.15, "tool": 0.15, "chat": 0.15, "retrieval": 0.0}


def examples(family: str, split: str, n: int, seed: int = 0, **kw) -> list[Example]:
    """n examples of one family or named variant (VARIANTS); the first k of n are the examples for n=k (same family,
    split, seed, kw)."""
    if family in VARIANTS:
        family, fixed = VARIANTS[family]
        kw = {**fixed, **kw}
    if family not in GENERATORS:
        raise ValueError(f"family must be one of {', '.join(FAMILIES + tuple(VARIANTS))}, got {family!r}")
    check_split(split)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    extra = set(kw) - set(inspect.signature(GENERATORS[family]).parameters)
    if extra:
        allowed = [p for p in inspect.signature(GENERATORS[family]).parameters if p not in ("split", "n", "seed")]
        raise ValueError(f"family {family!r} takes no option {', '.join(sorted(extra))}; its options: "
                         f"{', '.join(allowed) or 'none'}")
    return GENERATORS[family](split, n, seed, **kw)


def chat_mixture(split: str, n: int, seed: int = 0, weights: dict[str, float] | None = None, **kw) -> list[Example]:
    """A seeded mixture for SFT: each example's family drawn by weight (default DEFAULT_WEIGHTS, no retrieval).
    Options in kw go to every family that takes them (world_seed to world/unknown/retrieval; context_tokens, depth,
    count_tokens to retrieval; ops, max_digits to arithmetic); an option no drawn-able family takes is an error."""
    check_split(split)
    weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
    bad = [f for f in weights if f not in GENERATORS]
    if bad or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"weights must map families ({', '.join(FAMILIES)}) to non-negative numbers with a "
                         f"positive sum, got {weights!r}")
    fams = [f for f in FAMILIES if weights.get(f, 0) > 0]
    params = {f: set(inspect.signature(GENERATORS[f]).parameters) for f in fams}
    unused = [k for k in kw if not any(k in p for p in params.values())]
    if unused:
        raise ValueError(f"no family in the mixture ({', '.join(fams)}) takes option(s) {', '.join(unused)}")
    rng = random.Random(f"glm5.data/mixture/{split}/{seed}")
    order = rng.choices(fams, weights=[weights[f] for f in fams], k=n)
    pools = {f: iter(GENERATORS[f](split, order.count(f), seed, **{k: v for k, v in kw.items() if k in params[f]}))
             for f in fams}
    return [next(pools[f]) for f in order]


__all__ = ["ABSTAIN", "ATTRIBUTES", "DEFAULT_WEIGHTS", "FAMILIES", "GENERATORS", "KINDS", "SPLITS", "Entity", "Example",
           "VARIANTS", "World", "add_steps", "approx_tokens", "arithmetic", "calculator", "chat", "chat_mixture", "copy_texts",
           "encyclopedia", "examples", "mul_steps", "natural_text", "pretrain_texts", "retrieval", "sub_steps", "tool",
           "unknown_family", "world", "world_family"]
