"""DeepSeek-V3 Mixture of Experts as used by GLM-5 (GLM5.md §1).

Router: sigmoid scores; `e_score_correction_bias` is added for *choosing* experts only (aux-loss-free balancing
moves it between steps); group-limited top-k; weights are the unbiased scores of the chosen experts, normalised
to sum 1 (norm_topk_prob) and scaled by routed_scaling_factor.

Letters: N tokens, D model dim, F expert width, E experts, k experts per token, G groups.
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


class Experts(nn.Module):
    """E SwiGLU experts stored as stacked [E, ...] weights (the checkpoint keeps one tensor per expert)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, D, Fw = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_proj = nn.Parameter(torch.empty(E, Fw, D))
        self.up_proj = nn.Parameter(torch.empty(E, Fw, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, Fw))

    def forward(self, x_ND, w_Nk, idx_Nk, impl: str = "grouped"):
        if impl == "loop":
            return self._loop(x_ND, w_Nk, idx_Nk)
        if impl != "grouped":
            raise ValueError(f"moe_impl must be one of {MOE_IMPLS}, got {impl!r}")
        return self._grouped(x_ND, w_Nk, idx_Nk)

    def _loop(self, x_ND, w_Nk, idx_Nk):
        """Reference: one pass per expert over the tokens that chose it."""
        out_ND = torch.zeros_like(x_ND)
        for e in range(self.gate_proj.shape[0]):
            tok, slot = torch.where(idx_Nk == e)
            if tok.numel() == 0:
                continue
            xe = x_ND[tok]
            h = F.silu(xe @ self.gate_proj[e].t()) * (xe @ self.up_proj[e].t())
            out_ND.index_add_(0, tok, (h @ self.down_proj[e].t()) * w_Nk[tok, slot, None].to(x_ND.dtype))
        return out_ND

    def _grouped(self, x_ND, w_Nk, idx_Nk):
        """Sort the N*k (token, expert) pairs by expert, then one grouped matmul per projection."""
        N, k = idx_Nk.shape
        E = self.gate_proj.shape[0]
        flat = idx_Nk.flatten()
        order = torch.argsort(flat, stable=True)
        tok_M = order // k
        offs_E = torch.bincount(flat, minlength=E).cumsum(0).to(torch.int32)
        x_MD = x_ND[tok_M]
        if N * k < E:
            # Decode-sized: fewer pairs than experts. grouped_mm would still run a (empty) GEMM per expert on CPU;
            # one matmul per expert actually chosen is cheaper.
            experts, counts = torch.unique_consecutive(flat[order], return_counts=True)
            parts, m0 = [], 0
            for e, c in zip(experts.tolist(), counts.tolist()):
                xe = x_MD[m0:m0 + c]
                parts.append((F.silu(xe @ self.gate_proj[e].t()) * (xe @ self.up_proj[e].t())) @ self.down_proj[e].t())
                m0 += c
            y_MD = torch.cat(parts)
        else:
            g = F.grouped_mm(x_MD, self.gate_proj.transpose(1, 2), offs=offs_E)
            u = F.grouped_mm(x_MD, self.up_proj.transpose(1, 2), offs=offs_E)
            y_MD = F.grouped_mm(F.silu(g) * u, self.down_proj.transpose(1, 2), offs=offs_E)
        y_MD = y_MD * w_Nk.flatten()[order, None].to(y_MD.dtype)
        return torch.zeros_like(x_ND).index_add_(0, tok_M, y_MD)


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
