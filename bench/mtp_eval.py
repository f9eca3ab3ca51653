"""MTP draft acceptance in the eval: replaying the whole model over every prompt + completion (before) against the
MTP layer alone over the hidden states the engine hands back (`add_request(return_hidden=True)`, now).

    .venv/bin/python bench/mtp_eval.py [--model src/glm5/assets/model] [--n 6] [--rounds 3] [--threads 2]

Greedy completions (64 tokens) of n held-out prompts per family: arithmetic, and retrieval at 1K, 2K and 4K tokens
(the eval's long prompts, where the replay costs most). Both sides score the same drafts and must count the same
hits; each round times both, in alternating order; medians and their ratio are printed. The generation itself is
not timed (it is the same either way, bar the copy of the states).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="src/glm5/assets/model")
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from glm5.loader import load_model
    from glm5.chat import render_chat
    from glm5.data import examples
    from glm5.engine import Engine
    from glm5.eval.run import _generate, mtp_acceptance
    from glm5.tokenizer import Tokenizer

    model, tok = load_model(a.model, dtype=torch.float32).eval(), Tokenizer.from_dir(a.model)
    count = lambda s: len(tok.encode(s))  # noqa: E731
    exs = list(examples("arithmetic", "heldout", a.n))
    for length in (1024, 2048, 4096):
        exs += [examples("retrieval", "heldout", 1, seed=1000 * length + i, context_tokens=length,
                         count_tokens=count)[0] for i in range(a.n)]
    prompts = [render_chat(tok, ex.prompt_messages, ex.tools, enable_thinking=True).ids for ex in exs]
    engine = Engine(model, cache_bytes=1 << 30, eos_token_ids=tok.eos_ids)
    outs = _generate(engine, prompts, 64, hidden=True)
    seqs = [(p + ids, len(p)) for p, (ids, _, _) in zip(prompts, outs)]
    hidden = [h for _, _, h in outs]
    print(f"{len(seqs)} sequences, {sum(len(s) for s, _ in seqs)} tokens, "
          f"{sum(len(s) - p for s, p in seqs)} generated; {a.threads} threads")

    sides = {"replay (whole model)": lambda: mtp_acceptance(model, seqs),
             "engine states + MTP layer": lambda: mtp_acceptance(model, seqs, hidden=hidden)}
    times = {k: [] for k in sides}
    results = {}
    for r in range(a.rounds):
        for k in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            t = time.perf_counter()
            results[k] = sides[k]()
            times[k].append(time.perf_counter() - t)
    a_res, b_res = results.values()
    assert a_res == b_res, "the two sides counted different drafts"
    hits, pos = sum(h for h, _ in a_res), sum(p for _, p in a_res)
    print(f"acceptance {hits / pos:.4f} ({hits} of {pos}) on both sides")
    base = statistics.median(times["replay (whole model)"])
    for k, ts in times.items():
        m = statistics.median(ts)
        print(f"  {k:<28} median {m:6.2f} s   x{base / m:.2f}")


if __name__ == "__main__":
    main()
