"""The inference engine: token ids in, token ids out. `add_request` / `step` / `abort` / `update_weights`, and on
top `run_to_completion` (submit prompts, yield their outputs until they finish) and `generate` (collect them).
Knows nothing of HTTP, text or chat (stop strings need a `detokenize` callable).

    engine = Engine(model)              # KV cache: max_num_seqs whole contexts, at most a share of the free memory
    rid = engine.add_request([1, 2, 3], SamplingParams(temperature=0, max_tokens=16))
    while engine.has_unfinished():
        for out in engine.step(): ...   # StepOutput: new tokens of one sequence, logprobs, finished, reason

Not thread-safe: a server drives it from one thread (or one asyncio task) and queues add/abort calls to it.

Design notes:
  - n > 1: the request's first sequence prefills the prompt; at its first token it forks n - 1 more sequences, each
    drawing its own first token from the same logits. They join the waiting queue and take the prompt's full
    blocks from the prefix cache (shared, ref-counted); only the last partial block is recomputed per sample.
  - Stop strings are matched here only when the engine was given `detokenize(token_ids) -> str` (the server's
    tokenizer); the output then carries `stop_reason` = the string and the layer above trims the text, as vLLM's
    detokenizer does. Without a detokenizer a request with stop strings is refused at add time.
  - One request never fails another: token ids are checked against the vocabulary at add time (RequestError), and
    what goes wrong in a step for one request (non-finite logits, a sampler or detokenizer error) ends only that
    request, with finish_reason "abort" and the reason in `error`; the batch-wide model call is the only part whose
    failure still fails the step.
  - Constrained decoding (SamplingParams.grammar, grammar.py): each sample holds its own matcher, started at add
    time past the prompt's tail (a tail the grammar rejects is a RequestError). Every step the constrained rows'
    allowed-token masks are computed together and the sampler drops what they forbid; the sampled token advances
    the matcher. A step without constrained rows computes no mask. A grammar that fails mid-generation (a parser
    limit) fails only its request, as any other per-request failure does.
  - vocab_limit: a checkpoint may carry more lm_head rows than its tokenizer has tokens (GLM-5 pads to 154880);
    the rows past the limit are cut off the logits, so they are never sampled nor reported in top_logprobs (vLLM's
    LogitsProcessor likewise drops padded vocabulary columns before sampling).
  - update_weights: in-flight sequences keep the KV they computed under the old weights (each token reports the
    version that sampled it) unless recompute_running=True preempts them all so they recompute; the prefix cache
    is emptied either way, so no new request reuses stale KV. The MTP layer is part of the model: its tensors
    (`mtp.0.*`) update like any other, and drafts from then on come from the new ones.
  - speculative_tokens=k (speculative.py): each decoding sequence verifies up to k MTP drafts per step and emits
    1 .. k+1 tokens, each exactly as plain decoding would sample it (greedy: the same tokens). Stops, max_tokens
    and logprobs apply token by token within the emitted run; tokens after a stop are dropped. A row with a grammar
    does not speculate (its mask would have to be computed for every draft position first): it decodes one token
    a step beside the speculating rows. Drafts never reach past max_tokens, and the scheduler drops drafts rather
    than preempt anyone for them. k = 0 is plain decoding, the MTP layer never runs.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Callable

import torch

from .grammar import GrammarError, MaskFiller, Matcher
from .kv_cache import BlockManager, PagedKVCache, bytes_per_block, default_num_blocks
from .runner import ModelRunner
from .sampler import SamplingParams, SeqSampling, make_generator, sample
from .scheduler import FINISHED, RUNNING, Scheduler, Sequence
from .threads import StepThreads
from . import speculative

MAX_SPECULATIVE_TOKENS = 15  # 1 + k query tokens per verify row stay on the decode attention path (<= 16, mla.py)


class RequestError(ValueError):
    """A request the engine cannot serve (bad ids, too long for the context or the cache)."""


@dataclass
class StepOutput:
    """What one step produced for one sequence (sample `index` of request `request_id`)."""

    request_id: str
    index: int
    new_token_ids: list[int]
    logprobs: list[float]  # raw model log-prob of each new token (see sampler.py)
    sampling_logprobs: list[float]  # log-prob under the processed distribution it was drawn from
    top_logprobs: list[list[tuple[int, float]]] | None
    policy_versions: list[int]  # engine.policy_version that produced each new token
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    error: str | None = None  # set (with finish_reason "abort") when the engine failed this request, not its client
    # add_request(return_hidden=True), on the finishing output: [prompt + output - 1, D] fp32 final-norm hidden
    # states of every token fed to the model (the last token is never fed), as a full forward would compute them
    hidden: torch.Tensor | None = None


@dataclass
class Generation:
    """One finished sample, as `generate` returns it."""

    index: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    sampling_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list = field(default_factory=list)
    policy_versions: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str | None = None


@dataclass
class _RequestState:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    seed: int
    seqs: dict[int, Sequence] = field(default_factory=dict)
    done: set[int] = field(default_factory=set)
    forked: bool = False
    matcher: Matcher | None = None  # constrained: past the prompt's tail, before any output; each sample forks it


@dataclass
class _SeqState(SeqSampling):
    max_tokens: int = 0
    text_len: int = 0  # characters of detokenized output already searched for stop strings
    matcher: Matcher | None = None  # this sample's position in its grammar
    # speculative decoding: the distribution each pending draft was drawn from (None: greedy), and the MTP layer's
    # hidden state at the last draft (the next chained draft's input)
    draft_q: list = field(default_factory=list)
    draft_h: torch.Tensor | None = None
    draft_conf: float = 0.0  # the last draft's confidence (speculative.CONFIDENCE)


class Engine:
    def __init__(self, model, *, cache_bytes: int | None = None, num_blocks: int | None = None, block_size: int = 16,
                 max_num_batched_tokens: int = 2048, max_num_seqs: int = 64, eos_token_ids: list[int] | None = None,
                 detokenize: Callable[[list[int]], str] | None = None, seed: int = 0, vocab_limit: int | None = None,
                 speculative_tokens: int = 0, small_step_threads: int | None = None):
        cfg = model.config
        self.model, self.config = model, cfg
        w = model.lm_head.weight
        self.device, self.dtype = w.device, w.dtype
        k = speculative_tokens
        if not (isinstance(k, int) and not isinstance(k, bool) and 0 <= k <= MAX_SPECULATIVE_TOKENS):
            raise ValueError(f"speculative_tokens must be an integer in [0, {MAX_SPECULATIVE_TOKENS}] (draft tokens "
                             f"verified per step; 1 + k query tokens keep the decode attention path), got {k!r}")
        if k and not len(model.mtp):
            raise ValueError(f"speculative_tokens={k} drafts with the model's MTP layer, and this model has none "
                             f"(num_nextn_predict_layers = 0; a checkpoint saved by transformers drops "
                             f"model.layers.{cfg.num_hidden_layers}.*): use speculative_tokens=0")
        self.speculative_tokens = k
        mtp = k > 0
        per_block = bytes_per_block(cfg, block_size, self.dtype, mtp)
        if num_blocks is not None:
            self.cache_sizing = f"{num_blocks} blocks given"
        elif cache_bytes is not None:
            num_blocks = cache_bytes // per_block
            if num_blocks < 1:
                raise ValueError(f"cache_bytes={cache_bytes} holds no block: one block of {block_size} tokens "
                                 f"takes {per_block} bytes")
            self.cache_sizing = f"{cache_bytes / (1 << 20):g} MiB given"
        else:
            num_blocks, self.cache_sizing = default_num_blocks(cfg, self.dtype, block_size, max_num_seqs, self.device,
                                                               mtp)
        self.cache = PagedKVCache(cfg, num_blocks, block_size, self.dtype, self.device, mtp)
        self.blocks = BlockManager(num_blocks, block_size)
        self.scheduler = Scheduler(self.blocks, max_num_batched_tokens, max_num_seqs)
        self.runner = ModelRunner(model, self.cache, short=1 + k, keep_hidden=mtp)
        self.max_model_len = min(cfg.max_position_embeddings, num_blocks * block_size)
        self.eos_token_ids = list(cfg.eos_token_id if eos_token_ids is None else eos_token_ids)
        # Token ids a request may carry or be sampled: the tokenizer's, when the checkpoint pads its vocabulary.
        if vocab_limit is not None and not (isinstance(vocab_limit, int) and vocab_limit >= 1):
            raise ValueError(f"vocab_limit must be an integer >= 1 (the tokenizer's size), got {vocab_limit!r}")
        self.vocab_limit = cfg.vocab_size if vocab_limit is None else min(vocab_limit, cfg.vocab_size)
        bad_eos = [t for t in self.eos_token_ids if not (isinstance(t, int) and 0 <= t < self.vocab_limit)]
        if bad_eos:
            raise ValueError(f"eos_token_ids {bad_eos} are not token ids in [0, {self.vocab_limit}) (vocab_limit "
                             f"{vocab_limit}, config vocab_size {cfg.vocab_size})")
        self.drafter = speculative.Drafter(model, self.runner, k, self.vocab_limit) if mtp else None
        self.threads = StepThreads(model, small=small_step_threads)  # threads.py: one thread for decode-sized steps
        self.detokenize = detokenize
        self.policy_version = 0
        self._seeds = random.Random(seed)
        self._ids = itertools.count()
        self._seq_ids = itertools.count()
        self.requests: dict[str, _RequestState] = {}
        self._pending: list[StepOutput] = []  # outputs made outside step() (aborts), returned by the next step()
        self._masks = MaskFiller(self.device)
        self.counters = {"prompt_tokens": 0, "computed_tokens": 0, "generation_tokens": 0, "steps": 0,
                         "finished_requests": 0, "aborted_requests": 0, "failed_requests": 0}

    # -- requests --------------------------------------------------------------------------------------------------
    def add_request(self, prompt_ids, params: SamplingParams | None = None, request_id: str | None = None, *,
                    return_hidden: bool = False) -> str:
        """Queue a request; returns its id. return_hidden: its finishing output carries the hidden states of every
        token fed (the model's view of prompt and output, e.g. to score MTP drafts without a second forward); the
        request then computes its whole prompt rather than taking cached prefix blocks."""
        params = SamplingParams() if params is None else params
        params.validate()
        prompt = prompt_ids.tolist() if isinstance(prompt_ids, torch.Tensor) else list(prompt_ids)
        if not prompt:
            raise RequestError("prompt is empty: at least one token id is needed")
        self._check_ids("prompt token", prompt)
        self._check_ids("stop_token_ids entry", params.stop_token_ids)
        if return_hidden and params.n > 1:
            raise RequestError("return_hidden needs n = 1: forked samples share the prompt's cached blocks")
        if params.stop and self.detokenize is None:
            raise RequestError("stop strings need text: build the Engine with detokenize=..., or stop on token ids")
        room = self.max_model_len - len(prompt)
        limit = (f"the limit of {self.max_model_len} tokens (max_position_embeddings "
                 f"{self.config.max_position_embeddings}, KV cache capacity "
                 f"{self.blocks.num_blocks * self.blocks.block_size})")
        if room < 1:
            raise RequestError(f"prompt of {len(prompt)} tokens leaves no room to generate: {limit}")
        max_tokens = room if params.max_tokens is None else params.max_tokens
        if max_tokens > room:
            raise RequestError(f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) = "
                               f"{len(prompt) + max_tokens} exceeds {limit}")
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        matcher = None
        if params.grammar is not None:
            if params.grammar.vocab_size != self.vocab_limit:
                raise RequestError(f"the grammar was built for a vocabulary of {params.grammar.vocab_size} tokens; "
                                   f"this engine samples from {self.vocab_limit}")
            try:
                matcher = params.grammar.start(prompt)
            except GrammarError as e:
                raise RequestError(str(e)) from None
        seed = params.seed if params.seed is not None else self._seeds.getrandbits(62)
        req = _RequestState(request_id, prompt, params, seed, matcher=matcher)
        self.requests[request_id] = req
        req.seqs[0] = self._new_seq(req, 0, max_tokens)
        if return_hidden:
            req.seqs[0].hidden = []
        self.scheduler.add(req.seqs[0])
        self.counters["prompt_tokens"] += len(prompt)
        return request_id

    def _check_ids(self, what: str, ids: list):
        V = self.vocab_limit
        for t in ids:
            if not (isinstance(t, int) and not isinstance(t, bool) and 0 <= t < V):
                raise RequestError(f"{what} {t!r} is not a token id in [0, {V})")

    def _new_seq(self, req: _RequestState, index: int, max_tokens: int) -> Sequence:
        p = req.params
        state = _SeqState(p, make_generator(req.seed + index, self.device), [] if p.ignore_eos else self.eos_token_ids,
                          max_tokens=max_tokens, matcher=req.matcher.fork() if req.matcher is not None else None)
        return Sequence(next(self._seq_ids), req.request_id, index, list(req.prompt), len(req.prompt), state)

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its cache blocks; the next step() reports it with finish_reason 'abort'.
        False if the id is unknown or already finished."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        self._pending += self._end(req, None)
        self.counters["aborted_requests"] += 1
        return True

    def _end(self, req: _RequestState, error: str | None) -> list[StepOutput]:
        """Finish every sample of req still open with "abort" (error: why the engine failed it) and free its blocks."""
        outs = []
        for i in range(req.params.n):
            if i in req.done:
                continue
            seq = req.seqs.get(i)
            if seq is not None:
                self.scheduler.finish(seq)
            n_out = len(seq.output_ids) if seq is not None else 0
            outs.append(StepOutput(req.request_id, i, [], [], [], None, [], True, "abort", None, len(req.prompt),
                                   n_out, error=error))
        return outs

    def _fail(self, request_id: str, error: str) -> list[StepOutput]:
        req = self.requests.pop(request_id, None)
        if req is None:  # already finished
            return []
        self.counters["failed_requests"] += 1
        return self._end(req, f"request {request_id!r} failed in the engine: {error}")

    def has_unfinished(self) -> bool:
        return bool(self.requests) or bool(self._pending)

    # -- one step --------------------------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        outputs, self._pending = self._pending, []
        plan = self.scheduler.schedule()
        if not plan:
            return outputs
        with self.threads.step(sum(n for _, n in plan)):
            return self._step(plan, outputs)

    def _step(self, plan: list[tuple[Sequence, int]], outputs: list[StepOutput]) -> list[StepOutput]:
        if self.drafter is not None:
            plan = self.drafter.chain(plan)
        computed = {seq: seq.num_computed for seq, _ in plan}  # before this step
        seqs, logits_NV = self.runner.execute(plan)
        for seq, n in plan:
            if not seq.draft:  # a verifying row advances by what it accepts, below
                self.scheduler.advance(seq, n)
            self.counters["computed_tokens"] += n
        self.counters["steps"] += 1
        if not seqs:
            if self.drafter is not None:
                self.drafter.after_step(plan, computed, {})
            return outputs
        if self.vocab_limit < logits_NV.shape[-1]:  # padded lm_head rows are no tokens (see the module notes)
            logits_NV = logits_NV[:, :self.vocab_limit]
        start = [0]  # each sequence's first logit row: 1 + len(draft) rows each
        for seq in seqs:
            start.append(start[-1] + 1 + len(seq.draft))
        failed: dict[str, str] = {}  # request id -> why this step failed it
        # Non-finite raw logits (a NaN in the weights or an overflow) would sample garbage or an arbitrary argmax:
        # fail those requests loudly. One [N] reduction and one sync per step.
        finite_N = torch.isfinite(logits_NV).all(-1).tolist()
        for i, seq in enumerate(seqs):
            if not all(finite_N[start[i]:start[i + 1]]):
                failed[seq.request_id] = "the model produced non-finite logits (NaN or inf)"
        rows, row_seqs = [], []
        for i, seq in enumerate(seqs):
            rows.append(start[i])
            row_seqs.append(seq)
            req = self.requests[seq.request_id]
            if req.params.n > 1 and not req.forked:  # the prompt is done: the other samples start here
                req.forked = True
                for j in range(1, req.params.n):
                    req.seqs[j] = self._new_seq(req, j, seq.state.max_tokens)
                    rows.append(start[i])
                    row_seqs.append(req.seqs[j])
        allowed_BW = self._allowed(row_seqs, failed, logits_NV.shape[-1])
        if any(seq.draft for seq in seqs):
            got = self._sample_and_verify(logits_NV, rows, row_seqs, failed, allowed_BW)
        else:
            got = self._sample(logits_NV, rows, row_seqs, failed, allowed_BW)
        forked, kept = [], {}
        for r, seq in enumerate(row_seqs):
            if seq.request_id in failed:
                continue
            emitted = got[r] if isinstance(got[r], speculative.Verdict) else _one(got[r])
            res = self._emit(seq, emitted, failed)
            if res is None:
                continue
            n_out, reason, stop_reason = res
            if seq.draft:  # roll back: the computed count stops after the last accepted draft
                kept[seq] = min(emitted.accepted + 1, n_out)
                self.scheduler.advance(seq, kept[seq])
                if seq.hidden is not None:
                    seq.hidden[-1] = seq.hidden[-1][:kept[seq]]
                speculative.clear(seq)
            out = StepOutput(seq.request_id, seq.index, emitted.tokens[:n_out], emitted.logprobs[:n_out],
                             emitted.sampling_logprobs[:n_out],
                             emitted.top_logprobs[:n_out] if emitted.top_logprobs[0] is not None else None,
                             [self.policy_version] * n_out, reason is not None, reason, stop_reason,
                             seq.prompt_len, len(seq.output_ids))
            outputs.append(out)
            if reason is not None:
                if seq.hidden is not None:
                    out.hidden = torch.cat(seq.hidden)
                self._finish(seq)
            elif seq.status != RUNNING:  # a fresh fork: queue it to compute its partial block and first token
                forked.append(seq)
        for seq in reversed(forked):
            if seq.request_id not in failed:
                self.scheduler.add(seq, front=True)
        for rid, why in failed.items():
            outputs += self._fail(rid, why)
        if self.drafter is not None:
            self.drafter.after_step(plan, computed, kept)
        return outputs

    def _emit(self, seq: Sequence, emitted: speculative.Verdict, failed: dict[str, str]):
        """Append a row's tokens one by one, each checked as a plain decode checks its token; the first stop ends
        the run. Returns (tokens kept, finish reason, stop reason), or None when the request failed."""
        for i, tok in enumerate(emitted.tokens):
            seq.tokens.append(tok)
            self.counters["generation_tokens"] += 1
            m = seq.state.matcher
            if m is not None and not m.advance(tok):
                failed[seq.request_id] = f"the grammar rejected sampled token {tok}: {m.error}"
                return None
            try:
                reason, stop_reason = self._check_stop(seq, tok)
            except Exception as e:  # e.g. a detokenizer that cannot decode: this request's problem only
                failed[seq.request_id] = f"stop check failed: {type(e).__name__}: {e}"
                return None
            if reason is not None:
                return i + 1, reason, stop_reason
        return len(emitted.tokens), None, None

    def _allowed(self, row_seqs: list[Sequence], failed: dict[str, str], V: int) -> torch.Tensor | None:
        """[rows, W] allowed-token bitmasks, or None when no live row is constrained (nothing is computed)."""
        matchers = [s.state.matcher if s.request_id not in failed else None for s in row_seqs]
        if not any(m is not None for m in matchers):
            return None
        allowed_BW = self._masks(matchers, V)
        for seq, m in zip(row_seqs, matchers):
            if m is not None and m.error is not None:  # e.g. a parser limit hit while computing the mask
                failed[seq.request_id] = f"the grammar failed: {m.error}"
        return allowed_BW

    def _sample(self, logits_BV: torch.Tensor, rows: list[int], row_seqs: list[Sequence],
                failed: dict[str, str], allowed_BW: torch.Tensor | None = None) -> list[tuple | None]:
        """(token, logprob, sampling logprob, top logprobs) per row, None for rows of failed requests. The batch is
        sampled at once; if that raises, row by row, so only the requests whose rows raise are failed."""
        live = [r for r, s in enumerate(row_seqs) if s.request_id not in failed]
        res: list[tuple | None] = [None] * len(row_seqs)

        def draw(rs: list[int]):
            idx = torch.tensor([rows[r] for r in rs], device=logits_BV.device)
            kw = {}  # no mask: the sampler is called exactly as without constrained decoding
            if allowed_BW is not None:
                kw["allowed_BW"] = allowed_BW if len(rs) == allowed_BW.shape[0] else \
                    allowed_BW[torch.tensor(rs, device=allowed_BW.device)]
            g = sample(logits_BV[idx], [row_seqs[r].state for r in rs], [row_seqs[r].output_ids for r in rs], **kw)
            for j, r in enumerate(rs):
                res[r] = (g.tokens[j], g.logprobs[j], g.sampling_logprobs[j], g.top_logprobs[j])

        if not live:
            return res
        try:
            draw(live)
        except Exception:
            for r in live:
                if row_seqs[r].request_id in failed:
                    continue
                try:
                    draw([r])
                except Exception as e:
                    failed[row_seqs[r].request_id] = f"sampling failed: {type(e).__name__}: {e}"
        return res

    # -- speculative decoding ----------------------------------------------------------------------------------------
    def _sample_and_verify(self, logits_NV: torch.Tensor, rows: list[int], row_seqs: list[Sequence],
                           failed: dict[str, str], allowed_BW: torch.Tensor | None) -> list:
        """Rows without drafts sample as usual (_sample: a tuple each); rows with drafts verify them (a Verdict
        each). A row whose verification raises fails only its request."""
        got: list = [None] * len(row_seqs)
        plain = [r for r, s in enumerate(row_seqs) if not s.draft]
        if plain:
            mask = None if allowed_BW is None else allowed_BW[torch.tensor(plain, device=allowed_BW.device)]
            for r, g in zip(plain, self._sample(logits_NV, [rows[r] for r in plain], [row_seqs[r] for r in plain],
                                                failed, mask)):
                got[r] = g
        spec = [r for r, s in enumerate(row_seqs) if s.draft and s.request_id not in failed]

        def run(rs: list[int]):
            seqs = [row_seqs[r] for r in rs]
            idx = torch.tensor([n for r, s in zip(rs, seqs) for n in range(rows[r], rows[r] + 1 + len(s.draft))],
                               device=logits_NV.device)
            res = speculative.verify(logits_NV[idx], [s.draft for s in seqs], [s.state.draft_q for s in seqs],
                                     [s.state for s in seqs], [s.output_ids for s in seqs])
            for r, v in zip(rs, res):
                got[r] = v

        if spec:
            try:
                run(spec)
            except Exception:
                for r in spec:
                    try:
                        run([r])
                    except Exception as e:
                        failed[row_seqs[r].request_id] = f"verifying drafts failed: {type(e).__name__}: {e}"
        for r in spec:
            if got[r] is not None and row_seqs[r].request_id not in failed:
                self.drafter.count(row_seqs[r], got[r])
        return got

    def _check_stop(self, seq: Sequence, tok: int) -> tuple[str | None, int | str | None]:
        st: _SeqState = seq.state
        p, out = st.params, seq.output_ids
        if len(out) >= p.min_tokens:
            if tok in p.stop_token_ids:
                return "stop", tok
            if tok in st.eos_ids:
                return "stop", None
            if st.matcher is not None and st.matcher.done and tok in st.matcher.eos_ids:
                return "stop", tok  # an end token the engine does not stop on (ignore_eos): the grammar ends here
            if p.stop:
                text = self.detokenize(out)
                start = max(0, st.text_len - max(len(s) for s in p.stop) + 1)
                st.text_len = len(text)
                hits = [(text.find(s, start), s) for s in p.stop]
                hits = [(i, s) for i, s in hits if i >= 0]
                if hits:
                    return "stop", min(hits)[1]
        if len(out) >= st.max_tokens:
            return "length", None
        return None, None

    def _finish(self, seq: Sequence):
        if seq.status != FINISHED:
            self.scheduler.finish(seq)
        seq.status = FINISHED
        req = self.requests[seq.request_id]
        req.done.add(seq.index)
        if len(req.done) == req.params.n:
            del self.requests[seq.request_id]
            self.counters["finished_requests"] += 1

    # -- weights ---------------------------------------------------------------------------------------------------
    def update_weights(self, state_dict: dict[str, torch.Tensor], version: int | None = None,
                       recompute_running: bool = False) -> int:
        """Copy tensors (glm5 parameter / buffer names, any subset) into the model in place; returns the new
        policy_version (version if given, else the old one + 1). An FP8 model takes dense tensors: they are
        quantized here (a plain copy into an e4m3 buffer would drop the block scales)."""
        fp8 = (torch.float8_e4m3fn, torch.float8_e5m2)
        if any(b.dtype in fp8 for b in self.model.buffers()) and not any(v.dtype in fp8 for v in state_dict.values()):
            from ..quant.load import fp8_state_dict

            state_dict = fp8_state_dict(self.model, state_dict)
        named = dict(self.model.named_parameters())
        named.update(self.model.named_buffers())
        unknown = [k for k in state_dict if k not in named]
        shapes = [f"{k}: got {tuple(v.shape)}, model has {tuple(named[k].shape)}"
                  for k, v in state_dict.items() if k in named and tuple(v.shape) != tuple(named[k].shape)]
        if unknown or shapes:
            raise ValueError("update_weights: " + "; ".join(
                ([f"unknown names {unknown[:5]}{' ...' if len(unknown) > 5 else ''}"] if unknown else []) +
                ([f"wrong shapes {shapes[:5]}"] if shapes else [])))
        with torch.no_grad():
            for k, v in state_dict.items():
                named[k].copy_(v)
        self.runner.head.invalidate()
        self.policy_version = self.policy_version + 1 if version is None else version
        self.blocks.reset_prefix_cache()
        for seq in list(self.scheduler.running):
            seq.cacheable = False
        if recompute_running:
            for seq in reversed(list(self.scheduler.running)):
                self.scheduler.preempt(seq)
        return self.policy_version

    # -- offline use -----------------------------------------------------------------------------------------------
    def generate(self, prompts: list, params: SamplingParams | list[SamplingParams] | None = None) -> list[list[Generation]]:
        """Run prompts to completion; per prompt, its n samples. Needs an otherwise idle engine."""
        if self.has_unfinished():
            raise RuntimeError("generate() needs an idle engine: other requests are in flight (use step())")
        results: list[dict[int, Generation]] = [{} for _ in prompts]
        for i, o in run_to_completion(self, prompts, params):
            g = results[i].setdefault(o.index, Generation(o.index))
            g.token_ids += o.new_token_ids
            g.logprobs += o.logprobs
            g.sampling_logprobs += o.sampling_logprobs
            g.top_logprobs += o.top_logprobs or []
            g.policy_versions += o.policy_versions
            if o.finished:
                g.finish_reason, g.stop_reason, g.error = o.finish_reason, o.stop_reason, o.error
        return [[r[k] for k in sorted(r)] for r in results]

    # -- stats -----------------------------------------------------------------------------------------------------
    def stats(self) -> dict:
        b = self.blocks
        return {"num_waiting": len(self.scheduler.waiting), "num_running": len(self.scheduler.running),
                "num_requests": len(self.requests), "blocks_total": b.num_blocks, "blocks_used": b.num_used,
                "blocks_free": b.num_free, "blocks_cached": b.num_cached, "block_size": b.block_size,
                "cache_bytes": self.cache.nbytes, "max_model_len": self.max_model_len,
                "prefix_cache_hit_tokens": b.hit_tokens, "num_preemptions": self.scheduler.num_preemptions,
                "policy_version": self.policy_version, **self.counters,
                **(self.drafter.stats() if self.drafter is not None else speculative.Drafter.empty_stats())}


def _one(got: tuple) -> speculative.Verdict:
    tok, lp, slp, top = got
    return speculative.Verdict([tok], [lp], [slp], [top], 0)


def run_to_completion(engine, prompts: list, params: SamplingParams | list[SamplingParams] | None = None, *,
                      return_hidden: bool = False) -> Iterator[tuple[int, StepOutput]]:
    """Submit prompts and step the engine until all their samples finished, yielding (prompt index, output) as they
    come: the one loop that drives the engine to the end (Engine.generate, the eval, the terminal client).

    Outputs of requests submitted elsewhere are not yielded: give it an engine nobody else drives. If a prompt is
    refused, none runs (RequestError). Closing the generator early (an interrupted client) aborts what still runs,
    freeing its cache blocks at once, and takes the aborts' outputs, so the engine is left as it was found. Works on
    any object with the engine's add_request / step / abort (tests pass scripted stand-ins)."""
    plist = params if isinstance(params, list) else [params] * len(prompts)
    if len(plist) != len(prompts):
        raise ValueError(f"{len(plist)} sampling params for {len(prompts)} prompts")
    left: dict[str, int] = {}  # request id -> samples not finished
    index: dict[str, int] = {}
    try:
        for i, (p, sp) in enumerate(zip(prompts, plist)):
            sp = SamplingParams() if sp is None else sp
            rid = engine.add_request(p, sp, return_hidden=return_hidden)
            left[rid], index[rid] = sp.n, i
        while left:
            for o in engine.step():
                if o.request_id not in left:
                    continue
                if o.finished:
                    left[o.request_id] -= 1
                    if not left[o.request_id]:
                        del left[o.request_id]
                yield index[o.request_id], o
    finally:
        if left:  # refused, interrupted or failed: abort the rest and take the aborts' outputs from the next step
            aborted = {rid for rid in left if engine.abort(rid)}
            while aborted:
                aborted -= {o.request_id for o in engine.step() if o.finished}
