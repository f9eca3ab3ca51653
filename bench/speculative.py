"""MTP speculative decoding against plain decoding on the shipped model: greedy tokens/s at batch 1 and batch 16.

    .venv/bin/python bench/speculative.py [--k 1 2 3] [--n 16] [--max-tokens 128] [--rounds 3] [--threads 1]

Prompts: held-out chat examples of the default families (arithmetic, world, unknown, tool, chat, in turn), rendered
with thinking on, as the eval runs them. Batch 1 runs them one request at a time; batch 16 submits all at once.
Every run must produce the same token ids as plain decoding (asserted); each round times plain decoding and each k
in a rotating order on the same engine settings; medians of tokens/s and their ratio to plain decoding are printed
with the acceptance rate (accepted / verified drafts), acceptance by draft depth (a run of j accepted drafts counts
at depths 1..j) and the mean tokens a verifying row emitted per step. Timing is of generation only (the model is
loaded and each engine warmed up once before).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

FAMILIES = ("arithmetic", "world", "unknown", "tool", "chat")


def prompts_of(tok, n: int) -> list[list[int]]:
    from glm5.chat import render_chat
    from glm5.data import examples

    per = -(-n // len(FAMILIES))
    exs = {f: examples(f, "heldout", per) for f in FAMILIES}
    order = [exs[f][i] for i in range(per) for f in FAMILIES][:n]
    return [render_chat(tok, ex.prompt_messages, ex.tools, enable_thinking=True).ids for ex in order]


def run(engine, prompts, batch: int, max_tokens: int, clock):
    """(token ids per prompt, seconds, decode tokens, decode seconds): decode = the steps after every request of a
    batch has its first token (prefill and the first token excluded)."""
    from glm5.engine import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    out, t_all, dec_n, dec_t = [], clock(), 0, 0.0
    for i in range(0, len(prompts), batch):
        ids = {engine.add_request(p, params): [] for p in prompts[i:i + batch]}
        while engine.has_unfinished():
            decoding = all(ids.values())
            t = clock()
            outs = engine.step()
            if decoding:
                dec_t += clock() - t
                dec_n += sum(len(o.new_token_ids) for o in outs)
            for o in outs:
                ids[o.request_id] += o.new_token_ids
        out += ids.values()
    return out, clock() - t_all, dec_n, dec_t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2, 3], help="speculative_tokens values to compare")
    ap.add_argument("--n", type=int, default=16, help="prompts (batch 16 runs them all at once)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: the CPU time of the thread that runs the engine (with --threads 1, all of its work) "
                         "instead of wall time, which on a machine shared with other jobs also counts the time they "
                         "hold the cores")
    a = ap.parse_args()
    if a.clock == "cpu" and a.threads != 1:
        ap.error("--clock cpu measures one thread: use it with --threads 1")
    clock = time.perf_counter if a.clock == "wall" else time.thread_time
    torch.set_num_threads(a.threads)

    from glm5.engine import Engine
    from glm5.loader import load

    loaded = load()
    model, tok = loaded.model, loaded.tokenizer
    prompts = prompts_of(tok, a.n)
    print(f"{loaded.name}: {model.config.num_hidden_layers} layers + MTP, {a.n} prompts "
          f"({min(map(len, prompts))}-{max(map(len, prompts))} tokens), greedy, max_tokens {a.max_tokens}, "
          f"{a.threads} thread(s), {a.clock} clock, torch {torch.__version__}")
    for batch in a.batch:
        engines = {k: Engine(model, cache_bytes=1 << 28, eos_token_ids=tok.eos_ids, max_num_seqs=max(batch, 1),
                             speculative_tokens=k) for k in [0, *a.k]}
        for e in engines.values():  # warm-up
            run(e, prompts[:batch], batch, 8, clock)
        want = None
        tps = {k: [] for k in engines}
        dec = {k: [] for k in engines}
        for r in range(a.rounds):
            ks = list(engines)
            ks = ks[r % len(ks):] + ks[:r % len(ks)]
            for k in ks:
                ids, dt, dec_n, dec_t = run(engines[k], prompts, batch, a.max_tokens, clock)
                if want is None:
                    want = ids
                assert ids == want, f"k={k}, batch {batch}: the tokens differ from plain greedy decoding"
                tps[k].append(sum(map(len, ids)) / dt)
                dec[k].append(dec_n / dec_t)
        base, base_dec = statistics.median(tps[0]), statistics.median(dec[0])
        print(f"batch {batch}: {sum(map(len, want))} tokens, identical in every run; tokens/s end to end (prefill "
              f"included) and decoding only (after every request's first token)")
        print(f"  plain: {base:7.1f} tok/s          decoding {base_dec:7.1f} tok/s")
        for k in a.k:
            st = engines[k].stats()
            m, d = statistics.median(tps[k]), statistics.median(dec[k])
            depth = " ".join("-" if x is None else f"{x:.2f}" for x in st["spec_acceptance_by_depth"])
            print(f"  k={k}:   {m:7.1f} tok/s  x{m / base:.2f}   decoding {d:7.1f} tok/s  x{d / base_dec:.2f}   "
                  f"acceptance {st['spec_acceptance_rate']:.3f} (by depth {depth}), "
                  f"{st['spec_mean_emitted']:.2f} tokens per verify step")


if __name__ == "__main__":
    main()
