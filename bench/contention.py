"""Decode when another process holds a core: the engine's small steps on one thread against all of them.

    .venv/bin/python bench/contention.py                  # the `small` preset, 2 threads, context 512
    .venv/bin/python bench/contention.py --model DIR --threads 4 --busy 1

An engine built with --threads torch threads decodes --tokens greedy tokens at --context in the main thread, with
`small_step_threads` 1 (the default: steps under engine/threads.SERIAL_MACS multiply-adds run on one thread) and
--threads (every step on all threads), first on an idle machine, then while --busy processes spin (`while True:
pass`, one core each). Each run is a fresh subprocess, the two settings alternate, --repeats each; decode tokens/s
= (tokens - 1) / (time of the last token - time of the first), medians. On a 2-core machine with one core taken, an
OpenMP barrier waits for a thread the kernel has descheduled, every op.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import cpu_name  # noqa: E402


def worker(args) -> int:
    import random

    import torch

    from glm5.engine import SamplingParams
    from glm5.loader import load
    from glm5.server.launch import build_engine

    torch.set_num_threads(args.threads)
    loaded = load(args.model, device="cpu")
    eng = build_engine(loaded.model, loaded.tokenizer, small_step_threads=args.small)
    rng = random.Random(0)
    prompt = [rng.randrange(20, 1000) for _ in range(args.context)]
    eng.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True))
    stamps = []
    while eng.has_unfinished():
        if any(o.new_token_ids for o in eng.step()):
            stamps.append(time.perf_counter())
    print(json.dumps({"tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0])}))
    return 0


def run(args, small: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--_worker", "--model", args.model, "--threads", str(args.threads),
                          "--context", str(args.context), "--tokens", str(args.tokens), "--small", str(small)],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    return json.loads(out[-1])["tok_s"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--busy", type=int, default=1, help="spinning processes in the contended phase")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--_worker", dest="worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--small", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    print(f"{cpu_name()}, {os.cpu_count()} logical CPUs; model {args.model}, {args.threads} threads, context "
          f"{args.context}, {args.tokens} greedy tokens, median of {args.repeats}\n")
    print(f"| other processes spinning | small steps on 1 thread | small steps on {args.threads} threads | ratio |")
    print("|--:|--:|--:|--:|")
    for busy in (0, args.busy):
        spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
        try:
            res = {1: [], args.threads: []}
            for _ in range(args.repeats):
                for small in res:
                    res[small].append(run(args, small))
        finally:
            for p in spinners:
                p.kill()
                p.wait()
        one, all_ = statistics.median(res[1]), statistics.median(res[args.threads])
        print(f"| {busy} | {one:.1f} tok/s | {all_:.1f} tok/s | **{one / all_:.2f}x** |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
