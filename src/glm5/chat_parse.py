"""GLM-5 output parsing: generated tokens → reasoning_content, content, tool_calls (OpenAI shapes), whole or streamed.

The parser reads pieces, `(text, is_special)`: a tag counts only where the model produced the tag's special token.
A document or tool result that spells `<tool_call>` and that the model copies out as ordinary tokens stays content
(the tokenizer never turns user or tool text into special ids, so only the model can write a real tag).
`PieceDecoder` / `token_pieces` make pieces from generated ids; callers that only have text (tests, transcripts)
pass a `str`, which `TagSplitter` cuts at every tag spelling, taking each as the special token.

Follows vLLM's `glm45` reasoning parser (vllm/reasoning/glm4_moe_reasoning_parser.py, a BaseThinkingReasoningParser)
and `glm47` tool-call parser (vllm/tool_parsers/glm47_moe_tool_parser.py on top of glm4_moe_tool_parser.py):
- When the prompt left a <think> block open (thinking on: the generation prompt is `<|assistant|><think>`), text up
  to `</think>` is reasoning; with no `</think>` at all, everything is reasoning (the model ran out of tokens while
  thinking). A leading `<think>` in the output is dropped. With thinking off, text is content unless it starts with
  `<think>`.
- A tool call is `<tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value>...</tool_call>`. Names and keys are
  stripped (as vLLM does). A value whose parameter's schema admits a string (`is_string_schema`: a type or type list,
  anyOf / oneOf, a string enum / const) stays verbatim, surrounding whitespace included; any other value is
  stripped and parsed as JSON, else as a Python literal, else kept as a string. `arguments` is the JSON text of the
  object, spelled as `json.dumps(args, ensure_ascii=False)` spells it. Content that is only whitespace around tool
  calls is None (null), as vLLM and SGLang return it.
- Streaming, as vLLM's glm4_moe streams (its incremental string streaming): a call's id and name go out as soon as
  the name is complete (at the `<arg_key>` or `</tool_call>` after it), with `arguments: ""`; then the arguments
  JSON in fragments: `{"key": ` (or `, "key": `) and a string value's text, JSON-escaped, as it is generated; a
  non-string value when its `</arg_value>` closes it; `}` at `</tool_call>`. Concatenating a call's fragments gives
  exactly its `arguments`. (vLLM re-parses the whole text at every step and diffs; here each piece is read once.)
Whole-text parsing streams the whole output at once (`parse_output`), so the two always agree, and where vLLM's
whole-text parser differs, it is for that: a call once announced stays a call. If its block breaks the format
later (text between arguments, a misplaced tag, the end of the output), the call ends there with its arguments as
far as they got, incomplete JSON, as OpenAI's are when max_tokens cuts a call; the block's text not represented in
the arguments becomes content, and a `<tool_call>` in it starts a new call. A `</tool_call>` inside an open value
closes the value and the call (vLLM's streaming does the same). A block that breaks before its name is complete (no
name, a name holding `<` or `>`, another tag) is no call: its text is content. Text after a call is content (vLLM
drops it). No partial tag is emitted as text: `TagSplitter` holds a suffix that could start one.
"""

from __future__ import annotations

import ast
import json
import re
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

THINK, END_THINK = "<think>", "</think>"
CALL, END_CALL = "<tool_call>", "</tool_call>"
KEY, END_KEY, VAL, END_VAL = "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"
TAGS = frozenset({THINK, END_THINK, CALL, END_CALL, KEY, END_KEY, VAL, END_VAL})
_TAG_RE = re.compile("|".join(re.escape(t) for t in sorted(TAGS)))
_TAG_MAX = max(map(len, TAGS))
_LITERAL_MAX = 10_000  # ast.literal_eval recurses on nesting; long inputs are left as strings

Piece = tuple[str, bool]  # decoded text, and whether it is one special token


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


# ---------------------------------------------------------------------------------------------------------- pieces
class PieceDecoder:
    """Generated token ids in, pieces out, step by step: each special token is a piece of its own, marked; the ids
    between decode together through the tokenizer's incremental detokenizer (complete characters only)."""

    def __init__(self, tok: Tokenizer):
        self._specials = tok.id_to_special
        self._detok = tok.detokenizer()

    def push(self, ids: Sequence[int]) -> list[Piece]:
        out: list[Piece] = []
        start = 0
        for k, i in enumerate(ids):
            name = self._specials.get(i)
            if name is None:
                continue
            self._plain(out, ids[start:k])
            text = self._detok.push([i])
            # Bytes of a character left unfinished before the special come out first, as U+FFFD. A decoder that
            # renders the special otherwise (not byte-level) gives plain text, never a tag.
            if text.endswith(name):
                self._plain_text(out, text[:len(text) - len(name)])
                out.append((name, True))
            else:
                self._plain_text(out, text)
            start = k + 1
        self._plain(out, ids[start:])
        return out

    def flush(self) -> list[Piece]:
        out: list[Piece] = []
        self._plain_text(out, self._detok.flush())
        return out

    def _plain(self, out: list[Piece], ids: Sequence[int]) -> None:
        if len(ids):
            self._plain_text(out, self._detok.push(list(ids)))

    @staticmethod
    def _plain_text(out: list[Piece], text: str) -> None:
        if text:
            out.append((text, False))


def token_pieces(tok: Tokenizer, ids: Sequence[int]) -> list[Piece]:
    """A whole generated sequence → pieces (`PieceDecoder`)."""
    d = PieceDecoder(tok)
    return d.push(ids) + d.flush()


def _partial_tag(s: str) -> int:
    """Length of the longest suffix of s that is a proper prefix of a tag (it may become one)."""
    for i in range(max(0, len(s) - _TAG_MAX + 1), len(s)):
        if s[i] == "<" and any(t.startswith(s[i:]) for t in TAGS):
            return len(s) - i
    return 0


class TagSplitter:
    """Text in, pieces out, for callers that only have text: every spelling of a tag is taken as its special token.
    A suffix that could start a tag is held until the next text (or `flush`) decides it."""

    def __init__(self):
        self._held = ""

    def feed(self, text: str) -> list[Piece]:
        s, out, pos = self._held + text, [], 0
        for m in _TAG_RE.finditer(s):
            if m.start() > pos:
                out.append((s[pos:m.start()], False))
            out.append((m.group(), True))
            pos = m.end()
        keep = len(s) - _partial_tag(s[pos:])
        if keep > pos:
            out.append((s[pos:keep], False))
        self._held = s[keep:]
        return out

    def flush(self) -> list[Piece]:
        held, self._held = self._held, ""
        return [(held, False)] if held else []


# ---------------------------------------------------------------------------------------------------------- values
def is_string_schema(schema: Any, depth: int = 0) -> bool:
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
    return any(is_string_schema(b, depth + 1) for k in ("anyOf", "oneOf")
               if isinstance(schema.get(k), list) for b in schema[k])


def _string_params(tools: Any) -> dict[str, set[str]]:
    """tool name → parameter names whose JSON schema admits a string (`is_string_schema`)."""
    out: dict[str, set[str]] = {}
    for t in tools or ():
        fn = t.get("function", t) if isinstance(t, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            continue
        params = fn.get("parameters")
        props = (params.get("properties") if isinstance(params, Mapping) else None) or {}
        out[fn["name"]] = {k for k, v in props.items() if is_string_schema(v)} if isinstance(props, Mapping) else set()
    return out


def _value(raw: str) -> Any:
    """A non-string parameter's value: JSON, else a Python literal, else the stripped text."""
    raw = raw.strip()
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        pass
    if len(raw) <= _LITERAL_MAX:
        try:  # vLLM does the same for Python-style literals (True, 'single quotes')
            v = ast.literal_eval(raw)
            json.dumps(v)  # only JSON-representable values (not sets, bytes, complex)
            return v
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            pass
    return raw


def _json(v: Any) -> str:
    return json.dumps(v, ensure_ascii=False)


# --------------------------------------------------------------------------------------------------------- parsing
def parse_output(output: str | Iterable[Piece], *, thinking: bool = True, tools: Any = None, parse_tools: bool = True,
                 make_id: Callable[[int], str] = new_call_id) -> ParsedOutput:
    """A whole generation → ParsedOutput: its pieces (`token_pieces`), or its text (every tag spelling a tag).
    thinking: the prompt left a <think> block open (`glm5.chat.RenderedChat.thinking`). parse_tools=False
    (tool_choice "none", no tools) keeps tool-call text as content."""
    p = StreamingParser(thinking=thinking, tools=tools, parse_tools=parse_tools, make_id=make_id)
    p.feed(output)
    p.finish()
    return p.result()


class StreamingParser:
    """Pieces (or text) in, OpenAI chat-completion deltas out:
    {"reasoning_content": str} | {"content": str} |
    {"tool_calls": [{"index", "id", "type": "function", "function": {"name", "arguments": ""}}]} (a call opens) |
    {"tool_calls": [{"index", "function": {"arguments": str}}]} (more of its arguments).
    Call `finish()` after the last delta; `result()` is the whole ParsedOutput."""

    def __init__(self, *, thinking: bool = True, tools: Any = None, parse_tools: bool = True,
                 make_id: Callable[[int], str] = new_call_id):
        self.thinking = thinking
        self.parse_tools = parse_tools
        self.make_id = make_id
        self._strings = _string_params(tools)
        self._split = TagSplitter()
        # start → reasoning | content; content → name → args ⇄ key → after_key → value → args → content
        self._state = "start"
        self._reasoning: list[str] = []
        self._content: list[str] = []
        self._ws = ""  # leading whitespace-only content, held: it is dropped if tool calls follow and nothing else
        self.tool_calls: list[dict] = []  # {"id", "type", "function": {"name"}}; arguments in self._args
        self._args: list[list[str]] = []  # per call, the argument fragments sent
        self._pending: list[str] = []  # the open block's text not represented in its call (yet)
        self._name = self._key = self._raw = ""
        self._string = False  # the open value is a string parameter's
        self._n_args = 0  # arguments of the open call begun so far
        self.finished = False

    def feed(self, delta: str | Iterable[Piece]) -> list[dict]:
        """Text (tags by spelling) or pieces (tags only where special) → deltas."""
        if self.finished:
            raise RuntimeError("StreamingParser.feed after finish()")
        pieces = self._split.feed(delta) if isinstance(delta, str) else self._split.flush() + list(delta)
        out: list[dict] = []
        for text, special in pieces:
            if text:
                self._take(text, special, out)
        return out

    def finish(self) -> list[dict]:
        """End of generation: held text is released; a tool-call block still open ends there."""
        out: list[dict] = []
        if not self.finished:
            for text, special in self._split.flush():
                self._take(text, special, out)
            if self._state not in ("start", "reasoning", "content"):
                self._break(None, False, out)
            if self._ws and not self.tool_calls:
                self._content.append(self._ws)
                out.append({"content": self._ws})
            self._ws = ""
            self.finished = True
        return out

    def result(self) -> ParsedOutput:
        calls = [{"id": c["id"], "type": "function", "function": {"name": c["function"]["name"],
                                                                  "arguments": "".join(a)}}
                 for c, a in zip(self.tool_calls, self._args)]
        return ParsedOutput("".join(self._reasoning) or None, "".join(self._content) or None, calls)

    # ------------------------------------------------------------------------------------------------ internals
    def _emit(self, out: list[dict], kind: str, text: str) -> None:
        if kind == "content" and not self._content:  # nothing shown yet: hold whitespace until text decides it
            text, self._ws = self._ws + text, ""
            if not text.strip():
                self._ws = text
                return
        if text:
            (self._reasoning if kind == "reasoning_content" else self._content).append(text)
            out.append({kind: text})

    def _take(self, text: str, special: bool, out: list[dict]) -> None:
        tag = text if special and text in TAGS else None
        if self._state == "start":
            self._state = "reasoning" if self.thinking or tag == THINK else "content"
            if tag == THINK:
                return
        if self._state == "reasoning":
            if tag == END_THINK:
                self._state = "content"
            else:
                self._emit(out, "reasoning_content", text)
        elif self._state == "content":
            if tag == CALL and self.parse_tools:
                self._state, self._pending, self._name = "name", [text], ""
            else:
                self._emit(out, "content", text)
        else:
            self._in_call(text, special, tag, out)

    def _in_call(self, text: str, special: bool, tag: str | None, out: list[dict]) -> None:
        """One piece inside a <tool_call> block (tag: the piece's tag, None for any other text)."""
        st = self._state
        if st == "name":
            if tag is None:
                self._name += text
                self._pending.append(text)
                return
            name = self._name.strip()
            if tag not in (KEY, END_CALL) or not name or "<" in name or ">" in name:
                return self._break(text, special, out)  # no call: the block's text is content
            self._open_call(name, out)
            st = self._state = "args"
        if st == "args":  # between arguments
            if tag == KEY:
                self._state, self._pending, self._key = "key", [text], ""
            elif tag == END_CALL:
                self._close_call(out)
            elif tag is None and not text.strip():
                self._pending.append(text)
            else:
                self._break(text, special, out)
        elif st == "key":
            if tag is None:
                self._key += text
                self._pending.append(text)
            elif tag == END_KEY:
                self._state = "after_key"
                self._pending.append(text)
            else:
                self._break(text, special, out)
        elif st == "after_key":
            key = self._key.strip()
            if tag is None and not text.strip():
                self._pending.append(text)
            elif tag == VAL and key:
                self._state, self._raw = "value", ""
                self._string = key in self._strings.get(self.tool_calls[-1]["function"]["name"], ())
                if self._string:  # its key and opening quote now, its text as it comes
                    self._arg(out, ("{" if not self._n_args else ", ") + _json(key) + ': "')
                    self._n_args += 1
                    self._pending = []
                else:
                    self._pending.append(text)
            else:
                self._break(text, special, out)
        elif st == "value":
            if tag is None:
                if self._string:
                    self._arg(out, _json(text)[1:-1])  # JSON escapes character by character: fragments concatenate
                else:
                    self._raw += text
                    self._pending.append(text)
            elif tag in (END_VAL, END_CALL):
                if self._string:
                    self._arg(out, '"')
                else:
                    sep = "{" if not self._n_args else ", "
                    self._arg(out, sep + _json(self._key.strip()) + ": " + _json(_value(self._raw)))
                    self._n_args += 1
                self._state, self._pending = "args", []
                if tag == END_CALL:
                    self._close_call(out)
            else:
                self._break(text, special, out)

    def _open_call(self, name: str, out: list[dict]) -> None:
        i = len(self.tool_calls)
        call = {"id": self.make_id(i), "type": "function", "function": {"name": name}}
        self.tool_calls.append(call)
        self._args.append([])
        self._n_args, self._pending = 0, []
        out.append({"tool_calls": [{"index": i, "id": call["id"], "type": "function",
                                    "function": {"name": name, "arguments": ""}}]})

    def _arg(self, out: list[dict], s: str) -> None:
        """More of the open call's arguments; joined onto this step's previous fragment of the same call."""
        if not s:
            return
        i = len(self.tool_calls) - 1
        self._args[i].append(s)
        last = out[-1].get("tool_calls") if out else None
        if last and last[0]["index"] == i and "id" not in last[0]:
            last[0]["function"]["arguments"] += s
        else:
            out.append({"tool_calls": [{"index": i, "function": {"arguments": s}}]})

    def _close_call(self, out: list[dict]) -> None:
        self._arg(out, "}" if self._n_args else "{}")
        self._state, self._pending = "content", []

    def _break(self, text: str | None, special: bool, out: list[dict]) -> None:
        """The open block leaves the format: a call it announced ends with its arguments as they are, the block's
        text not represented in them is content, and this piece (if any) is read again as content."""
        pending, self._pending = "".join(self._pending), []
        self._state = "content"
        self._emit(out, "content", pending)
        if text is not None:
            self._take(text, special, out)


def aggregate(deltas: Iterable[dict]) -> ParsedOutput:
    """Fold streamed deltas back into one ParsedOutput, as a client does: a call's fragments joined by index."""
    reasoning, content, calls = [], [], {}
    for d in deltas:
        reasoning.append(d.get("reasoning_content") or "")
        content.append(d.get("content") or "")
        for c in d.get("tool_calls") or ():
            f = c.get("function") or {}
            if c["index"] not in calls:
                calls[c["index"]] = {"id": c.get("id"), "type": c.get("type"),
                                     "function": {"name": f.get("name"), "arguments": ""}}
            calls[c["index"]]["function"]["arguments"] += f.get("arguments") or ""
    return ParsedOutput("".join(reasoning) or None, "".join(content) or None, [calls[i] for i in sorted(calls)])
