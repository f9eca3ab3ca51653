"""What GLM-5 writes, parsed as vLLM (glm4_moe / glm47 tool parser, glm45 reasoning parser) and SGLang return it:
string-typed tool arguments verbatim, whitespace-only content around tool calls as null, reasoning under both
`reasoning` and `reasoning_content`. Whole-text and streamed parsing must agree on each case."""

import json

import pytest

from glm5.chat_parse import StreamingParser, _string_params, aggregate, parse_output

from .server_util import script


def _tool(props: dict) -> list[dict]:
    return [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": props}}}]


def _call(**args) -> str:
    return "<tool_call>f" + "".join(f"<arg_key>{k}</arg_key><arg_value>{v}</arg_value>" for k, v in args.items()) \
        + "</tool_call>"


def _both(text: str, tools=None, thinking: bool = False):
    """Whole-text parse, checked equal to a character-by-character streamed parse (ids aside)."""
    ids = lambda i: f"call_{i}"  # noqa: E731
    whole = parse_output(text, thinking=thinking, tools=tools, make_id=ids)
    p = StreamingParser(thinking=thinking, tools=tools, make_id=ids)
    deltas = [d for ch in text for d in p.feed(ch)] + p.finish()
    assert aggregate(deltas) == whole == p.result()
    return whole, deltas


def _args(text: str, tools) -> dict:
    whole, _ = _both(text, tools)
    (call,) = whole.tool_calls
    return json.loads(call["function"]["arguments"])


STRING_SCHEMAS = {
    "type": {"type": "string"},
    "type_list": {"type": ["string", "null"]},
    "any_of": {"anyOf": [{"type": "string"}, {"type": "null"}]},
    "one_of": {"oneOf": [{"type": "integer"}, {"type": "string"}]},
    "enum": {"enum": ["12", "34"]},
    "const": {"const": "7"},
    "nested": {"anyOf": [{"oneOf": [{"type": ["string"]}]}, {"type": "null"}]},
}
OTHER_SCHEMAS = {"int": {"type": "integer"}, "num_or_null": {"type": ["number", "null"]},
                 "any_of_int": {"anyOf": [{"type": "integer"}, {"type": "null"}]}, "int_enum": {"enum": [1, 2]},
                 "no_type": {}}


def test_string_params_every_schema_form():
    got = _string_params(_tool({**STRING_SCHEMAS, **OTHER_SCHEMAS}))
    assert got == {"f": set(STRING_SCHEMAS)}
    # odd schemas from a request are not an error: no parameter is a string
    assert _string_params([{"type": "function", "function": {"name": "g", "parameters": {"properties": ["x"]}}},
                           {"type": "function", "function": {"name": "h", "parameters": "x"}}]) == \
        {"g": set(), "h": set()}


def test_optional_str_digits_stay_a_string():
    # Optional[str] as pydantic / OpenAI SDKs write it: anyOf [{type: string}, {type: null}]
    opt = {"anyOf": [{"type": "string"}, {"type": "null"}]}
    assert _args(_call(code="12345678"), _tool({"code": opt})) == {"code": "12345678"}
    for name, schema in STRING_SCHEMAS.items():
        assert _args(_call(**{name: "12345678"}), _tool({name: schema})) == {name: "12345678"}, name
    assert _args(_call(n="12345678"), _tool({"n": {"type": "integer"}})) == {"n": 12345678}
    assert _args(_call(n="12345678"), _tool({"n": OTHER_SCHEMAS["any_of_int"]})) == {"n": 12345678}


def test_string_values_keep_surrounding_whitespace():
    tools = _tool({"code": {"type": "string"}, "note": {"type": ["string", "null"]}, "n": {"type": "integer"}})
    code = "\n    return x  \n"
    got = _args(_call(code=code, note="  spaced  ", n=" 3\n"), tools)
    assert got == {"code": code, "note": "  spaced  ", "n": 3}
    # without a schema nothing is known to be a string: stripped and parsed, as before
    assert _args(_call(code=" 12 "), None) == {"code": 12}


@pytest.mark.parametrize("text", [
    "\n\n" + _call(a="1") + "\n",
    " \n" + _call(a="1") + "\n" + _call(a="2") + "  ",
    "</think>\n" + _call(a="1"),
])
def test_whitespace_only_content_around_calls_is_null(text):
    whole, deltas = _both(text, _tool({"a": {"type": "string"}}), thinking=text.startswith("</think>"))
    assert whole.content is None and whole.tool_calls
    assert not any("content" in d for d in deltas)  # nothing streamed either


@pytest.mark.parametrize("text", ["\n\nHello", "  \n", "\n" + _call(a="1") + "\nDone.", "Hi " + _call(a="1") + "\n"])
def test_content_with_text_or_without_calls_is_kept(text):
    whole, _ = _both(text, _tool({"a": {"type": "string"}}))
    assert whole.content == text.replace(_call(a="1"), "")


def test_string_argument_streams_before_its_value_closes():
    # vLLM's glm4_moe streams a string value as it is generated, not in one piece at </tool_call>
    p = StreamingParser(thinking=False, tools=_tool({"code": {"type": "string"}}), make_id=lambda i: f"call_{i}")
    assert p.feed("<tool_call>f<arg_key>code</arg_key><arg_value>print(") == [
        {"tool_calls": [{"index": 0, "id": "call_0", "type": "function", "function": {"name": "f", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"code": "print('}}]}]
    assert p.feed('"hi")\n') == [{"tool_calls": [{"index": 0, "function": {"arguments": '\\"hi\\")\\n'}}]}]
    assert p.feed("</arg_value></tool_call>") == [{"tool_calls": [{"index": 0, "function": {"arguments": '"}'}}]}]
    assert p.result().tool_calls[0]["function"]["arguments"] == json.dumps({"code": 'print("hi")\n'})


# ------------------------------------------------------------------------------------- the server: both names
USER = [{"role": "user", "content": "hi"}]


def test_server_reasoning_under_both_names_and_null_content(openai_scripted):
    client, eng = openai_scripted
    eng.script = script("Think.</think>\n" + _call(a=" 0042 "))
    tools = _tool({"a": {"anyOf": [{"type": "string"}, {"type": "null"}]}})
    r = client.chat.completions.create(model="tiny", messages=USER, tools=tools)
    m = r.choices[0].message
    assert m.model_extra["reasoning"] == m.model_extra["reasoning_content"] == "Think."
    assert m.content is None and json.loads(m.tool_calls[0].function.arguments) == {"a": " 0042 "}
    reasoning, reasoning_content, content = "", "", []
    for ch in client.chat.completions.create(model="tiny", messages=USER, tools=tools, stream=True):
        for c in ch.choices:
            extra = c.delta.model_extra or {}
            assert extra.get("reasoning") == extra.get("reasoning_content")
            reasoning += extra.get("reasoning") or ""
            reasoning_content += extra.get("reasoning_content") or ""
            content.append(c.delta.content)
    assert reasoning == reasoning_content == "Think."
    assert not "".join(x or "" for x in content)
