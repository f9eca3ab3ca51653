"""Output parsing: reasoning / content / tool calls, whole text vs streamed deltas (any chunking) give one result.
Text input takes every tag spelling as the tag (tests/test_parse_streaming.py: tags from special token ids)."""

import json
import random

import pytest

from glm5.chat import render_text
from glm5.chat_parse import ParsedOutput, StreamingParser, aggregate, parse_output
from glm5.tokenizer import Tokenizer

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]


def ids(i):
    return f"call_{i}"


def call(i, name, args):
    arguments = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": arguments}}


W = "<tool_call>get_weather<arg_key>city</arg_key><arg_value>{c}</arg_value><arg_key>days</arg_key><arg_value>{d}</arg_value></tool_call>"
# (generated text, thinking, tools, expected (reasoning, content, tool_calls))
CASES = {
    "reasoning_then_answer": ("Let me add.</think>4", True, None, ("Let me add.", "4", [])),
    "content_only_thinking_off": ("Paris.", False, None, (None, "Paris.", [])),
    "unterminated_reasoning": ("Still thinking about 2+", True, None, ("Still thinking about 2+", None, [])),
    "leading_think_tag": ("<think>r</think>c", False, None, ("r", "c", [])),
    "leading_think_tag_thinking_on": ("<think>r</think>c", True, None, ("r", "c", [])),
    "empty_reasoning": ("</think>just this", True, None, (None, "just this", [])),
    "empty": ("", True, None, (None, None, [])),
    "tool_call_schema_string": ("Need data.</think>Checking." + W.format(c="123", d="3"), True, TOOLS,
                                ("Need data.", "Checking.", [call(0, "get_weather", {"city": "123", "days": 3})])),
    "tool_call_no_schema_json": (W.format(c="123", d="3"), False, None,
                                 (None, None, [call(0, "get_weather", {"city": 123, "days": 3})])),
    "two_calls_glm45_newlines": ("</think><tool_call>f\n<arg_key>a</arg_key>\n<arg_value>[1, 2]</arg_value>\n</tool_call>"
                                 "<tool_call>g</tool_call>", True, None,
                                 (None, None, [call(0, "f", {"a": [1, 2]}), call(1, "g", {})])),
    "python_literal_and_text": ("<tool_call>f<arg_key>x</arg_key><arg_value>{'a': True}</arg_value><arg_key>y</arg_key>"
                                "<arg_value> hello world </arg_value></tool_call>", False, None,
                                (None, None, [call(0, "f", {"x": {"a": True}, "y": "hello world"})])),
    "unicode_value": ("<tool_call>get_weather<arg_key>city</arg_key><arg_value>東京 \"x\"</arg_value></tool_call>",
                      False, TOOLS, (None, None, [call(0, "get_weather", {"city": "東京 \"x\""})])),
    # A call is announced once its name is complete; a block that breaks off later keeps the call, its arguments as
    # far as they got (incomplete JSON), and the block's text not represented in them is content.
    "unterminated_call": ("ok<tool_call>f<arg_key>a</arg_key><arg_val", False, None,
                          (None, "ok<arg_key>a</arg_key><arg_val", [call(0, "f", "")])),
    "complete_then_unterminated": ("<tool_call>f</tool_call><tool_call>g<arg_key>", False, None,
                                   (None, "<arg_key>", [call(0, "f", {}), call(1, "g", "")])),
    "cut_in_string_value": ("<tool_call>get_weather<arg_key>city</arg_key><arg_value>Osl", False, TOOLS,
                            (None, None, [call(0, "get_weather", '{"city": "Osl')])),
    "cut_in_other_value": ("<tool_call>get_weather<arg_key>city</arg_key><arg_value>Oslo</arg_value><arg_key>days"
                           "</arg_key><arg_value>1", False, TOOLS,
                           (None, "<arg_key>days</arg_key><arg_value>1", [call(0, "get_weather", '{"city": "Oslo"')])),
    "end_call_closes_open_value": ("<tool_call>get_weather<arg_key>city</arg_key><arg_value>Oslo</tool_call>", False,
                                   TOOLS, (None, None, [call(0, "get_weather", {"city": "Oslo"})])),
    "malformed_no_name": ("a<tool_call><arg_key>k</arg_key><arg_value>1</arg_value></tool_call>b", False, None,
                          (None, "a<tool_call><arg_key>k</arg_key><arg_value>1</arg_value></tool_call>b", [])),
    "malformed_stray_text": ("<tool_call>f<arg_key>k</arg_key>junk<arg_value>1</arg_value></tool_call>", False, None,
                             (None, "<arg_key>k</arg_key>junk<arg_value>1</arg_value></tool_call>",
                              [call(0, "f", "")])),
    "nested_call": ("<tool_call>f<tool_call>g</tool_call>", False, None,  # the name never completed: no call
                    (None, "<tool_call>f", [call(0, "g", {})])),
    "duplicate_key_as_written": ("<tool_call>f<arg_key>a</arg_key><arg_value>1</arg_value><arg_key>a</arg_key>"
                                 "<arg_value>2</arg_value></tool_call>", False, None,
                                 (None, None, [call(0, "f", '{"a": 1, "a": 2}')])),
    "text_after_call": ("<tool_call>f</tool_call> and more", False, None, (None, " and more", [call(0, "f", {})])),
    "partial_tags_at_end": ("answer <tool_c", False, None, (None, "answer <tool_c", [])),
    "partial_end_think": ("reason </thi", True, None, ("reason </thi", None, [])),
    "partial_think_start": ("<thi", False, None, (None, "<thi", [])),
    "tool_tag_inside_reasoning": ("maybe <tool_call>f</tool_call>?</think>no", True, None,
                                  ("maybe <tool_call>f</tool_call>?", "no", [])),
    "lt_signs": ("a < b <> <tool_call</think>x<y", True, None, ("a < b <> <tool_call", "x<y", [])),
}


def _expected(case):
    r, c, calls = CASES[case][3]
    return ParsedOutput(r, c, calls)


def _chunkings(text, rng):
    yield [text]
    yield list(text)
    for _ in range(5):
        cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 6)))) if len(text) > 1 else []
        yield [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


@pytest.mark.parametrize("case", list(CASES))
def test_whole_and_streaming_agree(case):
    text, thinking, tools, _ = CASES[case]
    whole = parse_output(text, thinking=thinking, tools=tools, make_id=ids)
    assert whole == _expected(case)
    rng = random.Random(case)
    for chunks in _chunkings(text, rng):
        p = StreamingParser(thinking=thinking, tools=tools, make_id=ids)
        deltas = [d for c in chunks for d in p.feed(c)] + p.finish()
        assert p.result() == whole, chunks
        assert aggregate(deltas) == whole, chunks
        for d in deltas:
            assert len(d) == 1 and all(v for v in d.values())  # one non-empty field per delta


def test_no_partial_tag_is_emitted_early():
    p = StreamingParser(thinking=True, make_id=ids)
    assert p.feed("I think") == [{"reasoning_content": "I think"}]
    assert p.feed(" so</th") == [{"reasoning_content": " so"}]
    assert p.feed("ink>Yes <tool_") == [{"content": "Yes "}]
    assert p.feed("call>f<arg_key>a</arg_key><arg_value>1") == [  # the name is complete: the call opens
        {"tool_calls": [{"index": 0, "id": "call_0", "type": "function", "function": {"name": "f", "arguments": ""}}]}]
    assert p.feed("</arg_value></tool_call>") == [{"tool_calls": [{"index": 0, "function": {"arguments": '{"a": 1}'}}]}]
    assert p.finish() == []
    with pytest.raises(RuntimeError):
        p.feed("x")


def test_parse_tools_off():
    text = "</think>" + W.format(c="Oslo", d="2")
    out = parse_output(text, parse_tools=False)
    assert out.content == W.format(c="Oslo", d="2") and out.tool_calls == []
    p = StreamingParser(parse_tools=False)
    assert aggregate(p.feed(text) + p.finish()) == out


def test_rendered_tool_calls_parse_back():
    # What the renderer writes for an assistant turn is what the parser reads: a round trip through the format.
    args = [{"city": "Oslo", "days": 3}, {"city": "Bergen, NO", "days": 10, "flags": {"u": [None, True, 1.5]}}]
    msg = {"role": "assistant", "content": "Checking both.", "reasoning_content": "Two cities.",
           "tool_calls": [{"function": {"name": "get_weather", "arguments": a}} for a in args]}
    text = render_text([{"role": "user", "content": "q"}, msg], TOOLS, add_generation_prompt=False)
    generated = text.split("<|assistant|><think>", 1)[1]
    out = parse_output(generated, thinking=True, tools=TOOLS, make_id=ids)
    assert out.reasoning_content == "Two cities." and out.content == "Checking both."
    assert [json.loads(c["function"]["arguments"]) for c in out.tool_calls] == args
    assert out.message()["tool_calls"] == out.tool_calls


def test_token_stream_end_to_end():
    # Engine ids → incremental detokenizer → streaming parser == parsing the decoded whole.
    tok = Tokenizer.default()
    text = "Zwei Städte 🌧.</think>Voilà: " + W.format(c="Zürich", d="2") + " fin"
    out_ids = tok.encode(text, allow_special=True)
    detok, p = tok.detokenizer(), StreamingParser(thinking=True, tools=TOOLS, make_id=ids)
    deltas = []
    for i in out_ids:
        deltas += p.feed(detok.push(i))
    deltas += p.feed(detok.flush()) + p.finish()
    assert aggregate(deltas) == parse_output(tok.decode(out_ids), thinking=True, tools=TOOLS, make_id=ids)
    assert aggregate(deltas) == ParsedOutput("Zwei Städte 🌧.", "Voilà:  fin",
                                             [call(0, "get_weather", {"city": "Zürich", "days": 2})])
