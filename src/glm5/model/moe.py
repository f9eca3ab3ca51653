"""DeepSeek-V3 Mixture of Experts as used by GLM-5 (DeepSeek-V3 paper, arXiv:2412.19437 §2.1.2; deepseek-ai/DeepSeek-V3
inference/model.py `Gate` and `MoE`).

Router: sigmoid scores; `e_score_correction_bias` is added for *choosing* experts only (aux-loss-free balancing
moves it between steps); group-limited top-k; weights are the unbiased scores of the chosen experts, normalised
to sum 1 (norm_topk_prob) and scaled by routed_scaling_factor.

Experts: `dispatch` sends each token to its k experts and sums their outputs, for the dense `Experts` here and the
FP8 ones of glm5.quant.fp8 alike; an experts module only says how to apply one of its matrices.

Letters: N tokens, M (token, expert) pairs, D model dim, F expert width, E experts, k experts per token, G groups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import MLP

MOE_IMPLS = ("grouped", "loop")


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.norm_topk_prob, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, cfg.hidden_size, dtype=torch.float32))  # fp32
        self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))

    def forward(self, x_ND: torch.Tensor):
        # Router logits in fp32: near-equal expert scores must not flip with the activation dtype.
        logits_NE = F.linear(x_ND.float(), self.weight.float())
        scores_NE = logits_NE.sigmoid()
        choice_NE = scores_NE + self.e_score_correction_bias
        if self.n_group > 1:
            N = x_ND.shape[0]
            grouped = choice_NE.view(N, self.n_group, -1)
            group_score_NG = grouped.topk(2, dim=-1).values.sum(-1)  # a group's score is its top-2 sum
            keep_NG = torch.zeros_like(group_score_NG, dtype=torch.bool)
            keep_NG.scatter_(1, group_score_NG.topk(self.topk_group, dim=-1, sorted=False).indices, True)
            choice_NE = grouped.masked_fill(~keep_NG[..., None], float("-inf")).view(N, -1)
        idx_Nk = choice_NE.topk(self.top_k, dim=-1, sorted=False).indices
        w_Nk = scores_NE.gather(1, idx_Nk)
        if self.norm_topk_prob:
            w_Nk = w_Nk / (w_Nk.sum(-1, keepdim=True) + 1e-20)
        return w_Nk * self.scaling, idx_Nk, logits_NE


def swiglu(proj, e: int, x_MD: torch.Tensor) -> torch.Tensor:
    """Expert e on M rows; proj(x, name, e) multiplies by expert e's matrix `name` (gate_proj, up_proj, down_proj)."""
    return proj(F.silu(proj(x_MD, "gate_proj", e)) * proj(x_MD, "up_proj", e), "down_proj", e)


def dispatch(x_ND, w_Nk, idx_Nk, n_experts: int, proj, impl: str = "grouped", grouped_gemm=None):
    """y_ND[n] = sum_j w_Nk[n, j] * expert_{idx_Nk[n, j]}(x_ND[n]), each expert a `swiglu` through proj.
    grouped_gemm(x_MD, offs_E), where the weights have one, runs every expert at once on rows sorted by expert
    (offs_E: each expert's end row)."""
    if impl == "loop":  # reference: one pass per expert over the tokens that chose it
        out_ND = torch.zeros_like(x_ND)
        for e in range(n_experts):
            tok, slot = torch.where(idx_Nk == e)
            if tok.numel():
                out_ND.index_add_(0, tok, swiglu(proj, e, x_ND[tok]) * w_Nk[tok, slot, None].to(x_ND.dtype))
        return out_ND
    if impl != "grouped":
        raise ValueError(f"moe_impl must be one of {MOE_IMPLS}, got {impl!r}")
    # Sort the N*k (token, expert) pairs by expert: each expert's rows become one contiguous segment.
    N, k = idx_Nk.shape
    flat_M = idx_Nk.flatten()
    order_M = torch.argsort(flat_M, stable=True)
    tok_M = order_M // k
    counts_E = torch.bincount(flat_M, minlength=n_experts)
    x_MD = x_ND[tok_M]
    if grouped_gemm is not None and N * k >= n_experts:
        y_MD = grouped_gemm(x_MD, counts_E.cumsum(0).to(torch.int32))
    else:
        # Decode-sized (fewer pairs than experts: grouped_mm would still run an empty GEMM per expert on CPU), or no
        # grouped GEMM for these weights: one expert at a time, only those some token chose.
        y_MD = torch.empty_like(x_MD)
        m0 = 0
        for e, c in enumerate(counts_E.tolist()):
            if c:
                y_MD[m0:m0 + c] = swiglu(proj, e, x_MD[m0:m0 + c])
                m0 += c
    y_MD = y_MD * w_Nk.flatten()[order_M, None].to(y_MD.dtype)
    return torch.zeros_like(x_ND).index_add_(0, tok_M, y_MD)


class Experts(nn.Module):
    """E SwiGLU experts stored as stacked [E, ...] weights (the checkpoint keeps one tensor per expert)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, D, Fw = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_proj = nn.Parameter(torch.empty(E, Fw, D))
        self.up_proj = nn.Parameter(torch.empty(E, Fw, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, Fw))

    def proj(self, x_MI: torch.Tensor, name: str, e: int) -> torch.Tensor:
        return x_MI @ getattr(self, name)[e].t()

    def grouped_gemm(self, x_MD: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
        g_MF = F.grouped_mm(x_MD, self.gate_proj.transpose(1, 2), offs=offs_E)
        u_MF = F.grouped_mm(x_MD, self.up_proj.transpose(1, 2), offs=offs_E)
        return F.grouped_mm(F.silu(g_MF) * u_MF, self.down_proj.transpose(1, 2), offs=offs_E)

    def forward(self, x_ND, w_Nk, idx_Nk, impl: str = "grouped"):
        return dispatch(x_ND, w_Nk, idx_Nk, self.gate_proj.shape[0], self.proj, impl, self.grouped_gemm)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) \
            if cfg.n_shared_experts > 0 else None

    def forward(self, x_BTD: torch.Tensor, impl: str = "grouped", record: dict | None = None, layer: int = -1):
        x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
        w_Nk, idx_Nk, logits_NE = self.gate(x_ND)
        if record is not None:
            record[layer] = (idx_Nk, logits_NE)
        y_ND = self.experts(x_ND, w_Nk, idx_Nk, impl)
        if self.shared_experts is not None:
            y_ND = y_ND + self.shared_experts(x_ND)
        return y_ND.view_as(x_BTD)
