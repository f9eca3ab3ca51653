"""Turns one scheduled step into model calls: batch tensors in, logits of the sequences that need a token out.

Rows feeding one token (decodes) go into a single call, padded to the longest context. Rows feeding several tokens
(prompt chunks, recomputation after preemption) are sorted by length and packed into calls while padding stays
under PAD_SLACK of the real tokens; one long chunk gets a call of its own. Every call builds a BatchView over the
paged cache; the model writes this step's latent rows into the sequences' blocks and reads the rest from them.
Auto attention (glm5.Impl) then takes absorbed MLA over the top-k gathered latents for calls of <= 16 query tokens
and the expanded / masked path for longer chunks.

Letters: B rows, T query tokens, D model dim, V vocab.
"""

from __future__ import annotations

import torch

from .kv_cache import PagedKVCache
from .scheduler import Sequence

PAD_SLACK = 1.25  # a multi-token call may compute up to 25% padding tokens


def group_rows(plan: list[tuple[Sequence, int]]) -> list[list[tuple[Sequence, int]]]:
    singles = [(s, n) for s, n in plan if n == 1]
    multi = sorted([(s, n) for s, n in plan if n > 1], key=lambda x: -x[1])
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


class ModelRunner:
    def __init__(self, model, cache: PagedKVCache):
        self.model, self.cache = model, cache
        self.device = cache.device
        self.num_calls = 0

    @torch.inference_mode()
    def execute(self, plan: list[tuple[Sequence, int]]) -> tuple[list[Sequence], torch.Tensor | None]:
        """Run the model over this step's tokens. Returns the sequences whose every token is now computed (they
        sample next) and their next-token logits [B, V] (fp32), in that order."""
        out_seqs, out_logits = [], []
        for group in group_rows(plan):
            seqs, h_BD = self._call(group)
            if seqs:
                out_seqs += seqs
                out_logits.append(self.model.lm_head(h_BD).float())
        return out_seqs, (torch.cat(out_logits) if out_logits else None)

    def _call(self, group: list[tuple[Sequence, int]]) -> tuple[list[Sequence], torch.Tensor]:
        ctx = [s.num_computed for s, _ in group]
        new = [n for _, n in group]
        view = self.cache.batch_view([s.blocks for s, _ in group], ctx, new)
        T = view.T
        ids_BT = torch.zeros(len(group), T, dtype=torch.long)
        for b, (s, n) in enumerate(group):
            ids_BT[b, :n] = torch.tensor(s.tokens[s.num_computed:s.num_computed + n])
        h_BTD = self.model.hidden(ids_BT.to(self.device), view.positions_BT, cache=view)
        self.num_calls += 1
        for b, (s, n) in enumerate(group):
            if s.hidden is not None:
                s.hidden.append(h_BTD[b, :n].float().clone())
        # Only rows that reach their last known token produce logits; a mid-prompt chunk needs none.
        rows = [b for b, (s, n) in enumerate(group) if s.num_computed + n == s.num_tokens]
        if not rows:
            return [], h_BTD[:0, 0]
        b_R = torch.tensor(rows, device=self.device)
        t_R = torch.tensor([new[b] - 1 for b in rows], device=self.device)
        return [group[b][0] for b in rows], h_BTD[b_R, t_R]
