"""Natural text (Python's own documentation: every machine has it, no download), the pre-training stream, and the
retrieval family (a needle fact hidden in natural-text paragraphs).

Retrieval splits: the needle's name is split by hash, and so is the distractor-paragraph pool, so a heldout example
shares neither its name nor any paragraph with train. The needle goes at a line start nearest the requested depth
(depth 0 = first line of the text, 1 = just before the question), and the text is filled to the requested length by
whole paragraphs plus one paragraph cut at a word boundary, counted with the caller's token counter.
"""

from __future__ import annotations

import random
import re
from functools import lru_cache
from typing import Callable, Iterator

from ..tokenizer_train import pydoc_topics, stdlib_docstrings
from .common import check_split, draw, rng_for, split_of
from .example import Example
from .world import encyclopedia, invent_name, world

PARAGRAPH_CHARS = (120, 2000)  # shorter ones are headings and code fragments; longer ones are cut anyway
RETRIEVAL_HELDOUT_PERCENT = 20
CONTEXT_TOKENS = (1024, 4096)  # default range of the target length


def natural_text() -> Iterator[str]:
    """Python's pydoc topics, then docstrings of a fixed list of stdlib modules (both from the running Python)."""
    yield from pydoc_topics()
    yield from stdlib_docstrings()


def pretrain_texts(seed: int = 0, world_seed: int = 0, paraphrases: int = 4, natural: bool = True) -> Iterator[str]:
    """Natural-text documents and the world's encyclopedia, shuffled together (seeded). Rendered chats are the
    caller's to add."""
    docs = list(natural_text()) if natural else []
    docs += encyclopedia(world(world_seed), seed, paraphrases)
    random.Random(f"glm5.data/pretrain/{seed}").shuffle(docs)
    yield from docs


@lru_cache(maxsize=1)
def _paragraphs() -> dict[str, tuple[str, ...]]:
    """Distractor paragraphs per split (a hash of the paragraph decides)."""
    out: dict[str, list[str]] = {"train": [], "heldout": []}
    seen = set()
    for doc in natural_text():
        for p in re.split(r"\n\s*\n", doc):
            p = p.strip("\n")
            if PARAGRAPH_CHARS[0] <= len(p) <= PARAGRAPH_CHARS[1] and p not in seen:
                seen.add(p)
                out[split_of("paragraph " + p, RETRIEVAL_HELDOUT_PERCENT)].append(p)
    return {k: tuple(v) for k, v in out.items()}


def approx_tokens(text: str) -> int:
    return round(len(text) / 4)


def _cut(p: str, budget: int, count: Callable[[str], int]) -> str:
    """The longest word-boundary prefix of p that counts <= budget tokens (binary search over cut points)."""
    cuts = [m.start() for m in re.finditer(r"\s", p)]
    lo, hi = 0, len(cuts)  # the answer is cuts[k-1] for the largest k with count(prefix) <= budget
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(p[:cuts[mid - 1]]) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return p[:cuts[lo - 1]] if lo else ""


def needle_name(rng: random.Random, split: str, world_seed: int) -> str:
    words = world(world_seed).words
    return draw(rng, lambda name: (not any(w in words for w in name.split())
                                   and split_of(f"needle {name}", RETRIEVAL_HELDOUT_PERCENT) == split),
                lambda r: invent_name(r, r.choice(("city", "country", "person"))), f"{split} needle name")


def retrieval_example(rng: random.Random, split: str, context_tokens: int, depth: float,
                      count: Callable[[str], int], world_seed: int = 0) -> Example:
    name, code = needle_name(rng, split, world_seed), str(rng.randrange(10_000, 100_000))
    fact = f"The access code of {name} is {code}."
    question = f"What is the access code of {name}?"
    pool = _paragraphs()[split]
    budget = context_tokens - count(question) - count(fact) - 2  # -2: the separators around the question and needle
    chosen, used = [], 0
    for i in rng.sample(range(len(pool)), len(pool)):
        c = count(pool[i]) + 1  # +1: the blank line between paragraphs
        if used + c > budget:
            if (rest := _cut(pool[i], budget - used - 1, count)):
                chosen.append(rest)
            break
        chosen.append(pool[i])
        used += c
    lines = "\n\n".join(chosen).split("\n")
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line) + 1)
    total = max(offsets[-1] - 1, 1)
    k = min(range(len(offsets)), key=lambda j: abs(offsets[j] - depth * total))
    lines.insert(k, fact)
    content = "\n".join(lines) + "\n\n" + question
    answer = f"The access code of {name} is {code}."
    messages = [{"role": "user", "content": content},
                {"role": "assistant", "reasoning_content": f"The text says the access code of {name} is {code}.",
                 "content": answer}]
    return Example("retrieval", messages, code, meta={
        "context_tokens": count(content), "target_tokens": context_tokens, "depth": min(offsets[k] / total, 1.0),
        "name": name})


def retrieval(split: str, n: int, seed: int = 0, context_tokens: int | None = None, depth: float | None = None,
              count_tokens: Callable[[str], int] | None = None, world_seed: int = 0) -> list[Example]:
    """context_tokens: the user message's target length (None: uniform in CONTEXT_TOKENS per example); depth: the
    needle's relative position in the text (None: uniform per example); count_tokens: None counts 4 chars a
    token."""
    check_split(split)
    if context_tokens is not None and context_tokens < 64:
        raise ValueError(f"context_tokens must be >= 64 (room for the question and the fact), got {context_tokens}")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    count = count_tokens or approx_tokens
    rng = rng_for("retrieval", split, seed)
    out = []
    for _ in range(n):
        target = context_tokens if context_tokens is not None else rng.randint(*CONTEXT_TOKENS)
        d = depth if depth is not None else rng.random()
        out.append(retrieval_example(rng, split, target, d, count, world_seed))
    return out
