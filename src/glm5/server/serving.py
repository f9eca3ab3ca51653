"""The two generation endpoints: /v1/chat/completions and /v1/completions, whole or streamed (SSE).

Chat specifics (decisions, each documented for clients in the README's server section):
- `tool_choice`: "auto" (default with tools) lets the model answer or call; "none" leaves the tools out of the prompt
  and parses nothing; "required" and a named function (which must be one of `tools`, 400 otherwise) force calls.
  With tools declared, calls are enforced while decoding (runs.chat_grammar, llguidance): only declared names and
  parameter keys can be produced; a named function's prompt ends with `[</think>]<tool_call>NAME`, so the model
  writes that call's arguments (reasoning is skipped, as OpenAI's forced calls do).
- `response_format`: "json_object" and "json_schema" are enforced while decoding. As OpenAI requires, a json_object
  request must mention JSON in a message (400 otherwise); a schema that does not compile is a 400 `invalid_schema`;
  an answer cut by max_tokens keeps `finish_reason: "length"` with the JSON so far.
- `chat_template_kwargs`: `enable_thinking` (default true), `clear_thinking`, others go to a checkpoint's Jinja
  template. Reasoning comes back as `reasoning` (current vLLM) and as `reasoning_content` (older clients), the
  same text in both (message and deltas).
- Log-probs cover every shown token (reasoning included), the token that ended the sample excluded.
- Tool calls stream as OpenAI's do (`glm5.chat_parse`): the first delta of a call carries its index, id, type and
  name with `arguments: ""`, later ones only its index and the next fragment of `arguments`.
- Tags count only where the model produced their special tokens: text that merely spells `<tool_call>` is content.
"""

from __future__ import annotations

import json
import time

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..chat import ChatFormatError, normalize_tools, render_chat
from ..chat_parse import Piece, StreamingParser
from .outputs import SampleText, TokenInfo, text_of, token_text
from .protocol import (
    APIError,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatLogprobs,
    ChatMessage,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    FunctionCall,
    TokenLogprob,
    ToolCall,
    TopLogprob,
    Usage,
)
from .runs import Run, ServerState, new_id, sampling_params
from .sse import SSEResponse, sse, until_disconnected


# ------------------------------------------------------------------------------------------------------------ chat
class _ChatSample:
    def __init__(self, state: ServerState, stop, thinking: bool, tools, parse_tools: bool, prefix: list[Piece]):
        self.text = SampleText(state.tok, stop)
        self.parser = StreamingParser(thinking=thinking, tools=tools, parse_tools=parse_tools)
        # The forced "</think><tool_call>NAME" is parsed as if generated. It yields no delta itself: the call's id
        # and name go out with the generated <arg_key> or </tool_call>.
        if prefix:
            self.parser.feed(prefix)

    def push(self, out) -> tuple[list[dict], list[TokenInfo]]:
        pieces, toks = self.text.push(out)
        deltas = self.parser.feed(pieces) if pieces else []
        if out.finished:
            deltas += self.parser.finish()
        return deltas, toks

    @property
    def finish_reason(self) -> str | None:
        r = self.text.finish_reason
        return "tool_calls" if r == "stop" and self.parser.tool_calls else r


def _chat_logprobs(state: ServerState, toks: list[TokenInfo]) -> ChatLogprobs:
    def one(tid, lp):
        s, b = token_text(state.tok, tid)
        return s, lp, b
    content = []
    for t in toks:
        s, lp, b = one(t.token_id, t.logprob)
        tops = [TopLogprob(token=ts, logprob=tl, bytes=tb) for ts, tl, tb in (one(i, v) for i, v in t.top or ())]
        content.append(TokenLogprob(token=s, logprob=lp, bytes=b, top_logprobs=tops))
    return ChatLogprobs(content=content)


def _tool_setup(req: ChatCompletionRequest):
    """→ (tools for the prompt, parse tool calls?, forced function name or None)."""
    try:
        tools = normalize_tools(req.tools or None)
    except ChatFormatError as e:
        raise APIError(400, str(e), param="tools", code="invalid_value") from None
    choice = req.tool_choice
    names = [(t.get("function") or {}).get("name") for t in tools or ()]
    if choice is not None and choice != "none" and not tools:
        raise APIError(400, f"tool_choice {choice if isinstance(choice, str) else 'function'!r} needs `tools`",
                       param="tool_choice")
    if choice == "none":
        return None, False, None
    if choice is not None and not isinstance(choice, str):
        if choice.function.name not in names:
            raise APIError(400, f"tool_choice names function {choice.function.name!r}, which is not among the "
                                f"tools ({', '.join(map(str, names))})", param="tool_choice")
        return tools, True, choice.function.name
    return tools, bool(tools), None


def _json_mode(req: ChatCompletionRequest) -> bool:
    """response_format asks for JSON (enforced while decoding: runs.chat_grammar); 400 for a malformed one."""
    rf = req.response_format
    if rf is None or rf.type == "text":
        return False
    if rf.type == "json_schema":
        if not isinstance((rf.json_schema or {}).get("schema"), dict):
            raise APIError(400, "response_format json_schema needs a JSON Schema object: "
                                "{\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": {...}}}",
                           param="response_format", code="invalid_schema")
        return True
    if "json" not in json.dumps(req.messages, ensure_ascii=False).lower():
        raise APIError(400, "'messages' must contain the word 'json' in some form, to use 'response_format' of type "
                            "'json_object'", param="messages")
    return True


def _check_json(samples: list[_ChatSample]):
    """The grammar guarantees JSON content to a sample that ended at an end token without calling a tool. A sample
    cut short (finish_reason "length", or a stop string) keeps the text it has, as OpenAI returns it: its
    finish_reason says so. Content that breaks the guarantee is the server's fault (500)."""
    for i, s in enumerate(samples):
        if s.text.finish_reason != "stop" or isinstance(s.text.stop_reason, str) or s.parser.tool_calls:
            continue
        try:
            json.loads(s.parser.result().content or "")
        except ValueError:
            raise APIError(500, f"choice {i}: the model's answer is not valid JSON although response_format is "
                                f"enforced while decoding", code="invalid_json_output") from None


async def chat_completions(state: ServerState, req: ChatCompletionRequest, request: Request) -> Response:
    state.check_model(req.model)
    tools, parse_tools, forced = _tool_setup(req)
    json_mode = _json_mode(req)
    if req.top_logprobs and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    kw = dict(req.chat_template_kwargs or {})
    thinking, clear = kw.pop("enable_thinking", True), kw.pop("clear_thinking", None)
    if not isinstance(thinking, bool) or not (clear is None or isinstance(clear, bool)):
        raise APIError(400, "chat_template_kwargs enable_thinking / clear_thinking must be booleans",
                       param="chat_template_kwargs")
    tok = state.tok
    try:
        # Rendering and tokenising a large prompt takes seconds: off the event loop, so /health and streams go on.
        r = await anyio.to_thread.run_sync(lambda: render_chat(tok, req.messages, tools, enable_thinking=thinking,
                                                                 clear_thinking=clear, template_kwargs=kw))
    except ChatFormatError as e:
        raise APIError(400, str(e), param="messages") from None
    prompt, prefix = list(r.ids), []
    if forced:
        specials = (["</think>"] if r.thinking else []) + ["<tool_call>"]
        prompt += [tok.token_id(s) for s in specials] + tok.encode(forced)
        prefix = [(s, True) for s in specials] + [(forced, False)]
    max_tokens = req.max_completion_tokens or req.max_tokens
    # Compiling a grammar for many tools or a large schema takes up to a few hundred ms: off the event loop too.
    params = await anyio.to_thread.run_sync(lambda: sampling_params(
        state, req, prompt_len=len(prompt), max_tokens=max_tokens,
        top_logprobs=(req.top_logprobs or 0) if req.logprobs else 0))
    stop = params.stop
    samples = [_ChatSample(state, stop, r.thinking, tools, parse_tools, prefix) for _ in range(params.n)]
    rid, created = new_id("chatcmpl"), int(time.time())
    run = Run(state, [prompt], params, rid)
    await run.__aenter__()
    if req.stream:
        usage = req.stream_options is not None and req.stream_options.include_usage
        return SSEResponse(_chat_stream(state, req, run, samples, rid, created, usage, json_mode), run.close)
    try:
        done = await until_disconnected(request, _drain(run, samples))
    finally:
        run.close()
    if not done:
        return Response(status_code=499)  # nobody reads it
    if json_mode:
        _check_json(samples)
    choices = []
    for i, s in enumerate(samples):
        res = s.parser.result()
        calls = [ToolCall(id=c["id"], type="function", function=FunctionCall(**c["function"]))
                 for c in res.tool_calls] or None
        msg = ChatMessage(role="assistant", content=res.content, reasoning=res.reasoning_content,
                          reasoning_content=res.reasoning_content,
                          **({"tool_calls": calls} if calls else {}))
        choices.append(ChatChoice(index=i, message=msg, finish_reason=s.finish_reason,
                                  logprobs=_chat_logprobs(state, s.text.tokens) if req.logprobs else None))
    out = ChatCompletion(id=rid, created=created, model=state.model_name, choices=choices,
                         usage=_usage(run, samples))
    return JSONResponse(out.dump())


async def _drain(run: Run, samples) -> bool:
    async for outs in run.outputs():
        for o in outs:
            samples[o.index].push(o)
    return True


def _usage(run: Run, samples) -> Usage:
    gen = sum(s.text.num_generated for s in samples)
    return Usage(prompt_tokens=run.num_prompt_tokens, completion_tokens=gen, total_tokens=run.num_prompt_tokens + gen)


async def _chat_stream(state, req, run: Run, samples, rid, created, include_usage, json_mode):
    extra = {"usage": None} if include_usage else {}  # OpenAI: with include_usage every chunk has the key

    def chunk(i, delta: ChatDelta, finish=None, logprobs=None):
        c = ChatChunkChoice(index=i, delta=delta, logprobs=logprobs, finish_reason=finish)
        ch = ChatCompletionChunk(id=rid, created=created, model=state.model_name, choices=[c], **extra)
        return sse(ch.dump_json())

    try:
        for i in range(len(samples)):
            yield chunk(i, ChatDelta(role="assistant", content=""))
        async for outs in run.outputs():
            for o in outs:
                s = samples[o.index]
                deltas, toks = s.push(o)
                lp = _chat_logprobs(state, toks) if req.logprobs and toks else None
                for d in deltas:
                    yield chunk(o.index, _delta(d), logprobs=lp)
                    lp = None
                if lp is not None:
                    yield chunk(o.index, ChatDelta(), logprobs=lp)
                if o.finished:
                    if json_mode:
                        _check_json([s])
                    yield chunk(o.index, ChatDelta(), finish=s.finish_reason)
        if include_usage:
            yield sse(ChatCompletionChunk(id=rid, created=created, model=state.model_name, choices=[],
                                          usage=_usage(run, samples)).dump_json())
    except APIError as e:
        yield sse(json.dumps(e.body()))
    yield sse("[DONE]")


class _ToolCallDelta(ToolCall):  # in a delta, id and type only where set: a call's first delta (as OpenAI sends)
    _omit_unset = frozenset({"index", "id", "type"})


class _FunctionDelta(FunctionCall):  # likewise the name
    _omit_unset = frozenset({"name", "arguments"})


def _delta(d: dict) -> ChatDelta:
    if "tool_calls" in d:
        return ChatDelta(tool_calls=[_ToolCallDelta(**{k: c[k] for k in ("index", "id", "type") if k in c},
                                                    function=_FunctionDelta(**c["function"]))
                                     for c in d["tool_calls"]])
    if "reasoning_content" in d:  # both names, as in the message
        return ChatDelta(reasoning=d["reasoning_content"], reasoning_content=d["reasoning_content"])
    return ChatDelta(**d)


# ----------------------------------------------------------------------------------------------------- completions
def _prompts(state: ServerState, p) -> list[list[int]]:
    if isinstance(p, str):
        p = [p]
    if not p:
        raise APIError(400, "prompt is empty", param="prompt")
    if isinstance(p[0], int):  # one prompt of token ids
        p = [p]
    # Raw completions take the prompt as the caller wrote it, special-token spellings included (the caller owns
    # the whole prompt, so there is no turn to forge).
    out = [state.tok.encode(x, allow_special=True) if isinstance(x, str) else list(x) for x in p]
    V = len(state.tok)
    bad = next((t for x in out for t in x if not 0 <= t < V), None)
    if bad is not None:  # checked before anything decodes them (echo)
        raise APIError(400, f"prompt token id {bad} is outside the vocabulary [0, {V})", param="prompt")
    return out


def _completion_logprobs(state: ServerState, toks: list[TokenInfo], offset: int) -> CompletionLogprobs:
    strs, lps, tops, offs = [], [], [], []
    for t in toks:
        s, _ = token_text(state.tok, t.token_id)
        strs.append(s)
        lps.append(t.logprob)
        tops.append({token_text(state.tok, i)[0]: v for i, v in t.top or ()})
        offs.append(offset)
        offset += len(s)
    return CompletionLogprobs(tokens=strs, token_logprobs=lps, top_logprobs=tops, text_offset=offs)


async def completions(state: ServerState, req: CompletionRequest, request: Request) -> Response:
    state.check_model(req.model)
    if req.suffix:
        raise APIError(400, "suffix is not supported by this server", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, "best_of must equal n (or be omitted): this server returns every sample it draws",
                       param="best_of")
    if req.echo and req.logprobs is not None:
        raise APIError(400, "echo with logprobs needs prompt log-probs, which this server does not compute",
                       param="echo")
    prompts = await anyio.to_thread.run_sync(_prompts, state, req.prompt)  # tokenising: off the event loop
    params = sampling_params(state, req, prompt_len=max(map(len, prompts)), max_tokens=req.max_tokens,
                             top_logprobs=req.logprobs or 0)
    n = params.n
    echo = [state.tok.decode(p) if req.echo else "" for p in prompts]
    samples = [SampleText(state.tok, params.stop) for _ in range(len(prompts) * n)]
    offsets = [len(echo[k // n]) for k in range(len(samples))]
    rid, created = new_id("cmpl"), int(time.time())
    run = Run(state, prompts, params, rid)
    index = {r: k for k, r in enumerate(run.rids)}
    await run.__aenter__()
    if req.stream:
        usage = req.stream_options is not None and req.stream_options.include_usage
        return SSEResponse(_completion_stream(state, req, run, samples, index, echo, offsets, rid, created, usage),
                           run.close)
    try:
        done = await until_disconnected(request, _drain_completion(run, samples, index, n))
    finally:
        run.close()
    if not done:
        return Response(status_code=499)
    choices = []
    for k, s in enumerate(samples):
        lp = _completion_logprobs(state, s.tokens, offsets[k]) if req.logprobs is not None else None
        choices.append(CompletionChoice(index=k, text=echo[k // n] + s.text, logprobs=lp,
                                        finish_reason=s.finish_reason))
    out = Completion(id=rid, created=created, model=state.model_name, choices=choices, usage=_usage_text(run, samples))
    return JSONResponse(out.dump())


async def _drain_completion(run: Run, samples, index, n) -> bool:
    async for outs in run.outputs():
        for o in outs:
            samples[index[o.request_id] * n + o.index].push(o)
    return True


def _usage_text(run: Run, samples) -> Usage:
    gen = sum(s.num_generated for s in samples)
    return Usage(prompt_tokens=run.num_prompt_tokens, completion_tokens=gen, total_tokens=run.num_prompt_tokens + gen)


async def _completion_stream(state, req, run: Run, samples, index, echo, offsets, rid, created, include_usage):
    n = run.params.n

    extra = {"usage": None} if include_usage else {}

    def chunk(k, text, finish=None, logprobs=None):
        c = CompletionChoice(index=k, text=text, logprobs=logprobs, finish_reason=finish)
        return sse(Completion(id=rid, created=created, model=state.model_name, choices=[c], **extra).dump_json())

    try:
        if req.echo:
            for k in range(len(samples)):
                yield chunk(k, echo[k // n])
        async for outs in run.outputs():
            for o in outs:
                k = index[o.request_id] * n + o.index
                s = samples[k]
                pieces, toks = s.push(o)
                text = text_of(pieces)
                lp = None
                if req.logprobs is not None and toks:
                    lp = _completion_logprobs(state, toks, offsets[k])
                    offsets[k] += sum(len(x) for x in lp.tokens)
                if text or lp is not None or o.finished:
                    yield chunk(k, text, s.finish_reason if o.finished else None, lp)
        if include_usage:
            yield sse(Completion(id=rid, created=created, model=state.model_name, choices=[],
                                 usage=_usage_text(run, samples)).dump_json())
    except APIError as e:
        yield sse(json.dumps(e.body()))
    yield sse("[DONE]")
