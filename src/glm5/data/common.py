"""Helpers every generator shares: the split rule and the seeded random stream.

Splits are decided by a stable hash of the thing that must not leak (an operand pair, a name, a paragraph), never by
the seed, so train and heldout stay disjoint whatever seeds the caller uses. zlib.crc32 rather than hash(): Python's
str hash is salted per process.
"""

from __future__ import annotations

import random
import zlib

from .example import SPLITS


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")


def split_of(key: str, heldout_percent: int = 10) -> str:
    """'heldout' for about heldout_percent % of keys, else 'train'; a pure function of the key."""
    return "heldout" if zlib.crc32(key.encode("utf-8")) % 100 < heldout_percent else "train"


def rng_for(family: str, split: str, seed: int) -> random.Random:
    # A str seed goes through sha512 (random's version-2 seeding): stable across processes and Python versions.
    return random.Random(f"glm5.data/{family}/{split}/{seed}")


def draw(rng: random.Random, keep, make, what: str, tries: int = 10_000):
    """Rejection-sample make(rng) until keep(x); a clear error instead of an endless loop when the pool is empty."""
    for _ in range(tries):
        x = make(rng)
        if keep(x):
            return x
    raise RuntimeError(f"no {what} found in {tries} draws (is the pool for this split empty?)")


class Pool:
    """Examples of one generator handed out one at a time, prefix-stable: the k-th handed out is the k-th of
    gen(split, n, seed, **kw) for every n >= k, however many the caller ends up taking (composed families draw
    from other families without knowing in advance how many they need)."""

    def __init__(self, gen, split: str, seed: int, **kw):
        self.gen, self.split, self.seed, self.kw = gen, split, seed, kw
        self.items: list = []
        self.i = 0

    def next(self):
        if self.i >= len(self.items):  # the generator is prefix-stable: regenerate twice as many, keep the index
            self.items = self.gen(self.split, max(16, 2 * len(self.items)), self.seed, **self.kw)
        self.i += 1
        return self.items[self.i - 1]
