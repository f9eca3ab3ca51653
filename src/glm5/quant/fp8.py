"""Block-wise FP8 in the GLM-5-FP8 format, the DeepSeek-V3 one (deepseek-ai/DeepSeek-V3 inference/kernel.py
`weight_dequant`): e4m3 weights with one float32 `weight_scale_inv` per 128x128 block (edge blocks where a dimension
is not a multiple of 128), dequantized as w * scale_inv.

Modules that keep FP8 in memory exactly as the checkpoint stores it:
  - FP8Linear: `weight` (float8_e4m3fn [O, I]) and `weight_scale_inv` (float32 [ceil(O/bo), ceil(I/bi)]), buffers
    under the checkpoint's own names;
  - FP8Experts: the routed experts, stacked like glm5.model.moe.Experts ([E, F, D] e4m3 + [E, ., .] scales); the
    routing of tokens to experts is glm5.model.moe.dispatch for both.
Both are buffers, not parameters: nothing trains them, optimizers and `GLM5.cast_` never touch them, and
`.to(dtype)` / `.float()` move them between devices but never change their dtype (see `_keep_dtypes`).

Two linear implementations, kept equal by tests/test_fp8.py:
  - "reference": dequantize per block to fp32, then F.linear;
  - "fast": on CUDA sm90+ `torch.nn.functional.scaled_mm` with 1x128 activation and 128x128 weight blocks (the
    release's dynamic activation scheme is built in there); on CPU the fused C kernel of kernels.py; elsewhere
    dequantize in the activation dtype and matmul.
Dynamic per-token 1x128 activation quantization (the release's `activation_scheme: dynamic`) is a switch,
`act_quant`, honoured by both CPU paths; off by default on CPU, where fp32 activations cost nothing extra.

Letters: N tokens, O out features, I in features, E experts, F expert width, D model dim, k experts per token.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..model.moe import dispatch
from . import kernels

log = logging.getLogger("glm5.quant")

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn
BLOCK = (128, 128)
LINEAR_IMPLS = ("fast", "reference")


# -- the format --------------------------------------------------------------------------------------------------
def scale_shape(shape, block=BLOCK) -> tuple[int, ...]:
    """[..., O, I] -> [..., ceil(O/bo), ceil(I/bi)]."""
    *lead, O, I = shape
    return (*lead, math.ceil(O / block[0]), math.ceil(I / block[1]))


def _expand(s: torch.Tensor, shape, block) -> torch.Tensor:
    """Per-block scales [..., KO, KI] -> per-element [..., O, I]."""
    O, I = shape[-2:]
    return s.repeat_interleave(block[0], dim=-2)[..., :O, :].repeat_interleave(block[1], dim=-1)[..., :I]


def quantize(w: torch.Tensor, block=BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., O, I] (any float dtype) -> (e4m3 [..., O, I], float32 scale_inv [..., KO, KI]).

    Each block's largest |w| maps to 448 (scale_inv = amax / 448; an all-zero block gets scale 1). The division
    and the cast round to nearest, so |w - q * s| <= max(|w| * 2^-4, s * 2^-10) per element: 3 mantissa bits,
    and half the subnormal spacing 2^-9 near zero."""
    if w.dim() < 2:
        raise ValueError(f"FP8 block quantization needs a matrix, got shape {tuple(w.shape)}")
    *lead, O, I = w.shape
    bo, bi = block
    KO, KI = math.ceil(O / bo), math.ceil(I / bi)
    w32 = w.float()  # amax and division in fp32 whatever the input dtype
    padded = F.pad(w32, (0, KI * bi - I, 0, KO * bo - O))
    amax = padded.reshape(*lead, KO, bo, KI, bi).abs().amax(dim=(-3, -1))
    s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (w32 / _expand(s, w.shape, block)).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return q, s


def dequantize(q: torch.Tensor, s: torch.Tensor, block=BLOCK, dtype=torch.float32) -> torch.Tensor:
    """The reference: q [..., O, I] e4m3 times its block's scale, in fp32, then cast to dtype."""
    check_scale(q, s, block)
    return (q.float() * _expand(s.float(), q.shape, block)).to(dtype)


def check_scale(q: torch.Tensor, s: torch.Tensor, block=BLOCK, name: str = "weight") -> None:
    want = scale_shape(q.shape, block)
    if tuple(s.shape) != want:
        raise ValueError(f"{name}_scale_inv has shape {list(s.shape)}, expected {list(want)} for {name} "
                         f"{list(q.shape)} in {block[0]}x{block[1]} blocks")


def quantize_act(x: torch.Tensor, group: int = 128) -> torch.Tensor:
    """Dynamic per-token 1 x group activation quantization, returned dequantized (fp32): what the release's
    `activation_scheme: dynamic` does to a linear's input before an FP8 GEMM."""
    x2 = x.reshape(-1, x.shape[-1])
    q, s = quantize(x2, (1, group))
    return dequantize(q, s, (1, group)).view(x.shape)


# -- linear ------------------------------------------------------------------------------------------------------
def linear_reference(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, block=BLOCK, act_quant: bool = False,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    xf = x.float()  # fp32 math: the yardstick the fast paths are held to
    if act_quant:
        xf = quantize_act(xf, block[1])
    y = F.linear(xf, dequantize(q, s, block), None if bias is None else bias.float())
    return y.to(x.dtype)


def linear_fast(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, block=BLOCK, act_quant: bool = False,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    *lead, I = x.shape
    O = q.shape[0]
    if x.is_cuda and _scaled_mm_ok(x.device, q.shape, block):
        try:
            y = _linear_scaled_mm(x.reshape(-1, I), q, s).view(*lead, O)
            return y if bias is None else y + bias
        except RuntimeError as e:  # the CPU test suite never runs this: say so once and keep a correct path
            _SCALED_MM_FAILED.add(x.device.index)
            log.warning("FP8: scaled_mm failed on %s (%s); dequantizing instead", x.device, e)
    if x.device.type == "cpu":
        x2 = x.reshape(-1, I).float()
        if act_quant:
            x2 = quantize_act(x2, block[1])
        y = kernels.linear_cpu(x2.contiguous(), q, s, block).view(*lead, O)
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype)
    xin = quantize_act(x.float(), block[1]).to(x.dtype) if act_quant else x
    return F.linear(xin, dequantize(q, s, block, x.dtype), bias)


_SCALED_MM_FAILED: set = set()


def _scaled_mm_ok(device: torch.device, shape, block) -> bool:
    # cuBLAS block-scaled FP8 GEMM: Hopper (sm90) and newer, 128x128 weight blocks, dims in whole blocks.
    if device.index in _SCALED_MM_FAILED or tuple(block) != (128, 128) or not hasattr(F, "scaled_mm"):
        return False
    O, I = shape
    return torch.cuda.get_device_capability(device) >= (9, 0) and O % 128 == 0 and I % 128 == 0


def _linear_scaled_mm(x_NI: torch.Tensor, q_OI: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Not run by the CPU test suite. x quantized per token per 128 channels (the release's dynamic scheme);
    cuBLAS wants the activation scales outer-dim-major, the token count a multiple of 4 and the weight scale's
    K-blocks a multiple of 4 (zero-padded)."""
    N = x_NI.shape[0]
    xp = F.pad(x_NI, (0, 0, 0, -N % 4))
    xq, xs = quantize(xp, (1, 128))
    KI = s.shape[1]
    sp = F.pad(s, (0, -KI % 4))
    y = F.scaled_mm(xq, q_OI.t(), xs.t().contiguous().t(), F.ScalingType.BlockWise1x128, sp.t(),
                    F.ScalingType.BlockWise128x128, output_dtype=x_NI.dtype)
    return y[:N]


_LINEARS = {"fast": linear_fast, "reference": linear_reference}


def _keep_dtypes(module: nn.Module, fn):
    """nn.Module._apply for modules holding FP8 buffers: apply fn (device moves), but never change a buffer's
    dtype: `.to(torch.float32)` on an e4m3 tensor would drop its scales and keep garbage; bf16 scales would round."""
    for key, t in module._buffers.items():
        if t is None:
            continue
        new = fn(t)
        module._buffers[key] = new if new.dtype == t.dtype else t.to(new.device)
    for key, p in module._parameters.items():
        if p is not None:
            module._parameters[key] = nn.Parameter(fn(p.data), requires_grad=p.requires_grad)
    return module


class FP8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, block=BLOCK, device=None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.block = in_features, out_features, tuple(block)
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=FP8, device=device))
        self.register_buffer("weight_scale_inv", torch.empty(scale_shape((out_features, in_features), block),
                                                             dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        self.impl = "fast"
        self.act_quant = False

    @classmethod
    def from_linear(cls, lin: nn.Linear, block=BLOCK) -> "FP8Linear":
        """Quantize a dense nn.Linear (weights on a real device)."""
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, block, lin.weight.device, lin.weight.dtype)
        q, s = quantize(lin.weight.detach(), block)
        m.weight.copy_(q)
        m.weight_scale_inv.copy_(s)
        if lin.bias is not None:
            m.bias.data.copy_(lin.bias.detach())
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.impl not in _LINEARS:
            raise ValueError(f"FP8Linear.impl must be one of {LINEAR_IMPLS}, got {self.impl!r}")
        return _LINEARS[self.impl](x, self.weight, self.weight_scale_inv, self.block, self.act_quant, self.bias)

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize(self.weight, self.weight_scale_inv, self.block, dtype)

    def _apply(self, fn, recurse=True):
        return _keep_dtypes(self, fn)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, e4m3 {self.block[0]}x"
                f"{self.block[1]} blocks, impl={self.impl}, act_quant={self.act_quant}")


class FP8Experts(nn.Module):
    """Routed experts with e4m3 weights: buffers gate_proj / up_proj [E, F, D], down_proj [E, D, F], each with a
    `<name>_scale_inv` [E, ceil(./bo), ceil(./bi)]. Same forward as glm5.model.moe.Experts, through the FP8 linear;
    with no FP8 grouped GEMM (none on CPU), "grouped" runs one expert at a time over its sorted rows."""

    PROJS = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, n_experts: int, dim: int, width: int, block=BLOCK, device=None):
        super().__init__()
        self.block = tuple(block)
        for name, shape in (("gate_proj", (n_experts, width, dim)), ("up_proj", (n_experts, width, dim)),
                            ("down_proj", (n_experts, dim, width))):
            self.register_buffer(name, torch.empty(shape, dtype=FP8, device=device))
            self.register_buffer(f"{name}_scale_inv", torch.empty(scale_shape(shape, block), dtype=torch.float32,
                                                                   device=device))
        self.impl = "fast"
        self.act_quant = False

    @classmethod
    def from_experts(cls, experts: nn.Module, block=BLOCK) -> "FP8Experts":
        E, Fw, D = experts.gate_proj.shape
        m = cls(E, D, Fw, block, experts.gate_proj.device)
        for name in cls.PROJS:
            q, s = quantize(getattr(experts, name).detach(), block)
            getattr(m, name).copy_(q)
            getattr(m, f"{name}_scale_inv").copy_(s)
        return m

    def proj(self, x_MI: torch.Tensor, name: str, e: int) -> torch.Tensor:
        return _LINEARS[self.impl](x_MI, getattr(self, name)[e], getattr(self, f"{name}_scale_inv")[e], self.block,
                                   self.act_quant)

    def forward(self, x_ND, w_Nk, idx_Nk, impl: str = "grouped"):
        if self.impl not in _LINEARS:
            raise ValueError(f"FP8Experts.impl must be one of {LINEAR_IMPLS}, got {self.impl!r}")
        return dispatch(x_ND, w_Nk, idx_Nk, self.gate_proj.shape[0], self.proj, impl)

    def dequantized(self, name: str, dtype=torch.float32) -> torch.Tensor:
        return dequantize(getattr(self, name), getattr(self, f"{name}_scale_inv"), self.block, dtype)

    def _apply(self, fn, recurse=True):
        return _keep_dtypes(self, fn)

    def extra_repr(self) -> str:
        E, Fw, D = self.gate_proj.shape
        return f"experts={E}, dim={D}, width={Fw}, e4m3 {self.block[0]}x{self.block[1]} blocks, impl={self.impl}"


def set_linear_impl(model: nn.Module, impl: str = "fast", act_quant: bool | None = None) -> nn.Module:
    """Switch every FP8 module of a model between the fast and the reference linear (and activation quantization)."""
    if impl not in LINEAR_IMPLS:
        raise ValueError(f"impl must be one of {LINEAR_IMPLS}, got {impl!r}")
    for m in model.modules():
        if isinstance(m, (FP8Linear, FP8Experts)):
            m.impl = impl
            if act_quant is not None:
                m.act_quant = act_quant
    return model


def weight_bytes(model: nn.Module) -> int:
    """Resident bytes of a model's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
