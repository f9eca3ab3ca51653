"""Intra-op threads per engine step: small steps run on one thread, large ones on all.

A decode step multiplies every weight matrix by a handful of vectors and runs hundreds of small elementwise ops.
Split across threads, that work gains little and pays an OpenMP fork/join per op; and while another process holds
one of the cores, every op's barrier waits for the descheduled thread (a batch-1 decode of the `small` model ran 4x
slower on 2 threads than on 1 that way). Larger steps gain from every core. Measured on a 2-core AMD EPYC (AVX2;
BENCHMARKS.md), alternating 1 and 2 threads step by step in one engine, the random `small` model (32.8M multiply-adds
a token, its 32768 x 512 head half of them): decodes of 1 / 4 / 8 / 16 / 24 sequences took 1.03 / 0.97 / 0.92 /
0.87 / 0.82x as long on 2 threads as on 1, prefill chunks of 8 / 16 / 32 / 64 tokens 1.01 / 0.93 / 0.89 / 0.90x;
the shipped model (3.3M a token) showed no steady gain from 8 to 24 sequences. The crossover sits near 2.5e8
multiply-adds a step, where the few-row products (the LM head through oneDNN, engine/runner.Head) start to split
well.

So a step whose matrix work (query tokens x multiply-adds per token) is below `SERIAL_MACS` runs on `small`
threads (1 unless the caller says otherwise), every other step on the engine's full count: torch's thread count
when the engine was built. The count is set for the step and restored after it, so the caller's own torch work
(an RL trainer in the same thread, say) keeps its threads. The choice depends on the step's size alone, never on
timings, so two runs of the same requests compute the same bits.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

SERIAL_MACS = 250_000_000  # multiply-adds: below, a step runs on `small` threads


def macs_per_token(model) -> int:
    """Multiply-adds of one token through the model's matrices (routed experts: the k chosen of E), the head
    included and the embedding (a lookup) not. Attention over the cache is left out: DSA keeps it flat."""
    return model.num_params()["active"] - model.model.embed_tokens.weight.numel()


class StepThreads:
    def __init__(self, model, threads: int | None = None, small: int | None = None):
        self.threads = threads or torch.get_num_threads()
        if small is not None and not (isinstance(small, int) and 1 <= small):
            raise ValueError(f"small-step threads must be an integer >= 1, got {small!r}")
        self.small = min(small or 1, self.threads)
        # the fewest query tokens whose step reaches SERIAL_MACS: from there a step runs on every thread
        self.all_from = max(1, -(-SERIAL_MACS // macs_per_token(model)))

    def for_tokens(self, tokens: int) -> int:
        """Threads for a step that feeds `tokens` query tokens."""
        return self.small if tokens < self.all_from else self.threads

    @contextmanager
    def step(self, tokens: int):
        before, want = torch.get_num_threads(), self.for_tokens(tokens)
        if want != before:
            torch.set_num_threads(want)
        try:
            yield want
        finally:
            if want != before:
                torch.set_num_threads(before)
