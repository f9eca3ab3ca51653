"""Hostile and broken requests: bodies that used to raise 500s are 400s naming the field; an exception inside a
stream ends it with an error event and [DONE], and so does a server shutdown whose drain timeout expires; a 500
keeps the client's keep-alive connection; /metrics labels stay bounded and can need the API key; /openapi.json
carries the real request and response schemas.
"""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading

import httpx
import pytest

from glm5.cli import main as glm5_main
from glm5.server import BackgroundServer, create_app, serving

from .server_util import TOK, ScriptedEngine, idle, script, start, tiny_engine, wait_for

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def live():
    srv = start(tiny_engine())
    yield srv
    srv.stop()


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def _tool(fn) -> dict:
    return {"messages": USER, "max_tokens": 2, "tools": [{"type": "function", "function": fn}]}


# ------------------------------------------------------------------------------------------------ 400, not 500
@pytest.mark.parametrize("fn, field", [
    ("get_weather", "tools[0].function"),
    ({"name": "f", "parameters": "x"}, "tools[0].function.parameters"),
    ({"name": "f", "parameters": [1]}, "tools[0].function.parameters"),
    ({"name": "f", "parameters": {"type": "object", "properties": ["a", "b"]}},
     "tools[0].function.parameters.properties"),
])
def test_malformed_tools_are_400s_naming_the_field(live, fn, field):
    e = _error(httpx.post(live.url + CHAT, json=_tool(fn), timeout=30), 400)
    assert e["param"] == "tools" and e["message"].startswith(field + ":"), e


def test_lone_surrogate_is_a_400(live):
    c = httpx.Client(base_url=live.url, timeout=30)
    body = b'{"messages": [{"role": "user", "content": "a\\ud800b"}], "max_tokens": 2}'
    e = _error(c.post(CHAT, content=body, headers={"content-type": "application/json"}), 400)
    assert e["param"] == "messages" and "messages[0].content" in e["message"] and "surrogate" in e["message"]
    e = _error(c.post("/v1/completions", content=b'{"prompt": ["ok", "\\udfff"], "max_tokens": 2}'), 400)
    assert e["param"] == "prompt" and "prompt[1]" in e["message"]
    assert c.post(CHAT, json={"messages": USER, "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("depth", [100, 10_000])
def test_deeply_nested_json_is_a_400(live, depth):
    deep = b"[" * depth + b"]" * depth
    body = b'{"messages": [{"role": "user", "content": "hi", "extra": ' + deep + b'}], "max_tokens": 2}'
    e = _error(httpx.post(live.url + CHAT, content=body, timeout=30), 400)
    assert e["code"] == "invalid_json" and "nested deeper" in e["message"]


# ----------------------------------------------------------------------------------- failures keep connections
def test_exception_inside_a_stream_ends_with_error_event_and_done(monkeypatch):
    srv = start(ScriptedEngine(script("</think>hello there")))
    try:
        def boom(d):
            raise RuntimeError("delta exploded")
        monkeypatch.setattr(serving, "_delta", boom)
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            with c.stream("POST", CHAT, json={"messages": USER, "stream": True}) as r:
                assert r.status_code == 200
                events = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
            assert events[-1] == "[DONE]", events
            err = json.loads(events[-2])["error"]
            assert err["code"] == "internal_error" and "delta exploded" in err["message"]
            monkeypatch.undo()
            assert c.post(CHAT, json={"messages": USER}).status_code == 200
    finally:
        srv.stop()


def test_500_keeps_the_keep_alive_connection(monkeypatch):
    srv = start(ScriptedEngine(script("</think>fine")))
    try:
        def boom(*a):
            raise RuntimeError("usage exploded")
        monkeypatch.setattr(serving, "_usage", boom)
        conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
        body = json.dumps({"messages": USER})
        conn.request("POST", CHAT, body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        err = json.loads(r.read())["error"]
        assert r.status == 500 and err["code"] == "internal_error" and "usage exploded" in err["message"]
        assert not r.will_close, "the server closed the connection after a 500"
        sock = conn.sock
        monkeypatch.undo()
        conn.request("POST", CHAT, body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())["choices"][0]["message"]["content"] == "fine"
        assert conn.sock is sock  # the same connection served both
        conn.close()
    finally:
        srv.stop()


def test_client_gone_mid_body_is_no_server_error(caplog):
    """A client that announces a body and leaves after a few bytes: counted as 499, no 500, no traceback logged."""
    srv = start(ScriptedEngine(script("</think>x")))
    try:
        with socket.create_connection((srv.host, srv.port)) as s:
            s.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      f"Content-Length: 100000\r\n\r\n".encode() + b'{"messages"')
        c = httpx.Client(base_url=srv.url, timeout=30)
        line = 'glm5_http_requests_total{method="POST",route="/v1/chat/completions",status="499"} 1'
        wait_for(lambda: line in c.get("/metrics").text, what="the abandoned request to be counted")
        assert 'status="500"' not in c.get("/metrics").text
        assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text
        assert c.post(CHAT, json={"messages": USER}).status_code == 200
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------------ drain timeout expiry
def _shutdown_error(events: list[str]) -> dict:
    data = [e[6:] for e in events if e.startswith("data: ")]
    assert data[-1] == "[DONE]", data[-3:]
    err = json.loads(data[-2])["error"]
    assert err["code"] == "server_shutting_down" and err["type"] == "service_unavailable", err
    return err


def test_drain_timeout_ends_running_requests_with_an_error():
    """Shut down (what SIGTERM does) while a stream and a plain request run far longer than the drain timeout: the
    stream ends with an error event and [DONE], the plain request gets a 503 JSON error, the engine lets go."""
    eng = ScriptedEngine(script("x" * 5000), step_delay=0.02)  # 100 s of tokens: never done within the drain
    srv = BackgroundServer(create_app(eng, tokenizer=TOK, model_name="tiny"), drain_timeout=0.5).start()
    plain: list = []

    def ask():
        plain.append(httpx.post(srv.url + CHAT, json={"messages": USER}, timeout=60))

    t = threading.Thread(target=ask)
    t.start()
    with httpx.Client(base_url=srv.url, timeout=60) as c, c.stream(
            "POST", CHAT, json={"messages": USER, "stream": True}) as r:
        lines = r.iter_lines()
        events = [next(lines), next(lines)]
        stopper = threading.Thread(target=srv.stop)
        stopper.start()
        events += list(lines)  # a cut connection raises here (httpx: incomplete chunked read)
    t.join(60)
    stopper.join(60)
    assert len([e for e in events if e.startswith("data: ")]) > 3  # it streamed tokens before the shutdown
    _shutdown_error(events)
    r = plain[0]
    assert r.status_code == 503 and r.json()["error"]["code"] == "server_shutting_down", r.text
    assert idle(eng)


def test_sigterm_drain_timeout_ends_a_stream_with_an_error():
    """`glm5 serve --drain-timeout 0.5`, SIGTERM during a stream that needs seconds more: error event, [DONE],
    exit status 0."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "glm5.server.cli", "serve", "--model", "tiny", "--port", str(port),
                             "--threads", "1", "--log-level", "warning", "--drain-timeout", "0.5"],
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _health(url) or proc.poll() is not None, timeout=60, what="the server to start")
        assert proc.poll() is None, proc.stdout.read().decode()
        with httpx.Client(base_url=url, timeout=60) as c, c.stream(
                "POST", CHAT, json={"messages": USER, "max_tokens": 2000, "ignore_eos": True, "stream": True}) as r:
            lines = r.iter_lines()
            events = [next(lines)]
            proc.send_signal(signal.SIGTERM)
            events += list(lines)
        _shutdown_error(events)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _health(url) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


# ----------------------------------------------------------------------------------------------------- metrics
def test_metrics_labels_are_bounded():
    srv = start(ScriptedEngine(script("</think>x")))
    try:
        c = httpx.Client(base_url=srv.url, timeout=30)
        for i in range(20):
            c.request(f"BREW{i}", f"/coffee/{i}")
            c.get(f"/nowhere/{i}")
        lines = [ln for ln in c.get("/metrics").text.splitlines() if ln.startswith("glm5_http_requests_total{")]
        assert 'glm5_http_requests_total{method="other",route="other",status="404"} 20' in lines, lines
        assert 'glm5_http_requests_total{method="GET",route="other",status="404"} 20' in lines, lines
        assert not any("BREW" in ln or "coffee" in ln or "nowhere" in ln for ln in lines)
    finally:
        srv.stop()


def test_metrics_can_require_the_api_key(capsys):
    srv = start(ScriptedEngine(script("</think>x")), api_key="sekrit", metrics_require_key=True)
    try:
        c = httpx.Client(base_url=srv.url, timeout=30)
        assert _error(c.get("/metrics"), 401)["code"] == "invalid_api_key"
        assert c.get("/metrics", headers={"Authorization": "Bearer sekrit"}).status_code == 200
        assert c.get("/health").status_code == 200  # a liveness probe needs no key
    finally:
        srv.stop()
    with pytest.raises(SystemExit):
        glm5_main(["serve", "--help"])
    assert "--metrics-require-key" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------- openapi
def _resolve(spec: dict, node):
    """Every $ref under node points at a schema in components."""
    if isinstance(node, dict):
        if "$ref" in node:
            name = node["$ref"].removeprefix("#/components/schemas/")
            assert name in spec["components"]["schemas"], node["$ref"]
        for v in node.values():
            _resolve(spec, v)
    elif isinstance(node, list):
        for v in node:
            _resolve(spec, v)


def test_openapi_describes_the_request_and_response_bodies(live):
    c = httpx.Client(base_url=live.url, timeout=30)
    spec = c.get("/openapi.json").json()
    _resolve(spec, spec)
    schemas = spec["components"]["schemas"]
    for path, name, required in ((CHAT, "ChatCompletionRequest", "messages"),
                                 ("/v1/completions", "CompletionRequest", "prompt")):
        op = spec["paths"][path]["post"]
        assert op["requestBody"]["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{name}"}
        assert required in schemas[name]["required"]
        assert {"max_tokens", "temperature", "stream", "n"} <= set(schemas[name]["properties"])
        assert op["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    # the answers the server sends have the keys the schema declares
    answer = c.post(CHAT, json={"messages": USER, "max_tokens": 2}).json()
    resp = schemas["ChatCompletion"]
    assert set(resp["required"]) <= set(answer) <= set(resp["properties"])
    choice = schemas["ChatChoice"]
    assert set(choice["required"]) <= set(answer["choices"][0]) <= set(choice["properties"])


@pytest.mark.parametrize("prompt", [[[-5]], [10**9], [[1, 2], [3, -1]]])
def test_echo_of_a_token_id_outside_the_vocabulary_is_a_400(live, prompt):
    r = httpx.post(live.url + "/v1/completions", json={"prompt": prompt, "echo": True, "max_tokens": 1}, timeout=30)
    assert _error(r, 400)["param"] == "prompt"
