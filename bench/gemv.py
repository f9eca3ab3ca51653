"""Few-row matrix products on this CPU: how fast torch multiplies a handful of rows by a weight matrix, by layout and
thread count. Decode is made of these (a batch-1 step multiplies every weight by one row), so they decide two engine
choices: the runner's LM head layout for calls of few rows (engine/runner.Head) and the thread count of small steps
(engine/threads.py).

    .venv/bin/python bench/gemv.py                        # the `small` preset's head (32768 x 512) and an MLP matrix
    .venv/bin/python bench/gemv.py --shapes 154880x6144   # GLM-5's head

For each [N, K] weight W and rows M: y = x @ W.T with W stored as is ([N, K] rows, what nn.Linear holds), with W
stored transposed ([K, N] contiguous, the same matrix read column by column) and, where torch has oneDNN, through
oneDNN's linear over a copy prepacked into its blocked layout (what engine/runner.Head uses from 2 rows); at 1
thread and at --threads. Each
number is the median of --repeats timed calls after warm-up, as GB/s of weight read (N * K * 4 bytes per call) so
it compares with the machine's memory bandwidth, printed beside it (a 1 GiB sum).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import cpu_name  # noqa: E402


def timed(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="32768x512,1536x512", help="weights N x K, comma separated")
    ap.add_argument("--rows", default="1,2,4,16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()

    torch.set_num_threads(1)
    big = torch.ones(256 * 1024 * 1024)
    bw = 1.0 / timed(big.sum, 3)
    del big
    print(f"{cpu_name()}, torch {torch.__version__}; one-thread read bandwidth (1 GiB sum): {bw:.1f} GiB/s\n")
    dnn = torch.backends.mkldnn.is_available()
    print("| weight N x K | rows | threads | [N, K] GB/s | [K, N] GB/s | oneDNN packed GB/s | [K, N] / [N, K] speed "
          "| packed / [N, K] speed |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|")
    for shape in args.shapes.split(","):
        N, K = (int(v) for v in shape.lower().split("x"))
        w_NK = torch.randn(N, K)
        w_KN = w_NK.t().contiguous()
        w_packed = torch.ops.mkldnn._reorder_linear_weight(w_NK, 16) if dnn else None
        gib = N * K * 4 / 2**30
        for M in (int(r) for r in args.rows.split(",")):
            x = torch.randn(M, K)
            for th in sorted({1, args.threads}):
                torch.set_num_threads(th)
                a = timed(lambda: F.linear(x, w_NK), args.repeats)
                b = timed(lambda: x @ w_KN, args.repeats)
                c = timed(lambda: torch.ops.mkldnn._linear_pointwise(x, w_packed, None, "none", [], ""),
                          args.repeats) if dnn else float("nan")
                print(f"| {N} x {K} | {M} | {th} | {gib / a:.1f} | {gib / b:.1f} | {gib / c:.1f} | {a / b:.2f}x "
                      f"| {a / c:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
