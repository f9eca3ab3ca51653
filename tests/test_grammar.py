"""Structured output enforced while decoding (glm5/engine/grammar.py, glm5/server/runs.chat_grammar): whatever a
sampled model prefers, it can only write what the grammar allows.

Random tiny models write no JSON and no tool call of their own, so most checks use one whose lm_head has a bias
toward GLM's chat tags and JSON's closing characters: it opens and closes calls and objects often, in every order.
Each property is checked over many seeds next to a control, the same model and requests without the grammar, which
breaks it: the check can fail. Seeds are fixed, so every test is deterministic.
"""

import json

import openai
import pytest
import torch

import glm5
from glm5.chat import normalize_tools, render_chat
from glm5.chat_parse import parse_output
from glm5.config import tiny
from glm5.engine import RequestError, SamplingParams
from glm5.engine.grammar import Grammar, MaskFiller, grammar_tokenizer
from glm5.engine.sampler import SeqSampling, make_generator, sample, unpack_bitmask
from glm5.loader import load
from glm5.server import BackgroundServer, create_app, runs
from glm5.server.launch import build_engine
from glm5.server.protocol import ChatCompletionRequest
from glm5.server.runs import Limits, ServerState, chat_grammar

from .server_util import TOK, start

pytestmark = pytest.mark.usefixtures("one_thread")

USER = [{"role": "user", "content": "Answer in JSON: what is the weather in Paris?"}]
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"tz": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["tz"]}}},
]
DECLARED = {"get_weather": ({"city", "days"}, {"city"}), "get_time": ({"tz"}, {"tz"})}  # name -> (keys, required)
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "ok": {"type": "boolean"}, "color": {"enum": ["red", "green"]},
                                           "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2}},
          "required": ["n", "ok", "color"], "additionalProperties": False}
SEEDS = range(16)


def tagged_model():
    """A random tiny model with logit biases toward `</think>` (+10), the tool-call tags (+7) and tokens that hold
    `"` or `}` (+3)."""
    model = glm5.load_model(tiny().replace(vocab_size=TOK.vocab_size))
    head = model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    biased.weight = head.weight
    bias = torch.zeros(head.out_features)
    tags = ["<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"]
    bias[[i for i in range(len(TOK)) if not TOK.is_special(i) and set(TOK.decode([i])) & set('"}')]] = 3.0
    bias[[TOK.token_id(t) for t in tags]] = 7.0
    bias[TOK.token_id("</think>")] = 10.0
    biased.bias = torch.nn.Parameter(bias)
    model.lm_head = biased
    return model


@pytest.fixture(scope="module")
def tagged():
    eng = build_engine(tagged_model(), TOK, cache_bytes=32 << 20)
    return eng, ServerState(eng, TOK, "tiny", Limits(), None)


def chat(tagged, body: dict, seeds=SEEDS, max_tokens: int = 40, constrained: bool = True, **params):
    """Sample the chat request `body` once per seed, as the server would; → [(finish_reason, ParsedOutput, ids)]."""
    eng, state = tagged
    req = ChatCompletionRequest.model_validate_json(json.dumps({"messages": USER, **body}))
    tools = normalize_tools(req.tools) if req.tool_choice != "none" else None
    r = render_chat(TOK, req.messages, tools)
    g = chat_grammar(state, req) if constrained else None
    outs = eng.generate([r.ids] * len(seeds), [SamplingParams(temperature=1.0, seed=s, max_tokens=max_tokens,
                                                              grammar=g, **params) for s in seeds])
    res = []
    for (o,) in outs:
        ids = o.token_ids[:-1] if o.finish_reason == "stop" else o.token_ids  # the end token is no text
        res.append((o.finish_reason, parse_output(TOK.decode(ids), thinking=r.thinking, tools=tools), ids))
    return res


def _json(text):
    try:
        return json.loads(text or "")
    except ValueError:
        return None


def test_json_object_answers_parse(tagged):
    body = {"response_format": {"type": "json_object"}}
    got = chat(tagged, body, max_tokens=80)
    done = [p for f, p, _ in got if f == "stop"]
    assert len(done) >= len(SEEDS) // 2, [f for f, _, _ in got]
    assert all(isinstance(_json(p.content), dict) for p in done), [p.content for p in done]
    control = chat(tagged, body, max_tokens=80, constrained=False)
    assert sum(isinstance(_json(p.content), dict) for _, p, _ in control) <= 1, [p.content for _, p, _ in control]


def test_json_schema_answers_validate(tagged):
    jsonschema = pytest.importorskip("jsonschema")
    body = {"response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}}

    def valid(p):
        try:
            jsonschema.validate(json.loads(p.content or ""), SCHEMA)
            return True
        except (ValueError, jsonschema.ValidationError):
            return False

    got = chat(tagged, body, max_tokens=60)
    assert all(f == "stop" for f, _, _ in got), [f for f, _, _ in got]  # the schema bounds the answer
    assert all(valid(p) for _, p, _ in got), [p.content for _, p, _ in got]
    assert not any(valid(p) for _, p, _ in chat(tagged, body, max_tokens=60, constrained=False))


def _call_violations(calls: list[dict]) -> list[str]:
    """Calls ({"function": {"name", "arguments"}}) to undeclared functions or with undeclared / missing / mistyped
    arguments."""
    bad = []
    for c in calls:
        name, args = c["function"]["name"], _json(c["function"]["arguments"])
        keys, required = DECLARED.get(name, (set(), set()))
        if name not in DECLARED or not isinstance(args, dict) or not required <= set(args) <= keys:
            bad.append(f"{name}({c['function']['arguments']})")
        elif not isinstance(args.get("days", 0), int) or args.get("tz", "UTC") not in ("UTC", "CET"):
            bad.append(f"{name}({c['function']['arguments']}): wrong type")
    return bad


def _undeclared_names(ids: list[int]) -> list[str]:
    """The text between each <tool_call> token and the next special token, where it is not a declared name."""
    call, out = TOK.token_id("<tool_call>"), []
    for i in (i for i, t in enumerate(ids) if t == call):
        j = next((j for j in range(i + 1, len(ids)) if TOK.is_special(ids[j])), None)
        if j is not None and TOK.decode(ids[i + 1:j]) not in DECLARED:
            out.append(TOK.decode(ids[i + 1:j]))
    return out


def _complete_calls(finish: str, parsed) -> list[dict]:
    return parsed.tool_calls if finish == "stop" else parsed.tool_calls[:-1]  # max_tokens may cut the last one


def test_only_declared_tools_can_be_called(tagged):
    got = chat(tagged, {"tools": TOOLS}, max_tokens=48)
    calls = [c["function"]["name"] for _, p, _ in got for c in p.tool_calls]
    assert len(calls) >= len(SEEDS) and set(calls) == set(DECLARED), calls  # it calls, and both functions
    assert [n for _, _, ids in got for n in _undeclared_names(ids)] == []
    assert [b for f, p, _ in got for b in _call_violations(_complete_calls(f, p))] == []
    control = chat(tagged, {"tools": TOOLS}, max_tokens=48, constrained=False)
    assert len([n for _, _, ids in control for n in _undeclared_names(ids)]) >= 3
    # parallel_tool_calls false: at most one call
    one = chat(tagged, {"tools": TOOLS, "parallel_tool_calls": False}, max_tokens=48)
    assert max(len(p.tool_calls) for _, p, _ in one) == 1 and max(len(p.tool_calls) for _, p, _ in got) > 1


@pytest.fixture(scope="module")
def tagged_server(tagged):
    srv = start(tagged[0])
    yield openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)
    srv.stop()


def _choices(client, **kw):
    # One call each: this model, biased toward <tool_call>, would otherwise call again until max_tokens.
    return client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, n=8, seed=1, temperature=1.0,
                                          max_tokens=80, parallel_tool_calls=False, **kw).choices


@pytest.mark.parametrize("choice, names", [
    ({"type": "function", "function": {"name": "get_time"}}, {"get_time"}),
    ("required", {"get_weather", "get_time"}),
])
def test_tool_choice_forces_calls(tagged_server, monkeypatch, choice, names):
    """Through the server: every sample calls (the named function), each call well-formed; without the grammar
    (control) the same samples do not."""

    def ok(c):
        calls = [{"function": {"name": t.function.name, "arguments": t.function.arguments}}
                 for t in c.message.tool_calls or []]
        complete = calls if c.finish_reason == "tool_calls" else calls[:-1]  # max_tokens may cut the last one
        return (c.finish_reason in ("tool_calls", "length") and calls
                and {t["function"]["name"] for t in calls} <= names and not _call_violations(complete))

    got = _choices(tagged_server, tool_choice=choice)
    assert all(ok(c) for c in got), [(c.finish_reason, c.message) for c in got]
    assert sum(c.finish_reason == "tool_calls" for c in got) >= len(got) // 2
    monkeypatch.setattr(runs, "chat_grammar", lambda state, req: None)
    assert not all(ok(c) for c in _choices(tagged_server, tool_choice=choice))


def test_unmet_constraints_are_400s_or_finish_reasons(tagged_server):
    c = tagged_server
    bad = [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
         "response_format", "Invalid type"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}},
         "response_format", "not"),  # a keyword llguidance cannot enforce: refused, never silently ignored
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"x": {"$ref": "#/$defs/missing"}}}}}]},
         "tools", "tools[0].function.parameters.properties.x"),
        ({"tools": TOOLS, "extra_body": {"min_tokens": 2}}, None, "min_tokens"),
    ]
    for kw, param, says in bad:
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="tiny", messages=USER, max_tokens=5, **kw)
        assert e.value.body["param"] == param and says in e.value.body["message"], e.value.body
    # A budget that ends inside the JSON: the answer so far, finish_reason "length" (as OpenAI), never a 5xx.
    r = c.chat.completions.create(model="tiny", messages=USER, max_tokens=3, response_format={"type": "json_object"},
                                  extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert r.choices[0].finish_reason == "length"


def test_grammar_ends_the_answer_under_ignore_eos(tagged):
    """ignore_eos: the engine does not stop at end tokens, but a finished grammar allows nothing else: the end token
    ends the sample (stop_reason names it, so the server hides it)."""
    body = {"response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}}
    eng, state = tagged
    req = ChatCompletionRequest.model_validate_json(json.dumps({"messages": USER, **body}))
    r = render_chat(TOK, USER)
    (o,), = eng.generate([r.ids], SamplingParams(temperature=1.0, seed=3, max_tokens=80, ignore_eos=True,
                                                  grammar=chat_grammar(state, req)))
    assert o.finish_reason == "stop" and o.stop_reason == o.token_ids[-1] in TOK.eos_ids
    assert isinstance(_json(parse_output(TOK.decode(o.token_ids[:-1])).content), dict)


def test_prompt_tail_must_fit_the_grammar(tagged):
    eng, state = tagged
    g = chat_grammar(state, ChatCompletionRequest.model_validate_json(json.dumps({"messages": USER, "tools": TOOLS})))
    with pytest.raises(RequestError, match="do not fit the grammar"):  # the tail after <|assistant|> is not GLM's
        eng.add_request([TOK.token_id("<|assistant|>")] + TOK.encode("Sure:"), SamplingParams(grammar=g))
    assert not eng.has_unfinished()


# ------------------------------------------------------------------------------------------ the unconstrained path
def test_unconstrained_rows_are_untouched(tagged):
    """A request without a grammar samples the same beside constrained requests as beside unconstrained ones (its
    log-probs equal up to the rounding that other rows' MoE routing brings), and a batch without constrained rows
    computes no mask at all: it runs the sampler exactly as without constrained decoding (whose bitwise equality
    test_all_allowed_mask_changes_nothing checks)."""
    eng, state = tagged
    prompt = render_chat(TOK, USER).ids
    free = [SamplingParams(temperature=1.0, seed=7, max_tokens=24), SamplingParams(temperature=0, max_tokens=24)]
    # Neighbours that run all 24 steps either way, so the batch (and the batched logits' rounding) stays the same.
    words = Grammar(state.grammar_tokenizer, "start: /[a-z ]{100,200}/")
    neighbours = [SamplingParams(temperature=1.0, seed=s, max_tokens=24, ignore_eos=True) for s in (1, 2)]
    alone = eng.generate([prompt] * 4, free + neighbours)
    for p in neighbours:
        p.grammar = words
    mixed = eng.generate([prompt] * 4, free + neighbours)
    for a, m in zip(alone[:2], mixed[:2]):
        assert a[0].token_ids == m[0].token_ids
        assert a[0].logprobs == pytest.approx(m[0].logprobs, abs=1e-4)
    masked = mixed[2][0]
    assert len(masked.token_ids) == 24 and all(c.isalpha() or c == " " for c in TOK.decode(masked.token_ids))
    assert not all(c.isalpha() or c == " " for c in TOK.decode(alone[2][0].token_ids))

    def no_mask(*a):
        raise AssertionError("a mask was computed for an unconstrained batch")

    orig = MaskFiller.__call__
    MaskFiller.__call__ = no_mask
    try:
        assert eng.generate([prompt] * 2, free)[0][0].token_ids == alone[0][0].token_ids
    finally:
        MaskFiller.__call__ = orig


def test_all_allowed_mask_changes_nothing():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 100, generator=g)
    states = lambda: [SeqSampling(SamplingParams(temperature=t, seed=1, top_k=k), make_generator(1, "cpu"), [])
                      for t, k in ((0.0, 0), (1.0, 0), (0.7, 20))]
    a = sample(logits, states(), [[], [], []])
    b = sample(logits, states(), [[], [], []], torch.full((3, 4), -1, dtype=torch.int32))
    assert (a.tokens, a.logprobs, a.sampling_logprobs) == (b.tokens, b.logprobs, b.sampling_logprobs)
    allowed = [[0, 31], [32, 63, 99], [5]]
    words = [[sum(1 << (t % 32) for t in ts if t // 32 == w) for w in range(4)] for ts in allowed]
    mask = torch.tensor(words, dtype=torch.int64).to(torch.int32)  # bit 31 wraps to the sign bit, as llguidance's
    assert [torch.nonzero(row).flatten().tolist() for row in unpack_bitmask(mask, 100)] == allowed
    got = sample(logits, states(), [[], [], []], mask)
    assert all(t in ts for t, ts in zip(got.tokens, allowed))
    raw = [logits[r].log_softmax(-1)[t].item() for r, t in enumerate(got.tokens)]  # log-probs stay the model's
    assert got.logprobs == pytest.approx(raw, abs=1e-6)


def test_specials_are_tokens_not_text():
    """grammar_tokenizer marks the tokenizer's specials special, even where tokenizer.json does not (real GLM
    files leave some unmarked): free text then never produces one, and a grammar names it."""
    spec = json.loads(TOK.json)
    for t in spec["added_tokens"]:
        t["special"] = False
    tj = json.dumps(spec)
    gmask = TOK.token_id("[gMASK]")
    text = "start: /(?s:.+)/"
    marked = grammar_tokenizer(tj, vocab_size=len(TOK), eos_ids=TOK.eos_ids, special_ids=[gmask])
    assert Grammar(marked, text).start([]).advance(gmask) is False
    unmarked = grammar_tokenizer(tj, vocab_size=len(TOK), eos_ids=TOK.eos_ids)
    assert Grammar(unmarked, text).start([]).advance(gmask) is True  # the control: "[gMASK]" as plain text
    named = Grammar(marked, f"start: <[{gmask}]> /[a-z]+/").start([])
    assert named.advance(gmask) and named.advance(TOK.encode("abc")[0])


# ----------------------------------------------------------------------------------------------- the shipped model
def test_shipped_model_calls_only_the_declared_tool(monkeypatch):
    """Offered only get_weather, the shipped model (trained on calculator calls) calls `calculator`; with the
    grammar it can only call get_weather."""
    loaded = load(None)
    eng = build_engine(loaded.model, loaded.tokenizer, cache_bytes=64 << 20)
    srv = BackgroundServer(create_app(eng, tokenizer=loaded.tokenizer, model_name="glm5")).start()
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)
        tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                                   "parameters": {"type": "object",
                                                                  "properties": {"city": {"type": "string"}},
                                                                  "required": ["city"]}}}]
        msgs = [{"role": "user", "content": "What is the weather in Paris?"}]

        def names():
            r = client.chat.completions.create(model="glm5", messages=msgs, tools=tools, temperature=0,
                                               max_tokens=200)
            return [t.function.name for t in r.choices[0].message.tool_calls or []]

        assert names() == ["get_weather"]
        monkeypatch.setattr(runs, "chat_grammar", lambda state, req: None)
        assert names() == ["calculator"]  # the control: unconstrained, as before
    finally:
        srv.stop()
