"""An invented world of 240 entities (24 countries, 96 cities, 60 companies, 60 people), its encyclopedia (the
pre-training text that states every fact), and two question families: `world` (facts the encyclopedia states) and
`unknown` (the same questions about names that exist nowhere in it, answered by abstaining).

Names are built from syllables, so they are pronounceable, say nothing a pre-trained prior could know, and the
`unknown` family can draw more from the same generator. Every word of every name in the world is unique, and an
unknown name shares no word with the world: "Tarnik Ossa" is never half-known.

The schema is a small graph (a capital is a city of its country, a founder is a person, headquarters and birthplaces
are cities) whose leaf values are invented names, professions from a short list, or 4-digit years. Following
"Physics of Language Models 3.1" (Allen-Zhu & Li), the encyclopedia states each entity several times with different
sentence templates and attribute orders: without such augmentation a small model memorises the biography text but
cannot answer questions about it.

Splits: `world` uses disjoint question templates (3 train, 2 heldout phrasings per attribute) over the same
entities; `unknown` uses the same templates split the same way, and a name hash splits the invented names.

Noise words: in NOISE_PERCENT of the training questions (both families) one word that is not part of the name is
replaced by a nonsense word ("vogalni currency is used in Rouldrasia?"). Without them the know/abstain decision
keys on the wording: a model trained without them opened "I have no record" on 21 of 50 held-out-wording questions
about facts it knew (40 of 50 right when forced past that opening). With them it must decide on the name
(dev/LOG.md). Held-out questions are never noised. The noise may hit the attribute's own key word ("Name the vogalni
of <city>"), which teaches some answers by the sentence's shape; sparing those words cost 10-17 points of world
accuracy in two full runs, "established" and "headquarters" wordings most (dev/LOG.md).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import cached_property, lru_cache

from .common import check_split, draw, rng_for, split_of
from .example import ABSTAIN, Example

KINDS = {"country": 24, "city": 96, "company": 60, "person": 60}
ATTRIBUTES = {"country": ("capital", "currency", "founded"), "city": ("country", "river", "founded"),
              "company": ("founder", "headquarters", "founded"), "person": ("birthplace", "born", "profession")}
PROFESSIONS = ("painter", "baker", "sailor", "doctor", "farmer", "teacher", "poet", "builder", "weaver", "merchant",
               "potter", "judge", "scholar", "miner", "singer", "tailor")
COMPANY_SUFFIXES = ("Works", "Labs", "Foundry", "Trading", "Systems", "Mills", "Shipping", "Textiles")
_ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "tr", "st",
           "th", "sh", "")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ou")
_CODAS = ("", "", "", "n", "r", "l", "s", "k")

# How the answer is stated: the content of a gold answer, and one encyclopedia sentence form.
STATEMENTS = {
    "capital": "The capital of {x} is {y}.", "currency": "The currency of {x} is {y}.",
    "founded": "{x} was founded in {y}.", "country": "{x} is a city in {y}.",
    "river": "{x} lies on the river {y}.", "founder": "{x} was founded by {y}.",
    "headquarters": "The headquarters of {x} are in {y}.", "birthplace": "{x} was born in the city of {y}.",
    "born": "{x} was born in the year {y}.", "profession": "{x} works as a {y}.",
}
# (train phrasings, heldout phrasings) per attribute: disjoint, so heldout measures paraphrase generalisation.
QUESTIONS = {
    "capital": (("What is the capital of {x}?", "Name the capital of {x}.", "Which city is the capital of {x}?"),
                ("What city serves as the capital of {x}?", "Tell me the capital of {x}.")),
    "currency": (("What is the currency of {x}?", "Which currency is used in {x}?", "Name the currency of {x}."),
                 ("What money do people use in {x}?", "Tell me the currency of {x}.")),
    "founded": (("In which year was {x} founded?", "When was {x} founded?", "What year was {x} founded?"),
                ("In what year was {x} established?", "Tell me the founding year of {x}.")),
    "country": (("In which country is {x}?", "Which country is {x} in?", "What country is {x} located in?"),
                ("To which country does {x} belong?", "Tell me the country of {x}.")),
    "river": (("Which river flows through {x}?", "What river runs through {x}?", "Name the river of {x}."),
              ("On which river does {x} lie?", "Tell me the river of {x}.")),
    "founder": (("Who founded {x}?", "Who is the founder of {x}?", "Name the founder of {x}."),
                ("Who started the company {x}?", "Tell me the founder of {x}.")),
    "headquarters": (("Where is {x} headquartered?", "Where are the headquarters of {x}?",
                      "In which city is {x} based?"),
                     ("Which city hosts the headquarters of {x}?", "Tell me where {x} has its headquarters.")),
    "birthplace": (("Where was {x} born?", "In which city was {x} born?", "What is the birthplace of {x}?"),
                   ("Which city is the hometown of {x}?", "Tell me the birthplace of {x}.")),
    "born": (("In which year was {x} born?", "When was {x} born?", "What year was {x} born?"),
             ("What is the birth year of {x}?", "Tell me the birth year of {x}.")),
    "profession": (("What does {x} do for a living?", "What is the profession of {x}?", "What is the job of {x}?"),
                   ("What kind of work does {x} do?", "Tell me the profession of {x}.")),
}
# Each fact again in other words: those of the heldout questions ("established", "founding year", "hometown",
# "birth year", "kind of work" ...), as statements, never questions. A model cannot know that "In what year was X
# established?" asks for the founding year without ever reading "established"; these sentences let it read the words
# (the `other_words` pre-training family) while every question phrasing stays in one split only.
OTHER_WORDS = {
    "capital": ("The city that serves as the capital of {x} is {y}.", "{x} has its capital in {y}."),
    "currency": ("The money people use in {x} is the {y}.", "In {x} people pay with the {y}."),
    "founded": ("{x} was established in {y}.", "The founding year of {x} is {y}."),
    "country": ("{x} belongs to the country {y}.", "The country of {x} is {y}."),
    "river": ("The river that {x} lies on is the {y}.", "The river of {x} is the {y}."),
    "founder": ("The company {x} was started by {y}.", "The founder of {x} is {y}."),
    "headquarters": ("The city that hosts the headquarters of {x} is {y}.", "{x} has its headquarters in {y}."),
    "birthplace": ("The hometown of {x} is {y}.", "The birthplace of {x} is {y}."),
    "born": ("The birth year of {x} is {y}.", "{x} has the birth year {y}."),
    "profession": ("The kind of work {x} does is the work of a {y}.", "{x} is a {y} by profession."),
}
UNKNOWN_HELDOUT_PERCENT = 20
NOISE_PERCENT = 40
_WORD = re.compile(r"[A-Za-z']+")


# ------------------------------------------------------------------------------------------------------- names
def _word(rng: random.Random, syllables: int, closed: bool = False) -> str:
    """Onset-vowel-coda syllables; only the first may lack an onset (no "aiou" vowel pile-ups); closed: the word
    ends in a consonant."""
    parts = []
    for i in range(syllables):
        onset = rng.choice(_ONSETS if i == 0 else _ONSETS[:-1])
        coda = rng.choice(_CODAS[3:] if closed and i == syllables - 1 else _CODAS)
        parts.append(onset + rng.choice(_VOWELS) + coda)
    return "".join(parts).capitalize()


def invent_name(rng: random.Random, kind: str) -> str:
    """A fresh name in the style of `kind` (countries end in -ia/-or/-and, people have two words, companies a
    trade suffix)."""
    if kind == "country":
        return _word(rng, rng.randint(1, 2), closed=True) + rng.choice(("ia", "or", "and", "ea"))
    if kind == "person":
        return f"{_word(rng, 2)} {_word(rng, rng.randint(1, 2))}"
    if kind == "company":
        return f"{_word(rng, 2)} {rng.choice(COMPANY_SUFFIXES)}"
    if kind in ("city", "river", "currency"):
        return _word(rng, 2)
    raise ValueError(f"unknown name kind {kind!r}")


def _fresh_name(rng: random.Random, kind: str, used: set[str]) -> str:
    name = draw(rng, lambda n: len(n) >= 4 and not any(w in used for w in n.split()),
                lambda r: invent_name(r, kind), f"fresh {kind} name")
    used.update(w for w in name.split() if w not in COMPANY_SUFFIXES)
    return name


# ------------------------------------------------------------------------------------------------------- world
@dataclass(frozen=True)
class Entity:
    name: str
    kind: str
    attrs: tuple[tuple[str, str], ...]  # (attribute, value) in ATTRIBUTES[kind] order; values are text

    def get(self, attribute: str) -> str:
        return dict(self.attrs)[attribute]


@dataclass(frozen=True)
class World:
    seed: int
    entities: tuple[Entity, ...]

    @cached_property  # cached_property writes the instance __dict__ directly, so it works on a frozen dataclass
    def by_name(self) -> dict[str, Entity]:
        return {e.name: e for e in self.entities}

    def __contains__(self, name: str) -> bool:
        return name in self.names

    @cached_property
    def names(self) -> frozenset[str]:
        """Every name in the world: entities and the invented values (rivers, currencies)."""
        return frozenset(e.name for e in self.entities) | frozenset(
            v for e in self.entities for a, v in e.attrs if a in ("river", "currency"))

    @cached_property
    def words(self) -> frozenset[str]:
        return frozenset(w for n in self.names for w in n.split() if w not in COMPANY_SUFFIXES)

    def facts(self) -> list[tuple[Entity, str, str]]:
        return [(e, a, v) for e in self.entities for a, v in e.attrs]


@lru_cache(maxsize=8)
def world(seed: int = 0) -> World:
    """The seeded world (cached: it is immutable)."""
    rng = random.Random(f"glm5.data/world/{seed}")
    used: set[str] = set()
    countries = [_fresh_name(rng, "country", used) for _ in range(KINDS["country"])]
    cities = [_fresh_name(rng, "city", used) for _ in range(KINDS["city"])]
    people = [_fresh_name(rng, "person", used) for _ in range(KINDS["person"])]
    companies = [_fresh_name(rng, "company", used) for _ in range(KINDS["company"])]
    per_country = KINDS["city"] // KINDS["country"]
    city_country = {c: countries[i // per_country] for i, c in enumerate(cities)}
    entities = []
    for i, c in enumerate(countries):
        capital = cities[i * per_country]  # the first city of each country
        entities.append(Entity(c, "country", (("capital", capital), ("currency", _fresh_name(rng, "currency", used)),
                                              ("founded", str(rng.randint(800, 1900))))))
    for c in cities:
        entities.append(Entity(c, "city", (("country", city_country[c]), ("river", _fresh_name(rng, "river", used)),
                                           ("founded", str(rng.randint(600, 1950))))))
    born = {}
    for p in people:
        born[p] = rng.randint(1880, 1990)
        entities.append(Entity(p, "person", (("birthplace", rng.choice(cities)), ("born", str(born[p])),
                                             ("profession", rng.choice(PROFESSIONS)))))
    for c in companies:
        founder = rng.choice(people)
        year = min(born[founder] + rng.randint(20, 50), 2024)
        entities.append(Entity(c, "company", (("founder", founder), ("headquarters", rng.choice(cities)),
                                              ("founded", str(year)))))
    return World(seed, tuple(entities))


# ------------------------------------------------------------------------------------------------ encyclopedia
def _describe(e: Entity, style: int, rng: random.Random) -> str:
    """One paraphrase stating every attribute of e; style picks the template family, rng the attribute order."""
    a = dict(e.attrs)
    x = e.name
    order = list(e.attrs)
    rng.shuffle(order)
    if style == 0:  # the answer sentences themselves, in a random order
        return " ".join(STATEMENTS[k].format(x=x, y=v) for k, v in order)
    if style == 1:  # a record card
        return f"{x}\nKind: {e.kind}\n" + "\n".join(f"{k.capitalize()}: {v}" for k, v in order)
    if style == 2:  # "It ..." prose: the name once, then pronoun sentences
        it = "They" if e.kind == "person" else "It"
        pron = {
            "capital": f"Its capital is {a.get('capital')}.", "currency": f"Its currency is {a.get('currency')}.",
            "founded": f"{it} was founded in {a.get('founded')}.", "country": f"It lies in {a.get('country')}.",
            "river": f"The river {a.get('river')} flows through it.", "founder": f"{a.get('founder')} founded it.",
            "headquarters": f"Its headquarters are in {a.get('headquarters')}.",
            "birthplace": f"{it} were born in {a.get('birthplace')}.", "born": f"{it} were born in {a.get('born')}.",
            "profession": f"{it} work as a {a.get('profession')}.",
        }
        return f"{x} is a {e.kind}. " + " ".join(pron[k] for k, _ in order)
    if style == OTHER_WORDS_STYLE:  # every fact in each of its OTHER_WORDS forms
        return " ".join(form.format(x=x, y=v) for k, v in order for form in OTHER_WORDS[k])
    # style 3: one sentence per attribute led by the attribute
    lead = {
        "capital": "Capital city of {x}: {y}.", "currency": "Money used in {x}: the {y}.",
        "founded": "Year {x} was founded: {y}.", "country": "Country where {x} lies: {y}.",
        "river": "River flowing through {x}: {y}.", "founder": "Founder of {x}: {y}.",
        "headquarters": "City where {x} has its headquarters: {y}.", "birthplace": "City where {x} was born: {y}.",
        "born": "Year {x} was born: {y}.", "profession": "Profession of {x}: {y}.",
    }
    return f"About the {e.kind} {x}. " + " ".join(lead[k].format(x=x, y=v) for k, v in order)


ENCYCLOPEDIA_STYLES = (0, 1, 2, 3)
OTHER_WORDS_STYLE = 4


def encyclopedia(w: World, seed: int = 0, paraphrases: int = 4, styles: tuple[int, ...] = ENCYCLOPEDIA_STYLES
                 ) -> list[str]:
    """Short documents, `paraphrases` per entity (`styles` cycle, attribute orders shuffled), in seeded order. Every
    document states all of its entity's attributes. styles=(OTHER_WORDS_STYLE,): the facts in other words."""
    if paraphrases < 1:
        raise ValueError(f"paraphrases must be >= 1, got {paraphrases}")
    if not styles or not set(styles) <= {*ENCYCLOPEDIA_STYLES, OTHER_WORDS_STYLE}:
        raise ValueError(f"styles must be a non-empty subset of 0-{OTHER_WORDS_STYLE}, got {styles}")
    rng = random.Random(f"glm5.data/encyclopedia/{w.seed}/{seed}")
    docs = []
    for e in w.entities:
        first = rng.randrange(len(styles))
        docs += [_describe(e, styles[(first + i) % len(styles)], rng) for i in range(paraphrases)]
    rng.shuffle(docs)
    return docs


# ---------------------------------------------------------------------------------------------------- families
def _phrasing(rng: random.Random, split: str, attribute: str) -> str:
    """A question template of the split ("When was {x} founded?"); examples keep it in meta["phrasing"], so the eval
    can say which wordings a model understands."""
    return rng.choice(QUESTIONS[attribute][split == "heldout"])


def _noised(rng: random.Random, split: str, question: str, name: str, w: World) -> str:
    """question, or (train split, NOISE_PERCENT of the time) question with one word outside `name` replaced by a
    lower-case nonsense word that is no word of the world; spaces and punctuation stay. Held-out questions draw
    nothing from rng, so the held-out sets do not depend on the noise."""
    if split == "heldout" or rng.random() * 100 >= NOISE_PERCENT:
        return question
    parts = question.split(name, 1)
    spans = [(i, m) for i, part in enumerate(parts) for m in _WORD.finditer(part)]
    i, m = spans[rng.randrange(len(spans))]
    noise = draw(rng, lambda t: t.capitalize() not in w.words and t != m.group().lower(),
                 lambda r: _word(r, r.randint(1, 3)).lower(), "noise word")
    parts[i] = parts[i][:m.start()] + noise + parts[i][m.end():]
    return name.join(parts)


def world_family(split: str, n: int, seed: int = 0, world_seed: int = 0) -> list[Example]:
    check_split(split)
    w = world(world_seed)
    rng = rng_for("world", split, seed)
    facts = w.facts()
    out = []
    for _ in range(n):
        e, attribute, value = rng.choice(facts)
        answer = STATEMENTS[attribute].format(x=e.name, y=value)
        phrasing = _phrasing(rng, split, attribute)
        messages = [{"role": "user", "content": _noised(rng, split, phrasing.format(x=e.name), e.name, w)},
                    {"role": "assistant", "reasoning_content": f"I have a record of {e.name}, a {e.kind}. {answer}",
                     "content": answer}]
        out.append(Example("world", messages, value, meta={"entity": e.name, "attribute": attribute,
                                                           "kind": e.kind, "phrasing": phrasing}))
    return out


def unknown_name(rng: random.Random, kind: str, w: World, split: str) -> str:
    """A name styled like `kind` that shares no word with the world and whose hash puts it in `split`."""
    words = w.words
    return draw(rng, lambda name: (len(name) >= 4 and not any(part in words for part in name.split())
                                   and split_of(f"unknown {name}", UNKNOWN_HELDOUT_PERCENT) == split),
                lambda r: invent_name(r, kind), f"{split} unknown {kind} name")


def unknown_family(split: str, n: int, seed: int = 0, world_seed: int = 0) -> list[Example]:
    check_split(split)
    w = world(world_seed)
    rng = rng_for("unknown", split, seed)
    kinds = sorted(KINDS)
    out = []
    for _ in range(n):
        kind = rng.choice(kinds)
        attribute = rng.choice(ATTRIBUTES[kind])
        x = unknown_name(rng, kind, w, split)
        phrasing = _phrasing(rng, split, attribute)
        messages = [{"role": "user", "content": _noised(rng, split, phrasing.format(x=x), x, w)},
                    {"role": "assistant", "reasoning_content": f"I have no record of an entity called {x}.",
                     "content": f"{ABSTAIN} {x}; I have no information about it."}]
        out.append(Example("unknown", messages, ABSTAIN, meta={"entity": x, "attribute": attribute, "kind": kind,
                                                               "phrasing": phrasing}))
    return out
