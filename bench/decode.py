"""Decode: the glm5 engine vs transformers' `generate`, same weights, side by side.

    .venv/bin/python bench/decode.py [--preset small] [--contexts 512,8192] [--gen 32] [--threads 2]

The parent builds the seeded random `small` model (fp32), saves it with `glm5.save_checkpoint` to a temporary
directory and draws the token ids; each measurement runs in a fresh subprocess (hidden `--_worker` flag) that loads
that checkpoint (glm5.load_model / GlmMoeDsaForCausalLM.from_pretrained, fp32) under torch.inference_mode.

1. Batch-1 decode at each context C (greedy, --gen tokens). Both sides prefill the first C - 1 tokens once; each
   repeat then feeds the last prompt token and decodes: transformers `generate(ids, past_key_values=<copy of the
   prefilled DynamicCache>)`, the engine `add_request(ids)` whose full prompt blocks come from its prefix cache.
   A logits processor (transformers) / the step loop (engine) stamps the time of every new token; decode tokens/s =
   gen / (t_last - t_first): time per output token after the first, prefill excluded on both sides. The engine also
   decodes at the intermediate contexts (flatness), with the time spent writing + gathering cache rows measured
   in an extra instrumented pass.
2. Aggregate throughput: --concurrency requests (--conc-prompt random tokens, --conc-gen outputs each, ignore_eos)
   submitted at once vs one alone: output tokens / wall time from submission to the last token (prefill
   included), plus TTFT and inter-token latency percentiles.
3. Memory-bandwidth bound: bytes of weights one batch-1 token touches (every main-model weight, routed experts
   counted k/E, one embedding row; no MTP) / copy bandwidth (torch copy_ of a weights-sized buffer, read + write
   bytes; a 1 GiB buffer too, since this CPU's 480 MiB L3 can hold the whole small model).

Contention: the machine is shared. Every timed repeat compares its process CPU time with wall time x threads (for
the engine, the threads its decode steps run on: engine/threads.py keeps batch-1 steps on one) and is discarded and
re-run (at most --max-retries) when the process was off its cores for more than --max-stall of it. One thread (the
default) makes this check exact and avoids OpenMP barrier stalls when another task takes a core.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


class Stall:
    """Share of a timed region's wall time this process was NOT running on its threads: 1 - CPU time / (wall x
    threads). Other tasks taking our cores show up here, whatever they are (unlike system-wide CPU pressure, which
    also counts tasks waiting behind us). Exact for one thread; with two, a descheduled thread's partner may spin
    and hide part of the loss."""

    def __init__(self, threads: int | None = None):
        self.threads = threads  # the threads the timed work runs on (default: torch's count)

    def __enter__(self):
        self.c0, self.t0 = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t0
        threads = self.threads or torch.get_num_threads()
        self.share = max(0.0, 1 - (time.process_time() - self.c0) / (wall * threads))


def retry(fn, args):
    """Run fn() -> (result, stall share) until the stall is acceptable; returns (results kept, discarded count)."""
    kept, discarded = [], 0
    while len(kept) < args.repeats:
        r, stall = fn()
        if stall > args.max_stall and discarded < args.max_retries:
            discarded += 1
            time.sleep(2.0)
            continue
        r["stall"] = stall
        kept.append(r)
    return kept, discarded


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


# -- workers ------------------------------------------------------------------------------------------------------
def _engine(model, **kw):
    from glm5.engine import Engine
    return Engine(model, cache_bytes=2 << 30, **kw)


def _engine_decode(eng, prompt, gen):
    """Token timestamps of one greedy request (prefix already cached)."""
    from glm5.engine import SamplingParams
    t_submit = time.perf_counter()
    eng.add_request(prompt, SamplingParams(temperature=0, max_tokens=gen + 1, ignore_eos=True))
    stamps, toks = [], []
    with Stall(eng.threads.for_tokens(1)) as st:  # a batch-1 decode step's threads (engine/threads.py)
        while eng.has_unfinished():
            for o in eng.step():
                toks += o.new_token_ids
                stamps += [time.perf_counter()] * len(o.new_token_ids)
    return {"tok_s": gen / (stamps[-1] - stamps[0]), "ttft": stamps[0] - t_submit, "tokens": toks}, st.share


def worker_glm5_single(args, ckpt, ids):
    import glm5
    from glm5.engine import SamplingParams
    from glm5.engine import kv_cache
    model = glm5.load_model(ckpt, dtype=torch.float32)
    eng = _engine(model)
    eng.generate([ids[:64]], SamplingParams(temperature=0, max_tokens=4))  # warm-up
    contexts = sorted({int(c) for c in args.flat.split(",") if c} | {int(c) for c in args.contexts.split(",")})
    t0 = time.perf_counter()
    eng.generate([ids[: max(contexts)]], SamplingParams(temperature=0, max_tokens=1))  # prefill once
    prefill_s = time.perf_counter() - t0
    out = {}
    for C in contexts:
        runs, disc = retry(lambda: _engine_decode(eng, ids[:C], args.gen), args)
        # Instrumented pass: time inside BatchView._write_and_gather (cache write + gather of every row).
        # (and in gather_latent, which sparse decode uses to read only its top-k latent rows).
        spent = [0.0]
        origs = {name: getattr(kv_cache.BatchView, name) for name in ("_write_and_gather", "gather_latent")}

        def timing(orig):
            def timed(self, *a, **kw):
                t = time.perf_counter()
                r = orig(self, *a, **kw)
                spent[0] += time.perf_counter() - t
                return r
            return timed
        for name, orig in origs.items():
            setattr(kv_cache.BatchView, name, timing(orig))
        try:
            _engine_decode(eng, ids[:C], args.gen)
        finally:
            for name, orig in origs.items():
                setattr(kv_cache.BatchView, name, orig)
        out[C] = {"tok_s": statistics.median(r["tok_s"] for r in runs), "all": [r["tok_s"] for r in runs],
                  "stalls": [r["stall"] for r in runs], "discarded": disc, "tokens": runs[0]["tokens"][: args.gen + 1],
                  "gather_ms": spent[0] / (args.gen + 1) * 1e3}
    return {"single": out, "prefill_s": prefill_s, "stats": eng.stats()}


def worker_hf_single(args, ckpt, ids):
    import transformers
    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()

    class Stamp(transformers.LogitsProcessor):
        def __init__(self):
            self.t = []

        def __call__(self, input_ids, scores):
            self.t.append(time.perf_counter())
            return scores

    def gen(x, cache, n):
        st = Stamp()
        out = model.generate(x, past_key_values=cache, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             logits_processor=[st], pad_token_id=0)
        return out[0, x.shape[1]:].tolist(), st.t

    gen(torch.tensor([ids[:64]]), None, 4)  # warm-up
    out = {}
    for C in sorted(int(c) for c in args.contexts.split(",")):
        x = torch.tensor([ids[:C]])
        t0 = time.perf_counter()
        cache = transformers.DynamicCache(config=model.config)
        model(x[:, :-1], past_key_values=cache, use_cache=True)  # prefill C - 1 tokens once
        prefill_s = time.perf_counter() - t0

        def once():
            with Stall() as st:
                toks, t = gen(x, copy.deepcopy(cache), args.gen + 1)
            return {"tok_s": args.gen / (t[-1] - t[0]), "tokens": toks}, st.share
        runs, disc = retry(once, args)
        out[C] = {"tok_s": statistics.median(r["tok_s"] for r in runs), "all": [r["tok_s"] for r in runs],
                  "stalls": [r["stall"] for r in runs], "discarded": disc, "tokens": runs[0]["tokens"],
                  "prefill_s": prefill_s}
    return {"single": out, "attn": model.config._attn_implementation}


def worker_glm5_concurrent(args, ckpt, ids):
    import glm5
    from glm5.engine import SamplingParams
    model = glm5.load_model(ckpt, dtype=torch.float32)
    V, P, G = model.config.vocab_size, args.conc_prompt, args.conc_gen
    g = torch.Generator().manual_seed(1)

    def run(n):
        eng = _engine(model)
        eng.generate([ids[:64]], SamplingParams(temperature=0, max_tokens=4))  # warm-up
        prompts = [torch.randint(0, V, (P,), generator=g).tolist() for _ in range(n)]  # distinct: no prefix hits
        stamps = {}
        with Stall(eng.threads.for_tokens(n)) as st:  # the threads of its decode steps (most of the run)
            t0 = time.perf_counter()
            for p in prompts:
                eng.add_request(p, SamplingParams(temperature=0, max_tokens=G, ignore_eos=True))
            while eng.has_unfinished():
                outs = eng.step()
                now = time.perf_counter()
                for o in outs:
                    stamps.setdefault(o.request_id, []).extend([now] * len(o.new_token_ids))
            wall = time.perf_counter() - t0
        ttft = [s[0] - t0 for s in stamps.values()]
        itl = [b - a for s in stamps.values() for a, b in zip(s, s[1:])]
        assert sum(map(len, stamps.values())) == n * G
        return {"n": n, "tok_s": n * G / wall, "wall": wall, "ttft": ttft, "itl": itl}, st.share

    res = {}
    for n in (1, args.concurrency):
        runs, disc = retry(lambda: run(n), args)
        best = sorted(runs, key=lambda r: r["tok_s"])[len(runs) // 2]  # the median run, whole
        best["discarded"], best["stalls"] = disc, [r["stall"] for r in runs]
        res[n] = best
    return {"concurrent": res}


def worker_bandwidth(args, ckpt, ids):
    import glm5
    model = glm5.load_model(ckpt, dtype=torch.float32)
    cfg = model.config
    touched = 0
    for name, p in model.named_parameters():
        if name.startswith("mtp."):
            continue
        if name == "model.embed_tokens.weight":
            touched += p[0].nbytes  # one row per token
        elif ".mlp.experts." in name:
            touched += p.nbytes * cfg.num_experts_per_tok / cfg.n_routed_experts
        else:
            touched += p.nbytes
    out = {"weight_bytes": touched}
    for label, nbytes in (("weights-sized", int(touched)), ("1 GiB", 1 << 30)):
        a = torch.randn(nbytes // 4)
        b = torch.empty_like(a)
        ts = []
        for _ in range(7):
            t = time.perf_counter()
            b.copy_(a)
            ts.append(time.perf_counter() - t)
        out[label] = 2 * a.nbytes / min(ts)  # read + write
    return out


WORKERS = {"glm5_single": worker_glm5_single, "hf_single": worker_hf_single,
           "glm5_concurrent": worker_glm5_concurrent, "bandwidth": worker_bandwidth}


def run_worker(kind, ckpt, ids_path, args) -> dict:
    cmd = [sys.executable, __file__, "--_worker", kind, "--_ckpt", ckpt, "--_ids", ids_path]
    for k in ("contexts", "flat", "gen", "threads", "repeats", "max_stall", "max_retries", "concurrency",
              "conc_prompt", "conc_gen"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        sys.stderr.write(p.stdout[-4000:] + p.stderr[-4000:])
        raise RuntimeError(f"{kind} worker failed (rc={p.returncode})")
    print(f"  [{kind}] worker wall {time.perf_counter() - t0:.0f} s", flush=True)
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--contexts", default="512,8192", help="batch-1 contexts compared with transformers")
    ap.add_argument("--flat", default="1024,2048,4096", help="extra engine-only contexts (flatness)")
    ap.add_argument("--gen", type=int, default=32, help="decode tokens timed per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--conc-prompt", type=int, default=128)
    ap.add_argument("--conc-gen", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-stall", type=float, default=0.1)
    ap.add_argument("--max-retries", type=int, default=10)
    ap.add_argument("--_worker", dest="worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--_ckpt", dest="ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--_ids", dest="ids", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        torch.set_num_threads(args.threads)
        with torch.inference_mode():
            res = WORKERS[args.worker](args, args.ckpt, torch.load(args.ids).tolist())
        print("RESULT " + json.dumps(res), flush=True)
        return

    import glm5
    import transformers

    torch.set_num_threads(args.threads)
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    cpu = re.search(r"Model name:\s+(.*)", subprocess.run(["lscpu"], capture_output=True, text=True).stdout)
    print(f"machine: {cpu.group(1).strip() if cpu else '?'}, {os.cpu_count()} logical CPUs; torch {torch.__version__}, "
          f"transformers {transformers.__version__}; worker threads {args.threads}")
    with tempfile.TemporaryDirectory(prefix="glm5-decode-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as tmp:
        m = glm5.load_model(args.preset, dtype=torch.float32, seed=args.seed)
        cfg = m.config
        ckpt = str(glm5.save_checkpoint(m, Path(tmp) / "ckpt"))
        del m
        n_ctx = max(int(c) for c in (args.contexts + "," + args.flat).split(",") if c)
        ids_path = str(Path(tmp) / "ids.pt")
        torch.save(torch.randint(0, cfg.vocab_size, (n_ctx,), generator=torch.Generator().manual_seed(args.seed)),
                   ids_path)
        print(f"model: preset {args.preset!r}, fp32, index_topk={cfg.index_topk}, {cfg.num_hidden_layers} layers, "
              f"vocab {cfg.vocab_size}; greedy, {args.gen} timed decode tokens, median of {args.repeats}", flush=True)
        bw = run_worker("bandwidth", ckpt, ids_path, args)
        g = run_worker("glm5_single", ckpt, ids_path, args)
        h = run_worker("hf_single", ckpt, ids_path, args)
        c = run_worker("glm5_concurrent", ckpt, ids_path, args)
    report(args, cfg, bw, g, h, c)


def report(args, cfg, bw, g, h, c):
    gs, hs = g["single"], h["single"]
    print(f"\ntransformers attn_implementation: {h['attn']}; engine prefill of {max(map(int, gs))} tokens "
          f"(chunks of 2048): {g['prefill_s']:.1f} s")
    print("\n### Batch-1 decode, tokens/s (time per output token after the first)\n")
    print("| context | glm5 engine | transformers generate | engine / transformers | same greedy tokens |")
    print("|--------:|------------:|----------------------:|----------------------:|:------------------:|")
    for C in sorted(hs, key=int):
        a, b = gs[C], hs[C]
        print(f"| {C} | {a['tok_s']:.1f} | {b['tok_s']:.1f} | **{a['tok_s'] / b['tok_s']:.2f}x** | "
              f"{'yes' if a['tokens'] == b['tokens'] else 'no'} |")
    print("\n### Engine decode vs context (flat once context > index_topk apart from the indexer scan?)\n")
    print("| context | ms / token | of which cache write + row gather (all rows, or top-k once sparse) | rest |")
    print("|--------:|-----------:|------------------------------------------:|-----:|")
    for C in sorted(gs, key=int):
        ms = 1e3 / gs[C]["tok_s"]
        print(f"| {C} | {ms:.1f} | {gs[C]['gather_ms']:.1f} | {ms - gs[C]['gather_ms']:.1f} |")
    disc = {f"glm5 {C}": gs[C]["discarded"] for C in gs} | {f"hf {C}": hs[C]["discarded"] for C in hs}
    disc |= {f"concurrent {n}": c["concurrent"][n]["discarded"] for n in c["concurrent"]}
    print(f"\nrepeats discarded under CPU contention: {disc}")

    one, many = c["concurrent"]["1"], c["concurrent"][str(args.concurrency)]
    print(f"\n### Aggregate throughput: {args.concurrency} concurrent requests vs 1 "
          f"({args.conc_prompt}-token prompts, {args.conc_gen} output tokens each, all submitted at once)\n")
    print("| requests | output tokens/s | wall s | TTFT p50 / p90 / p99 ms | ITL p50 / p90 / p99 ms |")
    print("|---------:|----------------:|-------:|------------------------:|-----------------------:|")
    for r in (one, many):
        t, i = [x * 1e3 for x in r["ttft"]], [x * 1e3 for x in r["itl"]]
        print(f"| {r['n']} | {r['tok_s']:.1f} | {r['wall']:.2f} | {pct(t, 50):.0f} / {pct(t, 90):.0f} / "
              f"{pct(t, 99):.0f} | {pct(i, 50):.1f} / {pct(i, 90):.1f} / {pct(i, 99):.1f} |")
    dec = (args.concurrency / statistics.median(many["itl"])) / (1 / statistics.median(one["itl"]))
    print(f"\naggregate throughput ratio {args.concurrency} vs 1: **{many['tok_s'] / one['tok_s']:.2f}x** "
          f"(decode phase alone, from median inter-token latencies: {dec:.2f}x)")

    wb = bw["weight_bytes"]
    C0 = str(min(int(x) for x in hs))
    tok_s = gs[C0]["tok_s"]
    print(f"\n### Batch-1 decode vs the memory-bandwidth bound (context {C0})\n")
    print(f"weights touched per token: {wb / 1e6:.1f} MB (fp32, routed experts {cfg.num_experts_per_tok}/"
          f"{cfg.n_routed_experts}, no MTP)")
    for label in ("weights-sized", "1 GiB"):
        bound = bw[label] / wb
        print(f"copy bandwidth ({label} buffer): {bw[label] / 1e9:.1f} GB/s -> bound {bound:.0f} tokens/s; "
              f"engine {tok_s:.1f} tokens/s = **{tok_s / bound:.0%}** of the bound")
    print("\ntargets: >= 3x at 512, >= 5x at 8192; >= 5x aggregate at 16 vs 1; >= 40% of the bandwidth bound")


if __name__ == "__main__":
    main()
