"""FP8: how to dequantize cheaply on this CPU, then memory, decode speed and quality of the `small` preset
in FP8 vs fp32, one run.

    .venv/bin/python bench/fp8.py [--threads 2] [--tokens 32] [--rounds 5] [--no-compile] [--append BENCHMARKS.md]

1. One matrix, one token (a decode GEMV), each way of applying e4m3 weights with 128x128 float32 scales, vs the
   fp32 GEMV over the same matrix: the reference (torch's float8 -> float32 cast, scale, F.linear), a 256-entry
   lookup table, the bf16 bit trick (the pure-PyTorch fallback), torch.compile of dequantize + matmul (compile time
   reported), and the C kernel (fused dequantize-GEMV; and dequantize rows + BLAS, the path above 8 tokens).
2. The `small` preset: save fp32 -> `quantize --to fp8` -> load_model. Resident bytes of parameters and
   buffers; batch-1 decode tokens/s (glm5.DenseCache, model(ids_step, cache=cache) per token, after a prefill)
   of fp32 (MoE grouped and loop) and FP8 (fast path; reference path; fast with activation quantization),
   interleaved round by round, median per-token time; quality of FP8 vs fp32 logits on random weights.

Contention: the machine is shared. Each timed piece reads the system-wide CPU pressure (/proc/pressure/cpu "some")
and is re-run (up to 5 times) when other tasks stalled it for more than 5% of its wall time; the stall share of
what was kept is printed.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import cpu_stall_us  # bench/machine.py (python puts bench/ on sys.path)
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
import glm5  # noqa: E402
from glm5.model.cache import DenseCache  # noqa: E402
from glm5.quant import (FP8Experts, FP8Linear, dequantize, kernels, quantize,  # noqa: E402
                        quantize_checkpoint, set_linear_impl, weight_bytes)
from glm5.quant.fp8 import _expand  # noqa: E402


def timed(fn):
    """(seconds, share of them during which other tasks waited for a CPU) of one fn() call."""
    s0, t0 = cpu_stall_us(), time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    return dt, (0.0 if s0 is None else (cpu_stall_us() - s0) / 1e6 / dt)


def interleaved(fns: dict, reps: dict, rounds=7):
    """{name: (best seconds per call, mean stall)}: the methods take turns, round after round, so a burst of load
    from other tasks hits all of them; the minimum over rounds is the least disturbed measurement."""
    for fn in fns.values():
        fn()
    best, stalls = {k: float("inf") for k in fns}, {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            dt, st = timed(lambda: [fn() for _ in range(reps[k])])
            best[k] = min(best[k], dt / reps[k])
            stalls[k].append(st)
    return {k: (best[k], statistics.mean(stalls[k])) for k in fns}


# -- 1. one matrix ---------------------------------------------------------------------------------------------------
def lut_dequant(q, s):
    lut = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().nan_to_num(0.0)
    return lut[q.view(torch.uint8).int()] * _expand(s, q.shape, (128, 128))


def matrix_bench(O, I, use_compile, out):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(O, I, generator=g) * 0.02
    q, s = quantize(w)
    x = torch.randn(1, I, generator=g)
    lib = kernels.cpu_lib()
    fns = {"fp32 GEMV (reference speed)": lambda: F.linear(x, w),
           "FP8 reference: torch cast * scale, F.linear": lambda: F.linear(x, dequantize(q, s)),
           "FP8 lookup table (256 floats), F.linear": lambda: F.linear(x, lut_dequant(q, s)),
           "FP8 bf16 bit trick (pure-PyTorch fallback)": lambda: F.linear(x, kernels.dequant_torch(q, s, (128, 128)))}
    if use_compile:
        fn = torch.compile(lambda x, q, s: F.linear(x, q.float() * _expand(s, q.shape, (128, 128))), dynamic=False)
        t0 = time.perf_counter()
        try:
            fn(x, q, s)
            fns[f"FP8 torch.compile dequant+matmul (compile {time.perf_counter() - t0:.1f} s)"] = lambda: fn(x, q, s)
        except Exception as e:  # inductor needs a working C++ toolchain
            out.append(f"  torch.compile failed: {type(e).__name__}: {str(e)[:120]}")
    if lib is not None:
        wf = torch.empty(O, I)
        fns["FP8 C kernel: dequantize rows + BLAS (>8 tokens)"] = \
            lambda: (kernels.dequant_rows_into(wf, q, s, 0, (128, 128), lib), F.linear(x, wf))
        fns["FP8 C kernel: fused dequantize-GEMV (fast path)"] = lambda: kernels.linear_cpu(x, q, s, (128, 128))
    reps = max(2, int(1e7 // (O * I)))
    rows = interleaved(fns, {k: reps * (8 if ("fp32" in k or "C kernel" in k) else 1) for k in fns})
    base = rows["fp32 GEMV (reference speed)"][0]
    out.append(f"\n  [{O} x {I}] one token, {torch.get_num_threads()} threads "
               f"(C kernel vector width {lib.fp8_vector_width() if lib else '-'} floats)")
    out.append(f"  {'method (best of 7 interleaved rounds)':56s} {'us/call':>9s} {'x fp32 time':>11s} {'stall':>6s}")
    for k, (t, st) in rows.items():
        out.append(f"  {k:56s} {t * 1e6:9.1f} {t / base:11.2f} {st:6.1%}")


# -- 2. the small preset ---------------------------------------------------------------------------------------------
def decode_times(model, cfg, prompt, tokens):
    """Per-token seconds of batch-1 greedy decode after a prefill of `prompt`, and the stall share."""
    with torch.inference_mode():
        cache = DenseCache(cfg, 1, prompt.shape[1] + tokens + 1)
        tok = model(prompt, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
        times, stalls = [], []
        for _ in range(tokens):
            def step():
                nonlocal tok
                tok = model(tok, cache=cache)[:, -1].argmax(-1, keepdim=True)
            s0, t0 = cpu_stall_us(), time.perf_counter()
            step()
            dt = time.perf_counter() - t0
            times.append(dt)
            stalls.append(0.0 if s0 is None else (cpu_stall_us() - s0) / 1e6 / dt)
    return times, stalls


def model_bench(args, out):
    cfg = glm5.config.small()
    dense = glm5.load_model(cfg)  # fp32, seeded random weights
    with tempfile.TemporaryDirectory() as tmp:
        glm5.save_checkpoint(dense, Path(tmp) / "fp32")
        t0 = time.perf_counter()
        quantize_checkpoint(Path(tmp) / "fp32", Path(tmp) / "fp8", "fp8")
        t_conv = time.perf_counter() - t0
        ckpt_fp8 = sum(p.stat().st_size for p in (Path(tmp) / "fp8").glob("*.safetensors"))
        ckpt_fp32 = sum(p.stat().st_size for p in (Path(tmp) / "fp32").glob("*.safetensors"))
        t0 = time.perf_counter()
        fp8 = glm5.load_model(Path(tmp) / "fp8")
        t_load = time.perf_counter() - t0
        fp8_bf16 = glm5.load_model(Path(tmp) / "fp8", dtype=torch.bfloat16)
    bf16_bytes = weight_bytes(glm5.load_model(cfg, dtype=torch.bfloat16))
    n = sum(p.numel() for p in dense.parameters())
    embed_head = dense.model.embed_tokens.weight.numel() + dense.lm_head.weight.numel()
    out.append(f"\n  small preset: {n / 1e6:.1f}M parameters, embedding + head {embed_head / n:.0%} of them "
               "(GLM-5: 0.25%); both stay unquantized in GLM-5-FP8")
    out.append(f"  quantize --to fp8: {t_conv:.1f} s, checkpoint {ckpt_fp32 / 1e6:.0f} MB fp32 -> "
               f"{ckpt_fp8 / 1e6:.0f} MB; load_model {t_load:.1f} s")
    out.append(f"  resident weights (parameters + buffers):")
    for name, b in (("fp32", weight_bytes(dense)), ("BF16", bf16_bytes),
                    ("FP8, unquantized tensors fp32 (CPU default)", weight_bytes(fp8)),
                    ("FP8, unquantized tensors BF16 (as stored)", weight_bytes(fp8_bf16))):
        out.append(f"    {name:46s} {b / 1e6:7.1f} MB  {b / bf16_bytes:5.2f}x BF16  "
                   f"{b / weight_bytes(dense):5.2f}x fp32")
    q_fp8 = sum(t.numel() * t.element_size() for t in fp8.buffers() if t.dtype == torch.float8_e4m3fn)
    q_scale = sum(t.numel() * 4 for nm, t in fp8.named_buffers() if nm.endswith("scale_inv"))
    out.append(f"    quantized matrices alone: {(q_fp8 + q_scale) / (2 * q_fp8):.3f}x their BF16 bytes "
               f"(scales {q_scale / q_fp8:.2%} of the e4m3 bytes)")

    # quality on random weights (near-tied logits: KL and centred-logit correlation, top-1 for information), with
    # two yardsticks on the same matrices: BF16 rounding, and 2.6% multiplicative noise (e4m3's RMS rounding error)
    ids = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    quantized = {f"{n}.weight" for n, m in fp8.named_modules() if isinstance(m, FP8Linear) or n.endswith("kv_b_proj")}
    quantized |= {f"{n}.{p}" for n, m in fp8.named_modules() if isinstance(m, FP8Experts) for p in FP8Experts.PROJS}
    g = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        ref = dense(ids)
        res = {}
        for label, act in (("FP8 (fast, fp32 activations)", False), ("FP8 (fast, e4m3 activations 1x128)", True)):
            set_linear_impl(fp8, "fast", act_quant=act)
            res[label] = _quality(ref, fp8(ids))
        set_linear_impl(fp8, "fast", act_quant=False)
        params = dict(dense.named_parameters())
        saved = {k: params[k].clone() for k in quantized}
        for label, change in (("control: those matrices rounded to BF16", lambda t: t.bfloat16().float()),
                              ("control: those matrices x (1 + 2.6% noise)",
                               lambda t: t * (1 + 0.026 * torch.randn(t.shape, generator=g)))):
            for k in quantized:
                params[k].copy_(change(saved[k]))
            res[label] = _quality(ref, dense(ids))
        for k in quantized:
            params[k].copy_(saved[k])
    out.append("  quality vs fp32, random weights (near-tied logits), 2 x 64 tokens:")
    for k, (kl, corr, top1) in res.items():
        out.append(f"    {k:44s} mean KL {kl:.2e}  centred-logit corr {corr:.5f}  top-1 agree {top1:.1%}")

    # decode, interleaved rounds
    prompt = torch.randint(0, cfg.vocab_size, (1, 64), generator=torch.Generator().manual_seed(2))
    variants = {"fp32, MoE grouped (default)": (dense, glm5.Impl(moe="grouped"), None),
                "fp32, MoE loop": (dense, glm5.Impl(moe="loop"), None),
                "FP8 fast (C kernel)": (fp8, glm5.Impl(), ("fast", False)),
                "FP8 fast + e4m3 activations": (fp8, glm5.Impl(), ("fast", True)),
                "FP8 reference (dequantize + F.linear)": (fp8, glm5.Impl(), ("reference", False))}
    times = {k: [] for k in variants}
    stalls = {k: [] for k in variants}
    for r in range(args.rounds):
        for k, (model, impl, lin) in variants.items():
            model.impl = impl
            if lin is not None:
                set_linear_impl(model, lin[0], act_quant=lin[1])
            ntok = args.tokens if "reference" not in k else max(4, args.tokens // 8)  # the slow one, fewer tokens
            t, st = decode_times(model, cfg, prompt, ntok)
            times[k] += t[1:]  # the first step after prefill warms caches
            stalls[k] += st[1:]
    set_linear_impl(fp8, "fast", act_quant=False)
    med = {k: statistics.median(ts) for k, ts in times.items()}
    p10 = {k: statistics.quantiles(ts, n=10)[0] for k, ts in times.items()}
    base = "fp32, MoE grouped (default)"
    out.append(f"  batch-1 decode after a 64-token prefill, {args.rounds} interleaved rounds, "
               f"{torch.get_num_threads()} threads; per-token times (stall = share of the time other tasks waited "
               "for a CPU: the machine is shared, p10 is the least disturbed):")
    out.append(f"    {'variant':40s} {'median ms':>9s} {'tok/s':>6s} {'x fp32':>7s} {'p10 ms':>7s} {'tok/s':>6s} "
               f"{'x fp32':>7s} {'stall':>6s}")
    for k in times:
        out.append(f"    {k:40s} {med[k] * 1e3:9.1f} {1 / med[k]:6.1f} {med[base] / med[k]:7.2f} {p10[k] * 1e3:7.1f} "
                   f"{1 / p10[k]:6.1f} {p10[base] / p10[k]:7.2f} {statistics.mean(stalls[k]):6.1%}")


def _quality(ref, out):
    lr, lo = ref.log_softmax(-1), out.log_softmax(-1)
    kl = (lr.exp() * (lr - lo)).sum(-1).mean().item()
    cr, co = ref - ref.mean(-1, keepdim=True), out - out.mean(-1, keepdim=True)
    corr = ((cr * co).sum(-1) / (cr.norm(dim=-1) * co.norm(dim=-1))).mean().item()
    return kl, corr, (ref.argmax(-1) == out.argmax(-1)).float().mean().item()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=32, help="decode tokens per variant per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument("--append", help="append the report, as a '## FP8' section, to this markdown file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = []
    t0 = time.perf_counter()
    kernels.cpu_lib()
    out.append(f"FP8 CPU kernel build/load: {time.perf_counter() - t0:.2f} s")
    matrix_bench(2048, 6144, not args.no_compile, out)  # a GLM-5 routed expert's gate/up projection
    matrix_bench(1536, 512, False, out)  # small preset dense MLP gate/up
    model_bench(args, out)
    text = "\n".join(out)
    print(text)
    if args.append:
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
        with open(args.append, "a") as f:
            f.write(f"\n## FP8\n\n`.venv/bin/python bench/fp8.py` on {datetime.date.today()}, {cpu}, "
                    f"torch {torch.__version__}; one run on a shared machine (see the stall columns)."
                    f"\n\n```\n{text}\n```\n")


if __name__ == "__main__":
    main()
