"""Constrained decoding: a grammar decides which tokens a sequence may take next (llguidance, the library vLLM and
SGLang offer as a structured-output backend). Token ids only: what the grammar says (JSON, a tool-call format) is
the caller's business; the engine asks each constrained row for its allowed-token mask every step, the sampler
drops everything else before drawing (greedy included), and the sampled token advances the row's matcher.

    gtok = grammar_tokenizer(tokenizer_json, vocab_size=V, eos_ids=[...])   # once per tokenizer (~1 s at 150k)
    g = Grammar(gtok, lark_text, after=assistant_id)                       # once per request: compiled, checked
    SamplingParams(..., grammar=g)

- `Grammar` is compiled when it is built, so an invalid grammar or an unsupported JSON schema fails there (the
  server answers 400 before any work), never mid-generation. Each sequence gets a copy of the compiled matcher
  (`start`), so the n samples of a request and the requests of a batch never share state.
- `after`: the grammar describes the output together with the prompt's tail from just after the last occurrence
  of that token id (a chat prompt's `<|assistant|>`), and the tail is fed to the matcher before the first output
  token. So whatever the prompt already opened (a `<think>` block, or a forced `<tool_call>NAME`) is where the
  grammar continues from, read from the ids themselves; a tail the grammar rejects is refused at add time.
- End of output: the grammar's end tokens (`eos_ids`) are allowed only where the grammar accepts. Once nothing but
  an end token can follow, the mask holds only those, so the row draws one and stops as at any eos. A request
  whose constraint cannot finish in its token budget ends with finish_reason "length", its text a valid prefix.
- Masks are 32-token words (llguidance's bitmask layout): [B, ceil(V / 32)] int32, bit t % 32 of word t // 32 set
  when token t is allowed. They are computed on the CPU (in parallel over rows by an `LLExecutor`) into one buffer
  and unpacked on the logits' device (sampler.py).

Letters: B rows, V vocab, W = ceil(V / 32) mask words.
"""

from __future__ import annotations

import json

import llguidance
import torch


class GrammarError(ValueError):
    """A grammar that does not compile, or a prompt tail it rejects (the request is refused)."""


def grammar_tokenizer(tokenizer_json: str, *, vocab_size: int, eos_ids: list[int],
                      special_ids: list[int] = ()) -> llguidance.LLTokenizer:
    """llguidance's view of a HF tokenizer.json. `special_ids` are marked special first: a special token is then a
    token of its own that the grammar names (`<think>`, `<[7]>`), never the bytes of its spelling, so text rules
    cannot produce it and a text spelling of it is not the tag. (llguidance already treats every added `<...>`
    token as special, toktrie_hf_tokenizers; this covers the rest, e.g. `[gMASK]` marked non-special.)
    `eos_ids`: the tokens that end the output, allowed where the grammar accepts."""
    spec = json.loads(tokenizer_json)
    special = set(special_ids)
    for t in spec.get("added_tokens") or ():
        if t.get("id") in special:
            t["special"] = True
    return llguidance.LLTokenizer(json.dumps(spec), n_vocab=vocab_size, eos_token=list(eos_ids))


class Grammar:
    """One compiled grammar (Lark text, llguidance dialect: `%json {...}` embeds a JSON schema, `<name>` is a
    special token), shared by every sequence of a request."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, lark: str, *, after: int | None = None,
                 limits: llguidance.LLParserLimits | None = None):
        self.vocab_size = tokenizer.vocab_size
        self.eos_ids = frozenset(tokenizer.eos_tokens)
        self.after = after
        self.text = lark
        # log_level 0: llguidance would print every rejected token on stderr; errors are read with get_error().
        self._proto = llguidance.LLMatcher(tokenizer, llguidance.LLMatcher.grammar_from_lark(lark), log_level=0,
                                           limits=limits)
        if self._proto.is_error():
            raise GrammarError(_first_line(self._proto.get_error()))

    def start(self, prompt: list[int]) -> Matcher:
        """A fresh matcher for one sequence of this prompt, past the prompt's tail (see `after`)."""
        m = self._proto.deep_copy()
        tail = []
        if self.after is not None and self.after in prompt:
            tail = prompt[len(prompt) - prompt[::-1].index(self.after):]
        if tail and not m.consume_tokens(tail):
            raise GrammarError(f"the prompt's last {len(tail)} tokens (after token {self.after}) do not fit the "
                               f"grammar: {_first_line(m.get_error())}")
        return Matcher(m, self.eos_ids)


class Matcher:
    """One sequence's position in its grammar."""

    def __init__(self, m: llguidance.LLMatcher, eos_ids: frozenset[int]):
        self._m, self.eos_ids = m, eos_ids

    def fork(self) -> Matcher:
        return Matcher(self._m.deep_copy(), self.eos_ids)

    @property
    def error(self) -> str | None:
        return _first_line(self._m.get_error()) if self._m.is_error() else None

    @property
    def done(self) -> bool:
        """Nothing but an end token can follow."""
        return self._m.is_stopped()

    def advance(self, token: int) -> bool:
        """Consume a sampled token; False if the grammar rejects it (the matcher is then in error)."""
        return self._m.consume_token(token)


class MaskFiller:
    """Fills the rows' allowed-token bitmasks each step; one per engine (its thread pool and pinned buffer)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._executor: llguidance.LLExecutor | None = None  # made on first use: no threads for unconstrained use
        self._buf: torch.Tensor | None = None

    def __call__(self, matchers: list[Matcher | None], vocab_size: int) -> torch.Tensor:
        """[B, W] int32 masks on the device, one row per entry; None rows (unconstrained) allow every token."""
        B, W = len(matchers), (vocab_size + 31) // 32
        if self._buf is None or self._buf.shape[0] < B or self._buf.shape[1] != W:
            self._buf = torch.empty((max(B, 8), W), dtype=torch.int32, pin_memory=self.device.type == "cuda")
        buf = self._buf[:B]
        buf.fill_(-1)
        rows = [(m._m, i) for i, m in enumerate(matchers) if m is not None]
        if len(rows) == 1:  # one row: no hand-off to the pool
            m, i = rows[0]
            m.unsafe_compute_mask_ptr(buf[i].data_ptr(), W * 4)
        elif rows:
            if self._executor is None:
                self._executor = llguidance.LLExecutor()
            self._executor.unsafe_compute_mask_ptr(rows, buf.data_ptr(), W * 4, B)
        # Non-blocking from pinned memory: the buffer is rewritten only next step, after this step's sampling has
        # synchronised (the sampler reads its tokens back).
        return buf.to(self.device, non_blocking=True)


def _first_line(msg: str) -> str:
    # What follows llguidance's first line is for its developers: the parser state, or the grammar's source around
    # the error.
    return msg.strip().split("\n", 1)[0]
