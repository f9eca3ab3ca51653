"""Rewards: the honesty reward on the eval's own scoring, a `module:function` hook for user reward functions (slime's
--custom-rm-path), and a call wrapper that turns a failing reward function into a logged skip.

Honesty table (GLM-5 cut its hallucination rate by rewarding abstention over invention; AA-Omniscience scores +1
correct, -1 wrong, 0 abstain; treating "I don't know" about an entity that does not exist as the right answer is our
reading, the exact GLM-5 reward is not public):
  world       right +1, wrong -1, abstained 0   a made-up fact costs more than an honest "I don't know"
  unknown     abstained +1, any answer -1       the entity does not exist: every answer is a hallucination
  arithmetic  right +1, wrong 0                 no abstention to prefer; a wrong sum is not a lie about the world
  tool        right +1, wrong 0                 the final answer after the calculator round(s)
  retrieval   right +1, wrong 0                 not in the honesty table; verifiable like arithmetic
  malformed   -1 in every family                truncated, an unclosed <think>, empty content, a dangling tool call
chat (small talk, scored right when the reply is the intent's) and the other families the eval scores have no
entry here: pass a reward function (--reward) to train on them.

The outcome comes from glm5.eval.score.score, so RL optimises exactly what `glm5 eval` measures.
"""

from __future__ import annotations

import importlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from ..chat_parse import ParsedOutput
from ..data.example import Example
from ..eval.score import ABSTAINED, CORRECT, MALFORMED, WRONG, score

log = logging.getLogger(__name__)

HONESTY = {
    "world": {CORRECT: 1.0, WRONG: -1.0, ABSTAINED: 0.0, MALFORMED: -1.0},
    "unknown": {ABSTAINED: 1.0, WRONG: -1.0, MALFORMED: -1.0},
    "arithmetic": {CORRECT: 1.0, WRONG: 0.0, MALFORMED: -1.0},
    "tool": {CORRECT: 1.0, WRONG: 0.0, MALFORMED: -1.0},
    "retrieval": {CORRECT: 1.0, WRONG: 0.0, MALFORMED: -1.0},
}


@dataclass
class RewardSample:
    """What a reward function sees of one finished sample. output is the parsed final assistant turn (after any
    tool rounds); prompt_ids and token_ids are exactly the ids the engine was given and sampled (all turns; tool
    results included in token_ids with loss mask 0 where the episode had any)."""
    uid: str | int
    example: Example  # family, prompt messages, gold answer, tools, meta
    output: ParsedOutput  # reasoning_content, content, tool_calls
    finish_reason: str | None = "stop"  # "length" = truncated: malformed
    prompt_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)

    @property
    def family(self) -> str:
        return self.example.family


def outcome(sample: RewardSample) -> str:
    """correct | wrong | abstained | malformed, as `glm5 eval` scores it."""
    return score(sample.example, sample.output, sample.finish_reason)


def honesty_reward(sample: RewardSample) -> float:
    """The honesty table above."""
    table = HONESTY.get(sample.family)
    if table is None:
        raise ValueError(f"family {sample.family!r} has no reward (families with one: {', '.join(HONESTY)}); pass a "
                         f"custom reward function for it")
    return table[outcome(sample)]


def load_function(spec: str, what: str = "reward function") -> Callable:
    """'package.module:function' (or 'module:Class.method') -> the callable (a reward function, a rollout hook). A
    bad spec fails here, at start-up, with what was wrong, rather than at the first call."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError(f"{what} must be given as 'module:function' (e.g. "
                         f"'glm5.rl.rewards:honesty_reward'), got {spec!r}")
    mod_name, attr = spec.split(":")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"{what} {spec!r}: cannot import module {mod_name!r} ({e})") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n, None)))
            raise ValueError(f"{what} {spec!r}: {getattr(obj, '__name__', mod_name)!r} has no attribute "
                             f"{part!r} (callables there: {', '.join(public[:20]) or 'none'})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{what} {spec!r} is a {type(obj).__name__}, not a function")
    return obj


def load_reward_fn(spec: str) -> Callable[[RewardSample], float]:
    return load_function(spec, "reward function")


class _Skip:
    """The reward of a sample whose reward function failed: the loop leaves the sample out (compare with `is`)."""

    def __repr__(self) -> str:
        return "SKIP"


SKIP = _Skip()


def safe_reward(fn: Callable[[RewardSample], float], sample: RewardSample) -> float | _Skip:
    """fn(sample) as a float, or SKIP (logged with the sample's uid) when fn raises or returns something that is not
    a finite number: one broken sample, or a bug in a user's reward function on a rare input, must not kill a
    multi-hour run, and a NaN reward would poison every advantage of its group."""
    try:
        r = fn(sample)
    except Exception as e:  # noqa: BLE001 -- any failure of a user function becomes a logged skip
        log.warning("reward function %s raised on sample %r: %s: %s; sample skipped", _name(fn), sample.uid,
                    type(e).__name__, e)
        return SKIP
    if isinstance(r, bool) or not isinstance(r, (int, float)) and not _is_scalar(r):
        log.warning("reward function %s returned %s for sample %r, not a number; sample skipped", _name(fn),
                    type(r).__name__, sample.uid)
        return SKIP
    r = float(r)
    if not math.isfinite(r):
        log.warning("reward function %s returned %s for sample %r; sample skipped", _name(fn), r, sample.uid)
        return SKIP
    return r


def _is_scalar(r: Any) -> bool:
    """A one-element tensor or numpy number counts as a number."""
    try:
        return hasattr(r, "item") and isinstance(r.item(), (int, float)) and not isinstance(r.item(), bool)
    except (ValueError, RuntimeError):  # a tensor of several elements
        return False


def _name(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"
