"""Building blocks shared by MLA, the indexer, MoE and MTP: RMSNorm, interleaved RoPE, SwiGLU MLP.

Letters: B batch, T query tokens, S key slots, H heads, D model dim, R rope dim, F MLP width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # the same products in the same order as below, in one call (a decode step normalises ~40 times)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Normalise in fp32 (bf16 sums of squares lose ~3 digits), cast back, then scale: the reference's order.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_angles(positions_BT: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [B, T, dim/2] for plain (unscaled) RoPE; computed per call, so the model has no buffers."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=positions_BT.device, dtype=torch.float32) / dim))
    ang = positions_BT[..., None].float() * inv_freq
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos_BTr: torch.Tensor, sin_BTr: torch.Tensor) -> torch.Tensor:
    """Interleaved (GPT-J) RoPE on x [B, T, ..., R]: pairs (x0, x1), (x2, x3), ... rotate together.

    The result is written de-interleaved, [rotated evens | rotated odds], exactly as the reference does. Queries and
    keys get the same permutation, so every dot product is that of the interleaved layout and caches stay
    interchangeable with the reference's.
    """
    extra = x.dim() - cos_BTr.dim()
    shape = cos_BTr.shape[:2] + (1,) * extra + cos_BTr.shape[2:]
    cos, sin = cos_BTr.reshape(shape).to(x.dtype), sin_BTr.reshape(shape).to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Dense layers and the shared expert."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
