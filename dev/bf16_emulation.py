"""bf16 autocast's numerics on CPUs without fast bf16 matrix products -- an experiment tool (dev/LOG.md, session 11),
not part of the package.

Session 11 asked whether bf16's roundings are why FULL's pre-training learned to copy on the AMX machine (4 of 4
runs) and never on the AVX2 one (0 of 5). With this mode, seeds 0 and 1 on the AVX2 machine did not copy either, so
it is not on main. It is kept here for the next step: if FULL in fp32 on AMX does not copy either, AMX's own bf16
arithmetic is the suspect, and this is where to teach it.

Inside `Bf16MatmulsInFp32`, autocast itself stays on (every tensor has the dtype autocast gives it, so every
elementwise op rounds as it does there) and only the products change kernels:
- a matrix product on bf16 inputs widens them (exactly), multiplies with the fp32 kernel and rounds the result to
  bf16: a bf16 product with fp32 accumulation, up to summation order;
- flash attention (`F.scaled_dot_product_attention`'s CPU kernel) is computed in fp32 with the bf16 kernel's
  roundings (read off aten/src/ATen/native/cpu/FlashAttentionKernel.cpp): probabilities rounded to bf16 before
  their product with V, keys in blocks of 512, in the backward pass the probabilities and score gradients rounded
  and the gradients added into bf16 block by block.
The mode sits below autograd, so the backward pass's products are treated alike. Use it around forward and backward
with bf16 autocast on (the branch s11-bf16-emulation wired it into TrainConfig.autocast = "bf16-emulated"):

    with Bf16MatmulsInFp32(), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(...); loss.backward()

`python dev/bf16_emulation.py` compares its flash attention with this machine's bf16 kernel (slow but exact) and with
fp32. Measured in session 11 (1 x 2 heads x 200 queries x 600 keys x 16): equal elements 86-99% (fp32 rounded to
bf16: 45-60%), mean error 4-80x below fp32's; on the shipped model, gradients 2.6x closer to bf16's than fp32's.
Cost: a FULL pre-training step ~2.9 s against ~2.0 s in fp32 (2 AVX2 threads).
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
BF16 = torch.bfloat16
_SDPA = aten._scaled_dot_product_flash_attention_for_cpu.default
_SDPA_BACKWARD = aten._scaled_dot_product_flash_attention_for_cpu_backward.default
# The products CPU autocast runs in bf16 (aten level: F.linear, matmul and einsum lower to these).
PRODUCTS = frozenset({aten.mm.default, aten.bmm.default, aten.addmm.default, aten.baddbmm.default,
                      aten.addbmm.default, aten.mv.default, aten.dot.default})
KV_SPLIT = 512  # the CPU flash kernel's key block


def _widen(x):
    return x.float() if isinstance(x, torch.Tensor) and x.dtype == BF16 else x


def _round(x):
    return x.to(BF16) if isinstance(x, torch.Tensor) and x.dtype == torch.float32 else x


def _scores(q, k, mask, scale, is_causal, t0, s0):
    """fp32 scores of queries [t0, t0 + T) against keys [s0, s0 + S), mask added as the kernel adds it."""
    s = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
    if mask is not None:
        s.add_(mask[..., t0:t0 + q.shape[-2], s0:s0 + k.shape[-2]])
    if is_causal:
        rows = torch.arange(t0, t0 + q.shape[-2])[:, None]
        s.masked_fill_(torch.arange(s0, s0 + k.shape[-2]) > rows, float("-inf"))
    return s


def _bf16(x):
    """x rounded to bf16, kept in fp32 for the fp32 kernels."""
    return x.to(BF16).float()


def flash_attention(q, k, v, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None):
    """The CPU flash kernel's forward on bf16 [B, H, T, E] inputs, in fp32 with its roundings: scores and softmax
    in fp32, the probabilities rounded to bf16 before the product with V, keys in blocks of 512 (online softmax),
    the output rounded to bf16. Returns (output, logsumexp)."""
    assert dropout_p == 0.0, "dropout is not emulated"
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = q.float(), k.float(), v.float()
    m = total = acc = None
    for s0 in range(0, k.shape[-2], KV_SPLIT):
        p = _scores(q, k[..., s0:s0 + KV_SPLIT, :], attn_mask, scale, is_causal, 0, s0)
        new = p.amax(-1, keepdim=True) if m is None else torch.maximum(m, p.amax(-1, keepdim=True))
        new.masked_fill_(new == float("-inf"), 0.0)  # a row with every key masked: zeros, not NaN
        p.sub_(new).exp_()
        if m is None:
            total, acc = p.sum(-1, keepdim=True), torch.matmul(_bf16(p), v[..., s0:s0 + KV_SPLIT, :])
        else:
            fade = torch.exp(m - new)
            total = p.sum(-1, keepdim=True).add_(fade * total)
            acc = (acc * fade).add_(torch.matmul(_bf16(p), v[..., s0:s0 + KV_SPLIT, :]))
        m = new
    total.masked_fill_(total == 0, 1.0)
    return acc.mul_(1 / total).to(BF16), (m + torch.log(total)).squeeze(-1)


def flash_attention_backward(grad_out, q, k, v, out, lse, dropout_p=0.0, is_causal=False, *, attn_mask=None,
                             scale=None):
    """The CPU flash kernel's backward on bf16 inputs, block by block as it goes (queries in blocks of 32 / 64 / 256
    by length, keys in blocks of 512): probabilities recomputed in fp32 from the logsumexp and rounded to bf16 for
    the products, as are the score gradients; the gradients are bf16 tensors the blocks' products add into."""
    assert dropout_p == 0.0, "dropout is not emulated"
    if k.shape[:-2] != q.shape[:-2]:
        raise ValueError("emulated flash attention backward expects as many key heads as query heads")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    T = q.shape[-2]
    q_split = 256 if T >= 768 else 64 if T >= 192 else 32
    go, qf, kf, vf = grad_out.float(), q.float(), k.float(), v.float()
    dsum = (go * out.float()).sum(-1, keepdim=True)
    grad_q, grad_k, grad_v = (torch.zeros(x.shape) for x in (q, k, v))  # each holds bf16 values
    for t0 in range(0, T, q_split):
        t1 = min(T, t0 + q_split)
        keys = min(t1, k.shape[-2]) if is_causal else k.shape[-2]
        for s0 in range(0, keys, KV_SPLIT):
            s1 = min(keys, s0 + KV_SPLIT)
            p = _scores(qf[..., t0:t1, :], kf[..., s0:s1, :], attn_mask, scale, is_causal, t0, s0)
            p.sub_(lse[..., t0:t1, None]).exp_()
            grad_v[..., s0:s1, :] = _bf16(torch.matmul(_bf16(p).transpose(-1, -2), go[..., t0:t1, :])
                                          .add_(grad_v[..., s0:s1, :]))
            ds = _bf16(p.mul_(torch.matmul(go[..., t0:t1, :], vf[..., s0:s1, :].transpose(-1, -2))
                              .sub_(dsum[..., t0:t1, :])))
            grad_q[..., t0:t1, :] = _bf16(torch.matmul(ds, kf[..., s0:s1, :]).mul_(scale)
                                          .add_(grad_q[..., t0:t1, :]))
            grad_k[..., s0:s1, :] = _bf16(torch.matmul(ds.transpose(-1, -2), qf[..., t0:t1, :]).mul_(scale)
                                          .add_(grad_k[..., s0:s1, :]))
    return grad_q.to(BF16), grad_k.to(BF16), grad_v.to(BF16)


class Bf16MatmulsInFp32(TorchDispatchMode):
    """Within this mode, matrix products on bf16 tensors compute in fp32 and return bf16 (see the module doc)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        bf16 = any(isinstance(a, torch.Tensor) and a.dtype == BF16 for a in (*args, *kwargs.values()))
        if not bf16 or func not in (*PRODUCTS, _SDPA, _SDPA_BACKWARD):
            return func(*args, **kwargs)
        if func == _SDPA:
            return flash_attention(*args, **kwargs)
        if func == _SDPA_BACKWARD:
            return flash_attention_backward(*args, **kwargs)
        return _round(func(*[_widen(a) for a in args], **{k: _widen(v) for k, v in kwargs.items()}))


if __name__ == "__main__":
    import contextlib

    g = torch.Generator().manual_seed(0)
    B, H, T, S, E = 1, 2, 200, 600, 16
    q, k, v = (torch.randn(B, H, n, E, generator=g).bfloat16().requires_grad_() for n in (T, S, S))
    mask = torch.where(torch.rand(B, 1, T, S, generator=g) < 0.7, 0.0, torch.finfo(BF16).min).to(BF16)
    grad_out = torch.randn(B, H, T, E, generator=g).to(BF16)
    results = {}
    for mode in ("bf16", "emulated", "fp32"):
        inputs = [x.detach().float().requires_grad_() for x in (q, k, v)] if mode == "fp32" else [q, k, v]
        with Bf16MatmulsInFp32() if mode == "emulated" else contextlib.nullcontext():
            out = torch.nn.functional.scaled_dot_product_attention(*inputs, attn_mask=mask.to(inputs[0].dtype))
            out.backward(grad_out.to(out.dtype))
        results[mode] = [out.detach().to(BF16).float()] + [x.grad.to(BF16).float() for x in inputs]
        for x in (q, k, v):
            x.grad = None
    print("against the bf16 kernel: share of equal elements, mean relative error")
    for name, ref, emu, f32 in zip(("out", "dq", "dk", "dv"), *results.values()):
        row = [f"{m} {(x == ref).float().mean():.3f} {((x - ref).abs().mean() / ref.abs().mean()):.1e}"
               for m, x in (("emulated", emu), ("fp32", f32))]
        print(f"{name:4s}", "   ".join(row))
