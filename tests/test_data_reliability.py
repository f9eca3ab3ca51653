"""glm5.data's generators that meet users where they are (typed arithmetic, several turns, thinking off, out-of-scope
requests, user-declared tools): determinism, train/heldout disjoint by construction, gold answers right, every
chat renders, and the recipe option that trains on them is off in FULL."""

import re
from dataclasses import replace

import pytest

from glm5.chat import render_chat
from glm5.data import GENERATORS, SPLITS, VARIANTS, calculator, chat_mixture, examples, world
from glm5.data.arithmetic import STEPS
from glm5.data.capabilities import _NAME_NOUNS, _NAME_VERBS, CAPABILITIES, CALCULATORS, CITIES, tool_names
from glm5.data.multiturn import CONNECTORS, FOLLOW_UPS, PRONOUNS, WHAT_ABOUT
from glm5.data.scope import MULTIPLY, REAL_NAMES, real_names
from glm5.data.thinking import shows_work
from glm5.data.wording import FRAMES, PREFIXES, SPELLINGS, SUFFIXES
from glm5.eval.score import integers, invented_numbers, said
from glm5.tokenizer import Tokenizer

from .test_data import check_columns

NEW = ("arithmetic_typed", "multiturn", "nothink", "scope", "tool_choice")


@pytest.mark.parametrize("name", NEW + ("arithmetic_nothink", "world_nothink"))
def test_deterministic_per_seed_and_prefix_stable(name):
    a = examples(name, "train", 40, seed=3)
    assert a == examples(name, "train", 40, seed=3) and a[:9] == examples(name, "train", 9, seed=3)
    assert a != examples(name, "train", 40, seed=4)


def _users(exs):
    return {m["content"] for e in exs for m in e.messages if m["role"] == "user"}


@pytest.mark.parametrize("name", NEW)
def test_no_heldout_user_message_occurs_in_training(name):
    train = _users(examples(name, "train", 800, 0) + examples(name, "train", 800, 1))
    heldout = _users(examples(name, "heldout", 300, 0))
    assert len(heldout) > 150 and not train & heldout


def _lists_disjoint(train, heldout):
    return not {x.lower() for x in train} & {x.lower() for x in heldout}


def test_typed_templates_are_disjoint_and_cover_the_forms_people_type():
    assert _lists_disjoint(FRAMES["train"]["expr"] + FRAMES["train"]["verb"],
                           FRAMES["heldout"]["expr"] + FRAMES["heldout"]["verb"])
    assert _lists_disjoint(PREFIXES["train"], PREFIXES["heldout"])
    assert _lists_disjoint(SUFFIXES["train"], SUFFIXES["heldout"])
    exs = {s: examples("arithmetic_typed", s, 1500, 0) + examples("arithmetic_typed", s, 1500, 1) for s in SPLITS}
    templates = {s: {e.meta["template"] for e in exs[s]} for s in SPLITS}
    assert len(templates["heldout"]) > 500 and not templates["train"] & templates["heldout"]
    triples = {s: {(e.meta["a"], e.meta["op"], e.meta["b"]) for e in exs[s]} for s in SPLITS}
    assert not triples["train"] & triples["heldout"]
    words = {w for table in (FRAMES[s][k] for s in SPLITS for k in ("expr", "verb")) for t in table
             for w in re.findall(r"[a-z]+", t)}
    words |= {w for s in SPLITS for t in PREFIXES[s] + SUFFIXES[s] for w in re.findall(r"[a-z]+", t)}
    words |= {w for sp in SPELLINGS.values() for t, _ in sp for w in re.findall(r"[a-z]+", t.lower())}
    for s in SPLITS:  # the forms people type, in both splits
        qs = [e.messages[0]["content"] for e in exs[s]]
        for pattern in (r"\d[+*x-]\d", r"\d plus \d", r"\d minus \d", r"\d times \d", r"\d,\d{3}",
                        r"^[A-Z\d ,+*?.!=:X-]+$", r"[a-z]\d|\d[a-z]"):
            assert sum(bool(re.search(pattern, q)) for q in qs) > 20, (s, pattern)
        typos = sum(bool(set(re.findall(r"[a-z]+", q.lower())) - words) for q in qs)
        assert 0.1 * len(qs) < typos < 0.4 * len(qs), s  # some filler or frame words are misspelt, never numbers


def test_typed_gold_reads_the_question_and_works_it_by_the_column_method():
    for e in examples("arithmetic_typed", "heldout", 400, 2):
        a, op, b = e.meta["a"], e.meta["op"], e.meta["b"]
        q = e.messages[0]["content"]
        assert {abs(x) for x in integers(q)} == {a, b}, q
        reasoning = e.messages[1]["reasoning_content"]
        assert reasoning == f"Compute {a} {op} {b}. {STEPS[op](a, b)}"
        check_columns(a, op, b, reasoning.split(". ", 1)[1])
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        assert e.answer == str(value) and e.messages[1]["content"] == f"{a} {op} {b} = {value}."
        assert op != "*" or b < 10  # the multiplier stays one digit, whichever order the user wrote


def test_thinking_off_shows_arithmetic_work_and_renders_as_the_eval_prompts_it():
    tok = Tokenizer.default()
    on = examples("arithmetic", "heldout", 30, 5)
    off = examples("arithmetic_nothink", "heldout", 30, 5)
    for a, b in zip(on, off):
        assert b.thinking is False and a.messages[0] == b.messages[0] and a.answer == b.answer
        assert "reasoning_content" not in b.messages[1] and shows_work(b.messages[1]["content"])
        assert b.messages[1]["content"] == a.messages[1]["reasoning_content"] + "\n" + a.messages[1]["content"]
    for name in ("world_nothink", "chat_nothink", "nothink"):
        for e in examples(name, "heldout", 30, 5):
            assert not any(m.get("reasoning_content") for m in e.messages)
            prompt = render_chat(tok, e.prompt_messages, e.tools, enable_thinking=False)
            full = render_chat(tok, e.messages, e.tools, add_generation_prompt=False)
            assert prompt.text.endswith("<|assistant|></think>") and full.ids[:len(prompt.ids)] == prompt.ids
    w = examples("world", "heldout", 10, 5)
    assert [e.messages[1]["content"] for e in examples("world_nothink", "heldout", 10, 5)] == \
        [e.messages[1]["content"] for e in w]


def test_scope_refusals_are_specific_and_split_by_wording_and_subject():
    w = world(0)
    names = {s: {e.meta["entity"] for seed in (0, 1) for e in examples("scope", s, 800, seed)
                 if e.meta["reason"] == "entity"} for s in SPLITS}
    assert names["heldout"] and not names["train"] & names["heldout"]
    for kind in REAL_NAMES:
        assert real_names(kind, "heldout") and not set(real_names(kind, "train")) & set(real_names(kind, "heldout"))
    for s in SPLITS:
        reasons = set()
        for e in examples("scope", s, 400, 3):
            q, content = e.messages[0]["content"], e.messages[1]["content"]
            reasons.add(e.meta["reason"])
            assert said(content, e.meta["specific"]) and not invented_numbers(content, q), (q, content)
            if e.meta["reason"] == "entity":
                name = e.meta["entity"]
                assert name in q and content.startswith(f"I don't know {name};") and name not in w
                assert not set(name.split()) & w.words
            if e.meta["reason"] == "multiply":
                assert e.meta["a"] >= 10 and e.meta["b"] >= 10 and content.startswith(MULTIPLY)
        assert reasons == {"multiply", "operation", "code", "writing", "translate", "tool", "entity"}
    templates = {s: {e.meta["template"] for seed in (0, 1) for e in examples("scope", s, 800, seed)} for s in SPLITS}
    assert not templates["train"] & templates["heldout"]
    assert not set(CITIES) & {x for names in REAL_NAMES.values() for x in names}  # no held-out name in a tool chat
    # one split of products for every family that multiplies large numbers, with a calculator or without
    from glm5.data.tool import pair_split

    for s in SPLITS:
        mul = [e for e in examples("scope", s, 300, 0) if e.meta["reason"] == "multiply"]
        assert mul and all(pair_split(e.meta["a"], e.meta["b"]) == s for e in mul)


def test_tool_choice_declares_split_tools_and_calls_only_declared_ones():
    assert not tool_names(0) & tool_names(1)
    held_words = {w for name in tool_names(1) for w in name.split("_")}
    assert not held_words & {*_NAME_VERBS, *_NAME_NOUNS}  # a made-up name never spells a held-out one
    for c in CAPABILITIES:
        assert _lists_disjoint(*c.requests)
    assert "calculator" in {t.name for t in CALCULATORS[0]}
    cases, made_up = set(), set()
    for s in SPLITS:
        own, other = tool_names(s == "heldout"), tool_names(s != "heldout")
        for e in examples("tool_choice", s, 300, 4):
            declared = [t["function"]["name"] for t in e.tools]
            assert declared == e.meta["declared"] and not set(declared) & other
            assert set(declared) <= own or s == "train"
            made_up |= set(declared) - own
            assert len(set(declared)) == len(declared) and 1 <= len(declared) <= 4
            first = e.messages[1]
            gold = e.meta["call"]
            cases.add((e.meta["expect"], e.meta["inner"]))
            if e.meta["expect"] == "call":
                (call,) = first["tool_calls"]
                assert call["function"] == gold and gold["name"] in declared
                params = next(t["function"]["parameters"] for t in e.tools if t["function"]["name"] == gold["name"])
                assert set(gold["arguments"]) == set(params["required"])
                if e.meta["capability"] == "calculator":  # the product asked for, evaluated by the calculator
                    (expr,) = gold["arguments"].values()
                    assert integers(expr) == integers(e.messages[0]["content"]) and " * " in expr
                    assert e.messages[2]["content"] == calculator(expr)
                else:  # every argument is copied from the request
                    assert all(str(v) in e.messages[0]["content"] for v in gold["arguments"].values())
                assert e.answer in e.messages[3]["content"]
            else:
                assert "tool_calls" not in first and gold is None
                if e.meta["inner"] == "scope":  # no declared tool does what is asked
                    key = e.meta["capability"]
                    tools = CALCULATORS if key == "calculator" else next(c for c in CAPABILITIES if c.key == key).tools
                    assert not set(declared) & {t.name for split in tools for t in split}
                if e.meta["inner"] == "arithmetic":  # a calculator is never on offer when the column method is right
                    assert not set(declared) & {t.name for split in CALCULATORS for t in split}
    assert len(made_up) > 100  # training declares tools under names it makes up, besides its fixed ones
    assert {("call", None), ("answer", "scope"), ("answer", "arithmetic"), ("answer", "world"),
            ("answer", "unknown"), ("answer", "chat")} <= cases
    templates = {s: {e.meta.get("template") for e in examples("tool_choice", s, 600, 0)
                     if e.meta["expect"] == "call" or e.meta["inner"] == "scope"} for s in SPLITS}
    assert not templates["train"] & templates["heldout"]



def test_tool_choice_reasoning_names_tools_in_their_declared_tokens():
    """A tool's name in the reasoning is the token sequence of its declaration (quoted, so the pre-tokeniser cuts
    it alike), so that naming a declared tool is a copy."""
    tok = Tokenizer.default()
    seen = 0
    for e in examples("tool_choice", "train", 200, 5):
        decl = render_chat(tok, e.prompt_messages, e.tools).ids
        for m in e.messages:
            reasoning = m.get("reasoning_content") or ""
            for name in re.findall(r'"([^"]+)"', reasoning):
                assert name in e.meta["declared"]
                opener, *name_ids = tok.encode(f' "{name}')
                assert tok.decode([opener]) == ' "' and _contains(decl, name_ids)
                assert _contains(tok.encode(reasoning), name_ids), (name, reasoning)
                seen += 1
    assert seen > 150


def _contains(seq: list[int], sub: list[int]) -> bool:
    return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))

def test_multiturn_turns_refer_back_correctly():
    assert _lists_disjoint(*CONNECTORS.values()) and _lists_disjoint(*WHAT_ABOUT)
    for op in FOLLOW_UPS:
        assert _lists_disjoint(*FOLLOW_UPS[op])
    for a in PRONOUNS:
        assert _lists_disjoint(*PRONOUNS[a])
    w = world(0)
    kinds = set()
    for s in SPLITS:
        for e in examples("multiturn", s, 400, 6):
            users = [m for m in e.messages if m["role"] == "user"]
            assert len(users) == e.meta["turn"] and e.prompt_messages[-1] is users[-1]
            assert e.messages[-1]["role"] == "assistant" and len(e.messages) == 2 * e.meta["turn"]
            kind = e.meta["turn_kind"]
            kinds.add((e.meta["turn"] > 1, kind))
            if kind == "refer_arithmetic":
                prev = int(e.messages[-3]["content"].rsplit("= ", 1)[1].rstrip("."))
                a, op, b = e.meta["a"], e.meta["op"], e.meta["b"]
                assert a == prev and e.answer == str({"+": a + b, "-": a - b, "*": a * b}[op])
                check_columns(a, op, b, e.messages[-1]["reasoning_content"].split(". ", 1)[1])
            if kind in ("refer_pronoun", "refer_what_about") and e.family == "world":
                assert e.answer == w.by_name[e.meta["entity"]].get(e.meta["attribute"])
            if kind in ("refer_pronoun", "refer_what_about") and e.family == "unknown":
                assert e.messages[-1]["content"].startswith(f"I don't know {e.meta['entity']};")
    assert {(False, "new"), (True, "new"), (True, "refer_arithmetic"), (True, "refer_pronoun"),
            (True, "refer_what_about")} <= kinds


@pytest.mark.parametrize("name", NEW)
def test_every_new_example_renders(name):
    tok = Tokenizer.default()
    for s in SPLITS:
        for e in examples(name, s, 30, 7):
            r = render_chat(tok, e.messages, e.tools, add_generation_prompt=False)
            assert r.text.rstrip().endswith(e.messages[-1]["content"].strip())
            assert e.thinking == all(m.get("reasoning_content") for m in e.messages if m["role"] == "assistant")


def test_mixture_and_recipe_option():
    from glm5.speedrun.pipeline import sft_examples
    from glm5.speedrun.recipe import CI, FULL, RECIPES, RELIABLE_SFT_CHATS

    assert set(NEW) <= set(GENERATORS) and set(RELIABLE_SFT_CHATS) == set(NEW) | {"chat"}
    assert not set(FULL.sft_chats) & set(NEW)  # FULL's speedrun does not train on them
    assert RELIABLE_SFT_CHATS["chat"] > FULL.sft_chats["chat"]  # more small talk beside the refusals
    assert RECIPES["full_reliable"].sft_chats == {**FULL.sft_chats, **RELIABLE_SFT_CHATS}
    m = chat_mixture("train", 60, seed=1, weights={"scope": 1, "tool_choice": 1, "multiturn": 1})
    assert {e.family for e in m} >= {"scope", "tool_choice"}
    r = replace(CI, sft_chats={"chat": 2, "scope": 3, "nothink": 2})
    got = sft_examples(r, Tokenizer.default(), seed=0)
    assert len(got) == 7 and sum(e.family == "scope" for e in got) >= 3 and sum(not e.thinking for e in got) == 2
    assert set(VARIANTS) >= {"arithmetic_nothink", "world_nothink", "chat_nothink"}


def test_small_talk_trains_many_typed_phrasings_and_never_a_heldout_one():
    from glm5.data.smalltalk import _NAMES, INTENTS, normalized

    held = {normalized(t.format(name=n)) for intent in INTENTS.values() for t in intent[3] for n in _NAMES}
    train = [e.messages[0]["content"] for e in examples("chat", "train", 3000, 0)]
    assert not {normalized(t) for t in train} & held
    assert len(set(train)) > 300  # many phrasings, typed several ways
    assert any(t == t.lower() and t != t.upper() for t in train) and any(t[-1].isalnum() for t in train)
    heldout = examples("chat", "heldout", 300, 0)
    assert {e.messages[0]["content"] for e in heldout} <= {t.format(name=n) for intent in INTENTS.values()
                                                           for t in intent[3] for n in _NAMES}
