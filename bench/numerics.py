"""fp32 against bf16 autocast on this CPU: matrix products, and the speedrun's pre-training step (forward, backward
and the Muon + AdamW step), side by side in one process. This is the choice `glm5 speedrun --autocast auto` makes per
machine (glm5.train.optim.bf16_is_fast: CUDA, or a CPU with AMX or AVX512-BF16).

    .venv/bin/python bench/numerics.py [--steps 6] [--threads 2]

The step: the shipped model's shape (FULL) with seeded random weights, B = 8 x 512 seeded random tokens, one document
per row, the LM and MTP losses through glm5.train.losses.head_ce_sum, as ForwardLoss computes them; one optimizer for
both sides (Muon's Newton-Schulz in bf16 where bf16_is_fast, as the speedrun builds it). Sides alternate
within each round, so load from other processes hits both alike; medians and ratios are printed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def matmul_gflops(dtype: torch.dtype, m: int, k: int, n: int, reps: int = 10) -> float:
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        a @ b
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t0)
    return 2 * m * k * n / statistics.median(ts) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from glm5.loader import load_model
    from glm5.loader import SHIPPED_MODEL_DIR
    from glm5.train.loop import set_stage
    from glm5.train.losses import head_ce_sum, loss_denominators, shifted_labels
    from glm5.train.optim import bf16_is_fast, build_optimizer

    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, bf16 fast here: {bf16_is_fast('cpu')}, "
          f"{torch.get_num_threads()} threads")
    print("| matmul (m, k, n) | fp32 GFLOP/s | bf16 GFLOP/s | bf16 / fp32 |\n|---|---:|---:|---:|")
    for shape in ((2048, 2048, 2048), (4096, 256, 4096), (4096, 256, 1024)):
        f, b = matmul_gflops(torch.float32, *shape), matmul_gflops(torch.bfloat16, *shape)
        print(f"| {shape} | {f:.0f} | {b:.0f} | {b / f:.2f}x |")

    model = load_model(SHIPPED_MODEL_DIR / "config.json", dtype=torch.float32, seed=0)
    model.train()
    set_stage(model, "pretrain", 1)
    opt = build_optimizer(model, "muon", lr=1e-5)  # tiny LR: both sides step from (nearly) the same weights
    R, T = 8, 512
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(0, model.config.vocab_size, (R, T + 1), generator=g)
    doc, pos = torch.zeros_like(toks), torch.arange(T + 1).expand(R, -1)
    keep = torch.ones_like(toks, dtype=torch.bool)
    den = loss_denominators(toks, doc, 1, keep)

    def step(bf16: bool) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            h = model.hidden(toks[:, :-1], pos[:, :-1], None, doc[:, :-1])
            x = model.mtp_hidden(h[:, :T - 1], toks[:, 1:T], pos[:, :T - 1], 0, None, doc[:, :T - 1])
            total = 0.0
            for hh, lab, norm, d in ((h, shifted_labels(toks, doc, 1, T, keep), None, 0),
                                     (x, shifted_labels(toks, doc, 2, T - 1, keep), model.mtp[0].shared_head.norm, 1)):
                total = total + (0.3 if d else 1.0) * head_ce_sum(model.lm_head, hh, lab, norm) / den[f"labels{d}"]
        total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total.item()

    sides = {"fp32": False, "bf16 autocast": True}
    times: dict[str, list[float]] = {k: [] for k in sides}
    losses = {}
    for rnd in range(args.steps + 1):  # round 0 warms up
        for name in (list(sides) if rnd % 2 else list(sides)[::-1]):
            t0 = time.perf_counter()
            losses[name] = step(sides[name])
            if rnd:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\npre-training step, B = {R} x {T}, fwd + bwd + optimizer, median of {args.steps}")
    print("| numerics | s/step | loss | vs fp32 |\n|---|---:|---:|---:|")
    for k in sides:
        print(f"| {k} | {med[k]:.3f} | {losses[k]:.4f} | {med['fp32'] / med[k]:.2f}x |")


if __name__ == "__main__":
    main()
