"""The `multiturn` generator: chats of 1-3 user turns, each answered; the example is scored on its last turn.

Turn 1 is a question of another family (arithmetic in the trained or typed wordings, world, unknown, small talk,
an out-of-scope request). A later turn is either a new question of any of those families, at times after a
connecting phrase ("Another one: "), or one that refers back:
  arithmetic  "Now add 25 to that."        the previous answer is the new first operand ("That is 6912, so compute
                                           6912 + 25." then the column method)
  pronoun     "And when was it founded?"  another attribute of the entity just asked about (known: the fact;
                                           unknown: "I don't know X", X copied from the earlier question)
  what_about  "What about Veloria?"        the same attribute of another entity of the same kind
The earlier turns are gold (what a right model answered), so a turn's score is conditional on a right history, as
in a chat with a model that got the earlier turns right. An example's family is its last turn's family (scored by
that family's rule); meta["turn"] is the last turn's number (1-3) and meta["turn_kind"] "new" or the refer-back kind,
so the eval can set later turns against first ones on the same mix of questions.

Splits, disjoint by construction: each turn's question is an example of its family's own split (disjoint by that
family's rule), the connecting phrases and refer-back templates are disjoint train / heldout lists, and a follow-up
sum's operands (previous answer, new number) are split by glm5.data.arithmetic's pair hash.
"""

from __future__ import annotations

import random
import zlib

from .arithmetic import STEPS, arithmetic, pair_split
from .common import Pool, check_split, draw, rng_for
from .example import ABSTAIN, Example
from .scope import scope
from .smalltalk import chat
from .world import ATTRIBUTES, STATEMENTS, unknown_family, unknown_name, world, world_family
from .wording import arithmetic_typed

# Where a new question comes from: generator, weight.
SOURCES = {"arithmetic": (arithmetic, 0.25), "arithmetic_typed": (arithmetic_typed, 0.15),
           "world": (world_family, 0.25), "unknown": (unknown_family, 0.1), "chat": (chat, 0.1), "scope": (scope, 0.15)}
REFER_PERCENT = 40  # of later turns that can refer back, how many do
CONNECT_PERCENT = 40  # of new questions in later turns, how many open with a connecting phrase
CONNECTORS = {"train": ("Another one: ", "Next question: ", "Thanks. ", "OK, now: ", "Also: ", "Now this: ", "Great. ",
                        "New question: "),
              "heldout": ("One more: ", "Next up: ", "Cool. ", "Good. Now: ")}
FOLLOW_UPS = {  # op: (train templates, heldout templates); {c} is the new operand
    "+": (("Now add {c} to that.", "Add {c} to the result.", "And plus {c}?", "What is that plus {c}?"),
          ("Increase that by {c}.", "Then add {c}, please.")),
    "-": (("Now subtract {c} from that.", "Take {c} away from the result.", "And minus {c}?",
           "What is that minus {c}?"),
          ("Decrease that by {c}.", "Then subtract {c}, please.")),
    "*": (("Now multiply that by {c}.", "Multiply the result by {c}.", "And times {c}?", "What is that times {c}?"),
          ("Scale that by {c}.", "Then multiply by {c}, please.")),
}
PRONOUNS = {  # attribute: (train, heldout); {p} is "it" or "that person"
    "capital": (("And what is its capital?", "What is the capital there?"), ("Which city is its capital?",)),
    "currency": (("And what currency does it use?", "What is its currency?"), ("What money is used there?",)),
    "founded": (("And when was it founded?", "What year was it founded?"), ("When was it established?",)),
    "country": (("And which country is it in?", "What country is it in?"), ("Which country does it belong to?",)),
    "river": (("And which river flows through it?", "What river runs through it?"), ("Which river does it lie on?",)),
    "founder": (("And who founded it?", "Who is its founder?"), ("Who started it?",)),
    "headquarters": (("And where is it headquartered?", "Where are its headquarters?"),
                     ("In which city does it have its headquarters?",)),
    "birthplace": (("And where was that person born?", "Where was that person born?"),
                   ("What is that person's hometown?",)),
    "born": (("And when was that person born?", "What year was that person born?"),
             ("What is that person's birth year?",)),
    "profession": (("And what does that person do?", "What is that person's job?"),
                   ("What kind of work does that person do?",)),
}
NOUNS = {"capital": "capital", "currency": "currency", "founded": "founding year", "country": "country",
         "river": "river", "founder": "founder", "headquarters": "headquarters", "birthplace": "birthplace",
         "born": "birth year", "profession": "profession"}
WHAT_ABOUT = (("What about {x}?", "And {x}?", "Same question for {x}."), ("How about {x}?", "And for {x}?"))


def _seed(seed: int) -> int:
    # The turns draw from their families' streams at a seed of their own, so a multiturn suite asks other questions
    # than the single-turn suites of the same seed.
    return zlib.crc32(f"multiturn/{seed}".encode())


def _turn(ex: Example) -> tuple[dict, dict]:
    user, gold = ex.messages[:2]
    return dict(user), dict(gold)


def _follow_arithmetic(rng: random.Random, split: str, prev: Example) -> Example | None:
    v = int(prev.answer)
    if v < 0:
        return None
    op = rng.choice(("+", "-", "*") if v < 10_000 else ("+", "-"))
    try:
        c = draw(rng, lambda x: pair_split(v, op, x) == split,
                 lambda r: r.randrange(2, 10) if op == "*" else r.randrange(1, 10 ** r.randint(1, 3)),
                 f"{split} follow-up operand", tries=200)
    except RuntimeError:
        return None
    template = rng.choice(FOLLOW_UPS[op][split == "heldout"])
    value = {"+": v + c, "-": v - c, "*": v * c}[op]
    messages = [{"role": "user", "content": template.format(c=c)},
                {"role": "assistant", "reasoning_content": f"That is {v}, so compute {v} {op} {c}. {STEPS[op](v, c)}",
                 "content": f"{v} {op} {c} = {value}."}]
    return Example("arithmetic", messages, str(value),
                   meta={"op": op, "a": v, "b": c, "digits": max(len(str(v)), len(str(c))), "template": template})


def _entity_answer(name: str, kind: str, attribute: str, known: bool, world_seed: int) -> tuple[str, str, str]:
    """(reasoning, content, gold answer) of a question about an entity's attribute."""
    if not known:
        return f"I have no record of an entity called {name}.", f"{ABSTAIN} {name}; I have no information about it.", \
            ABSTAIN
    value = world(world_seed).by_name[name].get(attribute)
    answer = STATEMENTS[attribute].format(x=name, y=value)
    return f"I have a record of {name}, a {kind}. {answer}", answer, value


def _follow_entity(rng: random.Random, split: str, prev: Example, world_seed: int) -> Example | None:
    name, kind, attribute = prev.meta["entity"], prev.meta["kind"], prev.meta["attribute"]
    known = prev.family == "world"
    if rng.random() < 0.5:
        kind_ref = "pronoun"
        attribute = rng.choice([a for a in ATTRIBUTES[kind] if a != attribute])
        template = rng.choice(PRONOUNS[attribute][split == "heldout"])
        question = template
        lead = f"{'That person' if kind == 'person' else 'It'} is {name}. "
    else:
        kind_ref = "what_about"
        w = world(world_seed)
        known = rng.random() < 0.7
        if known:
            name = rng.choice([e.name for e in w.entities if e.kind == kind and e.name != name])
        else:
            name = unknown_name(rng, kind, w, split)
        template = rng.choice(WHAT_ABOUT[split == "heldout"])
        question = template.format(x=name)
        lead = f"The question is again about the {NOUNS[attribute]}, now of {name}. "
    reasoning, content, answer = _entity_answer(name, kind, attribute, known, world_seed)
    messages = [{"role": "user", "content": question},
                {"role": "assistant", "reasoning_content": lead + reasoning, "content": content}]
    return Example("world" if known else "unknown", messages, answer,
                   meta={"entity": name, "kind": kind, "attribute": attribute, "template": template,
                         "refers": kind_ref})


def multiturn(split: str, n: int, seed: int = 0, world_seed: int = 0, min_turns: int = 1,
              max_turns: int = 3) -> list[Example]:
    """n chats of min_turns..max_turns user turns (uniform)."""
    check_split(split)
    if not 1 <= min_turns <= max_turns:
        raise ValueError(f"need 1 <= min_turns <= max_turns, got {min_turns}, {max_turns}")
    rng = rng_for("multiturn", split, seed)
    pools = {name: Pool(gen, split, _seed(seed), **({"world_seed": world_seed}
                                                     if name in ("world", "unknown", "scope") else {}))
             for name, (gen, _) in SOURCES.items()}
    names, weights = list(SOURCES), [w for _, w in SOURCES.values()]
    out = []
    for _ in range(n):
        turns = rng.randint(min_turns, max_turns)
        messages: list[dict] = []
        prev = None
        kind = "new"
        for t in range(turns):
            ex = None
            if t and rng.random() * 100 < REFER_PERCENT:
                if prev.family == "arithmetic":
                    ex = _follow_arithmetic(rng, split, prev)
                elif prev.family in ("world", "unknown") and "entity" in prev.meta:
                    ex = _follow_entity(rng, split, prev, world_seed)
            if ex is not None:
                kind = "refer_" + ("arithmetic" if ex.family == "arithmetic" else ex.meta["refers"])
            else:
                ex = pools[rng.choices(names, weights)[0]].next()
                kind = "new"
            user, gold = _turn(ex)
            if t and kind == "new" and rng.random() * 100 < CONNECT_PERCENT:
                user["content"] = rng.choice(CONNECTORS[split]) + user["content"]
            messages += [user, gold]
            prev = ex
        out.append(Example(prev.family, messages, prev.answer, meta={**prev.meta, "turn": turns, "turn_kind": kind}))
    return out
