"""Optimizers and learning-rate schedules.

- "adamw": AdamW for everything; weight decay on matrices only (norms, biases and the router bias vector are not
  decayed: shrinking a norm's gain toward 0 is not regularisation).
- "muon": torch's own `torch.optim.Muon` for the 2-D hidden matrices, AdamW for the rest (embedding, head, norms,
  the stacked 3-D expert weights, vectors). Muon orthogonalises each update with Newton-Schulz; it is meant for
  hidden-layer matrices, not for the embedding/head (Keller Jordan's Muon; Moonlight). Its step size is matched to
  AdamW's update RMS (`adjust_lr_fn="match_rms_adamw"`, Moonlight §2.2) so one LR schedule drives both.
  Its Newton-Schulz iterations run in bf16 where bf16 products are fast (CUDA, CPUs with AMX or AVX512-BF16), as
  torch's do, and in fp32 elsewhere: on an AVX2 CPU torch's bf16 iterations made a FULL pre-training step 2.2x slower.
  Not done: GLM-5's "Muon Split" (orthogonalising each head's slice of the MLA up-projections separately) and Muon
  for the 3-D expert stacks; both would need their own Newton-Schulz call per slice.

Schedules: linear warm-up, then cosine to min_lr_ratio, or WSD (warm-up, stable, then linear decay over the last
decay_frac of the steps), or constant. The schedule is a pure function of the step, so it needs no saved state
beyond the step counter.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim._muon import _adjust_lr  # torch's per-matrix Muon LR, reused as is

OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd", "constant")
_NO_MUON = ("model.embed_tokens.weight", "lm_head.weight")


def bf16_is_fast(device: str | torch.device) -> bool:
    """Are bf16 matrix products fast here: CUDA, or a CPU with AMX or AVX512-BF16? (A 2-core AVX512-BF16 EPYC
    multiplies bf16 at ~700 GFLOP/s against ~135 in fp32; AVX2 CPUs multiply bf16 hundreds of times slower than
    fp32.)"""
    if torch.device(device).type == "cuda":
        return True
    return any(bool(getattr(torch.cpu, probe, lambda: False)())
               for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def newton_schulz(g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """torch.optim.Muon's quintic Newton-Schulz orthogonalisation of a matrix, computed in `dtype`."""
    a, b, c = coefficients
    x = g.to(dtype)
    if g.size(0) > g.size(1):
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if g.size(0) > g.size(1) else x


class Muon(torch.optim.Muon):
    """torch.optim.Muon (same hyperparameters, state and update) with its Newton-Schulz iterations in `ns_dtype`:
    torch's always run in bf16. bf16 takes torch's own step."""

    def __init__(self, params, ns_dtype: torch.dtype = torch.bfloat16, **kwargs):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        if self.ns_dtype == torch.bfloat16:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                buf.lerp_(p.grad, 1 - group["momentum"])
                update = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                update = newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"],
                                       self.ns_dtype)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-_adjust_lr(group["lr"], group["adjust_lr_fn"], p.shape))
        return loss


class Optimizers:
    """One or more torch optimizers stepped as one (Muon + AdamW). `opts` is what the state-dict helpers take."""

    def __init__(self, opts: list[torch.optim.Optimizer]):
        self.opts = opts

    @property
    def param_groups(self):
        return [g for o in self.opts for g in o.param_groups]

    def step(self):
        for o in self.opts:
            o.step()

    def zero_grad(self, set_to_none: bool = True):
        for o in self.opts:
            o.zero_grad(set_to_none=set_to_none)


def build_optimizer(model: nn.Module, name: str = "adamw", lr: float = 3e-4, weight_decay: float = 0.1,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, muon_momentum: float = 0.95,
                    sharded: bool = False) -> Optimizers:
    """Optimizer(s) over the trainable parameters of `model` (a GLM5; names decide who gets Muon)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("no trainable parameters (did the stage freeze everything?)")
    muon, decay, no_decay = [], [], []
    for n, p in named:
        if name == "muon" and p.ndim == 2 and n not in _NO_MUON:
            muon.append(p)
        elif p.ndim >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    opts = []
    if muon:
        if sharded:
            # Newton-Schulz must see the whole matrix; under FSDP2 each rank holds a row shard of it.
            raise ValueError("optimizer 'muon' needs whole matrices: use it with DDP (parallel='ddp'), not FSDP2")
        opts.append(Muon(muon, lr=lr, weight_decay=weight_decay, momentum=muon_momentum, adjust_lr_fn="match_rms_adamw",
                         ns_dtype=torch.bfloat16 if bf16_is_fast(muon[0].device) else torch.float32))
    groups = [{"params": g, "weight_decay": wd} for g, wd in ((decay, weight_decay), (no_decay, 0.0)) if g]
    if groups:
        # fused: one pass over each tensor instead of ~8 elementwise kernels (CPU and CUDA both have it): measured
        # 4.7x faster on CPU for 100M parameters, where the unfused step cost as much as forward + backward.
        opts.append(torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True))
    return Optimizers(opts)


def lr_factor(step: int, total: int, warmup: int = 0, schedule: str = "cosine", min_ratio: float = 0.1,
              decay_frac: float = 0.2) -> float:
    """LR multiplier for optimizer step `step` (0-based) of `total`."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        frac = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    decay_start = total - int(round(decay_frac * total))  # WSD: hold, then a linear decay at the end
    if step < max(decay_start, warmup):
        return 1.0
    frac = (step - decay_start + 1) / max(1, total - decay_start)
    return 1.0 - (1.0 - min_ratio) * min(1.0, frac)


def set_lr(opt: Optimizers, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr
