"""The official `openai` client against a live server (uvicorn on 127.0.0.1, tiny model, the shipped tokenizer).

Two servers: one runs the real engine on a random tiny model (chat, streaming, reasoning routing, n, logprobs,
stop strings, seeds); one runs `ScriptedEngine`, which replays given token ids — a parser / plumbing test of what the
server makes of a tool call, a JSON answer or a forced tool choice, which a random model never writes.
"""

import json

import openai
import pytest

from .server_util import TOK, script, start, tiny_engine

USER = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"},
                                                                          "days": {"type": "integer"}}}}}]


@pytest.fixture(scope="module")
def real():
    eng = tiny_engine()
    srv = start(eng)
    yield openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60), eng
    srv.stop()


def _stream_text(stream):
    """Fold a chat stream: per choice index, reasoning / content / finish_reason; plus the usage chunk."""
    got, usage = {}, None
    for ch in stream:
        if ch.usage is not None:
            usage = ch.usage
        for c in ch.choices:
            g = got.setdefault(c.index, {"reasoning": "", "content": "", "finish": None, "calls": []})
            d = c.delta
            g["reasoning"] += (d.model_extra or {}).get("reasoning_content") or ""
            g["content"] += d.content or ""
            for t in d.tool_calls or []:  # a call's first delta has its id and name; later ones more arguments
                if t.index == len(g["calls"]):
                    g["calls"].append(t)
                else:
                    g["calls"][t.index].function.arguments += t.function.arguments or ""
            if c.finish_reason:
                g["finish"] = c.finish_reason
    return got, usage


def _reasoning(msg):
    return (msg.model_extra or {}).get("reasoning_content")


# ---------------------------------------------------------------------------------------------- the real engine
def test_models_and_chat(real):
    client, _ = real
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=6, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and len(r.choices) == 1
    c = r.choices[0]
    # the seeded random model picks no eos id in six greedy tokens: it runs to max_tokens
    assert c.finish_reason == "length" and c.message.role == "assistant"
    assert r.usage.prompt_tokens == len(TOK.encode("What is the weather in Paris?")) + 5  # + [gMASK]<sop><|user|>
    assert r.usage.completion_tokens == 6 and r.usage.total_tokens == r.usage.prompt_tokens + 6


def test_streaming_equals_whole(real):
    client, _ = real
    kw = {"model": "tiny", "messages": USER, "max_tokens": 12, "temperature": 0}
    whole = client.chat.completions.create(**kw)
    got, usage = _stream_text(client.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                                             **kw))
    m = whole.choices[0].message
    assert got[0]["reasoning"] == (_reasoning(m) or "") and got[0]["content"] == (m.content or "")
    assert got[0]["finish"] == whole.choices[0].finish_reason
    assert usage.completion_tokens == whole.usage.completion_tokens and usage.prompt_tokens == whole.usage.prompt_tokens


def test_reasoning_on_off(real):
    client, _ = real
    # Thinking on: the prompt leaves <think> open, so (with no </think> among 8 random tokens) all text is reasoning.
    on = client.chat.completions.create(model="tiny", messages=USER, max_tokens=8, temperature=0)
    off = client.chat.completions.create(model="tiny", messages=USER, max_tokens=8, temperature=0,
                                         extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert _reasoning(on.choices[0].message) and on.choices[0].message.content is None
    assert off.choices[0].message.content and _reasoning(off.choices[0].message) is None
    assert off.usage.prompt_tokens == on.usage.prompt_tokens  # <think> vs </think>: same length, other token
    got, _ = _stream_text(client.chat.completions.create(model="tiny", messages=USER, max_tokens=8, temperature=0,
                                                         stream=True))
    assert got[0]["reasoning"] == _reasoning(on.choices[0].message) and got[0]["content"] == ""


def test_n2_and_seed_reproducible(real):
    client, _ = real
    kw = {"model": "tiny", "messages": USER, "max_tokens": 8, "temperature": 1.0, "n": 2}
    a = client.chat.completions.create(seed=7, **kw)
    b = client.chat.completions.create(seed=7, **kw)
    c = client.chat.completions.create(seed=8, **kw)

    def texts(r):
        return [_reasoning(ch.message) for ch in sorted(r.choices, key=lambda ch: ch.index)]

    assert [ch.index for ch in a.choices] == [0, 1]
    assert texts(a) == texts(b)
    # Two samples of 8 tokens from a near-uniform 4096-way distribution coincide with odds ~4096^-8.
    assert texts(a)[0] != texts(a)[1] and texts(a) != texts(c)
    assert a.usage.completion_tokens == 16
    got, usage = _stream_text(client.chat.completions.create(seed=7, stream=True,
                                                             stream_options={"include_usage": True}, **kw))
    assert [got[i]["reasoning"] for i in (0, 1)] == texts(a) and usage.completion_tokens == 16


def test_logprobs(real):
    client, _ = real
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3)
    lp = r.choices[0].logprobs.content
    assert len(lp) == r.usage.completion_tokens == 6
    assert "".join(t.token for t in lp) == _reasoning(r.choices[0].message)
    for t in lp:
        tops = t.top_logprobs
        assert len(tops) == 3 and tops[0].logprob >= tops[1].logprob >= tops[2].logprob
        # Greedy: the sampled token is the most likely one; its log-prob is the raw model's.
        assert t.token == tops[0].token and t.logprob == pytest.approx(tops[0].logprob) and t.logprob < 0
        assert bytes(t.bytes).decode("utf-8", "replace") == t.token
    cmp = client.completions.create(model="tiny", prompt="Hello", max_tokens=5, temperature=0, logprobs=2)
    clp = cmp.choices[0].logprobs
    assert len(clp.tokens) == len(clp.token_logprobs) == len(clp.top_logprobs) == 5
    assert "".join(clp.tokens) == cmp.choices[0].text
    assert clp.text_offset == [sum(len(t) for t in clp.tokens[:i]) for i in range(5)]


def _straddling_stop(tokens: list[str]) -> tuple[str, int]:
    """A 3-character stop string made of the last 2 characters of one token and the first of the next, whose
    first occurrence in the text is there: streaming must hold back text that may start a stop string."""
    text = "".join(tokens)
    for i in range(1, len(tokens) - 1):
        off = sum(map(len, tokens[:i + 1]))
        stop = text[off - 2:off + 1]
        if len(tokens[i]) >= 2 and tokens[i + 1] and "\ufffd" not in stop and text.find(stop) == off - 2:
            return stop, off - 2
    raise AssertionError(f"no straddling stop string in {tokens}")


def test_stop_strings(real):
    client, _ = real
    kw = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0, "extra_body": {"ignore_eos": True}}
    base = client.completions.create(logprobs=0, **kw).choices[0]
    stop, at = _straddling_stop(base.logprobs.tokens)
    want = base.text[:at]
    r = client.completions.create(stop=[stop], **kw)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(stop=stop, stream=True, **kw)
                       if c.choices)
    assert streamed == want
    # Chat: the stop string cuts the reasoning (thinking on) the same way, streamed or not.
    kw = {"model": "tiny", "messages": USER, "max_tokens": 20, "temperature": 0, "extra_body": {"ignore_eos": True}}
    whole = client.chat.completions.create(logprobs=True, **kw).choices[0]
    stop, at = _straddling_stop([t.token for t in whole.logprobs.content])
    want = _reasoning(whole.message)[:at]
    cut = client.chat.completions.create(stop=stop, **kw)
    assert _reasoning(cut.choices[0].message) == want and cut.choices[0].finish_reason == "stop"
    got, _ = _stream_text(client.chat.completions.create(stop=stop, stream=True, **kw))
    assert got[0]["reasoning"] == want


def test_vllm_extensions(real):
    client, _ = real
    r = client.completions.create(model="tiny", prompt="abc", max_tokens=7, temperature=0.8, seed=3,
                                  extra_body={"top_k": 5, "min_p": 0.01, "min_tokens": 7, "ignore_eos": True})
    assert r.usage.completion_tokens == 7 and r.choices[0].finish_reason == "length"


def test_tool_round_trip_real_model(real, openai_scripted):
    """assistant tool_call → tool message → answer: the conversation renders (checked on the openai_scripted engine's
    recorded prompt) and the real model answers it."""
    msgs = USER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris", "days": 2})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22 C, sunny"}]
    client, _ = real
    r = client.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, max_tokens=5, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5  # as above: no eos, no call
    sclient, seng = openai_scripted
    seng.script = script("</think>It is 22 C and sunny in Paris.")
    a = sclient.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, max_tokens=50)
    prompt = TOK.decode(seng.prompts[-1])
    assert ("<|assistant|></think><tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value>"
            "<arg_key>days</arg_key><arg_value>2</arg_value></tool_call><|observation|><tool_response>22 C, sunny"
            "</tool_response><|assistant|><think>") in prompt
    assert '"name": "get_weather"' in prompt  # the tools block of the system turn
    m = a.choices[0].message
    assert m.content == "It is 22 C and sunny in Paris." and not m.tool_calls and a.choices[0].finish_reason == "stop"


# ------------------------------------------------------------------------------- openai_scripted engine: parser tests
TOOL_OUTPUT = ("Let me check.</think>I'll look it up.<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris"
               "</arg_value><arg_key>days</arg_key><arg_value>3</arg_value></tool_call>")


def test_tool_call_output_parsed(openai_scripted):
    client, eng = openai_scripted
    eng.script = script(TOOL_OUTPUT)
    r = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    assert _reasoning(c.message) == "Let me check." and c.message.content == "I'll look it up."
    (call,) = c.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3}
    got, _ = _stream_text(client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, stream=True))
    g = got[0]
    assert g["reasoning"] == "Let me check." and g["content"] == "I'll look it up." and g["finish"] == "tool_calls"
    (sc,) = g["calls"]
    assert sc.index == 0 and sc.function.name == "get_weather"
    assert json.loads(sc.function.arguments) == {"city": "Paris", "days": 3}
    # tool_choice "none": the tools leave the prompt and the same text stays text.
    r = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, tool_choice="none")
    assert not r.choices[0].message.tool_calls and "<tool_call>get_weather" in r.choices[0].message.content
    assert "get_weather" not in TOK.decode(eng.prompts[-1])


def test_named_tool_choice_forced(openai_scripted):
    client, eng = openai_scripted
    eng.script = script("<arg_key>city</arg_key><arg_value>Rome</arg_value></tool_call>")
    r = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert TOK.decode(eng.prompts[-1]).endswith("<|assistant|><think></think><tool_call>get_weather")
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Rome"}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    assert e.value.body["param"] == "tool_choice" and "nope" in e.value.body["message"]


def test_json_object(openai_scripted):
    client, eng = openai_scripted
    msgs = [{"role": "user", "content": "Answer in JSON."}]
    eng.script = script('</think>{"city": "Paris", "temp": 22}')
    r = client.chat.completions.create(model="tiny", messages=msgs, response_format={"type": "json_object"})
    assert json.loads(r.choices[0].message.content) == {"city": "Paris", "temp": 22}
    eng.script = script("</think>not json")
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model="tiny", messages=msgs, response_format={"type": "json_object"})
    assert e.value.body["code"] == "invalid_json_output"
    with pytest.raises(openai.APIError) as e:  # streamed: an error event before [DONE]
        list(client.chat.completions.create(model="tiny", messages=msgs, response_format={"type": "json_object"},
                                            stream=True))
    assert "not valid JSON" in str(e.value)
    with pytest.raises(openai.BadRequestError):  # OpenAI's rule: the messages must ask for JSON
        client.chat.completions.create(model="tiny", messages=USER, response_format={"type": "json_object"})


def test_eos_hidden_and_counted(openai_scripted):
    client, eng = openai_scripted
    eng.script = script("</think>Hi.")
    r = client.chat.completions.create(model="tiny", messages=USER, logprobs=True)
    assert r.choices[0].message.content == "Hi." and r.choices[0].finish_reason == "stop"
    n = len(script("</think>Hi."))
    assert r.usage.completion_tokens == n and len(r.choices[0].logprobs.content) == n - 1  # eos: counted, not shown


def test_completions_batch_of_prompts(real):
    client, _ = real
    kw = {"model": "tiny", "prompt": ["Hello", "Once upon a time"], "n": 2, "max_tokens": 4, "temperature": 1.0, "seed": 5,
          "extra_body": {"ignore_eos": True}}
    r = client.completions.create(**kw)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3] and r.usage.completion_tokens == 16
    assert r.usage.prompt_tokens == len(TOK.encode("Hello")) + len(TOK.encode("Once upon a time"))
    streamed: dict[int, str] = {}
    for ch in client.completions.create(stream=True, **kw):
        for c in ch.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert streamed == {c.index: c.text for c in r.choices}
    # The same seed gives prompt 0's samples whether or not prompt 1 shares the batch.
    solo = client.completions.create(**{**kw, "prompt": "Hello"})
    assert [c.text for c in sorted(solo.choices, key=lambda c: c.index)] == [streamed[0], streamed[1]]
