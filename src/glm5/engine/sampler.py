"""Per-request sampling parameters and the batched sampler.

Order of processing (each step, per row): raw logits -> the grammar's allowed-token mask (constrained rows only,
grammar.py) -> min_tokens mask (eos / stop ids get -inf until min_tokens outputs exist) -> presence / frequency
penalties (OpenAI's definition, over generated tokens only) -> greedy argmax if temperature < 1e-5 (vLLM's
_SAMPLING_EPS; dividing by a tinier one can overflow fp32 logits to inf and sample NaN), else divide by temperature
-> min_p -> top_k -> top_p -> draw.

Log-probs reported per sampled token (RL needs the first, debugging sampling the second):
  - `logprob`: log_softmax of the raw model logits (fp32), before any processing: the policy's own probability,
    what a trainer recomputes. `top_logprobs` are also taken from the raw distribution (vLLM's default
    "raw_logprobs" mode).
  - `sampling_logprob`: log-prob under the distribution the token was actually drawn from (after the steps above);
    0.0 for greedy, which draws from a point mass.

Reproducibility: every sequence owns a torch.Generator (seeded from `seed`, or from the engine's seed stream when
None) and only its own row consumes it, so a seeded request samples the same tokens whatever else shares its batch
(up to rounding of the batched logits). With n > 1, sample i uses seed + i.

Letters: B rows, V vocab, K top logprobs, W = ceil(V / 32) mask words.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .grammar import Grammar

GREEDY_BELOW = 1e-5  # temperatures below this are greedy, as vLLM's sampling_params.py (_SAMPLING_EPS)


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # below GREEDY_BELOW (0 included) = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = None  # None = up to the model's context / the cache's capacity
    min_tokens: int = 0  # vLLM: eos and stop ids are masked until this many tokens were generated
    stop: list[str] = field(default_factory=list)  # needs the engine's `detokenize` callable
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False  # vLLM: do not stop at the model's eos ids
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    top_logprobs: int = 0  # also return the k most likely tokens (raw distribution) at each step
    grammar: Grammar | None = None  # constrained decoding (grammar.py): only tokens the grammar allows are drawn

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self):
        checks = [
            (isinstance(self.n, int) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}"),
            (0 <= self.temperature < float("inf"), f"temperature must be a finite number >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (isinstance(self.top_k, int) and self.top_k >= -1, f"top_k must be -1, 0 (off) or >= 1, got {self.top_k!r}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
             f"max_tokens must be an integer >= 1 or None, got {self.max_tokens!r}"),
            (isinstance(self.min_tokens, int) and self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens!r}"),
            (self.max_tokens is None or self.min_tokens <= self.max_tokens,
             f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (isinstance(self.top_logprobs, int) and self.top_logprobs >= 0, f"top_logprobs must be >= 0, got {self.top_logprobs!r}"),
            (all(isinstance(s, str) and s for s in self.stop), f"stop must be non-empty strings, got {self.stop!r}"),
            (all(isinstance(t, int) for t in self.stop_token_ids), f"stop_token_ids must be integers, got {self.stop_token_ids!r}"),
            (self.seed is None or isinstance(self.seed, int), f"seed must be an integer or None, got {self.seed!r}"),
            # min_tokens masks the end tokens, which a finished grammar allows alone: the two would leave no token.
            (self.grammar is None or self.min_tokens == 0,
             "min_tokens cannot be combined with a grammar: the grammar decides where the output ends"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclass
class SeqSampling:
    """Per-sequence sampling state the engine keeps next to the scheduler's Sequence."""

    params: SamplingParams
    generator: torch.Generator
    eos_ids: list[int]  # empty when ignore_eos

    @property
    def min_tokens_mask(self) -> list[int]:
        return sorted(set(self.params.stop_token_ids) | set(self.eos_ids))


@dataclass
class Sampled:
    tokens: list[int]
    logprobs: list[float]  # raw
    sampling_logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]] | None]


def make_generator(seed: int, device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


@torch.no_grad()
def sample(logits_BV: torch.Tensor, states: list[SeqSampling], outputs: list[list[int]],
           allowed_BW: torch.Tensor | None = None) -> Sampled:
    """Draw one token per row. outputs[b] = the row's generated tokens so far (penalties and min_tokens).
    allowed_BW: packed allowed-token bitmasks (grammar.py; all bits set for an unconstrained row), or None when no
    row is constrained, which leaves this function exactly as without constraints."""
    B, V = logits_BV.shape
    dev = logits_BV.device
    logits_BV = logits_BV.float()  # fp32: these log-probs feed RL importance ratios
    lse_B1 = logits_BV.logsumexp(-1, keepdim=True)  # raw log-probs = logits - lse, never materialised [B, V]
    x_BV = process(logits_BV, states, outputs, allowed_BW)

    tok_B = x_BV.argmax(-1)  # greedy rows; sampled rows are overwritten below
    samp_B = torch.zeros(B, device=dev)  # greedy draws from a point mass: log 1
    rows = [b for b, st in enumerate(states) if not st.params.greedy]
    if rows:
        r_R = torch.tensor(rows, device=dev)
        sub = [states[b] for b in rows]
        lp_RV = tempered_logprobs(x_BV[r_R], sub)
        tok_R = race(lp_RV, [st.generator for st in sub])
        tok_B[r_R] = tok_R
        samp_B[r_R] = lp_RV.gather(1, tok_R[:, None])[:, 0]
    raw_B = (logits_BV.gather(1, tok_B[:, None]) - lse_B1)[:, 0]
    return Sampled(tok_B.tolist(), raw_B.tolist(), samp_B.tolist(), top_logprobs(logits_BV, lse_B1, states))


def process(logits_BV: torch.Tensor, states: list[SeqSampling], outputs: list[list[int]],
            allowed_BW: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 logits after the grammar mask, min_tokens and penalties (before temperature): logits_BV itself when
    no row changes anything, else a copy (the raw logits stay raw for the reported log-probs)."""
    V, dev = logits_BV.shape[-1], logits_BV.device
    x_BV = logits_BV
    if allowed_BW is not None:
        x_BV = logits_BV.masked_fill(~unpack_bitmask(allowed_BW, V), float("-inf"))
    for b, (st, out) in enumerate(zip(states, outputs)):
        p = st.params
        masked = len(out) < p.min_tokens and st.min_tokens_mask
        penalised = (p.presence_penalty or p.frequency_penalty) and out
        if (masked or penalised) and x_BV is logits_BV:
            x_BV = logits_BV.clone()
        if masked:
            x_BV[b, torch.tensor(st.min_tokens_mask, device=dev)] = float("-inf")
        if penalised:
            count_V = torch.bincount(torch.tensor(out, device=dev), minlength=V)[:V].float()
            x_BV[b] -= p.frequency_penalty * count_V + p.presence_penalty * (count_V > 0).float()
    return x_BV


def tempered_logprobs(x_RV: torch.Tensor, states: list[SeqSampling]) -> torch.Tensor:
    """Log-probs of the distribution sampled rows draw from: processed logits / temperature, then the filters."""
    temp_R1 = torch.tensor([st.params.temperature for st in states], device=x_RV.device)[:, None]
    return _filter(x_RV / temp_R1, states).log_softmax(-1)


def race(lp_RV: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One draw per row from exp(lp_RV) (need not be normalised), each row from its own generator.
    Exponential race (= Gumbel max): argmax p / E, E ~ Exp(1). E == 0 would give +inf and turn a dropped token's
    -inf into NaN, which argmax prefers: clamp it away."""
    noise_RV = torch.empty_like(lp_RV)
    for i, g in enumerate(generators):
        noise_RV[i].exponential_(generator=g)
    return (lp_RV - noise_RV.clamp_min_(torch.finfo(torch.float32).tiny).log_()).argmax(-1)


def top_logprobs(logits_BV: torch.Tensor, lse_B1: torch.Tensor, states: list[SeqSampling]) -> list:
    """Per row, its top_logprobs most likely tokens of the raw distribution as (id, logprob), or None."""
    B, V = logits_BV.shape
    k = max(st.params.top_logprobs for st in states)
    tops: list = [None] * B
    if k:
        val_BK, idx_BK = logits_BV.topk(min(k, V), dim=-1)
        val, idx = (val_BK - lse_B1).tolist(), idx_BK.tolist()
        for b, st in enumerate(states):
            kb = st.params.top_logprobs
            if kb:
                tops[b] = list(zip(idx[b][:kb], val[b][:kb]))
    return tops


def unpack_bitmask(mask_BW: torch.Tensor, V: int) -> torch.Tensor:
    """[B, W] int32 bitmask (bit t % 32 of word t // 32 = token t) -> [B, V] bool."""
    bits_32 = torch.arange(32, device=mask_BW.device, dtype=torch.int32)
    B, W = mask_BW.shape
    return ((mask_BW[:, :, None] >> bits_32) & 1).bool().view(B, W * 32)[:, :V]


def _filter(x_BV: torch.Tensor, states: list[SeqSampling]) -> torch.Tensor:
    """min_p, top_k, top_p on tempered logits (sampled rows only); dropped tokens get -inf."""
    dev = x_BV.device
    min_p_B = torch.tensor([st.params.min_p for st in states], device=dev)
    top_k_B = torch.tensor([max(st.params.top_k, 0) for st in states], device=dev)
    top_p_B = torch.tensor([st.params.top_p for st in states], device=dev)
    if bool((min_p_B > 0).any()):
        p_BV = x_BV.softmax(-1)
        x_BV = x_BV.masked_fill(p_BV < min_p_B[:, None] * p_BV.max(-1, keepdim=True).values, float("-inf"))
    if bool((top_k_B > 0).any()) or bool((top_p_B < 1).any()):
        sorted_BV, order_BV = x_BV.sort(-1, descending=True)
        rank_V = torch.arange(x_BV.shape[-1], device=dev)
        drop_BV = (top_k_B[:, None] > 0) & (rank_V[None] >= top_k_B[:, None])
        sorted_BV = sorted_BV.masked_fill(drop_BV, float("-inf"))
        # top_p: keep the smallest head of the sorted list whose mass reaches top_p (the first token always stays).
        p_BV = sorted_BV.softmax(-1)
        before_BV = p_BV.cumsum(-1) - p_BV  # mass strictly before each token
        cut_BV = (before_BV >= top_p_B[:, None]) & (top_p_B[:, None] < 1)  # top_p = 1 must not drop tail rounding
        sorted_BV = sorted_BV.masked_fill(cut_BV, float("-inf"))
        x_BV = torch.full_like(x_BV, float("-inf")).scatter(-1, order_BV, sorted_BV)
    return x_BV
