"""Muon's optimizer step on the speedrun model's hidden matrices: torch.optim.Muon (Newton-Schulz in bf16) vs
glm5.train.optim.Muon with the iterations in fp32 (what glm5 picks where bf16 products are slow: AVX2 CPUs).

    .venv/bin/python bench/muon.py [--threads 1] [--steps 7]

Both optimizers step the same parameters (every 2-D hidden matrix of FULL's model that Muon trains in pre-training,
random weights and gradients), alternating step by step; prints the median seconds per step of each and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from glm5.config import ModelConfig
    from glm5.model.model import GLM5
    from glm5.speedrun.recipe import FULL
    from glm5.train.loop import set_stage
    from glm5.train.optim import _NO_MUON, Muon, bf16_is_fast

    model = GLM5(ModelConfig(**FULL.model, vocab_size=FULL.vocab_size, index_topk=FULL.index_topk))
    set_stage(model, "pretrain", 1)
    shapes = [p.shape for n, p in model.named_parameters() if p.requires_grad and p.ndim == 2 and n not in _NO_MUON]
    g = torch.Generator().manual_seed(0)
    sides = {}
    for name, make in (("torch.optim.Muon (bf16 Newton-Schulz)", lambda ps: torch.optim.Muon(ps, lr=3e-3)),
                       ("glm5 Muon (fp32 Newton-Schulz)", lambda ps: Muon(ps, lr=3e-3, ns_dtype=torch.float32))):
        ps = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in shapes]
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        sides[name] = (make(ps), [])
    for _ in range(args.steps + 1):  # the first round warms up
        for opt, times in sides.values():
            t0 = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t0)
    print(f"{len(shapes)} matrices, {sum(s.numel() for s in shapes) / 1e6:.2f}M parameters, {args.threads} thread(s), "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, bf16 fast here: {bf16_is_fast('cpu')}")
    med = {name: statistics.median(times[1:]) for name, (_, times) in sides.items()}
    ref = next(iter(med.values()))
    for name, t in med.items():
        print(f"| {name} | {1000 * t:.1f} ms | {ref / t:.2f}x |")


if __name__ == "__main__":
    main()
