"""Aggregate decode throughput through the real HTTP server: C concurrent streaming clients vs 1 client, plus time
to first token and inter-token latency percentiles measured at the client.

The server runs in its own process (`python -m glm5.server.cli serve`), so the load generator's Python work does
not share its GIL. Every request is /v1/completions with a prompt of --prompt-tokens random token ids,
ignore_eos and exactly --max-tokens generated tokens, so both phases generate the same token count per request.

    python bench/serve.py                       # small preset (random weights), 16 clients vs 1
    python bench/serve.py --model tiny --clients 16 --max-tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time

import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one_request(client: httpx.AsyncClient, prompt: list[int], max_tokens: int, seed: int) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0, "seed": seed, "ignore_eos": True,
            "stream": True}
    t0 = time.perf_counter()
    stamps = []
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()}")
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                stamps.append(time.perf_counter())
    return {"ttft": stamps[0] - t0, "itl": [b - a for a, b in zip(stamps, stamps[1:])], "end": stamps[-1] - t0}


async def phase(url: str, clients: int, per_client: int, prompt_len: int, max_tokens: int, vocab: int) -> dict:
    rng = random.Random(clients)
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:
        async def worker(w):
            out = []
            for k in range(per_client):
                prompt = [rng.randrange(20, vocab) for _ in range(prompt_len)]
                out.append(await one_request(client, prompt, max_tokens, seed=w * 1000 + k))
            return out

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(w) for w in range(clients))) for r in rs]
        wall = time.perf_counter() - t0
    tokens = len(results) * max_tokens
    return {"wall": wall, "tok_s": tokens / wall, "ttft": [r["ttft"] for r in results],
            "itl": [x for r in results for x in r["itl"]]}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))] if xs else float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--single-requests", type=int, default=4, help="requests of the 1-client phase")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "glm5.server.cli", "serve", "--model", args.model, "--port", str(port),
           "--log-level", "warning", "--device", args.device]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        t0 = time.time()
        while True:
            try:
                info = httpx.get(url + "/v1/models", timeout=2).json()["data"][0]
                break
            except httpx.HTTPError:
                if proc.poll() is not None or time.time() - t0 > 300:
                    raise RuntimeError("server did not start")
                time.sleep(0.5)
        vocab = 1000  # prompt ids from [20, 1000): ordinary tokens in any GLM-5 or shipped vocabulary
        asyncio.run(phase(url, 1, 1, args.prompt_tokens, 8, vocab))  # warm-up
        one = asyncio.run(phase(url, 1, args.single_requests, args.prompt_tokens, args.max_tokens, vocab))
        many = asyncio.run(phase(url, args.clients, args.requests_per_client, args.prompt_tokens, args.max_tokens,
                                 vocab))
        metrics = httpx.get(url + "/metrics").text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)

    print(f"model {info['id']}, prompt {args.prompt_tokens} tokens, {args.max_tokens} generated per request, "
          f"torch threads {args.threads or 'default'}")
    for name, r in (("1 client", one), (f"{args.clients} clients", many)):
        print(f"  {name:>11}: {r['tok_s']:8.1f} tok/s ({r['wall']:.1f} s)  TTFT p50 {pct(r['ttft'], 50) * 1e3:7.1f} ms "
              f"p90 {pct(r['ttft'], 90) * 1e3:7.1f} ms  ITL p50 {pct(r['itl'], 50) * 1e3:6.1f} ms "
              f"p90 {pct(r['itl'], 90) * 1e3:6.1f} ms p99 {pct(r['itl'], 99) * 1e3:6.1f} ms")
    print(f"  aggregate throughput {args.clients} clients / 1 client: {many['tok_s'] / one['tok_s']:.2f}x "
          f"(target >= 5x)")
    pre = [ln for ln in metrics.splitlines() if ln.startswith("glm5_num_preemptions_total")]
    print(f"  server: {pre[0] if pre else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
