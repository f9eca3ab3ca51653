"""The FastAPI app: routes, OpenAI-style errors for every 4xx/5xx, API key, body limit, HTTP metrics, lifespan.

    app = create_app("small")                     # a preset, a checkpoint dir, None (the default model)
    app = create_app(engine, tokenizer=tok)       # or an Engine you built (tests pass a scripted stand-in)

The engine thread starts with the app (lifespan startup) and stops after uvicorn has drained: on SIGTERM uvicorn
stops accepting connections, lets in-flight responses (streams included) finish, then runs the lifespan shutdown.

Request bodies are read and parsed here rather than by FastAPI's body binding, so every failure (malformed JSON,
a wrong Content-Type, a field out of range) gets one OpenAI-style 400 with the field named in `param`. Parsing runs
off the event loop, and a prompt whose text is provably longer than the context is refused before it is tokenised
(tokenising 8 MB takes seconds, during which /health and every stream would stall).

/docs and /redoc are off: FastAPI's pages load swagger-ui from a CDN, and the machine may be offline. /openapi.json
stays (client generators and schema fuzzers read it). "/" is a chat page (static/chat.html, one self-contained file,
as llama.cpp's server has): served without the API key, which the page asks for and sends to /v1 itself; its
Content-Security-Policy lets it load nothing from other origins.
"""

from __future__ import annotations

import hmac
import json
import logging
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse

from .protocol import (
    APIError,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from .runs import Limits, ServerState
from .serving import chat_completions, completions
from .sse import FINAL_WRITE_S, shutdown_error

log = logging.getLogger("glm5.server")

ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions")
# /metrics labels stay bounded whatever clients send: other methods and paths count as "other".
METHODS = ("GET", "POST", "HEAD", "OPTIONS", "PUT", "PATCH", "DELETE")
# JSON nested deeper than this is refused (400): no OpenAI request nests so deep, and Python's JSON reader and
# every later recursive walk (pydantic, json.dumps of tool schemas, Jinja) would otherwise hit the recursion limit.
MAX_JSON_DEPTH = 64
CHAT_PAGE = Path(__file__).parent / "static" / "chat.html"
# Everything the page needs is inline; other origins (a CDN, a tracker) are refused by the browser.
CHAT_PAGE_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
                 "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class _BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body exceeds this server's limit of {limit} bytes")


def _error_response(status: int, message: str, *, param=None, code=None, headers=None) -> JSONResponse:
    e = APIError(status, message, param=param, code=code, headers=headers)
    return JSONResponse(e.body(), status_code=status, headers=headers)


class _Gate:
    """Pure ASGI middleware (BaseHTTPMiddleware would buffer streams): counts requests by route and status, refuses
    bodies over the limit (413, by Content-Length up front or while reading a chunked body), checks the API key."""

    def __init__(self, app, state: ServerState, metrics_require_key: bool = False):
        self.app, self.state, self.metrics_require_key = app, state, metrics_require_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        st = self.state
        path, method = scope["path"], scope["method"]
        route = path if path in ROUTES else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")
        status = [500]
        started = [False]

        async def send_counted(msg):
            if msg["type"] == "http.response.start":
                status[0], started[0] = msg["status"], True
            await send(msg)

        try:
            await self._gated(scope, receive, send_counted, path)
        except anyio.get_cancelled_exc_class():
            # uvicorn cancels what still runs when the drain timeout (--drain-timeout) expires. A request that has
            # not answered yet gets a 503 it can retry elsewhere, not uvicorn's plain-text 500; streams answer for
            # themselves (sse.py). Not re-raised: this task's one job, the response, is then complete.
            if started[0]:
                raise
            status[0] = 503
            e = shutdown_error()
            with anyio.move_on_after(FINAL_WRITE_S, shield=True):
                await JSONResponse(e.body(), status_code=503, headers={"Connection": "close"})(scope, receive, send)
        except ClientDisconnect:
            # The client left while its body was being read: nobody to answer, nothing wrong with the server.
            # Counted as 499 (nginx's "client closed request", as the non-streamed answers whose client left).
            status[0] = 499
        except Exception as e:
            # Answered here, not by an app.exception_handler(Exception): Starlette re-raises after such a handler
            # and uvicorn then drops the connection, so a client's keep-alive socket would die with every 500.
            # Once a response has started (SSE streams answer their own errors, sse.py) uvicorn must close it.
            if started[0]:
                raise
            log.exception("unhandled error on %s %s", method, path)
            status[0] = 500
            await _error_response(500, f"internal server error: {type(e).__name__}: {e}",
                                  code="internal_error")(scope, receive, send)
        finally:
            st.metrics.count_http(method if method in METHODS else "other", route, status[0])

    async def _gated(self, scope, receive, send, path):
        st, limit = self.state, self.state.limits.max_body_bytes
        headers = dict(scope["headers"])
        guarded = path.startswith("/v1") or (path == "/metrics" and self.metrics_require_key)
        if st.api_key is not None and guarded:
            auth = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, key = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), st.api_key.encode()):
                resp = _error_response(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await resp(scope, receive, send)
        try:
            declared = int(headers.get(b"content-length", b"0") or 0)
        except ValueError:
            declared = 0
        if declared > limit:
            return await _error_response(413, str(_BodyTooLarge(limit).detail), code="body_too_large")(
                scope, receive, send)
        seen = [0]

        async def receive_limited():
            msg = await receive()
            if msg["type"] == "http.request":
                seen[0] += len(msg.get("body", b""))
                if seen[0] > limit:
                    raise _BodyTooLarge(limit)
            return msg

        await self.app(scope, receive_limited, send)


# Strict types (protocol.py): the expected JSON type in words, and what came instead.
_TYPE_NAMES = {"bool_type": "true or false", "int_type": "an integer", "float_type": "a number",
               "string_type": "a string", "list_type": "a list", "dict_type": "an object"}

# Union-typed fields: pydantic reports one error per alternative; one plain sentence reads better.
_UNION_HINTS = {
    "prompt": "a string, a list of strings, a list of token ids, or a list of token-id lists",
    "stop": "a string or a list of strings",
    "tool_choice": '"none", "auto", "required", or {"type": "function", "function": {"name": ...}}',
}


def _validation_message(errors: list[dict]) -> tuple[str, str | None]:
    parts, fields = [], []
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        field = loc[0] if loc else None
        if field in fields and field in _UNION_HINTS:
            continue
        fields.append(field)
        if field in _UNION_HINTS:
            parts.append(f"{field}: expected {_UNION_HINTS[field]}")
        elif e.get("type") == "finite_number":
            parts.append(f"{'.'.join(loc)}: NaN and infinity are not allowed, got {_json_or_repr(e.get('input'))}")
        elif e.get("type") in _TYPE_NAMES and "input" in e:
            parts.append(f"{'.'.join(loc)}: expected {_TYPE_NAMES[e['type']]}, got {_json_or_repr(e['input'])}")
        else:
            parts.append(f"{'.'.join(loc) or 'body'}: {e.get('msg', 'invalid')}")
    more = f" (and {len(parts) - 3} more)" if len(parts) > 3 else ""
    return "; ".join(parts[:3]) + more, fields[0] if fields else None


def _json_or_repr(x) -> str:
    try:
        text = json.dumps(x)
    except (TypeError, ValueError):
        text = repr(x)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_tree(obj) -> None:
    """Refuse what JSON can spell but nothing downstream can handle: nesting deeper than MAX_JSON_DEPTH, and lone
    UTF-16 surrogates ("\\ud800" parses to a str that cannot be encoded, so tokenising it would fail)."""
    stack = [(obj, (), 0)]  # explicit stack: the walk itself must not recurse
    while stack:
        x, path, depth = stack.pop()
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".") or "body"
        if depth > MAX_JSON_DEPTH:
            raise APIError(400, f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels",
                           param=str(path[0]) if path else None, code="invalid_json")
        if isinstance(x, dict):
            for k, v in x.items():
                stack.append((k, path, depth))  # keys are text too
                stack.append((v, (*path, k), depth + 1))
        elif isinstance(x, list):
            stack.extend((v, (*path, i), depth + 1) for i, v in enumerate(x))
        elif isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                raise APIError(400, f"{where}: a string contains a lone UTF-16 surrogate ({_json_or_repr(x)}); "
                                    f"send valid Unicode", param=str(path[0]) if path else None,
                               code="invalid_json") from None


async def _parse(request: Request, cls: type[BaseModel]):
    raw = await request.body()
    # Off the loop: json.loads, the tree walk and pydantic over megabytes take long enough to stall other clients.
    return await anyio.to_thread.run_sync(_parse_raw, raw, cls)


def _parse_raw(raw: bytes, cls: type[BaseModel]):
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, f"request body: JSON nested deeper than {MAX_JSON_DEPTH} levels",
                       code="invalid_json") from None
    if not isinstance(obj, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(obj).__name__}", code="invalid_json")
    _check_tree(obj)
    try:
        return cls.model_validate(obj)
    except ValidationError as e:
        msg, param = _validation_message(e.errors(include_url=False))
        raise APIError(400, msg, param=param, code="invalid_value") from None


def _check_prompt_size(state: ServerState, req) -> None:
    """400 for prompt text that cannot fit the context, decided without tokenising it: no token stands for more
    than `state.max_token_bytes` bytes, so text of more than (context - 1) x that many bytes is at least a
    context's worth of tokens. A lower bound only (typical text is ~4 bytes a token), so what passes is still
    checked exactly after tokenising (runs.sampling_params)."""
    per_tok, ctx = state.max_token_bytes, state.max_model_len
    if not per_tok:
        return
    limit = (ctx - 1) * per_tok

    def too_long(n_bytes: int, param: str):
        if n_bytes > limit:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, your {param} has "
                                f"{n_bytes} bytes of text, which is more than {ctx} tokens. Please shorten it.",
                           param=param, code="context_length_exceeded")

    if isinstance(req, CompletionRequest):
        texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        for t in texts:
            if isinstance(t, str):  # token-id prompts are never tokenised
                too_long(len(t.encode("utf-8")), "prompt")
        return
    total = 0
    for m in req.messages:  # every message's content is rendered into the prompt
        content = m.get("content")
        parts = [content] if isinstance(content, str) else content if isinstance(content, list) else []
        for part in parts:
            text = part if isinstance(part, str) else part.get("text") if isinstance(part, dict) else None
            if isinstance(text, str):
                total += len(text.encode("utf-8"))
    too_long(total, "messages")


def _openapi(app: FastAPI, model_name: str) -> dict:
    """FastAPI's schema made to say what the server does, so a client generator or a schema fuzzer (schemathesis)
    can rely on it: the generation routes read their bodies themselves (see _parse), so their pydantic request and
    response models are added here; every route lists the errors it can answer (validation is a 400 here, never
    FastAPI's 422; the API key's 401; a 500 from anywhere); /metrics is text; `model` names the one served model."""
    from fastapi.openapi.utils import get_openapi

    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    comps = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422 body, which this server never sends
        comps.pop(name, None)

    def ref(cls: type[BaseModel], mode: str) -> dict:
        s = cls.model_json_schema(ref_template="#/components/schemas/{model}", mode=mode)
        comps.update(s.pop("$defs", {}))
        comps[cls.__name__] = s
        return {"$ref": f"#/components/schemas/{cls.__name__}"}

    def json_body(cls: type[BaseModel], description: str) -> dict:
        return {"description": description, "content": {"application/json": {"schema": ref(cls, "serialization")}}}

    error = json_body(ErrorResponse, "OpenAI-style error")

    def errors(*codes: int) -> dict:
        return {str(c): error for c in codes}

    paths = schema["paths"]
    paths["/health"]["get"]["responses"] = {"200": {"description": "The engine thread runs", "content": {
        "application/json": {"schema": {"type": "object", "required": ["status", "model"], "properties": {
            "status": {"const": "ok"}, "model": {"type": "string"}}}}}}, **errors(500, 503)}
    paths["/metrics"]["get"]["responses"] = {"200": {"description": "Prometheus text format 0.0.4", "content": {
        "text/plain": {"schema": {"type": "string"}}}}, **errors(401, 500)}
    paths["/v1/models"]["get"]["responses"] = {"200": json_body(ModelList, "The served model"), **errors(401, 500)}
    paths["/v1/models/{model_id}"]["get"]["responses"] = {"200": json_body(ModelCard, "The served model"),
                                                          **errors(400, 401, 404, 500)}

    def events(chunk: type[BaseModel]) -> dict:
        # One server-sent event, as OpenAPI before 3.2 describes a text/event-stream (`schema` covers one event):
        # its data is a chunk or an error body as JSON, or the closing "[DONE]".
        json_data = {"type": "string", "contentMediaType": "application/json", "contentSchema": {
            "anyOf": [ref(chunk, "serialization"), ref(ErrorResponse, "serialization")]}}
        return {"type": "object", "required": ["data"], "properties": {
            "data": {"anyOf": [{"const": "[DONE]"}, json_data]}, "event": {"type": "string"}}}

    for path, req, resp, chunk in (("/v1/chat/completions", ChatCompletionRequest, ChatCompletion,
                                    ChatCompletionChunk),
                                   ("/v1/completions", CompletionRequest, Completion, Completion)):
        op = paths[path]["post"]
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref(req, "validation")}}}
        comps[req.__name__]["properties"]["model"] = {
            "anyOf": [{"const": model_name}, {"type": "null"}], "default": None,
            "description": "The served model (see /v1/models); another name is a 404."}
        op["responses"] = {
            "200": {"description": "The completion; with `stream: true`, server-sent events of chunks ending in "
                                   "`data: [DONE]`",
                    "content": {"application/json": {"schema": ref(resp, "serialization")},
                                "text/event-stream": {"schema": events(chunk)}}},
            **errors(400, 401, 404, 413, 429, 500, 503)}
    app.openapi_schema = schema
    return schema


def create_app(engine_or_model=None, *, tokenizer=None, model_name: str | None = None, api_key: str | None = None,
               limits: Limits | None = None, cache_bytes: int | None = None, max_num_seqs: int = 64,
               max_num_batched_tokens: int = 2048, device: str = "cpu", tokenizer_dir: str | Path | None = None,
               sampling: dict | None = None, metrics_require_key: bool = False) -> FastAPI:
    """engine_or_model: an Engine (or any object with its add_request / step / abort / has_unfinished / stats /
    max_model_len), a GLM5 model, a preset name, a checkpoint directory, or None for the default model (see
    glm5.loader.load). tokenizer: needed with an Engine or a model (default: the shipped one).
    sampling: defaults for what a request leaves unset (temperature, top_p, top_k; default: a loaded checkpoint's
    generation_config.json, else OpenAI's). metrics_require_key: /metrics needs the API key too (scrapers such as
    Prometheus can send a bearer token); off by default so existing scrapers keep working."""
    from ..loader import load
    from .launch import build_engine

    if hasattr(engine_or_model, "add_request"):
        engine = engine_or_model
        tok = tokenizer if tokenizer is not None else _default_tokenizer()
        name = model_name or "glm5"
    else:
        if engine_or_model is None or isinstance(engine_or_model, (str, Path)):
            loaded = load(engine_or_model, tokenizer_dir=tokenizer_dir, device=device)
            model, tok, name = loaded.model, loaded.tokenizer, model_name or loaded.name
            sampling = loaded.sampling if sampling is None else sampling
        else:
            model, tok = engine_or_model, tokenizer if tokenizer is not None else _default_tokenizer()
            name = model_name or "glm5"
        engine = build_engine(model, tok, cache_bytes=cache_bytes, max_num_seqs=max_num_seqs,
                              max_num_batched_tokens=max_num_batched_tokens)
    state = ServerState(engine, tok, name, limits or Limits(), api_key, sampling)

    @asynccontextmanager
    async def lifespan(app):
        state.worker.start()
        yield
        # Off the loop: joining the engine thread blocks, and the streams cancelled at the drain timeout are still
        # writing their final events.
        await anyio.to_thread.run_sync(state.worker.stop)

    app = FastAPI(title="glm5", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.glm5 = state
    app.add_middleware(_Gate, state=state, metrics_require_key=metrics_require_key)
    app.openapi = lambda: _openapi(app, state.model_name)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        msg = {404: f"no route {request.method} {request.url.path}",
               405: f"method {request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        code = "body_too_large" if isinstance(e, _BodyTooLarge) else None
        return _error_response(e.status_code, msg, code=code, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        msg, param = _validation_message(list(e.errors()))
        return _error_response(400, msg, param=param, code="invalid_value")

    chat_page = CHAT_PAGE.read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False)
    async def page():
        return HTMLResponse(chat_page, headers={"Content-Security-Policy": CHAT_PAGE_CSP,
                                                "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"})

    @app.get("/health")
    async def health():
        if not state.worker.alive:
            return _error_response(503, "the engine thread is not running", code="engine_down")
        return {"status": "ok", "model": state.model_name}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.metrics.render(state.worker.stats, state.worker),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    def card() -> ModelCard:
        return ModelCard(id=state.model_name, created=state.created, max_model_len=state.max_model_len)

    @app.get("/v1/models")
    async def models():
        return ModelList(data=[card()]).dump()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        state.check_model(model_id)
        return card().dump()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await _parse(request, ChatCompletionRequest)
        _check_prompt_size(state, req)
        return await chat_completions(state, req, request)

    @app.post("/v1/completions")
    async def complete(request: Request):
        req = await _parse(request, CompletionRequest)
        _check_prompt_size(state, req)
        return await completions(state, req, request)

    return app


def _default_tokenizer():
    from ..tokenizer import Tokenizer

    return Tokenizer.default()
