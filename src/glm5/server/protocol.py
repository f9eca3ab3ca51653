"""OpenAI wire schemas (pydantic): requests the server accepts, responses and stream chunks it sends, error bodies.

Requests follow OpenAI's chat-completions and completions APIs plus vLLM's sampling extensions (`top_k`, `min_p`,
`min_tokens`, `ignore_eos`, `stop_token_ids`, `chat_template_kwargs`). Unknown fields are ignored, as vLLM does
(clients send provider-specific extras such as `metadata`); wrong types and out-of-range values are 400s. Types are
strict, as OpenAI's are: `"stream": "yes"`, `"max_tokens": true` or `"n": 1.5` is refused, not coerced; an integer
is accepted for a float. NaN and infinity are refused for every number (Python's JSON reader accepts `NaN`, and
`1e999` reads as infinity).

Responses are serialised with `exclude_unset=True`, and every field counts as set except those a class lists in
`_omit_unset`: those appear only when the code set them (a stream delta carries only the keys that changed; a
message has `tool_calls` only when there are some), while the rest always appear, an unset None as JSON null
(OpenAI sends `"content": null`, `"finish_reason": null`).
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 128
MAX_TOP_LOGPROBS = 20


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")
    _omit_unset: ClassVar[frozenset[str]] = frozenset()

    def model_post_init(self, context: Any) -> None:
        self.__pydantic_fields_set__.update(k for k in type(self).model_fields if k not in self._omit_unset)

    def dump(self) -> dict:
        return self.model_dump(mode="json", exclude_unset=True)

    def dump_json(self) -> str:
        return self.model_dump_json(exclude_unset=True)


# ------------------------------------------------------------------------------------------------------- requests
class StreamOptions(_Request):
    include_usage: bool = False


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class FunctionName(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"] = "function"
    function: FunctionName


class _Sampling(_Request):
    """Fields both endpoints share. None means "the default": the model's generation_config.json where it has one
    (the shipped model: greedy), else OpenAI's (temperature 1, top_p 1)."""

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0, le=100)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=-(1 << 63), lt=1 << 64)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extensions
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)


class ChatCompletionRequest(_Sampling):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name; wins over max_tokens
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for this endpoint
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)


# ------------------------------------------------------------------------------------------------------ responses
class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Response):
    content: list[TokenLogprob] | None = None


class CompletionLogprobs(_Response):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int]


class FunctionCall(_Response):
    name: str | None = None
    arguments: str | None = None


class ToolCall(_Response):
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCall
    index: int | None = None  # stream deltas only
    _omit_unset = frozenset({"index"})


class ChatMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning: str | None = None  # current vLLM's name; reasoning_content (same text) for older clients
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None
    _omit_unset = frozenset({"tool_calls"})


class ChatChoice(_Response):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletion(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ChatDelta(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning: str | None = None  # as in ChatMessage
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None
    _omit_unset = frozenset({"role", "content", "reasoning", "reasoning_content", "tool_calls"})


class ChatChunkChoice(_Response):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    _omit_unset = frozenset({"usage"})  # only with stream_options.include_usage


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    _omit_unset = frozenset({"usage"})  # stream chunks: only with stream_options.include_usage


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "glm5"
    max_model_len: int | None = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --------------------------------------------------------------------------------------------------------- errors
class ErrorInfo(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Response):
    error: ErrorInfo


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
               422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}


class APIError(Exception):
    """An error the server answers with an OpenAI-style body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers

    def body(self) -> dict:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param,
                                             code=self.code)).dump()
