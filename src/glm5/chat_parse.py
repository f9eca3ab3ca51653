"""GLM-5 output parsing: generated text → reasoning_content, content, tool_calls (OpenAI shapes), whole or streamed.

Follows vLLM's `glm45` reasoning parser (vllm/reasoning/glm4_moe_reasoning_parser.py, a BaseThinkingReasoningParser)
and `glm47` tool-call parser (vllm/tool_parsers/glm47_moe_tool_parser.py on top of glm4_moe_tool_parser.py):
- When the prompt left a <think> block open (thinking on: the generation prompt is `<|assistant|><think>`), text up
  to `</think>` is reasoning; with no `</think>` at all, everything is reasoning (the model ran out of tokens while
  thinking). A leading `<think>` in the output is dropped. With thinking off, text is content unless it starts with
  `<think>`.
- A tool call is `<tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value>...</tool_call>`. Names and keys are
  stripped (as vLLM does). A value whose parameter's schema admits a string (`_is_string`: a type or type list,
  anyOf / oneOf, a string enum / const) stays verbatim, surrounding whitespace included; any other value is
  stripped and parsed as JSON, else as a Python literal, else kept as a string. `arguments` is the JSON text of the
  object. Content that is only whitespace around tool calls is None (null), as vLLM and SGLang return it.
Where this differs from vLLM, on purpose, so streaming and whole-text parsing always agree: text after a tool call
is kept as content (vLLM drops it); a block that does not parse (no name, stray text between arguments, a nested
<tool_call>) and an unterminated block at the end of the output are returned as content text, verbatim, rather than
silently lost. Streaming emits a tool call whole when its `</tool_call>` arrives (vLLM's glm4_moe does the same), and
never emits a partial tag as text: a suffix that could start a tag is held until the next delta decides it.
"""

from __future__ import annotations

import ast
import json
import secrets
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

THINK, END_THINK = "<think>", "</think>"
CALL, END_CALL = "<tool_call>", "</tool_call>"
KEY, END_KEY, VAL, END_VAL = "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"
_LITERAL_MAX = 10_000  # ast.literal_eval recurses on nesting; long inputs are left as strings


def new_call_id(index: int) -> str:
    return "call_" + secrets.token_hex(12)


@dataclass
class ParsedOutput:
    reasoning_content: str | None = None
    content: str | None = None
    tool_calls: list[dict] = field(default_factory=list)

    def message(self) -> dict:
        """The OpenAI assistant message."""
        msg: dict = {"role": "assistant", "content": self.content}
        if self.reasoning_content is not None:
            msg["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            msg["tool_calls"] = self.tool_calls
        return msg


def _is_string(schema: Any, depth: int = 0) -> bool:
    """The JSON schema admits a string: `type: "string"`, a type list holding "string" (["string", "null"] is
    `Optional[str]`), an `anyOf` / `oneOf` branch that does, or a string `enum` / `const`. Such a value is kept
    verbatim, so "12345678" for an Optional[str] stays a string (vLLM's glm4_moe only looks at `type == "string"`
    and turns it into a number)."""
    if not isinstance(schema, Mapping) or depth > 16:  # schemas come from requests: bound the recursion
        return False
    t = schema.get("type")
    if t == "string" or (isinstance(t, list) and "string" in t):
        return True
    if isinstance(schema.get("const"), str):
        return True
    enum = schema.get("enum")
    if isinstance(enum, list) and any(isinstance(e, str) for e in enum):
        return True
    return any(_is_string(b, depth + 1) for k in ("anyOf", "oneOf")
               if isinstance(schema.get(k), list) for b in schema[k])


def _string_params(tools: Any) -> dict[str, set[str]]:
    """tool name → parameter names whose JSON schema admits a string (`_is_string`)."""
    out: dict[str, set[str]] = {}
    for t in tools or ():
        fn = t.get("function", t) if isinstance(t, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            continue
        params = fn.get("parameters")
        props = (params.get("properties") if isinstance(params, Mapping) else None) or {}
        out[fn["name"]] = {k for k, v in props.items() if _is_string(v)} if isinstance(props, Mapping) else set()
    return out


def _value(raw: str, is_string: bool) -> Any:
    if is_string:  # verbatim, surrounding whitespace included (it may be the point: code, indented text)
        return raw
    raw = raw.strip()
    try:
        return json.loads(raw)
    except ValueError:
        pass
    if len(raw) <= _LITERAL_MAX:
        try:  # vLLM does the same for Python-style literals (True, 'single quotes')
            v = ast.literal_eval(raw)
            json.dumps(v)  # only JSON-representable values (not sets, bytes, complex)
            return v
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            pass
    return raw


def parse_tool_call(body: str, string_params: Mapping[str, set[str]]) -> tuple[str, dict] | None:
    """The text between <tool_call> and </tool_call> → (name, arguments), or None when it is malformed."""
    i = body.find(KEY)
    name = (body if i < 0 else body[:i]).strip()
    if not name or "<" in name or ">" in name:
        return None
    args: dict = {}
    pos = len(body) if i < 0 else i
    strings = string_params.get(name, set())
    while pos < len(body):
        if not body.startswith(KEY, pos):
            return None
        k_end = body.find(END_KEY, pos)
        if k_end < 0:
            return None
        key = body[pos + len(KEY):k_end].strip()
        pos = k_end + len(END_KEY)
        while pos < len(body) and body[pos].isspace():
            pos += 1
        if not body.startswith(VAL, pos):
            return None
        v_end = body.find(END_VAL, pos)
        if v_end < 0 or not key or KEY in key:
            return None
        args[key] = _value(body[pos + len(VAL):v_end], key in strings)
        pos = v_end + len(END_VAL)
        while pos < len(body) and body[pos].isspace():
            pos += 1
    return name, args


def _call(index: int, name: str, args: dict, make_id: Callable[[int], str]) -> dict:
    return {"id": make_id(index), "type": "function",
            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}


def parse_output(text: str, *, thinking: bool = True, tools: Any = None, parse_tools: bool = True,
                 make_id: Callable[[int], str] = new_call_id) -> ParsedOutput:
    """Whole generated text → ParsedOutput. thinking: the prompt left a <think> block open
    (`glm5.chat.RenderedChat.thinking`). parse_tools=False (tool_choice "none", no tools) keeps tool-call text as
    content."""
    s = text
    reasoning = None
    if s.startswith(THINK):
        s, thinking = s[len(THINK):], True
    if thinking:  # no </think> at all: everything is reasoning
        reasoning, _, s = s.partition(END_THINK)
    content, calls = [], []
    strings = _string_params(tools)
    pos = 0
    while parse_tools:
        start = s.find(CALL, pos)
        if start < 0:
            break
        content.append(s[pos:start])
        end = s.find(END_CALL, start)
        if end < 0:  # unterminated: the rest is content, as the model wrote it
            pos = start
            break
        parsed = parse_tool_call(s[start + len(CALL):end], strings)
        if parsed is None:
            content.append(s[start:end + len(END_CALL)])
        else:
            calls.append(_call(len(calls), *parsed, make_id))
        pos = end + len(END_CALL)
    content.append(s[pos:])
    text = "".join(content)
    if calls and not text.strip():  # only whitespace around the calls: no content (vLLM and SGLang give null)
        text = ""
    return ParsedOutput(reasoning or None, text or None, calls)


def _held(buf: str, tag: str) -> int:
    """Length of the longest suffix of buf that is a proper prefix of tag (it may become the tag)."""
    for n in range(min(len(buf), len(tag) - 1), 0, -1):
        if tag.startswith(buf[-n:]):
            return n
    return 0


class StreamingParser:
    """Text deltas in, OpenAI chat-completion deltas out:
    {"reasoning_content": str} | {"content": str} |
    {"tool_calls": [{"index", "id", "type": "function", "function": {"name", "arguments"}}]}.
    Call `finish()` after the last delta; `result()` is what `parse_output` gives for the whole text."""

    def __init__(self, *, thinking: bool = True, tools: Any = None, parse_tools: bool = True,
                 make_id: Callable[[int], str] = new_call_id):
        self.thinking = thinking
        self.parse_tools = parse_tools
        self.make_id = make_id
        self._strings = _string_params(tools)
        self._state = "start"  # start → reasoning | content; content ⇄ tool
        self._buf = ""
        self._reasoning: list[str] = []
        self._content: list[str] = []
        self._ws = ""  # leading whitespace-only content, held: it is dropped if tool calls follow and nothing else
        self.tool_calls: list[dict] = []
        self.finished = False

    def feed(self, delta: str) -> list[dict]:
        if self.finished:
            raise RuntimeError("StreamingParser.feed after finish()")
        self._buf += delta
        out: list[dict] = []
        while self._step(out):
            pass
        return out

    def finish(self) -> list[dict]:
        """End of generation: held text is released (a held partial tag or an unterminated tool call as text)."""
        out: list[dict] = []
        if not self.finished:
            if self._state == "start":
                self._state = "reasoning" if self.thinking else "content"
            self._emit(out, "reasoning_content" if self._state == "reasoning" else "content", self._buf)
            self._buf = ""
            if self._ws and not self.tool_calls:
                self._content.append(self._ws)
                out.append({"content": self._ws})
            self._ws = ""
            self.finished = True
        return out

    def result(self) -> ParsedOutput:
        return ParsedOutput("".join(self._reasoning) or None, "".join(self._content) or None, list(self.tool_calls))

    def _emit(self, out: list[dict], kind: str, text: str) -> None:
        if kind == "content" and not self._content:  # nothing shown yet: hold whitespace until text decides it
            text, self._ws = self._ws + text, ""
            if not text.strip():
                self._ws = text
                return
        if text:
            (self._reasoning if kind == "reasoning_content" else self._content).append(text)
            out.append({kind: text})

    def _step(self, out: list[dict]) -> bool:
        """Consume what the buffer decides; True when the state changed and another step may consume more."""
        buf = self._buf
        if self._state == "start":
            if buf.startswith(THINK):
                self._buf, self._state = buf[len(THINK):], "reasoning"
                return True
            if THINK.startswith(buf):  # still could be "<think>" (or empty)
                return False
            self._state = "reasoning" if self.thinking else "content"
            return True
        if self._state == "reasoning":
            i = buf.find(END_THINK)
            if i >= 0:
                self._emit(out, "reasoning_content", buf[:i])
                self._buf, self._state = buf[i + len(END_THINK):], "content"
                return True
            n = _held(buf, END_THINK)
            self._emit(out, "reasoning_content", buf[:len(buf) - n])
            self._buf = buf[len(buf) - n:]
            return False
        if self._state == "content":
            i = buf.find(CALL) if self.parse_tools else -1
            if i >= 0:
                self._emit(out, "content", buf[:i])
                self._buf, self._state = buf[i:], "tool"
                return True
            n = _held(buf, CALL) if self.parse_tools else 0
            self._emit(out, "content", buf[:len(buf) - n])
            self._buf = buf[len(buf) - n:]
            return False
        # tool: buffer from "<tool_call>" until its "</tool_call>"
        end = buf.find(END_CALL)
        if end < 0:
            return False
        parsed = parse_tool_call(buf[len(CALL):end], self._strings)
        if parsed is None:
            self._emit(out, "content", buf[:end + len(END_CALL)])
        else:
            call = _call(len(self.tool_calls), *parsed, self.make_id)
            self.tool_calls.append(call)
            out.append({"tool_calls": [{"index": len(self.tool_calls) - 1, **call}]})
        self._buf, self._state = buf[end + len(END_CALL):], "content"
        return True


def aggregate(deltas: list[dict]) -> ParsedOutput:
    """Fold streamed deltas back into one ParsedOutput (what a client does)."""
    reasoning, content, calls = [], [], []
    for d in deltas:
        reasoning.append(d.get("reasoning_content") or "")
        content.append(d.get("content") or "")
        for c in d.get("tool_calls") or ():
            calls.append({k: v for k, v in c.items() if k != "index"})
    return ParsedOutput("".join(reasoning) or None, "".join(content) or None, calls)
