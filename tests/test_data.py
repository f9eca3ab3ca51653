"""glm5.data: determinism, train/heldout disjointness, gold correctness, and that every example renders."""

import random
import re
from fractions import Fraction

import pytest

from glm5.chat import render_chat
from glm5.data import (ABSTAIN, ATTRIBUTES, FAMILIES, SPLITS, calculator, chat_mixture, encyclopedia, examples,
                       pretrain_texts, world)
from glm5.data.arithmetic import TEMPLATES, add_steps, mul_steps, sub_steps
from glm5.data.text import _paragraphs
from glm5.data.world import COMPANY_SUFFIXES, STATEMENTS
from glm5.tokenizer import Tokenizer

FAST = {"retrieval": {"context_tokens": 300}}  # short contexts keep the suite fast; lengths are tested below


def prompts(family, split, n, seed):
    return {ex.messages[0]["content"] for ex in examples(family, split, n, seed, **FAST.get(family, {}))}


@pytest.mark.parametrize("family", FAMILIES)
def test_deterministic_per_seed_and_prefix_stable(family):
    kw = FAST.get(family, {})
    a = examples(family, "train", 30, seed=3, **kw)
    assert a == examples(family, "train", 30, seed=3, **kw)
    assert a[:10] == examples(family, "train", 10, seed=3, **kw)
    assert a != examples(family, "train", 30, seed=4, **kw)
    assert all(ex.family == family for ex in a)


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="family must be one of"):
        examples("poetry", "train", 1)
    with pytest.raises(ValueError, match="split must be one of"):
        examples("arithmetic", "test", 1)
    with pytest.raises(ValueError, match="takes no option context_tokens"):
        examples("arithmetic", "train", 1, context_tokens=100)
    with pytest.raises(ValueError, match="no family in the mixture"):
        chat_mixture("train", 5, bogus=1)
    with pytest.raises(ValueError, match="weights must map"):
        chat_mixture("train", 5, weights={"poetry": 1.0})


@pytest.mark.parametrize("family", FAMILIES)
def test_train_and_heldout_prompts_are_disjoint(family):
    n = 60 if family == "retrieval" else 400
    train = prompts(family, "train", n, 0) | prompts(family, "train", n, 1)
    heldout = prompts(family, "heldout", n, 0) | prompts(family, "heldout", n, 1)
    assert heldout and not train & heldout


def test_operand_pairs_are_disjoint():
    for family in ("arithmetic", "tool"):
        pairs = {s: {(e.meta["a"], e.meta["op"], e.meta["b"]) for seed in (0, 1)
                     for e in examples(family, s, 3000, seed)} for s in SPLITS}
        assert len(pairs["heldout"]) > 1000 and not pairs["train"] & pairs["heldout"]


def test_unknown_names_are_disjoint_and_not_in_world():
    w = world(0)
    names = {s: {e.meta["entity"] for seed in (0, 1) for e in examples("unknown", s, 500, seed)} for s in SPLITS}
    assert len(names["heldout"]) > 300 and not names["train"] & names["heldout"]
    for name in names["train"] | names["heldout"]:
        assert name not in w and not set(name.split()) & w.words, name
    for e in examples("unknown", "train", 50):
        assert e.answer == ABSTAIN and e.messages[-1]["content"].startswith(ABSTAIN)


# One clause of the column method: "x op y [op c] = r, write d carry|borrow k."
CLAUSE = re.compile(r"(\d) ([-+*]) (\d)(?: ([-+]) (\d))? = (-?\d+), write (\d) (?:carry|borrow) (\d)\.")


# A multiplication column after the first: "x * y = q, q + c = r, write d carry k."
MUL_FACT = re.compile(r"(\d) \* (\d) = (\d+), (\d+) \+ (\d) = ")


def check_columns(a, op, b, reasoning):
    """Every clause is right, carries chain, and the written digits read backwards are |a op b|; a multiplication
    column after the first states its table fact before adding the carry."""
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    assert reasoning.endswith(f"Answer: {value}.")
    if op == "*":
        assert not re.search(r"\d \* \d \+", reasoning)  # never "x * y + c" in one step

        def fact(m):
            assert int(m[3]) == int(m[1]) * int(m[2]) == int(m[4])
            return f"{m[1]} * {m[2]} + {m[5]} = "
        reasoning = MUL_FACT.sub(fact, reasoning)
    if op == "-" and a < b:
        assert reasoning.startswith(f"{a} < {b}, so compute {b} - {a} and negate. ")
        a, b = b, a
    clauses = CLAUSE.findall(reasoning)
    assert len(clauses) == len(re.findall(r"write", reasoning)) >= len(str(max(a, b)))
    written, carry = [], 0
    for i, (x, o, y, o2, c, r, d, k) in enumerate(clauses):
        x, y, r, d, k = int(x), int(y), int(r), int(d), int(k)
        assert o == op and (c == "") == (i == 0)
        if i:
            assert int(c) == carry and o2 == ("-" if op == "-" else "+")
        full = {"+": x + y + carry, "-": x - y - carry, "*": x * y + carry}[op]
        assert r == full and d == full % 10 and k == (int(full < 0) if op == "-" else full // 10)
        written.append(d)
        carry = k
    assert carry == 0
    assert int("".join(map(str, reversed(written)))) == abs(value)


def test_arithmetic_reasoning_is_right():
    rng = random.Random(0)
    for _ in range(500):
        a, b = rng.randrange(10 ** rng.randint(1, 4)), rng.randrange(10 ** rng.randint(1, 4))
        check_columns(a, "+", b, add_steps(a, b))
        check_columns(a, "-", b, sub_steps(a, b))
        check_columns(a, "*", b % 10, mul_steps(a, b % 10))
    for a, op, b in ((9999, "+", 1), (1000, "-", 999), (5, "-", 9999), (0, "-", 0), (9999, "*", 9), (0, "*", 0)):
        check_columns(a, op, b, {"+": add_steps, "-": sub_steps, "*": mul_steps}[op](a, b))
    negatives = 0
    for split in SPLITS:
        for e in examples("arithmetic", split, 300, seed=5):
            a, op, b = e.meta["a"], e.meta["op"], e.meta["b"]
            check_columns(a, op, b, e.messages[1]["reasoning_content"])
            assert e.messages[1]["content"] == f"{a} {op} {b} = {e.answer}."
            negatives += e.answer.startswith("-")
    assert negatives > 50
    assert "What is {a} + {b}?" in TEMPLATES["+"]
    assert any(re.fullmatch(r"What is \d+ \+ \d+\?", p) for p in prompts("arithmetic", "train", 300, 0))


def _exact(expr):
    # An independent reference: Python's own evaluation of a trusted, generated expression, in exact fractions.
    return eval(re.sub(r"(\d+)", r"Fraction(\1)", expr), {"Fraction": Fraction})  # noqa: S307 (generated here)


def test_calculator():
    rng = random.Random(1)
    for _ in range(300):
        terms = [str(rng.randrange(1, 10 ** rng.randint(1, 4))) for _ in range(rng.randint(1, 4))]
        expr = terms[0]
        for t in terms[1:]:
            expr = f"({expr}) {rng.choice('+-*')} {t}" if rng.random() < 0.3 else f"{expr} {rng.choice('+-*')} {t}"
        assert calculator(expr) == str(_exact(expr)), expr
    assert calculator("4821 * 7391") == "35632011"
    assert calculator("-(3 + 4) * 2") == "-14"
    assert calculator("7 / 2") == "3.5" and calculator("-10 / 4") == "-2.5" and calculator("6 / 3") == "2"
    assert calculator("1 / 3") == "0.333333333333"
    for bad, why in (("__import__('os')", "not allowed"), ("x + 1", "not allowed"), ("2 ** 3", "not allowed"),
                     ("10 ** 10 ** 10", "not allowed"), ("True + 1", "not allowed"), ("1.5 * 2", "not allowed"),
                     ("abs(-1)", "not allowed"), ("1 / 0", "division by zero"), ("9" * 300, "limit is"),
                     ("99999999999999999999 * 99999999999999999999 * 99999999999999999999 * 99999999999999999999",
                      "exceeds"), ("1 +", "cannot parse"), ("", "empty")):
        with pytest.raises(ValueError, match=why):
            calculator(bad)


def test_tool_examples_call_the_calculator():
    for e in examples("tool", "heldout", 50):
        call = e.messages[1]["tool_calls"][0]["function"]
        assert call["name"] == "calculator" and e.tools[0]["function"]["name"] == "calculator"
        assert e.messages[2] == {"role": "tool", "content": calculator(call["arguments"]["expression"])}
        assert e.answer == str(e.meta["a"] * e.meta["b"]) and e.messages[3]["content"].endswith(f"= {e.answer}.")


@pytest.mark.parametrize("target", [1000, 4000])
def test_retrieval_length_depth_and_splits(target):
    for split in SPLITS:
        for depth in (0.0, 0.5, 1.0):
            (e,) = examples("retrieval", split, 1, seed=2, context_tokens=target, depth=depth, count_tokens=len)
            text = e.messages[0]["content"]
            needle = f"The access code of {e.meta['name']} is {e.answer}."
            assert text.count(needle) == 1 and text.endswith(f"What is the access code of {e.meta['name']}?")
            assert abs(len(text) - target) <= 0.15 * target and e.meta["context_tokens"] == len(text)
            assert abs(e.meta["depth"] - depth) < 0.1
            assert abs(text.index(needle) / len(text) - depth) < 0.1
    pools = _paragraphs()
    assert len(pools["heldout"]) > 100 and not set(pools["train"]) & set(pools["heldout"])
    names = {s: {e.meta["name"] for e in examples("retrieval", s, 200, context_tokens=100)} for s in SPLITS}
    assert not names["train"] & names["heldout"]


def test_every_example_renders():
    tok = Tokenizer.default()
    for family in FAMILIES:
        for split in SPLITS:
            for e in examples(family, split, 25, seed=7, **FAST.get(family, {})):
                assert all(m.get("reasoning_content") for m in e.messages if m["role"] == "assistant")
                r = render_chat(tok, e.messages, e.tools, add_generation_prompt=False)
                assert r.text.rstrip().endswith(e.messages[-1]["content"]) and e.answer in e.messages[-1]["content"]
    for e in chat_mixture("train", 40, weights={"retrieval": 1, "world": 1}, context_tokens=300):
        render_chat(tok, e.messages, e.tools, add_generation_prompt=False)


def test_world_is_coherent_and_answers_are_its_facts():
    w = world(0)
    assert w is world(0) and w == world.__wrapped__(0) and len(w.entities) == 240
    words = [x for n in w.names for x in n.split() if x not in COMPANY_SUFFIXES]
    assert len(w.by_name) == 240 and len(words) == len(set(words)) == len(w.words)  # no name half-shares a word
    kind = {e.name: e.kind for e in w.entities}
    for e in w.entities:
        assert tuple(a for a, _ in e.attrs) == ATTRIBUTES[e.kind]
        for a, v in e.attrs:
            want = {"capital": "city", "country": "country", "founder": "person", "headquarters": "city",
                    "birthplace": "city"}.get(a)
            assert want is None or kind[v] == want
        if e.kind == "country":
            assert w.by_name[e.get("capital")].get("country") == e.name
    for split in SPLITS:
        for ex in examples("world", split, 200):
            ent = w.by_name[ex.meta["entity"]]
            assert ex.answer == ent.get(ex.meta["attribute"])
            assert ex.messages[1]["content"] == STATEMENTS[ex.meta["attribute"]].format(x=ent.name, y=ex.answer)


def test_encyclopedia_states_every_fact_in_every_paraphrase():
    w = world(0)
    docs = encyclopedia(w, seed=0, paraphrases=4)
    assert len(docs) == 4 * len(w.entities) and docs == encyclopedia(w, seed=0, paraphrases=4)
    for e in w.entities:
        full = [d for d in docs if e.name in d and all(v in d for _, v in e.attrs)]
        assert len(full) >= 4, e
        assert len(set(full)) >= 3, e  # paraphrases, not copies
    texts = list(pretrain_texts(seed=0))
    assert set(docs) <= set(texts) and any("identifier" in t for t in texts)


def test_other_words_state_every_fact_in_each_other_form():
    from glm5.data.world import OTHER_WORDS, OTHER_WORDS_STYLE

    w = world(0)
    docs = encyclopedia(w, seed=5, paraphrases=1, styles=(OTHER_WORDS_STYLE,))
    assert len(docs) == len(w.entities)
    for e in w.entities:  # one document holds every fact of e, in each of its other forms
        want = [form.format(x=e.name, y=v) for a, v in e.attrs for form in OTHER_WORDS[a]]
        assert sum(all(s in d for s in want) for d in docs) == 1, e.name
    with pytest.raises(ValueError, match="styles"):
        encyclopedia(w, styles=(7,))


def test_chat_mixture():
    m = chat_mixture("train", 300, seed=1)
    assert m == chat_mixture("train", 300, seed=1)
    counts = {f: sum(e.family == f for e in m) for f in FAMILIES}
    assert counts["retrieval"] == 0 and min(counts[f] for f in FAMILIES if f != "retrieval") > 20
    only = chat_mixture("heldout", 50, seed=1, weights={"arithmetic": 1.0}, ops=("*",))
    assert {e.meta["op"] for e in only} == {"*"}


def test_copy_drills_repeat_their_string():
    from glm5.data import copy_texts

    drills = copy_texts(200, seed=3)
    assert drills == copy_texts(200, seed=3) and drills[:50] == copy_texts(50, seed=3) != copy_texts(50, seed=4)
    kinds = set()
    for d in drills:
        first, *again = d.rstrip("\n").split("\n")
        s = first.removeprefix("Copy: ")
        assert first.startswith("Copy: ") and 1 <= len(again) <= 2 and again == [f"Again: {s}"] * len(again), d
        kinds.add(s.isdigit())
    assert kinds == {True, False}  # digit strings and syllable words
    with pytest.raises(ValueError, match="n must be"):
        copy_texts(-1)


def test_noise_words_only_in_training_questions():
    """NOISE_PERCENT of training questions have one word (never the name) swapped for a nonsense word; heldout none."""
    w = world(0)
    for family in ("world", "unknown"):
        noised = 0
        for split in SPLITS:
            for e in examples(family, split, 400, seed=2):
                question, template, name = e.messages[0]["content"], e.meta["phrasing"], e.meta["entity"]
                if question == template.format(x=name):
                    continue
                assert split == "train", question
                noised += 1
                got, want = question.split(), template.format(x=name).split()
                assert len(got) == len(want) and name in question, question
                diff = [(g, t) for g, t in zip(got, want) if g != t]
                assert len(diff) == 1, question
                (g, t), = diff
                word = g.rstrip("?.")
                assert g[len(word):] == t[len(t.rstrip("?.")):] and word.isalpha() and word.islower(), question
                assert word.capitalize() not in w.words and word != t.rstrip("?.").lower()
        assert 0.3 * 400 < noised < 0.5 * 400, (family, noised)


def test_arithmetic_long_variant_draws_two_long_operands():
    from glm5.data import VARIANTS, examples
    from glm5.eval.cli import _suites

    exs = examples("arithmetic_long", "heldout", 60, seed=1)
    assert {ex.family for ex in exs} == {"arithmetic"} and "arithmetic_long" in VARIANTS
    for ex in exs:
        a, b, op = ex.meta["a"], ex.meta["b"], ex.meta["op"]
        assert 100 <= a <= 9999 and (0 <= b <= 9 if op == "*" else 100 <= b <= 9999)
    assert examples("arithmetic_long", "heldout", 10, seed=1) == exs[:10]
    assert _suites("world,arithmetic_long") == ["world", "arithmetic_long"]
    with pytest.raises(ValueError, match="min_digits"):
        examples("arithmetic", "train", 3, min_digits=5, max_digits=4)
