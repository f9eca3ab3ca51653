"""Speculative decoding with the MTP layer: drafting and verification (the engine drives both; engine.py).

The MTP layer (DeepSeek-V3 "NextN", glm5.model.GLM5.mtp_step) predicts token t+2 from the main model's final hidden
state at t and token t+1. Per decode step of a sequence that has computed c tokens and holds token c (not yet fed):
  1. draft 1 comes from the MTP layer at position c-1 (main hidden h[c-1], token c). That call is the one that keeps
     the MTP layer's own cache rows up to date: after every step it runs over each sequence's newly accepted
     positions t (main hidden h[t] from this step's call, token t+1), the last of them giving the draft.
  2. drafts 2..k chain: the MTP layer at position c+j-1 takes draft j and its own output hidden state at the
     previous draft (as training chains MTP depths, train/losses.py, and vLLM's MTP proposer chains them), one
     single-token call per depth for all rows at once. (Feeding every depth the main model's h[c-1] instead, the
     other choice vLLM has had, accepts less on the shipped model, which was trained at depth 1 only: 0.55 / 0.38
     at depths 2 / 3 against 0.73 / 0.56.) A row stops drafting after a draft of low confidence (CONFIDENCE).
  3. one target call feeds token c and the k drafts (k+1 <= 16 query tokens: the decode attention path, absorbed
     MLA over the indexer's top-k gathered rows) and gives logits after each of them.
  4. `verify` keeps the longest accepted run of drafts and adds one token the target chose, so every step emits
     1 .. k+1 tokens. The cache keeps the rows of rejected drafts; the sequence's computed count stops before them,
     so the next call overwrites them and no prefix block is registered while it holds one.

Acceptance is the standard speculative-sampling rule (Leviathan et al. 2023, arXiv 2211.17192; Chen et al. 2023,
arXiv 2302.01318), applied to the distributions the sampler would draw from (sampler.process: min_tokens and
penalties, with the drafts before a position counted as output, then temperature and the filters): draft d drawn
from q is accepted with probability min(1, p(d) / q(d)); at the first rejection the token is drawn from the residual
max(0, p - q) / Z instead and the step ends; if all k are accepted, one more token is drawn from p after the last
draft. Each emitted token is then distributed exactly as plain sampling from p. Greedy rows are the point-mass case:
a draft is kept iff it is the target's argmax, and the emitted token is always the argmax, so greedy output is
plain greedy decoding's (up to the rounding of a k+1-token call against a 1-token one).

Drafts of a sampled row are drawn from the MTP layer's distribution processed like the target's (q), not its argmax
(vLLM's MTP proposer takes the argmax, a point mass q, which accepts with probability p(argmax q) instead of
sum_x min(p(x), q(x))). All of a row's draws (its drafts, acceptance uniforms, the final token) come from its own
generator, so a seeded request is reproducible.

Letters: N logit rows (1 + drafts per row, all rows), R rows, M drafts of one row, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampler import SeqSampling, process, race, tempered_logprobs, top_logprobs
from .scheduler import RUNNING, Sequence

# Drafting stops after a draft whose confidence (its MTP probability) is below this: on the shipped model a draft
# under 0.5 is accepted about 1 time in 5, one over 0.9 about 9 in 10, and every chained draft costs an MTP call.
# The first draft is always verified (its MTP call is needed anyway: it writes the MTP layer's cache rows). Which
# drafts are proposed never changes the distribution of what is emitted (nor a greedy row's tokens), only how fast.
CONFIDENCE = 0.5


@dataclass
class Verdict:
    """What verification emits for one row: tokens (the accepted drafts, then the target's own token) with their
    log-probs, and how many drafts were accepted."""

    tokens: list[int]
    logprobs: list[float]  # raw target log-prob of each token, as plain sampling reports it
    sampling_logprobs: list[float]  # log p under the processed target distribution (0.0 for greedy rows)
    top_logprobs: list  # per token: [(id, logprob)] of the raw target distribution, or None
    accepted: int


@torch.no_grad()
def draft(logits_RV: torch.Tensor, states: list[SeqSampling], outputs: list[list[int]]):
    """One draft token per row from MTP logits: the argmax of the processed logits for greedy rows, a draw from the
    processed distribution q for sampled rows. Returns (tokens, [q_V or None per row], confidences): a draft's
    confidence is its probability under the MTP layer's processed distribution (at temperature 1 for greedy rows),
    which predicts acceptance well (see CONFIDENCE)."""
    x_RV = process(logits_RV.float(), states, outputs)
    tok_R = x_RV.argmax(-1)
    conf_R = x_RV.softmax(-1).gather(1, tok_R[:, None])[:, 0]
    q: list = [None] * len(states)
    rows = [r for r, st in enumerate(states) if not st.params.greedy]
    if rows:
        sub = [states[r] for r in rows]
        r_r = torch.tensor(rows, device=x_RV.device)
        lp_rV = tempered_logprobs(x_RV[r_r], sub)
        tok_r = race(lp_rV, [st.generator for st in sub])
        tok_R[r_r] = tok_r
        conf_R[r_r] = lp_rV.gather(1, tok_r[:, None])[:, 0].exp()
        for i, r in enumerate(rows):
            q[r] = lp_rV[i].exp()
    return tok_R.tolist(), q, conf_R.tolist()


def residual(p_V: torch.Tensor, q_V: torch.Tensor) -> torch.Tensor:
    """max(0, p - q), unnormalised: what a rejected position draws from. Where p <= q everywhere (p == q up to
    rounding, so a rejection had probability ~0) it is p itself."""
    r_V = (p_V - q_V).clamp_min_(0)
    return r_V if bool(r_V.sum() > 0) else p_V


def judge(p_JV: torch.Tensor, q_MV: torch.Tensor, drafts: list[int], u_M: torch.Tensor) -> tuple[int, torch.Tensor]:
    """One sampled row: p_JV the target distributions after the row's last token and after each draft (J = M + 1),
    q_MV the distributions the drafts were drawn from, u_M uniforms in [0, 1). Draft j is accepted iff
    u_j * q_j(d_j) < p_j(d_j), i.e. with probability min(1, p/q). Returns (accepted count a, the unnormalised
    distribution the final token is drawn from: the residual at a if a draft was rejected, else p after the last)."""
    M = len(drafts)
    d_M = torch.tensor(drafts, device=p_JV.device)
    m_M = torch.arange(M, device=p_JV.device)
    ok = (u_M * q_MV[m_M, d_M] < p_JV[m_M, d_M]).tolist()
    a = ok.index(False) if False in ok else M
    return a, (residual(p_JV[a], q_MV[a]) if a < M else p_JV[M])


@torch.no_grad()
def verify(logits_NV: torch.Tensor, drafts: list[list[int]], q: list[list], states: list[SeqSampling],
           outputs: list[list[int]]) -> list[Verdict]:
    """Accept or reject each row's drafts against the target logits. logits_NV holds, row after row, 1 + M_r rows:
    the target's logits after the row's last token and after each of its drafts. q[r][j]: the distribution draft j
    was drawn from (None for greedy rows). outputs[r]: the row's generated tokens before this step."""
    logits_NV = logits_NV.float()  # fp32: these log-probs feed RL importance ratios
    lse_N1 = logits_NV.logsumexp(-1, keepdim=True)
    st_N = [st for st, d in zip(states, drafts) for _ in range(len(d) + 1)]
    out_N = [out + d[:j] for out, d in zip(outputs, drafts) for j in range(len(d) + 1)]
    x_NV = process(logits_NV, st_N, out_N)
    start = [0]
    for d in drafts:
        start.append(start[-1] + len(d) + 1)
    greedy_N = x_NV.argmax(-1).tolist()
    sampled = [r for r, st in enumerate(states) if not st.params.greedy]
    lp = {}
    if sampled:
        idx = [n for r in sampled for n in range(start[r], start[r + 1])]
        lp_nV = tempered_logprobs(x_NV[torch.tensor(idx, device=x_NV.device)], [st_N[n] for n in idx])
        lp = {n: lp_nV[i] for i, n in enumerate(idx)}

    picks: list[tuple[list[int], int, list[int]]] = []  # per row: (tokens, accepted, logit row of each token)
    slps: list[list[float]] = []
    for r, (st, d) in enumerate(zip(states, drafts)):
        s, M = start[r], len(d)
        if st.params.greedy:
            a = next((j for j in range(M) if d[j] != greedy_N[s + j]), M)
            toks = d[:a] + [greedy_N[s + a]]
            slps.append([0.0] * (a + 1))
        else:
            lp_JV = torch.stack([lp[n] for n in range(s, s + M + 1)])
            u_M = torch.rand(M, generator=st.generator, device=lp_JV.device)
            a, final_V = judge(lp_JV.exp(), torch.stack(q[r]), d, u_M)
            toks = d[:a] + race(final_V.log()[None], [st.generator]).tolist()
            j_A, t_A = torch.arange(a + 1, device=lp_JV.device), torch.tensor(toks, device=lp_JV.device)
            slps.append(lp_JV[j_A, t_A].tolist())
        picks.append((toks, a, list(range(s, s + a + 1))))

    n_K = torch.tensor([n for _, _, ns in picks for n in ns], device=logits_NV.device)
    t_K = torch.tensor([t for toks, _, _ in picks for t in toks], device=logits_NV.device)
    raw = (logits_NV[n_K, t_K] - lse_N1[n_K, 0]).tolist()
    tops = top_logprobs(logits_NV[n_K], lse_N1[n_K], [st_N[n] for n in n_K.tolist()])
    out, k = [], 0
    for (toks, a, _), slp in zip(picks, slps):
        out.append(Verdict(toks, raw[k:k + len(toks)], slp, tops[k:k + len(toks)], a))
        k += len(toks)
    return out


# -- the engine's drafting side ------------------------------------------------------------------------------------
def clear(seq: Sequence):
    """Drop a sequence's pending drafts (verified, or no room to verify them)."""
    seq.draft, seq.lookahead = [], 0
    seq.state.draft_q, seq.state.draft_h = [], None


class Drafter:
    """Runs the MTP layer for the engine: its cache rows after every step, the first draft of each decoding sequence
    then, the chained drafts before the next target call. Keeps per-sequence draft state on the engine's sampling
    state (draft_q, draft_h, draft_conf) and counts what verification accepts."""

    def __init__(self, model, runner, k: int, vocab_limit: int):
        self.model, self.runner, self.k, self.vocab_limit = model, runner, k, vocab_limit
        self.confidence = CONFIDENCE
        self.verify_rows = self.draft_tokens = self.accepted_tokens = 0
        self.drafted_at, self.accepted_at = [0] * k, [0] * k  # [j]: drafts at depth j+1 verified / accepted

    def lookahead(self, seq: Sequence) -> int:
        """How many drafts seq may verify next step: none with a grammar (engine notes) nor past max_tokens."""
        if seq.state.matcher is not None:
            return 0
        return max(0, min(self.k, seq.state.max_tokens - len(seq.output_ids) - 1))

    def propose(self, x_RD: torch.Tensor, seqs: list[Sequence]) -> list[int | None]:
        """One draft per sequence from MTP hidden states: its token (None where the MTP logits are not finite: the
        sequence drafts nothing more this step); q and confidence go to the sequence's state."""
        logits_RV = self.model.mtp_head(0, self.runner.head)(x_RD).float()[:, :self.vocab_limit]
        finite_R = torch.isfinite(logits_RV).all(-1).tolist()
        toks, q, conf = draft(logits_RV, [s.state for s in seqs], [s.output_ids + s.draft for s in seqs])
        out = []
        for seq, t, q_V, c, ok in zip(seqs, toks, q, conf, finite_R):
            out.append(t if ok else None)
            if ok:
                seq.state.draft_q.append(q_V)
                seq.state.draft_conf = c
        return out

    @torch.inference_mode()
    def after_step(self, plan: list[tuple[Sequence, int]], computed: dict[Sequence, int], kept: dict[Sequence, int]):
        """The MTP layer over every running sequence's newly computed positions (computed[seq] .. + kept, or the n
        it fed when it verified nothing): its cache rows, kept for every sequence (grammar rows too) so a prefix
        block serves any later request's drafts; then the first draft of each sequence that decodes next."""
        rows, firsts = [], []
        for seq, n in plan:
            a, t0 = kept.get(seq, n), computed[seq]
            if seq.status != RUNNING or seq.num_computed != t0 + a or seq.num_tokens < t0 + a + 1:
                continue  # finished or failed in this step
            rows.append((seq, t0, seq.tokens[t0 + 1:t0 + a + 1], self.runner.hidden[seq][:a]))
            if seq.num_tokens - seq.num_computed == 1 and self.lookahead(seq):
                firsts.append(len(rows) - 1)
        if not rows:
            return
        x_RD = self.runner.mtp(rows)
        seqs = [rows[i][0] for i in firsts]
        for seq in seqs:
            clear(seq)
        if not seqs:
            return
        for i, seq, t in zip(firsts, seqs, self.propose(x_RD[firsts], seqs)):
            if t is not None:
                seq.draft = [t]
                seq.lookahead = self.lookahead(seq) if seq.state.draft_conf >= self.confidence else 1
                seq.state.draft_h = x_RD[i]

    @torch.inference_mode()
    def chain(self, plan: list[tuple[Sequence, int]]) -> list[tuple[Sequence, int]]:
        """Before the target call: extend each verifying row's draft towards the n - 1 tokens the scheduler granted
        it, one MTP call per depth over all rows still drafting. Returns the plan with each row's final count."""
        want = {}
        for seq, n in plan:
            if not seq.draft:
                continue
            if n == 1:
                clear(seq)  # no room for drafts this step (budget, blocks)
            else:
                want[seq] = n - 1
        while True:
            seqs = [s for s, m in want.items() if len(s.draft) < m and s.state.draft_conf >= self.confidence]
            if not seqs:
                break
            rows = [(s, s.num_computed + len(s.draft) - 1, s.draft[-1:], s.state.draft_h[None]) for s in seqs]
            x_RD = self.runner.mtp(rows)
            for i, (seq, t) in enumerate(zip(seqs, self.propose(x_RD, seqs))):
                if t is None:
                    want[seq] = len(seq.draft)
                else:
                    seq.draft.append(t)
                    seq.state.draft_h = x_RD[i]
        for seq in want:  # what the chain could not draft (low confidence, non-finite logits) is not verified
            seq.lookahead = len(seq.draft)
        return [(seq, 1 + len(seq.draft)) if seq in want else (seq, n) for seq, n in plan]

    def count(self, seq: Sequence, verdict: Verdict):
        self.verify_rows += 1
        self.draft_tokens += len(seq.draft)
        self.accepted_tokens += verdict.accepted
        for j in range(len(seq.draft)):
            self.drafted_at[j] += 1
            self.accepted_at[j] += j < verdict.accepted

    def stats(self) -> dict:
        """Drafts verified and accepted, acceptance rate (accepted / verified), tokens a verifying row emitted per
        step on average, and acceptance by depth (a run of j accepted drafts counts at depths 1..j; None where no draft
        reached that depth)."""
        return {"speculative_tokens": self.k, "spec_verify_rows": self.verify_rows,
                "spec_draft_tokens": self.draft_tokens, "spec_accepted_tokens": self.accepted_tokens,
                "spec_acceptance_rate": self.accepted_tokens / max(1, self.draft_tokens),
                "spec_mean_emitted": (self.verify_rows + self.accepted_tokens) / max(1, self.verify_rows),
                "spec_acceptance_by_depth": [a / d if d else None for a, d in zip(self.accepted_at, self.drafted_at)]}

    @staticmethod
    def empty_stats() -> dict:
        return {"speculative_tokens": 0, "spec_verify_rows": 0, "spec_draft_tokens": 0, "spec_accepted_tokens": 0,
                "spec_acceptance_rate": 0.0, "spec_mean_emitted": 0.0, "spec_acceptance_by_depth": []}
