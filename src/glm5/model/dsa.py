"""DeepSeek Sparse Attention: the lightning indexer and its top-k selection (DeepSeek-V3.2; docs/glm5.md).

    I[t, s] = sum_h w[t, h] * ReLU(qI[t, h] . kI[s] / sqrt(Di)),   w = weights_proj(x) / sqrt(HI)

Letters: B batch, T queries, S key slots, HI indexer heads, Di indexer head dim, K kept positions, c keys per scan
chunk. The indexer is differentiable (no `no_grad`, unlike the reference): training fits it with a KL loss.

Two equal ways to score (a test keeps them equal):
  - `scores`: the whole [B, T, S] map, query block by query block through `_blocks` (training, the reference);
  - `select` (inference): per query block, `scan` fills the block's [B, t, s1] scores key chunk by key chunk (the
    [B, t, HI, c] head scores stay cache-sized, nothing is [T, S] or [HI, S]) and keeps the top-k of each row.
    Per-call memory is then bounded by a constant, whatever the context: a 2048-token prefill chunk against 128K
    cached keys and a one-token decode step alike.

Visibility (which key slot each query may see) comes either as a bool tensor [B, T, S] or as a `SlotVisibility`
(key slot positions [B, S] and query positions [B, T]), which never builds the [B, T, S] mask: `visible_block`,
`visible_at` and `key_ends` read both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import apply_rope

QUERY_BLOCK = 256
# `_blocks` (training / reference) holds [B, t, HI, s] fp32 head scores per query block: at most this many (256 MB).
_SCORE_BLOCK_ELEMS = 64 * 1024 * 1024
# `select`: a query block's [B, t, s1] fp32 scores (16 MB), and the [B, t * HI, c] head scores of one key chunk of
# `scan` (1 MB: they stay in L2 between the GEMM that writes them and the head sum that reads them).
SELECT_BLOCK_ELEMS = 4 * 1024 * 1024
SCAN_CHUNK_ELEMS = 256 * 1024
SCAN_CHUNK_MIN = 1024  # keys: below this, per-chunk call overhead outweighs what cache locality saves


class SlotVisibility:
    """visible[b, t, s] = 0 <= kpos[b, s] <= qpos[b, t], never materialised whole: a cached forward (decode, chunked
    prefill) sees every filled slot of its own sequence up to its own position. Slot s holds position s, or -1 when
    empty (both caches lay rows out so)."""

    def __init__(self, kpos_BS: torch.Tensor, qpos_BT: torch.Tensor):
        self.kpos_BS, self.qpos_BT = kpos_BS, qpos_BT
        self.shape = (*qpos_BT.shape, kpos_BS.shape[-1])


def visible_block(visible, t0: int, t1: int, s1: int) -> torch.Tensor:
    """[B, t1 - t0, s1] bool: which of the first s1 key slots queries t0..t1-1 see."""
    if isinstance(visible, SlotVisibility):
        k_B1s = visible.kpos_BS[:, None, :s1]
        return (k_B1s >= 0) & (k_B1s <= visible.qpos_BT[:, t0:t1, None])
    return visible[:, t0:t1, :s1]


def visible_at(visible, idx_BtK: torch.Tensor, t0: int) -> torch.Tensor:
    """[B, t, K] bool: whether query t0 + i sees key slot idx[:, i, j]."""
    if isinstance(visible, SlotVisibility):
        B, t, K = idx_BtK.shape
        k_BtK = visible.kpos_BS.gather(-1, idx_BtK.reshape(B, t * K)).view(B, t, K)
        return (k_BtK >= 0) & (k_BtK <= visible.qpos_BT[:, t0:t0 + t, None])
    return visible[:, t0:t0 + idx_BtK.shape[1]].gather(-1, idx_BtK)


def all_visible(visible, t0: int, t1: int, s1: int) -> bool:
    """Whether queries t0..t1-1 see every one of the first s1 slots (a decode step of one sequence does): scores
    then need no -inf mask."""
    if isinstance(visible, SlotVisibility):
        k_Bs = visible.kpos_BS[:, :s1]
        return bool((k_Bs.amin() >= 0) & (k_Bs.amax(-1) <= visible.qpos_BT[:, t0:t1].amin(-1)).all())
    return bool(visible[:, t0:t1, :s1].all())


def key_ends(visible, rows: int = 64) -> list:
    """[T] int: 1 + the last key slot query t sees in any batch row (0 if none). Query blocks stop there, so a
    causal prefill does half the work of a full [T, S] pass. From a mask, `rows` queries at a time (the temporaries
    stay [rows, S]); from slot positions, one [B, S] pass."""
    if isinstance(visible, SlotVisibility):
        k_BS, q_BT = visible.kpos_BS, visible.qpos_BT
        s_S = torch.arange(k_BS.shape[-1], device=k_BS.device)
        filled_BS = k_BS >= 0
        if not bool((k_BS == torch.where(filled_BS, s_S, -1)).all()):
            raise ValueError("SlotVisibility: slot s must hold position s, or -1 when empty")
        # slot s holds position s: the last slot query t sees is the last filled one at or before qpos[t]
        last_BS = torch.where(filled_BS, s_S, -1).cummax(-1).values
        end_BT = last_BS.gather(-1, q_BT.clamp(0, k_BS.shape[-1] - 1)) + 1
        return end_BT.amax(0).tolist()
    B, T, S = visible.shape
    out = []
    for t0 in range(0, T, rows):
        seen_tS = visible[:, t0:t0 + rows].any(dim=0)
        last_t = S - 1 - seen_tS.flip(-1).to(torch.uint8).argmax(-1)
        out += torch.where(seen_tS.any(-1), last_t + 1, torch.zeros_like(last_t)).tolist()
    return out


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

    def queries(self, x_BTD, q_resid_BTQ, cos, sin):
        """Scaled queries [B, T, HI, Di] and head weights [B, T, HI], both fp32: these decide a discrete top-k, and
        rounding flips choices. The 1/sqrt(Di) goes on the [T, HI, Di] queries, not on the [T, HI, S] scores."""
        B, T, _ = x_BTD.shape
        q_BTHd = self._rope_first(self.wq_b(q_resid_BTQ).view(B, T, self.n_heads, self.head_dim), cos, sin)
        w_BTH = self.weights_proj(x_BTD.to(self.weights_proj.weight.dtype)).float() * self.n_heads**-0.5
        return q_BTHd.float() * self.head_dim**-0.5, w_BTH

    def _blocks(self, x_BTD, q_resid_BTQ, cos, sin, k_BSd, visible_BTS, key_end_T):
        """Yield (t0, t1, s1, scores [B, t1-t0, s1]) per query block: each block is scored only against keys up to
        its last visible one (causal prefill does half the work) and no [B, T, HI, S] tensor exists whole."""
        B, T, _ = x_BTD.shape
        S = k_BSd.shape[1]
        q_BTHd, w_BTH = self.queries(x_BTD, q_resid_BTQ, cos, sin)
        w_BT1H = w_BTH.unsqueeze(-2)
        kT_BdS = k_BSd.float().transpose(-1, -2)
        key_end_T = key_ends(visible_BTS) if key_end_T is None else key_end_T
        step = max(1, min(QUERY_BLOCK, _SCORE_BLOCK_ELEMS // max(1, B * self.n_heads * S)))
        for t0 in range(0, T, step):
            t1 = min(T, t0 + step)
            s1 = max(1, max(key_end_T[t0:t1]))
            # one [t*HI, d] x [d, s1] GEMM per batch row, not t skinny [HI, d] ones
            s_BtHs = torch.matmul(q_BTHd[:, t0:t1].flatten(1, 2), kT_BdS[..., :s1]).view(B, t1 - t0, self.n_heads, s1).relu_()
            blk_BtS = torch.matmul(w_BT1H[:, t0:t1], s_BtHs).squeeze(-2)
            yield t0, t1, s1, blk_BtS.masked_fill(~visible_block(visible_BTS, t0, t1, s1), float("-inf"))

    def scores(self, x_BTD, q_resid_BTQ, cos, sin, k_BSd, visible_BTS, key_end_T=None) -> torch.Tensor:
        """Index scores [B, T, S] in fp32, -inf where the key is not visible to the query.
        key_end_T[t] bounds the keys query t can see (see `key_ends`); computed here if not given."""
        S = k_BSd.shape[1]
        # padded blocks joined by cat, not written into a preallocated map: backward through slice assignment
        # would clone the whole [B, T, S] gradient once per block
        return torch.cat([F.pad(blk.float(), (0, S - s1), value=float("-inf"))
                          for _, _, s1, blk in self._blocks(x_BTD, q_resid_BTQ, cos, sin, k_BSd, visible_BTS, key_end_T)],
                         dim=1)

    @staticmethod
    def scan(q_BtHd: torch.Tensor, w_BtH: torch.Tensor, k_BSd: torch.Tensor, s1: int) -> torch.Tensor:
        """Scores [B, t, s1] of queries q (scaled, fp32) against the first s1 keys, unmasked, key chunk by key chunk:
        the [B, t * HI, c] head scores of a chunk go from the GEMM through ReLU into the head sum while still in
        cache, and no [HI, S] tensor exists. k may be a view straight into the engine's cache (no copy)."""
        B, t, H, d = q_BtHd.shape
        q_BMd = q_BtHd.reshape(B, t * H, d)
        w_Bt1H = w_BtH.unsqueeze(-2)
        out_BtS = q_BtHd.new_empty(B, t, s1)
        c = max(SCAN_CHUNK_MIN, SCAN_CHUNK_ELEMS // (B * t * H))
        # fp32 products under bf16 autocast too: they decide a discrete top-k (and `out=` is fp32)
        with torch.autocast(q_BtHd.device.type, enabled=False):
            for c0 in range(0, s1, c):
                c1 = min(s1, c0 + c)
                k_Bcd = k_BSd[:, c0:c1]
                k_Bcd = k_Bcd if k_Bcd.dtype == torch.float32 else k_Bcd.float()
                s_BtHc = torch.matmul(q_BMd, k_Bcd.transpose(-1, -2)).view(B, t, H, c1 - c0).relu_()
                torch.matmul(w_Bt1H, s_BtHc, out=out_BtS[:, :, None, c0:c1])
        return out_BtS

    @torch.no_grad()
    def select(self, x_BTD, q_resid_BTQ, cos, sin, k_BSd, visible_BTS, key_end_T, k: int) -> torch.Tensor:
        """Top-k key indices [B, T, k] block by block, without materialising [B, T, S] scores: a block whose queries
        see at most k keys keeps them all (no scoring, no top-k); the others take top-k over their visible range
        only, from `scan`. The same choice as select_topk(scores(...), k) on every visible key."""
        B, T, _ = x_BTD.shape
        key_end_T = key_ends(visible_BTS) if key_end_T is None else key_end_T
        idx_BTK = torch.arange(k, device=x_BTD.device).expand(B, T, k).clone()  # "everything up to k" (sparse: S > k)
        first = next((t for t, e in enumerate(key_end_T) if e > k), T)  # earlier queries see <= k keys
        if first == T:
            return idx_BTK
        q_BTHd, w_BTH = self.queries(x_BTD[:, first:], q_resid_BTQ[:, first:], cos[:, first:], sin[:, first:])
        S_max = max(key_end_T[first:])
        step = max(1, min(QUERY_BLOCK, SELECT_BLOCK_ELEMS // (B * S_max)))
        for t0 in range(first, T, step):
            t1 = min(T, t0 + step)
            s1 = max(key_end_T[t0:t1])
            blk_BtS = self.scan(q_BTHd[:, t0 - first:t1 - first], w_BTH[:, t0 - first:t1 - first], k_BSd, s1)
            if not all_visible(visible_BTS, t0, t1, s1):
                blk_BtS.masked_fill_(~visible_block(visible_BTS, t0, t1, s1), float("-inf"))
            idx_BTK[:, t0:t1] = select_topk(blk_BtS, k)
        return idx_BTK


def select_topk(index_BTS: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [B, T, min(k, S)] of the highest index scores.

    Exact ties are common (a key whose every head score is ReLU-clipped scores exactly 0), and torch.topk breaks
    them by memory layout, so a prefill and a one-token decode could keep different keys. We break ties by
    position (earliest first) so the choice depends on the scores alone. Rows with fewer than k visible keys also
    pick invisible ones (score -inf); attention drops those through its visibility mask, as the reference does.

    Long rows (S >= TOPK_PREFILTER x k) are first cut down to candidates (`_topk_candidates`): the same choice (a
    test keeps it so) at a fraction of the cost, torch.topk being a partial sort of the whole row."""
    B, T, S = index_BTS.shape
    if S < TOPK_PREFILTER * k or index_BTS.numel() == 0:
        return _topk_plain(index_BTS, k)
    return _topk_candidates(index_BTS, k)


TOPK_PREFILTER = 16  # select_topk cuts rows of at least this many (>= 4) times k scores down to candidates
TOPK_GROUPS = 16  # ... through about this many times k groups, of which k (k * G candidates) remain


def _topk_candidates(index_BTS: torch.Tensor, k: int) -> torch.Tensor:
    """select_topk over candidates: split each row into n >= 2k groups of G consecutive scores; the k-th largest group
    maximum is a threshold that at least k scores reach, so every score the top-k keeps (ties at the k-th value
    included) lies in a group whose maximum reaches it. Those groups (k of them, more on ties) and the tail past the
    last whole group are the candidates, kept in position order, so select_topk's earliest-first tie-break among
    them is the same as over the whole row."""
    B, T, S = index_BTS.shape
    R = B * T
    rows_RS = index_BTS.reshape(R, S)
    G = max(2, S // (TOPK_GROUPS * k))  # S >= TOPK_PREFILTER * k >= 4k: n >= 2k groups
    n = S // G
    groups_RnG = rows_RS[:, : n * G].view(R, n, G)
    gmax_Rn = groups_RnG.amax(-1)
    thr_R1 = gmax_Rn.topk(k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    hit_Rn = gmax_Rn >= thr_R1
    count_R = hit_Rn.sum(-1)
    width = int(count_R.max())
    if 2 * width > n:  # mostly ties (or rows that see fewer than k groups): the cut saves little
        return _topk_plain(index_BTS, k)
    row_M, grp_M = hit_Rn.nonzero(as_tuple=True)  # row-major: each row's groups in position order
    rank_M = torch.arange(row_M.numel(), device=row_M.device) - (torch.cumsum(count_R, 0) - count_R)[row_M]
    grp_RW = torch.zeros((R, width), dtype=torch.long, device=row_M.device)
    grp_RW[row_M, rank_M] = grp_M
    vals_RWG = groups_RnG.gather(1, grp_RW[:, :, None].expand(R, width, G))
    if width > 1:  # rows with fewer groups than the widest pad with copies of group 0: never chosen at -inf
        pad_RW = torch.arange(width, device=row_M.device)[None] >= count_R[:, None]
        vals_RWG.masked_fill_(pad_RW[:, :, None], float("-inf"))
    pos_RWG = grp_RW[:, :, None] * G + torch.arange(G, device=row_M.device)
    vals_RC = torch.cat([vals_RWG.view(R, width * G), rows_RS[:, n * G:]], dim=-1)
    pos_RC = torch.cat([pos_RWG.view(R, width * G),
                        torch.arange(n * G, S, device=row_M.device).expand(R, S - n * G)], dim=-1)
    sub_RK = _topk_plain(vals_RC.view(R, 1, -1), k).view(R, -1)
    return pos_RC.gather(-1, sub_RK).view(B, T, -1)


def _topk_plain(index_BTS: torch.Tensor, k: int) -> torch.Tensor:
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
