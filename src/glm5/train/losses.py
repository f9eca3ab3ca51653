"""Training losses, each a short function, and `ForwardLoss`: the one module a training step calls (so DDP and FSDP2
see a single forward), returning the stage's total loss plus detached statistics.

Stages (GLM-5's DSA recipe, after DeepSeek-V3.2: dense warm-up of the indexers, then sparse training):
  pretrain    dense attention (MLA), indexers frozen; loss = LM + MTP + sequence-wise balance
  dsa_warmup  dense attention, only the indexers train; loss = KL(main attention || softmax(index scores)) over the
              visible keys of each query
  sparse      top-k attention, everything trains; loss = LM + MTP + balance + KL over the selected keys only, with
              the indexer's inputs detached: the indexer learns only from the KL, the rest only from the LM losses

Normalisation: every loss is a sum over this micro-batch divided by a count over the *whole* optimizer step
(all micro-batches, all ranks), taken from the global batch every rank holds. Summing micro-batch gradients and
averaging over ranks (times world size) then gives exactly the global mean, whatever the split.

Letters: B rows, T tokens, S key slots, V vocab, N = B*T routed tokens, E experts, k experts per token.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model import ForwardAux
from ..model.dsa import select_topk

IGNORE = -100
STAGES = ("pretrain", "dsa_warmup", "sparse")


# -- labels and plain losses ----------------------------------------------------------------------------------------
def shifted_labels(tokens_BT1: torch.Tensor, doc_BT1: torch.Tensor, shift: int, n: int,
                   loss_BT1: torch.Tensor | None = None) -> torch.Tensor:
    """Labels [B, n] for predicting token t + shift from position t: IGNORE where that token lies in another
    document (packed rows), so neither the next-token head nor any MTP depth learns across a boundary, and where the
    token is not a training target (loss_BT1 False: SFT prompts, tool results)."""
    lab_Bn = tokens_BT1[:, shift:shift + n]
    keep_Bn = doc_BT1[:, shift:shift + n] == doc_BT1[:, :n]
    if loss_BT1 is not None:
        keep_Bn = keep_Bn & loss_BT1[:, shift:shift + n]
    return lab_Bn.masked_fill(~keep_Bn, IGNORE)


# Rows of logits per chunk. At FULL's head (V = 4096) 512-1024 rows measured fastest on AVX2 (64 and 128 slower);
# at V = 32768 chunking neither gains nor loses from 512 rows up (BENCHMARKS.md). [512, 155k] fp32 is 317 MB.
HEAD_CHUNK = 512


def linear_ce(h_ND: torch.Tensor, W_VD: torch.Tensor, lab_N: torch.Tensor, want_h: bool = False,
              want_W: bool = False, w_N=None):
    """(sum_n CE(h[n] @ W.T, lab[n]), d/dh or None, d/dW or None), row chunk by row chunk, the gradients (fp32)
    computed on the way: the [N, V] logits and their gradient never exist whole, and no separate log-softmax pass
    runs over them (Liger's fused linear cross-entropy). The matmuls run in the ambient dtype (bf16 under
    autocast), the softmax in fp32.

    w_N weights each row's CE and its gradient (sum_n w_n CE_n; weights are constants, never differentiated): a
    tensor [N], or a function (rows: slice, ce_c: fp32 [c]) -> w_c, called once per chunk with that chunk's CE, for
    weights that depend on the row's own log-prob -log p = CE (the RL policy loss's), so one pass suffices."""
    dev = h_ND.device.type
    mm_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h_ND.dtype
    loss = torch.zeros((), dtype=torch.float32, device=h_ND.device)
    gh_ND = torch.empty(h_ND.shape, dtype=torch.float32, device=h_ND.device) if want_h else None
    gW_VD = torch.zeros(W_VD.shape, dtype=torch.float32, device=W_VD.device) if want_W else None
    for s in range(0, h_ND.shape[0], HEAD_CHUNK):
        h_cD, lab_c = h_ND[s:s + HEAD_CHUNK], lab_N[s:s + HEAD_CHUNK]
        z_cV = (h_cD @ W_VD.T).float()
        lse_c = torch.logsumexp(z_cV, 1)
        ce_c = lse_c - z_cV.gather(1, lab_c[:, None])[:, 0]
        w_c = None
        if w_N is not None:
            w_c = (w_N(slice(s, s + len(lab_c)), ce_c) if callable(w_N) else w_N[s:s + HEAD_CHUNK]).float()
            ce_c = w_c * ce_c
        loss += ce_c.sum()
        if want_h or want_W:
            g_cV = z_cV.sub_(lse_c[:, None]).exp_()  # d loss / d logits = softmax - one-hot, in place
            g_cV[torch.arange(len(lab_c), device=g_cV.device), lab_c] -= 1.0
            if w_c is not None:
                g_cV.mul_(w_c[:, None])
            g_cV = g_cV.to(mm_dtype)
            if want_h:
                gh_ND[s:s + HEAD_CHUNK] = g_cV @ W_VD.to(mm_dtype)
            if want_W:
                gW_VD += g_cV.T @ h_cD.to(mm_dtype)
    return loss, gh_ND, gW_VD


class _LinearCE(torch.autograd.Function):
    """linear_ce under autograd: the forward already holds the gradients (the loss is a scalar), backward scales."""

    @staticmethod
    def forward(ctx, h_ND, W_VD, lab_N):
        loss, gh_ND, gW_VD = linear_ce(h_ND, W_VD, lab_N, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.save_for_backward(gh_ND, gW_VD)
        ctx.dtypes = h_ND.dtype, W_VD.dtype
        return loss

    @staticmethod
    def backward(ctx, g):
        gh_ND, gW_VD = ctx.saved_tensors
        gh = None if gh_ND is None else (gh_ND * g).to(ctx.dtypes[0])
        gW = None if gW_VD is None else (gW_VD * g).to(ctx.dtypes[1])
        return gh, gW, None


def head_ce_sum(head: nn.Linear, h_BTD: torch.Tensor, labels_BT: torch.Tensor, norm: nn.Module | None = None
                ) -> torch.Tensor:
    """Cross-entropy summed over the labelled positions of the logits head(norm(h)): the vocabulary projection is a
    step's largest matmul, so it runs only where labels are kept (SFT rows are mostly prompt tokens that carry no
    loss), fused with the loss and its gradients (linear_ce). The same value and gradients as F.cross_entropy over
    the full logits with ignore_index, up to summation order. The softmax is fp32: a bf16 log-sum-exp over 155k
    logits loses the small probabilities that carry the loss."""
    keep_BT = labels_BT != IGNORE
    h_ND = h_BTD[keep_BT]
    if norm is not None:
        h_ND = norm(h_ND)
    return linear_ce_loss(h_ND, head.weight, labels_BT[keep_BT])


def linear_ce_loss(h_ND: torch.Tensor, W_VD: torch.Tensor, lab_N: torch.Tensor) -> torch.Tensor:
    """sum_n CE(h[n] @ W.T, lab[n]) as a differentiable scalar (linear_ce under autograd, gradients for whichever
    of h and W require them)."""
    if torch.is_grad_enabled() and (h_ND.requires_grad or W_VD.requires_grad):
        return _LinearCE.apply(h_ND, W_VD, lab_N)
    return linear_ce(h_ND, W_VD, lab_N)[0]


def sequence_balance_sum(idx_Nk: torch.Tensor, logits_NE: torch.Tensor, rows: int) -> torch.Tensor:
    """DeepSeek-V3 complementary sequence-wise balance loss, summed over rows (sequences):
    per row sum_e f_e * P_e with f_e = E / (k T) * #tokens routed to e, P_e = mean_t s_te / sum_e' s_te'.
    1.0 for a perfectly balanced row; the caller scales it by a small weight."""
    N, k = idx_Nk.shape
    E = logits_NE.shape[1]
    T = N // rows
    s_NE = logits_NE.float().sigmoid()  # the router's scores (sigmoid, as the gate computes them)
    P_BE = (s_NE / s_NE.sum(-1, keepdim=True)).view(rows, T, E).mean(1)
    row_N1 = torch.arange(rows, device=idx_Nk.device).repeat_interleave(T)[:, None]
    counts_BE = torch.bincount((row_N1 * E + idx_Nk).flatten(), minlength=rows * E).view(rows, E).float()
    f_BE = counts_BE * (E / (k * T))  # no gradient: selection counts are constants, as in the paper
    return (f_BE * P_BE).sum()


def indexer_kl_sum(index_BTX: torch.Tensor, target_BTX: torch.Tensor) -> torch.Tensor:
    """Sum over queries of KL(target || softmax(index scores over the keys attention kept)). The last dim runs over
    key slots [S] (dense attention) or over the top-k picks [K] (sparse; the scores gathered there); a key was kept
    where its score is finite (visible). target is zero elsewhere and sums to 1 over the kept keys (main attention
    probabilities, summed over heads and L1-normalised)."""
    keep_BTX = torch.isfinite(index_BTX)
    logq_BTX = index_BTX.log_softmax(-1).masked_fill(~keep_BTX, 0.0)
    p_BTX = target_BTX.float()
    return (torch.special.xlogy(p_BTX, p_BTX) - p_BTX * logq_BTX).sum()


def topk_recall(dense_BTS: torch.Tensor, index_BTS: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    """(sum over queries of the dense attention mass on the indexer's top-k, number of queries), counting only
    queries that see more than k keys (the others keep everything: recall 1 by construction)."""
    visible_BTS = torch.isfinite(index_BTS)
    rows_BT = visible_BTS.sum(-1) > k
    if not bool(rows_BT.any()):
        return dense_BTS.new_zeros(()), 0
    idx_BTK = select_topk(index_BTS.detach(), k)
    mass_BT = dense_BTS.gather(-1, idx_BTK).sum(-1)  # invisible picks carry zero dense mass
    return mass_BT[rows_BT].sum(), int(rows_BT.sum())


def loss_denominators(tokens_BT1: torch.Tensor, doc_BT1: torch.Tensor, mtp_depth: int,
                      loss_BT1: torch.Tensor | None = None) -> dict[str, float]:
    """Global counts for one optimizer step, from the whole step batch (identical on every rank)."""
    B, W = tokens_BT1.shape
    T = W - 1
    den = {"rows": float(B), "queries": float(B * T)}
    for d in range(mtp_depth + 1):  # depth 0 = next token; depth d predicts token t + 1 + d
        n = T - d
        labels_Bn = shifted_labels(tokens_BT1, doc_BT1, d + 1, n, loss_BT1)
        den[f"labels{d}"] = float(max(1, int((labels_Bn != IGNORE).sum())))
        den[f"queries{d}"] = float(B * n)
    return den


# -- the step's forward -----------------------------------------------------------------------------------------------
class ForwardLoss(nn.Module):
    """Wraps a GLM5 for one training stage. forward(tokens, docs, positions, denominators) ->
    (total loss, {name: normalised loss tensor}, {name: detached statistic})."""

    def __init__(self, model: nn.Module, stage: str = "pretrain", mtp_depth: int = 1, mtp_weight: float = 0.3,
                 balance_weight: float = 1e-4, indexer_weight: float = 1.0):
        super().__init__()
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        if mtp_depth > 0 and not len(model.mtp):
            raise ValueError(f"mtp_depth={mtp_depth} but the model has no MTP layer (num_nextn_predict_layers = 0)")
        self.model = model
        self.stage, self.mtp_depth, self.mtp_weight = stage, mtp_depth, mtp_weight
        self.balance_weight, self.indexer_weight = balance_weight, indexer_weight

    def _aux(self) -> ForwardAux:
        dsa = self.stage != "pretrain"
        return ForwardAux(want_index_scores=dsa, want_attn_probs=dsa, detach_indexer_input=dsa)

    def forward(self, tokens_BT1, doc_BT1, pos_BT1, den: dict, loss_BT1=None, probe_recall: bool = False):
        if probe_recall:
            return self.probe_recall(tokens_BT1, doc_BT1, pos_BT1)
        model, cfg = self.model, self.model.config
        ids_BT, doc_BT, pos_BT = tokens_BT1[:, :-1], doc_BT1[:, :-1], pos_BT1[:, :-1]
        B, T = ids_BT.shape
        auxes = [self._aux()]
        h_BTD = model.hidden(ids_BT, pos_BT, None, doc_BT, auxes[0])
        labels_BT = shifted_labels(tokens_BT1, doc_BT1, 1, T, loss_BT1)
        losses = {"lm": head_ce_sum(model.lm_head, h_BTD, labels_BT) / den["labels0"]}
        # MTP: one shared layer applied at every depth (GLM-5 trains 3 depths on one layer's parameters). Depth d
        # takes the previous depth's hidden at t and token t + d, and predicts token t + d + 1.
        h_prev = h_BTD
        mtp = []
        for d in range(1, self.mtp_depth + 1):
            n = T - d
            auxes.append(self._aux())
            h_prev = model.mtp_hidden(h_prev[:, :n], tokens_BT1[:, d:d + n], pos_BT[:, :n], 0, None, doc_BT[:, :n],
                                      auxes[-1])
            labels_Bn = shifted_labels(tokens_BT1, doc_BT1, d + 1, n, loss_BT1)
            mtp.append(head_ce_sum(model.lm_head, h_prev, labels_Bn, model.mtp[0].shared_head.norm) / den[f"labels{d}"])
        if mtp:
            losses["mtp"] = torch.stack(mtp).mean()

        bal, loads = [], {}
        for a in auxes:
            for layer, (idx_Nk, logits_NE) in a.router.items():
                bal.append(sequence_balance_sum(idx_Nk, logits_NE, B) / den["rows"])
                load = torch.bincount(idx_Nk.flatten(), minlength=logits_NE.shape[1]).float()
                loads[layer] = loads[layer] + load if layer in loads else load  # MTP depths share one layer
        if bal:
            losses["balance"] = torch.stack(bal).mean()

        stats = {"loads": loads}
        if self.stage != "pretrain":
            kl, rec_sum, rec_n = [], 0.0, 0
            for depth, a in enumerate(auxes):
                for layer, index_BTS in a.index_scores.items():
                    topk_BTK = a.topk.get(layer)  # sparse: the KL lives on the kept keys, where attn_probs is
                    index_BTX = index_BTS if topk_BTK is None else index_BTS.gather(-1, topk_BTK)
                    kl.append(indexer_kl_sum(index_BTX, a.attn_probs[layer]) / den[f"queries{depth}"])
                    if self.stage == "dsa_warmup":  # dense attention: its probs are the recall reference
                        s, c = topk_recall(a.attn_probs[layer], index_BTS, cfg.index_topk)
                        rec_sum, rec_n = rec_sum + s, rec_n + c
            if not kl:
                raise ValueError("stage needs index scores but no layer produced any (no 'full' indexer layer?)")
            losses["indexer_kl"] = torch.stack(kl).mean()
            if self.stage == "dsa_warmup":
                stats["recall_sum"], stats["recall_n"] = torch.as_tensor(rec_sum, dtype=torch.float32), rec_n

        if self.stage == "dsa_warmup":
            total = losses["indexer_kl"]
        else:
            total = losses["lm"]
            if "mtp" in losses:
                total = total + self.mtp_weight * losses["mtp"]
            if "balance" in losses:
                total = total + self.balance_weight * losses["balance"]
            if "indexer_kl" in losses:
                total = total + self.indexer_weight * losses["indexer_kl"]
        return total, losses, stats

    @torch.no_grad()
    def probe_recall(self, tokens_BT1, doc_BT1, pos_BT1):
        """Dense attention mass recalled by the indexer's top-k, from one extra dense no-grad forward (the sparse
        stage's own forward only sees the selected keys). Returns (sum over queries, number of queries)."""
        model = self.model
        impl, model.impl = model.impl, type(model.impl)(**{**vars(model.impl), "dsa": "off"})
        try:
            aux = ForwardAux(want_index_scores=True, want_attn_probs=True)
            model.hidden(tokens_BT1[:, :-1], pos_BT1[:, :-1], None, doc_BT1[:, :-1], aux)
        finally:
            model.impl = impl
        s, n = torch.zeros(()), 0
        for layer, index_BTS in aux.index_scores.items():
            ds, dn = topk_recall(aux.attn_probs[layer], index_BTS, model.config.index_topk)
            s, n = s + ds, n + dn
        return s, n
