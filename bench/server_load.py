"""Load with hostile clients mixed in: N concurrent streams (chat and completions, half each) against `glm5 serve`
on the tiny model while hostile requests arrive among them (malformed JSON, bodies over the limit, bad tools, token
ids outside the vocabulary, deep nesting, lone surrogates, oversized requests, clients that vanish mid-stream or
mid-body...). Passes when every well-formed stream completes (200, a finish_reason for every choice, no error
event, `data: [DONE]`), every hostile request gets the 4xx it should (or is simply dropped, for the vanishing
clients), no 5xx is counted, and /metrics shows nothing held afterwards: no request in flight, running or waiting,
no KV-cache block used.

    python bench/server_load.py                        # 256 streams + 20 hostile requests
    python bench/server_load.py --streams 64 --max-tokens 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import signal
import subprocess
import sys
import tempfile
import time

import httpx

from machine import free_port, metric_values, start_server  # bench/machine.py (python puts bench/ on sys.path)

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
USER = [{"role": "user", "content": "hello"}]


# ------------------------------------------------------------------------------------------ well-formed streams
async def stream(client: httpx.AsyncClient, k: int, max_tokens: int) -> dict:
    chat = k % 2 == 0
    body = {"max_tokens": max_tokens, "stream": True, "temperature": 1.0, "seed": k,
            "stream_options": {"include_usage": True}}
    if chat:
        body["messages"] = [{"role": "user", "content": f"Tell me about the number {k}."}]
    else:
        body["prompt"] = f"Once upon a time, number {k}"
    t0 = time.perf_counter()
    first = None
    finish: dict[int, str] = {}
    errors, data, usage = [], [], None
    async with client.stream("POST", CHAT if chat else COMPLETIONS, json=body) as r:
        if r.status_code != 200:
            return {"ok": False, "why": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data.append(line[6:])
            if line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                errors.append(ev["error"])
                continue
            for ch in ev.get("choices") or ():
                if first is None:
                    first = time.perf_counter() - t0
                if ch.get("finish_reason"):
                    finish[ch["index"]] = ch["finish_reason"]
            usage = ev.get("usage")
    ok = not errors and data and data[-1] == "[DONE]" and finish.get(0) in ("stop", "length")
    return {"ok": bool(ok), "why": f"errors {errors}, finish {finish}, last {data[-1:]}", "ttft": first,
            "wall": time.perf_counter() - t0, "tokens": (usage or {}).get("completion_tokens", 0)}


# ------------------------------------------------------------------------------------------------------ hostile
def _raw(method: str, path: str, body: bytes, headers: dict | None = None) -> tuple:
    return ("request", method, path, body, headers or {"content-type": "application/json"})


def hostile_requests(vocab_hint: int = 10 ** 9) -> list[tuple[str, tuple, set[int]]]:
    """(name, how, acceptable statuses); how: ("request", method, path, body, headers) or a special kind."""
    def j(obj) -> bytes:
        return json.dumps(obj).encode()

    def tool(fn) -> bytes:
        return j({"messages": USER, "max_tokens": 4, "tools": [{"type": "function", "function": fn}]})

    deep = b"[" * 10_000 + b"]" * 10_000
    return [
        ("malformed JSON", _raw("POST", CHAT, b'{"messages": ['), {400}),
        ("body over the limit (9 MiB, Content-Length)", _raw("POST", CHAT, b"x" * (9 << 20)), {413}),
        ("body over the limit (chunked, no length)", ("chunked", CHAT, 9 << 20), {413}),
        ("tool function is a string", _raw("POST", CHAT, tool("get_weather")), {400}),
        ("tool parameters is a list", _raw("POST", CHAT, tool({"name": "f", "parameters": [1]})), {400}),
        ("stop_token_ids outside the vocabulary", _raw("POST", CHAT, j({"messages": USER, "max_tokens": 4,
                                                                        "min_tokens": 1,
                                                                        "stop_token_ids": [vocab_hint]})), {400}),
        ("prompt token ids outside the vocabulary", _raw("POST", COMPLETIONS, j({"prompt": [1, 2, vocab_hint],
                                                                                 "max_tokens": 4})), {400}),
        ("negative prompt token id", _raw("POST", COMPLETIONS, j({"prompt": [[5, -1]], "max_tokens": 4})), {400}),
        ("JSON nested 10,000 deep", _raw("POST", CHAT, b'{"messages": ' + deep + b"}"), {400}),
        ("lone UTF-16 surrogate", _raw("POST", CHAT, b'{"messages": [{"role": "user", "content": "a\\ud800"}]}'),
         {400}),
        ("body not UTF-8", _raw("POST", CHAT, b'{"messages": "\xff\xfe"}'), {400}),
        ("40,000 sequences in one request", _raw("POST", COMPLETIONS, j({"prompt": ["hi"] * 320, "n": 125,
                                                                          "max_tokens": 4})), {400}),
        ("max_tokens beyond the context", _raw("POST", CHAT, j({"messages": USER, "max_tokens": 10 ** 9})), {400}),
        ("NaN temperature", _raw("POST", CHAT, b'{"messages": [{"role": "user", "content": "x"}], '
                                               b'"temperature": NaN}'), {400}),
        ("unknown model", _raw("POST", CHAT, j({"model": "gpt-9", "messages": USER})), {404}),
        ("body is a JSON list", _raw("POST", COMPLETIONS, b"[1, 2, 3]"), {400}),
        ("client gone mid-stream (chat)", ("disconnect", CHAT, 3), set()),
        ("client gone mid-stream (completions, n=4)", ("disconnect", COMPLETIONS, 2), set()),
        ("client gone before the answer (non-stream)", ("vanish", CHAT, 0.3), set()),
        ("client gone mid-body (Content-Length 100000, 10 bytes sent)", ("half_body", CHAT, 100_000), set()),
    ]


async def hostile(client: httpx.AsyncClient, host: str, port: int, name: str, how: tuple, want: set[int],
                  max_tokens: int) -> dict:
    kind = how[0]
    try:
        if kind == "request":
            _, method, path, body, headers = how
            r = await client.request(method, path, content=body, headers=headers)
            return {"name": name, "status": r.status_code, "ok": r.status_code in want,
                    "why": r.text[:160] if r.status_code not in want else ""}
        if kind == "chunked":
            _, path, size = how

            async def chunks():
                for _ in range(size // (1 << 20)):
                    yield b"x" * (1 << 20)
            r = await client.post(path, content=chunks(), headers={"content-type": "application/json"})
            return {"name": name, "status": r.status_code, "ok": r.status_code in want, "why": r.text[:160]}
        if kind == "disconnect":
            _, path, events = how
            body = {"max_tokens": 4 * max_tokens, "stream": True, "ignore_eos": True}
            body.update({"messages": USER} if path == CHAT else {"prompt": "tell me", "n": 4})
            async with client.stream("POST", path, json=body) as r:
                seen = 0
                async for line in r.aiter_lines():
                    seen += line.startswith("data: ")
                    if seen >= events:
                        break  # leaving the block closes the connection mid-stream
            return {"name": name, "status": r.status_code, "ok": r.status_code == 200, "why": ""}
        if kind == "vanish":
            _, path, after = how
            task = asyncio.ensure_future(client.post(path, json={"messages": USER, "max_tokens": 4 * max_tokens,
                                                                 "ignore_eos": True}))
            await asyncio.sleep(after)
            task.cancel()
            try:
                await task
                return {"name": name, "status": "answered before the client left", "ok": True, "why": ""}
            except asyncio.CancelledError:
                return {"name": name, "status": "dropped", "ok": True, "why": ""}
        if kind == "half_body":
            _, path, length = how
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {length}\r\n\r\n".encode() + b'{"messages"')
            await writer.drain()
            await asyncio.sleep(0.2)
            writer.close()
            return {"name": name, "status": "dropped", "ok": True, "why": ""}
    except httpx.HTTPError as e:
        return {"name": name, "status": type(e).__name__, "ok": False, "why": str(e)[:160]}
    raise ValueError(kind)


# ---------------------------------------------------------------------------------------------------------- run
async def run(url: str, host: str, port: int, streams: int, max_tokens: int, seed: int) -> tuple[list, list, float]:
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=streams + 64, max_keepalive_connections=streams + 64)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def later(delay, coro):
            await asyncio.sleep(delay)
            return await coro

        t0 = time.perf_counter()
        good = [stream(client, k, max_tokens) for k in range(streams)]
        # The hostile requests arrive spread over the first seconds, while the streams are being served.
        bad = [later(rng.uniform(0.0, 3.0), hostile(client, host, port, name, how, want, max_tokens))
               for name, how, want in hostile_requests()]
        results = await asyncio.gather(*good, *bad)
        wall = time.perf_counter() - t0
    return results[:streams], results[streams:], wall


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))] if xs else float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--streams", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per well-formed stream (default 64)")
    p.add_argument("--threads", type=int, default=None, help="the server's torch threads")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    port = free_port()
    host = "127.0.0.1"
    url = f"http://{host}:{port}"
    log = tempfile.NamedTemporaryFile("w+", prefix="glm5-load-", suffix=".log", delete=False)
    proc = start_server(port, ["--model", args.model] + (["--threads", str(args.threads)] if args.threads else []),
                        log)
    try:
        good, bad, wall = asyncio.run(run(url, host, port, args.streams, args.max_tokens, args.seed))
        # The vanished clients' requests are aborted by the server once it notices; give it a moment.
        deadline = time.time() + 30
        while True:
            m = metric_values(httpx.get(url + "/metrics", timeout=10).text)
            held = {k: m.get(k, 0) for k in ("glm5_requests_in_flight", "glm5_num_requests_running",
                                             "glm5_num_requests_waiting", 'glm5_kv_cache_blocks{state="used"}')}
            if not any(held.values()) or time.time() > deadline:
                break
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()

    five = sum(v for k, v in m.items() if re.match(r'glm5_http_requests_total\{.*status="5\d\d"\}', k))
    failures = m.get("glm5_engine_step_failures_total", 0)
    done = [r for r in good if r["ok"]]
    tokens = sum(r["tokens"] for r in done)
    print(f"model {args.model}: {args.streams} concurrent streams ({args.max_tokens} tokens each, chat and "
          f"completions) + {len(bad)} hostile requests, {wall:.1f} s")
    print(f"  well-formed streams completed: {len(done)}/{len(good)}; {tokens} tokens, {tokens / wall:.0f} tok/s; "
          f"TTFT p50 {pct([r['ttft'] for r in done], 50):.2f} s p99 {pct([r['ttft'] for r in done], 99):.2f} s")
    for r in good:
        if not r["ok"]:
            print(f"    FAILED stream: {r['why']}")
    print(f"  hostile requests answered as they should: {sum(r['ok'] for r in bad)}/{len(bad)}")
    for r in bad:
        print(f"    {'ok  ' if r['ok'] else 'FAIL'} {r['name']}: {r['status']}" + (f" {r['why']}" if not r['ok'] else ""))
    print(f"  5xx answers: {five:.0f}; engine step failures: {failures:.0f}")
    print(f"  held afterwards: {held}")
    print(f"  server log: {log.name}")
    ok = len(done) == len(good) and all(r["ok"] for r in bad) and not five and not failures and not any(held.values())
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
