"""GLM-5 chat rendering: OpenAI-style messages in, prompt token ids out.

Two renderers, equal by test (tests/test_chat.py, also against transformers' apply_chat_template):
- the built-in one, a Python transcription of glm5/templates/chat_template.jinja (GLM-4.7/GLM-5's template), which
  builds the prompt as a list of parts — special tokens by name, text as strings — so the token ids come from
  inserting special ids and encoding text with specials off;
- the checkpoint's own Jinja template (tokenizer_config.json `chat_template` or chat_template.jinja), rendered in a
  sandboxed Jinja environment configured like transformers'. Rendering to a string would let a user message that
  spells `<|assistant|>` become the real token when the string is tokenized (transformers and vLLM behave so). Here
  every caller-supplied string is escaped first: each special-token spelling becomes a private-use code point pair
  that no template can mistake for a tag; the rendered string is cut at the template's own special tokens, and each
  text piece is un-escaped and encoded with specials off. Templates that compare or strip content see the escaped
  text, which differs from the original only where a special token was spelled.

Messages are normalised first (both paths see the same input): `developer` is `system`; content is a string or a
list of text parts; an assistant turn's reasoning comes from `reasoning_content` (or `reasoning`, `thinking`), else
from a `<think>…</think>` prefix of its content, as GLM's template does; tool-call `arguments` given as a JSON string
(the OpenAI wire format) are parsed into an object, as vLLM does before rendering.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from .tokenizer import FORMAT_TOKENS, Tokenizer

TEMPLATE_PATH = Path(__file__).parent / "templates" / "chat_template.jinja"
ROLES = ("system", "user", "assistant", "tool")

# The tools block of the system turn, verbatim from the template (the tags in TOOLS_FORMAT are special tokens).
TOOLS_HEAD = ("\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
              "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n")
TOOLS_TAIL = ("</tools>\n\nFor each function call, output the function name and arguments within the following XML "
              "format:\n")
TOOLS_FORMAT = ("<tool_call>{function-name}<arg_key>{arg-key-1}</arg_key><arg_value>{arg-value-1}</arg_value>"
                "<arg_key>{arg-key-2}</arg_key><arg_value>{arg-value-2}</arg_value>...</tool_call>")


class ChatFormatError(ValueError):
    """Bad messages or tools (the server answers 400 with this text)."""


class Special(str):
    """A part of a rendered prompt that is a special token (by name), not text."""


@dataclass
class RenderedChat:
    ids: list[int]
    text: str  # the prompt as text (special tokens spelled out)
    thinking: bool  # the prompt leaves a <think> block open: generated text starts as reasoning
    renderer: str  # "builtin" or "jinja"
    assistant_mask: list[bool] | None = None  # builtin only: True on assistant-turn tokens (after <|assistant|>)


# ------------------------------------------------------------------------------------------------ normalisation
def _text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        out = []
        for j, part in enumerate(content):
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
                out.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise ChatFormatError(f"{where}[{j}]: only text parts are supported, got {kind!r}")
        return "".join(out)
    raise ChatFormatError(f"{where}: expected a string or a list of text parts, got {type(content).__name__}")


def _tool_call(call: Any, where: str) -> dict:
    if not isinstance(call, Mapping):
        raise ChatFormatError(f"{where}: expected an object, got {type(call).__name__}")
    fn = call.get("function", call)
    if not isinstance(fn, Mapping):
        raise ChatFormatError(f"{where}.function: expected an object, got {type(fn).__name__}")
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise ChatFormatError(f"{where}.function.name: expected a non-empty string")
    args = fn.get("arguments")
    if args is None:
        args = {}
    elif isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise ChatFormatError(f"{where}.function.arguments: not valid JSON ({e})") from None
    if not isinstance(args, Mapping):
        raise ChatFormatError(f"{where}.function.arguments: expected a JSON object, got {type(args).__name__}")
    out = {"type": "function", "function": {"name": name, "arguments": dict(args)}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def split_reasoning(content: str) -> tuple[str | None, str]:
    """GLM's template rule for an assistant content that still holds its <think>…</think> block."""
    if "</think>" not in content:
        return None, content
    reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
    return reasoning, content.split("</think>")[-1].lstrip("\n")


def normalize_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, (list, tuple)):
        raise ChatFormatError(f"messages: expected a list, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ChatFormatError(f"messages[{i}]: expected an object with 'role' and 'content', "
                                  f"got {type(m).__name__}")
        role = "system" if m.get("role") == "developer" else m.get("role")
        if role not in ROLES:
            raise ChatFormatError(f"messages[{i}].role: {m.get('role')!r} is not one of {', '.join(ROLES)}, developer")
        msg: dict = {"role": role, "content": _text(m.get("content"), f"messages[{i}].content")}
        if role == "assistant":
            # transformers 5 reads the same three names (chat_template_utils._REASONING_FIELDS)
            reasoning = next((m[k] for k in ("reasoning_content", "reasoning", "thinking")
                              if isinstance(m.get(k), str)), None)
            if reasoning is None:
                reasoning, msg["content"] = split_reasoning(msg["content"])
            if reasoning is not None:
                msg["reasoning_content"] = reasoning
            calls = m.get("tool_calls") or []
            if not isinstance(calls, (list, tuple)):
                raise ChatFormatError(f"messages[{i}].tool_calls: expected a list")
            if calls:
                msg["tool_calls"] = [_tool_call(c, f"messages[{i}].tool_calls[{j}]") for j, c in enumerate(calls)]
        elif role == "tool":
            for k in ("tool_call_id", "name"):
                if isinstance(m.get(k), str):
                    msg[k] = m[k]
        out.append(msg)
    return out


def normalize_tools(tools: Any) -> list[dict] | None:
    if tools is None:
        return None
    if not isinstance(tools, (list, tuple)):
        raise ChatFormatError(f"tools: expected a list, got {type(tools).__name__}")
    for i, t in enumerate(tools):
        fn = t.get("function", t) if isinstance(t, Mapping) else None
        where = f"tools[{i}].function" if isinstance(t, Mapping) and "function" in t else f"tools[{i}]"
        if not isinstance(fn, Mapping):
            raise ChatFormatError(f"{where}: expected an object {{'name': ..., 'parameters': {{...}}}}, "
                                  f"got {type(fn if isinstance(t, Mapping) else t).__name__}")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ChatFormatError(f"{where}.name: expected a non-empty string")
        # The parser reads each parameter's schema (which are strings); a schema of the wrong shape is the
        # caller's error, said here, not a crash while decoding.
        params = fn.get("parameters")
        if params is not None and not isinstance(params, Mapping):
            raise ChatFormatError(f"{where}.parameters: expected a JSON Schema object, got {type(params).__name__}")
        props = (params or {}).get("properties")
        if props is not None and not isinstance(props, Mapping):
            raise ChatFormatError(f"{where}.parameters.properties: expected an object mapping parameter names to "
                                  f"schemas, got {type(props).__name__}")
    return [dict(t) for t in tools] or None


# ------------------------------------------------------------------------------------------- built-in renderer
def render_parts(messages: Any, tools: Any = None, *, add_generation_prompt: bool = True, enable_thinking: bool = True,
                 clear_thinking: bool | None = None) -> list[tuple[str, bool]]:
    """The prompt as (part, in_assistant_turn) pairs; a part is a `Special` (token name) or text. Mirrors
    templates/chat_template.jinja line by line."""
    msgs = normalize_messages(messages)
    tools = normalize_tools(tools)
    S = Special
    parts: list[tuple[str, bool]] = []

    def add(*ps: str, gen: bool = False) -> None:
        parts.extend((p, gen) for p in ps if p != "")

    add(S("[gMASK]"), S("<sop>"))
    if tools:
        add(S("<|system|>"), TOOLS_HEAD, *(json.dumps(t, ensure_ascii=False) + "\n" for t in tools), TOOLS_TAIL)
        # The format line is template text: its tags are special tokens, as when transformers tokenizes it.
        fmt = re.split(r"(</?(?:tool_call|arg_key|arg_value)>)", TOOLS_FORMAT)
        add(*(S(p) if p in FORMAT_TOKENS else p for p in fmt))
    last_user = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=-1)
    for i, m in enumerate(msgs):
        role = m["role"]
        if role == "user":
            add(S("<|user|>"), m["content"])
        elif role == "system":
            add(S("<|system|>"), m["content"])
        elif role == "assistant":
            add(S("<|assistant|>"))
            reasoning = m.get("reasoning_content") or ""
            if (clear_thinking is False or i > last_user) and reasoning:
                add(S("<think>"), reasoning.strip(), S("</think>"), gen=True)
            else:
                add(S("</think>"), gen=True)
            add(m["content"].strip(), gen=True)
            for call in m.get("tool_calls", ()):
                fn = call["function"]
                add(S("<tool_call>"), fn["name"], gen=True)
                for k, v in fn["arguments"].items():
                    value = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
                    add(S("<arg_key>"), str(k), S("</arg_key>"), S("<arg_value>"), value, S("</arg_value>"), gen=True)
                add(S("</tool_call>"), gen=True)
        else:  # tool: consecutive results share one <|observation|>
            if i == 0 or msgs[i - 1]["role"] != "tool":
                add(S("<|observation|>"))
            add(S("<tool_response>"), m["content"], S("</tool_response>"))
    if add_generation_prompt:
        add(S("<|assistant|>"), S("<think>") if enable_thinking else S("</think>"))
    return parts


def render_text(messages: Any, tools: Any = None, **kw) -> str:
    """The built-in renderer's prompt as a string (what apply_chat_template(tokenize=False) gives)."""
    return "".join(p for p, _ in render_parts(messages, tools, **kw))


def encode_parts(tok: Tokenizer, parts: list[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
    """Specials by id, adjacent text merged and encoded with specials off (merging keeps BPE boundaries the same as
    tokenizing the whole string)."""
    ids: list[int] = []
    mask: list[bool] = []
    text, text_gen = "", False
    for p, gen in parts + [(Special(""), False)]:
        if isinstance(p, Special):
            if text:
                t = tok.encode(text)
                ids += t
                mask += [text_gen] * len(t)
                text = ""
            if p:
                ids.append(tok.token_id(p))
                mask.append(gen)
        else:
            # A text run never spans a turn boundary (turns start with a special), so one flag covers it.
            text, text_gen = text + p, gen
    return ids, mask


def prompt_opens_thinking(ids: list[int], tok: Tokenizer) -> bool:
    """True when the prompt ends inside an open <think> block of the last assistant turn, so the output starts as
    reasoning (vLLM's glm45 `is_reasoning_end`, inverted)."""
    think, end, asst = (tok.special_ids.get(s) for s in ("<think>", "</think>", "<|assistant|>"))
    for i in reversed(ids):
        if i == end or i == asst:
            return False
        if i == think:
            return True
    return False


# ------------------------------------------------------------------------------------------------ Jinja renderer
_ESC = "\U000F0000"  # Supplementary Private Use Area-A: never produced by a template's own text
_ESC_SELF = chr(0xF00FF)
_ESC_BASE = 0xF0100


class _Escaper:
    def __init__(self, names: list[str]):
        self.names = names
        self.index = {n: i for i, n in enumerate(names)}
        self.find = re.compile("|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))) if names else None
        self.back = re.compile(re.escape(_ESC) + "(.)", re.DOTALL)

    def needed(self, obj: Any) -> bool:
        if isinstance(obj, str):
            return _ESC in obj or (self.find is not None and self.find.search(obj) is not None)
        if isinstance(obj, Mapping):
            return any(self.needed(k) or self.needed(v) for k, v in obj.items())
        if isinstance(obj, (list, tuple)):
            return any(self.needed(v) for v in obj)
        return False

    def escape(self, obj: Any) -> Any:
        if isinstance(obj, str):
            s = obj.replace(_ESC, _ESC + _ESC_SELF)
            return self.find.sub(lambda m: _ESC + chr(_ESC_BASE + self.index[m.group()]), s) if self.find else s
        if isinstance(obj, Mapping):
            return {self.escape(k): self.escape(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [self.escape(v) for v in obj]
        return obj

    def unescape(self, s: str) -> str:
        def one(m):
            c = m.group(1)
            if c == _ESC_SELF:
                return _ESC
            i = ord(c) - _ESC_BASE
            return self.names[i] if 0 <= i < len(self.names) else m.group()
        return self.back.sub(one, s)


@lru_cache(maxsize=8)
def _compile(template: str):
    # Same environment as transformers' apply_chat_template (utils/chat_template_utils.py): sandboxed, trim_blocks,
    # lstrip_blocks, loopcontrols, a non-HTML-escaping tojson, raise_exception, strftime_now, {% generation %}.
    try:
        import jinja2
        from jinja2 import nodes
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ImportError("rendering a checkpoint's Jinja chat template needs jinja2>=3.1.6 (pip install jinja2); "
                          "or pass template='builtin'") from None
    if tuple(int(x) for x in re.findall(r"\d+", jinja2.__version__)[:3]) < (3, 1, 6):
        raise ImportError(f"jinja2 {jinja2.__version__} has known sandbox escapes; need >= 3.1.6")

    class GenerationTag(Extension):  # transformers' assistant-mask marker; rendered as its plain body here
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body).set_lineno(lineno)

    class SafeNamespace(jinja2.utils.Namespace):  # like transformers: no underscore attributes on namespace()
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for k in attrs:
                SafeNamespace._check(k)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            SafeNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat template sets underscore attribute {name!r}")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f),
                       namespace=SafeNamespace)
    return env.from_string(template)


def _select_template(template: str | list, has_tools: bool) -> str:
    if isinstance(template, str):
        return template
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
    pick = named.get("tool_use") if has_tools and named.get("tool_use") else named.get("default")
    if not isinstance(pick, str):
        raise ChatFormatError(f"chat template list has no 'default' entry (names: {', '.join(map(str, named))})")
    return pick


def render_jinja(tok: Tokenizer, template: str, messages: list[dict], tools: list[dict] | None, *,
                 add_generation_prompt: bool, enable_thinking: bool, clear_thinking: bool | None,
                 template_kwargs: Mapping | None = None) -> tuple[str, list[int]]:
    """Render normalised messages with a Jinja template; return (text, ids) with caller strings protected."""
    import jinja2

    esc = _Escaper(sorted(tok.special_ids))
    if esc.needed(messages) or esc.needed(tools):
        messages, tools = esc.escape(messages), esc.escape(tools)
    ctx = {k: v for k, v in (template_kwargs or {}).items()}
    for k in ("bos_token", "eos_token", "pad_token", "unk_token"):  # as transformers: only the tokens that are set
        v = tok.config.get(k)
        if (v := v.get("content") if isinstance(v, Mapping) else v) is not None:
            ctx.setdefault(k, v)
    ctx.update(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
               enable_thinking=enable_thinking)
    if clear_thinking is not None:
        ctx["clear_thinking"] = clear_thinking
    try:
        rendered = _compile(template).render(**ctx)
    except jinja2.exceptions.TemplateError as e:
        raise ChatFormatError(f"chat template ({tok.source}): {e}") from None
    ids: list[int] = []
    for piece in tok.split_specials(rendered):
        ids += [piece] if isinstance(piece, int) else tok.encode(esc.unescape(piece))
    return esc.unescape(rendered), ids


# ------------------------------------------------------------------------------------------------------ entry point
def render_chat(tok: Tokenizer, messages: Any, tools: Any = None, *, add_generation_prompt: bool = True,
                enable_thinking: bool = True, clear_thinking: bool | None = None, template: str = "auto",
                template_kwargs: Mapping | None = None) -> RenderedChat:
    """Messages (OpenAI chat format) → prompt ids. template: "auto" (the checkpoint's Jinja template when it ships
    one other than ours, else built-in), "builtin", or "jinja". clear_thinking=None keeps the template's default
    (GLM: drop the reasoning of turns before the last user message); False keeps all reasoning."""
    if template not in ("auto", "builtin", "jinja"):
        raise ValueError(f"template must be 'auto', 'builtin' or 'jinja', got {template!r}")
    # "auto" with our own shipped template takes the built-in renderer, its tested twin: same ids, no Jinja needed.
    use_jinja = template == "jinja" or (template == "auto" and tok.chat_template is not None
                                        and tok.chat_template != builtin_template())
    if use_jinja:
        if tok.chat_template is None:
            raise ChatFormatError(f"{tok.source}: no chat template (tokenizer_config.json 'chat_template' or "
                                  f"chat_template.jinja); use template='builtin'")
        msgs, tls = normalize_messages(messages), normalize_tools(tools)
        text, ids = render_jinja(tok, _select_template(tok.chat_template, bool(tls)), msgs, tls,
                                 add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking,
                                 clear_thinking=clear_thinking, template_kwargs=template_kwargs)
        return RenderedChat(ids, text, prompt_opens_thinking(ids, tok), "jinja")
    parts = render_parts(messages, tools, add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking,
                         clear_thinking=clear_thinking)
    ids, mask = encode_parts(tok, parts)
    return RenderedChat(ids, "".join(p for p, _ in parts), prompt_opens_thinking(ids, tok), "builtin", mask)


@lru_cache(maxsize=1)
def builtin_template() -> str:
    """The shipped Jinja template (the built-in renderer's twin), e.g. for tokenizer_config.json."""
    return TEMPLATE_PATH.read_text(encoding="utf-8")
