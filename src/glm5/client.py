"""Chat and completion backends for the terminal commands (`glm5 chat`, `glm5 generate`): the same streamed deltas
from a model run in this process (`LocalBackend`: the engine driven directly, no HTTP) or from a server
(`RemoteBackend`: the OpenAI API over plain urllib, so the client side needs no extra package). `find_server` tells
whether a glm5 server answers at a URL, so the commands can use one that already runs.

Both yield chat deltas as the server streams them: {"reasoning_content": s} | {"content": s} | {"tool_calls": [...]},
and plain text pieces for raw completions; `last_finish_reason` / `last_usage` describe the last call.

max_tokens is a budget, not a demand: where the prompt leaves less room in the context (or a server allows fewer),
the answer is cut there rather than refused, so a long chat ends at the context instead of in an error.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

from .chat import render_chat
from .chat_parse import StreamingParser
from .engine import SamplingParams, run_to_completion
from .loader import with_openai_defaults
from .server.outputs import SampleText, text_of

DEFAULT_URL = "http://127.0.0.1:8000"  # where `glm5 serve` listens by default


def find_server(url: str = DEFAULT_URL, timeout: float = 0.3) -> dict | None:
    """The /health answer of a glm5 server at url ({"status": "ok", "model": ...}), or None if none answers in time.
    The timeout is short: on this machine a live server answers in milliseconds, and a missing one refuses at once."""
    try:
        with urllib.request.urlopen(url.rstrip("/").removesuffix("/v1") + "/health", timeout=timeout) as resp:
            body = json.loads(resp.read())
    except (OSError, ValueError):
        return None
    return body if isinstance(body, dict) and body.get("status") == "ok" and "model" in body else None


class LocalBackend:
    def __init__(self, engine, tokenizer, sampling: dict | None = None):
        self.engine, self.tok = engine, tokenizer
        self.sampling = with_openai_defaults(sampling)  # where a call leaves a value unset (None)
        self.last_finish_reason: str | None = None
        self.last_usage: dict | None = None

    def _params(self, max_tokens, temperature, top_p, seed, stop) -> SamplingParams:
        d = self.sampling
        return SamplingParams(temperature=d["temperature"] if temperature is None else temperature,
                              top_p=d["top_p"] if top_p is None else top_p, top_k=d["top_k"], seed=seed,
                              stop=list(stop or []), max_tokens=max_tokens or None)

    def _run(self, prompt: list[int], params: SamplingParams, on_text) -> Iterator:
        room = self.engine.max_model_len - len(prompt)
        if params.max_tokens is not None and room >= 1:
            params.max_tokens = min(params.max_tokens, room)
        sample = SampleText(self.tok, params.stop)
        run = run_to_completion(self.engine, [prompt], params)
        try:  # closing this generator (Ctrl-C) closes `run`, which aborts the request and frees its cache at once
            for _, o in run:
                pieces, _ = sample.push(o)  # (text, is_special): the chat parser reads tags only from special tokens
                yield from on_text(pieces, o.finished)
        finally:
            run.close()
        self.last_finish_reason = sample.finish_reason
        self.last_usage = {"prompt_tokens": len(prompt), "completion_tokens": sample.num_generated}

    def chat(self, messages: list[dict], *, thinking: bool = True, max_tokens: int | None = None,
             temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
             tools=None) -> Iterator[dict]:
        r = render_chat(self.tok, messages, tools, enable_thinking=thinking)
        parser = StreamingParser(thinking=r.thinking, tools=tools, parse_tools=bool(tools))

        def on_text(pieces, finished):
            out = parser.feed(pieces) if pieces else []
            return out + (parser.finish() if finished else [])

        yield from self._run(r.ids, self._params(max_tokens, temperature, top_p, seed, None), on_text)

    def complete(self, prompt: str, *, max_tokens: int | None = None, temperature: float | None = None,
                 top_p: float | None = None, seed: int | None = None, stop=None) -> Iterator[str]:
        ids = self.tok.encode(prompt, allow_special=True)
        yield from self._run(ids, self._params(max_tokens, temperature, top_p, seed, stop),
                             lambda pieces, finished: [text_of(pieces)] if pieces else [])


class RemoteError(RuntimeError):
    def __init__(self, message: str, status: int | None = None, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


# The server's answers to a max_tokens larger than it allows (glm5.server.runs.sampling_params).
_TOO_MANY_TOKENS = ("context_length_exceeded", "max_tokens_exceeded")


class RemoteBackend:
    def __init__(self, url: str, api_key: str | None = None, model: str | None = None, timeout: float = 600.0):
        self.base = url.rstrip("/")
        if not self.base.endswith("/v1"):
            self.base += "/v1"
        self.api_key, self.timeout = api_key, timeout
        card = self._get("/models")["data"][0]
        self.model = model or card["id"]
        self.max_model_len: int | None = card.get("max_model_len")
        self.last_finish_reason: str | None = None
        self.last_usage: dict | None = None

    def _request(self, path: str, body: dict | None = None):
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, headers=headers)
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            try:
                err = json.loads(e.read())["error"]
            except Exception:
                err = {"message": e.reason}
            raise RemoteError(f"{self.base}{path}: HTTP {e.code}: {err.get('message')}", e.code, err.get("code"),
                              err.get("param")) from None
        except urllib.error.URLError as e:
            raise RemoteError(f"{self.base}{path}: cannot connect ({e.reason})") from None

    def _get(self, path: str) -> dict:
        with self._request(path) as resp:
            return json.loads(resp.read())

    def _open_stream(self, path: str, body: dict):
        body = dict(body, model=self.model, stream=True, stream_options={"include_usage": True})
        try:
            return self._request(path, body)
        except RemoteError as e:
            if e.status != 400 or e.param != "max_tokens" or e.code not in _TOO_MANY_TOKENS:
                raise
        # max_tokens null: the server's own limit, min(its --max-tokens, what the context leaves)
        return self._request(path, dict(body, max_tokens=None))

    def _events(self, path: str, body: dict) -> Iterator[dict]:
        with self._open_stream(path, body) as resp:
            for raw in resp:
                line = raw.decode("utf-8").rstrip("\r\n")
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                ev = json.loads(data)
                if "error" in ev:
                    raise RemoteError(ev["error"].get("message", str(ev["error"])))
                if ev.get("usage"):
                    self.last_usage = ev["usage"]
                for ch in ev.get("choices", ()):
                    if ch.get("finish_reason"):
                        self.last_finish_reason = ch["finish_reason"]
                    yield ch

    @staticmethod
    def _sampling(max_tokens, temperature, top_p, seed) -> dict:
        body = {k: v for k, v in (("temperature", temperature), ("top_p", top_p)) if v is not None}  # else: the server's
        if max_tokens:
            body["max_tokens"] = max_tokens
        if seed is not None:
            body["seed"] = seed
        return body

    def chat(self, messages: list[dict], *, thinking: bool = True, max_tokens: int | None = None,
             temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
             tools=None) -> Iterator[dict]:
        body = {"messages": messages, "chat_template_kwargs": {"enable_thinking": thinking},
                **self._sampling(max_tokens, temperature, top_p, seed)}
        if tools:
            body["tools"] = tools
        for ch in self._events("/chat/completions", body):
            d = ch.get("delta") or {}
            for k in ("reasoning_content", "content", "tool_calls"):
                if d.get(k):
                    yield {k: d[k]}

    def complete(self, prompt: str, *, max_tokens: int | None = None, temperature: float | None = None,
                 top_p: float | None = None, seed: int | None = None, stop=None) -> Iterator[str]:
        body = {"prompt": prompt, **self._sampling(max_tokens, temperature, top_p, seed)}
        if stop:
            body["stop"] = list(stop)
        for ch in self._events("/completions", body):
            if ch.get("text"):
                yield ch["text"]
