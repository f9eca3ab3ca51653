"""Turns one scheduled step into model calls: batch tensors in, logits of the sequences that need a token out.

Rows feeding one token (decodes) go into a single call, padded to the longest context. Rows feeding several tokens
(prompt chunks, recomputation after preemption) are sorted by length and packed into calls while padding stays
under PAD_SLACK of the real tokens; one long chunk gets a call of its own. Every call builds a BatchView over the
paged cache; the model writes this step's latent rows into the sequences' blocks and reads the rest from them.
Auto attention (glm5.Impl) then takes absorbed MLA over the top-k gathered latents for calls of <= 16 query tokens
and the expanded / masked path for longer chunks.

Speculative decoding (speculative.py): a decoding row feeds its last token and its draft tokens (1 + k <= 16 query
tokens, so the verify call takes the decode path above) and gets logits at every one of them; with keep_hidden the
final hidden states of every fed token are kept for the MTP layer, which `mtp` runs over the same paged blocks.

Letters: B rows, T query tokens, D model dim, V vocab.
"""

from __future__ import annotations

import torch

from .kv_cache import PagedKVCache
from .scheduler import Sequence

PAD_SLACK = 1.25  # a multi-token call may compute up to 25% padding tokens


def group_rows(plan: list[tuple[Sequence, int]], short: int = 1) -> list[list[tuple[Sequence, int]]]:
    """Rows of at most `short` tokens (decodes; with speculation, decodes with their drafts) share one call."""
    singles = [(s, n) for s, n in plan if n <= short]
    multi = sorted([(s, n) for s, n in plan if n > short], key=lambda x: -x[1])
    groups, cur, cur_tokens = ([singles] if singles else []), [], 0
    for s, n in multi:
        if cur and (len(cur) + 1) * cur[0][1] > PAD_SLACK * (cur_tokens + n):
            groups.append(cur)
            cur, cur_tokens = [], 0
        cur.append((s, n))
        cur_tokens += n
    if cur:
        groups.append(cur)
    return groups


class Head:
    """The LM head as the runner applies it: an fp32, bias-free head on a CPU is multiplied through a layout made for
    few rows, since MKL's product over the [V, D] matrix nn.Linear holds is slow there for few rows. Measured on a
    2-core AMD EPYC (AVX2; bench/gemv.py, BENCHMARKS.md), one thread, quiet:

    - one row (batch-1 decode): the same matrix stored [D, V] reads at 1.3-2.2x MKL's speed over [V, D] (the `small`
      preset's 32768 x 512 head: 15.3 against 6.9 GB/s; the shipped model's 4096 x 256: 27.4 against 21.3);
    - more rows (batch decode, a verify of drafts): oneDNN's product over a copy prepacked into its own blocked
      layout, 2.0-3.3x MKL's speed from 2 to 4 rows (the shipped head at 2 / 3 rows: 24.0 / 21.2 GB/s against
      [D, V]'s 14.6 / 9.6 and MKL's 11.4 / 7.6), 1.8x at 16 rows, and 3x with 2 threads, where MKL gains nothing.

    Each copy is made on first use and remade whenever the weight changes: its version counter moves on every
    in-place write (an optimizer step), and the engine's update_weights calls invalidate(). Each costs the head's size
    once more in memory (4 MB for the shipped model, 64 MB for the `small` preset). Where this torch build has no
    oneDNN, calls of more rows go through nn.Linear. The layouts sum in different orders: logits agree with
    nn.Linear's to ~1e-6 relative."""

    GEMV_ROWS = 1

    def __init__(self, lm_head):
        self.lm_head = lm_head
        w = lm_head.weight
        self.enabled = w.device.type == "cpu" and w.dtype == torch.float32 and lm_head.bias is None
        self.packable = self.enabled and torch.backends.mkldnn.is_available()
        self._key, self._wt, self._packed = None, None, None

    def __call__(self, h_RD: torch.Tensor) -> torch.Tensor:
        if not self.enabled or h_RD.dim() != 2:
            return self.lm_head(h_RD)
        w = self.lm_head.weight
        # an inference tensor (a model loaded under inference_mode) has no version counter: invalidate() covers it
        key = (id(w), w.data_ptr(), None if w.is_inference() else w._version)
        if key != self._key:
            self.invalidate()
            self._key = key
        x_RD = h_RD.to(w.dtype).contiguous()
        if x_RD.shape[0] <= self.GEMV_ROWS:
            if self._wt is None:
                self._wt = w.detach().t().contiguous()
            return x_RD @ self._wt
        if not self.packable:
            return self.lm_head(x_RD)
        if self._packed is None:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), 16)
        return torch.ops.mkldnn._linear_pointwise(x_RD, self._packed, None, "none", [], "")

    def invalidate(self):
        """Drop the copies (the engine calls this after update_weights)."""
        self._key, self._wt, self._packed = None, None, None


class ModelRunner:
    def __init__(self, model, cache: PagedKVCache, short: int = 1, keep_hidden: bool = False):
        self.model, self.cache = model, cache
        self.head = Head(model.lm_head)
        self.device = cache.device
        self.num_calls = 0
        self.short = short  # group_rows: 1 + the most draft tokens a row verifies
        self.keep_hidden = keep_hidden
        self.hidden: dict[Sequence, torch.Tensor] = {}  # with keep_hidden: [n, D] of each row's fed tokens, last call

    @torch.inference_mode()
    def execute(self, plan: list[tuple[Sequence, int]]) -> tuple[list[Sequence], torch.Tensor | None]:
        """Run the model over this step's tokens. Returns the sequences whose every token is now computed (they
        sample next) and their next-token logits (fp32), in that order: one row per sequence, or 1 + len(draft)
        rows for a sequence feeding drafts (the logits after its last token and after each draft)."""
        out_seqs, out_logits = [], []
        self.hidden = {}
        for group in group_rows(plan, self.short):
            seqs, h_BD = self._call(group)
            if seqs:
                out_seqs += seqs
                out_logits.append(self.head(h_BD).float())
        return out_seqs, (torch.cat(out_logits) if out_logits else None)

    def _call(self, group: list[tuple[Sequence, int]]) -> tuple[list[Sequence], torch.Tensor]:
        ctx = [s.num_computed for s, _ in group]
        new = [n for _, n in group]
        view = self.cache.batch_view([s.blocks for s, _ in group], ctx, new)
        T = view.T
        ids_BT = torch.zeros(len(group), T, dtype=torch.long)
        for b, (s, n) in enumerate(group):
            toks = s.tokens + s.draft if s.draft else s.tokens
            ids_BT[b, :n] = torch.tensor(toks[s.num_computed:s.num_computed + n])
        h_BTD = self.model.hidden(ids_BT.to(self.device), view.positions_BT, cache=view)
        self.num_calls += 1
        for b, (s, n) in enumerate(group):
            if s.hidden is not None:
                s.hidden.append(h_BTD[b, :n].float().clone())
            if self.keep_hidden:
                self.hidden[s] = h_BTD[b, :n]
        # Only rows that reach their last known token produce logits; a mid-prompt chunk needs none.
        rows = [b for b, (s, n) in enumerate(group) if s.num_computed + n == s.num_tokens + len(s.draft)]
        if not rows:
            return [], h_BTD[:0, 0]
        b_R = torch.tensor([b for b in rows for _ in range(1 + len(group[b][0].draft))], device=self.device)
        t_R = torch.tensor([t for b in rows for t in range(new[b] - 1 - len(group[b][0].draft), new[b])],
                           device=self.device)
        return [group[b][0] for b in rows], h_BTD[b_R, t_R]

    @torch.inference_mode()
    def mtp(self, rows: list[tuple[Sequence, int, list[int], torch.Tensor]]) -> torch.Tensor:
        """The MTP layer over rows (seq, start, ids, h_nD): at positions start .. start + n - 1 of seq's blocks it
        takes the main model's final hidden h[t] and token ids[t - start] (= token t + 1) and writes its latent row.
        Returns its hidden state [R, D] at each row's last position (the next draft comes from there)."""
        out_D = [None] * len(rows)
        plan = [(i, len(ids)) for i, (_, _, ids, _) in enumerate(rows)]
        for group in group_rows(plan, self.short):  # (row index, tokens) pairs: same packing as the main calls
            seqs = [rows[i][0] for i, _ in group]
            view = self.cache.batch_view([s.blocks for s in seqs], [rows[i][1] for i, _ in group],
                                         [n for _, n in group])
            T, D = view.T, rows[group[0][0]][3].shape[-1]
            ids_BT = torch.zeros(len(group), T, dtype=torch.long)
            h_BTD = rows[group[0][0]][3].new_zeros(len(group), T, D)
            for b, (i, n) in enumerate(group):
                ids_BT[b, :n] = torch.tensor(rows[i][2])
                h_BTD[b, :n] = rows[i][3]
            x_BTD = self.model.mtp_hidden(h_BTD, ids_BT.to(self.device), view.positions_BT, 0, cache=view)
            self.num_calls += 1
            for b, (i, n) in enumerate(group):
                out_D[i] = x_BTD[b, n - 1]
        return torch.stack(out_D)
