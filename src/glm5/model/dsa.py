"""DeepSeek Sparse Attention: the lightning indexer and its top-k selection (DeepSeek-V3.2; docs/glm5.md).

    I[t, s] = sum_h w[t, h] * ReLU(qI[t, h] . kI[s] / sqrt(Di)),   w = weights_proj(x) / sqrt(HI)

Letters: B batch, T queries, S key slots, HI indexer heads, Di indexer head dim, K kept positions.
The indexer is differentiable (no `no_grad`, unlike the reference): training fits it with a KL loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import apply_rope

# Score blocks are [B, T_chunk, HI, S] in fp32; bound one block to this many elements (~256 MB).
_SCORE_BLOCK_ELEMS = 64 * 1024 * 1024
QUERY_BLOCK = 256


class Indexer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.rope_dim = cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(cfg.hidden_size, self.n_heads, bias=False)  # kept in fp32, as released

    def _rope_first(self, x: torch.Tensor, cos, sin) -> torch.Tensor:
        # The indexer puts RoPE on its *first* rope_dim dims (MLA puts it on the last ones).
        r = self.rope_dim
        return torch.cat([apply_rope(x[..., :r], cos, sin), x[..., r:]], dim=-1)

    def keys(self, x_BTD: torch.Tensor, cos, sin) -> torch.Tensor:
        """Index keys [B, T, Di]: what the engine caches per token (one head, 128 wide in GLM-5)."""
        return self._rope_first(self.k_norm(self.wk(x_BTD)), cos, sin)

    def _blocks(self, x_BTD, q_resid_BTQ, cos, sin, k_BSd, visible_BTS, key_end_T):
        """Yield (t0, t1, s1, scores [B, t1-t0, s1]) per query block: each block is scored only against keys up to
        its last visible one (causal prefill does half the work) and no [B, T, HI, S] tensor exists whole."""
        B, T, _ = x_BTD.shape
        S = k_BSd.shape[1]
        q_BTHd = self._rope_first(self.wq_b(q_resid_BTQ).view(B, T, self.n_heads, self.head_dim), cos, sin)
        # fp32 for the head weights and the score sums: these decide a discrete top-k, rounding flips choices.
        w_BT1H = (self.weights_proj(x_BTD.to(self.weights_proj.weight.dtype)).float() * self.n_heads**-0.5).unsqueeze(-2)
        q_BTHd = q_BTHd.float() * self.head_dim**-0.5  # scale the [T, H, d] queries, not the [T, H, S] scores
        kT_BdS = k_BSd.float().transpose(-1, -2)
        key_end_T = key_ends(visible_BTS) if key_end_T is None else key_end_T
        step = max(1, min(QUERY_BLOCK, _SCORE_BLOCK_ELEMS // max(1, B * self.n_heads * S)))
        for t0 in range(0, T, step):
            t1 = min(T, t0 + step)
            s1 = max(1, max(key_end_T[t0:t1]))
            # one [t*HI, d] x [d, s1] GEMM per batch row, not t skinny [HI, d] ones
            s_BtHs = torch.matmul(q_BTHd[:, t0:t1].flatten(1, 2), kT_BdS[..., :s1]).view(B, t1 - t0, self.n_heads, s1).relu_()
            blk_BtS = torch.matmul(w_BT1H[:, t0:t1], s_BtHs).squeeze(-2)
            yield t0, t1, s1, blk_BtS.masked_fill(~visible_BTS[:, t0:t1, :s1], float("-inf"))

    def scores(self, x_BTD, q_resid_BTQ, cos, sin, k_BSd, visible_BTS, key_end_T=None) -> torch.Tensor:
        """Index scores [B, T, S] in fp32, -inf where the key is not visible to the query.
        key_end_T[t] bounds the keys query t can see (see `key_ends`); computed here if not given."""
        S = k_BSd.shape[1]
        # padded blocks joined by cat, not written into a preallocated map: backward through slice assignment
        # would clone the whole [B, T, S] gradient once per block
        return torch.cat([F.pad(blk.float(), (0, S - s1), value=float("-inf"))
                          for _, _, s1, blk in self._blocks(x_BTD, q_resid_BTQ, cos, sin, k_BSd, visible_BTS, key_end_T)],
                         dim=1)

    @torch.no_grad()
    def select(self, x_BTD, q_resid_BTQ, cos, sin, k_BSd, visible_BTS, key_end_T, k: int) -> torch.Tensor:
        """Top-k key indices [B, T, k] block by block, without materialising [B, T, S] scores: a block whose queries
        see at most k keys keeps them all (no scoring, no top-k); the others take top-k over their visible range
        only. Same choice as select_topk(scores(...), k) on every visible key."""
        B, T, _ = x_BTD.shape
        key_end_T = key_ends(visible_BTS) if key_end_T is None else key_end_T
        idx_BTK = torch.arange(k, device=x_BTD.device).expand(B, T, k).clone()  # "everything up to k" (sparse: S > k)
        first = next((t for t, e in enumerate(key_end_T) if e > k), T)  # earlier queries see <= k keys
        if first == T:
            return idx_BTK
        t_from = first - first % QUERY_BLOCK  # keep the block grid of scores(): identical numerics
        sub = slice(t_from, T)
        for t0, t1, s1, blk in self._blocks(x_BTD[:, sub], q_resid_BTQ[:, sub], cos[:, sub], sin[:, sub], k_BSd,
                                            visible_BTS[:, sub], key_end_T[t_from:]):
            if s1 > k:
                idx_BTK[:, t_from + t0:t_from + t1] = select_topk(blk, k)
        return idx_BTK


def key_ends(visible_BTS: torch.Tensor) -> torch.Tensor:
    """[T] int: 1 + the last key slot query t sees in any batch row (0 if none). Query blocks stop there, so a
    causal prefill does half the work of a full [T, S] pass. One pass over the mask per forward."""
    seen_TS = visible_BTS.any(dim=0)
    S = seen_TS.shape[-1]
    last_T = S - 1 - seen_TS.flip(-1).to(torch.uint8).argmax(-1)
    return torch.where(seen_TS.any(-1), last_T + 1, torch.zeros_like(last_T)).tolist()


def select_topk(index_BTS: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [B, T, min(k, S)] of the highest index scores.

    Exact ties are common (a key whose every head score is ReLU-clipped scores exactly 0), and torch.topk breaks
    them by memory layout, so a prefill and a one-token decode could keep different keys. We break ties by
    position (earliest first) so the choice depends on the scores alone. Rows with fewer than k visible keys also
    pick invisible ones (score -inf); attention drops those through its visibility mask, as the reference does."""
    k = min(k, index_BTS.shape[-1])
    vals_BTK, idx_BTK = index_BTS.topk(k, dim=-1, sorted=False)  # unsorted: ~1.6x faster, order is irrelevant
    kth_BT1 = vals_BTK.amin(-1, keepdim=True)
    # The k-th value also sits outside the cut. Rows whose k-th value is -inf keep every visible key already (the
    # -inf fillers are masked out by attention), so they need no tie-break.
    tied_BT = ((index_BTS >= kth_BT1).sum(-1) > k) & (kth_BT1.squeeze(-1) > float("-inf"))
    if tied_BT.any():
        rows_nS, kth_n1 = index_BTS[tied_BT], kth_BT1[tied_BT]
        above_nS, equal_nS = rows_nS > kth_n1, rows_nS == kth_n1
        need_n1 = k - above_nS.sum(-1, keepdim=True)
        keep_nS = above_nS | (equal_nS & (equal_nS.cumsum(-1) <= need_n1))
        idx_BTK[tied_BT] = keep_nS.nonzero()[:, 1].view(-1, k)  # row-major: each row's k positions, ascending
    return idx_BTK
