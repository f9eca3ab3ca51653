"""Long context with the engine: prefill time and memory, decode time per token, from 4K to 128K tokens of context.

    .venv/bin/python bench/long_context.py [--contexts 4096,16384,32768,65536,131072] [--gen 24] [--threads 1]

A seeded random `small` model (fp32) whose max_position_embeddings is raised to hold the longest context; one fresh
subprocess per context (hidden `--_worker` flag) so that one run's peak memory cannot mask another's. Each worker
builds the model, an Engine with just enough paged cache blocks for the request (default block size 16, prefill in
chunks of max_num_batched_tokens = 2048), runs a short warm-up request, then one greedy request of C random prompt
tokens and 1 + gen + --breakdown-tokens output tokens:
  - prefill s: from add_request to the first token (--prefill-threads threads; every chunk's time is kept, so the
    per-chunk cost vs context shows);
  - prefill peak MB: VmHWM - VmRSS just before add_request, after resetting the kernel's high-water mark (writes "5"
    to /proc/self/clear_refs). It includes the cache rows the prompt fills (the cache is an anonymous mapping, resident
    only as blocks fill): `cache MB` = C x bytes per token, `transient MB` = peak - cache is what the forward passes
    need on top;
  - decode ms/token: median time between consecutive output tokens after the first (--threads threads), over gen
    tokens; steps during which the process was off its cores for more than --max-stall of the time (the machine is
    shared) are reported and left out of the median if enough remain;
  - breakdown (--breakdown-tokens more tokens, instrumented): time inside the indexer's score scan, its top-k, the
    latent row gather / cache write, and the rest of the step.
The ratio decode(max context) / decode(min context) is the number the 1.5x target is about.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import re
import statistics
import subprocess
import sys
import time

import torch
from machine import busy_cores, cpu_name, wait_quiet  # bench/machine.py (python puts bench/ on sys.path)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Timers:
    """Wall time spent inside named functions, patched in for an instrumented pass. Nested timed calls count once
    (in the outermost), generators count the time spent producing each item."""

    def __init__(self):
        self.spent, self.depth, self.undo = {}, 0, []

    def wrap(self, owner, attr: str, label: str):
        orig = getattr(owner, attr, None)
        if orig is None:
            return
        timers = self
        is_static = isinstance(vars(owner).get(attr), staticmethod) if isinstance(owner, type) else False
        gen = inspect.isgeneratorfunction(orig)

        def timed_call(fn, *a, **kw):
            if timers.depth:
                return fn(*a, **kw)
            timers.depth += 1
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                timers.spent[label] = timers.spent.get(label, 0.0) + time.perf_counter() - t
                timers.depth -= 1

        if gen:
            def wrapper(*a, **kw):
                it = orig(*a, **kw)
                while True:
                    try:
                        item = timed_call(next, it)
                    except StopIteration:
                        return
                    yield item
        else:
            def wrapper(*a, **kw):
                return timed_call(orig, *a, **kw)
        setattr(owner, attr, staticmethod(wrapper) if is_static else wrapper)
        self.undo.append((owner, attr, orig, is_static))

    def restore(self):
        for owner, attr, orig, is_static in reversed(self.undo):
            setattr(owner, attr, staticmethod(orig) if is_static else orig)


def instrument(timers: Timers):
    """The pieces of a decode step worth naming, wherever this version of the code keeps them."""
    from glm5.engine import kv_cache
    from glm5.model import dsa, mla
    for owner, attr, label in [
        (dsa.Indexer, "scan", "indexer score scan"),  # fused scan over the cached index keys
        (dsa.Indexer, "_blocks", "indexer score scan"),  # block generator (scores [B, t, s])
        (dsa, "topk_rows", "top-k"),
        (dsa, "select_topk", "top-k"),
        (kv_cache.BatchView, "gather_latent", "latent row gather + cache write"),
        (kv_cache.BatchView, "_write_and_gather", "latent row gather + cache write"),
        (kv_cache.BatchView, "index_keys", "latent row gather + cache write"),
    ]:
        timers.wrap(owner, attr, label)
    # mla imports select_topk by name: patch that binding too
    if hasattr(mla, "select_topk"):
        timers.wrap(mla, "select_topk", "top-k")


# -- worker -------------------------------------------------------------------------------------------------------
def worker(args) -> dict:
    import glm5
    from glm5.config import small
    from glm5.engine import Engine, SamplingParams
    from glm5.engine.kv_cache import bytes_per_token

    C = args.context
    cfg = small().replace(max_position_embeddings=args.max_pos)
    model = glm5.load_model(cfg, dtype=torch.float32, seed=args.seed)
    n_out = 1 + args.gen + args.breakdown_tokens
    block = 16
    eng = Engine(model, num_blocks=-(-(C + n_out + 128) // block) + 8, block_size=block, eos_token_ids=[])
    g = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, cfg.vocab_size, (C,), generator=g).tolist()
    eng.generate([torch.randint(0, cfg.vocab_size, (64,), generator=g).tolist()],
                 SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up
    torch.set_num_threads(args.prefill_threads)
    wait_quiet(args.max_wait)
    rss0 = _status_kb("VmRSS")
    hwm_ok = _reset_hwm()
    ru0 = _status_kb("VmHWM")
    t0, cpu0 = time.perf_counter(), time.process_time()
    eng.add_request(prompt, SamplingParams(temperature=0, max_tokens=n_out, ignore_eos=True))
    chunks, toks = [], []
    while not toks:
        ts = time.perf_counter()
        outs = eng.step()
        chunks.append(time.perf_counter() - ts)
        for o in outs:
            toks += o.new_token_ids
    prefill_s, prefill_cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    peak_kb = _status_kb("VmHWM") - (rss0 if hwm_ok else ru0)
    cache_kb = C * bytes_per_token(cfg, torch.float32) / 1024  # the prompt's rows in the cache, resident now

    # The reference context decodes in the same process, its steps interleaved with this context's: whatever the
    # shared machine does meanwhile falls on both, and their ratio is the number the target is about.
    ref = None
    if args.ref_context and args.ref_context < C:
        ref = Engine(model, num_blocks=-(-(args.ref_context + n_out + 128) // block) + 8, block_size=block,
                     eos_token_ids=[])
        ref.add_request(prompt[: args.ref_context], SamplingParams(temperature=0, max_tokens=1 + args.gen,
                                                                   ignore_eos=True))
        while not any(o.new_token_ids for o in ref.step()):
            pass

    torch.set_num_threads(args.threads)
    wait_quiet(args.max_wait)

    def timed_step(e):
        c0, ts = time.process_time(), time.perf_counter()
        outs = e.step()
        dt, cpu = time.perf_counter() - ts, time.process_time() - c0
        return dt, cpu, max(0.0, 1 - cpu / (dt * torch.get_num_threads())), [t for o in outs for t in o.new_token_ids]

    steps, ref_steps = [], []  # (wall s, CPU s, stall share) per decode step
    for _ in range(args.gen):
        dt, cpu, stall, new = timed_step(eng)
        steps.append((dt, cpu, stall))
        toks += new
        if ref is not None:
            ref_steps.append(timed_step(ref)[:3])
    timers, parts, instr = Timers(), [], []
    instrument(timers)
    while eng.has_unfinished():
        before = dict(timers.spent)
        dt, _, _, new = timed_step(eng)
        toks += new
        instr.append(dt)
        parts.append({k: v - before.get(k, 0.0) for k, v in timers.spent.items()})
    timers.restore()

    def summary(rows):
        calm = [r for r in rows if r[2] <= args.max_stall]
        use = calm if len(calm) >= max(4, len(rows) // 2) else rows
        return {"ms": statistics.median(r[0] for r in use) * 1e3, "cpu_ms": statistics.median(r[1] for r in rows) * 1e3,
                "calm": len(calm), "n": len(rows), "all_ms": [r[0] * 1e3 for r in rows]}

    dec = summary(steps)
    labels = sorted({k for p in parts for k in p})
    return {
        "context": C, "prefill_s": prefill_s, "prefill_cpu_s": prefill_cpu_s, "chunks_s": chunks,
        "peak_mb": peak_kb / 1024, "cache_mb": cache_kb / 1024, "hwm_reset": hwm_ok,
        "decode_ms": dec["ms"], "decode_cpu_ms": dec["cpu_ms"], "calm_steps": dec["calm"], "steps": dec["n"],
        "decode_all_ms": dec["all_ms"], "ref": summary(ref_steps) if ref is not None else None,
        "ref_context": args.ref_context if ref is not None else None, "tokens": toks,
        "breakdown_ms": {k: statistics.median(p.get(k, 0.0) for p in parts) * 1e3 for k in labels} if parts else {},
        "instr_ms": statistics.median(instr) * 1e3 if instr else None,
    }


def run_worker(C: int, args) -> dict:
    cmd = [sys.executable, __file__, "--_worker", "--_context", str(C), "--max-pos", str(args.max_pos),
           "--gen", str(args.gen), "--breakdown-tokens", str(args.breakdown_tokens), "--threads", str(args.threads),
           "--prefill-threads", str(args.prefill_threads), "--seed", str(args.seed), "--max-stall",
           str(args.max_stall), "--max-wait", str(args.max_wait), "--ref-context", str(args.ref_context)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if p.returncode or line is None:
        raise RuntimeError(f"worker for context {C} failed (exit {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", default="4096,16384,32768,65536,131072")
    ap.add_argument("--gen", type=int, default=24, help="decode tokens timed after the first")
    ap.add_argument("--breakdown-tokens", type=int, default=6, help="instrumented decode tokens after the timed ones")
    ap.add_argument("--threads", type=int, default=1, help="torch threads while decoding")
    ap.add_argument("--prefill-threads", type=int, default=1,
                    help="torch threads while prefilling (2 on a shared 2-core machine: OpenMP barriers stall)")
    ap.add_argument("--max-pos", type=int, default=131072 + 4096, help="max_position_embeddings of the model")
    ap.add_argument("--ref-context", type=int, default=4096,
                    help="longer contexts also decode this one in the same process, steps interleaved (0: off)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-stall", type=float, default=0.1)
    ap.add_argument("--max-wait", type=float, default=20.0, help="seconds to wait for idle CPUs before each phase")
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--_worker", dest="worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_context", dest="context", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        with torch.inference_mode():
            res = worker(args)
        print("RESULT " + json.dumps(res), flush=True)
        return

    contexts = [int(c) for c in args.contexts.split(",") if c]
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"machine: {cpu_name()}, {os.cpu_count()} logical CPUs, busy cores now {busy_cores():.1f}; "
          f"torch {torch.__version__}; decode threads {args.threads}, prefill threads {args.prefill_threads}")
    print(f"model: `small` preset, fp32, max_position_embeddings {args.max_pos}; greedy, {args.gen} timed decode "
          f"tokens (median), engine block size 16, prefill chunks of 2048", flush=True)
    res = []
    for C in contexts:
        r = run_worker(C, args)
        res.append(r)
        print(f"  {C}: prefill {r['prefill_s']:.1f} s, peak {r['peak_mb']:.0f} MB (cache {r['cache_mb']:.0f}), "
              f"decode {r['decode_ms']:.1f} ms/token ({r['calm_steps']}/{r['steps']} calm steps)"
              + (f", {r['ref_context']} in the same process {r['ref']['ms']:.1f}" if r["ref"] else "") + "; "
              f"breakdown {json.dumps({k: round(v, 2) for k, v in r['breakdown_ms'].items()})}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f)
    print("\n| context | prefill s (CPU s) | prefill peak MB | of which cache MB | transient MB | decode ms/token "
          "(CPU ms) | calm steps | same-process ratio to the reference context |")
    print("|--------:|------------------:|----------------:|------------------:|-------------:|-----------------"
          "--------:|-----------:|---------------------:|")
    for r in res:
        ratio = ""
        if r["ref"]:
            ratio = (f"{r['decode_ms'] / r['ref']['ms']:.2f}x wall, {r['decode_cpu_ms'] / r['ref']['cpu_ms']:.2f}x CPU "
                     f"({r['ref_context']}: {r['ref']['ms']:.1f} ms)")
        print(f"| {r['context']} | {r['prefill_s']:.1f} ({r['prefill_cpu_s']:.1f}) | {r['peak_mb']:.0f} | "
              f"{r['cache_mb']:.0f} | {r['peak_mb'] - r['cache_mb']:.0f} | {r['decode_ms']:.1f} "
              f"({r['decode_cpu_ms']:.1f}) | {r['calm_steps']}/{r['steps']} | {ratio} |")
    lo, hi = res[0], res[-1]
    print(f"\ndecode ratio {hi['context']} / {lo['context']} across processes: **{hi['decode_ms'] / lo['decode_ms']:.2f}x** "
          f"wall, {hi['decode_cpu_ms'] / lo['decode_cpu_ms']:.2f}x CPU time (target <= 1.5x)")
    for r in res:
        b = r["breakdown_ms"]
        if r["instr_ms"]:
            rest = r["instr_ms"] - sum(b.values())
            parts = ", ".join(f"{k} {v:.1f}" for k, v in sorted(b.items())) + f", rest {rest:.1f}"
            print(f"breakdown at {r['context']} (instrumented steps, medians, ms/token {r['instr_ms']:.1f}): {parts}")


if __name__ == "__main__":
    main()
