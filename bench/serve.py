"""The server against its own engine, and throughput under concurrency, through the real HTTP server.

    python bench/serve.py                       # small preset (random weights): batch 1 at 1 and 2 threads, 16 vs 1
    python bench/serve.py --model tiny --clients 16 --max-tokens 32 --batch1-threads ""

1. Batch 1, the server against the engine alone: the same model, prompt (--batch1-context random token ids), greedy
   decoding of --batch1-tokens tokens with ignore_eos, and torch threads (each of --batch1-threads). The engine
   runs in a fresh subprocess exactly as `glm5 serve` builds it (glm5.server.launch.build_engine) and stamps every
   new token as its step returns; the server streams /v1/completions and the client stamps every chunk. Decode
   tokens/s = (tokens - 1) / (last stamp - first stamp): time per output token after the first, prefill excluded on
   both sides. The two alternate, --batch1-repeats times each, so a noisy machine hits both alike; medians.
2. Aggregate throughput: C concurrent streaming clients vs 1 client, plus time to first token and inter-token
   latency percentiles measured at the client. Every request is /v1/completions with a prompt of --prompt-tokens
   random token ids, ignore_eos and exactly --max-tokens generated tokens.

The server runs in its own process (`python -m glm5.server.cli serve`), so the load generator's Python work does
not share its GIL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import busy_cores, cpu_name, free_port, start_server  # noqa: E402

VOCAB = 1000  # prompt ids from [20, 1000): ordinary tokens in any GLM-5 or shipped vocabulary


async def one_request(client: httpx.AsyncClient, prompt: list[int], max_tokens: int, seed: int,
                      temperature: float = 1.0) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, "seed": seed, "ignore_eos": True,
            "stream": True}
    t0 = time.perf_counter()
    stamps, text = [], []
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()}")
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                stamps.append(time.perf_counter())
                text.append(json.loads(line[6:])["choices"][0]["text"])
    return {"ttft": stamps[0] - t0, "itl": [b - a for a, b in zip(stamps, stamps[1:])], "end": stamps[-1] - t0,
            "text": "".join(text)}


async def phase(url: str, clients: int, per_client: int, prompt_len: int, max_tokens: int) -> dict:
    rng = random.Random(clients)
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:
        async def worker(w):
            out = []
            for k in range(per_client):
                prompt = [rng.randrange(20, VOCAB) for _ in range(prompt_len)]
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


# -- batch 1: the engine alone -------------------------------------------------------------------------------------
def engine_worker(args) -> int:
    """Hidden `--_engine`: load the model as `glm5 serve` does, decode the prompt in args.prompt_file --repeats
    times, print one JSON line per repeat."""
    import torch

    from glm5.engine import SamplingParams
    from glm5.loader import load
    from glm5.server.launch import build_engine

    torch.set_num_threads(args.threads)
    loaded = load(args.model, device=args.device)
    engine = build_engine(loaded.model, loaded.tokenizer)
    with open(args.prompt_file) as f:
        prompt = json.load(f)
    params = SamplingParams(temperature=0.0, max_tokens=args.batch1_tokens, ignore_eos=True)
    for _ in range(args.repeats):
        engine.add_request(prompt, params)
        stamps, ids = [], []
        while engine.has_unfinished():
            for out in engine.step():
                if out.new_token_ids:
                    stamps.append(time.perf_counter())
                    ids += out.new_token_ids
        n = len(ids)
        print(json.dumps({"tok_s": (n - 1) / (stamps[-1] - stamps[0]), "text": loaded.tokenizer.decode(ids)}),
              flush=True)
    return 0


def batch1(args, threads: int, log) -> dict:
    rng = random.Random(0)
    prompt = [rng.randrange(20, VOCAB) for _ in range(args.batch1_context)]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(prompt, f)
    port = free_port()
    proc = start_server(port, ["--model", args.model, "--device", args.device, "--threads", str(threads)], log)
    engine, server, busy = [], [], []
    try:
        async def serve_once():
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=3600) as client:
                r = await one_request(client, prompt, args.batch1_tokens, seed=0, temperature=0.0)
            return {"tok_s": (args.batch1_tokens - 1) / (r["end"] - r["ttft"]), "text": r["text"]}

        asyncio.run(serve_once())  # warm-up
        for _ in range(args.batch1_repeats):
            busy.append(busy_cores())
            out = subprocess.run([sys.executable, __file__, "--_engine", "--model", args.model, "--device",
                                  args.device, "--threads", str(threads), "--prompt-file", f.name, "--repeats", "2",
                                  "--batch1-tokens", str(args.batch1_tokens)],
                                 capture_output=True, text=True, check=True).stdout.splitlines()
            engine.append(json.loads(out[-1]))  # the first repeat warms the engine up
            server.append(asyncio.run(serve_once()))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        os.unlink(f.name)
    e = statistics.median(r["tok_s"] for r in engine)
    s = statistics.median(r["tok_s"] for r in server)
    return {"engine": e, "server": s, "ratio": s / e, "same": engine[0]["text"] == server[0]["text"],
            "all_e": [r["tok_s"] for r in engine], "all_s": [r["tok_s"] for r in server], "busy": max(busy)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (0: skip the concurrency phase)")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--single-requests", type=int, default=4, help="requests of the 1-client phase")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch threads of the concurrency phase's server")
    p.add_argument("--batch1-threads", default="1,2", help="thread counts of the batch-1 phase ('' skips it)")
    p.add_argument("--batch1-context", type=int, default=512)
    p.add_argument("--batch1-tokens", type=int, default=64)
    p.add_argument("--batch1-repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--_engine", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--prompt-file", help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._engine:
        args.threads = args.threads or 1
        return engine_worker(args)

    print(f"{cpu_name()}, model {args.model}, device {args.device}")
    log = open(os.path.join(tempfile.gettempdir(), "glm5-bench-serve.log"), "w")
    for threads in [int(t) for t in args.batch1_threads.split(",") if t]:
        r = batch1(args, threads, log)
        print(f"batch 1, context {args.batch1_context}, {args.batch1_tokens} greedy tokens, {threads} thread(s): "
              f"engine {r['engine']:.1f} tok/s, server {r['server']:.1f} tok/s, server / engine **{r['ratio']:.2f}x** "
              f"(same text: {'yes' if r['same'] else 'NO'}; busy cores before repeats <= {r['busy']:.1f})")
        print(f"  engine {[round(x, 1) for x in r['all_e']]}  server {[round(x, 1) for x in r['all_s']]}")
    if not args.clients:
        return 0

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve_args = ["--model", args.model, "--device", args.device]
    if args.threads:
        serve_args += ["--threads", str(args.threads)]
    proc = start_server(port, serve_args, log)
    try:
        info = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]
        asyncio.run(phase(url, 1, 1, args.prompt_tokens, 8))  # warm-up
        one = asyncio.run(phase(url, 1, args.single_requests, args.prompt_tokens, args.max_tokens))
        many = asyncio.run(phase(url, args.clients, args.requests_per_client, args.prompt_tokens, args.max_tokens))
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
