"""Continuous batching: which sequences run this step and how many tokens each feeds. Queues and budgets only;
no tensors (the runner builds those).

Each step (as vLLM's v1 scheduler, simplified):
  1. running sequences in admission order, decodes (one token) before unfinished prefills; each takes
     min(tokens still to compute, budget left), so a long prompt is prefilled in chunks over several steps.
     If the cache has no room for a sequence's new slots, the newest running sequence is preempted: its blocks are
     released (full ones stay in the prefix cache's LRU) and it goes back to the front of the waiting queue with
     nothing computed; when readmitted it recomputes prompt + generated tokens (in chunks, like a prompt), reusing
     whatever prefix blocks survived. The oldest running sequence can therefore always progress, and since no
     request larger than the whole cache is admitted (the engine checks at add time), none ever fails for lack
     of room.
     A decoding sequence may also verify draft tokens (speculative decoding): it asks for `lookahead` more slots
     and feeds 1 + lookahead tokens. Drafts come after every running sequence has its tokens, from the budget and
     free blocks left (the lookahead shrinks to fit, to 0: a plain decode), so they never preempt nor delay a
     running sequence; like vLLM's spec tokens they come before admissions, whose budget and blocks they may take.
  2. if nothing was preempted, waiting sequences in order while budget, max_num_seqs and free blocks allow,
     after taking their longest cached prefix.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .kv_cache import ROOT, BlockManager

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    index: int  # which of the request's n samples
    tokens: list[int]  # prompt + generated
    prompt_len: int
    state: object = None  # the engine's per-sequence sampling state (opaque here)
    num_computed: int = 0  # tokens whose KV is in the cache
    blocks: list[int] = field(default_factory=list)
    num_registered: int = 0  # leading full blocks known to the prefix cache
    chain: int = ROOT  # key id of the last of them
    cacheable: bool = True  # False once the weights changed under it: its KV mixes two policies
    status: str = WAITING
    admitted: int = -1  # admission counter: lower = older = higher priority
    num_preemptions: int = 0
    # [n, D] final hidden states of the tokens fed so far, call by call, when the request asked for them
    hidden: list | None = None
    # Speculative decoding: how many draft tokens the next decode may verify (set by the engine, cut here to what
    # the budget and the cache allow), and the drafts themselves, fed after `tokens` and never part of them.
    lookahead: int = 0
    draft: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.prompt_len:]


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_batched_tokens: int = 2048, max_num_seqs: int = 64):
        if max_num_batched_tokens < 1 or max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        self.blocks = blocks
        self.max_num_batched_tokens, self.max_num_seqs = max_num_batched_tokens, max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order
        self._admissions = 0
        self.num_preemptions = 0

    def add(self, seq: Sequence, front: bool = False):
        seq.status = WAITING
        (self.waiting.appendleft if front else self.waiting.append)(seq)

    def _blocks_needed(self, seq: Sequence, n: int) -> int:
        P = self.blocks.block_size
        return max(0, -(-(seq.num_computed + n) // P) - len(seq.blocks))

    # -- one step --------------------------------------------------------------------------------------------------
    def schedule(self) -> list[tuple[Sequence, int]]:
        """[(sequence, number of tokens it feeds this step)], blocks already allocated for them."""
        budget = self.max_num_batched_tokens
        plan: dict[Sequence, int] = {}
        preempted = False
        order = [s for s in self.running if s.num_tokens - s.num_computed == 1] + \
                [s for s in self.running if s.num_tokens - s.num_computed > 1]
        for seq in order:
            if budget == 0:
                break
            if seq.status != RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.num_tokens - seq.num_computed, budget)
            need = self._blocks_needed(seq, n)
            while need > self.blocks.num_free:
                victim = self.running[-1]  # the newest admitted
                if victim in plan:
                    budget += plan.pop(victim)
                self.preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status != RUNNING:
                continue
            seq.blocks += self.blocks.allocate(need)
            plan[seq] = n
            budget -= n
        budget = self._add_drafts(plan, budget)

        while self.waiting and budget > 0 and not preempted and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hit = 0
            if seq.num_computed == 0 and not seq.blocks and seq.cacheable and seq.hidden is None:
                # At least the last token must be fed: its logits give the next token. (A sequence that keeps
                # its hidden states computes every token: a cached block has KV but no hidden states.)
                max_blocks = (seq.num_tokens - 1) // self.blocks.block_size
                seq.blocks, seq.chain = self.blocks.take_prefix(seq.tokens, max_blocks)
                seq.num_registered = len(seq.blocks)
                seq.num_computed = hit = len(seq.blocks) * self.blocks.block_size
            n = min(seq.num_tokens - seq.num_computed, budget)
            need = self._blocks_needed(seq, n)
            if need > self.blocks.num_free:
                self._reset(seq)
                break
            seq.blocks += self.blocks.allocate(need)
            self.blocks.hit_tokens += hit
            self.waiting.popleft()
            seq.status, seq.admitted = RUNNING, self._admissions
            self._admissions += 1
            self.running.append(seq)
            plan[seq] = n
            budget -= n
        return list(plan.items())

    def _add_drafts(self, plan: dict[Sequence, int], budget: int) -> int:
        """Each scheduled decode's drafts from what budget and free blocks are left (its lookahead cut to fit);
        returns the budget left."""
        P = self.blocks.block_size
        for seq in plan:
            if not seq.lookahead or seq.num_tokens - seq.num_computed != 1:
                continue
            room = (len(seq.blocks) + self.blocks.num_free) * P - seq.num_computed - 1
            seq.lookahead = max(0, min(seq.lookahead, budget, room))
            seq.blocks += self.blocks.allocate(self._blocks_needed(seq, 1 + seq.lookahead))
            plan[seq] += seq.lookahead
            budget -= seq.lookahead
        return budget

    def advance(self, seq: Sequence, n: int):
        """After the model call: n more tokens of seq are in the cache; register blocks that just filled up."""
        seq.num_computed += n
        if not seq.cacheable:
            return
        P = self.blocks.block_size
        while seq.num_registered < seq.num_computed // P:
            i = seq.num_registered
            seq.chain = self.blocks.register(seq.blocks[i], seq.chain, seq.tokens[i * P:(i + 1) * P])
            seq.num_registered += 1

    # -- leaving the running set -----------------------------------------------------------------------------------
    def preempt(self, seq: Sequence):
        self.running.remove(seq)
        self._reset(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.cacheable = True  # recomputed from scratch with the current weights
        self.add(seq, front=True)

    def finish(self, seq: Sequence):
        """Remove seq (running or waiting) and release its blocks."""
        if seq.status == RUNNING:
            self.running.remove(seq)
        elif seq.status == WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self._reset(seq)
        seq.status = FINISHED

    def _reset(self, seq: Sequence):
        self.blocks.release(seq.blocks)
        seq.blocks, seq.num_computed, seq.num_registered, seq.chain = [], 0, 0, ROOT
        seq.lookahead, seq.draft = 0, []  # drafts follow the computed tokens: recomputation starts without them
        if seq.hidden is not None:  # nothing is computed any more: a readmission recomputes (and re-records) it all
            seq.hidden.clear()
