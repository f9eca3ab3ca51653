"""Copy drills for pre-training: a random string, then the same string again once or twice.

The shipped 7M model never learned to copy from its context (a paragraph repeated twice was no easier the second
time; dev/LOG.md, 2026-11-30): every copy in the chat families (operands into column steps, a tool result into the
answer, a name into the reply, a needle's code) then fails. The second copy of a random string can only be predicted
by looking it up, so these drills are the cleanest gradient towards the induction heads that copying needs.
"""

from __future__ import annotations

import random

_SYLLABLES = tuple(o + v for o in "bdfgklmnprstvz" for v in "aeiou")


def copy_drill(rng: random.Random) -> str:
    """One drill: digits (what the chat families copy most) or a run of random syllable words."""
    if rng.random() < 0.5:
        s = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 14)))
    else:
        s = " ".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(3, 12)))
    return "\n".join([f"Copy: {s}"] + [f"Again: {s}"] * rng.randint(1, 2)) + "\n"


def copy_texts(n: int, seed: int = 0) -> list[str]:
    """n drills, a pure function of (n, seed); the first k of n are the drills for n=k."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"glm5.data/copy/{seed}")
    return [copy_drill(rng) for _ in range(n)]
