"""One HTTP request's life in the engine: admission by cost (per-request size → 400, queue bound → 429), sampling
parameters and limits (→ 400), the grammar of a structured chat answer (→ 400 when it does not compile),
submission through the worker, the stream of outputs, abort on every early exit, and its latency metrics.

`Run` is an async context manager: leaving it for any reason (finished, client gone, error, cancellation) aborts
whatever of it the engine still runs, so a vanished client never holds cache blocks.

Structured output (`chat_grammar`): `response_format` json_object / json_schema and declared tools become one Lark
grammar (llguidance's dialect) over GLM-5's assistant turn, enforced while decoding (glm5/engine/grammar.py):

    start: think body                       the turn after <|assistant|>; the prompt's own tail is fed first
    think: <think> REASONING? </think> | </think>
    body:  TEXT? (call TEXT?)*              tools, tool_choice auto (content, calls, or both)
           WS? call (WS? call)*             tool_choice required (calls only; named: calls of that function)
           WS? json                         response_format (json | WS? calls when tools are declared too)
    call:  <tool_call> "get_weather" (<arg_key> "city" </arg_key> <arg_value> value </arg_value>)... </tool_call>

A call names a declared function and only its declared parameters, in declared order, required ones present (an
object without `properties` takes any keys; a function without `parameters` none). A value whose schema admits a
string is free text (a string enum: one of its strings), as chat_parse keeps such values verbatim; any other value
is JSON under its schema (`%json`, lenient: keywords llguidance lacks are ignored, since tool schemas come from
every framework). `response_format` schemas are compiled strictly: what llguidance cannot enforce is a 400. Special
tokens come only where the grammar names them, and free text (reasoning, content, string values) cannot spell a
chat tag in plain characters either, so a client that reads tags from the text sees the structure the tokens have.
`parallel_tool_calls: false` allows one call.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any, Mapping

from ..chat import normalize_tools
from ..chat_parse import is_string_schema
from ..engine import RequestError, SamplingParams, StepOutput
from ..engine.grammar import Grammar, GrammarError, grammar_tokenizer
from ..loader import with_openai_defaults
from .metrics import Metrics
from .protocol import APIError, ChatCompletionRequest
from .worker import EngineFailure, EngineWorker


@dataclass
class Limits:
    max_body_bytes: int = 8 << 20
    max_tokens: int | None = None  # largest max_tokens a request may ask for (None: the context)
    max_queue: int = 256  # sequences accepted beyond the engine's running batch; more → 429
    retry_after_s: int = 1
    # One request's cost, refused (400) before any work starts. A request is prompts x n sequences: counting HTTP
    # requests instead would let one `n: 128` over 300 prompts start 38,400 of them. Its response holds up to
    # sequences x max_tokens tokens, each with 1 + top_logprobs entries: bounding that keeps a response from
    # growing to gigabytes (a logprob entry is ~100 bytes of JSON, so the default is ~100 MB at worst).
    max_seqs_per_request: int = 256
    max_request_tokens: int = 1 << 20


class GrammarCompiler:
    """Lark text -> the Grammar of an assistant turn of a chat prompt (it continues after the prompt's last
    `<|assistant|>`), for one tokenizer. Agents send the same tools every turn: compiled grammars are reused (a
    Grammar is never mutated)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.compile = lru_cache(maxsize=64)(self._compile)

    @cached_property
    def tokenizer(self):
        """llguidance's tokenizer, built on the first structured request (about a second for GLM-5's vocabulary)."""
        tok = self.tok
        return grammar_tokenizer(tok.json, vocab_size=len(tok), eos_ids=tok.eos_ids,
                                 special_ids=list(tok.special_ids.values()))

    def _compile(self, lark: str) -> Grammar:
        return Grammar(self.tokenizer, lark, after=self.tok.token_id("<|assistant|>"))


class ServerState:
    """What the handlers share: engine thread, tokenizer, limits, metrics, the served name."""

    def __init__(self, engine, tokenizer, model_name: str, limits: Limits, api_key: str | None,
                 sampling: dict | None = None):
        self.engine, self.tok, self.model_name = engine, tokenizer, model_name
        self.sampling = with_openai_defaults(sampling)  # for the fields a request leaves unset
        self.limits, self.api_key = limits, api_key
        self.worker = EngineWorker(engine)
        self.metrics = Metrics(model_name)
        self.created = int(time.time())
        sched = getattr(engine, "scheduler", None)
        self.max_running = getattr(sched, "max_num_seqs", 0)
        self.max_in_flight = self.max_running + limits.max_queue  # in sequences (prompts x n), not HTTP requests
        self.seqs_in_flight = 0
        self.max_token_bytes = _max_token_bytes(tokenizer)  # for refusing over-long text before tokenising it
        self.grammars = GrammarCompiler(tokenizer)
        self.compile_grammar = self.grammars.compile

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def grammar_tokenizer(self):
        return self.grammars.tokenizer

    def check_model(self, name: str | None):
        if name is not None and name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist. This server serves `{self.model_name}` "
                                f"(see /v1/models).", param="model", code="model_not_found")


def _max_token_bytes(tok) -> int | None:
    """The most bytes of text any one token stands for; None where the tokenizer cannot say (no bound is used)."""
    try:
        return max(len(tok.token_bytes(i)) for i in range(len(tok)))
    except Exception:  # not byte-level, or a stand-in tokenizer: skip the early check, tokenising still checks
        return None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sampling_params(state: ServerState, req, *, prompt_len: int, max_tokens: int | None,
                    top_logprobs: int) -> SamplingParams:
    """OpenAI / vLLM request fields → SamplingParams, with the server's limits checked (400 on violation)."""
    ctx = state.max_model_len
    if prompt_len >= ctx:
        raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, your prompt has "
                            f"{prompt_len} tokens, which leaves no room to generate. Please shorten the prompt.",
                       param="messages" if hasattr(req, "messages") else "prompt", code="context_length_exceeded")
    cap = state.limits.max_tokens
    if max_tokens is not None:
        if cap is not None and max_tokens > cap:
            raise APIError(400, f"max_tokens is {max_tokens}, above this server's limit of {cap}",
                           param="max_tokens", code="max_tokens_exceeded")
        if prompt_len + max_tokens > ctx:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                                f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the "
                                f"completion). Please reduce the prompt or max_tokens.",
                           param="max_tokens", code="context_length_exceeded")
    elif cap is not None:
        max_tokens = min(cap, ctx - prompt_len)
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported by this server", param="logit_bias")
    grammar = chat_grammar(state, req) if isinstance(req, ChatCompletionRequest) else None
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    try:
        return SamplingParams(
            n=req.n, temperature=state.sampling["temperature"] if req.temperature is None else req.temperature,
            top_p=state.sampling["top_p"] if req.top_p is None else req.top_p,
            top_k=state.sampling["top_k"] if req.top_k is None else req.top_k, min_p=req.min_p or 0.0,
            seed=None if req.seed is None else req.seed % (1 << 62),  # the engine adds the sample index to it
            max_tokens=max_tokens, min_tokens=req.min_tokens, stop=stop, stop_token_ids=list(req.stop_token_ids or []),
            ignore_eos=req.ignore_eos, presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0, top_logprobs=top_logprobs, grammar=grammar)
    except ValueError as e:
        raise APIError(400, str(e)) from None


class Run:
    """The engine requests behind one HTTP request (one per prompt; each with n samples), sharing one sink."""

    def __init__(self, state: ServerState, prompts: list[list[int]], params: SamplingParams, http_id: str):
        self.state, self.prompts, self.params = state, prompts, params
        self.rids = [f"{http_id}-{i}" for i in range(len(prompts))]
        self.queue: asyncio.Queue = asyncio.Queue()
        self.t0 = time.perf_counter()
        self.first_token_at: float | None = None
        self._last: dict[tuple[str, int], float] = {}
        self._submitted: list[str] = []
        self._open: set[tuple[str, int]] = set()  # samples not finished
        self.finish_reason: str | None = None
        self.completed = False
        self._admitted = False

    @property
    def num_prompt_tokens(self) -> int:
        return sum(map(len, self.prompts))

    @property
    def num_seqs(self) -> int:
        return len(self.prompts) * self.params.n

    def check_cost(self):
        """400 for a request larger than any one request may be (retrying cannot help, so not a 429)."""
        lim, n, ctx = self.state.limits, self.params.n, self.state.max_model_len
        what = f"{len(self.prompts)} prompt(s) x n={n}"
        if self.num_seqs > lim.max_seqs_per_request:
            raise APIError(400, f"This request asks for {self.num_seqs} sequences ({what}), above this server's "
                                f"limit of {lim.max_seqs_per_request} per request (max_seqs_per_request). Send fewer "
                                f"prompts or a smaller n.", param="n", code="request_too_large")
        per_token = 1 + self.params.top_logprobs
        tokens = sum(self.params.max_tokens or max(ctx - len(p), 0) for p in self.prompts) * n * per_token
        if tokens > lim.max_request_tokens:
            lp = f" x (1 + top_logprobs={self.params.top_logprobs})" if self.params.top_logprobs else ""
            raise APIError(400, f"This request may generate {tokens} tokens and log-prob entries ({what} x "
                                f"max_tokens{lp}), above this server's limit of {lim.max_request_tokens} per request "
                                f"(max_request_tokens). Lower max_tokens, n, the number of prompts or logprobs.",
                           param="max_tokens", code="request_too_large")

    async def __aenter__(self) -> Run:
        st, m = self.state, self.state.metrics
        self.check_cost()
        # Capacity is counted in sequences; a request alone is always admitted (the check above bounds it), so a
        # large request is not refused forever on a server whose queue is smaller than it.
        if st.seqs_in_flight and st.seqs_in_flight + self.num_seqs > st.max_in_flight:
            m.rejected_queue_full += 1
            raise APIError(429, f"The server is at capacity ({st.seqs_in_flight} sequences in flight, this request "
                                f"adds {self.num_seqs}, limit {st.max_in_flight}); retry after "
                                f"{st.limits.retry_after_s} s.",
                           code="queue_full", headers={"Retry-After": str(st.limits.retry_after_s)})
        m.in_flight += 1
        st.seqs_in_flight += self.num_seqs
        self._admitted = True
        try:
            for rid, prompt in zip(self.rids, self.prompts):
                self._submitted.append(rid)
                self._open.update((rid, i) for i in range(self.params.n))
                await st.worker.add(prompt, self.params, rid, self.queue)
        except (RequestError, ValueError) as e:
            await self.__aexit__(None, None, None)
            raise APIError(400, str(e), param="prompt" if len(self.prompts) > 1 else None) from None
        except EngineFailure as e:
            await self.__aexit__(None, None, None)
            raise APIError(503, str(e), code="engine_down") from None
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc):
        self.close()
        return False

    def close(self):
        """Idempotent: abort what still runs, release the admission slot, record latency."""

        if not self._admitted:
            return
        self._admitted = False
        for rid in self._submitted:
            if any(r == rid for r, _ in self._open):
                self.state.worker.abort(rid)
        m = self.state.metrics
        m.in_flight -= 1
        self.state.seqs_in_flight -= self.num_seqs
        if self.completed:
            m.e2e.observe(time.perf_counter() - self.t0)
            m.prompt_tokens += self.num_prompt_tokens

    async def outputs(self) -> AsyncIterator[list[StepOutput]]:
        """Each step's outputs for this run, until every sample finished."""
        m = self.state.metrics
        while self._open:
            item = await self.queue.get()
            if isinstance(item, EngineFailure):
                raise APIError(500, str(item), code="engine_failure")
            now = time.perf_counter()
            for o in item:
                key = (o.request_id, o.index)
                if o.new_token_ids:
                    m.generation_tokens += len(o.new_token_ids)
                    if self.first_token_at is None:
                        self.first_token_at = now
                        m.ttft.observe(now - self.t0)
                    if key in self._last:
                        m.itl.observe(now - self._last[key])
                    self._last[key] = now
                if o.finished:
                    self._open.discard(key)
                    if self.finish_reason is None:
                        self.finish_reason = o.finish_reason
            yield item
        self.completed = True
        m.count_finish(self.finish_reason)


# ------------------------------------------------------------------------------------------- structured output
# JSON as json.dumps writes it (the chat template writes tool argument values so), with no free whitespace: a
# sampler allowed whitespace anywhere can emit it until max_tokens, a known failure of JSON-constrained decoding.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Free text: anything but a chat tag spelled out in plain characters (special tokens are never text to llguidance).
_FREE = r"/(?s:.+)/ & ~/(?s:.*)<\/?(think|tool_call|arg_key|arg_value)>(?s:.*)/"


def chat_grammar(state: ServerState, req: ChatCompletionRequest) -> Grammar | None:
    """The grammar a chat request's answer must follow, or None when nothing constrains it (no tools, no
    response_format): such a request costs the engine nothing extra. 400 when a schema cannot be compiled."""
    choice = req.tool_choice
    tools = normalize_tools(req.tools or None) if choice != "none" else None  # shapes checked by _tool_setup
    rf = req.response_format
    schema = None
    if rf is not None and rf.type == "json_object":
        schema = {"type": "object"}
    elif rf is not None and rf.type == "json_schema":
        schema = (rf.json_schema or {}).get("schema")  # its shape is checked by _json_mode
    if not tools and schema is None:
        return None
    forced = None if choice is None or isinstance(choice, str) else choice.function.name
    g = turn_grammar(tools, schema, forced=forced, required=choice == "required",
                     parallel=req.parallel_tool_calls is not False)
    try:
        return state.compile_grammar(g.text())
    except GrammarError as e:
        line, msg = _where(str(e))
        field = g.origin.get(line, "response_format" if schema is not None else "tools")
        raise APIError(400, f"{field}: {msg}", param=field.split(".")[0].split("[")[0],
                       code="invalid_schema") from None


class _GrammarLines:
    """Lark text built line by line, remembering which request field a line came from (for error messages)."""

    def __init__(self):
        self.lines: list[str] = []
        self.origin: dict[int, str] = {}  # 1-based line number -> request field

    def add(self, line: str, origin: str | None = None):
        if line not in self.lines:  # shared rules (KEY, any_arg) are added by each tool that needs them
            self.lines.append(line)
            if origin is not None:
                self.origin[len(self.lines)] = origin

    def json(self, rule: str, schema: Mapping, origin: str, **options):
        schema = {**schema, "x-guidance": {**JSON_STYLE, **options, **(schema.get("x-guidance") or {})}}
        self.add(f"{rule}: %json {json.dumps(schema, ensure_ascii=False)}", origin)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _where(error: str) -> tuple[int | None, str]:
    """llguidance's "at LINE(COL): message" -> (LINE, message)."""
    head, sep, rest = error.partition(": ")
    if sep and head.startswith("at ") and "(" in head:
        try:
            return int(head[3:head.index("(")]), rest
        except ValueError:
            pass
    return None, error


def _lit(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # a JSON string is a Lark string literal


def turn_grammar(tools: list[dict] | None, schema: Mapping | None = None, *, forced: str | None = None,
                 required: bool = False, parallel: bool = True) -> _GrammarLines:
    """The Lark lines an assistant turn follows (`.text()`): reasoning, then text and calls of the declared tools
    only, each with its declared parameter names (or a JSON answer for `schema`). `glm5 eval` decodes tool chats
    under it too, so that it scores what the server serves."""
    g = _GrammarLines()
    _turn(g, tools, schema, forced=forced, required=required, parallel=parallel)
    return g


def _turn(g: _GrammarLines, tools: list[dict] | None, schema: Mapping | None, *, forced: str | None,
          required: bool, parallel: bool):
    g.add("start: think body")
    g.add("think: <think> REASONING? </think> | </think>")
    g.add(f"REASONING: {_FREE}")
    g.add(f"TEXT: {_FREE}")
    g.add(r"WS: /[ \t\r\n]{1,8}/")  # bounded, as JSON_STYLE's whitespace
    if schema is not None:
        g.json("json", schema, "response_format.json_schema.schema")
    if not tools:
        g.add("body: WS? json")
        return
    names = [t.get("function", t)["name"] for t in tools]
    for i, t in enumerate(tools):
        _call(g, i, t.get("function", t))
    call = f"call_{names.index(forced)}" if forced is not None else "call"
    g.add("call: " + " | ".join(f"call_{i}" for i in range(len(tools))))
    g.add(f"calls: {call}" + (f" (WS? {call})*" if parallel else ""))
    if forced is not None or required:
        g.add("body: WS? calls WS?")
    elif schema is not None:
        g.add("body: WS? json | WS? calls WS?")
    else:
        g.add("body: TEXT? (call TEXT?)*" if parallel else "body: TEXT? (call TEXT?)?")


def _call(g: _GrammarLines, i: int, fn: Mapping):
    name = _lit(fn["name"])
    params = fn.get("parameters")
    if params is None:  # OpenAI: no parameters is an empty parameter list
        g.add(f"call_{i}: <tool_call> {name} </tool_call>")
        return
    props = params.get("properties")
    if props is None:  # an object of keys nobody declared
        g.add(f"call_{i}: <tool_call> {name} any_arg* </tool_call>")
        g.add("any_arg: <arg_key> KEY </arg_key> <arg_value> TEXT? </arg_value>")
        g.add("KEY: /[^<>]{1,256}/")
        return
    required = params.get("required")
    required = set(required) if isinstance(required, list) else set()
    defs = {k: params[k] for k in ("$defs", "definitions") if isinstance(params.get(k), Mapping)}
    args = []
    for k, (key, sub) in enumerate(props.items()):
        rule = f"arg_{i}_{k}"
        value = _value(g, f"{rule}_value", sub, defs, f"tools[{i}].function.parameters.properties.{key}")
        g.add(f"{rule}: <arg_key> {_lit(key)} </arg_key> <arg_value> {value} </arg_value>")
        args.append(rule if key in required else f"{rule}?")
    g.add(f"call_{i}: <tool_call> {name} {' '.join(args)} </tool_call>")


def _value(g: _GrammarLines, rule: str, schema: Any, defs: dict, origin: str) -> str:
    """One argument value's grammar: an expression for its arg rule (adding a rule for a JSON value)."""
    if not isinstance(schema, Mapping):
        return "TEXT?"
    enum = [schema["const"]] if "const" in schema else schema.get("enum")
    if isinstance(enum, list) and enum and all(isinstance(e, str) for e in enum):
        return "(" + " | ".join(_lit(e) for e in enum) + ")"
    typed = any(k in schema for k in ("type", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "properties",
                                      "items"))
    if is_string_schema(schema) or not typed:  # kept verbatim by the parser: free text
        return "TEXT?"
    # Sibling $defs make the parameters' "#/$defs/..." references resolve inside the value's own schema.
    g.json(rule, {**defs, **schema}, origin, lenient=True)
    return rule
