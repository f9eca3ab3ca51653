"""The `scope` family: requests the model cannot serve, answered by an honest, specific refusal instead of an
invented answer.

Reasons (meta["reason"]) and the refusal each one gets; `meta["specific"]` is the phrase a right answer contains:
  multiply   both factors of 2+ digits          "I can only multiply by a one-digit number, so I can't compute
                                                 54 * 45."
  operation  division, powers, roots, ...       "I can only add, subtract, and multiply by a one-digit number, so
                                                 I can't divide 84 by 7."
  code       write a program                    "I can't write code. ..."
  writing    poems, stories, essays, ...        "I can't write poems. ..."
  translate  translation                        "I can't translate. ..."
  tool       what only a tool can do            "I can't look up the weather: I have no tool for that."
  entity     real-world names, outside the      "I don't know France; I have no information about it." (the name
             invented world                      copied exactly, as the unknown family writes it)

Splits, disjoint by construction: every reason's request templates are two disjoint lists (train, heldout; the
multiplication and operation questions use glm5.data.wording's split frames, the entity questions the world
family's split question templates, the tool requests glm5.data.capabilities' split requests), and where there are
many things to ask about, they are split by a hash too (operands, code tasks, writing topics, translation texts, real
names), so a held-out request shares neither its wording nor its subject with training.
"""

from __future__ import annotations

import random

from .capabilities import CAPABILITIES
from .common import check_split, draw, rng_for, split_of
from .example import ABSTAIN, Example
from .tool import pair_split as tool_pair_split
from .world import ATTRIBUTES, _phrasing, world
from .wording import _write, typed_template

HELDOUT_PERCENT = 25
SKILLS = "I can do arithmetic, answer questions about my world, and find facts in a text you give me."
MULTIPLY = "I can only multiply by a one-digit number"
OPERATIONS = "I can only add, subtract, and multiply by a one-digit number"

# Canonical wordings of a multiplication (the arithmetic family's), used in training next to the typed ones.
_MUL_TRAIN = ("What is {a} * {b}?", "Compute {a} * {b}.", "{a} * {b} = ?", "What's {a} times {b}?",
              "Multiply {a} by {b}.", "Calculate {a} * {b}.", "What is the product of {a} and {b}?")
# op: (what the refusal says it cannot do, train templates, heldout templates); {a}, {b} are numbers.
_OPERATIONS = {
    "divide": ("divide {a} by {b}",
               ("What is {a} / {b}?", "{a} divided by {b}?", "Divide {a} by {b}.", "what's {a}/{b}",
                "How many times does {b} go into {a}?"),
               ("Split {a} into {b} equal parts, how big is each?", "{a} over {b} = ?")),
    "power": ("raise {a} to a power",
              ("What is {a} to the power of {b}?", "{a}^{b} = ?", "Compute {a} ** {b}.", "what's {a} squared"),
              ("Raise {a} to the {b}th power.", "{a} cubed?")),
    "root": ("take square roots", ("What is the square root of {a}?", "sqrt({a})?", "Square root of {a} please."),
             ("Find the root of {a}.", "What number squared gives {a}?")),
    "percent": ("compute percentages", ("What is {b}% of {a}?", "Compute {b} percent of {a}.", "{b}% of {a}?"),
                ("How much is {b} per cent of {a}?",)),
    "remainder": ("compute remainders", ("What is {a} mod {b}?", "{a} % {b} = ?", "Remainder of {a} divided by {b}?"),
                  ("What's left over when {a} is divided by {b}?",)),
}
_LANGUAGES = ("Python", "JavaScript", "C", "Rust", "Java", "Go", "SQL", "Bash", "C++", "Ruby")
_CODE_TASKS = ("reverses a string", "sorts a list of numbers", "checks if a number is prime", "counts the words in a "
               "text", "reads a CSV file", "finds the largest number in a list", "removes duplicates from a list",
               "converts Celsius to Fahrenheit", "checks if a word is a palindrome", "merges two sorted lists",
               "computes a factorial", "prints the Fibonacci numbers", "parses a date", "downloads a web page",
               "validates an email address", "flattens a nested list", "computes the average of a list",
               "capitalizes every word", "shuffles a deck of cards", "finds a file by name", "counts vowels",
               "generates a random password", "sums the digits of a number", "rotates a matrix")
_CODE = (("Write a {lang} function that {task}.", "Can you write {lang} code that {task}?",
          "Write a program in {lang} that {task}.", "I need a {lang} script that {task}.",
          "code: a {lang} function that {task}", "Give me {lang} code that {task}."),
         ("Show me how to implement something in {lang} that {task}.", "Could you program a {lang} routine that "
          "{task}?", "Help me code a {lang} snippet that {task}."))
_WRITING_KINDS = {"poem": "poems", "story": "stories", "essay": "essays", "joke": "jokes", "song": "songs",
                  "speech": "speeches", "letter": "letters", "limerick": "limericks"}
_TOPICS = ("the sea", "autumn", "my cat", "friendship", "the moon", "a lost key", "winter mornings", "trains",
           "a small village", "coffee", "the mountains", "rain", "a robot", "summer holidays", "old books",
           "the city at night", "a dragon", "my grandmother", "football", "the stars")
_WRITING = (("Write a {kind} about {topic}.", "Can you write me a {kind} about {topic}?",
             "Compose a {kind} about {topic}.", "I'd like a short {kind} about {topic}.", "write a {kind} on {topic}"),
            ("Make up a {kind} about {topic} for me.", "Please create a {kind} on the subject of {topic}."))
_TRANSLATE_TEXTS = ("good morning", "where is the station", "thank you very much", "I am hungry", "see you tomorrow",
                    "how much does it cost", "the weather is nice", "my name is Sam", "happy birthday",
                    "I love books", "good luck", "what time is it")
_TRANSLATE_LANGS = ("French", "Spanish", "German", "Italian", "Japanese", "Chinese", "Portuguese", "Russian")
_TRANSLATE = (("Translate '{text}' into {lang}.", "How do you say '{text}' in {lang}?",
               "What is '{text}' in {lang}?", "translate {text} to {lang}"),
              ("Render '{text}' in {lang}, please.", "Say '{text}' in {lang}."))

# Real-world names (ASCII), none of them in the invented world: the model knows none of them.
REAL_NAMES = {
    "country": ("France", "Germany", "Japan", "Brazil", "Canada", "Kenya", "India", "Mexico", "Egypt", "Norway",
                "Peru", "Vietnam", "Australia", "Argentina", "Nigeria", "Sweden", "Portugal", "Chile", "Thailand",
                "Morocco", "Greece", "Ireland", "Poland", "Turkey", "Indonesia", "Colombia", "Finland", "Ghana",
                "New Zealand", "South Korea", "Spain", "Italy", "China", "Russia", "Iceland", "Cuba"),
    "city": ("Paris", "Tokyo", "Berlin", "London", "Chicago", "Mumbai", "Cairo", "Lagos", "Sydney", "Toronto",
             "Madrid", "Rome", "Nairobi", "Seoul", "Dublin", "Lisbon", "Istanbul", "Bangkok", "Vienna", "Prague",
             "Buenos Aires", "Los Angeles", "Rio de Janeiro", "Cape Town", "Hong Kong", "Amsterdam", "Stockholm",
             "Warsaw", "Athens", "Helsinki", "Boston", "Montreal", "Osaka", "Delhi", "Manila", "Havana"),
    "company": ("Google", "Toyota", "Siemens", "Nestle", "Microsoft", "Samsung", "Boeing", "Ikea", "Nokia", "Adidas",
                "Intel", "Honda", "Pfizer", "Unilever", "Netflix", "Spotify", "Airbus", "Shell", "Lego", "Philips",
                "General Motors", "Coca Cola", "Deutsche Bank"),
    "person": ("Albert Einstein", "Marie Curie", "Isaac Newton", "Ada Lovelace", "Charles Darwin", "Frida Kahlo",
               "Leonardo da Vinci", "Nelson Mandela", "William Shakespeare", "Jane Austen", "Alan Turing",
               "Wolfgang Amadeus Mozart", "Pablo Picasso", "Nikola Tesla", "Rosa Parks", "Galileo Galilei",
               "Mahatma Gandhi", "Cleopatra", "Confucius", "Amelia Earhart", "Ludwig van Beethoven",
               "Grace Hopper", "Florence Nightingale", "Vincent van Gogh"),
}
REASONS = ("multiply", "operation", "code", "writing", "translate", "tool", "entity")
WEIGHTS = (0.22, 0.1, 0.14, 0.1, 0.06, 0.16, 0.22)


def real_names(kind: str, split: str, world_seed: int = 0) -> tuple[str, ...]:
    """Real names of a kind in a split (a name hash decides), leaving out any that shares a word with the world."""
    words = world(world_seed).words
    return tuple(x for x in REAL_NAMES[kind] if split_of(f"real {x}", HELDOUT_PERCENT) == split
                 and not set(x.split()) & words)


def multiply_refusal(a_text: str, b_text: str) -> str:
    return f"{MULTIPLY}, so I can't compute {a_text} * {b_text}."


def tool_refusal(refusal: str) -> str:
    return f"I can't {refusal}: I have no tool for that."


def entity_refusal(name: str) -> str:
    return f"{ABSTAIN} {name}; I have no information about it."


def _example(question: str, reasoning: str, content: str, specific: str, **meta) -> Example:
    messages = [{"role": "user", "content": question},
                {"role": "assistant", "reasoning_content": reasoning, "content": content}]
    return Example("scope", messages, specific, meta={"specific": specific, **meta})


def multiply_example(rng: random.Random, split: str) -> Example:
    def make(r):
        return tuple(r.randrange(10 ** (d - 1), 10 ** d) for d in (r.randint(2, 4), r.randint(2, 4)))

    # The calculator families' split (glm5.data.tool): a held-out product is in no training chat, with tools or not.
    a, b = draw(rng, lambda p: tool_pair_split(*p) == split, make, f"{split} multiplication")
    if split == "train" and rng.random() < 0.4:
        template = rng.choice(_MUL_TRAIN)
    else:
        template, _ = typed_template(rng, split, "*")
    question = template.format(a=_write(a, rng.random() < 0.2), b=_write(b, rng.random() < 0.2))
    return _example(question, f"Both factors, {a} and {b}, have more than one digit. {MULTIPLY}.",
                    multiply_refusal(str(a), str(b)), MULTIPLY, reason="multiply", a=a, b=b, template=template)


def operation_example(rng: random.Random, split: str) -> Example:
    op = rng.choice(sorted(_OPERATIONS))
    what, train, heldout = _OPERATIONS[op]
    template = rng.choice(heldout if split == "heldout" else train)
    a, b = draw(rng, lambda p: split_of(f"{op} {p[0]} {p[1]}", HELDOUT_PERCENT) == split,
                lambda r: (r.randint(10, 999), r.randint(2, 12)), f"{split} {op} operands")
    what = what.format(a=a, b=b)
    return _example(template.format(a=a, b=b), f"This asks me to {what}. {OPERATIONS}.",
                    f"{OPERATIONS}, so I can't {what}.", OPERATIONS, reason="operation", op=op, template=template)


def _subject(rng: random.Random, split: str, pool, what: str) -> str:
    return draw(rng, lambda x: split_of(f"{what} {x}", HELDOUT_PERCENT) == split, lambda r: r.choice(pool),
                f"{split} {what}")


def code_example(rng: random.Random, split: str) -> Example:
    template = rng.choice(_CODE[split == "heldout"])
    task = _subject(rng, split, _CODE_TASKS, "code task")
    question = template.format(lang=rng.choice(_LANGUAGES), task=task)
    return _example(question, "The user asks me to write code. I can't write code.",
                    f"I can't write code. {SKILLS}", "I can't write code", reason="code", task=task,
                    template=template)


def writing_example(rng: random.Random, split: str) -> Example:
    template = rng.choice(_WRITING[split == "heldout"])
    kind = rng.choice(sorted(_WRITING_KINDS))
    topic = _subject(rng, split, _TOPICS, "writing topic")
    specific = f"I can't write {_WRITING_KINDS[kind]}"
    return _example(template.format(kind=kind, topic=topic), f"The user asks for a {kind}. {specific}.",
                    f"{specific}. {SKILLS}", specific, reason="writing", kind=kind, topic=topic, template=template)


def translate_example(rng: random.Random, split: str) -> Example:
    template = rng.choice(_TRANSLATE[split == "heldout"])
    text = _subject(rng, split, _TRANSLATE_TEXTS, "translation text")
    question = template.format(text=text, lang=rng.choice(_TRANSLATE_LANGS))
    return _example(question, "The user asks for a translation. I can't translate.",
                    f"I can't translate. {SKILLS}", "I can't translate", reason="translate", template=template)


def tool_example(rng: random.Random, split: str) -> Example:
    cap = rng.choice(CAPABILITIES)
    template = rng.choice(cap.requests[split == "heldout"])
    question = template.format(**cap.slots(rng))
    specific = f"I can't {cap.refusal}"
    return _example(question, f"This needs a tool that can {cap.refusal}, and I have none.",
                    tool_refusal(cap.refusal), specific, reason="tool", capability=cap.key, template=template)


def entity_example(rng: random.Random, split: str, world_seed: int = 0) -> Example:
    kind = rng.choice(sorted(REAL_NAMES))
    name = rng.choice(real_names(kind, split, world_seed))
    attribute = rng.choice(ATTRIBUTES[kind])
    phrasing = _phrasing(rng, split, attribute)
    return _example(phrasing.format(x=name), f"I have no record of an entity called {name}.", entity_refusal(name),
                    f"{ABSTAIN} {name}", reason="entity", entity=name, kind=kind, attribute=attribute,
                    phrasing=phrasing, template=phrasing)


MAKERS = {"multiply": multiply_example, "operation": operation_example, "code": code_example,
          "writing": writing_example, "translate": translate_example, "tool": tool_example}


def scope_example(rng: random.Random, split: str, reason: str, world_seed: int = 0) -> Example:
    if reason == "entity":
        return entity_example(rng, split, world_seed)
    return MAKERS[reason](rng, split)


def scope(split: str, n: int, seed: int = 0, world_seed: int = 0) -> list[Example]:
    check_split(split)
    rng = rng_for("scope", split, seed)
    return [scope_example(rng, split, rng.choices(REASONS, WEIGHTS)[0], world_seed) for _ in range(n)]
