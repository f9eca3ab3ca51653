"""Multi-head Latent Attention with DSA top-k selection (DeepSeek-V2 arXiv 2405.04434, DeepSeek-V3.2; docs/glm5.md).

Per token the cache holds one latent row [C | R]: the RMS-normed kv_a output (C = kv_lora_rank) and the roped
shared key (R = qk_rope_head_dim), 576 wide in GLM-5. Two equal ways to attend over it:
  - expanded: kv_b_proj turns every latent into per-head keys [N] and values [V] (cheap for long prefill,
    where the per-key matmul is shared by all queries);
  - absorbed: fold kv_b_proj into the query (q_nope @ W_k) and the output (@ W_v), so scores and values are
    taken straight over the latent (cheap for decode: nothing per key is expanded).
And two equal ways to apply the indexer's top-k:
  - mask: attend over all S keys with the non-selected ones masked;
  - gather: gather only the K selected latents per query (cost flat in S once S > K).
Both go query block by query block, so that no per-call buffer grows with T x S: a 2048-token prefill chunk against
128K cached keys holds [t, s] masks and [t, K, L] rows for one block of t queries at a time.

Letters: B batch, T queries, S key slots, K kept keys, H heads, N nope dim, R rope dim, V value dim,
C latent dim, L = C + R, Q q_lora_rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .dsa import QUERY_BLOCK, Indexer, key_ends, select_topk, visible_at, visible_block
from .layers import RMSNorm, apply_rope

ATTN_IMPLS = ("auto", "expanded", "absorbed")
DSA_IMPLS = ("auto", "mask", "gather", "off")  # "off": dense attention over every visible key
# auto: a multi-token call gathers its top-k rows once its queries see this many times K keys on average. Below, one
# masked SDPA call per query block over every visible key is cheaper than K gathered rows per query (`small` preset,
# 2048-token chunks: the two cost the same near 8-10 K keys per query, gather 3x less at 32 K).
GATHER_FROM = 8
# per query block: [B, t, K, L] gathered rows, or [B, t, s] attention masks, of at most this many elements (16 MB)
BLOCK_ELEMS = 4 * 1024 * 1024
# Decode-sized calls (a decode, a verify of drafts: at most this many query tokens) attend absorbed over the latent
# and gather their top-k rows once the context passes K.
DECODE_T = 16


@dataclass
class AttnContext:
    """What every layer of one forward shares. Built by the model; the cache object belongs to the caller."""

    cos: torch.Tensor  # [B, T, R/2] for the query positions
    sin: torch.Tensor
    visible_BTS: object  # bool [B, T, S]: key slot s is visible to query t (causal, same document), or a
    # dsa.SlotVisibility that says the same without building the mask (read through dsa.visible_block / visible_at)
    key_end_T: list  # [T] 1 + last key slot query t can see: query blocks never look past it
    cache: object | None = None  # .update(layer, latent_BTL, ikey_BTd | None) -> (latent_BSL, ikey_BSd | None)
    attn_impl: str = "auto"
    dsa_impl: str = "auto"
    aux: "ForwardAux | None" = None


@dataclass
class ForwardAux:
    """Optional side outputs and training switches, passed to the model's forward: per layer top-k indices
    (None = dense), index scores [B, T, S] (if want_index_scores), attention probs (if want_attn_probs),
    router choices. Training and tests read these."""

    want_index_scores: bool = False
    # main attention probs summed over heads, L1-normalised (the indexer's target): [B, T, S], or [B, T, K] over
    # topk[layer] where the layer attends sparsely
    want_attn_probs: bool = False
    detach_indexer_input: bool = False  # sparse-stage training: the indexer sees detached inputs
    topk: dict = field(default_factory=dict)
    index_scores: dict = field(default_factory=dict)
    attn_probs: dict = field(default_factory=dict)
    router: dict = field(default_factory=dict)  # layer -> (topk_expert_idx [N, k], router_logits [N, E])


def resolve_dsa(dsa_impl: str, T: int, keys_per_query: float = 0.0, k: int = 1) -> str:
    """Decode-sized steps gather the K chosen latents (cost flat in S). A multi-token call gathers too once its
    queries see GATHER_FROM x K keys on average (a prefill chunk deep into a long context: masked attention there
    costs O(T x S)); shorter prefill masks all its keys and lets one fused SDPA call per query block do the work."""
    if dsa_impl not in ("auto", "off"):
        return dsa_impl
    return "gather" if T <= DECODE_T or keys_per_query > GATHER_FROM * k else "mask"


def _kept(visible_BTS, topk_BTK, t0: int, t1: int, s1: int) -> torch.Tensor:
    """bool [B, t1-t0, s1]: the keys below s1 that queries t0..t1-1 attend to, visible and (when given) top-k picks.
    Picks at or past s1 are invisible fillers: they land in an extra column, dropped."""
    keep_Bts = visible_block(visible_BTS, t0, t1, s1)
    if topk_BTK is None:
        return keep_Bts
    chosen_Bts = torch.zeros_like(keep_Bts[..., :1]).expand(-1, -1, s1 + 1).clone()
    chosen_Bts.scatter_(-1, topk_BTK[:, t0:t1].clamp(max=s1), True)
    return keep_Bts & chosen_Bts[..., :s1]


class MLAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, has_indexer: bool):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.nope, self.rope, self.v_dim = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.latent, self.index_topk, self.scale = cfg.kv_lora_rank, cfg.index_topk, cfg.softmax_scale
        H = self.n_heads
        self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=cfg.attention_bias)
        self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, eps=1e-6)  # 1e-6 here, as in the reference
        self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, cfg.kv_lora_rank + self.rope, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, eps=1e-6)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, cfg.hidden_size, bias=cfg.attention_bias)
        self.indexer = Indexer(cfg) if has_indexer else None

    def forward(self, x_BTD: torch.Tensor, ctx: AttnContext, prev_topk: torch.Tensor | None):
        B, T, _ = x_BTD.shape
        H, N, R, C = self.n_heads, self.nope, self.rope, self.latent
        aux = ctx.aux
        q_resid_BTQ = self.q_a_layernorm(self.q_a_proj(x_BTD))
        q_nope_BTHN, q_rope_BTHR = self.q_b_proj(q_resid_BTQ).view(B, T, H, N + R).split([N, R], dim=-1)
        q_rope_BTHR = apply_rope(q_rope_BTHR, ctx.cos, ctx.sin)
        c_BTC, kr_BTR = self.kv_a_proj_with_mqa(x_BTD).split([C, R], dim=-1)
        lat_BTL = torch.cat([self.kv_a_layernorm(c_BTC), apply_rope(kr_BTR, ctx.cos, ctx.sin)], dim=-1)
        # Sparse-stage training detaches the indexer's inputs: it learns only from its own KL loss, the rest of the
        # model only from the LM loss (DeepSeek-V3.2 report, continued pre-training; GLM-5 report arXiv 2602.15763).
        x_idx, q_idx = (x_BTD.detach(), q_resid_BTQ.detach()) if aux is not None and aux.detach_indexer_input \
            else (x_BTD, q_resid_BTQ)
        ik_BTd = self.indexer.keys(x_idx, ctx.cos, ctx.sin) if self.indexer is not None else None
        S = ctx.visible_BTS.shape[-1]
        sparse = ctx.dsa_impl != "off" and S > self.index_topk
        dsa_impl = resolve_dsa(ctx.dsa_impl, T, sum(ctx.key_end_T) / max(1, T) if sparse else 0.0, self.index_topk)
        # Sparse attention from a cache that can gather rows: never materialise all S latent rows, read only the
        # top-k of each query (per-step cost flat in context apart from the index-key scan).
        rows_only = sparse and dsa_impl == "gather" and hasattr(ctx.cache, "gather_latent") \
            and not (aux is not None and aux.want_attn_probs)
        if ctx.cache is not None:
            lat_BSL, ik_BSd = ctx.cache.update(self.layer_idx, lat_BTL, ik_BTd, need_latent=not rows_only)
        else:
            lat_BSL, ik_BSd = lat_BTL, ik_BTd

        topk_BTK = prev_topk if sparse else None  # "shared" layers reuse the previous full layer's choice
        if self.indexer is not None:
            want = aux is not None and aux.want_index_scores
            if want:  # training: the whole [B, T, S] score matrix, differentiable
                index_BTS = self.indexer.scores(x_idx, q_idx, ctx.cos, ctx.sin, ik_BSd, ctx.visible_BTS, ctx.key_end_T)
                aux.index_scores[self.layer_idx] = index_BTS
                topk_BTK = select_topk(index_BTS.detach(), self.index_topk) if sparse else None
            elif sparse:  # inference: block by block, never the whole score matrix
                topk_BTK = self.indexer.select(x_idx, q_idx, ctx.cos, ctx.sin, ik_BSd, ctx.visible_BTS, ctx.key_end_T,
                                               self.index_topk)
        if aux is not None:
            aux.topk[self.layer_idx] = topk_BTK
            if aux.want_attn_probs:
                aux.attn_probs[self.layer_idx] = self.attn_probs(q_nope_BTHN, q_rope_BTHR, lat_BSL, ctx.visible_BTS,
                                                                 topk_BTK, ctx.key_end_T)

        gather = (lambda idx_BtK: ctx.cache.gather_latent(self.layer_idx, idx_BtK)) if rows_only else None
        o_BTHV = self.attend(q_nope_BTHN, q_rope_BTHR, lat_BSL, ctx.visible_BTS, topk_BTK, ctx.attn_impl, dsa_impl,
                             ctx.key_end_T, gather)
        return self.o_proj(o_BTHV.flatten(2)), topk_BTK

    @torch.no_grad()
    def attn_probs(self, q_nope_BTHN, q_rope_BTHR, lat_BSL, visible_BTS, topk_BTK, key_end_T):
        """Main attention probabilities summed over heads and L1-normalised, fp32: the target of the indexer's KL
        loss. Dense (topk_BTK None): [B, T, S] over the visible keys. Sparse: [B, T, K], the probabilities of the
        keys topk_BTK names (0 for picks the query cannot see), which is all the KL needs: the softmax is then
        [B, H, T, K] instead of [B, H, T, S]. A training-size computation, per query block up to its last key."""
        H = self.n_heads
        q_BTHL = self._absorb_q(q_nope_BTHN, q_rope_BTHR).float()
        lat_BSL = lat_BSL.float()
        B, T = q_BTHL.shape[:2]
        out = q_BTHL.new_zeros(B, T, lat_BSL.shape[1] if topk_BTK is None else topk_BTK.shape[-1])
        for t0 in range(0, T, QUERY_BLOCK):
            t1 = min(T, t0 + QUERY_BLOCK)
            s1 = max(1, int(max(key_end_T[t0:t1])))
            s_BtHs = torch.einsum("bthl,bsl->bths", q_BTHL[:, t0:t1], lat_BSL[:, :s1]) * self.scale
            if topk_BTK is None:
                keep_Bt1s = visible_block(visible_BTS, t0, t1, s1)[:, :, None]
            else:  # picks past s1 are invisible fillers (rows that see fewer than K keys): masked below
                idx_BtK = topk_BTK[:, t0:t1]
                s_BtHs = s_BtHs.gather(-1, idx_BtK.clamp(max=s1 - 1)[:, :, None].expand(-1, -1, H, -1))
                keep_Bt1s = visible_at(visible_BTS, idx_BtK, t0)[:, :, None]
            p = s_BtHs.masked_fill(~keep_Bt1s, float("-inf")).softmax(-1).nan_to_num(0.0)
            out[:, t0:t1, :s_BtHs.shape[-1]] = p.sum(2) / H
        return out

    # -- attention over the latent ----------------------------------------------------------------------------
    def attend(self, q_nope_BTHN, q_rope_BTHR, lat_BSL, visible_BTS, topk_BTK, attn_impl="auto", dsa_impl="auto",
               key_end_T=None, gather=None):
        """Attention output [B, T, H, V]. gather(idx [B, t, K]) -> latent rows [B, t, K, L], when given, reads the
        top-k rows from the cache (lat_BSL is then None); otherwise they are indexed out of lat_BSL."""
        T = q_nope_BTHN.shape[1]
        if attn_impl not in ATTN_IMPLS or dsa_impl not in DSA_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, dsa_impl one of {DSA_IMPLS}")
        key_end_T = key_ends(visible_BTS) if key_end_T is None else key_end_T
        if topk_BTK is not None:
            dsa_impl = resolve_dsa(dsa_impl, T, sum(key_end_T) / max(1, T), topk_BTK.shape[-1])
        else:
            dsa_impl = resolve_dsa(dsa_impl, T)
        if attn_impl == "auto":
            attn_impl = "absorbed" if (dsa_impl == "gather" or T <= DECODE_T) else "expanded"
        if topk_BTK is not None and dsa_impl == "gather":
            return self._attend_gathered(q_nope_BTHN, q_rope_BTHR, lat_BSL, gather, visible_BTS, topk_BTK, attn_impl)
        return self._attend_shared(q_nope_BTHN, q_rope_BTHR, lat_BSL, visible_BTS, topk_BTK, attn_impl, key_end_T)

    def _w_kv(self):
        w_HXC = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.latent)
        return w_HXC[:, : self.nope], w_HXC[:, self.nope:]  # W_k [H, N, C], W_v [H, V, C]

    def _expand(self, lat_xL):
        """Latent rows [..., L] -> keys [..., H, N + R] and values [..., H, V]."""
        H, N, R, C = self.n_heads, self.nope, self.rope, self.latent
        kv = self.kv_b_proj(lat_xL[..., :C]).unflatten(-1, (H, N + self.v_dim))
        k_nope, v = kv.split([N, self.v_dim], dim=-1)
        k_rope = lat_xL[..., None, C:].expand(*k_nope.shape[:-1], R)
        return torch.cat([k_nope, k_rope], dim=-1), v

    # Both absorbed products are one batched matmul over heads; einsum computes the same products (bit for bit)
    # but spends ~2x as long in its own setup at decode sizes.
    def _absorb_q(self, q_nope_BTHN, q_rope_BTHR):
        """Fold W_k into the query: [B, T, H, N] x W_k [H, N, C], then the rope part: [B, T, H, L]."""
        w_k, _ = self._w_kv()
        B, T, H, N = q_nope_BTHN.shape
        q_HMC = torch.matmul(q_nope_BTHN.reshape(B * T, H, N).transpose(0, 1), w_k)
        return torch.cat([q_HMC.transpose(0, 1).reshape(B, T, H, -1), q_rope_BTHR], dim=-1)

    def _apply_w_v(self, o_BTHC):
        """Latent attention output [B, T, H, C] -> per-head values [B, T, H, V] through W_v [H, V, C]."""
        _, w_v = self._w_kv()
        B, T, H, C = o_BTHC.shape
        o_HMV = torch.matmul(o_BTHC.reshape(B * T, H, C).transpose(0, 1), w_v.transpose(1, 2))
        return o_HMV.transpose(0, 1).reshape(B, T, H, -1)

    def _attend_shared(self, q_nope_BTHN, q_rope_BTHR, lat_BSL, visible_BTS, topk_BTK, attn_impl, key_end_T):
        """All queries see the same S key slots, masked per query (visibility, and the top-k when given): SDPA per
        query block, each over the keys up to its last visible one, with a [B, t, s] mask of at most BLOCK_ELEMS; a
        decode-sized absorbed call takes _attend_latent over all its keys at once instead."""
        s_max = max(1, int(max(key_end_T)))
        lat_BSL = lat_BSL[:, :s_max]  # keys past every query's last visible one are never read
        B, T = q_nope_BTHN.shape[:2]
        if attn_impl == "absorbed" and T <= DECODE_T and B * T * s_max <= BLOCK_ELEMS:
            # A decode-sized call over one latent "head": two batched products over [B, T*H] query rows beat SDPA's
            # kernel, which runs a [1, s] product per (row, head) (2x at batch 16 x 150 keys, 1.6x at 1 x 512 here).
            keep_BTs = _kept(visible_BTS, topk_BTK, 0, T, s_max)
            return self._attend_latent(self._absorb_q(q_nope_BTHN, q_rope_BTHR), lat_BSL, keep_BTs)
        if attn_impl == "expanded":
            k_BSHE, v_BSHV = self._expand(lat_BSL)
            q_BHTE = torch.cat([q_nope_BTHN, q_rope_BTHR], dim=-1).transpose(1, 2)
            k_BHSE, v_BHSV = k_BSHE.transpose(1, 2), v_BSHV.transpose(1, 2)
            gqa = False
        else:
            q_BHTE = self._absorb_q(q_nope_BTHN, q_rope_BTHR).transpose(1, 2)
            k_BHSE, v_BHSV = lat_BSL.unsqueeze(1), lat_BSL[..., : self.latent].unsqueeze(1)  # one latent "head"
            gqa = True
        E, V = q_BHTE.shape[-1], v_BHSV.shape[-1]
        if V < E:  # CPU SDPA takes its fused (flash) kernel only when q, k, v share a head dim: pad v (4x here)
            v_BHSV = F.pad(v_BHSV, (0, E - V))
        # Additive mask, finite: a query with nothing kept stays finite (SDPA's bool masks take a slower path here).
        neg = torch.tensor(torch.finfo(q_BHTE.dtype).min, dtype=q_BHTE.dtype, device=q_BHTE.device)
        zero = torch.zeros((), dtype=q_BHTE.dtype, device=q_BHTE.device)
        o_BHTE = q_BHTE.new_empty(q_BHTE.shape)
        step = max(1, min(QUERY_BLOCK, BLOCK_ELEMS // (B * s_max)))
        for t0 in range(0, T, step):  # query blocks stop at their last visible key: causal work halves
            t1 = min(T, t0 + step)
            s1 = max(1, int(max(key_end_T[t0:t1])))
            keep_Bts = _kept(visible_BTS, topk_BTK, t0, t1, s1)
            bias_B1ts = torch.where(keep_Bts[:, None], zero, neg)
            o_BHTE[:, :, t0:t1] = F.scaled_dot_product_attention(
                q_BHTE[:, :, t0:t1], k_BHSE[:, :, :s1], v_BHSV[:, :, :s1], attn_mask=bias_B1ts,
                scale=self.scale, enable_gqa=gqa)
        o_BHTV = o_BHTE[..., :V]
        if attn_impl == "expanded":
            return o_BHTV.transpose(1, 2)  # [B, T, H, V]
        return self._apply_w_v(o_BHTV.transpose(1, 2))

    def _attend_latent(self, q_BTHL, lat_BSL, keep_BTs):
        """Absorbed attention of every query over the same latent rows lat_BSL, keys masked by keep_BTs: scores as one
        [B, T*H, L] x [B, L, S] product, an fp32 softmax, then [B, T*H, S] x [B, S, C] and W_v. [B, T, H, V]."""
        B, T, H, L = q_BTHL.shape
        neg = torch.finfo(torch.float32).min  # not -inf: a row with nothing kept stays finite
        s_BTHS = torch.matmul(q_BTHL.reshape(B, T * H, L), lat_BSL.transpose(1, 2)).view(B, T, H, -1)
        s_BTHS = s_BTHS.float() * self.scale
        p_BTHS = s_BTHS.masked_fill(~keep_BTs.unsqueeze(2), neg).softmax(-1).to(lat_BSL.dtype)
        o_BTHC = torch.matmul(p_BTHS.view(B, T * H, -1), lat_BSL[..., : self.latent]).view(B, T, H, -1)
        return self._apply_w_v(o_BTHC)

    def _attend_gathered(self, q_nope_BTHN, q_rope_BTHR, lat_BSL, gather, visible_BTS, topk_BTK, attn_impl):
        """Each query attends over its own K top-k latent rows, gathered one query block at a time (never all
        [B, T, K, L] rows of a long prefill chunk at once)."""
        B, T, K = topk_BTK.shape
        per_row = lat_BSL.shape[-1] if lat_BSL is not None else self.latent + self.rope
        if attn_impl == "expanded":  # each gathered row expands to H keys and values
            per_row += self.n_heads * (self.nope + self.rope + self.v_dim)
        step = max(1, min(QUERY_BLOCK, BLOCK_ELEMS // (B * K * per_row)))
        b_B11 = torch.arange(B, device=topk_BTK.device)[:, None, None]
        o_BTHV = None
        for t0 in range(0, T, step):
            t1 = min(T, t0 + step)
            idx_BtK = topk_BTK[:, t0:t1]
            rows_BtKL = gather(idx_BtK) if gather is not None else lat_BSL[b_B11, idx_BtK]
            o_BtHV = self._attend_rows(q_nope_BTHN[:, t0:t1], q_rope_BTHR[:, t0:t1], rows_BtKL,
                                       visible_at(visible_BTS, idx_BtK, t0), attn_impl)
            if t1 - t0 == T:
                return o_BtHV
            if o_BTHV is None:
                o_BTHV = o_BtHV.new_empty(B, T, *o_BtHV.shape[2:])
            o_BTHV[:, t0:t1] = o_BtHV
        return o_BTHV

    def _attend_rows(self, q_nope_BTHN, q_rope_BTHR, rows_BTKL, keep_BTK, attn_impl):
        """Each query has its own K gathered latent rows."""
        if attn_impl == "expanded":
            neg = torch.finfo(torch.float32).min  # not -inf: a row with nothing kept stays finite
            k_BTKHE, v_BTKHV = self._expand(rows_BTKL)
            q_BTHE = torch.cat([q_nope_BTHN, q_rope_BTHR], dim=-1)
            s_BTHK = torch.einsum("bthe,btkhe->bthk", q_BTHE, k_BTKHE).float() * self.scale
            p_BTHK = s_BTHK.masked_fill(~keep_BTK.unsqueeze(2), neg).softmax(-1).to(v_BTKHV.dtype)  # fp32 softmax
            return torch.einsum("bthk,btkhv->bthv", p_BTHK, v_BTKHV)
        # absorbed: each (row, query) pair is a batch entry of _attend_latent with its own K rows
        B, T, K, L = rows_BTKL.shape
        q_NHL = self._absorb_q(q_nope_BTHN, q_rope_BTHR).reshape(B * T, 1, self.n_heads, L)
        o_N1HV = self._attend_latent(q_NHL, rows_BTKL.reshape(B * T, K, L), keep_BTK.reshape(B * T, 1, K))
        return o_N1HV.view(B, T, self.n_heads, -1)
