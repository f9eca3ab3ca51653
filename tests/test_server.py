"""The HTTP server under load and abuse: 64 concurrent streams, disconnecting clients (no running requests, no
cache blocks left), bad requests (OpenAI-style 4xx bodies, server keeps serving), limits (413, 429 +
Retry-After, max_tokens cap, context), API key, engine failure (500, then recovery), metrics, SIGTERM drain.
"""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from glm5.server import Limits

from .server_util import TOK, ScriptedEngine, idle, script, start, tiny_engine, wait_for

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def live():
    eng = tiny_engine()
    srv = start(eng, limits=Limits(max_body_bytes=1 << 20, max_tokens=2000))
    yield srv, eng
    srv.stop()


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def _still_serving(srv):
    r = httpx.post(srv.url + CHAT, json={"messages": USER, "max_tokens": 2}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


# ------------------------------------------------------------------------------------------------- bad requests
def test_bad_requests_get_openai_errors(live):
    srv, eng = live
    c = httpx.Client(base_url=srv.url, timeout=30)
    e = _error(c.post(CHAT, content=b'{"messages": [', headers={"content-type": "application/json"}), 400)
    assert e["type"] == "invalid_request_error" and e["code"] == "invalid_json"
    _error(c.post(CHAT, content=b"[1, 2]"), 400)
    e = _error(c.post(CHAT, json={"model": "gpt-4", "messages": USER}), 404)
    assert e["code"] == "model_not_found" and e["param"] == "model"
    e = _error(c.post(CHAT, json={"messages": USER, "max_tokens": -5}), 400)
    assert e["param"] == "max_tokens"
    e = _error(c.post("/v1/completions", json={"prompt": "x", "max_tokens": 0}), 400)
    assert e["param"] == "max_tokens"
    e = _error(c.post(CHAT, json={"messages": "hello"}), 400)
    assert e["param"] == "messages"
    e = _error(c.post(CHAT, json={"messages": [{"role": "wizard", "content": "x"}]}), 400)
    assert e["param"] == "messages"
    _error(c.post(CHAT, json={"messages": USER, "temperature": -1}), 400)
    _error(c.post(CHAT, json={"messages": USER, "top_logprobs": 2}), 400)  # without logprobs: true
    _error(c.post(CHAT, json={"messages": USER, "min_tokens": 9, "max_tokens": 3}), 400)
    _error(c.post(CHAT, json={"messages": USER, "stop": [""]}), 400)
    _error(c.post(CHAT, json={"messages": USER, "tool_choice": "auto"}), 400)  # no tools
    _error(c.post("/v1/completions", json={"prompt": [TOK.vocab_size + 5]}), 400)  # not a token id
    e = _error(c.post("/v1/completions", json={"prompt": ["a", [1, 2]]}), 400)  # mixed: not an OpenAI shape
    assert e["param"] == "prompt" and e["message"].startswith("prompt: expected a string")
    _error(c.get("/v1/nothing"), 404)
    _error(c.get(CHAT), 405)
    assert idle(eng)
    _still_serving(srv)


def test_context_and_max_tokens_limits(live):
    srv, eng = live
    c = httpx.Client(base_url=srv.url, timeout=30)
    ctx = eng.max_model_len
    e = _error(c.post("/v1/completions", json={"prompt": [5] * (ctx + 10)}), 400)
    assert e["code"] == "context_length_exceeded" and str(ctx) in e["message"]
    long_text = "word " * (ctx + 100)
    e = _error(c.post(CHAT, json={"messages": [{"role": "user", "content": long_text}]}), 400)
    assert e["code"] == "context_length_exceeded" and e["param"] == "messages"
    e = _error(c.post("/v1/completions", json={"prompt": [5] * (ctx - 10), "max_tokens": 100}), 400)
    assert e["code"] == "context_length_exceeded"
    e = _error(c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2001}), 400)  # the server's cap
    assert e["code"] == "max_tokens_exceeded"
    assert idle(eng)
    _still_serving(srv)


def test_body_limit(live):
    srv, _ = live
    c = httpx.Client(base_url=srv.url, timeout=30)
    big = json.dumps({"messages": [{"role": "user", "content": "x" * (2 << 20)}]}).encode()
    e = _error(c.post(CHAT, content=big, headers={"content-type": "application/json"}), 413)
    assert e["code"] == "body_too_large"

    def chunks():  # no Content-Length: the limit applies while reading
        for _ in range(40):
            yield b"x" * (64 << 10)

    _error(c.post(CHAT, content=chunks()), 413)
    _still_serving(srv)


# ---------------------------------------------------------------------------------------------------- concurrency
def test_64_concurrent_streams(live):
    srv, eng = live

    async def one(client, i):
        stream = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"client {i} says hi"}], max_tokens=12,
            temperature=1.0, seed=i, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True})
        finish, usage = None, None
        async for ch in stream:
            usage = ch.usage or usage
            for c in ch.choices:
                finish = c.finish_reason or finish
        return finish, usage.completion_tokens

    async def main():
        client = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)
        try:
            return await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(64))), 120)
        finally:
            await client.close()

    results = asyncio.run(main())
    assert results == [("length", 12)] * 64
    wait_for(lambda: idle(eng), what="an idle engine")
    assert srv.app.state.glm5.metrics.in_flight == 0
    assert not any(status >= 500 for (_, _, status) in srv.app.state.glm5.metrics.http)


class Throttle:
    """Stands in for the engine's step while installed: the real step runs only while `allowed` > 0 (counting
    down); otherwise it waits a moment and returns nothing, and the worker thread goes on applying adds and
    aborts between steps. The test, not the machine's speed, decides how far a request gets: a 900-token
    request cannot finish before its client has gone."""

    def __init__(self, engine, allowed: int = 0):
        self.engine, self.step, self.allowed = engine, engine.step, allowed

    def __call__(self):
        if self.allowed <= 0:
            time.sleep(0.005)
            return []
        self.allowed -= 1
        return self.step()

    def __enter__(self):
        self.engine.step = self
        return self

    def __exit__(self, *exc):
        del self.engine.step  # the class's step again


def _aborted(eng) -> int:
    return eng.stats()["aborted_requests"]


def test_disconnects_free_everything(live):
    srv, eng = live
    body = {"messages": USER, "max_tokens": 900, "stream": True, "ignore_eos": True}
    statuses = []

    def stream_then_drop(n_lines):
        with httpx.Client(base_url=srv.url, timeout=30) as c, c.stream("POST", CHAT, json=body) as r:
            statuses.append(r.status_code)
            for i, _ in enumerate(r.iter_lines()):
                if i >= n_lines:
                    break  # leaving the block closes the connection mid-stream

    aborted, finished = _aborted(eng), eng.stats()["finished_requests"]
    with Throttle(eng) as throttle:
        threads = [threading.Thread(target=stream_then_drop, args=(k % 3 * 4,)) for k in range(8)]
        for t in threads:
            t.start()
        # the server answers 200 once the request is in the engine, so after 8 answers all 8 are in
        wait_for(lambda: len(statuses) == 8, what="8 answers")
        throttle.allowed = 100  # each client reads at most 8 lines (a few tokens) of its 900 and leaves
        for t in threads:
            t.join(30)
        assert statuses == [200] * 8 and not any(t.is_alive() for t in threads)
        wait_for(lambda: _aborted(eng) == aborted + 8 and idle(eng), what="8 aborts, their blocks freed")
    assert eng.stats()["finished_requests"] == finished
    # A non-streaming client that leaves while its request is in the engine is aborted too.
    url = httpx.URL(srv.url)
    raw = json.dumps({"messages": USER, "max_tokens": 900, "ignore_eos": True}).encode()
    with Throttle(eng), socket.create_connection((url.host, url.port)) as sock:
        sock.sendall(b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(raw)).encode() + b"\r\n\r\n" + raw)
        wait_for(lambda: eng.stats()["num_requests"] == 1, what="the request in the engine")
        sock.close()
        wait_for(lambda: _aborted(eng) == aborted + 9 and idle(eng), what="the dropped request's abort")
    wait_for(lambda: srv.app.state.glm5.metrics.in_flight == 0, what="no request in flight")
    assert eng.stats()["finished_requests"] == finished
    _still_serving(srv)


def test_queue_full_gives_429(live):
    srv, eng = live
    state = srv.app.state.glm5
    old = state.max_in_flight
    state.max_in_flight = 1
    aborted = _aborted(eng)
    try:
        with Throttle(eng, allowed=50), httpx.Client(base_url=srv.url, timeout=30) as c:
            with c.stream("POST", CHAT, json={"messages": USER, "max_tokens": 900, "stream": True,
                                              "ignore_eos": True}) as r:
                lines = r.iter_lines()  # held: a dropped iterator closes the stream (a disconnect)
                next(lines)
                busy = c.post(CHAT, json={"messages": USER, "max_tokens": 2})
                e = _error(busy, 429)
                assert e["type"] == "rate_limit_error" and busy.headers["retry-after"] == "1"
            wait_for(lambda: _aborted(eng) == aborted + 1 and idle(eng), what="the dropped stream's abort")
    finally:
        state.max_in_flight = old
    _still_serving(srv)


# ------------------------------------------------------------------------------------------------- other servers
def test_api_key_engine_failure_and_metrics():
    eng = ScriptedEngine(script("</think>fine"))
    srv = start(eng, api_key="sekrit")
    try:
        c = httpx.Client(base_url=srv.url, timeout=30)
        assert c.get("/health").status_code == 200  # health and metrics stay open
        e = _error(c.post(CHAT, json={"messages": USER}), 401)
        assert e["code"] == "invalid_api_key"
        _error(c.post(CHAT, json={"messages": USER}, headers={"Authorization": "Bearer wrong"}), 401)
        auth = {"Authorization": "Bearer sekrit"}
        assert c.get("/v1/models", headers=auth).json()["data"][0]["id"] == "tiny"
        ok = c.post(CHAT, json={"messages": USER}, headers=auth)
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "fine"
        eng.fail_next_step = True
        e = _error(c.post(CHAT, json={"messages": USER}, headers=auth), 500)
        assert e["code"] == "engine_failure" and "scripted failure" in e["message"]
        eng.fail_next_step = True
        with c.stream("POST", CHAT, json={"messages": USER, "stream": True}, headers=auth) as r:
            events = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "engine_failure"
        assert c.post(CHAT, json={"messages": USER}, headers=auth).status_code == 200  # recovered
        text = c.get("/metrics").text
        for name in ("glm5_http_requests_total", "glm5_time_to_first_token_seconds_bucket",
                     "glm5_inter_token_latency_seconds_count", "glm5_e2e_request_latency_seconds_sum",
                     "glm5_num_requests_waiting", "glm5_kv_cache_usage_ratio", "glm5_prompt_tokens_total"):
            assert name in text
        assert 'glm5_http_requests_total{method="POST",route="/v1/chat/completions",status="401"} 2' in text
        assert "glm5_engine_step_failures_total 2" in text
        ttft_count = [ln for ln in text.splitlines() if ln.startswith("glm5_time_to_first_token_seconds_count")]
        assert ttft_count == ["glm5_time_to_first_token_seconds_count 2"]  # the two requests that succeeded
    finally:
        srv.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains():
    """SIGTERM: the stream in flight finishes in full, new connections are refused, the process exits 0."""
    port = _free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "glm5.server.cli", "serve", "--model", "tiny", "--port", str(port),
                             "--threads", "1", "--log-level", "warning"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _health(url) or proc.poll() is not None, timeout=60, what="the server to start")
        assert proc.poll() is None, proc.stdout.read().decode()
        events: list[str] = []
        with httpx.Client(base_url=url, timeout=60) as c, c.stream(
                "POST", CHAT, json={"messages": USER, "max_tokens": 250, "ignore_eos": True, "stream": True,
                                    "stream_options": {"include_usage": True}}) as r:
            lines = r.iter_lines()
            events.append(next(lines))
            proc.send_signal(signal.SIGTERM)
            wait_for(lambda: not _accepts(port), timeout=10, what="the listener to close")
            events += list(lines)
        data = [e[6:] for e in events if e.startswith("data: ")]
        assert data[-1] == "[DONE]"
        assert json.loads(data[-2])["usage"]["completion_tokens"] == 250
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _accepts(port) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True
    except OSError:
        return False


def _health(url) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


# ------------------------------------------------------------------------------------------------------------ CLI
def test_cli_generate_local_equals_remote(live, capsys):
    from glm5.server.cli import main

    srv, _ = live
    args = ["generate", "Once upon a time", "--max-tokens", "8", "--temperature", "0", "--raw"]
    assert main(args + ["--model", "tiny"]) == 0
    local = capsys.readouterr()
    assert main(args + ["--url", srv.url]) == 0
    remote = capsys.readouterr()
    # Same preset, same seed: the same weights; greedy: the same text, in-process and over HTTP.
    assert local.out == remote.out and local.out.strip()
    assert "UNTRAINED" in local.err and "length" in local.err
    assert main(["generate", "hi", "--max-tokens", "4", "--url", srv.url]) == 0  # chat mode: reasoning on stderr
    out = capsys.readouterr()
    assert out.err.strip() and "length" in out.err


def test_cli_chat(monkeypatch, capsys):
    from glm5.server.cli import main

    lines = iter(["hello", "/think off", "again", "/reset", "/bogus", "bye"])

    def fake_input(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    assert main(["chat", "--model", "tiny", "--max-tokens", "4", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert "(thinking off)" in out and "(conversation cleared)" in out and out.count("/reset clears") == 2


# ------------------------------------------------------------------------------------- the model's sampling defaults
def test_generation_config_sets_the_defaults_a_request_leaves_unset(tmp_path):
    from glm5.config import ConfigError
    from glm5.loader import sampling_defaults

    assert sampling_defaults(tmp_path) == {}  # no file: OpenAI's defaults apply
    f = tmp_path / "generation_config.json"
    f.write_text(json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 40, "max_length": 9}))
    assert sampling_defaults(tmp_path) == {"temperature": 0.6, "top_p": 0.95, "top_k": 40}
    f.write_text(json.dumps({"do_sample": False, "temperature": 0.6}))  # transformers: greedy, temperature unused
    assert sampling_defaults(tmp_path) == {"temperature": 0.0}
    for bad in ("{", "[1]", '{"temperature": "hot"}', '{"top_k": 2.5}', '{"top_p": -1}'):
        f.write_text(bad)
        with pytest.raises(ConfigError, match="generation_config.json"):
            sampling_defaults(tmp_path)

    seen = []

    class Recording(ScriptedEngine):
        def add_request(self, prompt, params, request_id):
            seen.append(params)
            return super().add_request(prompt, params, request_id)

    srv = start(Recording(script("hi")), sampling={"temperature": 0.0, "top_p": 0.9, "top_k": 5})
    try:
        c = httpx.Client(base_url=srv.url, timeout=30)
        assert c.post(CHAT, json={"messages": USER}).status_code == 200
        assert c.post(CHAT, json={"messages": USER, "temperature": 0.7, "top_p": 1, "top_k": 0}).status_code == 200
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
    finally:
        srv.stop()
    got = [(p.temperature, p.top_p, p.top_k) for p in seen]
    assert got == [(0.0, 0.9, 5), (0.7, 1.0, 0), (0.0, 0.9, 5)], got
